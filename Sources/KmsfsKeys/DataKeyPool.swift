import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// Data keys made ahead for files not yet created, so that creating a file does not wait for the KMS.
///
/// Each key is made (GenerateDataKey, then Encrypt under every further key) under the exact encryption context
/// of the file that will use it: the pool draws the file ID first, so KMS key policies and CloudTrail see the
/// same context as for a key made at create time. The pool fills on demand: the first create after an idle
/// period makes its own key and starts a refill, up to `capacity` keys with at most `concurrency` requests in
/// flight. A key not taken within `maxAge` seconds is wiped, and an idle pool is not refilled, so a mount that
/// stops creating files holds no pooled key after `maxAge`. Keys live in locked memory and are wiped at
/// shutdown. Every fetch (GenerateDataKey/Encrypt with an empty path), every hand-over to a file
/// (AssignDataKey, with the file's path) and every wipe of an unused key (DiscardKey, empty path) is audited.
///
/// What a pool concedes: up to `capacity` plaintext keys of files that do not exist yet sit in the daemon's
/// memory for up to `maxAge` seconds.
public final class DataKeyPool: @unchecked Sendable {
    public struct Settings: Sendable, Equatable {
        /// Keys kept ready; 0 turns the pool off (every create makes its own key).
        public var capacity: Int
        /// Seconds an unused key may wait before it is wiped.
        public var maxAge: Double
        /// Keys fetched at once while refilling.
        public var concurrency: Int
        /// A take wakes an idle refill thread only when the pool is down to this many keys (made or being made).
        /// The capacity (the default) wakes one at every take, which keeps the requests to a remote KMS steady: an
        /// adaptive rate limit that follows the send rate let creates through 25% slower against a throttling KMS
        /// when refills came in bursts. Where keys are CPU work (the local provider), half the capacity: a run
        /// of creates then wakes the refill thread once per half a pool instead of once per file (a wake costs
        /// the create a system call).
        public var wakeAt: Int

        public init(capacity: Int, maxAge: Double, concurrency: Int, wakeAt: Int? = nil) {
            self.capacity = capacity
            self.maxAge = maxAge
            self.concurrency = concurrency
            self.wakeAt = wakeAt ?? capacity
        }

        /// 64 keys cover a burst of creates in one directory (which the kernel serializes) while refills run;
        /// 8 fetches in flight refill at 8 / latency (400 keys/s at 20 ms); a minute bounds how long an unused
        /// key lives.
        public static let defaults = Settings(capacity: 64, maxAge: 60, concurrency: 8)
        public static let off = Settings(capacity: 0, maxAge: 0, concurrency: 0)
    }

    public let settings: Settings
    private let keys: KeyService
    private let volumeId: String
    private let userContext: [String: String]

    private struct Entry {
        let key: FreshFileKey
        let madeAt: Double
    }

    private let condition = Condition()
    // Guarded by `condition`.
    private var ready: [Entry] = []
    private var fetching = 0
    private var workers = 0
    private var lastDemand = -Double.infinity
    private var pausedUntil = 0.0
    private var pause = 0.0
    private var stopped = false

    public init(keys: KeyService, volumeId: String, userContext: [String: String], settings: Settings) {
        self.keys = keys
        self.volumeId = volumeId
        self.userContext = userContext
        self.settings = settings
    }

    /// A key for a new file at `path`: a pooled one when ready, else one made now.
    public func take(path: String) throws -> FreshFileKey {
        guard settings.capacity > 0 else { return try keys.newFileKey(volumeId: volumeId, userContext: userContext, path: path) }
        let now = Monotonic.seconds()
        var expired: [Entry] = []
        let entry: Entry? = condition.withLock {
            expired = purge(now)
            lastDemand = now
            let e = ready.isEmpty ? nil : ready.removeFirst()
            startWorkersIfNeeded()
            // One idle refill thread is enough to wake; it wakes the next if more is missing.
            if ready.count + fetching <= settings.wakeAt && wantsMore(now) { condition.signal() }
            return e
        }
        discard(expired)
        if let e = entry {
            keys.recordAssign(fileId: e.key.fileId, path: path)
            return e.key
        }
        return try keys.newFileKey(volumeId: volumeId, userContext: userContext, path: path)
    }

