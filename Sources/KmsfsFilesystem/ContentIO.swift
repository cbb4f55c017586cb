import CSystem
import Glibc
import KmsfsFormat
import KmsfsSystem

/// Chunked read-modify-write of one file's body through its backing file descriptor.
///
/// Callers hold the file's I/O lock: shared for `read`, exclusive for everything else. Every function finds
/// the current size from the backing file (one fstat), so all handles of an inode, and getattr, agree on it.
struct ContentIO {
    let fd: Int32
    let file: OpenFile
    let secrets: FileSecrets
    /// For log lines only.
    let backingPath: String

    var layout: ChunkLayout { secrets.layout }

    init(fd: Int32, file: OpenFile, backingPath: String) {
        self.fd = fd
        self.file = file
        self.secrets = file.secrets
        self.backingPath = backingPath
    }

    // MARK: - read

    /// Reads up to `count` plaintext bytes at `offset` into `out`; returns the number read (short only at EOF).
    /// Any chunk of the range that fails authentication fails the whole read with EIO.
    func read(into out: UnsafeMutableRawPointer, count: Int, offset: Int) throws -> Int {
        let backingSize = try FileIO.size(fd)
        let size = layout.plaintextSize(backingSize: backingSize)
        guard offset < size, count > 0 else { return 0 }
        let end = min(offset + count, size)
        let first = layout.chunkIndex(ofOffset: offset)
        let last = layout.chunkIndex(ofOffset: end - 1)
        let lastOfFile = layout.chunkIndex(ofOffset: size - 1)
        let C = layout.chunkSize
        let storedStart = layout.backingOffset(ofChunk: first)
        let storedEnd = min(layout.backingOffset(ofChunk: last + 1), backingSize)

        let stored = UnsafeMutableRawBufferPointer.allocate(byteCount: storedEnd - storedStart, alignment: 64)
        defer { stored.deallocate() }
        let got = try FileIO.pread(fd, stored.baseAddress!, count: stored.count, offset: storedStart)
        guard got == stored.count else { throw Errno.EIO }  // the file shrank under us: cannot happen under the lock

        var scratch: UnsafeMutableRawBufferPointer? = nil
        defer { scratch?.deallocate() }

        try secrets.withCodec { codec in
            for i in first...last {
                let chunkStart = i * C
                let chunkLen = layout.plaintextLength(ofChunk: i, plaintextSize: size)
                let at = layout.backingOffset(ofChunk: i) - storedStart
                let sealed = UnsafeRawBufferPointer(start: stored.baseAddress! + at, count: chunkLen + ChunkLayout.overhead)
                let wantFrom = max(offset, chunkStart)
                let wantTo = min(end, chunkStart + chunkLen)
                let whole = wantFrom == chunkStart && wantTo == chunkStart + chunkLen
                let target: UnsafeMutableRawPointer
                if whole {
                    target = out + (chunkStart - offset)
                } else {
                    if scratch == nil { scratch = .allocate(byteCount: C, alignment: 64) }
                    target = scratch!.baseAddress!
                }
                if codec.open(sealed, index: i, isLast: i == lastOfFile, into: target) == .corrupt {
                    reportCorrupt(chunk: i)
                    throw Errno.EIO
                }
                if !whole {
                    (out + (wantFrom - offset)).copyMemory(from: target + (wantFrom - chunkStart), byteCount: wantTo - wantFrom)
                }
            }
        }
        return end - offset
    }

    // MARK: - write

