import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem
import Synchronization

/// Chunked read-modify-write of one file's body through a backing file descriptor.
///
/// Callers hold the file's I/O lock: shared for `read`, exclusive for everything else. The plaintext size is
/// the open file's (`OpenFile.size`), which every change made here keeps current: all handles of an inode,
/// and getattr, agree on it without asking the backing file.
struct ContentIO {
    let fd: Int32
    let file: OpenFile

    var layout: ChunkLayout { file.layout }

    /// Sealing or opening at least this many chunks is spread over the CPUs.
    static let parallelThreshold = 32

    // MARK: - read

    /// Reads up to `count` plaintext bytes at `offset` into `out`; returns the number read (short only at EOF).
    /// Any chunk of the range that fails authentication fails the whole read with EIO.
    func read(_ secrets: FileSecrets, into out: UnsafeMutableRawPointer, count: Int, offset: Int) throws -> Int {
        let size = file.size
        guard offset < size, count > 0 else { return 0 }
        let end = min(offset + count, size)
        let C = layout.chunkSize
        let first = offset / C
        let last = (end - 1) / C
        let lastOfFile = (size - 1) / C
        let storedStart = layout.backingOffset(ofChunk: first)
        let storedEnd = layout.backingOffset(ofChunk: last) + layout.plaintextLength(ofChunk: last, plaintextSize: size) + ChunkLayout.overhead

        let stored = UnsafeMutableRawBufferPointer(start: try BufferPool.shared.acquire(storedEnd - storedStart), count: storedEnd - storedStart)
        defer { BufferPool.shared.release(stored.baseAddress!, stored.count) }
        let got = try readStored(stored.baseAddress!, count: stored.count, offset: storedStart)
        if got != stored.count {
            // The backing file is shorter than the size this mount knows: cut behind its back.
            reportCut(chunk: first + got / layout.storedChunkSize, offset: storedStart + got)
            throw Errno.EIO
        }

        // Chunks read whole go straight to `out`; the partial first and last ones through a scratch chunk.
        let corrupt = try forEachChunk(secrets, Array(first...last)) { codec, i, scratch in
            let chunkStart = i * C
            let chunkLen = layout.plaintextLength(ofChunk: i, plaintextSize: size)
            let sealed = UnsafeRawBufferPointer(start: stored.baseAddress! + (layout.backingOffset(ofChunk: i) - storedStart),
                                                count: chunkLen + ChunkLayout.overhead)
            let from = max(offset, chunkStart), to = min(end, chunkStart + chunkLen)
            let whole = from == chunkStart && to == chunkStart + chunkLen
            let target = whole ? out + (chunkStart - offset) : scratch
            if codec.open(sealed, index: i, isLast: i == lastOfFile, into: target) == .corrupt { return false }
            if !whole { (out + (from - offset)).copyMemory(from: target + (from - chunkStart), byteCount: to - from) }
            return true
        }
        if let c = corrupt {
            reportCorrupt(chunk: c)
            throw Errno.EIO
        }
        Failpoint.crash("crash-after-read")
        return end - offset
    }

    // MARK: - write

