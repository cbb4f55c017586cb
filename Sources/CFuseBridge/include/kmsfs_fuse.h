// The libfuse3 bridge: the FUSE low-level API at version 3.14, plus the few functions Swift cannot call
// directly (the session setup built from macros, and libfuse's variadic logger).
// Swift fills `struct fuse_lowlevel_ops` with its handlers; this bridge mounts, runs the multithreaded
// loop and dispatches every request to them.
#ifndef KMSFS_FUSE_H
#define KMSFS_FUSE_H

#define FUSE_USE_VERSION 314
#include <fuse3/fuse_lowlevel.h>

/// Receives libfuse's own log lines (level as in enum fuse_log_level, message without trailing newline).
typedef void (*kmsfs_fuse_log_fn)(int level, const char *message);

/// Routes libfuse's log output through `fn`.
void kmsfs_fuse_set_log(kmsfs_fuse_log_fn fn);

/// Called once the mount is live (after fuse_session_mount, before the first request is served).
typedef void (*kmsfs_fuse_ready_fn)(void *context);

struct kmsfs_fuse_mount {
    const char *mountpoint;
    /// FUSE option arguments in argv form, argv[0] being the program name (e.g. {"kmsfs", "-o", "ro,allow_other"}).
    int argc;
    char **argv;
    /// Upper bound of worker threads of the multithreaded loop (0: libfuse's default).
    unsigned int max_threads;
    /// Idle worker threads kept alive (0: libfuse's default).
    unsigned int max_idle_threads;
    kmsfs_fuse_ready_fn ready;
    void *ready_context;
    /// Negotiate FUSE_HANDLE_KILLPRIV_V2 when the kernel offers it (see bridge.c).
    int killpriv_v2;
};

enum kmsfs_fuse_result {
    KMSFS_FUSE_OK = 0,             // mounted, served, unmounted
    KMSFS_FUSE_BAD_OPTIONS = 1,    // fuse_session_new rejected the options (libfuse logged why)
    KMSFS_FUSE_MOUNT_FAILED = 2,   // fuse_session_mount failed (libfuse logged why)
    KMSFS_FUSE_SIGNALS_FAILED = 3, // could not install the signal handlers
    KMSFS_FUSE_LOOP_FAILED = 4,    // the loop ended with an error
};

/// Creates a session with `ops`, mounts it, runs the multithreaded loop until unmount or SIGINT/SIGTERM/SIGHUP,
/// then unmounts and destroys it (which calls ops->destroy).
int kmsfs_fuse_run(const struct kmsfs_fuse_mount *mount, const struct fuse_lowlevel_ops *ops, void *userdata);

/// Asks the kernel to forget the directory entry `name` of node `parent` (fuse_lowlevel_notify_inval_entry), from
/// any thread but the loop's workers; -ENOTCONN when no session is being served. Never call it while holding a
/// lock a request handler may need.
int kmsfs_fuse_notify_inval_entry(uint64_t parent, const char *name, size_t length);

/// True when the request being processed on this thread asks the filesystem to clear set-user-ID and
/// set-group-ID bits and file capabilities (FUSE_HANDLE_KILLPRIV_V2: a write or truncation by a process without
/// CAP_FSETID).
int kmsfs_fuse_request_kills_suidgid(void);

/// Sets the mount's readahead through `bdi_path` (its read_ahead_kb) right after the INIT reply.
void kmsfs_fuse_set_readahead(const char *bdi_path, int kib);

/// True when FUSE_HANDLE_KILLPRIV_V2 is in effect for the mount.
int kmsfs_fuse_killpriv_v2_active(void);

/// Drops CAP_FSETID from the calling thread's effective capabilities; returns 1 if it was there (restore it
/// with kmsfs_restore_fsetid), 0 if not, -1 on failure.
int kmsfs_drop_fsetid(void);
void kmsfs_restore_fsetid(void);

#endif