    /// Keys ready now.
    public var count: Int { condition.withLock { ready.count } }

    /// Wipes every pooled key and stops refilling (unmount), then waits up to `seconds` for fetches still in
    /// flight, which wipe (and audit) their key when done: the refill threads are gone before the daemon exits,
    /// and with them any use of OpenSSL or libcurl while the process tears them down.
    public func shutdown(waitingUpTo seconds: Double = 10) {
        let all: [Entry] = condition.withLock {
            stopped = true
            let a = ready
            ready.removeAll()
            condition.broadcast()
            return a
        }
        discard(all)
        let deadline = Monotonic.seconds() + seconds
        condition.withLock {
            while workers > 0 {
                let left = deadline - Monotonic.seconds()
                if left <= 0 { break }
                condition.wait(seconds: left)
            }
        }
    }

    // MARK: - refilling

    /// Refill wanted: the pool is short and a file was created within the last `maxAge` seconds.
    private func wantsMore(_ now: Double) -> Bool {
        !stopped && now - lastDemand < settings.maxAge && ready.count + fetching < settings.capacity && now >= pausedUntil
    }

    /// Starts the refill threads on first demand. Called with the lock held.
    private func startWorkersIfNeeded() {
        while workers < settings.concurrency {
            workers += 1
            if !BackgroundThread.start({ [self] in work() }) {
                workers -= 1
                break
            }
        }
    }

    private func work() {
        condition.lock()
        while !stopped {
            let now = Monotonic.seconds()
            let expired = purge(now)
            if !expired.isEmpty {
                condition.unlock()
                discard(expired)
                condition.lock()
                continue
            }
            guard wantsMore(now) else {
                // Sleep until something changes: a take, the end of a pause, or the oldest key's expiry.
                var wake: Double? = nil
                if let oldest = ready.first { wake = oldest.madeAt + settings.maxAge - now }
                if pausedUntil > now { wake = min(wake ?? .infinity, pausedUntil - now) }
                condition.wait(seconds: wake.map { $0 + 0.001 })
                continue
            }
            fetching += 1
            if wantsMore(now) { condition.signal() }
            condition.unlock()
            let result = Result {
                var key = try keys.newFileKey(volumeId: volumeId, userContext: userContext, path: "")
                // The key schedule too, here rather than in the create that takes the key.
                do {
                    key.derived = try FileKeys(dataKey: key.dataKey, fileId: key.fileId)
                } catch {
                    key.wipe()
                    throw error
                }
                return key
            }
            condition.lock()
            fetching -= 1
            switch result {
            case .success(let key):
                pause = 0
                if stopped {
                    condition.unlock()
                    discard([Entry(key: key, madeAt: now)])
                    condition.lock()
                } else {
                    ready.append(Entry(key: key, madeAt: Monotonic.seconds()))
                }
            case .failure:
                // A failing KMS is not hammered by refills: back off (1 s, doubling to 30 s). Creates meanwhile
                // make their own keys and report the failure themselves.
                pause = min(30, max(1, pause * 2))
                pausedUntil = Monotonic.seconds() + pause
            }
        }
        workers -= 1
        condition.broadcast()  // shutdown waits for the last one
        condition.unlock()
    }

    /// Removes keys older than `maxAge`. Called with the lock held; the caller wipes them after unlocking.
    private func purge(_ now: Double) -> [Entry] {
        guard let i = ready.firstIndex(where: { now - $0.madeAt < settings.maxAge }) else {
            let all = ready
            ready.removeAll()
            return all
        }
        guard i > 0 else { return [] }
        let old = Array(ready[0..<i])
        ready.removeFirst(i)
        return old
    }

    private func discard(_ entries: [Entry]) {
        for e in entries {
            e.key.wipe()
            keys.recordDiscard(subject: KeySubject(path: "", fileId: e.key.fileId))
        }
    }
}
