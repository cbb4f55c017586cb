import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// A 256-bit master key held by the local key provider, in locked memory.
public final class LocalMasterKey: @unchecked Sendable {
    /// "local:" and 16 hex digits of HMAC-SHA256(master key, "kmsfs local key id"): names the key without revealing it.
    public let keyId: String
    /// HKDF-SHA256(master key, info "kmsfs local wrap key"): the AES-256-GCM key that wraps data keys.
    let wrappingKey: SecureBytes
    /// Ciphers keyed with the wrapping key, reused (keying AES costs more than wrapping one data key).
    private let ciphersLock = Lock()
    private var ciphers: [AESGCM] = []

    /// Runs `body` with a cipher keyed with the wrapping key.
    func withCipher<R>(_ body: (AESGCM) throws -> R) throws -> R {
        let c = try ciphersLock.withLock { ciphers.popLast() } ?? AESGCM(key: wrappingKey)
        defer { ciphersLock.withLock { if ciphers.count < 4 { ciphers.append(c) } } }
        return try body(c)
    }

    public init(_ master: SecureBytes) throws {
        precondition(master.count == 32)
        var id = [UInt8](repeating: 0, count: 32)
        let label = Array("kmsfs local key id".utf8)
        try master.withUnsafeBytes { k in
            try label.withUnsafeBytes { l in try id.withUnsafeMutableBytes { try Digest.hmacSHA256(key: k, data: l, into: $0.baseAddress!) } }
        }
        keyId = "local:" + Hex.encode(id[0..<8])
        wrappingKey = try Digest.hkdfSHA256(ikm: master, salt: [], info: Array("kmsfs local wrap key".utf8), length: 32)
    }

    /// A fresh random master key.
    public static func generate() throws -> (key: LocalMasterKey, master: SecureBytes) {
        let master = try SecureBytes.random(count: 32)
        return (try LocalMasterKey(master), master)
    }
}

/// The key file of the local provider: comment lines starting with '#', then the 256-bit master key on one line,
/// either as 64 hex digits or, protected by a passphrase, as
/// `scrypt logN=L r=R p=P salt=<32 hex digits> key=<120 hex digits>`: the key sealed with AES-256-GCM (nonce,
/// ciphertext, tag) under scrypt(passphrase, salt, N = 2^L, r, p), associated data "kmsfs key file v1" || L || R
/// || P || salt. It is read into locked memory and parsed there.
public enum LocalKeyFile {
    public static let maximumSize = 4096
    /// scrypt parameters of new protected key files: N = 2^17, r = 8, p = 1 (128 MiB, about half a second
    /// here), the cost OWASP recommends for scrypt and twice gocryptfs's default N.
    public static let defaultLogN = 17
    public static let defaultR = 8
    public static let defaultP = 1
    /// The longest passphrase accepted, in bytes.
    public static let maximumPassphrase = 1024

    /// Reads the passphrase of the key file at the given path (from a terminal, a file or a command), into
    /// locked memory.
    public typealias PassphraseReader = @Sendable (_ keyFile: String) throws -> SecureBytes

    /// A passphrase and the scrypt cost to protect a key file with.
    public struct Protection {
        public let passphrase: SecureBytes
        public let logN: Int
        public init(passphrase: SecureBytes, logN: Int = LocalKeyFile.defaultLogN) {
            self.passphrase = passphrase
            self.logN = logN
        }
    }

    /// `$XDG_CONFIG_HOME/kmsfs/keys/<volume-id>.key`, `$XDG_CONFIG_HOME` defaulting to `~/.config`.
    public static func defaultPath(volumeId: String, environment: [String: String]) -> String {
        let base: String
        if let x = environment["XDG_CONFIG_HOME"], x.hasPrefix("/") {
            base = x
        } else {
            base = (environment["HOME"] ?? "/root") + "/.config"
        }
        return base + "/kmsfs/keys/" + volumeId + ".key"
    }

    /// Loads a key file; a protected one asks `passphrase` for its passphrase. Errors name the file and the
    /// problem, never its contents. A file other users may read or write is refused (as ssh refuses such private
    /// keys) unless `allowOpen`.
    public static func load(path: String, allowOpen: Bool = false, passphrase: PassphraseReader? = nil) throws -> LocalMasterKey {
        try loadWithMaster(path: path, allowOpen: allowOpen, passphrase: passphrase).key
    }

