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
    }

    private let lock = Lock()
    private var ops: [String: Op] = [:]

    public init() {}

    public func record(_ op: String, milliseconds: Double, failed: Bool) {
        lock.withLock {
            var o = ops[op] ?? Op()
            o.calls += 1
            if failed { o.errors += 1 }
            if o.latencies.count < CallMetrics.window {
                o.latencies.append(milliseconds)
            } else {
                o.latencies[o.next] = milliseconds
                o.next = (o.next + 1) % CallMetrics.window
            }
            ops[op] = o
        }
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
