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

/// The key file of the local provider: comment lines starting with '#', then the 256-bit master key as
/// 64 hex digits on one line. It is read into locked memory and parsed there.
public enum LocalKeyFile {
    public static let maximumSize = 4096

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

    /// Loads a key file. Errors name the file and the problem, never its contents. A file other users may read
    /// or write is refused (as ssh refuses such private keys) unless `allowOpen`.
    public static func load(path: String, allowOpen: Bool = false) throws -> LocalMasterKey {
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
        let master = try SecureBytes(count: 32)
        let found = buffer.withUnsafeBytes { b in master.withUnsafeMutableBytes { m in parse(UnsafeRawBufferPointer(rebasing: b[0..<n]), into: m) } }
        guard found else {
            throw KeyError(.keyUnavailable, errorType: "KeyFileInvalid", keyId: path,
                           message: "key file \(path) does not hold a kmsfs key (64 hex digits on one line)")
        }
        return try LocalMasterKey(master)
    }

    /// Writes a new key file (mode 0600, parent directories 0700), refusing to overwrite an existing one.
    public static func write(_ master: SecureBytes, to path: String, keyId: String) throws {
        try makeDirectories(FileIO.directoryName(path))
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        if fd < 0 {
            let e = Errno.current
            throw KeyError(.other, errorType: "KeyFileUnwritable", keyId: path, message: "cannot create key file \(path): \(e)")
        }
        var ok = false
        defer {
            close(fd)
            if !ok { unlink(path) }
        }
        let comment = Array("# kmsfs local master key \(keyId)\n# Keep it secret and back it up: without it the volume cannot be decrypted.\n".utf8)
        let text = try SecureBytes(count: comment.count + 65)
        text.withUnsafeMutableBytes { t in
            comment.withUnsafeBytes { t.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: comment.count) }
            let digits = Array("0123456789abcdef".utf8)
            master.withUnsafeBytes { m in
                for i in 0..<32 {
                    t[comment.count + 2 * i] = digits[Int(m[i] >> 4)]
                    t[comment.count + 2 * i + 1] = digits[Int(m[i] & 0x0f)]
                }
            }
            t[comment.count + 64] = UInt8(ascii: "\n")
        }
        do {
            try text.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: 0) }
            try syscall { fsync(fd) }
        } catch {
            throw KeyError(.other, errorType: "KeyFileUnwritable", keyId: path, message: "cannot write key file \(path): \(error)")
        }
        ok = true
    }

    /// Finds the first non-comment line and decodes it as 64 hex digits into `out`, without copying.
    static func parse(_ text: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) -> Bool {
        var i = 0
        while i < text.count {
            var end = i
            while end < text.count && text[end] != UInt8(ascii: "\n") { end += 1 }
            var s = i, e = end
            while s < e && (text[s] == 32 || text[s] == 9 || text[s] == 13) { s += 1 }
            while e > s && (text[e - 1] == 32 || text[e - 1] == 9 || text[e - 1] == 13) { e -= 1 }
            if s < e && text[s] != UInt8(ascii: "#") {
                guard e - s == 64 else { return false }
                for j in 0..<32 {
                    guard let hi = Hex.value(text[s + 2 * j]), let lo = Hex.value(text[s + 2 * j + 1]) else {
                        out.initializeMemory(as: UInt8.self, repeating: 0)
                        return false
                    }
                    out[j] = hi << 4 | lo
                }
                return true
            }
            i = end + 1
        }
        return false
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