    /// Writes `count` bytes at `offset`, growing the file (leaving a hole) when the offset is past its end.
    /// On failure (ENOSPC included) the file keeps its old size and its old last chunk; chunks before that
    /// which the write overwrote in place hold either their old or their new contents, as with any filesystem.
    func write(_ secrets: FileSecrets, from data: UnsafeRawPointer, count: Int, offset: Int) throws {
        guard count > 0 else { return }
        guard offset >= 0, offset <= layout.maximumPlaintextSize - count else { throw Errno.EFBIG }
        let plan = WritePlan(chunkSize: layout.chunkSize, oldSize: file.size, offset: offset, count: count)
        let C = layout.chunkSize

        // Old stored chunks the write needs: partial chunks keep old bytes, and a growing write replaces the
        // old last chunk, whose stored bytes are kept to put back if the write fails.
        var needed = Set([plan.first, plan.last].filter { plan.needsOld($0) })
        if plan.rewritesOldLast { needed.insert(plan.oldLast) }
        var reading: [Int: StoredChunk] = [:]
        defer { for c in reading.values { c.deallocate() } }
        for i in needed { reading[i] = try StoredChunk(self, index: i, plaintextLength: plan.oldLength(i)) }
        let old = reading

        let region = try Region(layout: layout, first: plan.regionFirst, last: plan.last, newSize: plan.newSize)
        defer { region.deallocate() }
        let separate = plan.resealsSeparately ? try Region(layout: layout, first: plan.oldLast, last: plan.oldLast, newSize: plan.newSize) : nil
        defer { separate?.deallocate() }

        // Every chunk of the region (and the separately resealed old last chunk) is sealed independently, each
        // under its own nonce; all of them drawn from the CSPRNG in one call.
        var chunks = Array(plan.regionFirst...plan.last)
        if plan.resealsSeparately { chunks.append(plan.oldLast) }
        let nonces = UnsafeMutableRawBufferPointer.allocate(byteCount: (plan.last - plan.regionFirst + 2) * ChunkLayout.nonceSize, alignment: 16)
        defer { nonces.deallocate() }
        try SecureRandom.fillNonces(nonces)
        let firstNonce = plan.regionFirst
        let corrupt = try forEachChunk(secrets, chunks) { codec, i, scratch in
            let target = i < plan.regionFirst ? separate! : region
            // The separately resealed chunk takes the spare nonce after the region's.
            let nonce = UnsafeRawPointer(nonces.baseAddress! + (i < firstNonce ? plan.last - firstNonce + 1 : i - firstNonce) * ChunkLayout.nonceSize)
            if i == plan.resealedOldLast {
                // No longer the last chunk: reseal as a full chunk, zero-padded.
                let n = plan.oldLength(i)
                guard old[i]!.open(codec, isLast: true, length: n, into: scratch) else { return false }
                scratch.advanced(by: n).initializeMemory(as: UInt8.self, repeating: 0, count: C - n)
                try target.seal(codec, index: i, plaintext: UnsafeRawBufferPointer(start: scratch, count: C), isLast: false, nonce: nonce)
                return true
            }
            let newLen = plan.newLength(i)
            if plan.isWhole(i) {
                try target.seal(codec, index: i, plaintext: UnsafeRawBufferPointer(start: data + (i * C - offset), count: newLen),
                                isLast: plan.isLast(i), nonce: nonce)
                return true
            }
            let w = plan.written(i)
            if plan.needsOld(i) {
                let n = plan.oldLength(i)
                guard old[i]!.open(codec, isLast: i == plan.oldLast, length: n, into: scratch) else { return false }
                if newLen > n { scratch.advanced(by: n).initializeMemory(as: UInt8.self, repeating: 0, count: newLen - n) }
            } else {
                scratch.initializeMemory(as: UInt8.self, repeating: 0, count: newLen)
            }
            (scratch + w.lowerBound).copyMemory(from: data + (i * C + w.lowerBound - offset), byteCount: w.count)
            try target.seal(codec, index: i, plaintext: UnsafeRawBufferPointer(start: scratch, count: newLen), isLast: plan.isLast(i), nonce: nonce)
            return true
        }
        if let c = corrupt {
            reportCorrupt(chunk: c)
            throw Errno.EIO
        }

        let oldBacking = layout.backingSize(plaintextSize: plan.oldSize)
        do {
            try separate?.write(fd)
            try region.write(fd)
            if plan.regionFirst > 0 { try clearEmptyMarker(oldSize: plan.oldSize) }
        } catch {
            restore(backingSize: oldBacking, oldLast: plan.rewritesOldLast ? old[plan.oldLast] : nil)
            throw error
        }
        file.size = plan.newSize
    }

    // MARK: - truncate and allocate