    /// `load`, also returning the master key itself (in locked memory), to store it again (`rewrite`).
    public static func loadWithMaster(path: String, allowOpen: Bool = false,
                                      passphrase: PassphraseReader? = nil) throws -> (key: LocalMasterKey, master: SecureBytes) {
        let buffer = try read(path, allowOpen: allowOpen)
        let master = try SecureBytes(count: 32)
        let found = try buffer.text.withUnsafeBytes { b -> Bool in
            let text = UnsafeRawBufferPointer(rebasing: b[0..<buffer.count])
            guard let line = keyLine(text) else { return false }
            if let sealed = ProtectedLine(UnsafeRawBufferPointer(rebasing: text[line])) {
                guard let passphrase else {
                    throw KeyError(.keyUnavailable, errorType: "KeyFileLocked", keyId: path,
                                   message: "key file \(path) is protected by a passphrase: give --passfile FILE or --extpass COMMAND, or run on a terminal")
                }
                let pw = try passphrase(path)
                defer { pw.wipe() }
                try sealed.open(passphrase: pw, into: master, path: path)
                return true
            }
            return master.withUnsafeMutableBytes { m in parseHex(UnsafeRawBufferPointer(rebasing: text[line]), into: m) }
        }
        guard found else {
            throw KeyError(.keyUnavailable, errorType: "KeyFileInvalid", keyId: path,
                           message: "key file \(path) does not hold a kmsfs key (64 hex digits, or a scrypt line, on one line)")
        }
        return (try LocalMasterKey(master), master)
    }

    /// True when the key file at `path` is protected by a passphrase (false when it is not, or cannot be read:
    /// loading it then says why).
    public static func isProtected(path: String) -> Bool {
        guard let buffer = try? read(path, allowOpen: true) else { return false }
        return buffer.text.withUnsafeBytes { b in
            let text = UnsafeRawBufferPointer(rebasing: b[0..<buffer.count])
            guard let line = keyLine(text) else { return false }
            return ProtectedLine(UnsafeRawBufferPointer(rebasing: text[line])) != nil
        }
    }

