import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Synchronization

/// Who made a request: new nodes are given to this user when kmsfs runs as root.
struct Caller {
    let uid: uid_t
    let gid: gid_t
}

/// The encrypted filesystem: FUSE low-level request handlers over a backing directory.
///
/// The kernel addresses nodes by inode (`InodeTable`). An inode holds no descriptor: each call reaches the
/// backing node through a descriptor of its parent directory and its name there (the *at system calls), so
/// the backing directory's path is never walked again after mounting and the number of files is not bounded by
/// the open-file limit. Names go through `NameMapping`, file contents through `ContentIO`; a file's key comes
/// from `KeyService` when one of its handles first needs it and lives in `OpenFileTable` until its last
/// handle closes (see KeyLifetime.swift).
public final class EncryptedFilesystem: @unchecked Sendable {
    public struct Settings: Sendable {
        public var cipherDir: String
        public var volume: VolumeConfig
        public var keys: KeyService
        public var readOnly: Bool
        /// Bypass the kernel page cache: every read and write reaches kmsfs as the application issued it.
        public var directIO: Bool
        /// Let the kernel cache writes and send them later, several at a time (FUSE writeback cache): small and
        /// random writes become much faster, but a write that the disk cannot hold is reported by fsync(2) and
        /// close(2) instead of write(2), and writes not yet sent are lost if the daemon dies.
        public var writebackCache: Bool = false
        public var names: NameMapping
        /// Format 3: the keys derived from the volume key (the config is authenticated again when it changes).
        public var volumeKeys: VolumeKeys?
        /// Data keys made ahead for new files (`DataKeyPool.Settings.off` to make each at create time).
        public var keyPool: DataKeyPool.Settings
        /// Files and directories the daemon keeps track of before it asks the kernel to forget the least
        /// recently used ones (0: no bound).
        public var maxInodes: Int
        /// Shared mode: other hosts may use the volume at once (see `withIO`).
        public var shared = false

        public init(cipherDir: String, volume: VolumeConfig, keys: KeyService, readOnly: Bool, directIO: Bool = false,
                    writebackCache: Bool = false, names: NameMapping = PlaintextNames(),
                    keyPool: DataKeyPool.Settings = .defaults, maxInodes: Int = EncryptedFilesystem.defaultMaxInodes,
                    volumeKeys: VolumeKeys? = nil, shared: Bool = false) {
            self.shared = shared
            self.cipherDir = cipherDir
            self.volume = volume
            self.keys = keys
            self.readOnly = readOnly
            self.directIO = directIO
            self.writebackCache = writebackCache
            self.names = names
            self.keyPool = keyPool
            self.maxInodes = maxInodes
            self.volumeKeys = volumeKeys
        }
    }

    /// Seconds the kernel may cache names and attributes (all changes go through this mount).
    static let cacheTimeout = 1.0
    /// How long the kernel may keep attributes and names: none in shared mode, where another host may change
    /// them (every open then sees the size and names as they are: close-to-open consistency).
    var cacheTimeout: Double { shared ? 0 : Self.cacheTimeout }

    /// About 150 bytes each: 8,192 inodes keep the daemon within about 1 MiB of its idle size however many files
    /// the kernel has seen. Little is lost by forgetting more often: the kernel revalidates every name it caches
    /// once its one-second timeout has passed, which reaches the daemon either way.
    public static let defaultMaxInodes = 8192

    let cipherDir: String
    let volume: VolumeConfig
    let keys: KeyService
    let names: NameMapping
    let volumeKeys: VolumeKeys?
    let volumeKeysWiped = Atomic<Bool>(false)
    /// Mounted read-only, or fenced (`fence`): every change is refused with EROFS.
    var readOnly: Bool { readOnlyMount || fenced.load(ordering: .relaxed) }
    let readOnlyMount: Bool
    private let fenced = Atomic<Bool>(false)
    let directIO: Bool
    let writebackCache: Bool
    /// Shared mode (`Settings.shared`).
    let shared: Bool
    /// Shared mode: the volume's locks file (`sharedLocksFile` in the backing root), whose byte ranges stand
    /// for the backing files (`sharedLockRange`); -1 otherwise.
    let sharedLocks: Int32
    let inodes: InodeTable
    let table: OpenFileTable
    let pool: DataKeyPool
    let maxInodes: Int
    /// Format 2: every file's layout (uniform header length), so sizes need no header read; nil when each file's
    /// header says (format 1, or a format 2 volume with mixed lengths).
    var uniformLayout: ChunkLayout? { uniform.withLock { $0 } }
    private let uniform: Mutex<ChunkLayout?>
    private let sweeping = Mutex(false)
    /// Serializes giving directories new IDs (DirectoryNames), so two lookups in one damaged, empty directory
    /// cannot each give it an ID.
    let directoryIdRepair = Lock()
    /// Mount names already decrypted for mount paths (`shownName`): every create names its file in the audit
    /// log, and decrypting each component of its path again cost more than the rest of the create's own work bar
    /// the system calls. A backing name decrypts to the same name in the same directory whatever happens to it,
    /// so an entry never goes stale. Names only, never key material; 1,024 of them (about 250 KiB) cover the
    /// directories of any working set, and the files being opened lately.
    let shownNames = BoundedCache<ShownNameKey, [UInt8]>(capacity: 1024)
    /// A volume this backing filesystem cannot serve.
    public struct Unsupported: Error, CustomStringConvertible {
        public let description: String
    }

    /// Serializes changes to name binding tags (NameBinding).
    let bindingLock = Lock()
    /// Files and directories carry name binding tags (format 3 volumes made since names are bound).
    var bindsNames: Bool { volume.bindsNames && volumeKeys != nil && names.usesDirectoryIds }
    /// Running as root: new files, directories and links are given to the calling user.
    let chownToCaller: Bool
    /// What the backing filesystem was found to do at mount (how new files are made).
    public let backing: BackingFeatures

