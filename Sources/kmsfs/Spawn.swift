import CSystem
import Glibc
import KmsfsSystem

/// Starting other programs (the mount daemon, fusermount3) with posix_spawn.
enum Spawn {
    /// Starts `path` with `arguments` (argv[0] included), stdin on `stdinFd`, stdout on `stdoutFd` and stderr on
    /// `stderrFd` (each /dev/null if not given), `passFd` (if any) as descriptor 3, and no other descriptor open.
    /// Returns the child's PID.
    static func start(_ path: String, _ arguments: [String], stdinFd: Int32? = nil, stdoutFd: Int32? = nil,
                      stderrFd: Int32? = nil, passFd: Int32? = nil) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let i = stdinFd {
            posix_spawn_file_actions_adddup2(&actions, i, 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        if let o = stdoutFd {
            posix_spawn_file_actions_adddup2(&actions, o, 1)
        } else {
            posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        }
        if let e = stderrFd {
            posix_spawn_file_actions_adddup2(&actions, e, 2)
        } else {
            posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        }
        if let p = passFd { posix_spawn_file_actions_adddup2(&actions, p, 3) }
        // Nothing else leaks into the child (a daemon holding its starter's pipes would keep them open).
        guard kmsfs_spawn_closefrom(&actions, passFd == nil ? 3 : 4) == 0 else { throw CLIError("cannot prepare to run \(path): \(Errno.current)") }
        // SIGPIPE back to its default (kmsfs ignores it, for key commands that exit without reading).
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF))
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let r = path.contains("/")
            ? posix_spawn(&pid, path, &actions, &attr, &argv, environ)
            : posix_spawnp(&pid, path, &actions, &attr, &argv, environ)
        guard r == 0 else { throw CLIError("cannot run \(path): \(Errno(r))") }
        return pid
    }

    /// Runs a program to completion; returns its exit status (or 128+signal) and what it wrote to stderr.
    static func run(_ path: String, _ arguments: [String]) throws -> (status: Int32, stderr: String) {
        var fds: [Int32] = [0, 0]
        guard kmsfs_pipe_cloexec(&fds) == 0 else { throw CLIError("pipe: \(Errno.current)") }
        let pid: pid_t
        do {
            pid = try start(path, arguments, stderrFd: fds[1])
        } catch {
            close(fds[0]); close(fds[1])
            throw error
        }
        close(fds[1])
        var output = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            output += buf[0..<n]
        }
        close(fds[0])
        return (wait(pid), String(decoding: output, as: UTF8.self))
    }

    /// Waits for a child; returns its exit status, or 128+signal.
    static func wait(_ pid: pid_t) -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let termsig = status & 0x7f
        return termsig == 0 ? (status >> 8) & 0xff : 128 + termsig
    }
}
