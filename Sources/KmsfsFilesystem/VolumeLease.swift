import CSystem
import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem
import Synchronization

/// Exclusive use of a volume across hosts: a lease file, `kmsfs.conf.lease` at the top of the backing
/// directory, naming the host and process that hold the volume and when they last renewed it.
///
/// `flock` on the backing directory keeps two users on one host apart, but it does not reach the other clients
/// of a distributed filesystem (JuiceFS, CephFS, NFS...). The lease does: it is created atomically (written
/// under a name of its own, then hard-linked, or renamed without replacing, to the lease name, so exactly one
/// of two hosts gets it), renewed every third of its duration while held, and removed at release. A holder
/// that died without releasing stops renewing; its lease is taken over once it is older than twice its
/// duration (room for clocks that differ between hosts), or at once when it was a process of this host that no
/// longer exists. Takeover moves the stale file aside and checks that
/// what it moved is the stale lease it judged, so two hosts taking over at once cannot both win.
public final class VolumeLease: @unchecked Sendable {
    public struct Holder: Codable, Equatable, Sendable {
        public var host: String
        /// The holder's kernel boot ID (/proc/sys/kernel/random/boot_id) and PID namespace: host names need
        /// not be unique, and containers of one machine share its boot ID but not their process IDs.
        public var boot: String?
        public var pidNamespace: UInt64?
        public var pid: Int32
        public var purpose: String
        public var holderId: String
        /// Unix time of the last renewal, by the holder's clock.
        public var renewedAt: Double
        public var seconds: Double
    }

    public static let fileName = VolumeConfig.fileName + ".lease"
    /// Shared mode (several hosts at once): each holder keeps a lease file of its own, `kmsfs.conf.lease.shared-`
    /// and its holder ID. An exclusive holder refuses to start while any fresh one exists, and a shared holder
    /// while a fresh exclusive lease exists; each checks after making its own lease, so of two that start at
    /// once at least one sees the other (both may back off; neither proceeds beside the other).
    public static let sharedPrefix = fileName + ".shared-"
    public static let defaultSeconds = 30.0

    /// Another host or process holds the volume.
    public struct Held: Error, CustomStringConvertible {
        public let holder: Holder
        public let age: Double
        public var description: String {
            "in use by kmsfs \(holder.purpose) on host \(holder.host) (pid \(holder.pid)), lease renewed \(Int(age.rounded())) s ago"
        }
    }

    private let cipherDir: String
    /// This holder's lease file: the exclusive lease, or its own shared one.
    private let path: String
    public let shared: Bool
    private var me: Holder
    private let condition = Condition()
    private var stopped = false
    private var renewer = false
    private var lost = false
    /// Until when (BootClock) this holder may write: its last renewal's start plus the lease's duration. Other
    /// hosts wait twice that before taking over, so a holder that stalls stops writing before anyone else starts.
    /// (A Double's bit pattern: read on every write, without a lock. 0 once the lease is lost.)
    private let validUntil = Atomic<UInt64>(0)
    /// Who held the lease before, when this acquire took over a stale one (for the caller to log).
    public private(set) var tookOver: (holder: Holder, age: Double)?

    private init(cipherDir: String, holder: Holder, shared: Bool) {
        self.cipherDir = cipherDir
        self.shared = shared
        path = cipherDir + "/" + (shared ? VolumeLease.sharedPrefix + holder.holderId : VolumeLease.fileName)
        me = holder
    }

