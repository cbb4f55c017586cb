import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Identity of a backing file: hard links share one, so they share one open-file entry and one key.
public struct InodeKey: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64

    public init(_ st: stat) {
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
    }
}

/// What an open file needs to read and write its body: its chunk key (in locked memory), file ID and layout.
/// Created when the first handle opens the file, wiped when the last one closes.
final class FileSecrets: @unchecked Sendable {
    let chunkKey: SecureBytes
    let fileId: [UInt8]
    let layout: ChunkLayout
    private let poolLock = Lock()
    private var pool: [ChunkCodec] = []

    init(chunkKey: SecureBytes, fileId: [UInt8], layout: ChunkLayout) {
        self.chunkKey = chunkKey
        self.fileId = fileId
        self.layout = layout
    }

    /// Runs `body` with a codec keyed for this file (codecs are reused: keying AES costs more than a small chunk).
    func withCodec<R>(_ body: (ChunkCodec) throws -> R) throws -> R {
        let codec = try poolLock.withLock { pool.popLast() } ?? ChunkCodec(chunkKey: chunkKey, fileId: fileId, layout: layout)
        defer { poolLock.withLock { if pool.count < 8 { pool.append(codec) } } }
        return try body(codec)
    }

    /// Wipes the key and frees every keyed cipher context (OpenSSL cleanses them).
    func wipe() {
        chunkKey.wipe()
        poolLock.withLock { pool.removeAll() }
    }
}

/// One open backing file (inode), shared by all its FUSE handles.
final class OpenFile: @unchecked Sendable {
    let inode: InodeKey
    /// Serializes writes and truncations against each other and against reads of this file.
    let io = ReadWriteLock()

    // Guarded by the table's lock.
    fileprivate var references = 0

    // loadLock serializes loading (held across the provider call); stateLock guards `loaded` and is never
    // held across anything slow, so size queries never wait on a key service.
    private let loadLock = Lock()
    private let stateLock = Lock()
    private var loaded: FileSecrets?
    /// The mount path at first open, for log lines and the audit log.
    private(set) var path: String

    // Chunks already reported as corrupt (one log line each), guarded by reportLock.
    private let reportLock = Lock()
    private var reported = Set<Int>()

    fileprivate init(inode: InodeKey, path: String) {
        self.inode = inode
        self.path = path
    }

    /// The secrets of an open file (present once `acquire` returned it).
    var secrets: FileSecrets { stateLock.withLock { loaded! } }

    /// Layout without waiting on a load in progress (nil while loading).
    var layoutIfLoaded: ChunkLayout? {
        stateLock.withLock { loaded?.layout }
    }

    fileprivate func ensureLoaded(_ load: () throws -> FileSecrets) throws {
        try loadLock.withLock {
            if stateLock.withLock({ loaded }) == nil {
                let s = try load()
                stateLock.withLock { loaded = s }
            }
        }
    }

    fileprivate func discard() -> FileSecrets? {
        stateLock.withLock {
            let s = loaded
            loaded = nil
            return s
        }
    }

    /// True the first time `chunk` is reported.
    func firstReport(ofChunk chunk: Int) -> Bool {
        reportLock.withLock { reported.insert(chunk).inserted }
    }
}

/// The open files of the mount, by inode. The data key of a file is unwrapped when its first handle opens
/// (one provider call, however many handles follow) and wiped when its last handle is released.
/// Loading one file's key never blocks opens or I/O of other files.
final class OpenFileTable: @unchecked Sendable {
    private let lock = Lock()
    private var files: [InodeKey: OpenFile] = [:]
    private let onDiscard: @Sendable (OpenFile, FileSecrets) -> Void

    init(onDiscard: @escaping @Sendable (OpenFile, FileSecrets) -> Void) {
        self.onDiscard = onDiscard
    }

    /// Takes a reference to the entry of `inode`, loading its secrets with `load` if no handle holds them.
    func acquire(_ inode: InodeKey, path: String, load: () throws -> FileSecrets) throws -> OpenFile {
        let file = lock.withLock { () -> OpenFile in
            let f = files[inode] ?? OpenFile(inode: inode, path: path)
            files[inode] = f
            f.references += 1
            return f
        }
        do {
            try file.ensureLoaded(load)
        } catch {
            release(file)
            throw error
        }
        return file
    }

    /// Drops a reference; the last one wipes the file's secrets.
    func release(_ file: OpenFile) {
        let last = lock.withLock { () -> Bool in
            file.references -= 1
            if file.references == 0 {
                if files[file.inode] === file { files[file.inode] = nil }
                return true
            }
            return false
        }
        if last, let s = file.discard() {
            s.wipe()
            onDiscard(file, s)
        }
    }

    /// The entry of an inode if some handle has it open.
    func lookup(_ inode: InodeKey) -> OpenFile? {
        lock.withLock { files[inode] }
    }

    var count: Int { lock.withLock { files.count } }

    /// Wipes every key (unmount).
    func wipeAll() {
        let all = lock.withLock { () -> [OpenFile] in
            let a = Array(files.values)
            files.removeAll()
            return a
        }
        for f in all { f.discard()?.wipe() }
    }
}