    /// The file's bytes, in locked memory.
    private static func read(_ path: String, allowOpen: Bool) throws -> (text: SecureBytes, count: Int) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 {
            let e = Errno.current
            throw KeyError(.keyUnavailable, errorType: "KeyFileUnreadable", keyId: path, message: "cannot open key file \(path): \(e)")
        }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        if st.st_mode & S_IFMT != S_IFREG {
            throw KeyError(.keyUnavailable, errorType: "KeyFileInvalid", keyId: path, message: "key file \(path) is not a regular file")
        }
        if st.st_mode & 0o077 != 0 {
            let mode = String(st.st_mode & 0o777, radix: 8)
            guard allowOpen else {
                throw KeyError(.keyUnavailable, errorType: "KeyFileTooOpen", keyId: path,
                               message: "key file \(path) is open to other users (mode \(mode)): chmod 600 it (or mount with --allow-open-key-file)")
            }
            Log.warning("key file \(path) is open to other users (mode \(mode)), accepted because of --allow-open-key-file; chmod 600 it")
        }
        let buffer = try SecureBytes(count: maximumSize + 1)
        let n = try buffer.withUnsafeMutableBytes { b in try FileIO.pread(fd, b.baseAddress!, count: b.count, offset: 0) }
        if n > maximumSize {
            throw KeyError(.keyUnavailable, errorType: "KeyFileInvalid", keyId: path, message: "key file \(path) is too large to be a kmsfs key file")
        }
        return (buffer, n)
    }

    /// Writes a new key file (mode 0600, parent directories 0700), refusing to overwrite an existing one; with
    /// `protection`, the key is sealed under its passphrase.
    public static func write(_ master: SecureBytes, to path: String, keyId: String, protection: Protection? = nil) throws {
        try makeDirectories(FileIO.directoryName(path))
        try store(try contents(master, keyId: keyId, protection: protection), at: path, replacing: false)
    }

    /// Replaces the key file at `path` with one holding the same key under another protection (a new
    /// passphrase, or none): written beside it, synced, then renamed over it, so a crash leaves one or the other.
    public static func rewrite(_ master: SecureBytes, at path: String, keyId: String, protection: Protection?) throws {
        try store(try contents(master, keyId: keyId, protection: protection), at: path, replacing: true)
    }

    private static func contents(_ master: SecureBytes, keyId: String, protection: Protection?) throws -> SecureBytes {
        let digits = Array("0123456789abcdef".utf8)
        func hex(_ bytes: UnsafeRawBufferPointer, into t: UnsafeMutableRawBufferPointer, at offset: Int) {
            for i in 0..<bytes.count {
                t[offset + 2 * i] = digits[Int(bytes[i] >> 4)]
                t[offset + 2 * i + 1] = digits[Int(bytes[i] & 0x0f)]
            }
        }
        guard let protection else {
            let comment = Array("# kmsfs local master key \(keyId)\n# Keep it secret and back it up: without it the volume cannot be decrypted.\n".utf8)
            let text = try SecureBytes(count: comment.count + 65)
            text.withUnsafeMutableBytes { t in
                comment.withUnsafeBytes { t.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: comment.count) }
                master.withUnsafeBytes { hex($0, into: t, at: comment.count) }
                t[comment.count + 64] = UInt8(ascii: "\n")
            }
            return text
        }
        let sealed = try ProtectedLine.seal(master, passphrase: protection.passphrase, logN: protection.logN)
        let comment = "# kmsfs local master key \(keyId), protected by a passphrase (scrypt)\n# Back it up, and remember the passphrase: without both the volume cannot be decrypted.\n"
        let line = comment + sealed.text + "\n"
        let text = try SecureBytes(count: line.utf8.count)
        text.withUnsafeMutableBytes { t in Array(line.utf8).withUnsafeBytes { t.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        return text
    }

    private static func store(_ text: SecureBytes, at path: String, replacing: Bool) throws {
        let target = replacing ? path + ".tmp-\(getpid())" : path
        let fd = open(target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        if fd < 0 {
            let e = Errno.current
            throw KeyError(.other, errorType: "KeyFileUnwritable", keyId: path, message: "cannot create key file \(target): \(e)")
        }
        var ok = false
        defer {
            close(fd)
            if !ok { unlink(target) }
        }
        do {
            try text.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: 0) }
            try syscall { fsync(fd) }
            if replacing {
                try syscall { rename(target, path) }
                let dir = open(FileIO.directoryName(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                if dir >= 0 { fsync(dir); close(dir) }
            }
        } catch {
            throw KeyError(.other, errorType: "KeyFileUnwritable", keyId: path, message: "cannot write key file \(path): \(error)")
        }
        ok = true
    }

    /// The first line that is not empty or a comment, trimmed of spaces, tabs and CR.
    static func keyLine(_ text: UnsafeRawBufferPointer) -> Range<Int>? {
        var i = 0
        while i < text.count {
            var end = i
            while end < text.count && text[end] != UInt8(ascii: "\n") { end += 1 }
            var s = i, e = end
            while s < e && (text[s] == 32 || text[s] == 9 || text[s] == 13) { s += 1 }
            while e > s && (text[e - 1] == 32 || text[e - 1] == 9 || text[e - 1] == 13) { e -= 1 }
            if s < e && text[s] != UInt8(ascii: "#") { return s..<e }
            i = end + 1
        }
        return nil
    }

    /// Decodes a line of exactly 64 hex digits into `out`, without copying.
    static func parseHex(_ line: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) -> Bool {
        guard line.count == 64 else { return false }
        for j in 0..<32 {
            guard let hi = Hex.value(line[2 * j]), let lo = Hex.value(line[2 * j + 1]) else {
                out.initializeMemory(as: UInt8.self, repeating: 0)
                return false
            }
            out[j] = hi << 4 | lo
        }
        return true
    }

    /// Finds the first non-comment line and decodes it as 64 hex digits into `out` (the unprotected form).
    static func parse(_ text: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) -> Bool {
        guard let line = keyLine(text) else { return false }
        return parseHex(UnsafeRawBufferPointer(rebasing: text[line]), into: out)
    }

    private static func makeDirectories(_ path: String) throws {
        do {
            try FileIO.makeDirectories(path, mode: 0o700, parentMode: 0o700)
        } catch {
            throw KeyError(.other, errorType: "KeyFileUnwritable", keyId: path, message: "cannot create directory \(path): \(error)")
        }
        chmod(path, 0o700)
    }
}

/// The key line of a passphrase-protected key file (no secret in it: the key is sealed).
struct ProtectedLine {
    static let prefix = "scrypt "
    static let aad = Array("kmsfs key file v1".utf8)
    static let saltSize = 16
    let logN: Int, r: Int, p: Int
    let salt: [UInt8]
    /// nonce (12) || sealed key (32) || tag (16)
    let sealed: [UInt8]

    var text: String {
        "scrypt logN=\(logN) r=\(r) p=\(p) salt=\(Hex.encode(salt)) key=\(Hex.encode(sealed))"
    }

    /// Parses `scrypt logN=L r=R p=P salt=HEX key=HEX` (fields in this order, one space apart, decimal numbers,
    /// hex of either case); nil for any other line, or for parameters a reader does not accept.
    init?(_ line: UnsafeRawBufferPointer) {
        // The raw bytes first: an unprotected file's key line (the master key in hex) is never copied out of locked memory.
        let prefix = Array(ProtectedLine.prefix.utf8)
        guard line.count < 512, line.count > prefix.count, zip(line, prefix).allSatisfy({ $0 == $1 }),
              let text = String(validating: Array(line), as: UTF8.self) else { return nil }
        let fields = text.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count == 6, fields[0] == "scrypt" else { return nil }
        func value(_ i: Int, _ name: String) -> Substring? {
            fields[i].hasPrefix(name + "=") ? fields[i].dropFirst(name.count + 1) : nil
        }
        func number(_ s: Substring?) -> Int? {
            guard let s, !s.isEmpty, s.count <= 3, s.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
            return Int(s)
        }
        guard let logN = number(value(1, "logN")), let r = number(value(2, "r")), let p = number(value(3, "p")),
              Scrypt.isAcceptable(logN: logN, r: r, p: p),
              let salt = value(4, "salt").flatMap({ Hex.decode(String($0)) }), salt.count == ProtectedLine.saltSize,
              let sealed = value(5, "key").flatMap({ Hex.decode(String($0)) }), sealed.count == AESGCM.nonceSize + 32 + AESGCM.tagSize
        else { return nil }
        (self.logN, self.r, self.p, self.salt, self.sealed) = (logN, r, p, salt, sealed)
    }

    private init(logN: Int, r: Int, p: Int, salt: [UInt8], sealed: [UInt8]) {
        (self.logN, self.r, self.p, self.salt, self.sealed) = (logN, r, p, salt, sealed)
    }

    var associatedData: [UInt8] { ProtectedLine.aad + [UInt8(logN), UInt8(r), UInt8(p)] + salt }

    static func seal(_ master: SecureBytes, passphrase: SecureBytes, logN: Int) throws -> ProtectedLine {
        let salt = try SecureRandom.bytes(saltSize)
        let r = LocalKeyFile.defaultR, p = LocalKeyFile.defaultP
        let key = try Scrypt.deriveKey(passphrase: passphrase, salt: salt, logN: logN, r: r, p: p)
        defer { key.wipe() }
        var line = ProtectedLine(logN: logN, r: r, p: p, salt: salt, sealed: [])
        var sealed = [UInt8](repeating: 0, count: AESGCM.nonceSize + 32 + AESGCM.tagSize)
        let aead = try AESGCM(key: key)
        let ad = line.associatedData
        try sealed.withUnsafeMutableBytes { b in
            try SecureRandom.fill(UnsafeMutableRawBufferPointer(rebasing: b[0..<AESGCM.nonceSize]))
            try ad.withUnsafeBytes { a in
                try master.withUnsafeBytes { m in
                    try aead.seal(nonce: b.baseAddress!, aad: a, plaintext: m, ciphertext: b.baseAddress! + AESGCM.nonceSize,
                                  tag: b.baseAddress! + AESGCM.nonceSize + 32)
                }
            }
        }
        line = ProtectedLine(logN: logN, r: r, p: p, salt: salt, sealed: sealed)
        return line
    }

    /// Opens the sealed key with `passphrase` into `out` (32 bytes); a wrong passphrase fails.
    func open(passphrase: SecureBytes, into out: SecureBytes, path: String) throws {
        let key = try Scrypt.deriveKey(passphrase: passphrase, salt: salt, logN: logN, r: r, p: p)
        defer { key.wipe() }
        let aead = try AESGCM(key: key)
        let ad = associatedData
        let ok = sealed.withUnsafeBytes { b in
            ad.withUnsafeBytes { a in
                out.withUnsafeMutableBytes { o in
                    aead.open(nonce: b.baseAddress!, aad: a,
                              ciphertext: UnsafeRawBufferPointer(rebasing: b[AESGCM.nonceSize..<AESGCM.nonceSize + 32]),
                              tag: b.baseAddress! + AESGCM.nonceSize + 32, plaintext: o.baseAddress!)
                }
            }
        }
        guard ok else {
            out.wipe()
            throw KeyError(.keyUnavailable, errorType: "WrongPassphrase", keyId: path, message: "wrong passphrase for key file \(path)")
        }
    }
}

/// The built-in key provider: data keys wrapped with AES-256-GCM under a key derived from a local master key.
///
/// Blob (61 bytes): version 0x01 || nonce (12) || encrypted data key (32) || tag (16), with associated data
/// "kmsfs local v1" || u16 key ID length || key ID || canonical encryption context. A wrong context, key or
/// blob fails authentication, which is reported as InvalidCiphertextException, as AWS KMS does.
public final class LocalKeyProvider: KeyProvider {
    public static let providerName = "local"
    public let name = LocalKeyProvider.providerName
    /// Version byte, nonce, encrypted key, tag.
    public let wrappedKeySizeBound = 61
    private let keys: [String: LocalMasterKey]

    public init(keys: [LocalMasterKey]) {
        var m: [String: LocalMasterKey] = [:]
        for k in keys { m[k.keyId] = k }
        self.keys = m
    }

    public func route(forKeyId keyId: String) -> String { "local" }

    public func describeKey(_ keyId: String) throws -> String {
        guard keys[keyId] != nil else {
            throw KeyError(.keyUnavailable, errorType: "NotFoundException", keyId: keyId, message: "no local key file holds this key")
        }
        return keyId
    }

    public func generateDataKey(keyId: String, context: EncryptionContext) throws -> (plaintext: SecureBytes, wrapped: WrappedKey) {
        let dataKey = try SecureBytes.random(count: FileHeader.dataKeySize)
        return (dataKey, try encrypt(dataKey: dataKey, keyId: keyId, context: context))
    }

    public func encrypt(dataKey: SecureBytes, keyId: String, context: EncryptionContext) throws -> WrappedKey {
        let key = try master(keyId)
        precondition(dataKey.count == FileHeader.dataKeySize)
        var blob = [UInt8](repeating: 0, count: 1 + 12 + 32 + 16)
        blob[0] = 1
        let aad = LocalKeyProvider.aad(keyId: keyId, context: context)
        try key.withCipher { aead in
            try blob.withUnsafeMutableBytes { b in
                try SecureRandom.fill(UnsafeMutableRawBufferPointer(rebasing: b[1..<13]))
                try aad.withUnsafeBytes { a in
                    try dataKey.withUnsafeBytes { d in
                        try aead.seal(nonce: b.baseAddress! + 1, aad: a, plaintext: d, ciphertext: b.baseAddress! + 13, tag: b.baseAddress! + 45)
                    }
                }
            }
        }
        return WrappedKey(provider: name, keyId: keyId, blob: blob)
    }

    public func decrypt(_ wrapped: WrappedKey, context: EncryptionContext) throws -> SecureBytes {
        let key = try master(wrapped.keyId)
        guard wrapped.provider == name, wrapped.blob.count == 61, wrapped.blob[0] == 1 else {
            throw KeyError(.invalidCiphertext, errorType: "InvalidCiphertextException", keyId: wrapped.keyId, message: "")
        }
        let aad = LocalKeyProvider.aad(keyId: wrapped.keyId, context: context)
        let out = try SecureBytes(count: FileHeader.dataKeySize)
        let ok = try key.withCipher { aead in
            wrapped.blob.withUnsafeBytes { b in
                aad.withUnsafeBytes { a in
                    out.withUnsafeMutableBytes { o in
                        aead.open(nonce: b.baseAddress! + 1, aad: a, ciphertext: UnsafeRawBufferPointer(rebasing: b[13..<45]),
                                  tag: b.baseAddress! + 45, plaintext: o.baseAddress!)
                    }
                }
            }
        }
        guard ok else {
            out.wipe()
            throw KeyError(.invalidCiphertext, errorType: "InvalidCiphertextException", keyId: wrapped.keyId, message: "")
        }
        return out
    }

    public func reEncrypt(_ wrapped: WrappedKey, toKeyId keyId: String, context: EncryptionContext) throws -> WrappedKey {
        let dataKey = try decrypt(wrapped, context: context)
        return try encrypt(dataKey: dataKey, keyId: keyId, context: context)
    }

    private func master(_ keyId: String) throws -> LocalMasterKey {
        guard let k = keys[keyId] else {
            throw KeyError(.keyUnavailable, errorType: "NotFoundException", keyId: keyId,
                           message: "the local key file for this key was not loaded")
        }
        return k
    }

    static func aad(keyId: String, context: EncryptionContext) -> [UInt8] {
        var a = Array("kmsfs local v1".utf8)
        let id = Array(keyId.utf8)
        a.append(UInt8(id.count >> 8)); a.append(UInt8(id.count & 0xff))
        a += id
        a += context.canonicalBytes
        return a
    }
}
