import CLibCrypto
import KmsfsSystem

/// AES-SIV (RFC 5297) with AES-256 (a 64-byte key: 32 bytes for S2V's CMAC, 32 for CTR): deterministic
/// authenticated encryption. The same plaintext and associated data always give the same ciphertext, which is
/// what a name must have to be found again by lookup; any change to the ciphertext or to the associated data
/// makes `open` fail.
///
/// `seal` returns the 16-byte synthetic IV followed by the ciphertext (RFC 5297's output order). Thread-safe:
/// the key is set up once into OpenSSL contexts (CMAC subkeys and the AES key schedule), and each call works on
/// a copy, which costs a third of keying a fresh context. Those contexts hold the key in OpenSSL's memory, as the
/// AES-GCM contexts of open files do (locked with the rest of the daemon by mlockall); `wipe` frees them, and
/// OpenSSL cleanses them when freed.
public final class AESSIV: @unchecked Sendable {
    public static let keySize = 64
    public static let tagSize = 16

    nonisolated(unsafe) private static let cipher: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-SIV", nil)
    /// Keyed contexts for sealing and opening; nil once wiped. Calls copy them under the read lock.
    private var templates: (seal: OpaquePointer, open: OpaquePointer)?
    private let lock = ReadWriteLock()

    public init(key: SecureBytes) throws {
        precondition(key.count == AESSIV.keySize, "AES-256-SIV needs a 64-byte key")
        guard let cipher = AESSIV.cipher else { throw CryptoError.openSSL("AES-256-SIV is not available") }
        var made: [OpaquePointer] = []
        for encrypt: Int32 in [1, 0] {
            guard let ctx = EVP_CIPHER_CTX_new() else { break }
            made.append(ctx)
            let ok = key.withUnsafeBytes { k in
                EVP_CipherInit_ex(ctx, cipher, nil, k.baseAddress!.assumingMemoryBound(to: UInt8.self), nil, encrypt)
            }
            guard ok == 1 else { break }
        }
        guard made.count == 2 else {
            made.forEach { EVP_CIPHER_CTX_free($0) }
            throw CryptoError.openSSL("cannot key AES-256-SIV")
        }
        templates = (made[0], made[1])
    }

    deinit { wipe() }

    /// Frees the keyed contexts (at unmount); later calls fail.
    public func wipe() {
        lock.withWriteLock {
            if let t = templates {
                EVP_CIPHER_CTX_free(t.seal)
                EVP_CIPHER_CTX_free(t.open)
            }
            templates = nil
        }
    }

    /// A context keyed for encryption or decryption; freed (and cleansed) by the caller.
    private func context(encrypt: Bool) throws -> OpaquePointer {
        try lock.withReadLock {
            guard let t = templates else { throw CryptoError.openSSL("AES-256-SIV key already wiped") }
            guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openSSL("EVP_CIPHER_CTX_new") }
            guard EVP_CIPHER_CTX_copy(ctx, encrypt ? t.seal : t.open) == 1 else {
                EVP_CIPHER_CTX_free(ctx)
                throw CryptoError.openSSL("EVP_CIPHER_CTX_copy")
            }
            return ctx
        }
    }

    /// SIV || ciphertext of `plaintext` under the associated data vector `ad` (each element a separate S2V input).
    public func seal(ad: [[UInt8]], plaintext: [UInt8]) throws -> [UInt8] {
        let ctx = try context(encrypt: true)
        defer { EVP_CIPHER_CTX_free(ctx) }
        var outLen: Int32 = 0
        for a in ad {
            let ok = a.withUnsafeBufferPointer { EVP_CipherUpdate(ctx, nil, &outLen, $0.baseAddress ?? emptyInput, Int32($0.count)) }
            guard ok == 1 else { throw CryptoError.openSSL("SIV associated data") }
        }
        var out = [UInt8](repeating: 0, count: AESSIV.tagSize + plaintext.count)
        let ok = out.withUnsafeMutableBufferPointer { o in
            plaintext.withUnsafeBufferPointer { p in
                EVP_CipherUpdate(ctx, o.baseAddress! + AESSIV.tagSize, &outLen, p.baseAddress ?? emptyInput, Int32(p.count)) == 1
                    && EVP_CipherFinal_ex(ctx, o.baseAddress! + AESSIV.tagSize, &outLen) == 1
                    && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, Int32(AESSIV.tagSize), o.baseAddress!) == 1
            }
        }
        guard ok else { throw CryptoError.openSSL("SIV encryption") }
        return out
    }

    /// The plaintext of SIV || ciphertext, or nil when it does not authenticate under `ad` (the SIV is
    /// compared in constant time by OpenSSL).
    public func open(ad: [[UInt8]], sealed: [UInt8]) -> [UInt8]? {
        guard sealed.count >= AESSIV.tagSize, let ctx = try? context(encrypt: false) else { return nil }
        defer { EVP_CIPHER_CTX_free(ctx) }
        var outLen: Int32 = 0
        var tag = Array(sealed[0..<AESSIV.tagSize])
        guard EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, Int32(AESSIV.tagSize), &tag) == 1 else { return nil }
        for a in ad {
            let ok = a.withUnsafeBufferPointer { EVP_CipherUpdate(ctx, nil, &outLen, $0.baseAddress ?? emptyInput, Int32($0.count)) }
            guard ok == 1 else { return nil }
        }
        var out = [UInt8](repeating: 0, count: sealed.count - AESSIV.tagSize)
        let ok = out.withUnsafeMutableBufferPointer { o in
            sealed.withUnsafeBufferPointer { s in
                EVP_CipherUpdate(ctx, o.baseAddress ?? scratch, &outLen, s.baseAddress! + AESSIV.tagSize, Int32(s.count - AESSIV.tagSize)) == 1
                    && EVP_CipherFinal_ex(ctx, o.baseAddress ?? scratch, &outLen) == 1
            }
        }
        return ok ? out : nil
    }
}

/// A valid address for zero-length inputs and outputs (OpenSSL rejects NULL data in some update calls).
nonisolated(unsafe) private let emptyInput = UnsafePointer(UnsafeMutablePointer<UInt8>.allocate(capacity: 16))
nonisolated(unsafe) private let scratch = UnsafeMutablePointer<UInt8>.allocate(capacity: 16)
