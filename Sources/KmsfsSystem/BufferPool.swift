import Glibc

/// Scratch buffers for requests (a chunk being read back, a write's sealed chunks, a read reply, a header),
/// reused from short free lists instead of malloc.
///
/// Transient buffers of a few KiB, freed between long-lived small objects (the inode of each new file), fragment
/// malloc's heap: after 10,000 file creations it held 37 MiB in 4 KiB holes it could neither reuse nor hand back.
/// So these buffers come from mappings of their own, in two sizes: one chunk-sized class (64 KiB) and one that
/// holds a maximal FUSE request with the overhead of its chunks (1.25 MiB). Up to `keepMedium` and `keepLarge`
/// of them wait for the next request; larger requests get a mapping of their own.
public final class BufferPool: @unchecked Sendable {
    public static let shared = BufferPool(keepMedium: 32, keepLarge: 4)

    public static let mediumSize = 64 << 10
    public static let largeSize = 1_310_720

    private let lock = Lock()
    private var medium: [UnsafeMutableRawPointer] = []
    private var large: [UnsafeMutableRawPointer] = []
    private let keepMedium: Int
    private let keepLarge: Int

    public init(keepMedium: Int, keepLarge: Int) {
        self.keepMedium = keepMedium
        self.keepLarge = keepLarge
    }

    /// Runs `body` with a buffer of at least `size` bytes (uninitialized), valid only during `body`.
    public func withBuffer<R>(_ size: Int, _ body: (UnsafeMutableRawPointer) throws -> R) throws -> R {
        let p = try acquire(size)
        defer { release(p, size) }
        return try body(p)
    }

    /// A buffer of at least `size` bytes (uninitialized); give it back with `release(_:_:)` and the same size.
    public func acquire(_ size: Int) throws -> UnsafeMutableRawPointer {
        let length = BufferPool.mappedLength(size)
        if length == BufferPool.mediumSize, let p = lock.withLock({ medium.popLast() }) { return p }
        if length == BufferPool.largeSize, let p = lock.withLock({ large.popLast() }) { return p }
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != MAP_FAILED else { throw Errno.ENOMEM }
        return p
    }

    public func release(_ p: UnsafeMutableRawPointer, _ size: Int) {
        let length = BufferPool.mappedLength(size)
        let kept = lock.withLock { () -> Bool in
            if length == BufferPool.mediumSize && medium.count < keepMedium {
                medium.append(p)
                return true
            }
            if length == BufferPool.largeSize && large.count < keepLarge {
                large.append(p)
                return true
            }
            return false
        }
        if !kept { munmap(p, length) }
    }

    private static func mappedLength(_ size: Int) -> Int {
        if size <= mediumSize { return mediumSize }
        if size <= largeSize { return largeSize }
        let page = 4096
        return (size + page - 1) / page * page
    }
}