    /// Sets the plaintext size to 0, which needs no data key: an empty file is its header alone, or in format 3
    /// its header and its empty-file marker (made with the volume key). The marker is written over the start of
    /// the old body before the file is cut, so no new block is needed (no ENOSPC).
    func truncateToZero() throws {
        let empty = layout.backingSize(plaintextSize: 0)
        guard let marker = file.emptyMarker else {
            try syscall { ftruncate(fd, off_t(empty)) }
            file.size = 0
            return
        }
        if file.size == 0, try FileIO.size(fd) == empty { return }
        // The bytes the marker replaces go back if the cut fails: the file then keeps its old contents.
        var saved = [UInt8](repeating: 0, count: marker.count)
        let had = try saved.withUnsafeMutableBytes { try FileIO.pread(fd, $0.baseAddress!, count: $0.count, offset: layout.headerLength) }
        try marker.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: layout.headerLength) }
        do {
            try syscall { ftruncate(fd, off_t(empty)) }
        } catch {
            if had > 0 { _ = try? saved.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: had, offset: layout.headerLength) } }
            if had < marker.count { _ = ftruncate(fd, off_t(layout.headerLength + had)) }
            throw error
        }
        file.size = 0
    }

    /// Checks the marker of an empty file (format 3): a file cut to its header, or to a few bytes of its body,
    /// fails here with EIO and a log line instead of reading as empty.
    func checkEmpty() throws {
        guard let marker = file.emptyMarker, file.size == 0 else { return }
        var stored = [UInt8](repeating: 0, count: marker.count)
        let n = try stored.withUnsafeMutableBytes { try FileIO.pread(fd, $0.baseAddress!, count: $0.count, offset: layout.headerLength) }
        if n != marker.count || !Digest.constantTimeEquals(stored, marker) {
            if file.firstReport(ofChunk: -1) {
                Log.shared.log(.error, "\(file.path) is empty but lacks its empty-file marker: it was cut behind kmsfs's back (or damaged); reads of it return EIO",
                               event: "emptied-file", fields: ["file": file.path])
            }
            throw Errno.EIO
        }
    }

    /// After an empty file (format 3) grew without writing chunk 0 (a write or truncate past it): the marker's
    /// bytes become zeros, so chunk 0 is a hole. (A write that covers chunk 0 overwrites them.) The marker stays
    /// until the new data is in place, so a crash before leaves a file that reads as damaged at worst, never a
    /// file cut to its header; `restore` puts it back if the change fails.
    private func clearEmptyMarker(oldSize: Int) throws {
        guard file.emptyMarker != nil && oldSize == 0 else { return }
        let zeros = [UInt8](repeating: 0, count: ChunkLayout.emptyMarkerSize)
        try zeros.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: layout.headerLength) }
    }

    /// Sets the plaintext size, resealing the chunk that becomes the last one. Growing leaves a hole.
    func truncate(_ secrets: FileSecrets, to newSize: Int) throws {
        guard newSize <= layout.maximumPlaintextSize else { throw Errno.EFBIG }
        let oldSize = file.size
        if newSize == oldSize { return }
        if newSize == 0 { return try truncateToZero() }
        let C = layout.chunkSize
        let oldLast = oldSize > 0 ? (oldSize - 1) / C : -1
        let newLast = (newSize - 1) / C
        let newLastLen = newSize - newLast * C

        if newSize < oldSize {
            // The chunk holding the new end becomes the last one, cut to its new length.
            let stored = try StoredChunk(self, index: newLast,
                                         plaintextLength: layout.plaintextLength(ofChunk: newLast, plaintextSize: oldSize))
            defer { stored.deallocate() }
            let region = try Region(layout: layout, first: newLast, last: newLast, newSize: newSize)
            defer { region.deallocate() }
            let ok = try secrets.withCodec { codec in
                try withScratch(C) { scratch in
                    guard stored.open(codec, isLast: newLast == oldLast, length: stored.plaintextLength, into: scratch) else { return false }
                    try region.seal(codec, index: newLast, plaintext: UnsafeRawBufferPointer(start: scratch, count: newLastLen), isLast: true)
                    return true
                }
            }
            guard ok else {
                reportCorrupt(chunk: newLast)
                throw Errno.EIO
            }
            // Overwrite in place (no new blocks, so no ENOSPC), then cut the file after it. If the cut fails, the
            // chunk goes back as it was: the file keeps its old size and its old sealed data.
            try region.write(fd)
            do {
                try syscall { ftruncate(fd, off_t(layout.backingSize(plaintextSize: newSize))) }
            } catch {
                try? FileIO.pwrite(fd, stored.bytes.baseAddress!, count: stored.bytes.count, offset: stored.offset)
                throw error
            }
            file.size = newSize
            return
        }

        // Grow: the old last chunk becomes full (or the new last, if it stays last); a new last chunk of zeros.
        var saved: StoredChunk? = nil
        defer { saved?.deallocate() }
        var regions: [Region] = []
        defer { for r in regions { r.deallocate() } }
        let ok = try secrets.withCodec { codec in
            try withScratch(C) { scratch in
                if oldLast >= 0 {
                    saved = try StoredChunk(self, index: oldLast, plaintextLength: oldSize - oldLast * C)
                    let n = oldSize - oldLast * C
                    guard saved!.open(codec, isLast: true, length: n, into: scratch) else { return false }
                    scratch.advanced(by: n).initializeMemory(as: UInt8.self, repeating: 0, count: C - n)
                    let r = try Region(layout: layout, first: oldLast, last: oldLast, newSize: newSize)
                    regions.append(r)
                    try r.seal(codec, index: oldLast, plaintext: UnsafeRawBufferPointer(start: scratch, count: oldLast == newLast ? newLastLen : C),
                               isLast: oldLast == newLast)
                }
                if newLast != oldLast {
                    scratch.initializeMemory(as: UInt8.self, repeating: 0, count: newLastLen)
                    let r = try Region(layout: layout, first: newLast, last: newLast, newSize: newSize)
                    regions.append(r)
                    try r.seal(codec, index: newLast, plaintext: UnsafeRawBufferPointer(start: scratch, count: newLastLen), isLast: true)
                }
                return true
            }
        }
        guard ok else {
            reportCorrupt(chunk: oldLast)
            throw Errno.EIO
        }
        do {
            // The new last chunk first: the file is never longer than its sealed data says.
            for r in regions.reversed() { try r.write(fd) }
            if newLast > 0 { try clearEmptyMarker(oldSize: oldSize) }
        } catch {
            restore(backingSize: layout.backingSize(plaintextSize: oldSize), oldLast: saved)
            throw error
        }
        file.size = newSize
    }

    /// fallocate(2): mode 0 grows the file to offset+length if shorter and reserves backing space for the
    /// range; FALLOC_FL_KEEP_SIZE only reserves. Other modes (punching holes, zeroing ranges) are not supported.
    func allocate(_ secrets: () throws -> FileSecrets, mode: Int32, offset: Int, length: Int) throws {
        let keepSize = kmsfs_falloc_keep_size()
        guard mode == 0 || mode == keepSize else { throw Errno.ENOTSUP }
        guard offset >= 0, length > 0 else { throw Errno.EINVAL }
        guard offset <= layout.maximumPlaintextSize - length else { throw Errno.EFBIG }
        if mode == 0 && offset + length > file.size { try truncate(try secrets(), to: offset + length) }
        let start = layout.backingOffset(ofChunk: offset / layout.chunkSize)
        let end = layout.backingSize(plaintextSize: offset + length)
        if kmsfs_fallocate(fd, keepSize, off_t(start), off_t(end - start)) != 0 {
            let e = Errno.current
            if e.code != EOPNOTSUPP { throw e }
        }
    }

    // MARK: - helpers

    /// Runs `body(codec, chunk, scratch)` for every chunk, on several threads when there are many; `scratch` is
    /// a chunk-size buffer of the calling thread. Returns the first chunk for which `body` returned false
    /// (authentication failed), or nil.
    private func forEachChunk(_ secrets: FileSecrets, _ chunks: [Int],
                              _ body: (ChunkCodec, Int, UnsafeMutableRawPointer) throws -> Bool) throws -> Int? {
        let n = chunks.count
        let threads = n >= ContentIO.parallelThreshold ? min(Parallel.cpuCount, n / (ContentIO.parallelThreshold / 2)) : 1
        func run(_ range: Range<Int>) -> SliceResult {
            do {
                return try secrets.withCodec { codec in
                    try withScratch(layout.chunkSize) { scratch in
                        for j in range {
                            if try !body(codec, chunks[j], scratch) { return SliceResult.corrupt(chunks[j]) }
                        }
                        return SliceResult.ok
                    }
                }
            } catch {
                return .failed(error)
            }
        }
        var results = [SliceResult](repeating: .ok, count: threads)
        if threads <= 1 {
            results[0] = run(0..<n)
        } else {
            // Contiguous slices, one per thread; each writes only its own result.
            results.withUnsafeMutableBufferPointer { r in
                let out = r.baseAddress!
                Parallel.forEach(threads) { t in out[t] = run((n * t / threads)..<(n * (t + 1) / threads)) }
            }
        }
        for r in results {
            switch r {
            case .ok: continue
            case .corrupt(let i): return i
            case .failed(let e): throw e
            }
        }
        return nil
    }

    private enum SliceResult {
        case ok
        case corrupt(Int)
        case failed(Error)
    }

    /// Best-effort undo of a failed write: cut the backing file back and put the old last chunk (or the marker
    /// of an empty file) back.
    private func restore(backingSize: Int, oldLast: StoredChunk?) {
        _ = ftruncate(fd, off_t(backingSize))
        if let s = oldLast {
            try? FileIO.pwrite(fd, s.bytes.baseAddress!, count: s.bytes.count, offset: s.offset)
        } else if let marker = file.emptyMarker, backingSize == layout.backingSize(plaintextSize: 0) {
            try? marker.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: layout.headerLength) }
        }
    }

    /// Reads stored bytes of this file; returns fewer than `count` only where the backing file really ends
    /// (`FileIO.preadStored`: a short read is read again after asking the backing filesystem for the size), and
    /// logs once per file when reading again got the bytes.
    func readStored(_ buffer: UnsafeMutableRawPointer, count: Int, offset: Int) throws -> Int {
        let (got, lagged) = try FileIO.preadStored(fd, buffer, count: count, offset: offset)
        if lagged {
            if file.firstReport(ofChunk: -2) {
                Log.shared.log(.warning, "the backing filesystem gave a short read of \(file.path) until asked for its size again: its cached sizes lag behind writes (read again, nothing lost)",
                               event: "stale-backing-size", fields: ["file": file.path])
            }
        }
        return got
    }

    private func reportCut(chunk: Int, offset: Int) {
        if file.firstReport(ofChunk: chunk) {
            MountCounters.corruptChunks.add(1, ordering: .relaxed)
            Log.shared.log(.error, "corrupt chunk \(chunk) of \(file.path): the backing file ends at byte \(offset), before the chunk's end; reads of it return EIO",
                           event: "corrupt-chunk", fields: ["file": file.path, "chunk": String(chunk)])
        }
    }

    private func reportCorrupt(chunk: Int) {
        if file.firstReport(ofChunk: chunk) {
            MountCounters.corruptChunks.add(1, ordering: .relaxed)
            Log.shared.log(.error, "corrupt chunk \(chunk) of \(file.path): authentication failed, reads of it return EIO",
                           event: "corrupt-chunk", fields: ["file": file.path, "chunk": String(chunk)])
        }
    }
}