    public init(_ settings: Settings) throws {
        let pathFd = Glibc.open(settings.cipherDir, O_PATH_FLAG | O_DIRECTORY | O_CLOEXEC)
        if pathFd < 0 { throw Errno.current }
        // A quarter of the open-file limit for cached directory descriptors, leaving the rest to open files.
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        inodes = try InodeTable(rootFd: pathFd, maxCachedDirectories: min(1024, Int(clamping: limit.rlim_cur) / 4))
        cipherDir = settings.cipherDir.count > 1 && settings.cipherDir.hasSuffix("/")
            ? String(settings.cipherDir.dropLast()) : settings.cipherDir
        volume = settings.volume
        keys = settings.keys
        names = settings.names
        volumeKeys = settings.volumeKeys
        readOnlyMount = settings.readOnly
        if settings.readOnly { Self.lendingAllowed.store(false, ordering: .relaxed) }
        directIO = settings.directIO
        writebackCache = settings.writebackCache && !settings.directIO && !settings.shared
        shared = settings.shared
        chownToCaller = geteuid() == 0
        maxInodes = settings.maxInodes
        backing = settings.readOnly ? .assumed : BackingFeatures.probe(dirFd: pathFd)
        if !settings.readOnly { Log.info("backing filesystem: \(backing)") }
        if settings.volume.bindsNames && !backing.xattrs {
            close(pathFd)
            throw Unsupported(description: "this volume binds names to files with extended attributes (\(Self.bindingAttribute)), which the backing filesystem does not support; mount it read-only, or move it to a filesystem with user extended attributes")
        }
        if settings.shared && !settings.readOnly && !backing.tmpfileLink && !backing.renameNoReplace && !backing.hardLinks {
            close(pathFd)
            throw Unsupported(description: "shared mode needs a way to give a complete new file its name in one step (rename without replacing, or a hard link), and the backing filesystem has neither; mount it without --shared")
        }
        if settings.shared && !backing.locks {
            close(pathFd)
            throw Unsupported(description: "shared mode needs byte-range locks that the backing filesystem enforces between open files, and it does not; mount it without --shared (one host at a time)")
        }
        if settings.shared {
            // (A read-only mount makes nothing: the first writable shared mount of the volume made the file.)
            let fd = settings.readOnly ? openat(pathFd, Self.sharedLocksFile, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
                : openat(pathFd, Self.sharedLocksFile, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                let e = Errno.current
                close(pathFd)
                throw Unsupported(description: settings.readOnly && e.code == ENOENT
                    ? "shared mode needs the volume's locks file \(Self.sharedLocksFile), which a writable shared mount makes, and the volume has none yet; mount it once with --shared and not read-only, or read-only without --shared"
                    : "shared mode needs the volume's locks file \(Self.sharedLocksFile), which cannot be \(settings.readOnly ? "opened" : "opened or made"): \(e)")
            }
            sharedLocks = fd
        } else {
            sharedLocks = -1
        }
        if backing.possiblyShared && !settings.shared {
            Log.info("the backing directory is on a FUSE-based or network filesystem: other hosts are kept out by the volume lease (\(VolumeConfig.fileName).lease), which flock alone would not do")
        }
        uniform = Mutex(settings.volume.uniformLayout)
        pool = DataKeyPool(keys: settings.keys, volumeId: settings.volume.volumeId, userContext: settings.volume.encryptionContext,
                           settings: settings.readOnly ? .off : settings.keyPool)
        let keyService = settings.keys
        table = OpenFileTable { file, secrets in
            keyService.recordDiscard(subject: KeySubject(path: file.path, fileId: secrets.fileId))
        }
    }

    /// Refuses every change from now on (EROFS), for a mount that lost its claim to the volume (its lease was
    /// taken over by another host): reads go on, nothing more is written.
    public func fence(_ why: String) {
        if !fenced.exchange(true, ordering: .relaxed) {
            Log.error("no longer writing to \(cipherDir): \(why); every change is refused with EROFS until it is unmounted")
        }
    }

    /// Set once before serving: false while this mount may not write (its volume lease is not current).
    public var leaseIsCurrent: (@Sendable () -> Bool)?

    /// Throws EROFS when changes are refused: a read-only or fenced mount, or a lease not renewed in time.
    func checkWritable() throws {
        if readOnly { throw Errno.EROFS }
        if let current = leaseIsCurrent, !current() {
            FailureLog.shared.log(.error, kind: "lease-not-current",
                                  "refusing a change to \(cipherDir): this mount's lease was not renewed in time (is the backing filesystem stuck?)")
            throw Errno.EROFS
        }
    }

    /// Number of files whose keys are in memory.
    public var openFileCount: Int { table.count }

    /// Wipes every key still in memory (on unmount).
    public func shutdown() {
        sweeping.withLock { $0 = false }
        table.wipeAll()
        pool.shutdown()
        if let k = volumeKeys, !volumeKeysWiped.exchange(true, ordering: .relaxed) {
            k.wipe()
            keys.recordDiscard(subject: KeyService.volumeKeySubject)
        }
        FailureLog.shared.flush()
    }

    /// Starts the thread that keeps the inode table within `maxInodes` once the mount is live: twice a second, or
    /// as soon as the table is a quarter over, if the kernel knows more files than that, it asks the kernel to
    /// forget the least recently looked-up entries (files with open handles are kept). The kernel drops them
    /// when unused and sends FORGET.
    func startInodeSweeper(notify: @escaping @Sendable (UInt64, [UInt8]) -> Void) {
        guard maxInodes > 0 else { return }
        sweeping.withLock { $0 = true }
        BackgroundThread.start { [self] in
            while sweeping.withLock({ $0 }) {
                inodes.waitForPressure(seconds: 0.5)
                let known = inodes.count
                var asked = 0
                for v in inodes.sweep(limit: maxInodes) where table.lookup(v.key) == nil {
                    guard sweeping.withLock({ $0 }) else { return }
                    guard let shown = shownName(v.name, in: v.parent) else { continue }
                    notify(v.parent.nodeId, shown)
                    asked += 1
                }
                if asked > 0 { Log.debug("inode table: \(known) files known, asked the kernel to forget \(asked)") }
            }
        }
    }

    // MARK: - reaching nodes

    /// Runs `body` with a directory descriptor and a name that reach `inode` itself ("." in the root).
    /// Throws ENOENT when the node has no name left.
    @discardableResult
    func withNode<R>(_ inode: Inode, _ body: (Int32, String) throws -> R) throws -> R {
        if inode === inodes.root { return try body(inodes.rootFd, ".") }
        return try inodes.withLocation(inode, body)
    }

    /// Like `withNode`, but a regular file whose names are all gone is still reached through the backing
    /// descriptor of one of its open handles (`viaDescriptor`).
    @discardableResult
    func withNode<R>(_ inode: Inode, _ body: (Int32, String) throws -> R, viaDescriptor: (Int32) throws -> R) throws -> R {
        do {
            return try withNode(inode, body)
        } catch let e as Errno where e.code == ENOENT {
            // Only regular files are open (and only a link's key can change: it is never read unlocked here).
            if inode.type == S_IFREG, let r = try table.withDescriptor(of: inode.key, { fd, _ in try viaDescriptor(fd) }) { return r }
            throw e
        }
    }

    // MARK: - names and attributes

    /// Resolves `name` in `parent` and records the kernel's new reference to it.
    func lookup(_ parent: Inode, _ name: [UInt8]) throws -> (Inode, stat) {
        try withEntry(parent, name, creating: false) { dfd, b in
            var st = stat()
            try syscall { fstatat(dfd, b.name, &st, AT_SYMLINK_NOFOLLOW) }
            try checkNewName(parent, dfd, b.name, st) { mountPath(of: parent, name) }
            let inode = inodes.remember(parent: parent, name: b.name, st: st)
            present(&st, inode, dfd: dfd, name: b.name)
            return (inode, st)
        }
    }

    func forget(_ nodeId: UInt64, count: UInt64) {
        inodes.forget(nodeId, count: count)
    }

    func getattr(_ inode: Inode) throws -> stat {
        var st = stat()
        do {
            try withNode(inode) { dfd, name in
                try syscall { fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) }
                // The name holds another node only if the backing directory was changed behind the mount's back.
                if inode !== inodes.root && InodeKey(st) != (inode.type == S_IFLNK ? inodes.key(of: inode) : inode.key) {
                    throw Errno(ESTALE)
                }
                present(&st, inode, dfd: dfd, name: name)
            }
        } catch let e as Errno where e.code == ENOENT {
            // No name left: an unlinked file still open.
            guard inode.type == S_IFREG else { throw e }
            let found: Bool? = try table.withDescriptor(of: inode.key) { fd, file in
                try syscall { fstat(fd, &st) }
                st.st_size = off_t(file.size)
                return true
            }
            guard found != nil else { throw e }
        }
        return st
    }