    /// Writes `count` bytes at `offset`, growing the file (leaving a hole) when the offset is past its end.
    /// On failure (ENOSPC included) the file keeps its old size and its old last chunk; chunks before that
    /// which the write overwrote in place hold either their old or their new contents, as with any filesystem.
    func write(from data: UnsafeRawPointer, count: Int, offset: Int) throws {
        guard count > 0 else { return }
        let C = layout.chunkSize
        let oldBacking = try FileIO.size(fd)
        let oldSize = layout.plaintextSize(backingSize: oldBacking)
        let newSize = max(oldSize, offset + count)
        let a = offset / C
        let b = (offset + count - 1) / C
        let oldLast = oldSize > 0 ? (oldSize - 1) / C : -1
        let newLast = (newSize - 1) / C

        // The old last chunk stops being last when the write starts past it: reseal it as a full chunk.
        let resealOldLast = oldLast >= 0 && oldLast < a
        let regionStart = resealOldLast && oldLast == a - 1 ? oldLast : a
        var region = Region(layout: layout, first: regionStart, last: b, newSize: newSize)
        defer { region.deallocate() }
        var separate: Region? = nil
        defer { separate?.deallocate() }

        // A write that grows the file rewrites the old last chunk (resealed, or overwritten in place as part of
        // the region) partly into new blocks: keep its stored bytes so a failed write can put it back.
        let saved: SavedChunk? = oldLast >= 0 && newSize > oldSize
            ? try SavedChunk(fd: fd, layout: layout, index: oldLast, size: oldSize) : nil
        try secrets.withCodec { codec in
            if resealOldLast {
                let plain = try openExisting(codec, UnsafeRawBufferPointer(saved!.bytes), index: oldLast, isLast: true, length: oldSize - oldLast * C)
                defer { plain.deallocate() }
                if oldLast == regionStart {
                    try region.seal(codec, index: oldLast, plaintext: UnsafeRawBufferPointer(plain), isLast: false)
                } else {
                    separate = Region(layout: layout, first: oldLast, last: oldLast, newSize: newSize)
                    try separate!.seal(codec, index: oldLast, plaintext: UnsafeRawBufferPointer(plain), isLast: false)
                }
            }
            for i in a...b {
                let chunkStart = i * C
                let newLen = min(C, newSize - chunkStart)
                let from = max(offset, chunkStart) - chunkStart
                let to = min(offset + count, chunkStart + newLen) - chunkStart
                let oldLen = i <= oldLast ? layout.plaintextLength(ofChunk: i, plaintextSize: oldSize) : 0
                if from == 0 && to == newLen {
                    // Fully overwritten: seal straight from the caller's buffer.
                    try region.seal(codec, index: i, plaintext: UnsafeRawBufferPointer(start: data + (chunkStart - offset), count: newLen),
                                    isLast: i == newLast)
                    continue
                }
                let plain: UnsafeMutableRawBufferPointer
                if oldLen > 0 && !(from == 0 && to >= oldLen) {
                    if i == oldLast, let s = saved {
                        // Already read for the rollback.
                        plain = try openExisting(codec, UnsafeRawBufferPointer(s.bytes), index: i, isLast: true, length: oldLen)
                    } else {
                        let old = try StoredChunk(fd: fd, layout: layout, index: i, plaintextLength: oldLen)
                        defer { old.deallocate() }
                        plain = try openExisting(codec, old.sealed, index: i, isLast: i == oldLast, length: oldLen)
                    }
                } else {
                    plain = .allocate(byteCount: C, alignment: 64)
                    plain.initializeMemory(as: UInt8.self, repeating: 0)
                }
                defer { plain.deallocate() }
                (plain.baseAddress! + from).copyMemory(from: data + (chunkStart + from - offset), byteCount: to - from)
                try region.seal(codec, index: i, plaintext: UnsafeRawBufferPointer(rebasing: plain[0..<newLen]), isLast: i == newLast)
            }
        }
        do {
            if let s = separate { try s.write(fd) }
            try region.write(fd)
        } catch {
            restore(backingSize: oldBacking, saved: saved)
            throw error
        }
    }

    // MARK: - truncate and allocate

