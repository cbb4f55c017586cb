import KmsfsCrypto
import Testing

@Suite("Crypto primitives")
struct CryptoTests {
    static func hex(_ s: String) -> [UInt8] { Hex.decode(s)! }

    @Test("AES-256-GCM matches the NIST GCM test vector (test case 16) and rejects any change")
    func gcmVector() throws {
        let key = try Self.hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308").withUnsafeBytes { try SecureBytes(copying: $0) }
        let plaintext = Self.hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
        let aad = Self.hex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
        let nonce = Self.hex("cafebabefacedbaddecaf888")
        let expected = Self.hex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662")
        let expectedTag = Self.hex("76fc6ece0f4e1768cddf8853bb2d551b")
        let gcm = try AESGCM(key: key)
        var ct = [UInt8](repeating: 0, count: plaintext.count)
        var tag = [UInt8](repeating: 0, count: 16)
        try plaintext.withUnsafeBytes { p in
            try aad.withUnsafeBytes { a in
                try ct.withUnsafeMutableBytes { c in
                    try tag.withUnsafeMutableBytes { t in
                        try gcm.seal(nonce: nonce, aad: a, plaintext: p, ciphertext: c.baseAddress!, tag: t.baseAddress!)
                    }
                }
            }
        }
        #expect(ct == expected)
        #expect(tag == expectedTag)

        func open(_ c: [UInt8], _ t: [UInt8], _ a: [UInt8], _ n: [UInt8]) -> [UInt8]? {
            var out = [UInt8](repeating: 0, count: c.count)
            let ok = c.withUnsafeBytes { cb in a.withUnsafeBytes { ab in out.withUnsafeMutableBytes { o in
                gcm.open(nonce: n, aad: ab, ciphertext: cb, tag: t, plaintext: o.baseAddress!) } } }
            return ok ? out : nil
        }
        #expect(open(ct, tag, aad, nonce) == plaintext)
        var badCt = ct; badCt[7] ^= 1
        #expect(open(badCt, tag, aad, nonce) == nil)
        var badTag = tag; badTag[15] ^= 0x80
        #expect(open(ct, badTag, aad, nonce) == nil)
        var badAad = aad; badAad[0] ^= 1
        #expect(open(ct, tag, badAad, nonce) == nil)
        var badNonce = nonce; badNonce[11] ^= 1
        #expect(open(ct, tag, aad, badNonce) == nil)
    }

    @Test("HKDF-SHA256 matches RFC 5869 test cases 1 and 3")
    func hkdfVectors() throws {
        let ikm = try [UInt8](repeating: 0x0b, count: 22).withUnsafeBytes { try SecureBytes(copying: $0) }
        let okm1 = try Digest.hkdfSHA256Public(ikm: ikm, salt: Self.hex("000102030405060708090a0b0c"),
                                               info: Self.hex("f0f1f2f3f4f5f6f7f8f9"), length: 42)
        #expect(Hex.encode(okm1) == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
        let okm3 = try Digest.hkdfSHA256Public(ikm: ikm, salt: [], info: [], length: 42)
        #expect(Hex.encode(okm3) == "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")
    }

    @Test("HMAC-SHA256 and SHA-256 match RFC 4231 test case 2 and FIPS 180-2")
    func hmacVector() throws {
        let mac = try Digest.hmacSHA256(key: Array("Jefe".utf8), data: Array("what do ya want for nothing?".utf8))
        #expect(Hex.encode(mac) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        #expect(Hex.encode(Digest.sha256(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    }

    @Test("Secret buffers are zero-filled, random when asked, and wiped by wipe()")
    func secureBytes() throws {
        let zero = try SecureBytes(count: 32)
        #expect(zero.withUnsafeBytes { $0.allSatisfy { $0 == 0 } })
        let a = try SecureBytes.random(count: 32)
        let b = try SecureBytes.random(count: 32)
        #expect(!a.constantTimeEquals(b))
        #expect(!a.withUnsafeBytes { $0.allSatisfy { $0 == 0 } })
        a.wipe()
        #expect(a.withUnsafeBytes { $0.allSatisfy { $0 == 0 } })
        // Many small secrets share locked pages; large ones get their own.
        let many = try (0..<500).map { _ in try SecureBytes.random(count: 32) }
        #expect(Set(many.map { $0.withUnsafeBytes { Array($0) } }).count == 500)
        let big = try SecureBytes(count: 10000)
        #expect(big.count == 10000)
    }

    @Test("Nonces never repeat: 4 threads draw 40,000 each, in sizes that straddle each thread's buffer, plus large draws")
    func noncesAreUnique() async throws {
        let perThread = 40_000
        let draws = try await withThrowingTaskGroup(of: [[UInt8]].self) { group in
            for t in 0..<4 {
                group.addTask {
                    var out: [[UInt8]] = []
                    out.reserveCapacity(perThread)
                    for i in 0..<perThread {
                        // 12-byte nonces mostly, with odd sizes so that draws cross buffer refills unaligned.
                        var n = [UInt8](repeating: 0, count: (i + t) % 7 == 0 ? 29 : 12)
                        try n.withUnsafeMutableBytes { try SecureRandom.fillNonces($0) }
                        out.append(n)
                    }
                    return out
                }
            }
            var all: [[UInt8]] = []
            for try await part in group { all += part }
            return all
        }
        #expect(draws.count == 4 * perThread)
        #expect(Set(draws).count == draws.count)
        #expect(!draws.contains { $0.allSatisfy { $0 == 0 } })
        // Larger than a buffer's share: straight from getrandom, and still never the same.
        var a = [UInt8](repeating: 0, count: 3000), b = [UInt8](repeating: 0, count: 3000)
        try a.withUnsafeMutableBytes { try SecureRandom.fillNonces($0) }
        try b.withUnsafeMutableBytes { try SecureRandom.fillNonces($0) }
        #expect(a != b)
        #expect(Set(a).count > 200)
    }
}
