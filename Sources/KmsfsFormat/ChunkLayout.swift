/// Where plaintext bytes live in a backing file (format v1).
///
/// The body is a sequence of chunks starting at the header length H. Chunk i holds plaintext bytes
/// [i*C, (i+1)*C) and is stored at H + i*(C+28) as nonce (12) || ciphertext || tag (16). Every chunk is full
/// except the last one, which holds 1...C bytes. So the plaintext size follows from the backing size alone:
/// with B = backing size - H, n = B / (C+28) and r = B % (C+28), the size is n*C + max(r-28, 0).
public struct ChunkLayout: Equatable, Sendable {
    public static let nonceSize = 12
    public static let tagSize = 16
    public static let overhead = nonceSize + tagSize
    public static let defaultChunkSize = 64 * 1024

    public let headerLength: Int
    public let chunkSize: Int

    public init(headerLength: Int, chunkSize: Int) {
        self.headerLength = headerLength
        self.chunkSize = chunkSize
    }

    /// Chunk sizes are powers of two from 4 KiB to 1 MiB.
    public static func isValidChunkSize(_ c: Int) -> Bool {
        c >= 4096 && c <= 1 << 20 && c & (c - 1) == 0
    }

    /// Bytes a full chunk takes on disk.
    public var storedChunkSize: Int { chunkSize + ChunkLayout.overhead }

    /// The exact plaintext size of a backing file of `backingSize` bytes. A backing file shorter than its
    /// header, or whose last chunk has no room for any data, reports the size of its complete part; reading
    /// such a file's damaged tail fails authentication.
    public func plaintextSize(backingSize: Int) -> Int {
        let body = backingSize - headerLength
        if body <= 0 { return 0 }
        let full = body / storedChunkSize
        let rest = body % storedChunkSize
        return full * chunkSize + max(rest - ChunkLayout.overhead, 0)
    }

    /// The backing size that holds `plaintextSize` bytes.
    public func backingSize(plaintextSize: Int) -> Int {
        if plaintextSize == 0 { return headerLength }
        let full = plaintextSize / chunkSize
        let rest = plaintextSize % chunkSize
        return headerLength + full * storedChunkSize + (rest > 0 ? rest + ChunkLayout.overhead : 0)
    }

    /// True when `backingSize` is exactly what some plaintext size produces.
    public func isConsistent(backingSize: Int) -> Bool {
        backingSize >= headerLength && self.backingSize(plaintextSize: plaintextSize(backingSize: backingSize)) == backingSize
    }

    /// Number of chunks of a file of `plaintextSize` bytes.
    public func chunkCount(plaintextSize: Int) -> Int { (plaintextSize + chunkSize - 1) / chunkSize }

    /// Index of the chunk holding plaintext offset `offset`.
    public func chunkIndex(ofOffset offset: Int) -> Int { offset / chunkSize }

    /// Backing file offset of chunk `index`.
    public func backingOffset(ofChunk index: Int) -> Int { headerLength + index * storedChunkSize }

    /// Plaintext bytes in chunk `index` of a file of `plaintextSize` bytes (0 past the end).
    public func plaintextLength(ofChunk index: Int, plaintextSize: Int) -> Int {
        max(0, min(chunkSize, plaintextSize - index * chunkSize))
    }
}
