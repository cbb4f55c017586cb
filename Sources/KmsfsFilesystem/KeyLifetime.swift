import CSystem
import Dispatch
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Synchronization

// Key lifetime, in one place.
//
// A file's data key is unwrapped the first time one of its open handles needs it (its first read, write or
// resizing truncate; opening, stat, touch and truncation to zero need none), shared by every handle of its
// inode, hard links included, and wiped when the last handle closes. The derived chunk key lives in locked
// memory (`SecureBytes`), and OpenSSL's keyed contexts are cleansed when freed. Keys made ahead for new files
// (`DataKeyPool`, in the keys layer) are bounded in number and age and wiped at unmount; a new file takes one
// and its key then follows the rule above.

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
        defer { poolLock.withLock { if pool.count < Parallel.cpuCount + 1 { pool.append(codec) } } }
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
    /// Mount path, for log lines and the audit log: found when first needed (most opens never need it) and
    /// kept from then on.
    var path: String {
        stateLock.withLock {
            if let p = foundPath { return p }
            let p = pathSource()
            foundPath = p
            return p
        }
    }
    private let pathSource: @Sendable () -> String
    private var foundPath: String?
    /// From the header prefix, read at open (no key needed).
    let layout: ChunkLayout
    /// The header as read at the first open, for unwrapping the key when it is first needed (nil for a file
    /// created by this mount, whose key is known from the start).
    let header: FileHeader?
    /// The body an empty file of this layout holds (`marksEmptyFile`), nil when empty files are empty.
    let emptyMarker: [UInt8]?
    /// Serializes writes and truncations against each other and against reads of this file.
    let io = ReadWriteLock()

    /// Shared mode: the read lock against other hosts kept for this host's next reads of the file, with the
    /// descriptors it holds (`EncryptedFilesystem.withIO`). Guarded by `io`, held exclusively (shared-mode I/O
    /// always takes it so); `heldReads` counts the locks kept, so that an expiry acts on its own one only.
    var heldRead: (lockFd: Int32, lockStart: Int64, ioFd: Int32, since: Double, number: Int)?
    var heldReads = 0

    /// Gives up the kept read lock, if any. Call with `io` held exclusively.
    func endHeldRead() {
        guard let held = heldRead else { return }
        heldRead = nil
        close(held.ioFd)
        _ = kmsfs_ofd_lock_range(held.lockFd, Int32(F_UNLCK), held.lockStart, 1)
    }

    /// Ends kept read lock number `number` once `io` is free (never waiting for it: `io` may be held for as long
    /// as another host's lock is waited for), unless a later one replaced it or it ended already.
    func expireHeldRead(_ number: Int, after seconds: Double) {
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [weak self] in
            guard let self else { return }
            let ran: Void? = io.withWriteLockIfFree { if heldRead?.number == number { endHeldRead() } }
            if ran == nil {
                expireHeldRead(number, after: seconds)
            }
        }
    }

    /// The plaintext size. Read under `io` (shared), changed under `io` (exclusive); getattr reads it without
    /// the lock and sees the size before or after a change, never a torn value.
    private let sizeValue: Atomic<Int>
    var size: Int {
        get { sizeValue.load(ordering: .acquiring) }
        set { sizeValue.store(newValue, ordering: .releasing) }
    }

    // Guarded by the table's lock.
    fileprivate var references = 0
    /// Backing descriptors of the handles (guarded by the table's lock): a node whose names are all gone is
    /// still reached through them.
    fileprivate var descriptors: [Int32] = []

    // loadLock serializes loading (held across the provider call); stateLock guards `loaded` and is never
    // held across anything slow, so nothing but a key load ever waits on a key service.
    private let loadLock = Lock()
    private let stateLock = Lock()
    private var loaded: FileSecrets?

    /// True while the file's data key is in memory.
    var holdsKey: Bool { stateLock.withLock { loaded != nil } }

    // Chunks already reported as corrupt (one log line each), guarded by reportLock.
    private let reportLock = Lock()
    private var reported = Set<Int>()

    fileprivate init(inode: InodeKey, path: @escaping @Sendable () -> String, layout: ChunkLayout, header: FileHeader?,
                     emptyMarker: [UInt8]?, size: Int) {
        self.inode = inode
        pathSource = path
        self.layout = layout
        self.header = header
        self.emptyMarker = emptyMarker
        sizeValue = Atomic(size)
    }

    /// True once the data key is in memory.
    var hasKey: Bool { stateLock.withLock { loaded != nil } }

    /// A failed load is answered again without a new provider call for this long: the kernel retries a failed
    /// read at once (readahead, then the page itself), and one refusal should cost one call and one log line.
    static let failureMemorySeconds = 2.0

    /// The file's secrets, loading them with `load` (one provider call) if no handle has needed them yet.
    func secrets(_ load: () throws -> FileSecrets) throws -> FileSecrets {
        if let s = stateLock.withLock({ loaded }) { return s }
        return try loadLock.withLock {
            if let s = stateLock.withLock({ loaded }) { return s }
            if let (error, at) = lastFailure, Monotonic.seconds() - at < OpenFile.failureMemorySeconds { throw error }
            do {
                let s = try load()
                stateLock.withLock { loaded = s }
                lastFailure = nil
                return s
            } catch {
                lastFailure = (error, Monotonic.seconds())
                throw error
            }
        }
    }
    /// The last failed load and when it happened (guarded by loadLock).
    private var lastFailure: (Error, Double)?

    /// Secrets known at creation (a new file's fresh key).
    fileprivate func install(_ s: FileSecrets) {
        stateLock.withLock { loaded = s }
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

/// The open files of the mount, by inode. Loading one file's key never blocks opens or I/O of other files.
final class OpenFileTable: @unchecked Sendable {
    private let lock = Lock()
    private var files: [InodeKey: OpenFile] = [:]
    private let onDiscard: @Sendable (OpenFile, FileSecrets) -> Void

    init(onDiscard: @escaping @Sendable (OpenFile, FileSecrets) -> Void) {
        self.onDiscard = onDiscard
    }

    /// Takes a reference to the entry of `inode` for a handle with backing descriptor `fd`. A new entry gets
    /// `layout`, `size()`, its `emptyMarker` (format 3) and, for a file just created, its `secrets`.
    func acquire(_ inode: InodeKey, fd: Int32, path: @escaping @Sendable () -> String, layout: ChunkLayout, size: () throws -> Int,
                 header: FileHeader? = nil, emptyMarker: () throws -> [UInt8]? = { nil }, secrets: FileSecrets? = nil) throws -> OpenFile {
        if let f = lock.withLock({ () -> OpenFile? in
            guard let f = files[inode] else { return nil }
            f.references += 1
            f.descriptors.append(fd)
            return f
        }) { return f }
        // A new entry: its size is read from the backing file under the lock, so that no other handle can change
        // the file between that read and the entry becoming the one every handle uses.
        return try lock.withLock {
            if let f = files[inode] {
                f.references += 1
                f.descriptors.append(fd)
                return f
            }
            let f = OpenFile(inode: inode, path: path, layout: layout, header: header, emptyMarker: try emptyMarker(), size: try size())
            if let s = secrets { f.install(s) }
            files[inode] = f
            f.references = 1
            f.descriptors.append(fd)
            return f
        }
    }

    /// Drops the reference of the handle with descriptor `fd` and closes `fd` with `closeDescriptor`; the last
    /// one wipes the file's secrets. True for the last one. The entry stays in the table until the descriptor
    /// is closed, and an open meanwhile joins it, size and all: a backing filesystem that sends a file's data to
    /// its server at close (JuiceFS) may answer a size asked for during the close with the size before those
    /// writes.
    @discardableResult
    func release(_ file: OpenFile, fd: Int32, closeDescriptor: (Int32) -> Void) -> Bool {
        let lastHandle = lock.withLock { () -> Bool in
            file.references -= 1
            if let i = file.descriptors.firstIndex(of: fd) { file.descriptors.remove(at: i) }
            return file.references == 0
        }
        closeDescriptor(fd)
        guard lastHandle else { return false }
        let last = lock.withLock { () -> Bool in
            // (An open may have joined the entry while the descriptor closed.)
            guard file.references == 0 else { return false }
            if files[file.inode] === file { files[file.inode] = nil }
            return true
        }
        if last, let s = file.discard() {
            s.wipe()
            onDiscard(file, s)
        }
        return last
    }

    /// The entry of an inode if some handle has it open.
    func lookup(_ inode: InodeKey) -> OpenFile? {
        lock.withLock { files[inode] }
    }

    /// Runs `body` with a backing descriptor of an open handle of `inode`, if there is one, and its entry.
    /// `body` runs under the table's lock (which keeps the descriptor from being closed by a concurrent
    /// release), so it must not call back into the table.
    func withDescriptor<R>(of inode: InodeKey, _ body: (Int32, OpenFile) throws -> R) rethrows -> R? {
        try lock.withLock {
            guard let f = files[inode], let fd = f.descriptors.first else { return nil }
            return try body(fd, f)
        }
    }

    var count: Int { lock.withLock { files.count } }

    /// Files whose data key is in memory now.
    var keysHeld: Int {
        let all = lock.withLock { Array(files.values) }
        return all.filter(\.holdsKey).count
    }

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