    /// Takes the lease for `purpose` ("mount", "rewrap"), exclusive or `shared`, or throws `Held` naming who has it.
    public static func acquire(cipherDir: String, purpose: String, seconds: Double = defaultSeconds, shared: Bool = false) throws -> VolumeLease {
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let boot = (try? FileIO.readFile("/proc/sys/kernel/random/boot_id")).map {
            String(decoding: $0, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var ns = stat()
        let pidNamespace: UInt64? = stat("/proc/self/ns/pid", &ns) == 0 ? UInt64(ns.st_ino) : nil
        let holder = Holder(host: String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), boot: boot, pidNamespace: pidNamespace, pid: getpid(), purpose: purpose,
                            holderId: Hex.encode(try SecureRandom.bytes(8)), renewedAt: Date().timeIntervalSince1970, seconds: seconds)
        let lease = VolumeLease(cipherDir: cipherDir, holder: holder, shared: shared)
        if shared {
            try lease.takeShared()
        } else {
            try lease.take()
            do {
                try lease.checkNoSharedHolders()
            } catch {
                unlink(lease.path)
                throw error
            }
        }
        return lease
    }

    private var exclusivePath: String { cipherDir + "/" + VolumeLease.fileName }

    /// Whether lease `current` is stale: not renewed for twice its duration, or a holder of this very system
    /// (same boot and PID namespace) whose process is gone.
    private func isStale(_ current: Holder) -> (stale: Bool, age: Double) {
        let age = Date().timeIntervalSince1970 - current.renewedAt
        let deadHere = current.boot != nil && current.boot == me.boot && current.pidNamespace == me.pidNamespace
            && current.pidNamespace != nil && kill(current.pid, 0) != 0 && errno == ESRCH
        return (age >= 2 * current.seconds || deadHere, age)
    }

    /// Removes lease file `file`, judged stale as `judged`: moved aside first, and put back if what moved is not
    /// the lease judged (someone renewed or took it meanwhile). True when it was removed, false when it was put
    /// back, nil when it was gone already.
    private func removeStale(_ file: String, judged: Holder?) -> Bool? {
        let aside = file + ".stale-" + me.holderId
        guard rename(file, aside) == 0 else { return nil }
        if VolumeLease.read(aside) == judged {
            unlink(aside)
            return true
        }
        if link(aside, file) == 0 || kmsfs_renameat2(AT_FDCWD, aside, AT_FDCWD, file, kmsfs_rename_noreplace()) == 0 {
            unlink(aside)
        }
        return false
    }

    /// For a shared holder, a fresh exclusive lease; for an exclusive one, a fresh shared lease; nil when none.
    private func freshHolderOfTheOtherKind() -> Holder? {
        if shared {
            guard let h = VolumeLease.read(exclusivePath), !isStale(h).stale else { return nil }
            return h
        }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: cipherDir)) ?? []
        for n in names where n.hasPrefix(VolumeLease.sharedPrefix) && !n.contains(".new-") && !n.contains(".stale-") {
            if let h = VolumeLease.read(cipherDir + "/" + n), !isStale(h).stale { return h }
        }
        return nil
    }

    /// A lease file that cannot be read (being renamed into place this instant, or damaged) counts as held while
    /// it is young: throws `Held` naming no holder. Returns whether it is there at all (an old one is, for the
    /// caller to remove).
    private func refuseIfYoung(_ file: String, purpose: String) throws -> Bool {
        var st = stat()
        guard stat(file, &st) == 0 else { return false }
        if Date().timeIntervalSince1970 - Double(st.st_mtim.tv_sec) <= 2 * me.seconds {
            throw Held(holder: Holder(host: "(unknown: the lease file is being written or damaged)", boot: nil, pid: 0,
                                      purpose: purpose, holderId: "", renewedAt: 0, seconds: me.seconds), age: 0)
        }
        return true
    }

    /// Exclusive holders: refuses (Held) while a fresh shared lease exists; stale ones are removed.
    private func checkNoSharedHolders() throws {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: cipherDir) else { throw Errno.current }
        for n in names where n.hasPrefix(VolumeLease.sharedPrefix) && !n.contains(".new-") && !n.contains(".stale-") {
            let file = cipherDir + "/" + n
            guard let h = VolumeLease.read(file) else {
                if try refuseIfYoung(file, purpose: "mount (shared)") { _ = removeStale(file, judged: nil) }
                continue
            }
            let (stale, age) = isStale(h)
            if !stale { throw Held(holder: h, age: age) }
            if removeStale(file, judged: h) == false, let now = VolumeLease.read(file) {
                throw Held(holder: now, age: Date().timeIntervalSince1970 - now.renewedAt)
            }
        }
    }

    /// Shared holders: makes this holder's own lease, then refuses (Held) while a fresh exclusive lease exists; a
    /// stale one is removed.
    private func takeShared() throws {
        let started = BootClock.seconds()
        me.renewedAt = Date().timeIntervalSince1970
        let mine = try writeTemporary()
        if rename(mine, path) != 0 {
            let e = Errno.current
            unlink(mine)
            throw e
        }
        do {
            for _ in 0..<5 {
                guard let current = VolumeLease.read(exclusivePath) else {
                    if try refuseIfYoung(exclusivePath, purpose: "mount") {
                        _ = removeStale(exclusivePath, judged: nil)
                        continue
                    }
                    validUntil.store((started + me.seconds).bitPattern, ordering: .releasing)
                    return
                }
                let (stale, age) = isStale(current)
                if !stale { throw Held(holder: current, age: age) }
                if removeStale(exclusivePath, judged: current) == true { tookOver = (current, age) }
            }
            throw Errno(EBUSY)
        } catch {
            unlink(path)
            throw error
        }
    }

    private func take() throws {
        for _ in 0..<5 {
            let started = BootClock.seconds()
            me.renewedAt = Date().timeIntervalSince1970
            let mine = try writeTemporary()
            defer { unlink(mine) }
            if link(mine, path) == 0 || (errno != EEXIST && kmsfs_renameat2(AT_FDCWD, mine, AT_FDCWD, path, kmsfs_rename_noreplace()) == 0) {
                validUntil.store((started + me.seconds).bitPattern, ordering: .releasing)
                return
            }
            guard errno == EEXIST else { throw Errno.current }
            let current = VolumeLease.read(path)
            if let current {
                // A holder of this very system (same boot) whose process is gone (it crashed) is stale at once.
                let (stale, age) = isStale(current)
                if !stale { throw Held(holder: current, age: age) }
                tookOver = (current, age)
            } else {
                // Being written by another taker, or damaged: held, unless it is old.
                guard try refuseIfYoung(path, purpose: "mount") else { continue }
            }
            // Move the stale lease aside, and make sure what moved is the one judged stale; anything else (a fresh
            // lease another host took meanwhile) goes back.
            if removeStale(path, judged: current) != false { continue }
            if let now = VolumeLease.read(path) { throw Held(holder: now, age: Date().timeIntervalSince1970 - now.renewedAt) }
            throw Errno(EBUSY)
        }
        if let current = VolumeLease.read(path) { throw Held(holder: current, age: Date().timeIntervalSince1970 - current.renewedAt) }
        throw Errno(EBUSY)
    }

    /// Writes this holder's record to a file of its own and returns its path.
    private func writeTemporary() throws -> String {
        let temp = path + ".new-" + me.holderId
        unlink(temp)
        let data = try JSONEncoder().encode(me)
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        if fd < 0 { throw Errno.current }
        defer { close(fd) }
        try [UInt8](data).withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: 0) }
        try syscall { fsync(fd) }
        return temp
    }

    static func read(_ path: String) -> Holder? {
        guard let bytes = try? FileIO.readFile(path), !bytes.isEmpty else { return nil }
        return try? JSONDecoder().decode(Holder.self, from: Data(bytes))
    }

    /// The current holder, if any (for messages).
    public static func holder(cipherDir: String) -> Holder? { read(cipherDir + "/" + fileName) }

    /// Every holder with a lease file, exclusive or shared, as "kmsfs mount (shared) on host H (pid P)", for
    /// the message of a refusal that came before the lease was looked at (flock); "" when there is none.
    public static func describeHolders(cipherDir: String) -> String {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: cipherDir)) ?? []
        let files = names.filter { $0 == fileName || ($0.hasPrefix(sharedPrefix) && !$0.contains(".new-") && !$0.contains(".stale-")) }
        let holders = files.sorted().compactMap { read(cipherDir + "/" + $0) }
        return holders.map { "kmsfs \($0.purpose) on host \($0.host) (pid \($0.pid))" }.joined(separator: ", ")
    }

    /// Renews the lease every third of its duration until released. `onLost` runs (once, on the renewing
    /// thread) when the lease turns out to be someone else's, or could not be renewed for its whole duration:
    /// the caller must stop writing. `onRenewed` runs (on the renewing thread) after each renewal.
    public func startRenewing(onRenewed: @escaping @Sendable () -> Void = {}, onLost: @escaping @Sendable (String) -> Void) throws {
        condition.withLock { renewer = true }
        let started = BackgroundThread.start { [self] in
            var lastRenewed = Monotonic.seconds()
            condition.lock()
            while !stopped {
                condition.wait(seconds: me.seconds / 3)
                if stopped || lost { continue }
                condition.unlock()
                let problem = renew()
                if problem == nil {
                    lastRenewed = Monotonic.seconds()
                    onRenewed()
                }
                let give = problem.flatMap { p in
                    p.hasPrefix("taken:") || Monotonic.seconds() - lastRenewed >= me.seconds ? String(p.drop { $0 != ":" }.dropFirst().drop { $0 == " " }) : nil
                }
                condition.lock()
                if let why = give {
                    lost = true
                    validUntil.store(0, ordering: .releasing)
                    condition.unlock()
                    onLost(why)
                    condition.lock()
                }
            }
            renewer = false
            condition.broadcast()
            condition.unlock()
        }
        if !started {
            condition.withLock { renewer = false }
            throw Errno(EAGAIN)
        }
    }

    /// One renewal; nil when done, else "taken: why" (someone else holds it) or "failed: why".
    private func renew() -> String? {
        guard let current = VolumeLease.read(path) else {
            // Unreadable for now (EMFILE, EIO, a network hiccup): a failure, with the lease's grace, not a loss.
            return "failed: the lease could not be read (\(Errno.current))"
        }
        guard current.holderId == me.holderId else {
            return "taken: its lease is now held by kmsfs \(current.purpose) on host \(current.host) (pid \(current.pid))"
        }
        // A fresh holder of the other kind (two that started at once and each missed the other, or a listing that
        // was stale): neither may go on as if the volume were shared, or its alone.
        if let other = freshHolderOfTheOtherKind() {
            return "taken: kmsfs \(other.purpose) on host \(other.host) (pid \(other.pid)) holds it too, \(shared ? "exclusively" : "in shared mode")"
        }
        let started = BootClock.seconds()
        me.renewedAt = Date().timeIntervalSince1970
        do {
            let mine = try writeTemporary()
            if rename(mine, path) != 0 {
                let e = Errno.current
                unlink(mine)
                Log.error("cannot renew the lease of \(cipherDir): \(e)")
                return "failed: the lease could not be renewed (\(e))"
            }
        } catch {
            Log.error("cannot renew the lease of \(cipherDir): \(error)")
            return "failed: the lease could not be renewed (\(error))"
        }
        // Another host that took the lease over just before the rename lost it to us: it finds out at its next
        // renewal and stops. Check that what is there now is ours.
        guard VolumeLease.read(path)?.holderId == me.holderId else { return "taken: the lease changed hands while being renewed" }
        if condition.withLock({ !lost }) { validUntil.store((started + me.seconds).bitPattern, ordering: .releasing) }
        return nil
    }

    /// True while this holder may write: its last renewal is less than the lease's duration old, in real time
    /// (a suspended machine's pause counts), and the lease has not been lost.
    public var isCurrent: Bool {
        BootClock.seconds() < Double(bitPattern: validUntil.load(ordering: .acquiring))
    }

    /// Stops renewing and removes the lease if it is still this holder's.
    public func release() {
        condition.withLock {
            stopped = true
            condition.broadcast()
            while renewer { condition.wait(seconds: 1) }
        }
        if VolumeLease.read(path)?.holderId == me.holderId { unlink(path) }
    }
}
