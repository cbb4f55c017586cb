import CLibCrypto
import CSystem
import Glibc
import Synchronization

/// Why key memory could not be provided.
public enum SecureMemoryError: Error, CustomStringConvertible {
    case allocationFailed(errno: Int32)
    case lockFailed(errno: Int32)

    public var description: String {
        switch self {
        case .allocationFailed(let e): return "cannot allocate key memory: \(String(cString: strerror(e)))"
        case .lockFailed(let e):
            return "cannot lock key memory in RAM (mlock: \(String(cString: strerror(e)))); raise RLIMIT_MEMLOCK"
        }
    }
}

/// A pool of locked, never-dumped pages cut into fixed-size slots for key material.
///
/// Keys are small (32 bytes) and many files may be open at once, so locking one page per key would exhaust
/// RLIMIT_MEMLOCK quickly. The arena locks whole pages once (`mlock`, `MADV_DONTDUMP`) and hands out 64-byte
/// slots; a released slot is wiped before it returns to the free list. Requests larger than a slot get pages of
/// their own, wiped and unmapped on release.
final class SecureArena: Sendable {
    static let shared = SecureArena()
    static let slotSize = 64

    private struct State {
        var freeSlots: [UInt] = []  // slot addresses (plain integers keep the state Sendable)
    }
    private let state = Mutex(State())
    private let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    /// Returns zeroed, locked memory of at least `count` bytes.
    func allocate(count: Int) throws -> UnsafeMutableRawPointer {
        if count > SecureArena.slotSize {
            return try mapLockedPages(byteCount: roundToPages(count))
        }
        if let slot = state.withLock({ $0.freeSlots.popLast() }) { return UnsafeMutableRawPointer(bitPattern: slot)! }
        let page = try mapLockedPages(byteCount: pageSize)
        let slots = pageSize / SecureArena.slotSize
        state.withLock { st in
            let first = UInt(bitPattern: page)
            for i in 1..<slots { st.freeSlots.append(first + UInt(i * SecureArena.slotSize)) }
        }
        return page
    }

    /// Wipes and returns memory obtained from `allocate(count:)` with the same `count`.
    func release(_ pointer: UnsafeMutableRawPointer, count: Int) {
        if count > SecureArena.slotSize {
            let length = roundToPages(count)
            OPENSSL_cleanse(pointer, length)
            munlock(pointer, length)
            munmap(pointer, length)
            return
        }
        OPENSSL_cleanse(pointer, SecureArena.slotSize)
        let address = UInt(bitPattern: pointer)
        state.withLock { $0.freeSlots.append(address) }
    }

    private func roundToPages(_ n: Int) -> Int { (n + pageSize - 1) / pageSize * pageSize }

    private func mapLockedPages(byteCount: Int) throws -> UnsafeMutableRawPointer {
        guard let p = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              p != MAP_FAILED else {
            throw SecureMemoryError.allocationFailed(errno: kmsfs_errno())
        }
        if mlock(p, byteCount) != 0 {
            let e = kmsfs_errno()
            munmap(p, byteCount)
            throw SecureMemoryError.lockFailed(errno: e)
        }
        _ = kmsfs_madvise_dontdump(p, byteCount)
        return p
    }
}

/// Secret bytes (data keys, derived keys, master keys) in locked memory that is wiped with
/// `OPENSSL_cleanse` when the object is released or `wipe()` is called.
///
/// Never convert the contents into an Array, String or Data: those live in ordinary, swappable memory
/// and are not wiped. Work on the bytes in place through `withUnsafeBytes`.
public final class SecureBytes: @unchecked Sendable {
    public let count: Int
    private let base: UnsafeMutableRawPointer
    // Immutable after initialization apart from wiping; concurrent readers are safe.

    /// Zero-filled secret buffer of `count` bytes.
    public init(count: Int) throws {
        precondition(count > 0, "empty secret")
        self.count = count
        self.base = try SecureArena.shared.allocate(count: count)
    }

    /// `count` bytes from the CSPRNG.
    public static func random(count: Int) throws -> SecureBytes {
        let s = try SecureBytes(count: count)
        try SecureRandom.fill(UnsafeMutableRawBufferPointer(start: s.base, count: count))
        return s
    }

    /// A secret copied from another raw buffer (the caller wipes the source).
    public convenience init(copying source: UnsafeRawBufferPointer) throws {
        try self.init(count: source.count)
        base.copyMemory(from: source.baseAddress!, byteCount: source.count)
    }

    deinit {
        SecureArena.shared.release(base, count: count)
    }

    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeMutableRawBufferPointer(start: base, count: count))
    }

    /// Overwrites the secret with zeros now (it is wiped again on release).
    public func wipe() { OPENSSL_cleanse(base, count) }

    /// Constant-time comparison with another secret.
    public func constantTimeEquals(_ other: SecureBytes) -> Bool {
        count == other.count && CRYPTO_memcmp(base, other.base, count) == 0
    }
}
