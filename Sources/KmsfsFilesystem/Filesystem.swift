import CFuseBridge
import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// The encrypted filesystem: FUSE request handlers over a backing directory.
///
/// Handlers take mount paths, map them to backing paths through `NameMapping`, and work relative to a
/// descriptor of the backing root (the *at system calls), so the backing directory's own path is only
/// used for extended attributes. File contents go through `ContentIO`; keys come from `KeyService` when a
/// file's first handle opens, and live in `OpenFileTable` until its last handle closes.
public final class EncryptedFilesystem: @unchecked Sendable {
    public struct Settings: Sendable {
        public var cipherDir: String
        public var volume: VolumeConfig
        public var keys: KeyService
        public var readOnly: Bool
        /// Bypass the kernel page cache: every read and write reaches kmsfs as the application issued it.
        public var directIO: Bool
        public var names: NameMapping

        public init(cipherDir: String, volume: VolumeConfig, keys: KeyService, readOnly: Bool, directIO: Bool = false,
                    names: NameMapping = PlaintextNames()) {
            self.cipherDir = cipherDir
            self.volume = volume
            self.keys = keys
            self.readOnly = readOnly
            self.directIO = directIO
            self.names = names
        }
    }

    let rootFd: Int32
    let cipherDir: String
    let volume: VolumeConfig
    let keys: KeyService
    let names: NameMapping
    let readOnly: Bool
    let directIO: Bool
    let table: OpenFileTable
    /// Running as root: new files, directories and links are given to the calling user.
    let chownToCaller: Bool

    public init(_ settings: Settings) throws {
        let fd = Glibc.open(settings.cipherDir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw Errno.current }
        rootFd = fd
        cipherDir = settings.cipherDir.hasSuffix("/") && settings.cipherDir.count > 1
            ? String(settings.cipherDir.dropLast()) : settings.cipherDir
        volume = settings.volume
        keys = settings.keys
        names = settings.names
        readOnly = settings.readOnly
        directIO = settings.directIO
        chownToCaller = geteuid() == 0
        let keyService = settings.keys
        table = OpenFileTable { file, secrets in
            keyService.recordDiscard(subject: KeySubject(path: file.path, fileId: secrets.fileId))
        }
    }

    deinit { close(rootFd) }

    /// Number of files whose keys are in memory.
    public var openFileCount: Int { table.count }

    /// Wipes every key still in memory (on unmount).
    public func shutdown() { table.wipeAll() }

    // MARK: - attributes

    func getattr(_ path: String?, _ st: UnsafeMutablePointer<stat>, _ handle: Handle?) throws {
        if let h = handle as? FileHandle {
            try syscall { fstat(h.fd, st) }
            st.pointee.st_size = off_t(h.file.secrets.layout.plaintextSize(backingSize: Int(st.pointee.st_size)))
            return
        }
        let rel = try backing(path)
        try syscall { fstatat(rootFd, rel, st, AT_SYMLINK_NOFOLLOW) }
        if st.pointee.st_mode & S_IFMT == S_IFREG {
            st.pointee.st_size = off_t(plaintextSize(rel: rel, st: st.pointee))
        }
    }

