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
