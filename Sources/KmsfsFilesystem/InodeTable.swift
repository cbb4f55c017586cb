import Glibc
import KmsfsFormat
import KmsfsSystem

/// A backing node the kernel holds a reference to.
///
/// An inode keeps no descriptor of its own: it knows where it is (its parent inode and its backing name in
/// it), and every call reaches it through a descriptor of its parent directory (`InodeTable.withDirectory`),
/// so the number of files the kernel knows is not bounded by the open-file limit. Hard links resolve to one
/// `Inode` (by backing device and inode number), so the kernel sees one inode with one size and one page cache
/// for all their names.
final class Inode: @unchecked Sendable {
    /// The backing node's identity. It changes only for a symbolic link stored again under a new name (see
    /// `InodeTable.relinked`; read a link's key with `InodeTable.key(of:)`).
    fileprivate(set) var key: InodeKey
    let type: mode_t

    /// FUSE node ID: the object's address (kept alive by the table while the kernel knows it); 1 for the root.
    var nodeId: UInt64 {
        isRoot ? InodeTable.rootNodeId : UInt64(UInt(bitPattern: Unmanaged.passUnretained(self).toOpaque()))
    }
    fileprivate var isRoot = false

    // Guarded by the table's lock. (Kept small: the table holds one of these per file the kernel knows.)
    fileprivate var lookups: UInt64 = 0
    /// Where the node is: its parent directory and its backing name there (nil parent: the root, or a node
    /// whose last known name is gone, reachable only through its open files).
    fileprivate var parent: Inode?
    fileprivate var name: String
    /// Further names of a hard-linked file that the kernel looked up (rare; nil for almost every inode).
    fileprivate var otherLinks: [Link]?
    /// Directories: an O_PATH descriptor, while cached (-1 otherwise), and the number of callers using it.
    fileprivate var dirFd: Int32 = -1
    fileprivate var dirFdUsers: Int32 = 0
    fileprivate var dirFdReferenced = false
    /// Looked up since the last sweep (see `InodeTable.sweep`).
    fileprivate var referenced = true
    /// Directories of a volume with encrypted names: the directory's ID, once read (it never changes).
    fileprivate var directoryId: [UInt8]?

    /// What the header prefix says about the plaintext layout (regular files), learned once: the header
    /// length of a backing file never changes while it is mounted. Guarded by the table's lock; packed as
    /// header length and log2(chunk size) (its top bit: the layout marks empty files), 0 while unknown, UInt32.max
    /// for a foreign file.
    fileprivate var packedHeaderLength: UInt32 = 0
    fileprivate var chunkShift: UInt8 = 0

    fileprivate var layoutState: Layout {
        get {
            switch packedHeaderLength {
            case 0: return .unknown
            case UInt32.max: return .foreign
            default:
                return .known(ChunkLayout(headerLength: Int(packedHeaderLength), chunkSize: 1 << Int(chunkShift & 0x7f),
                                          marksEmptyFile: chunkShift & 0x80 != 0))
            }
        }
        set {
            switch newValue {
            case .unknown: packedHeaderLength = 0
            case .foreign: packedHeaderLength = UInt32.max
            case .known(let l):
                packedHeaderLength = UInt32(l.headerLength)
                chunkShift = UInt8(l.chunkSize.trailingZeroBitCount) | (l.marksEmptyFile ? 0x80 : 0)
            }
        }
    }

    enum Layout {
        case unknown
        case known(ChunkLayout)
        /// Not a kmsfs file (or unreadable): reported with size 0.
        case foreign
    }

    struct Link {
        let parent: Inode
        let name: String
    }

    fileprivate init(key: InodeKey, type: mode_t, parent: Inode?, name: String) {
        self.key = key
        self.type = type
        self.parent = parent
        self.name = name
    }
}

/// The inodes the kernel knows, by node ID and by backing identity, and a bounded cache of directory
/// descriptors through which every backing call is made.
///
/// Directory descriptors are opened one path component at a time from the nearest cached ancestor, with
/// O_NOFOLLOW, so a symbolic link planted in the backing directory is never followed out of it. At most
/// `maxCachedDirectories` stay open; a descriptor in use is never closed under its user.
final class InodeTable: @unchecked Sendable {
    static let rootNodeId: UInt64 = 1

    let root: Inode
    let rootFd: Int32
    let maxCachedDirectories: Int
    private let lock = Lock()
    private var byKey: [InodeKey: Inode] = [:]
    /// Directories whose descriptor is cached, swept by a clock hand for eviction.
    private var cached: [Inode] = []
    private var hand = 0
    /// Signalled when the table grows well past the sweep limit (see `waitForPressure`).
    private let pressure = Condition()
    /// A quarter over the sweep limit (unknown until the first sweep).
    private var pressureThreshold = Int.max

