import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import Testing

/// A whole file body sealed and opened in memory with the format's chunk codec.
struct MemoryFile {
    var header: FileHeader
    var keys: FileKeys
    var bytes: [UInt8]

    static let sharedKey = try! LocalMasterKey.generate().key
    static let provider = LocalKeyProvider(keys: [sharedKey])

    init(plaintext: [UInt8], chunkSize: Int = 4096, fileId: [UInt8]? = nil) throws {
        let id = try fileId ?? SecureRandom.bytes(16)
        let context = EncryptionContext.forFile(volumeId: "00112233445566778899aabbccddeeff", fileId: id, user: ["team": "x"])
        let (dek, wrapped) = try MemoryFile.provider.generateDataKey(keyId: MemoryFile.sharedKey.keyId, context: context)
        keys = try FileKeys(dataKey: dek, fileId: id)
        header = try FileHeader(fileId: id, chunkSize: chunkSize, context: context, wrappedKeys: [wrapped], keys: keys)
        bytes = header.encoded()
        let layout = header.layout
        let codec = try ChunkCodec(chunkKey: keys.chunkKey, fileId: id, layout: layout)
        let count = layout.chunkCount(plaintextSize: plaintext.count)
        for i in 0..<count {
            let len = layout.plaintextLength(ofChunk: i, plaintextSize: plaintext.count)
            var out = [UInt8](repeating: 0, count: len + ChunkLayout.overhead)
            try plaintext.withUnsafeBytes { p in
                try out.withUnsafeMutableBytes { o in
                    try codec.seal(UnsafeRawBufferPointer(rebasing: p[(i * chunkSize)..<(i * chunkSize + len)]), index: i,
                                   isLast: i == count - 1, into: o.baseAddress!)
                }
            }
            bytes += out
        }
    }

    /// Opens every chunk; nil if any fails (as a read of the whole file would).
    func decrypt() throws -> [UInt8]? {
        let layout = header.layout
        let size = layout.plaintextSize(backingSize: bytes.count)
        let codec = try ChunkCodec(chunkKey: keys.chunkKey, fileId: header.fileId, layout: layout)
        var out = [UInt8](repeating: 0, count: size)
        let count = layout.chunkCount(plaintextSize: size)
        for i in 0..<count {
            let len = layout.plaintextLength(ofChunk: i, plaintextSize: size)
            let at = layout.backingOffset(ofChunk: i)
            let result = bytes.withUnsafeBytes { b in
                out.withUnsafeMutableBytes { o in
                    codec.open(UnsafeRawBufferPointer(rebasing: b[at..<(at + len + ChunkLayout.overhead)]), index: i,
                               isLast: i == count - 1, into: o.baseAddress! + i * layout.chunkSize)
                }
            }
            if result == .corrupt { return nil }
        }
        // A backing size no plaintext size produces is a damaged tail.
        return layout.isConsistent(backingSize: bytes.count) ? out : nil
    }
}


func randomBytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255) } }

@Suite("On-disk format")
struct FormatTests {
    let provider = LocalKeyProvider(keys: [MemoryFile.sharedKey])

    @Test("The plaintext size follows from the backing size, for every size around the chunk size")
    func layoutArithmetic() {
        for c in [4096, 65536] {
            let layout = ChunkLayout(headerLength: 512, chunkSize: c)
            for base in [0, c, 2 * c, 5 * c] {
                for delta in -2...2 where base + delta >= 0 {
                    let p = base + delta
                    let b = layout.backingSize(plaintextSize: p)
                    #expect(layout.plaintextSize(backingSize: b) == p)
                    #expect(layout.isConsistent(backingSize: b))
                }
            }
            #expect(layout.backingSize(plaintextSize: 0) == 512)
            #expect(layout.backingSize(plaintextSize: 1) == 512 + 29)
            #expect(layout.backingSize(plaintextSize: c) == 512 + c + 28)
            // A tail with no room for data is not a size any file has.
            #expect(!layout.isConsistent(backingSize: 512 + 10))
            #expect(!layout.isConsistent(backingSize: 512 + c + 28 + 28))
        }
    }

