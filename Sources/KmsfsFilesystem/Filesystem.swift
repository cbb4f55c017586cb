import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Who made a request: new nodes are given to this user when kmsfs runs as root.
struct Caller {
    let uid: uid_t
    let gid: gid_t
}

/// The encrypted filesystem: FUSE low-level request handlers over a backing directory.
///
/// The kernel addresses nodes by inode (`InodeTable`): every known backing node is held by an O_PATH
/// descriptor and every call works relative to descriptors (the *at system calls, or /proc/self/fd), so the
/// backing directory's path is never walked again after mounting. Names go through `NameMapping`, file
/// contents through `ContentIO`; a file's key comes from `KeyService` when its first handle opens and lives
/// in `OpenFileTable` until its last handle closes.
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

    /// Seconds the kernel may cache names and attributes (all changes go through this mount).
    static let cacheTimeout = 1.0

    let rootFd: Int32
    let cipherDir: String
    let volume: VolumeConfig
    let keys: KeyService
    let names: NameMapping
    let readOnly: Bool
    let directIO: Bool
    let inodes: InodeTable
    let table: OpenFileTable
    /// Running as root: new files, directories and links are given to the calling user.
    let chownToCaller: Bool

    public init(_ settings: Settings) throws {
        let fd = Glibc.open(settings.cipherDir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw Errno.current }
        rootFd = fd
        let pathFd = Glibc.open(settings.cipherDir, O_PATH_FLAG | O_DIRECTORY | O_CLOEXEC)
        if pathFd < 0 {
            close(fd)
            throw Errno.current
        }
        inodes = try InodeTable(rootFd: pathFd)
        cipherDir = settings.cipherDir.count > 1 && settings.cipherDir.hasSuffix("/")
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

    // MARK: - names and attributes

    /// Resolves `name` in `parent` and records the kernel's new reference to it.
    func lookup(_ parent: Inode, _ name: String) throws -> (Inode, stat) {
        let backingName = try names.backingName(name, inRoot: parent === inodes.root, creating: false)
        let fd = try syscall { openat(parent.fd, backingName, O_PATH_FLAG | O_NOFOLLOW | O_CLOEXEC) }
        var st = stat()
        do {
            try syscall { fstatat(fd, "", &st, AT_EMPTY_PATH_FLAG | AT_SYMLINK_NOFOLLOW) }
        } catch {
            close(fd)
            throw error
        }
        let inode = inodes.remember(fd: fd, st: st)
        st.st_size = off_t(plaintextSize(inode, backingSize: Int(st.st_size)))
        return (inode, st)
    }

    func forget(_ nodeId: UInt64, count: UInt64) {
        inodes.forget(nodeId, count: count)
    }

    func getattr(_ inode: Inode) throws -> stat {
        var st = stat()
        try syscall { fstatat(inode.fd, "", &st, AT_EMPTY_PATH_FLAG | AT_SYMLINK_NOFOLLOW) }
        st.st_size = off_t(plaintextSize(inode, backingSize: Int(st.st_size)))
        return st
    }

    /// The plaintext size of a regular file from its backing size: the layout comes from the open-file table,
    /// or from the 16-byte header prefix read once per inode. Never a provider call.
    func plaintextSize(_ inode: Inode, backingSize: Int) -> Int {
        guard inode.type == S_IFREG else { return backingSize }
        switch inode.layout {
        case .known(let l): return l.plaintextSize(backingSize: backingSize)
        case .foreign: return 0
        case .unknown: break
        }
        if let l = table.lookup(inode.key)?.layoutIfLoaded {
            inode.layout = .known(l)
            return l.plaintextSize(backingSize: backingSize)
        }
        guard backingSize >= FileHeader.prefixSize else { return 0 }
        var fd = Glibc.open(inode.procPath, O_RDONLY | O_CLOEXEC | kmsfs_o_noatime())
        if fd < 0 { fd = Glibc.open(inode.procPath, O_RDONLY | O_CLOEXEC) }
        guard fd >= 0 else { return backingSize }
        defer { close(fd) }
        var prefix = [UInt8](repeating: 0, count: FileHeader.prefixSize)
        let n = prefix.withUnsafeMutableBytes { (try? FileIO.pread(fd, $0.baseAddress!, count: $0.count, offset: 0)) ?? 0 }
        guard n == FileHeader.prefixSize, let p = try? HeaderPrefix(prefix) else {
            inode.layout = .foreign
            return 0
        }
        inode.layout = .known(p.layout)
        return p.layout.plaintextSize(backingSize: backingSize)
    }

    /// setattr: mode, owner, size, times; `handle` is the open file the change came through, if any.
    func setattr(_ inode: Inode, _ attr: stat, _ valid: Int32, _ handle: Handle?, _ caller: Caller) throws -> stat {
        let file = handle as? FileHandle
        if valid & FUSE_SET_ATTR_MODE_FLAG != 0 {
            if let f = file { try syscall { fchmod(f.fd, attr.st_mode) } } else {
                try syscall { fchmodat(AT_FDCWD, inode.procPath, attr.st_mode, 0) }
            }
        }
        if valid & (FUSE_SET_ATTR_UID_FLAG | FUSE_SET_ATTR_GID_FLAG) != 0 {
            let uid = valid & FUSE_SET_ATTR_UID_FLAG != 0 ? attr.st_uid : uid_t.max
            let gid = valid & FUSE_SET_ATTR_GID_FLAG != 0 ? attr.st_gid : gid_t.max
            try syscall { fchownat(inode.fd, "", uid, gid, AT_EMPTY_PATH_FLAG | AT_SYMLINK_NOFOLLOW) }
        }
        if valid & FUSE_SET_ATTR_SIZE_FLAG != 0 {
            guard inode.type == S_IFREG else { throw Errno.EINVAL }
            try truncate(inode, Int(attr.st_size), file)
        }
        if valid & (FUSE_SET_ATTR_ATIME_FLAG | FUSE_SET_ATTR_MTIME_FLAG) != 0 {
            var times = [timespec(tv_sec: 0, tv_nsec: UTIME_OMIT_VALUE), timespec(tv_sec: 0, tv_nsec: UTIME_OMIT_VALUE)]
            if valid & FUSE_SET_ATTR_ATIME_FLAG != 0 {
                times[0] = valid & FUSE_SET_ATTR_ATIME_NOW_FLAG != 0 ? timespec(tv_sec: 0, tv_nsec: UTIME_NOW_VALUE) : attr.st_atim
            }
            if valid & FUSE_SET_ATTR_MTIME_FLAG != 0 {
                times[1] = valid & FUSE_SET_ATTR_MTIME_NOW_FLAG != 0 ? timespec(tv_sec: 0, tv_nsec: UTIME_NOW_VALUE) : attr.st_mtim
            }
            if let f = file {
                try syscall { futimens(f.fd, times) }
            } else if inode.type == S_IFLNK {
                try syscall { utimensat(inode.fd, "", times, AT_EMPTY_PATH_FLAG) }
            } else {
                try syscall { utimensat(AT_FDCWD, inode.procPath, times, 0) }
            }
        }
        return try getattr(inode)
    }

    func access(_ inode: Inode, _ mask: Int32) throws {
        try syscall { faccessat(AT_FDCWD, inode.procPath, mask, 0) }
    }

    func statfs() throws -> statvfs {
        var st = statvfs()
        try syscall { fstatvfs(rootFd, &st) }
        return st
    }

    func readlink(_ inode: Inode) throws -> String {
        var raw = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = try syscall { readlinkat(inode.fd, "", &raw, raw.count - 1) }
        return names.mountLinkTarget(String(decoding: raw[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }

    // MARK: - creating and removing names

    func mkdir(_ parent: Inode, _ name: String, _ mode: mode_t, _ caller: Caller) throws -> (Inode, stat) {
        let n = try backingName(parent, name, creating: true)
        try syscall { mkdirat(parent.fd, n, mode) }
        giveToCaller(parent, n, caller)
        return try lookup(parent, name)
    }

    func mknod(_ parent: Inode, _ name: String, _ mode: mode_t, _ rdev: dev_t, _ caller: Caller) throws -> (Inode, stat) {
        if mode & S_IFMT == S_IFREG {
            let (inode, st, handle) = try create(parent, name, mode & 0o7777, O_WRONLY | O_EXCL, caller)
            releaseFile(handle)
            return (inode, st)
        }
        let n = try backingName(parent, name, creating: true)
        try syscall { mknodat(parent.fd, n, mode, rdev) }
        giveToCaller(parent, n, caller)
        return try lookup(parent, name)
    }

    func symlink(_ target: String, _ parent: Inode, _ name: String, _ caller: Caller) throws -> (Inode, stat) {
        let n = try backingName(parent, name, creating: true)
        try syscall { symlinkat(names.backingLinkTarget(target), parent.fd, n) }
        giveToCaller(parent, n, caller)
        return try lookup(parent, name)
    }

    func link(_ inode: Inode, _ newParent: Inode, _ newName: String) throws -> (Inode, stat) {
        let n = try backingName(newParent, newName, creating: true)
        try syscall { linkat(AT_FDCWD, inode.procPath, newParent.fd, n, AT_SYMLINK_FOLLOW) }
        return try lookup(newParent, newName)
    }

    func unlink(_ parent: Inode, _ name: String) throws {
        let n = try backingName(parent, name, creating: false)
        try syscall { unlinkat(parent.fd, n, 0) }
    }

    func rmdir(_ parent: Inode, _ name: String) throws {
        let n = try backingName(parent, name, creating: false)
        try syscall { unlinkat(parent.fd, n, AT_REMOVEDIR) }
    }

    func rename(_ parent: Inode, _ name: String, _ newParent: Inode, _ newName: String, _ flags: UInt32) throws {
        let from = try backingName(parent, name, creating: false)
        let to = try backingName(newParent, newName, creating: true)
        try syscall { kmsfs_renameat2(parent.fd, from, newParent.fd, to, flags) }
    }

    // MARK: - extended attributes (stored on the backing node as they are; see the threat model)

    func setxattr(_ inode: Inode, _ name: UnsafePointer<CChar>, _ value: UnsafePointer<CChar>?, _ size: Int, _ flags: Int32) throws {
        try syscall { CSystem.setxattr(inode.procPath, name, value, size, flags) }
    }

    func getxattr(_ inode: Inode, _ name: UnsafePointer<CChar>, _ value: UnsafeMutablePointer<CChar>?, _ size: Int) throws -> Int {
        try syscall { CSystem.getxattr(inode.procPath, name, value, size) }
    }

    func listxattr(_ inode: Inode, _ list: UnsafeMutablePointer<CChar>?, _ size: Int) throws -> Int {
        try syscall { CSystem.listxattr(inode.procPath, list, size) }
    }

    func removexattr(_ inode: Inode, _ name: UnsafePointer<CChar>) throws {
        try syscall { CSystem.removexattr(inode.procPath, name) }
    }

    // MARK: - directories

    func opendir(_ inode: Inode) throws -> DirHandle {
        let fd = try syscall { Glibc.open(inode.procPath, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        guard let stream = fdopendir(fd) else {
            let e = Errno.current
            close(fd)
            throw e
        }
        return DirHandle(stream: stream, inRoot: inode === inodes.root)
    }

    /// Lists entries from `offset` (0 or a value passed to `fill` earlier); `fill` returns false when the
    /// reply is full, and that entry is returned again by the next call.
    func readdir(_ handle: DirHandle, _ offset: Int, _ fill: (String, stat, Int) -> Bool) throws {
        if telldir(handle.stream) != offset { seekdir(handle.stream, offset) }
        while true {
            let here = telldir(handle.stream)
            errno = 0
            guard let entry = Glibc.readdir(handle.stream) else {
                if errno != 0 { throw Errno.current }
                return
            }
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            guard let shown = names.mountName(name, inRoot: handle.inRoot) else { continue }
            var st = stat()
            st.st_ino = entry.pointee.d_ino
            st.st_mode = mode_t(entry.pointee.d_type) << 12
            if !fill(shown, st, telldir(handle.stream)) {
                seekdir(handle.stream, here)
                return
            }
        }
    }

    func fsyncdir(_ handle: DirHandle, _ datasync: Bool) throws {
        let fd = dirfd(handle.stream)
        try syscall { datasync ? fdatasync(fd) : Glibc.fsync(fd) }
    }

    // MARK: - files

    /// Opens a regular file. The data key is unwrapped only if no other handle has the inode open.
    func open(_ inode: Inode, flags: Int32) throws -> FileHandle {
        guard inode.type == S_IFREG else { throw Errno.EISDIR }
        let writable = flags & O_ACCMODE != O_RDONLY
        if writable && readOnly { throw Errno.EROFS }
        let fd = try syscall { Glibc.open(inode.procPath, backingFlags(flags)) }
        let handle: FileHandle
        do {
            let path = mountPath(of: inode)
            let file = try table.acquire(inode.key, path: path) {
                try loadSecrets(fd: fd, mountPath: path)
            }
            handle = FileHandle(fd: fd, file: file, writable: writable, backingPath: path)
            inode.layout = .known(file.secrets.layout)
        } catch {
            close(fd)
            throw error
        }
        if writable && flags & O_TRUNC != 0 {
            do {
                try handle.file.io.withWriteLock { try handle.content.truncate(to: 0) }
            } catch {
                releaseFile(handle)  // closes fd
                throw error
            }
        }
        return handle
    }

    /// Creates a new encrypted file with a fresh data key and opens it. The header is written to an unnamed
    /// file (O_TMPFILE) that is linked into place only when complete, so no headerless file is ever visible.
    func create(_ parent: Inode, _ name: String, _ mode: mode_t, _ flags: Int32, _ caller: Caller) throws -> (Inode, stat, FileHandle) {
        if readOnly { throw Errno.EROFS }
        let n = try backingName(parent, name, creating: true)
        let mountPath = (parent === inodes.root ? "" : self.mountPath(of: parent)) + "/" + name
        let fileId = try SecureRandom.bytes(FileHeader.fileIdSize)
        let context = EncryptionContext.forFile(volumeId: volume.volumeId, fileId: fileId, user: volume.encryptionContext)
        let (dataKey, wrapped) = try keys.newDataKey(context: context, subject: KeySubject(path: mountPath, fileId: fileId))
        let fileKeys = try FileKeys(dataKey: dataKey, fileId: fileId)
        dataKey.wipe()
        let header = try FileHeader(fileId: fileId, chunkSize: volume.chunkSize, context: context,
                                    wrappedKeys: wrapped, keys: fileKeys)
        let bytes = header.encoded()

        guard let fd = try createLinked(parent, n, mode: mode, exclusive: flags & O_EXCL != 0, caller: caller, fill: { fd in
            try bytes.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: 0) }
        }) else {
            // Another creator won the race and the caller did not ask for O_EXCL: open that file instead.
            let (inode, _) = try lookup(parent, name)
            var handle: FileHandle? = nil
            do {
                handle = try open(inode, flags: flags & ~O_CREAT)
                return (inode, try getattr(inode), handle!)
            } catch {
                if let h = handle { releaseFile(h) }
                forget(inode.nodeId, count: 1)
                throw error
            }
        }
        do {
            let (inode, st) = try lookup(parent, name)
            guard inode.key == InodeKey(try fstatOf(fd)) else {
                forget(inode.nodeId, count: 1)
                throw Errno(ESTALE)
            }
            inode.layout = .known(header.layout)
            let secrets = FileSecrets(chunkKey: fileKeys.chunkKey, fileId: fileId, layout: header.layout)
            let file = try table.acquire(inode.key, path: mountPath) { secrets }
            return (inode, st, FileHandle(fd: fd, file: file, writable: true, backingPath: mountPath))
        } catch {
            close(fd)
            throw error
        }
    }

    /// Creates `name` in `parent` with its content written by `fill` before it becomes visible. Returns the
    /// open descriptor, or nil when the name appeared meanwhile and `exclusive` is false.
    private func createLinked(_ parent: Inode, _ name: String, mode: mode_t, exclusive: Bool, caller: Caller,
                              fill: (Int32) throws -> Void) throws -> Int32? {
        let tmp = openat(parent.fd, ".", kmsfs_o_tmpfile() | O_RDWR | O_CLOEXEC, mode)
        if tmp >= 0 {
            do {
                try fill(tmp)
                giveToCaller(fd: tmp, caller)
                if linkat(AT_FDCWD, "/proc/self/fd/\(tmp)", parent.fd, name, AT_SYMLINK_FOLLOW) == 0 { return tmp }
                let e = Errno.current
                if e.code == EEXIST && !exclusive { close(tmp); return nil }
                throw e
            } catch {
                close(tmp)
                throw error
            }
        } else if ![EOPNOTSUPP, EISDIR, EINVAL].contains(Errno.current.code) {
            throw Errno.current
        }
        // Backing filesystems without O_TMPFILE: create, write the header, remove on failure.
        let fd = openat(parent.fd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        if fd < 0 {
            let e = Errno.current
            if e.code == EEXIST && !exclusive { return nil }
            throw e
        }
        do {
            try fill(fd)
            giveToCaller(fd: fd, caller)
            return fd
        } catch {
            close(fd)
            unlinkat(parent.fd, name, 0)
            throw error
        }
    }

    /// Reads and authenticates the header of an open backing file and unwraps its data key.
    private func loadSecrets(fd: Int32, mountPath: String) throws -> FileSecrets {
        do {
            let opened = try FileOpener.open(fd: fd, volumeId: volume.volumeId, keys: keys, path: mountPath)
            return FileSecrets(chunkKey: opened.keys.chunkKey, fileId: opened.header.fileId, layout: opened.header.layout)
        } catch {
            Log.error("cannot open \(mountPath): \(error)")
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

    /// Changes the plaintext size, through `handle` when the change came through an open file.
    func truncate(_ inode: Inode, _ size: Int, _ handle: FileHandle?) throws {
        guard size >= 0 else { throw Errno.EINVAL }
        if readOnly { throw Errno.EROFS }
        if let h = handle, h.writable {
            try h.file.io.withWriteLock { try h.content.truncate(to: size) }
            return
        }
        let h = try open(inode, flags: O_WRONLY)
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

    private func backingName(_ parent: Inode, _ name: String, creating: Bool) throws -> String {
        try names.backingName(name, inRoot: parent === inodes.root, creating: creating)
    }

    /// The current mount path of a node (the kernel keeps /proc/self/fd links up to date across renames).
    func mountPath(of inode: Inode) -> String {
        var raw = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = Glibc.readlink(inode.procPath, &raw, raw.count - 1)
        guard n > 0 else { return "?" }
        let full = String(decoding: raw[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard full.hasPrefix(cipherDir + "/") else { return full == cipherDir ? "/" : full }
        return names.mountPath(ofBacking: String(full.dropFirst(cipherDir.count + 1)))
    }

    private func fstatOf(_ fd: Int32) throws -> stat {
        var st = stat()
        try syscall { fstat(fd, &st) }
        return st
    }

    private func backingFlags(_ flags: Int32) -> Int32 {
        let writable = flags & O_ACCMODE != O_RDONLY
        // Writers also read (partial chunks are read back); appends and truncation are done by kmsfs itself.
        return (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (flags & (O_SYNC | O_DSYNC))
    }

    /// Gives a new node to the user whose request created it (when kmsfs runs as root, e.g. with allow_other).
    private func giveToCaller(_ parent: Inode, _ name: String, _ caller: Caller) {
        guard chownToCaller else { return }
        _ = fchownat(parent.fd, name, caller.uid, caller.gid, AT_SYMLINK_NOFOLLOW)
    }

    private func giveToCaller(fd: Int32, _ caller: Caller) {
        guard chownToCaller else { return }
        _ = fchown(fd, caller.uid, caller.gid)
    }
}

let O_PATH_FLAG = kmsfs_o_path()
let AT_EMPTY_PATH_FLAG = kmsfs_at_empty_path()
let FUSE_SET_ATTR_MODE_FLAG: Int32 = 1 << 0
let FUSE_SET_ATTR_UID_FLAG: Int32 = 1 << 1
let FUSE_SET_ATTR_GID_FLAG: Int32 = 1 << 2
let FUSE_SET_ATTR_SIZE_FLAG: Int32 = 1 << 3
let FUSE_SET_ATTR_ATIME_FLAG: Int32 = 1 << 4
let FUSE_SET_ATTR_MTIME_FLAG: Int32 = 1 << 5
let FUSE_SET_ATTR_ATIME_NOW_FLAG: Int32 = 1 << 7
let FUSE_SET_ATTR_MTIME_NOW_FLAG: Int32 = 1 << 8
/// utimensat(2) markers: leave a time alone, or set it to now.
let UTIME_OMIT_VALUE = (1 << 30) - 2
let UTIME_NOW_VALUE = (1 << 30) - 1
