import CLibCrypto

/// AES-256-GCM with a 96-bit nonce and a 128-bit tag, keyed once and reused for many messages.
///
/// Setting up the key schedule costs more than sealing a small message, so a caller that seals or opens
/// several chunks keys one `AESGCM` and passes a fresh nonce per message. An instance is not thread-safe:
/// use one per thread (they are cheap). The OpenSSL context, which holds the expanded key, is cleansed
/// by OpenSSL when freed.
public final class AESGCM {
    public static let keySize = 32
    public static let nonceSize = 12
    public static let tagSize = 16

    private let ctx: OpaquePointer

    nonisolated(unsafe) private static let cipher: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-GCM", nil)

    public init(key: SecureBytes) throws {
        precondition(key.count == AESGCM.keySize, "AES-256 needs a 32-byte key")
        guard let cipher = AESGCM.cipher else { throw CryptoError.openSSL("AES-256-GCM is not available") }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openSSL("EVP_CIPHER_CTX_new") }
        self.ctx = ctx
        let ok = key.withUnsafeBytes { k in
            EVP_CipherInit_ex(ctx, cipher, nil, k.baseAddress!.assumingMemoryBound(to: UInt8.self), nil, 1)
        }
        guard ok == 1 else { throw CryptoError.openSSL("cannot key AES-256-GCM") }
    }

    deinit { EVP_CIPHER_CTX_free(ctx) }

    /// Encrypts `plaintext` into `ciphertext` (same length) and writes the 16-byte tag.
    public func seal(nonce: UnsafeRawPointer, aad: UnsafeRawBufferPointer, plaintext: UnsafeRawBufferPointer,
                     ciphertext: UnsafeMutableRawPointer, tag: UnsafeMutableRawPointer) throws {
        guard EVP_CipherInit_ex(ctx, nil, nil, nil, nonce.assumingMemoryBound(to: UInt8.self), 1) == 1 else {
            throw CryptoError.openSSL("GCM nonce setup")
        }
        var outLen: Int32 = 0
        if aad.count > 0 {
            guard EVP_CipherUpdate(ctx, nil, &outLen, aad.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(aad.count)) == 1 else {
                throw CryptoError.openSSL("GCM associated data")
            }
        }
        var done = 0
        while done < plaintext.count {
            let n = min(plaintext.count - done, 1 << 30)
            guard EVP_CipherUpdate(ctx, (ciphertext + done).assumingMemoryBound(to: UInt8.self), &outLen,
                                   (plaintext.baseAddress! + done).assumingMemoryBound(to: UInt8.self), Int32(n)) == 1 else {
                throw CryptoError.openSSL("GCM encryption")
            }
            done += Int(outLen)
        }
        guard EVP_CipherFinal_ex(ctx, (ciphertext + done).assumingMemoryBound(to: UInt8.self), &outLen) == 1,
              EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, Int32(AESGCM.tagSize), tag) == 1 else {
            throw CryptoError.openSSL("GCM finalization")
        }
    }

    /// Decrypts and authenticates. Returns false (and leaves `plaintext` unspecified, so callers must not use it)
    /// when the tag does not verify; GCM compares the tag in constant time.
    public func open(nonce: UnsafeRawPointer, aad: UnsafeRawBufferPointer, ciphertext: UnsafeRawBufferPointer,
                     tag: UnsafeRawPointer, plaintext: UnsafeMutableRawPointer) -> Bool {
        guard EVP_CipherInit_ex(ctx, nil, nil, nil, nonce.assumingMemoryBound(to: UInt8.self), 0) == 1 else { return false }
        var outLen: Int32 = 0
        if aad.count > 0 {
            guard EVP_CipherUpdate(ctx, nil, &outLen, aad.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(aad.count)) == 1 else {
                return false
            }
        }
        var done = 0
        while done < ciphertext.count {
            let n = min(ciphertext.count - done, 1 << 30)
            guard EVP_CipherUpdate(ctx, (plaintext + done).assumingMemoryBound(to: UInt8.self), &outLen,
                                   (ciphertext.baseAddress! + done).assumingMemoryBound(to: UInt8.self), Int32(n)) == 1 else {
                return false
            }
            done += Int(outLen)
        }
        guard EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, Int32(AESGCM.tagSize), UnsafeMutableRawPointer(mutating: tag)) == 1 else {
            return false
        }
        return EVP_CipherFinal_ex(ctx, (plaintext + done).assumingMemoryBound(to: UInt8.self), &outLen) == 1
    }
}
