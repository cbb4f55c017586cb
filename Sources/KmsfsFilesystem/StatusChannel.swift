import CSystem
import Foundation
import Glibc
import KmsfsCrypto
import KmsfsSystem
import Synchronization

/// What `kmsfs status` shows of one mount. Counters and names only: never key material.
public struct MountStatus: Codable, Sendable {
    public struct KeyCalls: Codable, Sendable {
        public var calls: Int
        public var errors: Int
        /// Milliseconds, over the most recent calls (`CallMetrics.window`); absent before any call.
        public var p50Ms: Double?
        public var p99Ms: Double?
    }

    public var mountPoint: String
    public var cipherDir: String
    public var volumeId: String
    public var formatVersion: Int
    public var provider: String
    public var keyIds: [String]
    public var pid: Int32
    public var readOnly: Bool
    /// Shared mode: other hosts may have the volume mounted too.
    public var shared: Bool
    public var uptimeSeconds: Double
    public var filesOpen: Int
    public var dataKeysHeld: Int
    public var dataKeysPooled: Int
    public var volumeKeyHeld: Bool
    public var bytesRead: Int
    public var bytesWritten: Int
    public var corruptChunks: Int
    /// Per key service operation (GenerateDataKey, Decrypt, Encrypt, ...).
    public var keyCalls: [String: KeyCalls]
}

extension EncryptedFilesystem {
    public func status(mountPoint: String) -> MountStatus {
        MountStatus(
            mountPoint: mountPoint, cipherDir: cipherDir, volumeId: volume.volumeId, formatVersion: volume.formatVersion,
            provider: volume.keyProvider.type, keyIds: volume.keyProvider.keyIds, pid: getpid(), readOnly: readOnlyMount, shared: shared,
            uptimeSeconds: MountCounters.uptimeSeconds,
            filesOpen: table.count, dataKeysHeld: table.keysHeld, dataKeysPooled: pool.count,
            volumeKeyHeld: volumeKeys != nil && !volumeKeysWiped.load(ordering: .relaxed),
            bytesRead: MountCounters.bytesRead.load(ordering: .relaxed),
            bytesWritten: MountCounters.bytesWritten.load(ordering: .relaxed),
            corruptChunks: MountCounters.corruptChunks.load(ordering: .relaxed),
            keyCalls: keys.metrics.summaries.mapValues { MountStatus.KeyCalls(calls: $0.calls, errors: $0.errors, p50Ms: $0.p50, p99Ms: $0.p99) })
    }

    /// `status` as JSON (sorted keys).
    public func statusJSON(mountPoint: String) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? Array(encoder.encode(status(mountPoint: mountPoint)))) ?? Array("{\"error\":\"cannot encode the status\"}".utf8)
    }
}

/// The channel `kmsfs status` asks a mount's daemon over: a Unix stream socket in the abstract namespace, named
/// after the mount point. Abstract sockets have no file permissions, so both ends check the other's
/// credentials (SO_PEERCRED): the daemon answers only root and its own user (the one who mounted), and the
/// client believes only a daemon running as root or as the user the mount table names.
public enum StatusChannel {
    /// "\0kmsfs-status/" and 32 hex digits of SHA-256 of the mount point.
    public static func address(mountPoint: String) -> [UInt8] {
        [0] + Array("kmsfs-status/".utf8) + Array(Hex.encode(Digest.sha256(Array(mountPoint.utf8))).prefix(32).utf8)
    }

    /// Starts answering on the channel of `mountPoint` with `snapshot` (JSON), on a thread of its own.
    public static func serve(mountPoint: String, snapshot: @escaping @Sendable () -> [UInt8]) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            Log.warning("kmsfs status cannot reach this mount: socket: \(Errno.current)")
            return
        }
        let bound = withAddress(address(mountPoint: mountPoint)) { bind(fd, $0, $1) } == 0
        guard bound, listen(fd, 16) == 0 else {
            Log.warning("kmsfs status cannot reach this mount: its channel is taken (\(Errno.current))")
            close(fd)
            return
        }
        let me = geteuid()
        BackgroundThread.start {
            while true {
                // (Children are spawned with every descriptor above 2 closed, so the moment before FD_CLOEXEC
                // leaks nothing.)
                let c = accept(fd, nil, nil)
                if c >= 0 { _ = fcntl(c, F_SETFD, FD_CLOEXEC) }
                if c < 0 {
                    if errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE { usleep(10_000); continue }
                    return
                }
                var timeout = timeval(tv_sec: 2, tv_usec: 0)
                setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                let answer: [UInt8]
                if let peer = peerUid(c), peer == 0 || peer == me {
                    answer = snapshot()
                } else {
                    answer = Array("{\"error\":\"not allowed: only root and the user who mounted it (uid \(me)) may ask\"}".utf8)
                }
                _ = answer.withUnsafeBytes { b in send(c, b.baseAddress, b.count, Int32(MSG_NOSIGNAL)) }
                close(c)
            }
        }
    }

    public enum QueryError: Error, CustomStringConvertible {
        case unreachable(String)
        case impostor(uid_t)
        case refused(String)

        public var description: String {
            switch self {
            case .unreachable(let why): return "its daemon does not answer (\(why))"
            case .impostor(let uid): return "the channel is held by a process of uid \(uid), not by the mount's daemon: not believed"
            case .refused(let why): return why
            }
        }
    }

    /// Asks the daemon of the mount at `mountPoint`, which the mount table says `owner` mounted.
    public static func query(mountPoint: String, owner: uid_t) throws -> [UInt8] {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw QueryError.unreachable("socket: \(Errno.current)") }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard withAddress(address(mountPoint: mountPoint), { connect(fd, $0, $1) }) == 0 else {
            throw QueryError.unreachable("\(Errno.current)")
        }
        guard let server = peerUid(fd) else { throw QueryError.unreachable("no credentials") }
        guard server == 0 || server == owner else { throw QueryError.impostor(server) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 16384)
        while out.count < 1 << 22 {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw QueryError.unreachable("\(Errno.current)") }
            if n == 0 { break }
            out += buf[0..<n]
        }
        if let obj = try? JSONSerialization.jsonObject(with: Data(out)) as? [String: Any], let e = obj["error"] as? String {
            throw QueryError.refused(e)
        }
        return out
    }

    private static func peerUid(_ fd: Int32) -> uid_t? {
        var uid: UInt32 = 0
        return kmsfs_peer_uid(fd, &uid) == 0 ? uid_t(uid) : nil
    }

    private static func withAddress<R>(_ name: [UInt8], _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let n = min(name.count, MemoryLayout.size(ofValue: addr.sun_path))
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for i in 0..<n { p[i] = name[i] }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + n)
        return withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) } }
    }
}
