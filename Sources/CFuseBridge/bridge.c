#include "kmsfs_fuse.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <pthread.h>
#include <linux/fuse.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

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

/*
 * The request/reply hook (libfuse's custom I/O): libfuse 3.14 cannot negotiate FUSE_HANDLE_KILLPRIV_V2, which the
 * kernel (5.11+) offers. Without it the kernel asks for the security.capability attribute before every write
 * (a GETXATTR round trip per write(2), half the speed of small writes); with it the kernel marks the mount
 * SB_NOSEC and instead flags the requests that must drop set-user-ID/set-group-ID bits and file capabilities:
 * writes and truncations by a process without CAP_FSETID. So the hook adds the flag to the INIT reply, and
 * records, for the worker thread that read each request (libfuse's loop processes a request on the thread that
 * read it), whether that request carries the kill flag.
 */
static _Atomic uint64_t init_unique = UINT64_MAX;
static _Atomic int killpriv_v2_offered = 0;
static int killpriv_v2_wanted = 0;
static __thread int request_kills_suidgid = 0;

static ssize_t hook_read(int fd, void *buf, size_t len, void *userdata) {
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    request_kills_suidgid = 0;
    if (n < (ssize_t)sizeof(struct fuse_in_header)) return n;
    const struct fuse_in_header *in = buf;
    const char *arg = (const char *)buf + sizeof *in;
    size_t argLen = (size_t)n - sizeof *in;
    switch (in->opcode) {
    case FUSE_INIT:
        if (argLen >= offsetof(struct fuse_init_in, flags) + sizeof(uint32_t)) {
            const struct fuse_init_in *init = (const void *)arg;
            atomic_store(&killpriv_v2_offered, (init->flags & FUSE_HANDLE_KILLPRIV_V2) != 0);
            atomic_store(&init_unique, in->unique);
        }
        break;
    case FUSE_WRITE:
        if (argLen >= sizeof(struct fuse_write_in))
            request_kills_suidgid = (((const struct fuse_write_in *)(const void *)arg)->write_flags & FUSE_WRITE_KILL_SUIDGID) != 0;
        break;
    case FUSE_SETATTR:
        if (argLen >= sizeof(struct fuse_setattr_in))
            request_kills_suidgid = (((const struct fuse_setattr_in *)(const void *)arg)->valid & FATTR_KILL_SUIDGID) != 0;
        break;
    case FUSE_OPEN:
        if (argLen >= sizeof(struct fuse_open_in))
            request_kills_suidgid = (((const struct fuse_open_in *)(const void *)arg)->open_flags & FUSE_OPEN_KILL_SUIDGID) != 0;
        break;
    case FUSE_CREATE: /* an existing file opened with O_TRUNC, when another creator won the race */
        if (argLen >= sizeof(struct fuse_create_in))
            request_kills_suidgid = (((const struct fuse_create_in *)(const void *)arg)->open_flags & FUSE_OPEN_KILL_SUIDGID) != 0;
        break;
    default:
        break;
    }
    return n;
}

/* The mount's readahead (/sys/class/bdi/MAJOR:MINOR/read_ahead_kb) to set once the kernel has taken the INIT
 * reply, which sets it to at most the 128 KiB the kernel offered: set at once, before any file can be opened
 * (a file keeps the readahead it was opened with). */
static char readahead_path[128];
static char readahead_value[16];

void kmsfs_fuse_set_readahead(const char *bdi_path, int kib) {
    snprintf(readahead_path, sizeof readahead_path, "%s", bdi_path);
    snprintf(readahead_value, sizeof readahead_value, "%d\n", kib);
}

static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    int init_reply = 0;
    if (count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header) &&
        iov[1].iov_len >= offsetof(struct fuse_init_out, flags) + sizeof(uint32_t)) {
        struct fuse_out_header *out = iov[0].iov_base;
        if (out->error == 0 && out->unique == atomic_load(&init_unique)) {
            struct fuse_init_out *init = iov[1].iov_base;
            if (killpriv_v2_wanted && atomic_load(&killpriv_v2_offered)) init->flags |= FUSE_HANDLE_KILLPRIV_V2;
            atomic_store(&init_unique, UINT64_MAX);
            init_reply = 1;
        }
    }
    ssize_t n = writev(fd, iov, count);
    if (init_reply && n >= 0 && readahead_path[0] != '\0') {
        int r = open(readahead_path, O_WRONLY | O_CLOEXEC);
        if (r >= 0) {
            (void)!write(r, readahead_value, strlen(readahead_value));
            close(r);
        }
    }
    return n;
}

int kmsfs_fuse_request_kills_suidgid(void) { return request_kills_suidgid; }

int kmsfs_fuse_killpriv_v2_active(void) { return killpriv_v2_wanted && atomic_load(&killpriv_v2_offered); }

/* CAP_FSETID of the calling thread, in its effective set: dropped, the backing filesystem itself clears the
 * set-user-ID and set-group-ID bits and file capabilities when this thread writes or truncates. */
static int set_fsetid(int on) {
    struct __user_cap_header_struct header = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct data[2];
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    unsigned int bit = 1u << (CAP_FSETID % 32);
    int had = (data[CAP_FSETID / 32].effective & bit) != 0;
    if (on) data[CAP_FSETID / 32].effective |= bit & data[CAP_FSETID / 32].permitted;
    else data[CAP_FSETID / 32].effective &= ~bit;
    if (syscall(SYS_capset, &header, data) != 0) return -1;
    return had;
}

int kmsfs_drop_fsetid(void) { return set_fsetid(0); }
void kmsfs_restore_fsetid(void) { (void)set_fsetid(1); }

/* The live session, for notifications sent from threads other than the loop's (NULL outside the loop). */
static pthread_mutex_t notify_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fuse_session *notify_session = NULL;

int kmsfs_fuse_notify_inval_entry(uint64_t parent, const char *name, size_t length) {
    pthread_mutex_lock(&notify_lock);
    int r = notify_session != NULL ? fuse_lowlevel_notify_inval_entry(notify_session, parent, name, length) : -ENOTCONN;
    pthread_mutex_unlock(&notify_lock);
    return r;
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
    killpriv_v2_wanted = mount->killpriv_v2;
    if (killpriv_v2_wanted) {
        static const struct fuse_custom_io io = { .read = hook_read, .writev = hook_writev };
        if (fuse_session_custom_io(session, &io, fuse_session_fd(session)) != 0) killpriv_v2_wanted = 0;
    }
    pthread_mutex_lock(&notify_lock);
    notify_session = session;
    pthread_mutex_unlock(&notify_lock);
    if (mount->ready != NULL) mount->ready(mount->ready_context);

    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (mount->max_threads > 0) fuse_loop_cfg_set_max_threads(config, mount->max_threads);
    if (mount->max_idle_threads > 0) fuse_loop_cfg_set_idle_threads(config, mount->max_idle_threads);
    fuse_loop_cfg_set_clone_fd(config, 0);
    // A positive result is the signal that ended the loop (an orderly shutdown); negative is an error.
    if (fuse_session_loop_mt(session, config) < 0) result = KMSFS_FUSE_LOOP_FAILED;
    fuse_loop_cfg_destroy(config);
    pthread_mutex_lock(&notify_lock);
    notify_session = NULL;
    pthread_mutex_unlock(&notify_lock);

    fuse_session_unmount(session);
signals:
    fuse_remove_signal_handlers(session);
destroy:
    fuse_session_destroy(session);
    fuse_opt_free_args(&args);
    return result;
}