/// Runs `body` with a temporary buffer of `count` bytes.
private func withScratch<R>(_ count: Int, _ body: (UnsafeMutableRawPointer) throws -> R) throws -> R {
    try BufferPool.shared.withBuffer(count, body)
}

/// Consecutive sealed chunks, ready for one pwrite. Chunks may be sealed into it from several threads at once
/// (each writes only its own bytes).
private final class Region: @unchecked Sendable {
    let layout: ChunkLayout
    let first: Int
    let buffer: UnsafeMutableRawBufferPointer

    init(layout: ChunkLayout, first: Int, last: Int, newSize: Int) throws {
        self.layout = layout
        self.first = first
        let end = min(layout.backingOffset(ofChunk: last + 1), layout.backingSize(plaintextSize: newSize))
        let count = end - layout.backingOffset(ofChunk: first)
        buffer = UnsafeMutableRawBufferPointer(start: try BufferPool.shared.acquire(count), count: count)
    }

    func seal(_ codec: ChunkCodec, index: Int, plaintext: UnsafeRawBufferPointer, isLast: Bool, nonce: UnsafeRawPointer? = nil) throws {
        let at = layout.backingOffset(ofChunk: index) - layout.backingOffset(ofChunk: first)
        precondition(at >= 0 && at + plaintext.count + ChunkLayout.overhead <= buffer.count, "chunk outside its region")
        if let nonce {
            try codec.seal(plaintext, index: index, isLast: isLast, nonce: nonce, into: buffer.baseAddress! + at)
        } else {
            try codec.seal(plaintext, index: index, isLast: isLast, into: buffer.baseAddress! + at)
        }
    }

