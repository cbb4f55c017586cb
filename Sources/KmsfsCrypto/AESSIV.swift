import CLibCrypto
import Synchronization

/// AES-SIV (RFC 5297) with AES-256 (a 64-byte key: 32 bytes for S2V's CMAC, 32 for CTR): deterministic
/// authenticated encryption. The same plaintext and associated data always give the same ciphertext, which is
/// what a name must have to be found again by lookup; any change to the ciphertext or to the associated data
/// makes `open` fail.
///
/// `seal` returns the 16-byte synthetic IV followed by the ciphertext (RFC 5297's output order). Thread-safe:
/// the key stays in locked memory (`SecureBytes`), and each call keys its own OpenSSL context, which OpenSSL
/// cleanses when it is freed at the end of the call, so no key schedule outlives the call in unlocked memory.
public final class AESSIV: @unchecked Sendable {
    public static let keySize = 64
    public static let tagSize = 16

    nonisolated(unsafe) private static let cipher: OpaquePointer? = EVP_CIPHER_fetch(nil, "AES-256-SIV", nil)
    private let key: SecureBytes
    private let wiped = Atomic<Bool>(false)

    public init(key: SecureBytes) throws {
        precondition(key.count == AESSIV.keySize, "AES-256-SIV needs a 64-byte key")
        guard AESSIV.cipher != nil else { throw CryptoError.openSSL("AES-256-SIV is not available") }
        self.key = key
    }

    /// Overwrites the key (at unmount); later calls fail.
    public func wipe() {
        wiped.store(true, ordering: .relaxed)
        key.wipe()
    }

    /// A context keyed for encryption or decryption; freed (and cleansed) by the caller.
    private func context(encrypt: Bool) throws -> OpaquePointer {
        guard !wiped.load(ordering: .relaxed) else { throw CryptoError.openSSL("AES-256-SIV key already wiped") }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw CryptoError.openSSL("EVP_CIPHER_CTX_new") }
        let ok = key.withUnsafeBytes { k in
            EVP_CipherInit_ex(ctx, AESSIV.cipher, nil, k.baseAddress!.assumingMemoryBound(to: UInt8.self), nil, encrypt ? 1 : 0)
        }
        guard ok == 1 else {
            EVP_CIPHER_CTX_free(ctx)
            throw CryptoError.openSSL("cannot key AES-256-SIV")
        }
        return ctx
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

/// Base64url without padding (RFC 4648 §5): the encoding of encrypted names in the backing directory. Decoding
/// is strict: one text per byte string (no padding, no other characters, unused trailing bits zero), so two
/// backing names can never decode to the same ciphertext.
public enum Base64URL {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

    public static func encodedLength(_ count: Int) -> Int { (count * 8 + 5) / 6 }

    public static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8]()
        out.reserveCapacity(encodedLength(bytes.count))
        var i = 0
        while i < bytes.count {
            let n = min(3, bytes.count - i)
            var v = UInt32(bytes[i]) << 16
            if n > 1 { v |= UInt32(bytes[i + 1]) << 8 }
            if n > 2 { v |= UInt32(bytes[i + 2]) }
            out.append(alphabet[Int(v >> 18 & 63)])
            out.append(alphabet[Int(v >> 12 & 63)])
            if n > 1 { out.append(alphabet[Int(v >> 6 & 63)]) }
            if n > 2 { out.append(alphabet[Int(v & 63)]) }
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    public static func decode(_ text: String) -> [UInt8]? {
        var out = [UInt8]()
        var acc: UInt32 = 0
        var bits = 0
        var count = 0
        for c in text.utf8 {
            let v: UInt32
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): v = UInt32(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): v = UInt32(c - UInt8(ascii: "a")) + 26
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = UInt32(c - UInt8(ascii: "0")) + 52
            case UInt8(ascii: "-"): v = 62
            case UInt8(ascii: "_"): v = 63
            default: return nil
            }
            acc = (acc << 6 | v) & 0xffff
            bits += 6
            count += 1
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
            }
        }
        // A length of 1 mod 4 is never produced; leftover bits must be zero.
        guard count % 4 != 1, acc & ((1 << UInt32(bits)) - 1) == 0 else { return nil }
        return out
    }
}