    @Test("Chunks round-trip at every size around the chunk size", arguments: [0, 1, 100, 4095, 4096, 4097, 8191, 8192, 8193, 12288, 20000])
    func roundTrip(size: Int) throws {
        let data = randomBytes(size)
        let file = try MemoryFile(plaintext: data)
        #expect(file.bytes.count == file.header.layout.backingSize(plaintextSize: size))
        #expect(try file.decrypt() == data)
    }

    @Test("The same plaintext seals differently every time (fresh random nonces)")
    func freshNonces() throws {
        let data = randomBytes(5000)
        let a = try MemoryFile(plaintext: data)
        let codec = try ChunkCodec(chunkKey: a.keys.chunkKey, fileId: a.header.fileId, layout: a.header.layout)
        var x = [UInt8](repeating: 0, count: 100 + 28), y = x
        try data.withUnsafeBytes { d in
            try x.withUnsafeMutableBytes { try codec.seal(UnsafeRawBufferPointer(rebasing: d[0..<100]), index: 0, isLast: true, into: $0.baseAddress!) }
            try y.withUnsafeMutableBytes { try codec.seal(UnsafeRawBufferPointer(rebasing: d[0..<100]), index: 0, isLast: true, into: $0.baseAddress!) }
        }
        #expect(x[0..<12] != y[0..<12])
        #expect(x != y)
    }

    @Test("A flipped bit in any nonce, ciphertext or tag byte of any chunk is detected")
    func tamperEveryByte() throws {
        let data = randomBytes(4096 + 300)
        let file = try MemoryFile(plaintext: data)
        let h = file.header.headerLength
        // Every byte of the second (partial) chunk, and a spread of bytes across the first.
        let positions = Array(stride(from: h, to: h + 4096 + 28, by: 97)) + [h, h + 11, h + 12, h + 4096 + 27] +
            Array((h + 4096 + 28)..<file.bytes.count)
        for pos in positions {
            var t = file
            t.bytes[pos] ^= 0x01
            #expect(try t.decrypt() == nil, "flip at byte \(pos) went undetected")
        }
    }

    @Test("Chunks swapped inside a file are detected")
    func swappedChunks() throws {
        let data = randomBytes(4096 * 3)
        var file = try MemoryFile(plaintext: data)
        let l = file.header.layout
        let a = l.backingOffset(ofChunk: 0), b = l.backingOffset(ofChunk: 1), n = l.storedChunkSize
        let first = Array(file.bytes[a..<(a + n)])
        file.bytes.replaceSubrange(a..<(a + n), with: file.bytes[b..<(b + n)])
        file.bytes.replaceSubrange(b..<(b + n), with: first)
        #expect(try file.decrypt() == nil)
    }

    @Test("A chunk copied from another file is detected, even under the same data key")
    func chunkFromAnotherFile() throws {
        let data = randomBytes(4096 * 2)
        let one = try MemoryFile(plaintext: data)
        var two = try MemoryFile(plaintext: data)
        let l = one.header.layout
        let at = l.backingOffset(ofChunk: 0)
        two.bytes.replaceSubrange(at..<(at + l.storedChunkSize), with: one.bytes[at..<(at + l.storedChunkSize)])
        #expect(try two.decrypt() == nil)

        // Same key, different file ID: the file ID in the associated data still tells them apart.
        var three = one
        three.header.fileId = randomBytes(16)
        let codec = try ChunkCodec(chunkKey: one.keys.chunkKey, fileId: three.header.fileId, layout: l)
        var out = [UInt8](repeating: 0, count: 4096)
        let r = one.bytes.withUnsafeBytes { b in out.withUnsafeMutableBytes { o in
            codec.open(UnsafeRawBufferPointer(rebasing: b[at..<(at + l.storedChunkSize)]), index: 0, isLast: false, into: o.baseAddress!) } }
        #expect(r == .corrupt)
    }