    /// `rootFd`: an O_PATH descriptor of the backing directory, which the table takes over.
    init(rootFd: Int32, maxCachedDirectories: Int) throws {
        var st = stat()
        try syscall { fstat(rootFd, &st) }
        self.rootFd = rootFd
        root = Inode(key: InodeKey(st), type: S_IFDIR, parent: nil, name: "")
        root.isRoot = true
        root.dirFd = rootFd
        self.maxCachedDirectories = max(4, maxCachedDirectories)
    }

    deinit {
        for d in cached where d.dirFd >= 0 { close(d.dirFd) }
        close(rootFd)
    }

    /// The inode of a node ID the kernel sent.
    func get(_ nodeId: UInt64) -> Inode {
        if nodeId == InodeTable.rootNodeId { return root }
        return Unmanaged<Inode>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(nodeId))!).takeUnretainedValue()
    }

    /// Whether the node `key` is known under a name other than `name` of `parent` (and not under that one): a
    /// name a known node has not been seen with, whose binding must be checked before it is taken.
    func isKnownElsewhere(_ key: InodeKey, parent: Inode, name: String) -> Bool {
        lock.withLock {
            guard let known = byKey[key], known !== root else { return false }
            if known.parent === parent && known.name == name { return false }
            return !(known.otherLinks ?? []).contains { $0.parent === parent && $0.name == name }
        }
    }

    /// Every name under which `inode` was looked up and is still recorded.
    func names(of inode: Inode) -> [(parent: Inode, name: String)] {
        lock.withLock {
            // Only names in directories the kernel still knows: a record in a forgotten one may be stale.
            var all: [(parent: Inode, name: String)] = []
            if let p = inode.parent, isLive(p) { all.append((p, inode.name)) }
            for l in inode.otherLinks ?? [] where isLive(l.parent) { all.append((l.parent, l.name)) }
            return all
        }
    }

    /// Records one kernel lookup of entry `name` of `parent`, whose attributes are `st`.
    func remember(parent: Inode, name: String, st: stat) -> Inode {
        let key = InodeKey(st)
        return lock.withLock {
            if key == root.key { return root }
            if let known = byKey[key] {
                known.lookups += 1
                known.referenced = true
                if known.parent == nil || !isLive(known.parent!) {
                    // No name left, or the directory it was found in has been forgotten since (a hard link
                    // reached through another directory): this name is where it is now.
                    known.parent = parent
                    known.name = name
                } else if !(known.parent === parent && known.name == name) && st.st_nlink > 1 {
                    // Another name of a hard-linked file: remember it, so the inode stays reachable when the
                    // name it was first found under is removed.
                    if !(known.otherLinks ?? []).contains(where: { $0.parent === parent && $0.name == name }) {
                        known.otherLinks = (known.otherLinks ?? []) + [Inode.Link(parent: parent, name: name)]
                    }
                }
                return known
            }
            let inode = Inode(key: key, type: st.st_mode & S_IFMT, parent: parent, name: name)
            inode.lookups = 1
            byKey[key] = inode
            if byKey.count > pressureThreshold { pressure.signal() }
            return inode
        }
    }

    /// The kernel dropped `count` lookups of a node; the last one releases it.
    func forget(_ nodeId: UInt64, count: UInt64) {
        if nodeId == InodeTable.rootNodeId { return }
        let inode = get(nodeId)
        lock.withLock {
            inode.lookups -= min(count, inode.lookups)
            guard inode.lookups == 0 else { return }
            if byKey[inode.key] === inode { byKey[inode.key] = nil }
            inode.parent = nil
            inode.otherLinks = nil
            if inode.dirFd >= 0 && inode.dirFdUsers == 0 { dropDirFd(inode) }
        }
    }

    /// Inodes the kernel should forget so that the table shrinks back below `limit`: entries not looked up since
    /// the previous sweep (second chance), least recently used first, as (parent node ID, backing name). The
    /// caller asks the kernel to drop those entries (outside any lock); their FORGET then frees them.
    func sweep(limit: Int) -> [(parent: Inode, name: String, key: InodeKey)] {
        lock.withLock {
            pressureThreshold = limit > Int.max / 2 ? Int.max : limit + limit / 4
            // A dictionary keeps the capacity of its largest size: after a burst has been forgotten, copy it
            // into one sized for what is left.
            if byKey.count < byKey.capacity / 4 && byKey.capacity > 4 * limit {
                var compact = [InodeKey: Inode](minimumCapacity: byKey.count * 2)
                for (k, v) in byKey { compact[k] = v }
                byKey = compact
            }
            guard byKey.count > limit else { return [] }
            // Down to seven eighths of the limit, so sweeps do not run for every new file.
            let excess = byKey.count - limit * 7 / 8
            var victims: [(Inode, String, InodeKey)] = []
            for inode in byKey.values {
                if inode.referenced {
                    inode.referenced = false
                    continue
                }
                guard let p = inode.parent, inode.dirFdUsers == 0 else { continue }
                victims.append((p, inode.name, inode.key))
                if victims.count >= excess { break }
            }
            return victims
        }
    }

    /// Waits until the table has grown well past the sweep limit, or `seconds` have passed.
    func waitForPressure(seconds: Double) {
        pressure.withLock { pressure.wait(seconds: seconds) }
    }

    /// The inode behind a backing identity, if the kernel knows it.
    func known(_ key: InodeKey) -> Inode? {
        lock.withLock { byKey[key] }
    }

    var count: Int { lock.withLock { byKey.count } }
    var cachedDirectoryCount: Int { lock.withLock { cached.count } }

    // MARK: - where nodes are

    /// The parent and backing name through which `inode` is reached, or nil if it has no known name left.
    func location(of inode: Inode) -> (parent: Inode, name: String)? {
        lock.withLock { liveLocation(inode) }
    }

    /// True while the kernel knows `dir` (its inode is the table's for its identity). Called with the lock held.
    private func isLive(_ dir: Inode) -> Bool {
        dir === root || (dir.lookups > 0 && byKey[dir.key] === dir)
    }

    /// The inode's location in a directory the kernel still knows: its recorded one, else another name of a
    /// hard-linked file, which then becomes its recorded one. Called with the lock held.
    private func liveLocation(_ inode: Inode) -> (parent: Inode, name: String)? {
        if let p = inode.parent, isLive(p) { return (p, inode.name) }
        if let i = inode.otherLinks?.firstIndex(where: { isLive($0.parent) }) {
            let link = inode.otherLinks!.remove(at: i)
            if inode.otherLinks!.isEmpty { inode.otherLinks = nil }
            inode.parent = link.parent
            inode.name = link.name
            return (link.parent, link.name)
        }
        return inode.parent.map { ($0, inode.name) }
    }

    /// The backing path of `inode` relative to the backing root ("a/b/c"; "" for the root), if it has one.
    func backingPath(of inode: Inode) -> String? {
        chain(of: inode).map { $0.map(\.name).joined(separator: "/") }
    }

    /// The directories and backing names from the root down to `inode` (empty for the root), if it has a name.
    func chain(of inode: Inode) -> [(parent: Inode, name: String)]? {
        lock.withLock {
            var parts: [(parent: Inode, name: String)] = []
            var node = inode
            while node !== root {
                guard let (p, name) = liveLocation(node) else { return nil }
                parts.append((p, name))
                node = p
            }
            return parts.reversed()
        }
    }

    /// A directory's ID, if read already.
    func directoryId(of dir: Inode) -> [UInt8]? {
        lock.withLock { dir.directoryId }
    }

    func setDirectoryId(_ id: [UInt8], of dir: Inode) {
        lock.withLock { dir.directoryId = id }
    }

    /// A name was removed from `parent` (unlink, rmdir, or replaced by a rename); `key` is what it named.
    func removed(_ key: InodeKey, from parent: Inode, name: String) {
        lock.withLock {
            guard let inode = byKey[key] else { return }
            if inode.parent === parent && inode.name == name {
                if let next = inode.otherLinks?.first {
                    inode.parent = next.parent
                    inode.name = next.name
                    inode.otherLinks!.removeFirst()
                    if inode.otherLinks!.isEmpty { inode.otherLinks = nil }
                } else {
                    inode.parent = nil
                }
            } else {
                inode.otherLinks?.removeAll { $0.parent === parent && $0.name == name }
            }
            if inode.type == S_IFDIR && inode.parent == nil && inode.dirFdUsers == 0 && inode.dirFd >= 0 { dropDirFd(inode) }
        }
    }

    /// A symbolic link moved from `parent`/`name` by storing it again as `newParent`/`newName` (a new backing
    /// node, `new`): in one step, its inode is there and stands for the new node, so the kernel's reference
    /// keeps working.
    func relinked(_ old: InodeKey, to new: InodeKey, from parent: Inode, name: String, to newParent: Inode, newName: String) {
        lock.withLock {
            guard let inode = byKey[old] else { return }
            move(inode, from: parent, name: name, to: newParent, newName: newName)
            guard byKey[new] == nil, inode.type == S_IFLNK, inode.otherLinks == nil else {
                Log.warning("a renamed symbolic link's new node is known already: its old inode gives ESTALE until the kernel forgets it")
                return
            }
            byKey[old] = nil
            inode.key = new
            byKey[new] = inode
        }
    }

    /// The key of `inode`, read under the lock (a symbolic link's can change).
    func key(of inode: Inode) -> InodeKey {
        lock.withLock { inode.key }
    }

    /// An entry moved from `parent`/`name` to `newParent`/`newName`; `key` is what it names.
    func moved(_ key: InodeKey, from parent: Inode, name: String, to newParent: Inode, newName: String) {
        lock.withLock {
            guard let inode = byKey[key] else { return }
            move(inode, from: parent, name: name, to: newParent, newName: newName)
        }
    }

    /// Called with the lock held.
    private func move(_ inode: Inode, from parent: Inode, name: String, to newParent: Inode, newName: String) {
        if inode.parent === parent && inode.name == name {
            inode.parent = newParent
            inode.name = newName
        } else if let i = inode.otherLinks?.firstIndex(where: { $0.parent === parent && $0.name == name }) {
            inode.otherLinks![i] = Inode.Link(parent: newParent, name: newName)
        }
    }

    // MARK: - layouts

    func layout(of inode: Inode) -> Inode.Layout {
        lock.withLock { inode.layoutState }
    }

    /// Whether the node of `key`, if the table has it, has its layout known (its header prefix was read).
    func hasKnownLayout(_ key: InodeKey) -> Bool {
        lock.withLock {
            guard let inode = byKey[key], case .known = inode.layoutState else { return false }
            return true
        }
    }

    func setLayout(_ layout: Inode.Layout, of inode: Inode) {
        lock.withLock { inode.layoutState = layout }
    }

    // MARK: - directory descriptors

    /// Runs `body` with an O_PATH descriptor of directory `dir`, opening it (and its uncached ancestors) if
    /// needed. The descriptor is valid only during `body`.
    func withDirectory<R>(_ dir: Inode, _ body: (Int32) throws -> R) throws -> R {
        let fd = try acquireDirFd(dir)
        defer { releaseDirFd(dir) }
        return try body(fd)
    }

    /// Runs `body` with a descriptor of the parent directory of `inode` and its backing name there.
    /// Throws ENOENT when the node has no name left (it was removed; only its open files still reach it).
    func withLocation<R>(_ inode: Inode, _ body: (Int32, String) throws -> R) throws -> R {
        guard let (parent, name) = location(of: inode) else { throw Errno.ENOENT }
        return try withDirectory(parent) { try body($0, name) }
    }

    private func acquireDirFd(_ dir: Inode) throws -> Int32 {
        // Fast path: cached.
        let cachedFd: Int32? = lock.withLock {
            guard dir.dirFd >= 0 else { return nil }
            dir.dirFdUsers += 1
            dir.dirFdReferenced = true
            return dir.dirFd
        }
        if let fd = cachedFd { return fd }
        guard let (parent, name) = location(of: dir) else { throw Errno.ENOENT }
        let fd = try withDirectory(parent) { pfd in
            try syscall { openat(pfd, name, O_PATH_FLAG | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        }
        // The name may have been given to another directory since the location was read (renamed away, and
        // a new one made in its place): only this directory's own descriptor may be cached for it.
        var st = stat()
        guard fstat(fd, &st) == 0, InodeKey(st) == dir.key else {
            close(fd)
            throw Errno(ESTALE)
        }
        return lock.withLock {
            dir.dirFdUsers += 1
            dir.dirFdReferenced = true
            if dir.dirFd >= 0 {
                // Another thread opened it meanwhile.
                close(fd)
            } else {
                dir.dirFd = fd
                if dir !== root {
                    cached.append(dir)
                    evictIfNeeded()
                }
            }
            return dir.dirFd
        }
    }

    private func releaseDirFd(_ dir: Inode) {
        lock.withLock {
            dir.dirFdUsers -= 1
            if dir.dirFdUsers == 0 && dir.dirFd >= 0 && dir !== root && (dir.lookups == 0 || dir.parent == nil || cached.count > maxCachedDirectories) {
                dropDirFd(dir)
            }
        }
    }

    /// Closes descriptors past the bound, least recently used first (clock algorithm). Called with the lock held.
    private func evictIfNeeded() {
        var scanned = 0
        while cached.count > maxCachedDirectories && scanned < 2 * cached.count {
            if hand >= cached.count { hand = 0 }
            let d = cached[hand]
            if d.dirFdReferenced || d.dirFdUsers > 0 {
                d.dirFdReferenced = false
                hand += 1
            } else {
                dropDirFd(d)
            }
            scanned += 1
        }
    }

    /// Closes a cached directory descriptor nobody is using. Called with the lock held.
    private func dropDirFd(_ dir: Inode) {
        guard dir !== root, dir.dirFd >= 0 else { return }
        close(dir.dirFd)
        dir.dirFd = -1
        if let i = cached.firstIndex(where: { $0 === dir }) {
            cached.remove(at: i)
            if hand > i { hand -= 1 }
        }
    }
}