    /// The attributes the mount shows for the backing node `name` of `dfd` (`st`, its backing ones): its
    /// plaintext size, and for a symbolic link whose target is bound to its name the inode number its link ID
    /// gives (the same under every name it is stored under, so a rename keeps it).
    func present(_ st: inout stat, _ inode: Inode, dfd: Int32, name: String) {
        st.st_size = off_t(plaintextSize(inode, backingSize: Int(st.st_size), dfd: dfd, name: name))
        if inode.type == S_IFLNK, let ino = shownLinkInode(dfd, name) { st.st_ino = ino_t(ino) }
    }

    /// The inode number shown for bound link `name` of `dfd`, or nil (not bound, or no link ID there).
    func shownLinkInode(_ dfd: Int32, _ name: String) -> UInt64? {
        guard names.bindsLinkTargets else { return nil }
        var raw = [CChar](repeating: 0, count: 24)
        guard readlinkat(dfd, name, &raw, raw.count) == raw.count,
              let id = NameCipher.linkId(ofStored: raw.map { UInt8(bitPattern: $0) }) else { return nil }
        return NameCipher.shownInode(linkId: id)
    }

    /// The plaintext size of a regular file from its backing size: from its open entry, or the layout learned
    /// from its 16-byte header prefix (read once per inode, no key needed). Never a provider call.
    func plaintextSize(_ inode: Inode, backingSize: Int, dfd: Int32, name: String) -> Int {
        if inode.type == S_IFLNK { return names.linkTargetSize(storedLength: backingSize) }
        guard inode.type == S_IFREG else { return backingSize }
        // (In shared mode the backing size counts even for an open file: another host may have changed it.)
        if !shared, let open = table.lookup(inode.key) { return open.size }
        if let u = uniformLayout { return u.plaintextSize(backingSize: backingSize) }
        switch inodes.layout(of: inode) {
        case .known(let l): return l.plaintextSize(backingSize: backingSize)
        case .foreign: return 0
        case .unknown: break
        }
        guard backingSize >= FileHeader.prefixSize else { return 0 }
        Log.debug("reading the header prefix of backing file \(name) for its size")
        var fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | kmsfs_o_noatime())
        if fd < 0 { fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) }
        guard fd >= 0 else { return backingSize }
        defer { close(fd) }
        guard let layout = readLayout(fd) else {
            inodes.setLayout(.foreign, of: inode)
            return 0
        }
        inodes.setLayout(.known(layout), of: inode)
        return layout.plaintextSize(backingSize: backingSize)
    }

    /// The layout a backing file's header prefix gives, or nil if it is not a kmsfs file.
    func readLayout(_ fd: Int32) -> ChunkLayout? {
        var prefix = [UInt8](repeating: 0, count: FileHeader.prefixSize)
        let n = prefix.withUnsafeMutableBytes { (try? FileIO.pread(fd, $0.baseAddress!, count: $0.count, offset: 0)) ?? 0 }
        guard n == FileHeader.prefixSize, let p = try? HeaderPrefix(prefix) else { return nil }
        return p.layout
    }

    /// setattr: mode, owner, size, times; `handle` is the open file the change came through, if any.
    func setattr(_ inode: Inode, _ attr: stat, _ valid: Int32, _ handle: Handle?, _ caller: Caller) throws -> stat {
        try checkWritable()
        let file = handle as? FileHandle
        if valid & FUSE_SET_ATTR_MODE_FLAG != 0 {
            // Never while owner permission is lent for a name binding (it would be put back over this change).
            _ = try Self.lendLock.withLock {
                if let f = file { try syscall { fchmod(f.fd, attr.st_mode) } } else {
                    try withNode(inode, { dfd, name in
                        try syscall { kmsfs_fchmodat_nofollow(dfd, name, attr.st_mode) }
                    }, viaDescriptor: { fd in try syscall { fchmod(fd, attr.st_mode) } })
                }
            }
        }
        if valid & (FUSE_SET_ATTR_UID_FLAG | FUSE_SET_ATTR_GID_FLAG) != 0 {
            let uid = valid & FUSE_SET_ATTR_UID_FLAG != 0 ? attr.st_uid : uid_t.max
            let gid = valid & FUSE_SET_ATTR_GID_FLAG != 0 ? attr.st_gid : gid_t.max
            try withNode(inode, { dfd, name in
                try syscall { fchownat(dfd, name, uid, gid, AT_SYMLINK_NOFOLLOW) }
            }, viaDescriptor: { fd in try syscall { fchown(fd, uid, gid) } })
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
            } else {
                try withNode(inode, { dfd, name in
                    try syscall { utimensat(dfd, name, times, AT_SYMLINK_NOFOLLOW) }
                }, viaDescriptor: { fd in try syscall { futimens(fd, times) } })
            }
        }
        return try getattr(inode)
    }

    func access(_ inode: Inode, _ mask: Int32) throws {
        try withNode(inode) { dfd, name in try syscall { faccessat(dfd, name, mask, AT_SYMLINK_NOFOLLOW) } }
    }

    func statfs() throws -> statvfs {
        var st = statvfs()
        try syscall { fstatvfs(inodes.rootFd, &st) }
        return st
    }

    func readlink(_ inode: Inode) throws -> [UInt8] {
        guard let (parent, name) = inodes.location(of: inode) else { throw Errno.ENOENT }
        return try inodes.withDirectory(parent) { dfd in
            try linkTarget(dfd, name, in: parent, describe: { mountPath(of: inode) }).target
        }
    }

    /// The target of symbolic link `name` of `parent` (reached through `dfd`), and its link ID if it is bound;
    /// `describe` names it in the log.
    private func linkTarget(_ dfd: Int32, _ name: String, in parent: Inode, describe: () -> String) throws -> (target: [UInt8], id: [UInt8]?) {
        var raw = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = try syscall { readlinkat(dfd, name, &raw, raw.count - 1) }
        let stored = raw[0..<n].map { UInt8(bitPattern: $0) }
        do {
            let target = try names.mountLinkTarget(stored, at: try linkPlace(parent, name))
            return (target, names.bindsLinkTargets ? NameCipher.linkId(ofStored: stored) : nil)
        } catch {
            let why = names.bindsLinkTargets ? "altered, not this volume's, or exchanged with another link's or moved in the backing directory" : "altered, or not this volume's"
            FailureLog.shared.log(.error, kind: "symlink-target", "cannot read symbolic link \(describe()): its stored target does not decrypt (\(why))")
            throw error
        }
    }

    // MARK: - creating and removing names

    func mkdir(_ parent: Inode, _ name: [UInt8], _ mode: mode_t, _ caller: Caller) throws -> (Inode, stat) {
        guard names.usesDirectoryIds else {
            return try makeNode(parent, name, caller) { dfd, n in try syscall { mkdirat(dfd, n, mode) } }
        }
        // Encrypted names: the new directory's ID file is written before the directory is given out (with
        // owner write and search permission meanwhile, put back after).
        var id: [UInt8] = []
        let (inode, st) = try makeNode(parent, name, caller) { dfd, n in
            try syscall { mkdirat(dfd, n, mode | 0o700) }
            do {
                let fd = try syscall { openat(dfd, n, O_PATH_FLAG | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
                defer { close(fd) }
                id = try writeDirectoryId(fd)
                if bindsNames {
                    let tag = try bindingTag(try knownDirectoryId(parent), id, n)
                    try Self.withBindable(dfd, n) { try bind(tag, at: Self.nodePath($0)) }
                }
                if mode & 0o700 != 0o700 { try syscall { fchmodat(dfd, n, mode, 0) } }
            } catch {
                let fd = openat(dfd, n, O_PATH_FLAG | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                if fd >= 0 {
                    unlinkat(fd, NameCipher.directoryIdFile, 0)
                    close(fd)
                }
                unlinkat(dfd, n, AT_REMOVEDIR)
                throw error
            }
        }
        inodes.setDirectoryId(id, of: inode)
        return (inode, st)
    }

    func mknod(_ parent: Inode, _ name: [UInt8], _ mode: mode_t, _ rdev: dev_t, _ caller: Caller) throws -> (Inode, stat) {
        if mode & S_IFMT == S_IFREG {
            let (inode, st, handle) = try create(parent, name, mode & 0o7777, O_WRONLY | O_EXCL, caller)
            releaseFile(handle)
            return (inode, st)
        }
        return try makeNode(parent, name, caller) { dfd, n in try syscall { mknodat(dfd, n, mode, rdev) } }
    }

    func symlink(_ target: [UInt8], _ parent: Inode, _ name: [UInt8], _ caller: Caller) throws -> (Inode, stat) {
        try makeNode(parent, name, caller) { dfd, n in
            let stored = try names.backingLinkTarget(target, at: try linkPlace(parent, n), linkId: nil)
            try syscall { symlinkat(stored, dfd, n) }
        }
    }

    /// Where a link named `name` in `parent` is, for its target's sealing (the directory ID only matters in
    /// volumes that bind links' names).
    private func linkPlace(_ parent: Inode, _ name: String) throws -> NameCipher.LinkPlace {
        NameCipher.LinkPlace(directoryId: names.bindsLinkTargets ? try knownDirectoryId(parent) : [], backingName: name)
    }

    /// A hard link of a symbolic link, in a volume whose link targets are sealed for their names: a new link
    /// with the same target, owner and times (one target cannot be sealed for two names).
    private func copyLink(_ inode: Inode, _ newParent: Inode, _ newName: [UInt8]) throws -> (Inode, stat) {
        guard let (parent, name) = inodes.location(of: inode) else { throw Errno.ENOENT }
        var st = stat()
        let target = try inodes.withDirectory(parent) { dfd in
            try syscall { fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) }
            return try linkTarget(dfd, name, in: parent, describe: { mountPath(of: inode) }).target
        }
        return try makeNode(newParent, newName, Caller(uid: st.st_uid, gid: st.st_gid)) { dfd, n in
            let stored = try names.backingLinkTarget(target, at: try linkPlace(newParent, n), linkId: nil)
            try syscall { symlinkat(stored, dfd, n) }
            let times = [st.st_atim, st.st_mtim]
            _ = utimensat(dfd, n, times, AT_SYMLINK_NOFOLLOW)
        }
    }

    /// Creates entry `name` of `parent` with `make`, gives it to the caller and records the kernel's reference.
    private func makeNode(_ parent: Inode, _ name: [UInt8], _ caller: Caller, _ make: (Int32, String) throws -> Void) throws -> (Inode, stat) {
        try checkWritable()
        return try withEntry(parent, name, creating: true) { dfd, b in
            try placeSibling(b, in: dfd)
            do {
                try make(dfd, b.name)
            } catch {
                removeSibling(b, in: dfd)
                throw error
            }
            if chownToCaller && (caller.uid != 0 || caller.gid != 0) { _ = fchownat(dfd, b.name, caller.uid, caller.gid, AT_SYMLINK_NOFOLLOW) }
            var st = stat()
            try syscall { fstatat(dfd, b.name, &st, AT_SYMLINK_NOFOLLOW) }
            let inode = inodes.remember(parent: parent, name: b.name, st: st)
            present(&st, inode, dfd: dfd, name: b.name)
            return (inode, st)
        }
    }

    func link(_ inode: Inode, _ newParent: Inode, _ newName: [UInt8]) throws -> (Inode, stat) {
        try checkWritable()
        if names.bindsLinkTargets && inode.type == S_IFLNK { return try copyLink(inode, newParent, newName) }
        try withEntry(newParent, newName, creating: true) { ndfd, b in
            try placeSibling(b, in: ndfd)
            // A bound file carries the new name's tag before it has the name (and loses it if the link fails).
            let newDirId: [UInt8]?
            do {
                newDirId = bindsNames && inode.type == S_IFREG ? try knownDirectoryId(newParent) : nil
            } catch {
                removeSibling(b, in: ndfd)
                throw error
            }
            func linked(_ path: String, fileId: () throws -> [UInt8], _ link: () throws -> Void) throws {
                guard let d = newDirId else { return try link() }
                let tag = try bindingTag(d, try fileId(), b.name)
                try bind(tag, at: path, newName: true)
                do {
                    try link()
                } catch {
                    unbind(tag, at: path)
                    throw error
                }
            }
            do {
                try withNode(inode, { dfd, name in
                    // Only bound files need a descriptor of the node (FIFOs, sockets and devices are linked as they are).
                    guard newDirId != nil else { _ = try syscall { linkat(dfd, name, ndfd, b.name, 0) }; return }
                    try Self.withBindable(dfd, name) { node in
                        try linked(Self.nodePath(node), fileId: { try nodeId(node: node) }) {
                            try syscall { linkat(dfd, name, ndfd, b.name, 0) }
                        }
                    }
                }, viaDescriptor: { fd in
                    // A file whose names are all gone, linked again from one of its open handles.
                    try linked(Self.nodePath(fd), fileId: { try Self.fileId(fd) }) {
                        try syscall { linkat(AT_FDCWD, "/proc/self/fd/\(fd)", ndfd, b.name, AT_SYMLINK_FOLLOW) }
                    }
                })
            } catch {
                removeSibling(b, in: ndfd)
                throw error
            }
        }
        return try lookup(newParent, newName)
    }

    func unlink(_ parent: Inode, _ name: [UInt8]) throws {
        try remove(parent, name, flags: 0)
    }

    func rmdir(_ parent: Inode, _ name: [UInt8]) throws {
        try remove(parent, name, flags: AT_REMOVEDIR)
    }

    private func remove(_ parent: Inode, _ name: [UInt8], flags: Int32) throws {
        try checkWritable()
        let (key, n, leaving): (InodeKey, String, (tag: [UInt8], fd: Int32)?) = try withEntry(parent, name, creating: false) { dfd, b in
            var st = stat()
            try syscall { fstatat(dfd, b.name, &st, AT_SYMLINK_NOFOLLOW) }
            // A file that keeps other names loses this name's tag, after the name is gone (a crash in between
            // leaves an extra tag, never a name without one).
            var leaving: (tag: [UInt8], fd: Int32)? = nil
            if bindsNames && flags == 0 && st.st_mode & S_IFMT == S_IFREG && st.st_nlink > 1 {
                let fd = openat(dfd, b.name, O_PATH_FLAG | O_NOFOLLOW | O_CLOEXEC)
                if fd >= 0 {
                    if let fid = try? nodeId(node: fd), let tag = try? bindingTag(try knownDirectoryId(parent), fid, b.name) {
                        leaving = (tag, fd)
                    } else {
                        close(fd)
                    }
                }
            }
            do {
                if unlinkat(dfd, b.name, flags) != 0 {
                    let e = Errno.current
                    // A directory that looks empty through the mount still holds kmsfs's own files (its directory
                    // ID, and files a crash left half made under a temporary name): remove them, then the directory.
                    guard e.code == ENOTEMPTY, flags == AT_REMOVEDIR else { throw e }
                    if shared {
                        try removeDirectoryShared(dfd, b.name)
                    } else {
                        guard EncryptedFilesystem.removeLeftovers(in: dfd, b.name, encryptedNames: names.usesDirectoryIds) else { throw e }
                        try syscall { unlinkat(dfd, b.name, flags) }
                    }
                }
            } catch {
                if let l = leaving { close(l.fd) }
                throw error
            }
            removeSibling(b, in: dfd)
            return (InodeKey(st), b.name, leaving)
        }
        inodes.removed(key, from: parent, name: n)
        // After the inode table forgot the name: an open checking the recorded names no longer checks this one.
        if let l = leaving {
            unbind(l.tag, at: Self.nodePath(l.fd))
            close(l.fd)
        }
    }

    /// rmdir in shared mode, of a directory that holds only kmsfs's own files: another host may be creating
    /// something in it this moment. Temporary files younger than a minute are taken for such creates (ENOTEMPTY);
    /// the directory ID file is moved out beside the directory rather than removed, and put back if the rmdir
    /// fails because an entry appeared meanwhile, so that entry's name still decrypts.
    func removeDirectoryShared(_ dfd: Int32, _ name: String) throws {
        try removingDirectoryShared(dfd, name) { unlinkat(dfd, name, AT_REMOVEDIR) }
    }

    /// The shared-mode removal of kmsfs's own files of directory `name` of `dfd` (see `removeDirectoryShared`)
    /// around `remove` (an rmdir, or a rename over the directory), which returns 0 or -1 with errno.
    func removingDirectoryShared(_ dfd: Int32, _ name: String, _ remove: () -> Int32) throws {
        let fd = try syscall { openat(dfd, name, O_PATH_FLAG | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        defer { close(fd) }
        guard let own = EncryptedFilesystem.ownEntries(fd, encryptedNames: names.usesDirectoryIds) else { throw Errno(ENOTEMPTY) }
        for l in own where TemporaryNames.isTemporary(l) {
            var st = stat()
            if fstatat(fd, l, &st, AT_SYMLINK_NOFOLLOW) == 0, time(nil) - st.st_mtim.tv_sec < 60 {
                throw Errno(ENOTEMPTY)
            }
            unlinkat(fd, l, 0)
        }
        var aside: String? = nil
        for l in own where !TemporaryNames.isTemporary(l) {
            if l == NameCipher.directoryIdFile {
                let t = TemporaryNames.make()
                if renameat(fd, l, dfd, t) == 0 { aside = t }
            } else {
                unlinkat(fd, l, 0)
            }
        }
        if remove() == 0 {
            if let t = aside { unlinkat(dfd, t, 0) }
            return
        }
        let e = Errno.current
        if let t = aside, kmsfs_renameat2(dfd, t, fd, NameCipher.directoryIdFile, kmsfs_rename_noreplace()) != 0 {
            FailureLog.shared.log(.error, kind: "directory-id", "rmdir of \(name) failed (\(e)) and its directory ID could not be put back (\(Errno.current)): kept beside it as \(t)")
        }
        throw e
    }

    /// Removes kmsfs's own files in directory `name` of `dfd` (see `ownEntries`) if they are all it holds; true
    /// when it did. Creates in that directory cannot run meanwhile: the kernel holds its lock during rmdir.
    static func removeLeftovers(in dfd: Int32, _ name: String, encryptedNames: Bool) -> Bool {
        let fd = openat(dfd, name, O_PATH_FLAG | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard let own = ownEntries(fd, encryptedNames: encryptedNames), !own.isEmpty else { return false }
        // A directory without write permission for its owner (mode 0555, say) can still be removed when empty;
        // a daemon that is not root needs that permission for a moment to remove kmsfs's files in it first.
        var st = stat()
        var opened = false
        defer { if opened { chmod(EncryptedFilesystem.nodePath(fd), st.st_mode & 0o7777) } }
        for l in own {
            if TemporaryNames.isTemporary(l) {
                Log.info("removing a file left half made by a crash: \(l) in the backing directory being removed")
            }
            if unlinkat(fd, l, 0) != 0 && (errno == EACCES || errno == EPERM) && !opened
                && fstat(fd, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR && st.st_uid == geteuid()
                && chmod(EncryptedFilesystem.nodePath(fd), (st.st_mode & 0o7777) | 0o300) == 0 {
                opened = true
                unlinkat(fd, l, 0)
            }
        }
        return true
    }

    func rename(_ parent: Inode, _ name: [UInt8], _ newParent: Inode, _ newName: [UInt8], _ flags: UInt32) throws {
        try checkWritable()
        let exchange = flags & kmsfs_rename_exchange() != 0
        // Old tags to remove once the inode table knows the new names (an open reading the recorded name in
        // between must still find its tag): each with a descriptor of its node.
        var stale: [(tag: [UInt8], fd: Int32)] = []
        defer { for s in stale { close(s.fd) } }
        var relinkedKey: InodeKey? = nil
        let (moved, replaced, from, to): (InodeKey, InodeKey?, String, String) = try inodes.withDirectory(parent) { dfd in
            try inodes.withDirectory(newParent) { ndfd in
                let from = try names.backingName(name, in: try nameDirectory(parent, fd: dfd), creating: false)
                let to = try names.backingName(newName, in: try nameDirectory(newParent, fd: ndfd), creating: true)
                var st = stat(), target = stat()
                try syscall { fstatat(dfd, from.name, &st, AT_SYMLINK_NOFOLLOW) }
                let exists = fstatat(ndfd, to.name, &target, AT_SYMLINK_NOFOLLOW) == 0
                let sameNode = exists && st.st_dev == target.st_dev && st.st_ino == target.st_ino
                // Bound nodes get their new name's tag before the rename and lose the old one after it. Each is held
                // by an O_PATH descriptor, which follows the node through the rename (and never a planted link).
                var added: [(tag: [UInt8], fd: Int32, old: [UInt8])] = []
                var nodes: [Int32] = []
                defer { for fd in nodes where !stale.contains(where: { $0.fd == fd }) { close(fd) } }
                func node(_ d: Int32, _ n: String) throws -> Int32 {
                    let fd = try syscall { openat(d, n, O_PATH_FLAG | O_NOFOLLOW | O_CLOEXEC) }
                    nodes.append(fd)
                    return fd
                }
                var replacedStale: (tag: [UInt8], fd: Int32)? = nil
                // A symbolic link whose target is sealed for its name moves as a new link, sealed for the new name
                // and made beside it under a temporary name first; RENAME_EXCHANGE cannot do that in one step.
                let linkType = { (s: stat) in s.st_mode & S_IFMT == S_IFLNK }
                let relink = names.bindsLinkTargets && !sameNode && linkType(st)
                if names.bindsLinkTargets && exchange && exists && !sameNode && (linkType(st) || linkType(target)) {
                    throw Errno(EINVAL)
                }
                // The old name must be removable once the new one is in place: checked first (a daemon that is
                // not root, in a directory it may not write), since a replaced entry cannot be put back.
                if relink && faccessat(dfd, ".", W_OK | X_OK, AT_EACCESS) != 0 { throw Errno.current }
                var relinked: String? = nil
                func undo() {
                    for a in added { unbind(a.tag, at: Self.nodePath(a.fd)) }
                    if let t = relinked { unlinkat(ndfd, t, 0) }
                }
                if bindsNames && !sameNode {
                    do {
                        let fromDir = try knownDirectoryId(parent), toDir = try knownDirectoryId(newParent)
                        let type = st.st_mode & S_IFMT
                        if type == S_IFREG || type == S_IFDIR {
                            let fd = try node(dfd, from.name)
                            let nid = try nodeId(node: fd)
                            let tag = try bindingTag(toDir, nid, to.name), old = try bindingTag(fromDir, nid, from.name)
                            try bind(tag, at: Self.nodePath(fd))
                            added.append((tag, fd, old))
                        }
                        let ttype = target.st_mode & S_IFMT
                        // A file replaced by the rename that keeps other names loses this name's tag (after it).
                        if !exchange && exists && ttype == S_IFREG && target.st_nlink > 1 {
                            let fd = try node(ndfd, to.name)
                            replacedStale = (try bindingTag(toDir, try nodeId(node: fd), to.name), fd)
                        }
                        if exchange && exists && (ttype == S_IFREG || ttype == S_IFDIR) {
                            let fd = try node(ndfd, to.name)
                            let tid = try nodeId(node: fd)
                            let tag = try bindingTag(fromDir, tid, from.name), old = try bindingTag(toDir, tid, to.name)
                            try bind(tag, at: Self.nodePath(fd))
                            added.append((tag, fd, old))
                        }
                    } catch {
                        undo()
                        throw error
                    }
                }
                do {
                    if relink {
                        let t = try linkTarget(dfd, from.name, in: parent, describe: {
                            mountPath(of: parent) + "/" + String(decoding: name, as: UTF8.self)
                        })
                        // Stored again with the same link ID: the link keeps its identity (inode number).
                        let stored = try names.backingLinkTarget(t.target, at: try linkPlace(newParent, to.name), linkId: t.id)
                        let tmp = TemporaryNames.make()
                        try syscall { symlinkat(stored, ndfd, tmp) }
                        relinked = tmp
                        if chownToCaller { _ = fchownat(ndfd, tmp, st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW) }
                        _ = utimensat(ndfd, tmp, [st.st_atim, st.st_mtim], AT_SYMLINK_NOFOLLOW)
                    }
                    try placeSibling(to, in: ndfd)
                } catch {
                    undo()
                    throw error
                }
                do {
                    if let tmp = relinked {
                        // The new link takes the new name in one step; the old name goes after (a crash in between
                        // leaves both names, each with the target sealed for it).
                        try syscall { kmsfs_renameat2(ndfd, tmp, ndfd, to.name, flags) }
                        relinked = nil
                        // The inode follows the link to its new name and node before the old name goes, so that a
                        // call on it in between finds the new one.
                        var now = stat()
                        if fstatat(ndfd, to.name, &now, AT_SYMLINK_NOFOLLOW) == 0 {
                            relinkedKey = InodeKey(now)
                            inodes.relinked(InodeKey(st), to: InodeKey(now), from: parent, name: from.name, to: newParent, newName: to.name)
                        }
                        if unlinkat(dfd, from.name, 0) != 0 {
                            let e = Errno.current
                            // Nothing replaced: take the new name back, and fail as the rename would have.
                            if !exists {
                                unlinkat(ndfd, to.name, 0)
                                if let k = relinkedKey {
                                    inodes.relinked(k, to: InodeKey(st), from: newParent, name: to.name, to: parent, newName: from.name)
                                }
                                throw e
                            }
                            Log.error("rename: the symbolic link's old backing name \(from.name) could not be removed (\(e)); it stays beside the new one")
                        }
                    } else if kmsfs_renameat2(dfd, from.name, ndfd, to.name, flags) != 0 {
                        // A directory replaced by a rename looks empty through the mount but still holds its
                        // directory ID: remove kmsfs's own files from it, then rename again.
                        let e = Errno.current
                        guard e.code == ENOTEMPTY, exists, target.st_mode & S_IFMT == S_IFDIR, !exchange else { throw e }
                        if shared {
                            try removingDirectoryShared(ndfd, to.name) { kmsfs_renameat2(dfd, from.name, ndfd, to.name, flags) }
                        } else {
                            guard EncryptedFilesystem.removeLeftovers(in: ndfd, to.name, encryptedNames: names.usesDirectoryIds) else { throw e }
                            try syscall { kmsfs_renameat2(dfd, from.name, ndfd, to.name, flags) }
                        }
                    }
                } catch {
                    undo()
                    removeSibling(to, in: ndfd)
                    throw error
                }
                if let r = replacedStale { stale.append(r) }
                for a in added { stale.append((a.old, a.fd)) }
                if !exchange { removeSibling(from, in: dfd) }
                return (InodeKey(st), exists ? InodeKey(target) : nil, from.name, to.name)
            }
        }
        if moved == replaced { return }  // two names of one file: rename does nothing
        if relinkedKey == nil { inodes.moved(moved, from: parent, name: from, to: newParent, newName: to) }
        if let r = replaced {
            if exchange {
                inodes.moved(r, from: newParent, name: to, to: parent, newName: from)
            } else {
                inodes.removed(r, from: newParent, name: to)
            }
        }
        for s in stale { unbind(s.tag, at: Self.nodePath(s.fd)) }
    }

    // MARK: - extended attributes (stored on the backing node as they are; see the threat model)
    //
    // Only the user.* and trusted.* namespaces are stored. security.* (SELinux labels, file capabilities) and
    // system.* (POSIX ACLs) are not supported, as on a filesystem without them: calls on them fail with
    // EOPNOTSUPP, and listings leave them out. Permissions are the file modes (checked by the kernel with
    // allow_other's default_permissions). Tools cache that answer per filesystem (ls -l asks once, not once per
    // file), which saves two requests per file listed.

    static func isSupportedXattr(_ name: UnsafePointer<CChar>) -> Bool {
        strncmp(name, "user.", 5) == 0 || strncmp(name, "trusted.", 8) == 0
    }

    /// Runs `body` with a path to exactly the node (an O_PATH descriptor's /proc link, never following a
    /// symbolic link the node's name may have become).
    @discardableResult
    private func withNodePath<R>(_ inode: Inode, _ body: (String) throws -> R) throws -> R {
        if inode === inodes.root { return try body("/proc/self/fd/\(inodes.rootFd)") }
        return try withNode(inode, { dfd, name in
            let fd = try syscall { openat(dfd, name, O_PATH_FLAG | O_NOFOLLOW | O_CLOEXEC) }
            defer { close(fd) }
            return try body("/proc/self/fd/\(fd)")
        }, viaDescriptor: { fd in try body("/proc/self/fd/\(fd)") })
    }

    func setxattr(_ inode: Inode, _ name: UnsafePointer<CChar>, _ value: UnsafePointer<CChar>?, _ size: Int, _ flags: Int32) throws {
        try checkWritable()
        guard Self.isSupportedXattr(name) else { throw Errno.ENOTSUP }
        guard let cipher = names.cipher else {
            return try withNodePath(inode) { p in try syscall { CSystem.setxattr(p, name, value, size, flags) } }
        }
        let plainName = Self.bytes(of: name)
        let stored = try storedXattrName(cipher, plainName)
        guard size <= Int(XATTR_SIZE_MAX_VALUE) - NameCipher.xattrValueOverhead else { throw Errno(E2BIG) }
        let plain = value.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
        let sealed = try cipher.sealXattrValue(plain, nodeId: try xattrNodeId(inode), name: plainName)
        try withNodePath(inode) { p in try syscall { CSystem.setxattr(p, stored, sealed, sealed.count, flags) } }
    }

    func getxattr(_ inode: Inode, _ name: UnsafePointer<CChar>, _ value: UnsafeMutablePointer<CChar>?, _ size: Int) throws -> Int {
        guard Self.isSupportedXattr(name) else { throw Errno.ENOTSUP }
        guard let cipher = names.cipher else {
            return try withNodePath(inode) { p in try syscall { CSystem.getxattr(p, name, value, size) } }
        }
        let plainName = Self.bytes(of: name)
        let stored = try storedXattrName(cipher, plainName)
        let sealed = try withNodePath(inode) { p in try Self.readGrowing { CSystem.getxattr(p, stored, $0, $1) } }
        guard let plain = cipher.openXattrValue(sealed, nodeId: try xattrNodeId(inode), name: plainName) else {
            FailureLog.shared.log(.error, kind: "xattr-value", "cannot read extended attribute \(String(decoding: plainName, as: UTF8.self)) of \(mountPath(of: inode)): its stored value does not decrypt (altered, or moved from another file)")
            throw Errno.EIO
        }
        if size == 0 { return plain.count }
        guard plain.count <= size else { throw Errno(ERANGE) }
        plain.withUnsafeBytes { if $0.count > 0 { UnsafeMutableRawPointer(value!).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        return plain.count
    }

    /// The names of the node's supported attributes (NUL-terminated, concatenated) into `list`, or their total
    /// length when `size` is 0.
    func listxattr(_ inode: Inode, _ list: UnsafeMutablePointer<CChar>?, _ size: Int) throws -> Int {
        let all = try withNodePath(inode) { p in
            try Self.readGrowing { CSystem.listxattr(p, $0?.assumingMemoryBound(to: CChar.self), $1) }
        }
        let cipher = names.cipher
        var shown: [CChar] = []
        var start = 0
        for (i, c) in all.enumerated() where c == 0 {
            let name = Array(all[start..<i])
            start = i + 1
            guard (name + [0]).withUnsafeBufferPointer({ $0.withMemoryRebound(to: CChar.self) { Self.isSupportedXattr($0.baseAddress!) } }) else { continue }
            var plain = name
            if let cipher {
                if name == Array(Self.bindingAttribute.utf8) { continue }  // kmsfs's own (NameBinding)
                let split = name.firstIndex(of: UInt8(ascii: "."))! + 1
                guard let p = cipher.decryptXattrName(namespace: Array(name[..<split]), encoded: Array(name[split...])) else {
                    FailureLog.shared.log(.error, kind: "xattr-name", "left out of the attribute list of \(mountPath(of: inode)): a stored attribute name does not decrypt")
                    continue
                }
                plain = p
            }
            shown += plain.map { CChar(bitPattern: $0) } + [0]
        }
        if size == 0 { return shown.count }
        guard shown.count <= size else { throw Errno(ERANGE) }
        shown.withUnsafeBufferPointer { list!.update(from: $0.baseAddress!, count: $0.count) }
        return shown.count
    }

    func removexattr(_ inode: Inode, _ name: UnsafePointer<CChar>) throws {
        try checkWritable()
        guard Self.isSupportedXattr(name) else { throw Errno.ENOTSUP }
        guard let cipher = names.cipher else {
            return try withNodePath(inode) { p in try syscall { CSystem.removexattr(p, name) } }
        }
        let stored = try storedXattrName(cipher, Self.bytes(of: name))
        try withNodePath(inode) { p in try syscall { CSystem.removexattr(p, stored) } }
    }

    /// The backing name of attribute `name` ("user.x"): ERANGE when it cannot be stored (too long).
    private func storedXattrName(_ cipher: NameCipher, _ name: [UInt8]) throws -> String {
        let split = name.firstIndex(of: UInt8(ascii: "."))! + 1
        guard let stored = try cipher.encryptXattrName(namespace: Array(name[..<split]), rest: Array(name[split...])) else {
            throw Errno(ERANGE)
        }
        return String(decoding: stored, as: UTF8.self)
    }

    /// What an attribute value is bound to: a regular file's file ID, a directory's ID. Other nodes (symbolic
    /// links, devices, FIFOs, sockets) cannot carry user attributes on Linux, and get ENOTSUP here for all.
    private func xattrNodeId(_ inode: Inode) throws -> [UInt8] {
        switch inode.type {
        case S_IFDIR:
            return try inodes.withDirectory(inode) { fd in try nameDirectory(inode, fd: fd).id }
        case S_IFREG:
            func fileId(_ fd: Int32) throws -> [UInt8] {
                do {
                    return try FileOpener.readHeader(fd: fd).fileId
                } catch {
                    FailureLog.shared.log(.error, kind: "xattr-header", "cannot use the extended attributes of \(mountPath(of: inode)): \(error)")
                    throw Errno.EIO
                }
            }
            return try withNode(inode, { dfd, name in
                let fd = try syscall { openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) }
                defer { close(fd) }
                return try fileId(fd)
            }, viaDescriptor: fileId)
        default:
            throw Errno.ENOTSUP
        }
    }

    /// The result of a getxattr- or listxattr-like `call(buffer, size)`, with the buffer grown while the result
    /// does not fit (ERANGE).
    private static func readGrowing(_ call: (UnsafeMutableRawPointer?, Int) -> Int) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 1024)
        while true {
            let n = buffer.withUnsafeMutableBytes { call($0.baseAddress, $0.count) }
            if n >= 0 { return Array(buffer[0..<n]) }
            guard errno == ERANGE else { throw Errno.current }
            let needed = try syscall { call(nil, 0) }
            buffer = [UInt8](repeating: 0, count: max(needed, buffer.count * 2))
        }
    }

    static func bytes(of name: UnsafePointer<CChar>) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: name, count: strlen(name)))
    }

    // MARK: - directories

    func opendir(_ inode: Inode) throws -> DirHandle {
        let fd = try withNode(inode) { dfd, name in
            try syscall { openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        }
        guard let stream = fdopendir(fd) else {
            let e = Errno.current
            close(fd)
            throw e
        }
        let handle = DirHandle(stream: stream, inode: inode)
        handle.names = try nameDirectory(inode, fd: fd)
        return handle
    }

    /// Lists entries from `offset` (0 or a value passed to `fill` earlier); `fill` returns false when the
    /// reply is full, and that entry is returned again by the next call.
    func readdir(_ handle: DirHandle, _ offset: Int, _ fill: ([UInt8], stat, Int) -> Bool) throws {
        try entries(handle, from: offset) { name, shown, entry in
            var st = stat()
            st.st_ino = entry.pointee.d_ino
            st.st_mode = mode_t(entry.pointee.d_type) << 12
            // (A backing filesystem that does not give types, DT_UNKNOWN, has its links found by trying.)
            if entry.pointee.d_type == UInt8(DT_LNK) || entry.pointee.d_type == UInt8(DT_UNKNOWN),
               let ino = shownLinkInode(dirfd(handle.stream), name) { st.st_ino = ino_t(ino) }
            return fill(shown, st, telldir(handle.stream))
        }
    }

    /// Lists entries with their attributes from `offset`, recording a kernel reference to each (but "." and
    /// ".."); `fill` returns false when the reply is full, and that entry's reference is dropped again.
    /// Only offered when sizes need no header read (a uniform header length): listing reads no file header.
    func readdirplus(_ handle: DirHandle, _ offset: Int, _ fill: ([UInt8], Inode?, stat, Int) -> Bool) throws {
        let dfd = dirfd(handle.stream)
        let isUniform = uniformLayout != nil
        try entries(handle, from: offset) { name, shown, entry in
            var st = stat()
            var inode: Inode? = nil
            if name == "." || name == ".." {
                st.st_ino = entry.pointee.d_ino
                st.st_mode = mode_t(entry.pointee.d_type) << 12
            } else {
                // Gone since the directory was read: leave it out, as a later readdir would.
                guard fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { return true }
                // A name that fails its binding is left out, as lookup would refuse it.
                guard (try? checkNewName(handle.inode, dfd, name, st, { mountPath(of: handle.inode, shown) })) != nil else { return true }
                // A file whose size needs its header read (the volume gave up its uniform header length since
                // this mount started offering listings with attributes) is listed without them: the kernel
                // looks it up when it needs them, and the listing reads no header.
                if !isUniform, st.st_mode & S_IFMT == S_IFREG, !inodes.hasKnownLayout(InodeKey(st)) {
                    st.st_ino = entry.pointee.d_ino
                    st.st_mode = mode_t(entry.pointee.d_type) << 12
                    return fill(shown, nil, st, telldir(handle.stream))
                }
                let i = inodes.remember(parent: handle.inode, name: name, st: st)
                present(&st, i, dfd: dfd, name: name)
                inode = i
            }
            if fill(shown, inode, st, telldir(handle.stream)) { return true }
            if let i = inode { forget(i.nodeId, count: 1) }
            return false
        }
    }

    /// Walks a directory from `offset`, handing `body` each entry's backing name, its name in the mount (kmsfs's
    /// own entries are skipped) and the entry; when `body` returns false the walk stops there, and that entry
    /// comes first at the next call.
    private func entries(_ handle: DirHandle, from offset: Int,
                         _ body: (String, [UInt8], UnsafeMutablePointer<dirent>) throws -> Bool) throws {
        if telldir(handle.stream) != offset { seekdir(handle.stream, offset) }
        while true {
            let here = telldir(handle.stream)
            errno = 0
            guard let entry = Glibc.readdir(handle.stream) else {
                if errno != 0 { throw Errno.current }
                return
            }
            let name = DirectoryEntry.name(entry)
            let shown: [UInt8]
            if name == "." || name == ".." {
                shown = Array(name.utf8)
            } else {
                guard let s = names.mountName(name, in: handle.names) else { continue }
                shown = s
            }
            if try !body(name, shown, entry) {
                seekdir(handle.stream, here)
                return
            }
        }
    }

    /// Every file of the volume keeps its own header length from now on (a new file's keys did not fit the
    /// uniform length): the config says so, and sizes are read from headers again.
    func giveUpUniformHeaderLength(because why: String) {
        let changed: Bool = uniform.withLock {
            guard $0 != nil else { return false }
            $0 = nil
            return true
        }
        guard changed else { return }
        var v = volume
        v.headerLength = nil
        do {
            if let k = volumeKeys { try v.authenticate(with: k) }
            try FileIO.writeFileAtomically(VolumeConfig.path(in: cipherDir), contents: try v.encoded(), mode: 0o644)
            Log.warning("\(why): files of this volume have different header lengths from now on, and sizes are read from headers; kmsfs rewrap makes them uniform again")
        } catch {
            Log.error("\(why), and the volume config could not be updated (\(error)): sizes are read from headers in this mount only")
        }
    }

    /// Shared mode: whether another host gave up the uniform header length (the volume config, authenticated
    /// by the volume key where there is one, no longer has one); if so this mount follows it, as if it had given
    /// it up itself. Asked when a file's header length differs from the uniform one, and at lease renewals.
    @discardableResult
    public func followUniformHeaderLength() -> Bool {
        guard shared else { return false }
        // (Followed already, by another open or a renewal.)
        if uniformLayout == nil { return true }
        guard let data = try? FileIO.readFile(VolumeConfig.path(in: cipherDir)),
              let current = try? VolumeConfig.decode(data), current.volumeId == volume.volumeId,
              current.headerLength == nil else { return false }
        if let k = volumeKeys {
            guard (try? current.checkAuthenticity(with: k)) != nil else { return false }
        }
        let changed: Bool = uniform.withLock {
            guard $0 != nil else { return false }
            $0 = nil
            return true
        }
        if changed {
            Log.warning("another host gave up the volume's uniform header length: files of this volume have different header lengths from now on, and sizes are read from headers")
        }
        return true
    }

    func fsyncdir(_ handle: DirHandle, _ datasync: Bool) throws {
        let fd = dirfd(handle.stream)
        try syscall { datasync ? fdatasync(fd) : Glibc.fsync(fd) }
    }

    // MARK: - helpers

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
/// Largest extended attribute value Linux stores (XATTR_SIZE_MAX).
let XATTR_SIZE_MAX_VALUE: Int32 = 65536
