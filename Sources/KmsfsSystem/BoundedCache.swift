import Synchronization

/// A dictionary of at most `capacity` entries, safe across threads, for results that are costly to compute and
/// never go stale (a pure function of the key). When full, it is emptied and fills again: no bookkeeping on a
/// hit. Never for secrets: entries are not wiped. Inlinable, so that users in other modules get it specialized
/// (it sits on the lookup path).
public final class BoundedCache<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    public let capacity: Int
    @usableFromInline let entries = Mutex<[Key: Value]>([:])

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    @inlinable
    public subscript(key: Key) -> Value? {
        get { entries.withLock { $0[key] } }
        set {
            entries.withLock {
                if newValue != nil && $0[key] == nil && $0.count >= capacity { $0.removeAll(keepingCapacity: true) }
                $0[key] = newValue
            }
        }
    }
}
