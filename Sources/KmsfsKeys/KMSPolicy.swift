import Glibc
import KmsfsSystem

/// How kmsfs treats a key service that throttles, slows down, hangs or refuses (kmsfs(1), "When the KMS fails").
public struct KMSPolicy: Sendable, Equatable {
    /// Seconds one KMS call may take, all retries and rate-limit waits included.
    public var deadline: Double
    /// Seconds a key that refused, or an endpoint that failed, is not asked again: calls fail at once (or go to
    /// the next key) until the first call after this long, the probe, shows whether it has recovered.
    public var probeInterval: Double
    /// A fixed ceiling of KMS requests per second (0: none; the adaptive limit still applies after throttling).
    public var maxRate: Double
    /// New files need every configured key to wrap their data key (refuse the create otherwise); by default any
    /// one key that answers is enough and the missing ones are logged.
    public var requireAllKeys: Bool

    public static let defaults = KMSPolicy(deadline: 5, probeInterval: 10, maxRate: 0, requireAllKeys: false)

    public init(deadline: Double, probeInterval: Double, maxRate: Double, requireAllKeys: Bool) {
        self.deadline = deadline
        self.probeInterval = probeInterval
        self.maxRate = maxRate
        self.requireAllKeys = requireAllKeys
    }
}

/// Remembers keys that refused and endpoints that failed, so that later calls fail at once (or fall back to
/// the next key) instead of paying the same refusal or the same deadline again: a circuit breaker per key and
/// operation for refusals (disabled, denied, missing: a key policy may allow GenerateDataKey but not Decrypt),
/// and per key and endpoint for failures to reach it (an endpoint that hangs costs each key one deadline per
/// probe interval; one key that hangs, as an external key store's may, leaves the others alone). After `probeInterval` one
/// call goes through as a probe; its success closes the breaker, its failure opens it for another interval.
/// Throttling never opens it (the rate limiter handles that), nor do failures particular to one wrapped key.
public final class KeyHealth: @unchecked Sendable {
    private struct Breaker {
        var error: KeyError
        var since: Double
        var retryAt: Double
        var probing = false
    }

    private let lock = Lock()
    private var breakers: [String: Breaker] = [:]
    public let probeInterval: Double

    public init(probeInterval: Double) {
        self.probeInterval = probeInterval
    }

    /// nil when a call to `keyId` through `route` may go ahead (perhaps as the probe); otherwise the remembered
    /// failure to fail with at once.
    func admit(op: String, keyId: String, route: String) -> KeyError? {
        let now = Monotonic.seconds()
        let names = ["key \(op) " + keyId, "reach \(route) " + keyId]
        return lock.withLock {
            // Refused while any breaker of this call is open (or already probing); otherwise the call goes ahead,
            // as the probe of every breaker whose interval is over.
            for name in names {
                guard let b = breakers[name] else { continue }
                if now < b.retryAt || b.probing {
                    var e = b.error
                    e.remembered = now - b.since
                    e.retryIn = max(0, b.retryAt - now)
                    return e
                }
            }
            for name in names where breakers[name] != nil { breakers[name]!.probing = true }
            return nil
        }
    }

    func succeeded(op: String, keyId: String, route: String) {
        lock.withLock {
            if breakers.isEmpty { return }
            breakers["key \(op) " + keyId] = nil
            breakers["reach \(route) " + keyId] = nil
        }
    }

    func failed(op: String, keyId: String, route: String, error: KeyError) {
        let names = ["key \(op) " + keyId, "reach \(route) " + keyId]
        let now = Monotonic.seconds()
        lock.withLock {
            // Whatever happens, no probe of this call is in flight any more.
            for n in names where breakers[n]?.probing == true { breakers[n]!.probing = false }
            let name: String
            switch error.kind {
            case _ where error.attempts == 0: return  // no request was sent: says nothing of the key's health
            case .accessDenied, .keyUnavailable: name = names[0]
            case .unreachable where !error.isThrottling: name = names[1]
            default: return  // not a sign of the key's or the endpoint's health
            }
            let since = breakers[name].map { $0.since } ?? now
            breakers[name] = Breaker(error: error, since: since, retryAt: now + probeInterval)
        }
    }
}

/// The client-side rate limiter of the AWS SDKs' adaptive retry mode, in outline: off until the KMS throttles;
/// then a token bucket whose rate drops to 70% of the rate requests were being sent at, at most once per half
/// second, and grows back (doubling per second) while calls succeed. A fixed ceiling (`maxRate`) applies always.
final class AdaptiveRateLimiter: @unchecked Sendable {
    private let lock = Lock()
    private let ceiling: Double
    private var adaptive = false
    private var rate: Double = 0
    private var rateSetAt: Double = 0
    private var floorRate: Double = 0
    private var tokens: Double = 1
    private var refilledAt = Monotonic.seconds()
    private var lastDecrease: Double = 0
    private var lastThrottle: Double = 0
    // The measured send rate: requests per second over half-second windows, smoothed.
    private var windowStart = Monotonic.seconds()
    private var windowCount = 0
    private var measured: Double = 0
    static let minimumRate = 1.0

    init(maxRate: Double) {
        ceiling = maxRate
    }

    /// The current allowed rate (infinity when unlimited).
    var currentRate: Double { lock.withLock { effectiveRate(Monotonic.seconds()) } }

    private func effectiveRate(_ now: Double) -> Double {
        var r = Double.infinity
        if adaptive { r = floorRate + max(1, floorRate) * (now - rateSetAt) }
        if ceiling > 0 { r = min(r, ceiling) }
        return r
    }

