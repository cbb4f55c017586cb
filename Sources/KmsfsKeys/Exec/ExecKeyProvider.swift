import CSystem
import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// A key service of the user's own, as a program: for every call kmsfs runs the host's key command
/// (`/bin/sh -c COMMAND`), writes one JSON request on its standard input and reads one JSON answer from its
/// standard output (the protocol is in kmsfs(1), KEY COMMANDS). The command comes from the host (an option or
/// KMSFS_KEY_COMMAND), never from the volume: whoever writes CIPHERDIR must not choose what runs.
///
/// Each call has a deadline (the KMS deadline): a command still running then is killed with its process group.
/// Calls run concurrently up to the key service's in-flight limit. Plaintext keys travel base64 in the JSON, are
/// built and read in locked memory, and the answer's copy is blanked before the rest of it is parsed.
public final class ExecKeyProvider: KeyProvider {
    public static let providerName = "exec"
    public let name = ExecKeyProvider.providerName
    /// Room for a provider's wrapped key: Vault Transit, Cloud KMS and PKCS#11 AES-GCM blobs take under 200
    /// bytes, an RSA-4096 wrapping 512.
    public let wrappedKeySizeBound = 512
    /// The longest answer read; a longer one is refused.
    static let maximumAnswer = 65536
    public let command: String
    let timeout: Double

    public init(command: String, timeout: Double) {
        self.command = command
        self.timeout = timeout
        // A command that exits without reading its request must not kill kmsfs with SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
    }

    public func route(forKeyId keyId: String) -> String { "exec" }

    public func describeKey(_ keyId: String) throws -> String {
        let (_, answer) = try call("describe-key", keyId: keyId, context: nil)
        return (answer["keyId"] as? String).flatMap { $0.isEmpty ? nil : $0 } ?? keyId
    }

    public func generateDataKey(keyId: String, context: EncryptionContext) throws -> (plaintext: SecureBytes, wrapped: WrappedKey) {
        let (plaintext, answer) = try call("generate-data-key", keyId: keyId, context: context, secretAnswer: true)
        do {
            return (plaintext!, WrappedKey(provider: name, keyId: keyId, blob: try blob(answer, "generate-data-key", keyId)))
        } catch {
            plaintext?.wipe()
            throw error
        }
    }

    public func encrypt(dataKey: SecureBytes, keyId: String, context: EncryptionContext) throws -> WrappedKey {
        let (_, answer) = try call("encrypt", keyId: keyId, context: context, plaintext: dataKey)
        return WrappedKey(provider: name, keyId: keyId, blob: try blob(answer, "encrypt", keyId))
    }

    public func decrypt(_ wrapped: WrappedKey, context: EncryptionContext) throws -> SecureBytes {
        guard wrapped.provider == name else {
            throw KeyError(.invalidCiphertext, errorType: "InvalidCiphertextException", keyId: wrapped.keyId, message: "not wrapped by a key command")
        }
        return try call("decrypt", keyId: wrapped.keyId, context: context, ciphertext: wrapped.blob, secretAnswer: true).0!
    }

    public func reEncrypt(_ wrapped: WrappedKey, toKeyId keyId: String, context: EncryptionContext) throws -> WrappedKey {
        let dataKey = try decrypt(wrapped, context: context)
        defer { dataKey.wipe() }
        return try encrypt(dataKey: dataKey, keyId: keyId, context: context)
    }

    // MARK: - one call

