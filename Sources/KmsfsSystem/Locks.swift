import Glibc

/// A mutual-exclusion lock (pthread mutex on the heap, so its address never moves).
public final class Lock: @unchecked Sendable {
    fileprivate let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    @inlinable
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A readers-writer lock: many readers or one writer.
public final class ReadWriteLock: @unchecked Sendable {
    private let rw: UnsafeMutablePointer<pthread_rwlock_t>

    public init() {
        rw = .allocate(capacity: 1)
        // Prefer writers so a stream of reads cannot starve a write.
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(rw, &attr)
        pthread_rwlockattr_destroy(&attr)
    }

    deinit {
        pthread_rwlock_destroy(rw)
        rw.deallocate()
    }

    @inlinable
    public func withReadLock<R>(_ body: () throws -> R) rethrows -> R {
        readLock()
        defer { unlock() }
        return try body()
    }

    @inlinable
    public func withWriteLock<R>(_ body: () throws -> R) rethrows -> R {
        writeLock()
        defer { unlock() }
        return try body()
    }

    /// Runs `body` under the write lock if it is free now; nil (without running it) if it is not.
    public func withWriteLockIfFree<R>(_ body: () throws -> R) rethrows -> R? {
        guard pthread_rwlock_trywrlock(rw) == 0 else { return nil }
        defer { unlock() }
        return try body()
    }

    public func readLock() { pthread_rwlock_rdlock(rw) }
    public func writeLock() { pthread_rwlock_wrlock(rw) }
    public func unlock() { pthread_rwlock_unlock(rw) }
}

/// A mutex with a condition variable: wait for a state that other threads change under the same lock.
public final class Condition: @unchecked Sendable {
    private let mutex = Lock()
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        cond = .allocate(capacity: 1)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        cond.deallocate()
    }

    public func lock() { mutex.lock() }
    public func unlock() { mutex.unlock() }

    @inlinable
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        lock()
        defer { unlock() }
        return try body()
    }

    /// Waits (with the lock held) until signalled, or at most `seconds` when given.
    public func wait(seconds: Double? = nil) {
        guard let seconds else {
            pthread_cond_wait(cond, mutex.mutex)
            return
        }
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let total = Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9 + max(0, seconds)
        ts.tv_sec = Int(total)
        ts.tv_nsec = Int((total - Double(Int(total))) * 1e9)
        pthread_cond_timedwait(cond, mutex.mutex, &ts)
    }

    public func signal() { pthread_cond_signal(cond) }
    public func broadcast() { pthread_cond_broadcast(cond) }
}

/// A counting semaphore: at most `limit` holders at once.
public final class Semaphore: @unchecked Sendable {
    private let condition = Condition()
    private var available: Int
    public let limit: Int

    public init(_ limit: Int) {
        precondition(limit > 0)
        self.limit = limit
        available = limit
    }

    public func withPermit<R>(_ body: () throws -> R) rethrows -> R {
        condition.withLock {
            while available == 0 { condition.wait() }
            available -= 1
        }
        defer {
            condition.withLock {
                available += 1
                condition.signal()
            }
        }
        return try body()
    }

    /// Like `withPermit`, but gives up (returning nil without running `body`) if no permit comes before
    /// `deadline` (monotonic seconds).
    public func withPermit<R>(until deadline: Double, _ body: () throws -> R) rethrows -> R? {
        let got: Bool = condition.withLock {
            while available == 0 {
                let left = deadline - Monotonic.seconds()
                if left <= 0 { return false }
                condition.wait(seconds: left)
            }
            available -= 1
            return true
        }
        guard got else { return nil }
        defer {
            condition.withLock {
                available += 1
                condition.signal()
            }
        }
        return try body()
    }

    /// Holders right now.
    public var inUse: Int { condition.withLock { limit - available } }
}

/// Starting plain threads for background work.
public enum BackgroundThread {
    /// Runs `body` on a new detached thread; false if no thread could be made.
    @discardableResult
    public static func start(_ body: @escaping @Sendable () -> Void) -> Bool {
        let box = Unmanaged.passRetained(Box(body))
        var thread = pthread_t()
        let r = pthread_create(&thread, nil, { raw in
            let b = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            b.body()
            return nil
        }, box.toOpaque())
        guard r == 0 else {
            box.release()
            return false
        }
        pthread_detach(thread)
        return true
    }

    private final class Box {
        let body: @Sendable () -> Void
        init(_ b: @escaping @Sendable () -> Void) { body = b }
    }
}
