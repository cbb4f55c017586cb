#define _GNU_SOURCE
#include "kmsfs_system.h"
#include <dlfcn.h>
#include <sys/stat.h>

#include <errno.h>
#include <fcntl.h>
#include <sys/vfs.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <syslog.h>
#include <unistd.h>
#include <spawn.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/random.h>
#include <sys/syscall.h>

int kmsfs_set_dumpable(int value) { return prctl(PR_SET_DUMPABLE, value, 0, 0, 0); }

void kmsfs_syslog(int priority, const char *message) { syslog(priority, "%s", message); }

void kmsfs_openlog(const char *ident) { openlog(ident, LOG_PID | LOG_NDELAY, LOG_DAEMON); }

int kmsfs_errno(void) { return errno; }

int kmsfs_madvise_dontdump(void *addr, size_t length) { return madvise(addr, length, MADV_DONTDUMP); }

int kmsfs_falloc_keep_size(void) { return FALLOC_FL_KEEP_SIZE; }

unsigned int kmsfs_rename_noreplace(void) { return RENAME_NOREPLACE; }
unsigned int kmsfs_rename_exchange(void) { return RENAME_EXCHANGE; }

int kmsfs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags) {
    return renameat2(olddirfd, oldpath, newdirfd, newpath, flags);
}

int kmsfs_o_tmpfile(void) { return O_TMPFILE; }

/// getrandom(2) until `length` bytes are filled (a large request may be cut short by a signal).
static int fill_getrandom(unsigned char *out, size_t length) {
    while (length > 0) {
        ssize_t n = getrandom(out, length, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        out += n;
        length -= (size_t)n;
    }
    return 0;
}

/// Bumped in the child of every fork: buffers drawn before it are the parent's and are not used again there.
static _Atomic unsigned long fork_generation;
static void count_fork(void) { atomic_fetch_add_explicit(&fork_generation, 1, memory_order_relaxed); }
static pthread_once_t fork_counting = PTHREAD_ONCE_INIT;
static void count_forks(void) { pthread_atfork(NULL, NULL, count_fork); }

/// 4 KiB of getrandom output per thread: one system call per 341 nonces instead of one library call per
/// write, which cost more than the write's encryption.
static __thread struct {
    unsigned char bytes[4096];
    size_t used;
    unsigned long generation;
    int filled;
} public_random;

int kmsfs_random_public(void *out, size_t length) {
    if (length > sizeof public_random.bytes / 4) return fill_getrandom(out, length);
    pthread_once(&fork_counting, count_forks);
    unsigned long generation = atomic_load_explicit(&fork_generation, memory_order_relaxed);
    if (!public_random.filled || public_random.generation != generation
        || sizeof public_random.bytes - public_random.used < length) {
        if (fill_getrandom(public_random.bytes, sizeof public_random.bytes) != 0) return -1;
        public_random.used = 0;
        public_random.generation = generation;
        public_random.filled = 1;
    }
    memcpy(out, public_random.bytes + public_random.used, length);
    // Handed out once: the buffer keeps no copy of a value in use.
    memset(public_random.bytes + public_random.used, 0, length);
    public_random.used += length;
    return 0;
}

#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif

/// Set once the kernel has answered ENOSYS: fchmodat2 is not there, and glibc's emulation is used from then on.
static _Atomic int fchmodat2_missing;

int kmsfs_fchmodat_nofollow(int dirfd, const char *name, mode_t mode) {
    if (!atomic_load_explicit(&fchmodat2_missing, memory_order_relaxed)) {
        long r = syscall(SYS_fchmodat2, dirfd, name, mode, AT_SYMLINK_NOFOLLOW);
        if (r == 0) return 0;
        // A seccomp filter that does not know the call may answer EPERM instead of ENOSYS: the emulation then
        // decides (a real EPERM comes back from it too).
        if (errno != ENOSYS && errno != EPERM) return -1;
        if (errno == ENOSYS) atomic_store_explicit(&fchmodat2_missing, 1, memory_order_relaxed);
    }
    return fchmodat(dirfd, name, mode, AT_SYMLINK_NOFOLLOW);
}

long long kmsfs_fstatfs_namelen(int fd) {
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 ? (long long)fs.f_namelen : -1;
}

long long kmsfs_fstatfs_type(int fd) {
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 ? (long long)(unsigned long)fs.f_type : -1;
}
int kmsfs_o_path(void) { return O_PATH; }
int kmsfs_at_empty_path(void) { return AT_EMPTY_PATH; }
int kmsfs_o_noatime(void) { return O_NOATIME; }

int kmsfs_fallocate(int fd, int mode, off_t offset, off_t length) { return fallocate(fd, mode, offset, length); }

int kmsfs_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int kmsfs_spawn_closefrom(posix_spawn_file_actions_t *actions, int from) { return posix_spawn_file_actions_addclosefrom_np(actions, from); }

int kmsfs_mlockall(void) { return mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT); }

#include <sched.h>
int kmsfs_cpu_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int kmsfs_exe_is_self(void) {
    Dl_info info;
    if (dladdr((void *)kmsfs_exe_is_self, &info) == 0 || info.dli_fname == NULL) return -1;
    struct stat self, exe;
    if (stat(info.dli_fname, &self) != 0 || stat("/proc/self/exe", &exe) != 0) return -1;
    return self.st_dev == exe.st_dev && self.st_ino == exe.st_ino;
}

#include <sys/socket.h>
int kmsfs_peer_uid(int fd, unsigned int *uid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    *uid = cred.uid;
    return 0;
}

/* An open-file-description lock over the whole file: type F_RDLCK, F_WRLCK or F_UNLCK; wait blocks until it is
   granted. 0 on success, -1 with errno. */
int kmsfs_ofd_lock(int fd, int type, int wait) {
    struct flock l = { .l_type = (short)type, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0, .l_pid = 0 };
    int r;
    do { r = fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &l); } while (r != 0 && errno == EINTR && wait);
    return r;
}

int kmsfs_ofd_lock_range(int fd, int type, long long start, long long length) {
    struct flock l = { .l_type = (short)type, .l_whence = SEEK_SET, .l_start = (off_t)start, .l_len = (off_t)length, .l_pid = 0 };
    int r;
    do { r = fcntl(fd, F_OFD_SETLK, &l); } while (r != 0 && errno == EINTR);
    return r;
}

/* The size of open file `fd` as the filesystem has it now, not as the kernel cached it (AT_STATX_FORCE_SYNC: FUSE
   and network filesystems ask their server). -1 with errno on failure. */
long long kmsfs_size_synced(int fd) {
    struct statx stx;
    if (statx(fd, "", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC, STATX_SIZE | STATX_MTIME, &stx) != 0) return -1;
    return (long long)stx.stx_size;
}