    /// Waits for a token; false if none would come before `deadline` (monotonic seconds).
    func acquire(until deadline: Double) -> Bool {
        while true {
            let wait: Double = lock.withLock {
                let now = Monotonic.seconds()
                let r = effectiveRate(now)
                if r.isInfinite {
                    countSend(now)
                    return 0
                }
                tokens = min(max(1, r / 10), tokens + (now - refilledAt) * r)
                refilledAt = now
                if tokens >= 1 {
                    tokens -= 1
                    countSend(now)
                    return 0
                }
                return (1 - tokens) / r
            }
            if wait <= 0 { return true }
            if Monotonic.seconds() + wait > deadline { return false }
            usleep(useconds_t(min(wait, 1) * 1_000_000))
        }
    }

    private func countSend(_ now: Double) {
        windowCount += 1
        if now - windowStart >= 0.5 {
            let r = Double(windowCount) / (now - windowStart)
            measured = measured == 0 ? r : 0.8 * measured + 0.2 * r
            windowStart = now
            windowCount = 0
        }
    }

    /// The KMS said it is over its request quota.
    func throttled() {
        lock.withLock {
            let now = Monotonic.seconds()
            lastThrottle = now
            guard now - lastDecrease >= 0.5 else { return }
            let sending = max(measured, Double(windowCount) / max(0.05, now - windowStart))
            let current = adaptive ? min(effectiveRate(now), max(sending, AdaptiveRateLimiter.minimumRate)) : sending
            floorRate = max(AdaptiveRateLimiter.minimumRate, 0.7 * current)
            rateSetAt = now
            lastDecrease = now
            adaptive = true
            tokens = min(tokens, 1)
        }
    }

    /// A call went through: after a minute without throttling the adaptive limit is lifted.
    func succeeded() {
        lock.withLock {
            if adaptive && Monotonic.seconds() - lastThrottle > 60 { adaptive = false }
        }
    }
}

/// Log lines for failures that repeat: up to `burst` lines of one kind are logged in each `window` seconds; the
/// rest are counted, and the count is reported with the next line of that kind that is logged.
public final class FailureLog: @unchecked Sendable {
    private struct Kind {
        var windowStart: Double
        var logged: Int
        var suppressed: Int
    }

    private let lock = Lock()
    private var kinds: [String: Kind] = [:]
    private let window: Double
    private let burst: Int

    public static let shared = FailureLog(window: 10, burst: 5)

    public init(window: Double, burst: Int) {
        self.window = window
        self.burst = burst
    }

    /// Logs `message` at `level` unless `burst` lines of the same `kind` were logged in the current window.
    public func log(_ level: LogLevel, kind: String, _ message: String, event: String = "message", fields: [String: String] = [:]) {
        let now = Monotonic.seconds()
        let line: String? = lock.withLock {
            var k = kinds[kind] ?? Kind(windowStart: now, logged: 0, suppressed: 0)
            if now - k.windowStart >= window {
                k.windowStart = now
                k.logged = 0
            }
            guard k.logged < burst else {
                k.suppressed += 1
                kinds[kind] = k
                return nil
            }
            let suppressed = k.suppressed
            k.logged += 1
            k.suppressed = 0
            kinds[kind] = k
            if kinds.count > 1000 { kinds = kinds.filter { now - $0.value.windowStart < window } }
            return suppressed > 0 ? "\(message) (and \(suppressed) more like it not logged)" : message
        }
        if let line { Log.shared.log(level, line, event: event, fields: fields) }
    }

    /// Logs how many lines of each kind were left out and not yet reported (at unmount).
    public func flush() {
        let counts: [(String, Int)] = lock.withLock {
            let pending = kinds.filter { $0.value.suppressed > 0 }.map { ($0.key, $0.value.suppressed) }
            for (k, _) in pending { kinds[k]?.suppressed = 0 }
            return pending
        }
        for (kind, n) in counts.sorted(by: { $0.0 < $1.0 }) {
            Log.shared.log(.warning, "\(n) more failure line\(n == 1 ? "" : "s") of kind \(kind) were not logged")
        }
    }
}

/// The attempts of the provider call this thread is making: KMSClient notes each retried attempt, KeyService
/// writes them into the call's audit line.
final class CallAttempts {
    var attempts = 0
    var retried: [String] = []
    /// When the operation this call is part of must be done (monotonic seconds), if sooner than the call's own
    /// deadline: the KMS client stops retrying then.
    var deadline: Double?

    private static let key: pthread_key_t = {
        var k = pthread_key_t()
        pthread_key_create(&k) { p in if let p { Unmanaged<CallAttempts>.fromOpaque(p).release() } }
        return k
    }()

    /// This thread's record.
    static var current: CallAttempts {
        if let p = pthread_getspecific(key) { return Unmanaged<CallAttempts>.fromOpaque(p).takeUnretainedValue() }
        let c = CallAttempts()
        pthread_setspecific(key, Unmanaged.passRetained(c).toOpaque())
        return c
    }

    func reset() {
        attempts = 0
        retried.removeAll(keepingCapacity: true)
    }
}

/// The time one key service operation may take across its keys (a create's GenerateDataKey and Encrypt calls, an
/// open's Decrypt fallbacks): the policy's deadline, so that a hung KMS never holds a create (and the directory
/// the kernel locks for it) or an open longer than that. Each key gets an equal share of what is left when its
/// turn comes, the last one all of it: a hung first key leaves the second half the time, not none.
struct OperationBudget {
    let end: Double

    init(seconds: Double) {
        end = Monotonic.seconds() + seconds
    }

    /// The deadline for the calls of key `index` of `count`.
    func deadline(forKey index: Int, of count: Int) -> Double {
        let now = Monotonic.seconds()
        let left = max(0, end - now)
        return now + left / Double(max(1, count - index))
    }
}