    /// Sets the plaintext size, resealing the chunk that becomes the last one. Growing leaves a hole.
    func truncate(to newSize: Int) throws {
        let C = layout.chunkSize
        let oldBacking = try FileIO.size(fd)
        let oldSize = layout.plaintextSize(backingSize: oldBacking)
        if newSize == oldSize { return }
        if newSize == 0 {
            try syscall { ftruncate(fd, off_t(layout.headerLength)) }
            return
        }
        let oldLast = oldSize > 0 ? (oldSize - 1) / C : -1
        let newLast = (newSize - 1) / C
        let newLastLen = newSize - newLast * C

        if newSize < oldSize {
            // The chunk holding the new end becomes the last one, cut to its new length.
            let stored = try StoredChunk(fd: fd, layout: layout, index: newLast,
                                         plaintextLength: layout.plaintextLength(ofChunk: newLast, plaintextSize: oldSize))
            defer { stored.deallocate() }
            var region = Region(layout: layout, first: newLast, last: newLast, newSize: newSize)
            defer { region.deallocate() }
            try secrets.withCodec { codec in
                let plain = try openExisting(codec, stored.sealed, index: newLast, isLast: newLast == oldLast,
                                             length: stored.bytes.count - ChunkLayout.overhead)
                defer { plain.deallocate() }
                try region.seal(codec, index: newLast, plaintext: UnsafeRawBufferPointer(rebasing: plain[0..<newLastLen]), isLast: true)
            }
            // Overwrite in place (no new blocks, so no ENOSPC), then cut the file after it.
            try region.write(fd)
            try syscall { ftruncate(fd, off_t(layout.backingSize(plaintextSize: newSize))) }
            return
        }

        // Grow.
        var saved: SavedChunk? = nil
        var regions: [Region] = []
        defer { for r in regions { r.deallocate() } }
        try secrets.withCodec { codec in
            if oldLast >= 0 {
                saved = try SavedChunk(fd: fd, layout: layout, index: oldLast, size: oldSize)
                let plain = try openExisting(codec, UnsafeRawBufferPointer(saved!.bytes), index: oldLast, isLast: true, length: oldSize - oldLast * C)
                defer { plain.deallocate() }
                var r = Region(layout: layout, first: oldLast, last: oldLast, newSize: newSize)
                let len = oldLast == newLast ? newLastLen : C
                try r.seal(codec, index: oldLast, plaintext: UnsafeRawBufferPointer(rebasing: plain[0..<len]), isLast: oldLast == newLast)
                regions.append(r)
            }
            if newLast != oldLast {
                let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: newLastLen, alignment: 64)
                defer { zeros.deallocate() }
                zeros.initializeMemory(as: UInt8.self, repeating: 0)
                var r = Region(layout: layout, first: newLast, last: newLast, newSize: newSize)
                try r.seal(codec, index: newLast, plaintext: UnsafeRawBufferPointer(zeros), isLast: true)
                regions.append(r)
            }
        }
        do {
            // The new last chunk first: the file is never longer than its sealed data says.
            for r in regions.reversed() { try r.write(fd) }
        } catch {
            restore(backingSize: oldBacking, saved: saved)
            throw error
        }
    }

    /// fallocate(2): mode 0 grows the file to offset+length if shorter and reserves backing space for the
    /// range; FALLOC_FL_KEEP_SIZE only reserves. Other modes (punching holes, zeroing ranges) are not supported.
    func allocate(mode: Int32, offset: Int, length: Int) throws {
        let keepSize = kmsfs_falloc_keep_size()
        guard mode == 0 || mode == keepSize else { throw Errno.ENOTSUP }
        guard offset >= 0, length > 0 else { throw Errno.EINVAL }
        let size = layout.plaintextSize(backingSize: try FileIO.size(fd))
        if mode == 0 && offset + length > size { try truncate(to: offset + length) }
        let start = layout.backingOffset(ofChunk: offset / layout.chunkSize)
        let end = layout.backingSize(plaintextSize: offset + length)
        if kmsfs_fallocate(fd, keepSize, off_t(start), off_t(end - start)) != 0 {
            let e = Errno.current
            if e.code != EOPNOTSUPP { throw e }
        }
    }

    // MARK: - helpers

    /// Decrypts an existing chunk for read-modify-write into a new chunk-size buffer (zero past `length`).
    private func openExisting(_ codec: ChunkCodec, _ sealed: UnsafeRawBufferPointer, index: Int, isLast: Bool,
                              length: Int) throws -> UnsafeMutableRawBufferPointer {
        let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: layout.chunkSize, alignment: 64)
        if codec.open(UnsafeRawBufferPointer(rebasing: sealed[0..<(length + ChunkLayout.overhead)]), index: index,
                      isLast: isLast, into: plain.baseAddress!) == .corrupt {
            plain.deallocate()
            reportCorrupt(chunk: index)
            throw Errno.EIO
        }
        (plain.baseAddress! + length).initializeMemory(as: UInt8.self, repeating: 0, count: layout.chunkSize - length)
        return plain
    }

    /// Best-effort undo of a failed write: cut the backing file back and put the old last chunk back.
    private func restore(backingSize: Int, saved: SavedChunk?) {
        _ = ftruncate(fd, off_t(backingSize))
        if let s = saved {
            try? FileIO.pwrite(fd, s.bytes.baseAddress!, count: s.bytes.count, offset: s.offset)
        }
    }

    private func reportCorrupt(chunk: Int) {
        if file.firstReport(ofChunk: chunk) {
            Log.error("corrupt chunk \(chunk) of \(file.path) (backing file \(backingPath)): authentication failed, reads of it return EIO")
        }
    }
}