    /// The plaintext size of a regular backing file: from the open-file table when the file is open,
    /// otherwise from its 16-byte header prefix. Never a provider call. Unreadable or foreign files count as 0.
    private func plaintextSize(rel: String, st: stat) -> Int {
        if let layout = table.lookup(InodeKey(st))?.layoutIfLoaded {
            return layout.plaintextSize(backingSize: Int(st.st_size))
        }
        guard st.st_size >= FileHeader.prefixSize else { return 0 }
        let fd = openat(rootFd, rel, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | kmsfs_o_noatime())
        let usable = fd >= 0 ? fd : openat(rootFd, rel, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard usable >= 0 else { return Int(st.st_size) }
        defer { close(usable) }
        var prefix = [UInt8](repeating: 0, count: FileHeader.prefixSize)
        let n = prefix.withUnsafeMutableBytes { (try? FileIO.pread(usable, $0.baseAddress!, count: $0.count, offset: 0)) ?? 0 }
        guard n == FileHeader.prefixSize, let p = try? HeaderPrefix(prefix) else { return 0 }
        return p.layout.plaintextSize(backingSize: Int(st.st_size))
    }

    func chmod(_ path: String?, _ mode: mode_t, _ handle: Handle?) throws {
        if let h = handle as? FileHandle { try syscall { fchmod(h.fd, mode) }; return }
        if let d = handle as? DirHandle { try syscall { fchmod(dirfd(d.stream), mode) }; return }
        let rel = try backing(path)
        try syscall { fchmodat(rootFd, rel, mode, 0) }
    }

    func chown(_ path: String?, _ uid: uid_t, _ gid: gid_t, _ handle: Handle?) throws {
        if let h = handle as? FileHandle { try syscall { fchown(h.fd, uid, gid) }; return }
        if let d = handle as? DirHandle { try syscall { fchown(dirfd(d.stream), uid, gid) }; return }
        let rel = try backing(path)
        try syscall { fchownat(rootFd, rel, uid, gid, AT_SYMLINK_NOFOLLOW) }
    }

    func utimens(_ path: String?, _ times: UnsafePointer<timespec>?, _ handle: Handle?) throws {
        if let h = handle as? FileHandle { try syscall { futimens(h.fd, times) }; return }
        if let d = handle as? DirHandle { try syscall { futimens(dirfd(d.stream), times) }; return }
        let rel = try backing(path)
        try syscall { utimensat(rootFd, rel, times, AT_SYMLINK_NOFOLLOW) }
    }

    func access(_ path: String?, _ mask: Int32) throws {
        let rel = try backing(path)
        try syscall { faccessat(rootFd, rel, mask, 0) }
    }

    func statfs(_ st: UnsafeMutablePointer<statvfs>) throws {
        try syscall { fstatvfs(rootFd, st) }
    }

    // MARK: - names

    func mkdir(_ path: String?, _ mode: mode_t) throws {
        let rel = try backing(path, creating: true)
        try syscall { mkdirat(rootFd, rel, mode) }
        giveToCaller(rel)
    }

    func mknod(_ path: String?, _ mode: mode_t, _ rdev: dev_t) throws {
        let rel = try backing(path, creating: true)
        if mode & S_IFMT == S_IFREG {
            let h = try createFile(rel: rel, mountPath: path ?? "", mode: mode & 0o7777, flags: O_WRONLY | O_EXCL)
            releaseFile(h)
            return
        }
        try syscall { mknodat(rootFd, rel, mode, rdev) }
        giveToCaller(rel)
    }

    func symlink(_ target: String, _ path: String?) throws {
        let rel = try backing(path, creating: true)
        try syscall { symlinkat(names.backingLinkTarget(target), rootFd, rel) }
        giveToCaller(rel)
    }

    func readlink(_ path: String?, _ buffer: UnsafeMutablePointer<CChar>, _ size: Int) throws {
        guard size > 0 else { throw Errno.EINVAL }
        var raw = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let rel = try backing(path)
        let n = try syscall { readlinkat(rootFd, rel, &raw, raw.count - 1) }
        let stored = String(decoding: raw[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let shown = Array(names.mountLinkTarget(stored).utf8)
        let count = min(shown.count, size - 1)
        shown.withUnsafeBytes { UnsafeMutableRawPointer(buffer).copyMemory(from: $0.baseAddress!, byteCount: count) }
        buffer[count] = 0
    }

    func unlink(_ path: String?) throws {
        let rel = try backing(path)
        try syscall { unlinkat(rootFd, rel, 0) }
    }

    func rmdir(_ path: String?) throws {
        let rel = try backing(path)
        try syscall { unlinkat(rootFd, rel, AT_REMOVEDIR) }
    }

    func rename(_ from: String?, _ to: String?, _ flags: UInt32) throws {
        let source = try backing(from)
        let target = try backing(to, creating: true)
        try syscall { kmsfs_renameat2(rootFd, source, rootFd, target, flags) }
    }

    func link(_ from: String?, _ to: String?) throws {
        let source = try backing(from)
        let target = try backing(to, creating: true)
        try syscall { linkat(rootFd, source, rootFd, target, 0) }
    }

    // MARK: - extended attributes (stored on the backing file as they are; see the threat model)

    func setxattr(_ path: String?, _ name: UnsafePointer<CChar>, _ value: UnsafePointer<CChar>?, _ size: Int, _ flags: Int32) throws {
        let full = try absolute(path)
        try syscall { lsetxattr(full, name, value, size, flags) }
    }

    func getxattr(_ path: String?, _ name: UnsafePointer<CChar>, _ value: UnsafeMutablePointer<CChar>?, _ size: Int) throws -> Int32 {
        let full = try absolute(path)
        return Int32(try syscall { lgetxattr(full, name, value, size) })
    }

    func listxattr(_ path: String?, _ list: UnsafeMutablePointer<CChar>?, _ size: Int) throws -> Int32 {
        let full = try absolute(path)
        return Int32(try syscall { llistxattr(full, list, size) })
    }

    func removexattr(_ path: String?, _ name: UnsafePointer<CChar>) throws {
        let full = try absolute(path)
        try syscall { lremovexattr(full, name) }
    }

    // MARK: - directories

    func opendir(_ path: String?) throws -> DirHandle {
        let rel = try backing(path)
        let fd = try syscall { openat(rootFd, rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        guard let stream = fdopendir(fd) else {
            let e = Errno.current
            close(fd)
            throw e
        }
        return DirHandle(stream: stream, inRoot: rel == ".")
    }

    func readdir(_ handle: DirHandle, _ offset: Int, _ fill: (String, stat, Int) -> Bool) throws {
        if telldir(handle.stream) != offset { seekdir(handle.stream, offset) }
        while true {
            errno = 0
            guard let entry = Glibc.readdir(handle.stream) else {
                if errno != 0 { throw Errno.current }
                return
            }
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            let next = telldir(handle.stream)
            guard let shown = names.mountName(name, inRoot: handle.inRoot) else { continue }
            var st = stat()
            st.st_ino = entry.pointee.d_ino
            st.st_mode = mode_t(entry.pointee.d_type) << 12
            if !fill(shown, st, next) { return }
        }
    }

    func fsyncdir(_ handle: DirHandle, _ datasync: Bool) throws {
        let fd = dirfd(handle.stream)
        try syscall { datasync ? fdatasync(fd) : Glibc.fsync(fd) }
    }

    // MARK: - files

    /// Opens an existing regular file. The data key is unwrapped only if no other handle has the inode open.
    func open(_ path: String?, flags: Int32) throws -> FileHandle {
        let rel = try backing(path)
        let writable = flags & O_ACCMODE != O_RDONLY
        if writable && readOnly { throw Errno.EROFS }
        let fd = try syscall { openat(rootFd, rel, backingFlags(flags), 0) }
        do {
            var st = stat()
            try syscall { fstat(fd, &st) }
            guard st.st_mode & S_IFMT == S_IFREG else { throw Errno.EISDIR }
            let mountPath = path ?? ""
            let file = try table.acquire(InodeKey(st), path: mountPath) {
                try loadSecrets(fd: fd, mountPath: mountPath, rel: rel)
            }
            let handle = FileHandle(fd: fd, file: file, writable: writable, backingPath: rel)
            if writable && flags & O_TRUNC != 0 {
                do {
                    try file.io.withWriteLock { try handle.content.truncate(to: 0) }
                } catch {
                    releaseFile(handle)
                    throw error
                }
            }
            return handle
        } catch {
            close(fd)
            throw error
        }
    }

    /// Creates a new encrypted file with a fresh data key and opens it. The header is written to an unnamed
    /// file (O_TMPFILE) that is linked into place only when complete, so no headerless file is ever visible.
    func createFile(rel: String, mountPath: String, mode: mode_t, flags: Int32) throws -> FileHandle {
        if readOnly { throw Errno.EROFS }
        let fileId = try SecureRandom.bytes(FileHeader.fileIdSize)
        let context = EncryptionContext.forFile(volumeId: volume.volumeId, fileId: fileId, user: volume.encryptionContext)
        let subject = KeySubject(path: mountPath, fileId: fileId)
        let (dataKey, wrapped) = try keys.newDataKey(context: context, subject: subject)
        let fileKeys = try FileKeys(dataKey: dataKey, fileId: fileId)
        dataKey.wipe()
        let header = try FileHeader(fileId: fileId, chunkSize: volume.chunkSize, context: context,
                                    wrappedKeys: wrapped, keys: fileKeys)
        let bytes = header.encoded()

        let fd = try createLinked(rel: rel, mode: mode, exclusive: flags & O_EXCL != 0) { fd in
            try bytes.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: 0) }
        }
        guard let fd else {
            // Another creator won the race and the caller did not ask for O_EXCL: open that file instead.
            return try open(mountPath, flags: flags & ~O_CREAT)
        }
        var st = stat()
        do {
            try syscall { fstat(fd, &st) }
        } catch {
            close(fd)
            throw error
        }
        let secrets = FileSecrets(chunkKey: fileKeys.chunkKey, fileId: fileId, layout: header.layout)
        let file = try table.acquire(InodeKey(st), path: mountPath) { secrets }
        return FileHandle(fd: fd, file: file, writable: true, backingPath: rel)
    }

    /// Creates `rel` with its content written by `fill` before it becomes visible. Returns nil when the name
    /// appeared meanwhile and `exclusive` is false.
    private func createLinked(rel: String, mode: mode_t, exclusive: Bool, fill: (Int32) throws -> Void) throws -> Int32? {
        let dir = FileIO.directoryName(rel)
        let tmp = openat(rootFd, dir, kmsfs_o_tmpfile() | O_RDWR | O_CLOEXEC, mode)
        if tmp >= 0 {
            do {
                try fill(tmp)
                giveToCaller(fd: tmp)
                let r = linkat(AT_FDCWD, "/proc/self/fd/\(tmp)", rootFd, rel, AT_SYMLINK_FOLLOW)
                if r == 0 { return tmp }
                let e = Errno.current
                if e.code == EEXIST && !exclusive { close(tmp); return nil }
                if e.code != ENOENT { throw e }
                // No /proc: fall through to the plain path.
                close(tmp)
            } catch {
                close(tmp)
                throw error
            }
        } else if ![EOPNOTSUPP, EISDIR, EINVAL].contains(Errno.current.code) {
            throw Errno.current
        }
        // Backing filesystems without O_TMPFILE: create, write the header, remove on failure.
        let fd = openat(rootFd, rel, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        if fd < 0 {
            let e = Errno.current
            if e.code == EEXIST && !exclusive { return nil }
            throw e
        }
        do {
            try fill(fd)
            giveToCaller(fd: fd)
            return fd
        } catch {
            close(fd)
            unlinkat(rootFd, rel, 0)
            throw error
        }
    }

    /// Reads and authenticates the header of an open backing file and unwraps its data key.
    private func loadSecrets(fd: Int32, mountPath: String, rel: String) throws -> FileSecrets {
        do {
            let opened = try FileOpener.open(fd: fd, volumeId: volume.volumeId, keys: keys, path: mountPath)
            return FileSecrets(chunkKey: opened.keys.chunkKey, fileId: opened.header.fileId, layout: opened.header.layout)
        } catch {
            Log.error("cannot open \(mountPath) (backing file \(rel)): \(error)")
            if case .key(let e) = error, e.kind == .accessDenied { throw Errno.EACCES }
            throw Errno.EIO
        }
    }

    func read(_ handle: FileHandle, into buffer: UnsafeMutableRawPointer, count: Int, offset: Int) throws -> Int {
        try handle.file.io.withReadLock { try handle.content.read(into: buffer, count: count, offset: offset) }
    }

    func write(_ handle: FileHandle, from buffer: UnsafeRawPointer, count: Int, offset: Int) throws -> Int {
        guard handle.writable else { throw Errno.EBADF }
        try handle.file.io.withWriteLock { try handle.content.write(from: buffer, count: count, offset: offset) }
        return count
    }

    func truncate(_ path: String?, _ size: Int, _ handle: Handle?) throws {
        guard size >= 0 else { throw Errno.EINVAL }
        if readOnly { throw Errno.EROFS }
        if let h = handle as? FileHandle {
            try h.file.io.withWriteLock { try h.content.truncate(to: size) }
            return
        }
        let h = try open(path, flags: O_WRONLY)
        defer { releaseFile(h) }
        try h.file.io.withWriteLock { try h.content.truncate(to: size) }
    }

    func fallocate(_ handle: FileHandle, mode: Int32, offset: Int, length: Int) throws {
        guard handle.writable else { throw Errno.EBADF }
        try handle.file.io.withWriteLock { try handle.content.allocate(mode: mode, offset: offset, length: length) }
    }

    func fsync(_ handle: FileHandle, datasync: Bool) throws {
        try syscall { datasync ? fdatasync(handle.fd) : Glibc.fsync(handle.fd) }
    }

    /// Closes a handle; the last handle of a file wipes its key.
    func releaseFile(_ handle: FileHandle) {
        close(handle.fd)
        table.release(handle.file)
    }

    // MARK: - helpers

    private func backing(_ path: String?, creating: Bool = false) throws -> String {
        guard let path else { throw Errno.ENOENT }
        return try names.backingPath(path, creating: creating)
    }

    private func absolute(_ path: String?) throws -> String {
        let rel = try backing(path)
        return rel == "." ? cipherDir : cipherDir + "/" + rel
    }

    private func backingFlags(_ flags: Int32) -> Int32 {
        let writable = flags & O_ACCMODE != O_RDONLY
        // Writers also read (partial chunks are read back); appends and truncation are done by kmsfs itself.
        return (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_CLOEXEC | (flags & (O_SYNC | O_DSYNC))
    }

    /// Gives a new node to the user whose request created it (when kmsfs runs as root, e.g. with allow_other).
    private func giveToCaller(_ rel: String) {
        guard chownToCaller, let c = fuse_get_context() else { return }
        _ = fchownat(rootFd, rel, c.pointee.uid, c.pointee.gid, AT_SYMLINK_NOFOLLOW)
    }

    private func giveToCaller(fd: Int32) {
        guard chownToCaller, let c = fuse_get_context() else { return }
        _ = fchown(fd, c.pointee.uid, c.pointee.gid)
    }
}