    @Test("A backing file cut mid-chunk or exactly at a chunk boundary is detected")
    func truncation() throws {
        let data = randomBytes(4096 * 3 + 1000)
        let file = try MemoryFile(plaintext: data)
        let l = file.header.layout
        var cutAtBoundary = file
        cutAtBoundary.bytes.removeSubrange(l.backingOffset(ofChunk: 2)...)
        #expect(l.plaintextSize(backingSize: cutAtBoundary.bytes.count) == 8192)
        #expect(try cutAtBoundary.decrypt() == nil)
        var cutAtLastBoundary = file
        cutAtLastBoundary.bytes.removeSubrange(l.backingOffset(ofChunk: 3)...)
        #expect(try cutAtLastBoundary.decrypt() == nil)
        var cutMid = file
        cutMid.bytes.removeLast(500)
        #expect(try cutMid.decrypt() == nil)
        var cutIntoOverhead = file
        cutIntoOverhead.bytes.removeSubrange((l.backingOffset(ofChunk: 3) + 10)...)
        #expect(try cutIntoOverhead.decrypt() == nil)
    }

    @Test("An all-zero full chunk is a hole and reads as zeros; an all-zero last chunk is corruption")
    func holes() throws {
        let data = randomBytes(4096 * 3)
        var file = try MemoryFile(plaintext: data)
        let l = file.header.layout
        let at = l.backingOffset(ofChunk: 1)
        file.bytes.replaceSubrange(at..<(at + l.storedChunkSize), with: [UInt8](repeating: 0, count: l.storedChunkSize))
        var expected = data
        expected.replaceSubrange(4096..<8192, with: [UInt8](repeating: 0, count: 4096))
        #expect(try file.decrypt() == expected)
        let last = l.backingOffset(ofChunk: 2)
        file.bytes.replaceSubrange(last..<(last + l.storedChunkSize), with: [UInt8](repeating: 0, count: l.storedChunkSize))
        #expect(try file.decrypt() == nil)
        // A zeroed nonce alone (rest intact) is not a hole.
        var nonceOnly = try MemoryFile(plaintext: data)
        nonceOnly.bytes.replaceSubrange(at..<(at + 12), with: [UInt8](repeating: 0, count: 12))
        #expect(try nonceOnly.decrypt() == nil)
    }

    @Test("Headers round-trip and authenticate under their own keys only")
    func headerRoundTrip() throws {
        let file = try MemoryFile(plaintext: randomBytes(10))
        let decoded = try FileHeader(decoding: file.bytes)
        #expect(decoded == file.header)
        #expect(decoded.headerLength % 512 == 0)
        try decoded.authenticate(with: file.keys)
        try decoded.checkContext(volumeId: "00112233445566778899aabbccddeeff")
        #expect(throws: FormatError.self) { try decoded.checkContext(volumeId: "ffffffffffffffffffffffffffffffff") }
        let other = try MemoryFile(plaintext: randomBytes(10))
        #expect(throws: FormatError.keyCommitmentMismatch) { try decoded.authenticate(with: other.keys) }
        #expect(try HeaderPrefix(file.bytes).headerLength == decoded.headerLength)
    }

    /// Opens a header the way a mount does: parse, unwrap with the provider, check commitment and MAC.
    func openHeader(_ bytes: [UInt8]) -> Bool {
        guard let h = try? FileHeader(decoding: bytes) else { return false }
        for w in h.wrappedKeys {
            guard let dek = try? provider.decrypt(w, context: h.context),
                  let k = try? FileKeys(dataKey: dek, fileId: h.fileId) else { continue }
            if (try? h.authenticate(with: k)) != nil { return true }
        }
        return false
    }