    func write(_ fd: Int32) throws {
        try FileIO.pwrite(fd, buffer.baseAddress!, count: buffer.count, offset: layout.backingOffset(ofChunk: first))
    }

    func deallocate() { BufferPool.shared.release(buffer.baseAddress!, buffer.count) }
}

/// The stored bytes of one existing chunk.
private struct StoredChunk {
    let bytes: UnsafeMutableRawBufferPointer
    let offset: Int
    let index: Int
    var plaintextLength: Int { bytes.count - ChunkLayout.overhead }

    init(_ io: ContentIO, index: Int, plaintextLength: Int) throws {
        let layout = io.layout
        self.index = index
        offset = layout.backingOffset(ofChunk: index)
        bytes = UnsafeMutableRawBufferPointer(start: try BufferPool.shared.acquire(plaintextLength + ChunkLayout.overhead),
                                              count: plaintextLength + ChunkLayout.overhead)
        do {
            let n = try io.readStored(bytes.baseAddress!, count: bytes.count, offset: offset)
            if n != bytes.count { throw Errno.EIO }
        } catch {
            BufferPool.shared.release(bytes.baseAddress!, bytes.count)
            throw error
        }
    }

    /// Opens the first `length` plaintext bytes' chunk into `out`; false if it fails authentication.
    func open(_ codec: ChunkCodec, isLast: Bool, length: Int, into out: UnsafeMutableRawPointer) -> Bool {
        codec.open(UnsafeRawBufferPointer(start: bytes.baseAddress!, count: length + ChunkLayout.overhead), index: index,
                   isLast: isLast, into: out) != .corrupt
    }

    func deallocate() { BufferPool.shared.release(bytes.baseAddress!, bytes.count) }
}
