import CSystem
import Glibc

/// Whole-buffer positional I/O and small-file helpers over raw file descriptors.
public enum FileIO {
    /// Reads up to `count` bytes at `offset`, stopping early only at end of file. Returns the bytes read.
    public static func pread(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, count: Int, offset: Int) throws -> Int {
        var done = 0
        while done < count {
            let n = Glibc.pread(fd, buffer + done, count - done, off_t(offset + done))
            if n < 0 {
                let e = Errno.current
                if e.code == EINTR { continue }
                throw e
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// `pread` of bytes that must be there: a short read is not taken at its word. The filesystem is asked for
    /// the file's size again (statx with AT_STATX_FORCE_SYNC, which also refreshes the size the kernel caches),
    /// and the bytes are read again once it holds them, up to 4 times, 5 to 15 ms apart (so a file really cut
    /// costs about 30 ms). A FUSE-based filesystem can answer a size request that races its own write-back with
    /// the old size, and the kernel then cuts reads at it (JuiceFS 1.4). Returns the bytes read, and whether the
    /// first read was short of bytes the file held.
    public static func preadStored(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, count: Int, offset: Int) throws -> (count: Int, lagged: Bool) {
        let got = try pread(fd, buffer, count: count, offset: offset)
        guard got < count else { return (got, false) }
        var again = got
        for attempt in 0..<4 where again < count {
            if attempt > 0 { usleep(useconds_t(5_000 * attempt)) }
            if kmsfs_size_synced(fd) >= offset + count { again = try pread(fd, buffer, count: count, offset: offset) }
        }
        return (again, again > got)
    }

    /// The size of open file `fd` as the filesystem has it now, not as the kernel may cache it (see
    /// `preadStored`); what `fstat` says if the filesystem cannot be asked.
    public static func syncedSize(_ fd: Int32) throws -> Int {
        var size: Int64 = -1
        repeat { size = kmsfs_size_synced(fd) } while size < 0 && errno == EINTR
        return size >= 0 ? Int(size) : try self.size(fd)
    }

    /// Writes all `count` bytes at `offset`; throws on any failure (ENOSPC included), after which an
    /// unknown prefix may have been written.
    public static func pwrite(_ fd: Int32, _ buffer: UnsafeRawPointer, count: Int, offset: Int) throws {
        var done = 0
        while done < count {
            let n = Glibc.pwrite(fd, buffer + done, count - done, off_t(offset + done))
            if n < 0 {
                let e = Errno.current
                if e.code == EINTR { continue }
                throw e
            }
            if n == 0 { throw Errno.ENOSPC }
            done += n
        }
    }

    /// Writes all `count` bytes at the descriptor's current position (pipes, terminals).
    public static func writeAll(_ fd: Int32, _ buffer: UnsafeRawPointer, count: Int) throws {
        var done = 0
        while done < count {
            let n = Glibc.write(fd, buffer + done, count - done)
            if n < 0 {
                let e = Errno.current
                if e.code == EINTR { continue }
                throw e
            }
            done += n
        }
    }

    /// The size of an open file.
    public static func size(_ fd: Int32) throws -> Int {
        var st = stat()
        try syscall { fstat(fd, &st) }
        return Int(st.st_size)
    }

    /// Reads a whole (small, public) file.
    public static func readFile(_ path: String, limit: Int = 1 << 20) throws -> [UInt8] {
        let fd = try syscall { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        var out = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Errno.current
            }
            if n == 0 { break }
            out.append(contentsOf: chunk[0..<n])
            if out.count > limit { throw Errno.EFBIG }
        }
        return out
    }

    /// Writes a small file atomically: a temporary file in the same directory, fsync, rename, fsync of the
    /// directory. `exclusive` refuses to replace an existing file.
    public static func writeFileAtomically(_ path: String, contents: [UInt8], mode: mode_t = 0o644,
                                           exclusive: Bool = false) throws {
        let dir = directoryName(path)
        let tmp = path + ".tmp-\(getpid())"
        let fd = try syscall { open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode) }
        do {
            try contents.withUnsafeBytes { b in
                if b.count > 0 { try pwrite(fd, b.baseAddress!, count: b.count, offset: 0) }
            }
            try syscall { fsync(fd) }
        } catch {
            close(fd)
            unlink(tmp)
            throw error
        }
        close(fd)
        do {
            if exclusive {
                try syscall { link(tmp, path) }
                unlink(tmp)
            } else {
                try syscall { rename(tmp, path) }
            }
        } catch {
            unlink(tmp)
            throw error
        }
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 {
            fsync(dfd)
            close(dfd)
        }
    }

    /// The directory part of a path ("." when there is none).
    public static func directoryName(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    /// Creates `path` and any missing parents (like mkdir -p): missing parents get `parentMode`, `path` itself
    /// `mode`. Existing directories are left as they are.
    public static func makeDirectories(_ path: String, mode: mode_t, parentMode: mode_t = 0o755) throws {
        var prefix = ""
        let parts = path.split(separator: "/")
        for (i, part) in parts.enumerated() {
            prefix += "/" + part
            var st = stat()
            if stat(prefix, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR { continue }
            if mkdir(prefix, i == parts.count - 1 ? mode : parentMode) != 0 && errno != EEXIST { throw Errno.current }
        }
    }
}
