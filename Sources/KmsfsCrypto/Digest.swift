import CLibCrypto

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

    /// HMAC-SHA256 writing the 32-byte MAC to `out`.
    public static func hmacSHA256(key: UnsafeRawBufferPointer, data: UnsafeRawBufferPointer,
                                  into out: UnsafeMutableRawPointer) throws {
        var len: UInt32 = 0
        // HMAC() accepts a NULL data pointer only with length 0; pass a valid address for empty inputs.
        let dummy: UInt8 = 0
        let ok = withUnsafePointer(to: dummy) { d in
            HMAC(EVP_sha256(), key.baseAddress ?? UnsafeRawPointer(d), Int32(key.count),
                 data.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? d, data.count,
                 out.assumingMemoryBound(to: UInt8.self), &len)
        }
        guard ok != nil, len == 32 else { throw CryptoError.openSSL("HMAC-SHA256") }
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
        precondition(length > 0 && length <= 255 * 32)
        let prk = try SecureBytes(count: 32)
        try ikm.withUnsafeBytes { (i) in
            try salt.withUnsafeBytes { (s) in
                try prk.withUnsafeMutableBytes { (p) in
                    // RFC 5869: an absent salt is HashLen zero bytes.
                    if s.isEmpty {
                        let zeros = [UInt8](repeating: 0, count: 32)
                        try zeros.withUnsafeBytes { z in try hmacSHA256(key: z, data: i, into: p.baseAddress!) }
                    } else {
                        try hmacSHA256(key: s, data: i, into: p.baseAddress!)
                    }
                }
            }
        }
        let output = try SecureBytes(count: length)
        // Block input: T(i-1) || info || i
        let block = try SecureBytes(count: 32 + info.count + 1)
        let t = try SecureBytes(count: 32)
        var produced = 0
        var counter: UInt8 = 1
        var previous = 0
        while produced < length {
            try block.withUnsafeMutableBytes { (b) in
                var n = 0
                if previous > 0 {
                    t.withUnsafeBytes { b.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: 32) }
                    n = 32
                }
                info.withUnsafeBytes { if !$0.isEmpty { (b.baseAddress! + n).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
                n += info.count
                b[n] = counter
                n += 1
                try prk.withUnsafeBytes { (p) in
                    try t.withUnsafeMutableBytes { (tb) in
                        try hmacSHA256(key: p, data: UnsafeRawBufferPointer(rebasing: b[0..<n]), into: tb.baseAddress!)
                    }
                }
            }
            let take = min(32, length - produced)
            t.withUnsafeBytes { tb in
                output.withUnsafeMutableBytes { o in (o.baseAddress! + produced).copyMemory(from: tb.baseAddress!, byteCount: take) }
            }
            produced += take
            previous = 32
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
