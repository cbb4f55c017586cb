import KmsfsCrypto

/// Seals and opens the body chunks of one file (format v1).
///
/// Each chunk is AES-256-GCM under the file's chunk key with a fresh random 96-bit nonce, and associated data
///
///     file ID (16) || chunk index (u64 big-endian) || last-chunk flag (1 byte: 1 for the file's last chunk, else 0)
///
/// so a chunk only opens at its own index in its own file, and only as the last chunk if it was sealed as the
/// last one: swapping, moving, or cutting the file (mid-chunk or at a chunk boundary) fails authentication.
///
/// A full, non-last chunk whose stored bytes are all zero is a hole (a sparse region never written) and reads
/// as zeros. A codec keys AES once and is used by one thread at a time.
public final class ChunkCodec {
    public enum OpenResult: Equatable {
        /// The chunk authenticated; its plaintext was written to the output.
        case data
        /// The chunk is a hole; zeros were written to the output.
        case hole
        /// The chunk failed authentication; the output holds nothing usable.
        case corrupt
    }

    public let layout: ChunkLayout
    private let aead: AESGCM
    private var aad: [UInt8]

    public init(chunkKey: SecureBytes, fileId: [UInt8], layout: ChunkLayout) throws {
        precondition(fileId.count == FileHeader.fileIdSize)
        self.layout = layout
        aead = try AESGCM(key: chunkKey)
        aad = fileId + [UInt8](repeating: 0, count: 9)
    }

    /// Associated data of chunk `index`.
    private func setAAD(index: Int, isLast: Bool) {
        let i = UInt64(index)
        for b in 0..<8 { aad[16 + b] = UInt8((i >> UInt64(56 - 8 * b)) & 0xff) }
        aad[24] = isLast ? 1 : 0
    }

    /// Seals `plaintext` (1...chunk size bytes) as chunk `index`, writing plaintext.count + 28 bytes to `out`,
    /// under a nonce drawn from the CSPRNG.
    public func seal(_ plaintext: UnsafeRawBufferPointer, index: Int, isLast: Bool, into out: UnsafeMutableRawPointer) throws {
        try SecureRandom.fillNonces(UnsafeMutableRawBufferPointer(start: out, count: ChunkLayout.nonceSize))
        try seal(plaintext, index: index, isLast: isLast, nonceAt: out)
    }

    /// Seals as above under the 12-byte `nonce`, which the caller drew from the CSPRNG for this seal alone
    /// (drawing the nonces of many chunks in one call is much cheaper than one call per chunk).
    public func seal(_ plaintext: UnsafeRawBufferPointer, index: Int, isLast: Bool, nonce: UnsafeRawPointer,
                     into out: UnsafeMutableRawPointer) throws {
        out.copyMemory(from: nonce, byteCount: ChunkLayout.nonceSize)
        try seal(plaintext, index: index, isLast: isLast, nonceAt: out)
    }

    /// Seals with the nonce already in the first 12 bytes of `out`.
    private func seal(_ plaintext: UnsafeRawBufferPointer, index: Int, isLast: Bool, nonceAt out: UnsafeMutableRawPointer) throws {
        precondition(plaintext.count > 0 && plaintext.count <= layout.chunkSize)
        precondition(isLast || plaintext.count == layout.chunkSize, "only the last chunk may be partial")
        setAAD(index: index, isLast: isLast)
        try aad.withUnsafeBytes { a in
            try aead.seal(nonce: out, aad: a, plaintext: plaintext,
                          ciphertext: out + ChunkLayout.nonceSize,
                          tag: out + ChunkLayout.nonceSize + plaintext.count)
        }
    }

    /// Opens stored chunk `index` (its full stored bytes: nonce, ciphertext, tag), writing
    /// stored.count - 28 plaintext bytes to `out`.
    public func open(_ stored: UnsafeRawBufferPointer, index: Int, isLast: Bool, into out: UnsafeMutableRawPointer) -> OpenResult {
        guard stored.count > ChunkLayout.overhead else { return .corrupt }
        let n = stored.count - ChunkLayout.overhead
        let base = stored.baseAddress!
        // An all-zero nonce is (with probability 2^-96) a hole, never a sealed chunk: check the rest only then.
        if !isLast && stored.count == layout.storedChunkSize && ChunkCodec.isAllZero(UnsafeRawBufferPointer(start: base, count: ChunkLayout.nonceSize)) {
            if ChunkCodec.isAllZero(stored) {
                out.initializeMemory(as: UInt8.self, repeating: 0, count: n)
                return .hole
            }
            return .corrupt
        }
        setAAD(index: index, isLast: isLast)
        let ok = aad.withUnsafeBytes { a in
            aead.open(nonce: base, aad: a,
                      ciphertext: UnsafeRawBufferPointer(start: base + ChunkLayout.nonceSize, count: n),
                      tag: base + ChunkLayout.nonceSize + n, plaintext: out)
        }
        return ok ? .data : .corrupt
    }

    static func isAllZero(_ b: UnsafeRawBufferPointer) -> Bool {
        var acc: UInt64 = 0
        var i = 0
        let words = b.count / 8
        if words > 0 {
            let p = b.baseAddress!
            while i < words { acc |= p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self); i += 1 }
        }
        for j in (words * 8)..<b.count { acc |= UInt64(b[j]) }
        return acc == 0
    }
}
