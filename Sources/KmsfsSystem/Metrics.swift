import Synchronization

/// What a mount counts for `kmsfs status` (one mount per daemon process): plaintext bytes read and written
/// through the mount, and chunks that failed authentication. Counters only; never key material.
public enum MountCounters {
    public static let bytesRead = Atomic<Int>(0)
    public static let bytesWritten = Atomic<Int>(0)
    public static let corruptChunks = Atomic<Int>(0)
    /// Monotonic milliseconds when the mount started (`markStarted`).
    private static let startedMs = Atomic<Int>(0)

    public static func markStarted() { startedMs.store(Int(Monotonic.seconds() * 1000), ordering: .relaxed) }

    public static var uptimeSeconds: Double { Monotonic.seconds() - Double(startedMs.load(ordering: .relaxed)) / 1000 }
}

/// Calls to a key service per operation: how many, how many failed, and the latency of the most recent ones
/// (a window of `window` calls per operation) for percentiles.
public final class CallMetrics: @unchecked Sendable {
    public static let window = 2048

    public struct Summary: Sendable {
        public let calls: Int
        public let errors: Int
        /// Milliseconds, over the window; nil before any call.
        public let p50: Double?
        public let p99: Double?
    }

    private struct Op {
        var calls = 0
        var errors = 0
        var latencies: [Double] = []
        var next = 0

        mutating func record(_ milliseconds: Double, failed: Bool) {
            calls += 1
            if failed { errors += 1 }
            if latencies.count < CallMetrics.window {
                latencies.append(milliseconds)
            } else {
                latencies[next] = milliseconds
                next = (next + 1) % CallMetrics.window
            }
        }
    }

    private let lock = Lock()
    private var ops: [String: Op] = [:]

    public init() {}

    public func record(_ op: String, milliseconds: Double, failed: Bool) {
        // In place: a copy of the entry taken out and stored back would copy its window on every call.
        lock.withLock { ops[op, default: Op()].record(milliseconds, failed: failed) }
    }

    public var summaries: [String: Summary] {
        let copy = lock.withLock { ops }
        return copy.mapValues { o in
            let sorted = o.latencies.sorted()
            // The nearest-rank percentile: the smallest latency at or above which a fraction q of the window lies.
            func quantile(_ q: Double) -> Double? {
                guard !sorted.isEmpty else { return nil }
                let rank = Int((q * Double(sorted.count)).rounded(.up))
                return sorted[min(sorted.count - 1, max(0, rank - 1))]
            }
            return Summary(calls: o.calls, errors: o.errors, p50: quantile(0.5), p99: quantile(0.99))
        }
    }
}
