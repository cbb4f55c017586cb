import Glibc
import KmsfsFormat
import KmsfsSystem

/// A backing node the kernel holds a reference to: an O_PATH descriptor of it, its identity, and the number
/// of lookups the kernel has not yet forgotten. Hard links resolve to one `Inode`, so the kernel sees one
/// inode with one size and one page cache for all their names.
final class Inode: @unchecked Sendable {
    let fd: Int32
    let key: InodeKey
    let type: mode_t

    /// FUSE node ID: the object's address (kept alive by the table while the kernel knows it); 1 for the root.
    fileprivate(set) var nodeId: UInt64 = 0
    fileprivate var lookups: UInt64 = 0

    /// What the header prefix says about the plaintext layout, learned once (the header length of a backing
    /// file never changes while it is mounted).
    enum Layout {
        case unknown
        case known(ChunkLayout)
        /// Not a kmsfs file (or unreadable): reported with size 0.
        case foreign
    }
    private let layoutLock = Lock()
    private var layoutState: Layout = .unknown

    init(fd: Int32, st: stat) {
        self.fd = fd
        key = InodeKey(st)
        type = st.st_mode & S_IFMT
    }

    deinit { close(fd) }

    /// "/proc/self/fd/N": a path to exactly this node, for calls that have no *at form or need to reopen it.
    var procPath: String { "/proc/self/fd/\(fd)" }

    var layout: Layout {
        get { layoutLock.withLock { layoutState } }
        set { layoutLock.withLock { layoutState = newValue } }
    }
}

/// The inodes the kernel knows, by node ID and by backing identity.
final class InodeTable: @unchecked Sendable {
    static let rootNodeId: UInt64 = 1

    let root: Inode
    private let lock = Lock()
    private var byKey: [InodeKey: Inode] = [:]

    init(rootFd: Int32) throws {
        var st = stat()
        try syscall { fstat(rootFd, &st) }
        root = Inode(fd: rootFd, st: st)
        root.nodeId = InodeTable.rootNodeId
    }

    /// The inode of a node ID the kernel sent.
    func get(_ nodeId: UInt64) -> Inode {
        if nodeId == InodeTable.rootNodeId { return root }
        return Unmanaged<Inode>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(nodeId))!).takeUnretainedValue()
    }

    /// Records one kernel lookup of the node behind the O_PATH descriptor `fd` (which the table takes over:
    /// it is closed if the node is already known).
    func remember(fd: Int32, st: stat) -> Inode {
        let key = InodeKey(st)
        return lock.withLock {
            if key == root.key {
                close(fd)
                return root
            }
            if let known = byKey[key] {
                close(fd)
                known.lookups += 1
                return known
            }
            let inode = Inode(fd: fd, st: st)
            inode.nodeId = UInt64(UInt(bitPattern: Unmanaged.passUnretained(inode).toOpaque()))
            inode.lookups = 1
            byKey[key] = inode
            return inode
        }
    }

    /// The kernel dropped `count` lookups of a node; the last one releases it.
    func forget(_ nodeId: UInt64, count: UInt64) {
        if nodeId == InodeTable.rootNodeId { return }
        let inode = get(nodeId)
        lock.withLock {
            inode.lookups -= min(count, inode.lookups)
            if inode.lookups == 0 && byKey[inode.key] === inode { byKey[inode.key] = nil }
        }
    }

    var count: Int { lock.withLock { byKey.count } }
}