    /// Runs the command for `op`; returns the answer's plaintext key (when `secretAnswer`) and the answer.
    private func call(_ op: String, keyId: String, context: EncryptionContext?, plaintext: SecureBytes? = nil,
                      ciphertext: [UInt8]? = nil, secretAnswer: Bool = false) throws -> (SecureBytes?, [String: Any]) {
        var fields: [String: Any] = ["version": 1, "operation": op, "keyId": keyId,
                                     "encryptionContext": context?.pairs ?? [String: String]()]
        if let c = ciphertext { fields["ciphertext"] = Base64.encode(c) }
        let prefix = try JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys])
        let request = try SecureBuffer(capacity: prefix.count + 80)
        if let p = plaintext {
            try request.append(Array(prefix.dropLast()))
            try request.append(",\"plaintext\":\"")
            try request.appendBase64(of: p)
            try request.append("\"}")
        } else {
            try request.append(Array(prefix))
        }
        try request.append("\n")
        let started = Monotonic.seconds()
        let (status, answer, timedOut) = try run(request, keyId: keyId)
        if timedOut {
            var e = KeyError(.unreachable, errorType: "Timeout", keyId: keyId,
                             message: "the key command did not answer \(op) within \(KeyError.seconds(timeout)) (stopped it)")
            e.gaveUpAtDeadline = true
            e.elapsed = Monotonic.seconds() - started
            throw e
        }
        // The plaintext key, if any, out of the answer into locked memory, and blanked there before parsing.
        var key: SecureBytes? = nil
        if secretAnswer && status == 0 {
            let k = try SecureBytes(count: FileHeader.dataKeySize)
            let n: Int? = answer.withUnsafeMutableBytes { b in
                let text = UnsafeMutableRawBufferPointer(rebasing: b[0..<answer.count])
                guard let (start, end) = KMSClient.findStringValue(of: "plaintext", in: UnsafeRawBufferPointer(text)) else { return nil }
                let n = k.withUnsafeMutableBytes { Base64.decode(UnsafeRawBufferPointer(rebasing: text[start..<end]), into: $0) }
                for i in start..<end { text[i] = UInt8(ascii: "A") }
                return n
            }
            if n == FileHeader.dataKeySize { key = k } else { k.wipe() }
        }
        let object = answer.withUnsafeBytes { b in
            try? JSONSerialization.jsonObject(with: Data(UnsafeRawBufferPointer(rebasing: b[0..<answer.count]))) as? [String: Any]
        }
        if let error = object?["error"] as? [String: Any] {
            key?.wipe()
            let type = (error["type"] as? String).flatMap { $0.isEmpty ? nil : $0 } ?? "KeyCommandError"
            var message = error["message"] as? String ?? ""
            if message.count > 300 { message = String(message.prefix(300)) + "..." }
            throw KeyError(KMSClient.kind(of: type, status: 400), errorType: type, keyId: keyId, message: message)
        }
        guard status == 0 else {
            key?.wipe()
            throw KeyError(.unreachable, errorType: "KeyCommandFailed", keyId: keyId, message: "the key command exited with status \(status) on \(op)")
        }
        guard let object, !secretAnswer || key != nil else {
            key?.wipe()
            throw KeyError(.other, errorType: "InvalidResponse", keyId: keyId, message: "the key command's answer to \(op) is not what kmsfs(1) says")
        }
        return (key, object)
    }

    private func blob(_ answer: [String: Any], _ op: String, _ keyId: String) throws -> [UInt8] {
        guard let text = answer["ciphertext"] as? String, let bytes = Base64.decode(text), !bytes.isEmpty, bytes.count <= 4096 else {
            throw KeyError(.other, errorType: "InvalidResponse", keyId: keyId, message: "the key command's answer to \(op) has no valid ciphertext")
        }
        return bytes
    }

    /// Runs the command with `request` on its standard input; returns its exit status (or 128 + signal), its
    /// standard output, and whether it was stopped at the deadline.
    private func run(_ request: SecureBuffer, keyId: String) throws -> (Int32, SecureBuffer, Bool) {
        var input: [Int32] = [0, 0], output: [Int32] = [0, 0]
        guard kmsfs_pipe_cloexec(&input) == 0 else { throw spawnError(keyId, Errno.current) }
        guard kmsfs_pipe_cloexec(&output) == 0 else {
            close(input[0]); close(input[1])
            throw spawnError(keyId, Errno.current)
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, input[0], 0)
        posix_spawn_file_actions_adddup2(&actions, output[1], 1)
        _ = kmsfs_spawn_closefrom(&actions, 3)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Its own process group (killed as a whole at the deadline), default SIGPIPE, no blocked signals.
        var defaults = sigset_t(), none = sigset_t()
        sigemptyset(&defaults); sigaddset(&defaults, SIGPIPE); sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        let args: [String] = ["sh", "-c", command]
        var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let r = posix_spawn(&pid, "/bin/sh", &actions, &attr, &argv, environ)
        close(input[0]); close(output[1])
        guard r == 0 else {
            close(input[1]); close(output[0])
            throw spawnError(keyId, Errno(r))
        }
        let deadline = Monotonic.seconds() + timeout
        // The request is small (well under a pipe's buffer): written at once; a command that does not read it
        // (EPIPE) is judged by its answer.
        _ = request.withUnsafeBytes { b in write(input[1], b.baseAddress, b.count) }
        close(input[1])
        let answer = try SecureBuffer(capacity: 4096)
        var timedOut = false
        let chunk = try SecureBytes(count: 4096)
        while true {
            let left = deadline - Monotonic.seconds()
            if left <= 0 { timedOut = true; break }
            var pfd = pollfd(fd: output[0], events: Int16(POLLIN), revents: 0)
            let p = poll(&pfd, 1, Int32(min(left, 1) * 1000) + 1)
            if p < 0 && errno == EINTR { continue }
            if p <= 0 { continue }
            let n = chunk.withUnsafeMutableBytes { read(output[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            if answer.count + n > ExecKeyProvider.maximumAnswer { break }
            try chunk.withUnsafeBytes { try answer.append(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        }
        close(output[0])
        var status: Int32 = 0
        while !timedOut {
            let w = waitpid(pid, &status, WNOHANG)
            if w == pid { break }
            if w < 0 && errno != EINTR { break }
            if Monotonic.seconds() >= deadline { timedOut = true; break }
            usleep(2000)
        }
        if timedOut {
            kill(-pid, SIGKILL)
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            return (-1, answer, true)
        }
        let signal = status & 0x7f
        return (signal == 0 ? (status >> 8) & 0xff : 128 + signal, answer, false)
    }

    private func spawnError(_ keyId: String, _ e: Errno) -> KeyError {
        KeyError(.other, errorType: "KeyCommandUnavailable", keyId: keyId, message: "cannot run the key command: \(e)")
    }
}
