import Glibc
import KmsfsSystem

/// The audit log of `mount --audit-log FILE`: one JSON line per key operation, for every provider:
///
///     {"time":"2026-11-23T10:00:00.123Z","op":"Decrypt","keyId":"...","fileId":"<hex>","path":"/a/b",
///      "result":"ok","latencyMs":1.25}
///
/// `op` is the KMS operation name (GenerateDataKey, Encrypt, Decrypt, ReEncrypt, DescribeKey), or
/// DiscardKey when the plaintext data key of a file was wiped after its last handle closed (no provider
/// call; it closes the window in which the key was in memory). `result` is "ok" or the error type. A call that
/// took more than one attempt adds `"attempts":N` and `"retried":[...]`, the error types of the attempts that
/// were retried (throttling, 5xx answers, connection failures).
/// Lines are written with one append-mode write each, so concurrent operations never interleave.
public final class AuditLog: Sendable {
    private let fd: Int32

    public init(path: String) throws {
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw Errno.current }
        self.fd = fd
    }

    deinit { close(fd) }

    public func record(op: String, keyId: String, fileId: String, path: String, result: String, latencyMs: Double,
                       attempts: Int = 1, retried: [String] = []) {
        let ms = (latencyMs * 1000).rounded() / 1000
        var line = "{\"time\":\"\(Log.timestamp())\",\"op\":\(JSON.quote(op)),\"keyId\":\(JSON.quote(keyId))," +
            "\"fileId\":\(JSON.quote(fileId)),\"path\":\(JSON.quote(path)),\"result\":\(JSON.quote(result))," +
            "\"latencyMs\":\(ms)"
        if attempts > 1 {
            line += ",\"attempts\":\(attempts),\"retried\":[" + retried.map(JSON.quote).joined(separator: ",") + "]"
        }
        line += "}\n"
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { b in
            // O_APPEND writes of a few hundred bytes to a regular file are not split.
            _ = Glibc.write(fd, b.baseAddress!, b.count)
        }
    }
}

