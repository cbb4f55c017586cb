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

    private init(cipherDir: String, holder: Holder) {
        self.cipherDir = cipherDir
        me = holder
    }

    /// Takes the lease for `purpose` ("mount", "rewrap"), or throws `Held` naming who has it.
    public static func acquire(cipherDir: String, purpose: String, seconds: Double = defaultSeconds) throws -> VolumeLease {
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let boot = (try? FileIO.readFile("/proc/sys/kernel/random/boot_id")).map {
            String(decoding: $0, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var ns = stat()
        let pidNamespace: UInt64? = stat("/proc/self/ns/pid", &ns) == 0 ? UInt64(ns.st_ino) : nil
        let holder = Holder(host: String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), boot: boot, pidNamespace: pidNamespace, pid: getpid(), purpose: purpose,
                            holderId: Hex.encode(try SecureRandom.bytes(8)), renewedAt: Date().timeIntervalSince1970, seconds: seconds)
        let lease = VolumeLease(cipherDir: cipherDir, holder: holder)
        try lease.take()
        return lease
    }

    private var path: String { cipherDir + "/" + VolumeLease.fileName }

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
                let age = Date().timeIntervalSince1970 - current.renewedAt
                // A holder of this very system (same boot) whose process is gone (it crashed) is stale at once.
                let deadHere = current.boot != nil && current.boot == me.boot && current.pidNamespace == me.pidNamespace
                    && current.pidNamespace != nil && kill(current.pid, 0) != 0 && errno == ESRCH
                if age < 2 * current.seconds && !deadHere { throw Held(holder: current, age: age) }
                tookOver = (current, age)
            } else {
                // Being written by another taker, or damaged: held, unless it is old.
                var st = stat()
                guard stat(path, &st) == 0 else { continue }
                if Date().timeIntervalSince1970 - Double(st.st_mtim.tv_sec) <= 2 * me.seconds {
                    throw Held(holder: Holder(host: "(unknown: the lease file is being written or damaged)", boot: nil, pid: 0,
                                              purpose: "mount", holderId: "", renewedAt: 0, seconds: me.seconds), age: 0)
                }
            }
            // Move the stale lease aside, and make sure what moved is the one judged stale; anything else (a fresh
            // lease another host took meanwhile) goes back.
            let aside = path + ".stale-" + me.holderId
            guard rename(path, aside) == 0 else { continue }
            if VolumeLease.read(aside) == current {
                unlink(aside)
                continue
            }
            if link(aside, path) == 0 || kmsfs_renameat2(AT_FDCWD, aside, AT_FDCWD, path, kmsfs_rename_noreplace()) == 0 {
                unlink(aside)
            }
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

    /// Renews the lease every third of its duration until released. `onLost` runs (once, on the renewing
    /// thread) when the lease turns out to be someone else's, or could not be renewed for its whole duration:
    /// the caller must stop writing.
    public func startRenewing(onLost: @escaping @Sendable (String) -> Void) throws {
        condition.withLock { renewer = true }
        let started = BackgroundThread.start { [self] in
            var lastRenewed = Monotonic.seconds()
            condition.lock()
            while !stopped {
                condition.wait(seconds: me.seconds / 3)
                if stopped || lost { continue }
                condition.unlock()
                let problem = renew()
                if problem == nil { lastRenewed = Monotonic.seconds() }
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
