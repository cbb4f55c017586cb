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

int kmsfs_fuse_run(const struct kmsfs_fuse_mount *mount, const struct fuse_operations *ops, void *private_data) {
    struct fuse_args args = FUSE_ARGS_INIT(mount->argc, mount->argv);
    int result = KMSFS_FUSE_OK;

    struct fuse *fuse = fuse_new(&args, ops, sizeof *ops, private_data);
    if (fuse == NULL) {
        fuse_opt_free_args(&args);
        return KMSFS_FUSE_BAD_OPTIONS;
    }
    if (fuse_mount(fuse, mount->mountpoint) != 0) {
        result = KMSFS_FUSE_MOUNT_FAILED;
        goto destroy;
    }
    struct fuse_session *session = fuse_get_session(fuse);
    if (fuse_set_signal_handlers(session) != 0) {
        result = KMSFS_FUSE_SIGNALS_FAILED;
        goto unmount;
    }
    if (mount->ready != NULL) mount->ready(mount->ready_context);

    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (mount->max_threads > 0) fuse_loop_cfg_set_max_threads(config, mount->max_threads);
    if (mount->max_idle_threads > 0) fuse_loop_cfg_set_idle_threads(config, mount->max_idle_threads);
    fuse_loop_cfg_set_clone_fd(config, 0);
    // A positive result is the signal that ended the loop (an orderly shutdown); negative is an error.
    if (fuse_loop_mt(fuse, config) < 0) result = KMSFS_FUSE_LOOP_FAILED;
    fuse_loop_cfg_destroy(config);

    fuse_remove_signal_handlers(session);
unmount:
    fuse_unmount(fuse);
destroy:
    fuse_destroy(fuse);
    fuse_opt_free_args(&args);
    return result;
}

void kmsfs_fuse_exit_current(void) {
    struct fuse_context *context = fuse_get_context();
    if (context != NULL && context->fuse != NULL) fuse_exit(context->fuse);
}