/// Consecutive sealed chunks, ready for one pwrite.
private struct Region {
    let layout: ChunkLayout
    let first: Int
    let buffer: UnsafeMutableRawBufferPointer
    var used = 0

    init(layout: ChunkLayout, first: Int, last: Int, newSize: Int) {
        self.layout = layout
        self.first = first
        let end = min(layout.backingOffset(ofChunk: last + 1), layout.backingSize(plaintextSize: newSize))
        buffer = .allocate(byteCount: end - layout.backingOffset(ofChunk: first), alignment: 64)
    }

    mutating func seal(_ codec: ChunkCodec, index: Int, plaintext: UnsafeRawBufferPointer, isLast: Bool) throws {
        let at = layout.backingOffset(ofChunk: index) - layout.backingOffset(ofChunk: first)
        precondition(at == used && at + plaintext.count + ChunkLayout.overhead <= buffer.count)
        try codec.seal(plaintext, index: index, isLast: isLast, into: buffer.baseAddress! + at)
        used = at + plaintext.count + ChunkLayout.overhead
    }

    func write(_ fd: Int32) throws {
        try FileIO.pwrite(fd, buffer.baseAddress!, count: used, offset: layout.backingOffset(ofChunk: first))
    }

    func deallocate() { buffer.deallocate() }
}

/// The stored bytes of one chunk.
private struct StoredChunk {
    let bytes: UnsafeMutableRawBufferPointer

    init(fd: Int32, layout: ChunkLayout, index: Int, plaintextLength: Int) throws {
        bytes = .allocate(byteCount: plaintextLength + ChunkLayout.overhead, alignment: 64)
        do {
            let n = try FileIO.pread(fd, bytes.baseAddress!, count: bytes.count, offset: layout.backingOffset(ofChunk: index))
            if n != bytes.count { throw Errno.EIO }
        } catch {
            bytes.deallocate()
            throw error
        }
    }

    var sealed: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }
    func deallocate() { bytes.deallocate() }
}

/// The old last chunk, kept to undo a failed write.
private final class SavedChunk {
    let bytes: UnsafeMutableRawBufferPointer
    let offset: Int

    init(fd: Int32, layout: ChunkLayout, index: Int, size: Int) throws {
        let stored = try StoredChunk(fd: fd, layout: layout, index: index,
                                     plaintextLength: layout.plaintextLength(ofChunk: index, plaintextSize: size))
        bytes = stored.bytes
        offset = layout.backingOffset(ofChunk: index)
    }

    deinit { bytes.deallocate() }
}
