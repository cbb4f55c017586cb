import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Reads encrypted files straight from the backing directory, without a mount: the recovery tools
/// (`kmsfs decrypt`, `kmsfs verify`) and independent checks of what the mount wrote.
public struct OfflineReader {
    public struct Report: Sendable {
        public var plaintextSize: Int
        /// Chunks that failed authentication.
        public var corruptChunks: [Int]
        /// The backing size matches no plaintext size: the file was cut inside a chunk's overhead, or (format 3)
        /// to its header.
        public var damagedTail: Bool
        /// Format 3: the file is empty but its body is not its empty-file marker (emptied behind kmsfs's back).
        public var emptyMarkerMissing = false
        public var isIntact: Bool { corruptChunks.isEmpty && !damagedTail && !emptyMarkerMissing }

        /// What is wrong, for one line of a report ("" when intact).
        public var damage: String {
            var what: [String] = []
            if !corruptChunks.isEmpty { what.append("corrupt chunks \(corruptChunks.map(String.init).joined(separator: ", "))") }
            if damagedTail { what.append("damaged tail") }
            if emptyMarkerMissing { what.append("empty without its empty-file marker (emptied behind kmsfs's back)") }
            return what.joined(separator: "; ")
        }
    }

    public let volume: VolumeConfig
    public let keys: KeyService
    /// Format 3: the volume's keys, for the marker of empty files.
    public let volumeKeys: VolumeKeys?

    public init(volume: VolumeConfig, keys: KeyService, volumeKeys: VolumeKeys? = nil) {
        self.volume = volume
        self.keys = keys
        self.volumeKeys = volumeKeys
    }

    /// Decrypts the backing file at `backingPath`, passing each run of plaintext to `sink` in order.
    /// A corrupt chunk is passed as zeros and reported; `stopAtCorrupt` ends the walk there instead.
    @discardableResult
    public func read(backingPath: String, label: String, stopAtCorrupt: Bool = false,
                     sink: (UnsafeRawBufferPointer) throws -> Void) throws -> Report {
        let fd = Glibc.open(backingPath, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 { throw Errno.current }
        defer { close(fd) }
        let opened = try FileOpener.open(fd: fd, volumeId: volume.volumeId, keys: keys, path: label)
        let layout = opened.header.layout
        let backingSize = try FileIO.size(fd)
        let size = layout.plaintextSize(backingSize: backingSize)
        var report = Report(plaintextSize: size, corruptChunks: [], damagedTail: !layout.isConsistent(backingSize: backingSize))
        if layout.marksEmptyFile && size == 0 && backingSize >= layout.headerLength + ChunkLayout.emptyMarkerSize {
            guard let k = volumeKeys else { throw FormatError.malformedHeader("an empty-file marker flag without the volume key to check it") }
            var stored = [UInt8](repeating: 0, count: ChunkLayout.emptyMarkerSize)
            let n = try stored.withUnsafeMutableBytes { try FileIO.pread(fd, $0.baseAddress!, count: $0.count, offset: layout.headerLength) }
            let expected = try k.emptyFileMarker(fileId: opened.header.fileId)
            report.emptyMarkerMissing = n != stored.count || !Digest.constantTimeEquals(stored, expected)
        }
        let count = layout.chunkCount(plaintextSize: size)
        let codec = try ChunkCodec(chunkKey: opened.keys.chunkKey, fileId: opened.header.fileId, layout: layout)
        let sealed = UnsafeMutableRawBufferPointer.allocate(byteCount: layout.storedChunkSize, alignment: 64)
        let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: layout.chunkSize, alignment: 64)
        defer {
            sealed.deallocate()
            plain.deallocate()
        }
        for i in 0..<count {
            let len = layout.plaintextLength(ofChunk: i, plaintextSize: size)
            let stored = len + ChunkLayout.overhead
            let n = try FileIO.pread(fd, sealed.baseAddress!, count: stored, offset: layout.backingOffset(ofChunk: i))
            var ok = n == stored
            if ok {
                ok = codec.open(UnsafeRawBufferPointer(rebasing: sealed[0..<stored]), index: i, isLast: i == count - 1,
                                into: plain.baseAddress!) != .corrupt
            }
            if !ok {
                report.corruptChunks.append(i)
                if stopAtCorrupt { return report }
                plain.initializeMemory(as: UInt8.self, repeating: 0)
            }
            try sink(UnsafeRawBufferPointer(rebasing: plain[0..<len]))
        }
        return report
    }
}
