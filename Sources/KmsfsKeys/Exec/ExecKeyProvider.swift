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
        let (status, answer, stopped) = try run(request, keyId: keyId)
        switch stopped {
        case .deadline:
            var e = KeyError(.unreachable, errorType: "Timeout", keyId: keyId,
                             message: "the key command did not answer \(op) within \(KeyError.seconds(timeout)) (stopped it)")
            e.gaveUpAtDeadline = true
            e.elapsed = Monotonic.seconds() - started
            throw e
        case .tooLong:
            throw KeyError(.other, errorType: "InvalidResponse", keyId: keyId,
                           message: "the key command's answer to \(op) is longer than \(ExecKeyProvider.maximumAnswer / 1024) KiB (stopped it)")
        case .no:
            break
        }
        // Every "plaintext" string in the answer, whatever its status, is blanked in locked memory before anything
        // else reads the answer; the one of an answer that must carry a key is decoded first.
        var key: SecureBytes? = nil
        var found = 0
        var blankedLength = 0
        let k = try SecureBytes(count: FileHeader.dataKeySize)
        answer.withUnsafeMutableBytes { b in
            let text = UnsafeMutableRawBufferPointer(rebasing: b[0..<answer.count])
            var from = 0
            while from < text.count, let (start, end) = KMSClient.findStringValue(of: "plaintext", in: UnsafeRawBufferPointer(rebasing: text[from...])) {
                let (s, e) = (from + start, from + end)
                found += 1
                if found == 1 && secretAnswer && status == 0 {
                    let n = k.withUnsafeMutableBytes { Base64.decode(UnsafeRawBufferPointer(rebasing: text[s..<e]), into: $0) }
                    if n == FileHeader.dataKeySize { key = k }
                }
                for i in s..<e { text[i] = UInt8(ascii: "A") }
                blankedLength = e - s
                from = e + 1
            }
        }
        if key == nil { k.wipe() }
        let object = answer.withUnsafeBytes { b in
            try? JSONSerialization.jsonObject(with: Data(UnsafeRawBufferPointer(rebasing: b[0..<answer.count]))) as? [String: Any]
        }
        if let error = object?["error"] as? [String: Any] {
            key?.wipe()
            throw KeyError(KMSClient.kind(of: ExecKeyProvider.errorType(error["type"]), status: 400),
                           errorType: ExecKeyProvider.errorType(error["type"]), keyId: keyId,
                           message: ExecKeyProvider.printable(error["message"] as? String ?? "", limit: 300))
        }
        guard status == 0 else {
            key?.wipe()
            throw KeyError(.unreachable, errorType: "KeyCommandFailed", keyId: keyId,
                           message: status < 0 ? "the key command's exit status was lost on \(op)" : "the key command exited with status \(status) on \(op)")
        }
        // The key decoded must be the answer's own top-level "plaintext" (blanked above), and the only one.
        let top = object?["plaintext"] as? String
        let plaintextOK = secretAnswer
            ? key != nil && found == 1 && top?.utf8.count == blankedLength && top?.utf8.allSatisfy({ $0 == UInt8(ascii: "A") }) == true
            : found == 0 && top == nil
        guard let object, plaintextOK else {
            key?.wipe()
            throw KeyError(.other, errorType: "InvalidResponse", keyId: keyId, message: "the key command's answer to \(op) is not what kmsfs(1) says")
        }
        return (key, object)
    }

    /// A refusal's type as logged: at most 64 characters of letters, digits and ".:_-"; "KeyCommandError"
    /// when missing.
    static func errorType(_ value: Any?) -> String {
        let t = String((value as? String ?? "").unicodeScalars.filter {
            ($0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0))) || ".:_-".unicodeScalars.contains($0)
        }.prefix(64).map(Character.init))
        return t.isEmpty ? "KeyCommandError" : t
    }

    /// Text from the command as logged: control characters dropped, at most `limit` characters.
    static func printable(_ s: String, limit: Int) -> String {
        let clean = String(s.unicodeScalars.filter { $0.value >= 0x20 && $0.value != 0x7f }.map(Character.init))
        return clean.count > limit ? String(clean.prefix(limit)) + "..." : clean
    }

    private func blob(_ answer: [String: Any], _ op: String, _ keyId: String) throws -> [UInt8] {
        guard let text = answer["ciphertext"] as? String, let bytes = Base64.decode(text), !bytes.isEmpty, bytes.count <= 4096 else {
            throw KeyError(.other, errorType: "InvalidResponse", keyId: keyId, message: "the key command's answer to \(op) has no valid ciphertext")
        }
        return bytes
    }

    enum Stopped { case no, deadline, tooLong }

    /// Runs the command with `request` on its standard input; returns its exit status (or 128 + signal; -1 when
    /// it was lost), its standard output, and whether it was stopped (at the deadline, or for answering too
    /// much). A command that is stopped, or that kmsfs gives up on, is killed with its process group and reaped.
    private func run(_ request: SecureBuffer, keyId: String) throws -> (Int32, SecureBuffer, Stopped) {
        var input: [Int32] = [0, 0], output: [Int32] = [0, 0]
        guard kmsfs_pipe_cloexec(&input) == 0 else { throw spawnError(keyId, Errno.current) }
        guard kmsfs_pipe_cloexec(&output) == 0 else {
            close(input[0]); close(input[1])
            throw spawnError(keyId, Errno.current)
        }
        // A process started with 0, 1 or 2 closed can get them for these pipes: moved above 2, so that the
        // child's dup2 onto 0 and 1 never overwrites one it still has to copy.
        func lift(_ fd: inout Int32) {
            guard fd < 3 else { return }
            let moved = fcntl(fd, F_DUPFD_CLOEXEC, 3)
            if moved >= 0 { close(fd); fd = moved }
        }
        lift(&input[0]); lift(&input[1]); lift(&output[0]); lift(&output[1])
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, input[0], 0)
        posix_spawn_file_actions_adddup2(&actions, output[1], 1)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Its own process group (killed as a whole), default SIGPIPE, no blocked signals, nothing but 0-2 open.
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
        let r = kmsfs_spawn_closefrom(&actions, 3) == 0 ? posix_spawn(&pid, "/bin/sh", &actions, &attr, &argv, environ) : errno
        close(input[0]); close(output[1])
        guard r == 0 else {
            close(input[1]); close(output[0])
            throw spawnError(keyId, Errno(r))
        }
        var reaped = false
        var status: Int32 = 0
        defer {
            if !reaped {
                kill(-pid, SIGKILL)
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            }
        }
        defer { close(output[0]) }
        let deadline = Monotonic.seconds() + timeout
        // Write the request and read the answer together, without blocking: a command may answer before it
        // reads, or never read at all (EPIPE: it is judged by its answer).
        _ = fcntl(input[1], F_SETFL, fcntl(input[1], F_GETFL) | O_NONBLOCK)
        var writeFd: Int32 = input[1]
        var written = 0
        defer { if writeFd >= 0 { close(writeFd) } }
        let answer = try SecureBuffer(capacity: 4096)
        let chunk = try SecureBytes(count: 4096)
        var stopped = Stopped.no
        reading: while true {
            let left = deadline - Monotonic.seconds()
            if left <= 0 { stopped = .deadline; break }
            var fds = [pollfd(fd: output[0], events: Int16(POLLIN), revents: 0)]
            if writeFd >= 0 { fds.append(pollfd(fd: writeFd, events: Int16(POLLOUT), revents: 0)) }
            let p = poll(&fds, nfds_t(fds.count), Int32(min(left, 1) * 1000) + 1)
            if p < 0 && errno == EINTR { continue }
            if p <= 0 { continue }
            if writeFd >= 0 && fds.count > 1 && fds[1].revents != 0 {
                let n = request.withUnsafeBytes { b in write(writeFd, b.baseAddress! + written, b.count - written) }
                if n > 0 { written += n }
                if (n < 0 && errno != EAGAIN && errno != EINTR) || written == request.count {
                    close(writeFd)
                    writeFd = -1
                }
            }
            if fds[0].revents != 0 {
                let n = chunk.withUnsafeMutableBytes { read(output[0], $0.baseAddress, $0.count) }
                if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
                if n <= 0 { break reading }
                if answer.count + n > ExecKeyProvider.maximumAnswer { stopped = .tooLong; break }
                try chunk.withUnsafeBytes { try answer.append(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            }
        }
        if stopped != .no { return (-1, answer, stopped) }
        while true {
            let w = waitpid(pid, &status, WNOHANG)
            if w == pid { reaped = true; break }
            if w < 0 && errno != EINTR { reaped = true; return (-1, answer, .no) }  // lost (SIGCHLD ignored)
            if Monotonic.seconds() >= deadline { return (-1, answer, .deadline) }
            usleep(2000)
        }
        let signal = status & 0x7f
        return (signal == 0 ? (status >> 8) & 0xff : 128 + signal, answer, .no)
    }

    private func spawnError(_ keyId: String, _ e: Errno) -> KeyError {
        KeyError(.other, errorType: "KeyCommandUnavailable", keyId: keyId, message: "cannot run the key command: \(e)")
    }
}