    @Test("A flipped bit in any header byte makes the header fail to open")
    func tamperHeader() throws {
        let file = try MemoryFile(plaintext: randomBytes(100))
        #expect(openHeader(file.bytes))
        let h = file.header.headerLength
        for pos in 0..<h {
            for bit in [0, 7] {
                var t = file.bytes
                t[pos] ^= UInt8(1 << bit)
                #expect(!openHeader(t), "flip of bit \(bit) at header byte \(pos) went undetected")
            }
        }
    }

    @Test("A header cannot carry two wrapped keys that unwrap to different keys")
    func keyCommitment() throws {
        let file = try MemoryFile(plaintext: randomBytes(100))
        // An attacker who can wrap keys adds a second wrapped key holding another data key, first in line.
        let (_, foreign) = try provider.generateDataKey(keyId: MemoryFile.sharedKey.keyId, context: file.header.context)
        var forged = file.header
        forged.wrappedKeys = [foreign] + file.header.wrappedKeys
        let bytes = forged.encoded()
        let h = try FileHeader(decoding: bytes)
        let dek = try provider.decrypt(h.wrappedKeys[0], context: h.context)
        #expect(throws: FormatError.keyCommitmentMismatch) { try h.authenticate(with: try FileKeys(dataKey: dek, fileId: h.fileId)) }
        // The genuine wrapped key still opens it.
        #expect(openHeader(bytes))
    }

    @Test("Rotation replaces wrapped keys in place when they fit, and grows the header when not")
    func rewrapHeader() throws {
        let file = try MemoryFile(plaintext: randomBytes(100))
        let same = try file.header.replacingWrappedKeys(file.header.wrappedKeys)
        #expect(same.headerLength == file.header.headerLength)
        let many = Array(repeating: file.header.wrappedKeys[0], count: 12)
        let grown = try file.header.replacingWrappedKeys(many)
        #expect(grown.headerLength > file.header.headerLength)
        let decoded = try FileHeader(decoding: grown.encoded())
        try decoded.authenticate(with: file.keys)
        #expect(decoded.wrappedKeys.count == 12)
    }

    @Test("Unknown magic, versions and malformed prefixes are refused")
    func badPrefixes() throws {
        let file = try MemoryFile(plaintext: [1, 2, 3])
        var magic = file.bytes; magic[0] = UInt8(ascii: "X")
        #expect(throws: FormatError.notAKmsfsFile) { try HeaderPrefix(magic) }
        var version = file.bytes; version[5] = 2
        #expect(throws: FormatError.unsupportedVersion(2)) { try HeaderPrefix(version) }
        var chunk = file.bytes; chunk[14] = 0x11
        #expect(throws: FormatError.self) { try HeaderPrefix(chunk) }
        #expect(throws: FormatError.truncatedHeader) { try HeaderPrefix(Array(file.bytes[0..<10])) }
        #expect(throws: FormatError.truncatedHeader) { try FileHeader(decoding: Array(file.bytes[0..<100])) }
    }

    @Test("Volume configs round-trip and bad ones are refused with a reason")
    func volumeConfig() throws {
        let config = VolumeConfig(volumeId: try VolumeConfig.newVolumeId(), chunkSize: 65536, encryptionContext: ["a": "b"],
                                  keyProvider: KeyProviderConfig(type: "local", keyIds: ["local:0011223344556677"]), formatVersion: 2)
        #expect(try VolumeConfig.decode(try config.encoded()) == config)
        #expect(throws: FormatError.self) { try VolumeConfig.decode(Array("{".utf8)) }
        var bad = config; bad.chunkSize = 1000
        #expect(throws: FormatError.self) { try VolumeConfig.decode(try bad.encoded()) }
        bad = config; bad.formatVersion = 9
        #expect(throws: FormatError.self) { try VolumeConfig.decode(try bad.encoded()) }
        bad = config; bad.encryptionContext = ["kmsfs:file-id": "x"]
        #expect(throws: FormatError.self) { try VolumeConfig.decode(try bad.encoded()) }
    }
}
