#include "kmsfs_fuse.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static kmsfs_fuse_log_fn log_target;

/* libfuse sometimes logs one line in several calls: collect pieces per thread until a newline. */
static __thread char pending[1024];
static __thread size_t pending_len;

static void forward_log(enum fuse_log_level level, const char *fmt, va_list ap) {
    char piece[1024];
    vsnprintf(piece, sizeof piece, fmt, ap);
    for (const char *p = piece; *p != '\0'; p++) {
        if (*p == '\n' || pending_len == sizeof pending - 1) {
            pending[pending_len] = '\0';
            if (log_target != NULL && pending_len > 0) log_target((int)level, pending);
            pending_len = 0;
            if (*p == '\n') continue;
        }
        if (*p != '\r') pending[pending_len++] = *p;
    }
}

void kmsfs_fuse_set_log(kmsfs_fuse_log_fn fn) {
    log_target = fn;
    fuse_set_log_func(forward_log);
}

int kmsfs_fuse_run(const struct kmsfs_fuse_mount *mount, const struct fuse_lowlevel_ops *ops, void *userdata) {
    struct fuse_args args = FUSE_ARGS_INIT(mount->argc, mount->argv);
    int result = KMSFS_FUSE_OK;

    struct fuse_session *session = fuse_session_new(&args, ops, sizeof *ops, userdata);
    if (session == NULL) {
        fuse_opt_free_args(&args);
        return KMSFS_FUSE_BAD_OPTIONS;
    }
    if (fuse_set_signal_handlers(session) != 0) {
        result = KMSFS_FUSE_SIGNALS_FAILED;
        goto destroy;
    }
    if (fuse_session_mount(session, mount->mountpoint) != 0) {
        result = KMSFS_FUSE_MOUNT_FAILED;
        goto signals;
    }
    if (mount->ready != NULL) mount->ready(mount->ready_context);

    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (mount->max_threads > 0) fuse_loop_cfg_set_max_threads(config, mount->max_threads);
    if (mount->max_idle_threads > 0) fuse_loop_cfg_set_idle_threads(config, mount->max_idle_threads);
    fuse_loop_cfg_set_clone_fd(config, 0);
    // A positive result is the signal that ended the loop (an orderly shutdown); negative is an error.
    if (fuse_session_loop_mt(session, config) < 0) result = KMSFS_FUSE_LOOP_FAILED;
    fuse_loop_cfg_destroy(config);

    fuse_session_unmount(session);
signals:
    fuse_remove_signal_handlers(session);
destroy:
    fuse_session_destroy(session);
    fuse_opt_free_args(&args);
    return result;
}
