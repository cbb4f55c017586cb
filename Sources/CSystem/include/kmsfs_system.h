// The few system calls Swift cannot make itself (variadic C functions and macros).
#ifndef KMSFS_SYSTEM_H
#define KMSFS_SYSTEM_H

#include <sys/types.h>
#include <sys/xattr.h>

/// prctl(PR_SET_DUMPABLE, value): 0 keeps the process out of core dumps and ptrace by other users.
int kmsfs_set_dumpable(int value);

/// syslog(priority, "%s", message) without a format string from the caller.
void kmsfs_syslog(int priority, const char *message);

/// openlog(ident, LOG_PID, LOG_DAEMON); the ident string must stay valid while logging.
void kmsfs_openlog(const char *ident);

/// The current thread's errno as an int (errno is a macro around a function).
int kmsfs_errno(void);

/// madvise(addr, len, MADV_DONTDUMP).
int kmsfs_madvise_dontdump(void *addr, size_t length);

/// FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE and friends, as plain ints.
int kmsfs_falloc_keep_size(void);

/// RENAME_NOREPLACE, RENAME_EXCHANGE.
unsigned int kmsfs_rename_noreplace(void);
unsigned int kmsfs_rename_exchange(void);

/// The statfs f_type (filesystem magic number) of the filesystem `fd` is on, or -1.
long long kmsfs_fstatfs_type(int fd);
/// The longest name the filesystem `fd` is on allows (statfs f_namelen), or -1.
long long kmsfs_fstatfs_namelen(int fd);
/// renameat2(2), which glibc 2.36 declares only with _GNU_SOURCE.
int kmsfs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags);

/// Fills `out` with `length` bytes from the kernel's CSPRNG (getrandom(2)) for public values that must never
/// repeat, such as AES-GCM nonces; never for keys. Small requests are served from a per-thread buffer of
/// getrandom output, each byte handed out once; a fork makes the child draw a new buffer, so parent and child
/// never hand out the same bytes. 0, or -1 with errno.
int kmsfs_random_public(void *out, size_t length);

/// fchmodat(dirfd, name, mode, AT_SYMLINK_NOFOLLOW): a symbolic link is never followed (EOPNOTSUPP). One
/// fchmodat2(2) system call on Linux 6.6 and later; glibc 2.36 emulates the flag with four calls (an O_PATH
/// open, fstat, chmod of its /proc/self/fd path, close), which is what older kernels get.
int kmsfs_fchmodat_nofollow(int dirfd, const char *name, mode_t mode);

/// O_TMPFILE, O_PATH and AT_EMPTY_PATH, which Swift's Glibc module does not always export.
int kmsfs_o_tmpfile(void);
int kmsfs_o_path(void);
int kmsfs_at_empty_path(void);
int kmsfs_o_noatime(void);

/// pipe2(fds, O_CLOEXEC).
int kmsfs_pipe_cloexec(int fds[2]);
/// The user ID of the process at the other end of a Unix socket (SO_PEERCRED); 0 on success.
int kmsfs_peer_uid(int fd, unsigned int *uid);
/// An open-file-description (OFD) lock over the whole file (F_RDLCK, F_WRLCK or F_UNLCK); `wait` blocks.
int kmsfs_ofd_lock(int fd, int type, int wait);
/// An open-file-description lock (F_RDLCK, F_WRLCK or F_UNLCK) on `length` bytes at `start`; never waits.
int kmsfs_ofd_lock_range(int fd, int type, long long start, long long length);
/// The size of open file `fd` as the filesystem has it now (statx with AT_STATX_FORCE_SYNC); -1 with errno.
long long kmsfs_size_synced(int fd);

/// fallocate(2) (declared only with _GNU_SOURCE).
int kmsfs_fallocate(int fd, int mode, off_t offset, off_t length);

/// mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): every page of the process stays out of swap once touched.
int kmsfs_mlockall(void);

/// posix_spawn_file_actions_addclosefrom_np(actions, from): the child closes every descriptor >= from.
#include <spawn.h>
int kmsfs_spawn_closefrom(posix_spawn_file_actions_t *actions, int from);

/// The number of CPUs this process may run on (its affinity mask).
int kmsfs_cpu_count(void);

/// 1 when /proc/self/exe is the file this code was loaded from (kmsfs itself, not a loader or a tool running
/// it, such as ld.so or valgrind), 0 when it is another file, -1 when that cannot be told.
int kmsfs_exe_is_self(void);

#endif
