/// Where plaintext bytes live in a backing file (format v1).
///
/// The body is a sequence of chunks starting at the header length H. Chunk i holds plaintext bytes
/// [i*C, (i+1)*C) and is stored at H + i*(C+28) as nonce (12) || ciphertext || tag (16). Every chunk is full
/// except the last one, which holds 1...C bytes. So the plaintext size follows from the backing size alone:
/// with B = backing size - H, n = B / (C+28) and r = B % (C+28), the size is n*C + max(r-28, 0).
/// An empty file has no chunk. Its body is empty, or (`marksEmptyFile`, the header's flag, format 3) the 16-byte
/// empty-file marker, so that a file cut to its header is damaged rather than empty; the size formula is the same.
public struct ChunkLayout: Equatable, Sendable {
    public static let nonceSize = 12
    public static let tagSize = 16
    public static let overhead = nonceSize + tagSize
    public static let defaultChunkSize = 4096

    public let headerLength: Int
    public let chunkSize: Int
    /// An empty file's body is its empty-file marker (`FileHeader.emptyFileMarkerFlag`).
    public let marksEmptyFile: Bool
    /// Bytes of the empty-file marker (`VolumeKeys.emptyFileMarker`).
    public static let emptyMarkerSize = 16

    public init(headerLength: Int, chunkSize: Int, marksEmptyFile: Bool = false) {
        self.headerLength = headerLength
        self.chunkSize = chunkSize
        self.marksEmptyFile = marksEmptyFile
    }

    /// Chunk sizes are powers of two from 4 KiB to 1 MiB.
    public static func isValidChunkSize(_ c: Int) -> Bool {
        c >= 4096 && c <= 1 << 20 && c & (c - 1) == 0
    }

    /// Bytes a full chunk takes on disk.
    public var storedChunkSize: Int { chunkSize + ChunkLayout.overhead }

    /// The largest plaintext size whose backing size (and every offset computed on the way) fits in an Int:
    /// writes, truncations and allocations past it fail with EFBIG instead of overflowing.
    public var maximumPlaintextSize: Int {
        ((Int.max - headerLength) / storedChunkSize - 2) * chunkSize
    }

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
        if plaintextSize == 0 { return headerLength + (marksEmptyFile ? ChunkLayout.emptyMarkerSize : 0) }
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

/// Which chunks a write of `count` bytes at `offset` rewrites in a file of `oldSize` plaintext bytes, and how.
///
/// The write covers chunks `first...last`. A chunk is *whole* when the write supplies all of its new
/// plaintext, so it is sealed straight from the caller's bytes; otherwise its old plaintext is needed
/// (`needsOld`) and the written bytes are laid over it. When the write starts past the old last chunk, that
/// chunk stops being the last one and is resealed as a full chunk (`resealedOldLast`): as part of the
/// written region when it is adjacent to `first`, else on its own, with a hole between.
public struct WritePlan: Equatable, Sendable {
    public let chunkSize: Int
    public let offset: Int
    public let count: Int
    public let oldSize: Int
    public let newSize: Int
    public let first: Int
    public let last: Int
    /// The old last chunk, when it must be resealed as a full, non-last chunk.
    public let resealedOldLast: Int?

    public init(chunkSize: Int, oldSize: Int, offset: Int, count: Int) {
        precondition(count > 0 && offset >= 0 && oldSize >= 0)
        self.chunkSize = chunkSize
        self.offset = offset
        self.count = count
        self.oldSize = oldSize
        newSize = max(oldSize, offset + count)
        first = offset / chunkSize
        last = (offset + count - 1) / chunkSize
        let oldLast = oldSize > 0 ? (oldSize - 1) / chunkSize : -1
        resealedOldLast = oldLast >= 0 && oldLast < first ? oldLast : nil
    }

    /// Index of the old last chunk (-1 for an empty file) and of the new one.
    public var oldLast: Int { oldSize > 0 ? (oldSize - 1) / chunkSize : -1 }
    public var newLast: Int { (newSize - 1) / chunkSize }

    /// The first chunk of the contiguous region the write stores: the resealed old last chunk when adjacent.
    public var regionFirst: Int { resealedOldLast == first - 1 ? first - 1 : first }

    /// True when the old last chunk is resealed on its own, apart from the region (a hole lies between).
    public var resealsSeparately: Bool { resealedOldLast.map { $0 < first - 1 } ?? false }

    /// Plaintext bytes of chunk `i` before and after the write.
    public func oldLength(_ i: Int) -> Int { max(0, min(chunkSize, oldSize - i * chunkSize)) }
    public func newLength(_ i: Int) -> Int { max(0, min(chunkSize, newSize - i * chunkSize)) }

    /// The part of chunk `i` (first...last) the write supplies, as offsets within the chunk.
    public func written(_ i: Int) -> Range<Int> {
        let start = i * chunkSize
        return (max(offset, start) - start)..<(min(offset + count, start + newLength(i)) - start)
    }

    /// True when the write supplies all of chunk `i`'s new plaintext.
    public func isWhole(_ i: Int) -> Bool { written(i) == 0..<newLength(i) }

    /// True when chunk `i` keeps some of its old plaintext, which must be read and authenticated first.
    public func needsOld(_ i: Int) -> Bool {
        let w = written(i)
        let old = oldLength(i)
        return old > 0 && !(w.lowerBound == 0 && w.upperBound >= old)
    }

    /// True when chunk `i` is the file's last chunk after the write.
    public func isLast(_ i: Int) -> Bool { i == newLast }

    /// True when the old last chunk is rewritten at all (resealed, or overwritten as part of the region):
    /// a write that grows the file replaces the old last chunk's stored bytes, which a failed write must restore.
    public var rewritesOldLast: Bool { oldLast >= 0 && newSize > oldSize }
}
