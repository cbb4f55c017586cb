import Glibc

/// A mutual-exclusion lock (pthread mutex on the heap, so its address never moves).
public final class Lock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

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

    public func readLock() { pthread_rwlock_rdlock(rw) }
    public func writeLock() { pthread_rwlock_wrlock(rw) }
    public func unlock() { pthread_rwlock_unlock(rw) }
}
