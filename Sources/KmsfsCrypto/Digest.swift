import CLibCrypto
import Glibc

/// SHA-256, HMAC-SHA256 and HKDF-SHA256 (RFC 5869).
public enum Digest {
    public static let sha256Size = 32

    /// SHA-256 of public data.
    public static func sha256(_ data: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: sha256Size)
        out.withUnsafeMutableBufferPointer { o in
            _ = SHA256(data.baseAddress?.assumingMemoryBound(to: UInt8.self), data.count, o.baseAddress)
        }
        return out
    }

    public static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        bytes.withUnsafeBytes { sha256($0) }
    }

    /// OpenSSL's HMAC, fetched once (a fetch per call, as the one-shot HMAC() makes, costs more than the MAC).
    nonisolated(unsafe) private static let hmac: OpaquePointer? = EVP_MAC_fetch(nil, "HMAC", nil)
    nonisolated(unsafe) private static let digestParam = strdup("digest")!
    nonisolated(unsafe) private static let sha256Name = strdup("SHA256")!

    /// HMAC-SHA256 writing the 32-byte MAC to `out`.
    public static func hmacSHA256(key: UnsafeRawBufferPointer, data: UnsafeRawBufferPointer,
                                  into out: UnsafeMutableRawPointer) throws {
        try hmacSHA256(key: key, parts: [data], into: out)
    }

    /// An HMAC context with its digest set to SHA-256 and no key, never keyed itself: each MAC starts from a copy
    /// of it. Setting the digest by name on a new context looks it up every time, a third of a short MAC's cost
    /// (and creating a file takes about ten: its key derivation, header MAC and name tags).
    nonisolated(unsafe) private static let hmacTemplate: OpaquePointer? = {
        guard let mac = hmac, let ctx = EVP_MAC_CTX_new(mac) else { return nil }
        var params = [OSSL_PARAM_construct_utf8_string(digestParam, sha256Name, 0), OSSL_PARAM_construct_end()]
        guard EVP_MAC_CTX_set_params(ctx, &params) == 1 else {
            EVP_MAC_CTX_free(ctx)
            return nil
        }
        // An OpenSSL that cannot copy a context with no key yet gets the digest set on each new context instead.
        guard let probe = EVP_MAC_CTX_dup(ctx) else {
            EVP_MAC_CTX_free(ctx)
            return nil
        }
        EVP_MAC_CTX_free(probe)
        return ctx
    }()

    /// HMAC-SHA256 of the concatenation of `parts`, writing the 32-byte MAC to `out`.
    public static func hmacSHA256(key: UnsafeRawBufferPointer, parts: [UnsafeRawBufferPointer],
                                  into out: UnsafeMutableRawPointer) throws {
        let copied = hmacTemplate.flatMap { EVP_MAC_CTX_dup($0) }
        guard let ctx = copied ?? hmac.flatMap({ EVP_MAC_CTX_new($0) }) else { throw CryptoError.openSSL("HMAC-SHA256") }
        defer { EVP_MAC_CTX_free(ctx) }  // cleanses the keyed state
        // EVP_MAC_init accepts a NULL key only with length 0; pass a valid address for empty keys.
        let dummy: UInt8 = 0
        let ok = withUnsafePointer(to: dummy) { d in
            let k = key.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? d
            if copied != nil { return EVP_MAC_init(ctx, k, key.count, nil) == 1 }
            var params = [OSSL_PARAM_construct_utf8_string(digestParam, sha256Name, 0), OSSL_PARAM_construct_end()]
            return EVP_MAC_init(ctx, k, key.count, &params) == 1
        }
        guard ok else { throw CryptoError.openSSL("HMAC-SHA256 key") }
        for part in parts where part.count > 0 {
            guard EVP_MAC_update(ctx, part.baseAddress!.assumingMemoryBound(to: UInt8.self), part.count) == 1 else {
                throw CryptoError.openSSL("HMAC-SHA256 update")
            }
        }
        var length = 0
        guard EVP_MAC_final(ctx, out.assumingMemoryBound(to: UInt8.self), &length, 32) == 1, length == 32 else {
            throw CryptoError.openSSL("HMAC-SHA256 final")
        }
    }

    /// HMAC-SHA256 of public data under a public (or already exposed) key, e.g. the SigV4 signing chain.
    public static func hmacSHA256(key: [UInt8], data: [UInt8]) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        try key.withUnsafeBytes { (k) in
            try data.withUnsafeBytes { (d) in
                try out.withUnsafeMutableBytes { o in try hmacSHA256(key: k, data: d, into: o.baseAddress!) }
            }
        }
        return out
    }

    /// HKDF-SHA256: derives `length` secret bytes (at most 255 * 32) from `ikm`, `salt` and `info`.
    /// All intermediate values (PRK, T(i)) stay in locked memory and are wiped.
    public static func hkdfSHA256(ikm: SecureBytes, salt: [UInt8], info: [UInt8], length: Int) throws -> SecureBytes {
        try hkdfSHA256(ikm: ikm, salt: salt, infos: [info], length: length)[0]
    }

    /// HKDF-SHA256 with one extraction and an expansion per element of `infos`: exactly the outputs of separate
    /// HKDF calls with the same IKM and salt (HKDF-Extract does not depend on `info`), for less work.
    public static func hkdfSHA256(ikm: SecureBytes, salt: [UInt8], infos: [[UInt8]], length: Int) throws -> [SecureBytes] {
        precondition(length > 0 && length <= 255 * 32)
        let prk = try SecureBytes(count: 32)
        try ikm.withUnsafeBytes { (i) in
            try prk.withUnsafeMutableBytes { (p) in
                // RFC 5869: an absent salt is HashLen zero bytes.
                let key = salt.isEmpty ? [UInt8](repeating: 0, count: 32) : salt
                try key.withUnsafeBytes { k in try hmacSHA256(key: k, data: i, into: p.baseAddress!) }
            }
        }
        return try infos.map { info in try expand(prk: prk, info: info, length: length) }
    }

    /// HKDF-Expand: T(i) = HMAC(PRK, T(i-1) || info || i), output the first `length` bytes of T(1) || T(2) ...
    private static func expand(prk: SecureBytes, info: [UInt8], length: Int) throws -> SecureBytes {
        let output = try SecureBytes(count: length)
        let t = try SecureBytes(count: 32)
        var produced = 0
        var counter: UInt8 = 1
        while produced < length {
            try prk.withUnsafeBytes { (p) in
                try t.withUnsafeMutableBytes { (tb) in
                    try info.withUnsafeBytes { (i) in
                        try withUnsafeBytes(of: counter) { (c) in
                            let previous = UnsafeRawBufferPointer(start: tb.baseAddress!, count: produced > 0 ? 32 : 0)
                            try hmacSHA256(key: p, parts: [previous, i, c], into: tb.baseAddress!)
                        }
                    }
                }
            }
            let take = min(32, length - produced)
            t.withUnsafeBytes { tb in
                output.withUnsafeMutableBytes { o in (o.baseAddress! + produced).copyMemory(from: tb.baseAddress!, byteCount: take) }
            }
            produced += take
            counter &+= 1
        }
        return output
    }

    /// HKDF-SHA256 output that is public by design (e.g. a key commitment).
    public static func hkdfSHA256Public(ikm: SecureBytes, salt: [UInt8], info: [UInt8], length: Int) throws -> [UInt8] {
        let secret = try hkdfSHA256(ikm: ikm, salt: salt, info: info, length: length)
        return secret.withUnsafeBytes { Array($0) }
    }

    /// Constant-time equality of two public byte strings of equal length (MACs, commitments).
    public static func constantTimeEquals(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        if a.isEmpty { return true }
        return a.withUnsafeBytes { x in b.withUnsafeBytes { y in CRYPTO_memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } }
    }
}
