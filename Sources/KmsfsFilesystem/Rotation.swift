import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Synchronization

/// Who may use a backing directory: a mount holds a shared lock on it for its lifetime, offline maintenance
/// (key rotation) an exclusive one, so the two never run at once.
public enum VolumeLock {
    /// Takes the lock on an open descriptor of the backing directory; false if someone else holds it.
    public static func tryLock(_ dirFd: Int32, exclusive: Bool) -> Bool {
        flock(dirFd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0
    }
}

/// The redo record of key rotation, `kmsfs.conf.rewrap-journal` at the top of the backing directory.
///
/// Before a file's header is rewritten in place, the complete new header (or, when the header must grow
/// and the body move, a complete copy of the new file in `kmsfs.conf.rewrap-copy`) is made durable and
/// named in the journal. Replaying the journal is idempotent, so a rotation stopped at any point is
/// finished by the next `kmsfs rewrap` or `kmsfs mount`, and no file is ever left half-written.
public enum RewrapJournal {
    public static let name = VolumeConfig.fileName + ".rewrap-journal"
    static let copyName = VolumeConfig.fileName + ".rewrap-copy"

    struct Entry: Codable {
        /// Backing path of the file, relative to the backing directory.
        var path: String
        /// "header": write `header` at offset 0. "copy": replace the file's contents with the copy file.
        var kind: String
        var header: String?
    }

    /// A rotation step failed after its journal was written: the run stops, leaving the journal to redo.
    public struct Interrupted: Error, CustomStringConvertible {
        public let path: String
        public let reason: String
        public var description: String {
            "rewrapping /\(path) failed after its journal was written (\(reason)); the next kmsfs rewrap or mount finishes it"
        }
    }

    /// True when a rotation step's journal is waiting to be redone.
    public static func isPending(cipherDir: String) -> Bool {
        access(cipherDir + "/" + name, F_OK) == 0
    }

    /// Finishes an interrupted rotation step, if any. Returns the path it repaired.
    @discardableResult
    public static func recover(cipherDir: String) throws -> String? {
        removeTemporaries(cipherDir: cipherDir)
        let journal = cipherDir + "/" + name
        guard let bytes = try? FileIO.readFile(journal) else {
            // A copy without a journal is a leftover of a step that was finished or never journaled.
            unlink(cipherDir + "/" + copyName)
            return nil
        }
        guard let entry = try? JSONDecoder().decode(Entry.self, from: Data(bytes)) else {
            // An unreadable journal was never completed (it is written atomically): nothing was changed yet.
            unlink(journal)
            return nil
        }
        try apply(entry, cipherDir: cipherDir)
        clear(cipherDir: cipherDir)
        return entry.path
    }

    /// Removes the temporary files of atomic writes of the config or the journal (`kmsfs.conf.tmp-<pid>`,
    /// `kmsfs.conf.rewrap-journal.tmp-<pid>`) that a killed process left at the top of the backing directory.
    /// Called with the volume held exclusively, so the only live writer is this process.
    static func removeTemporaries(cipherDir: String) {
        guard let dir = opendir(cipherDir) else { return }
        defer { closedir(dir) }
        let mine = ".tmp-\(getpid())"
        for n in DirectoryEntry.names(dir) {
            for base in [VolumeConfig.fileName, name] where n.hasPrefix(base + ".tmp-") && !n.hasSuffix(mine) {
                if n.dropFirst(base.count + 5).allSatisfy(\.isNumber) { unlink(cipherDir + "/" + n) }
            }
        }
    }

    static func apply(_ entry: Entry, cipherDir: String) throws {
        let fd = Glibc.open(cipherDir + "/" + entry.path, O_RDWR | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 {
            if errno == ENOENT { return }  // deleted since: nothing to repair
            throw Errno.current
        }
        defer { close(fd) }
        switch entry.kind {
        case "header":
            guard let header = entry.header.flatMap(Base64.decode) else { throw FormatError.malformedHeader("bad journal") }
            try header.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: 0) }
        case "copy":
            let copy = Glibc.open(cipherDir + "/" + copyName, O_RDONLY | O_CLOEXEC)
            if copy < 0 {
                // The journal is written only after its copy is durable, and the copy is removed only after the
                // journal: a missing copy means the step was already applied and cleanup had begun.
                if errno == ENOENT { return }
                throw Errno.current
            }
            defer { close(copy) }
            let size = try FileIO.size(copy)
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var offset = 0
            while offset < size {
                let n = try buffer.withUnsafeMutableBytes { try FileIO.pread(copy, $0.baseAddress!, count: min($0.count, size - offset), offset: offset) }
                if n == 0 { break }
                try buffer.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: n, offset: offset) }
                offset += n
            }
            try syscall { ftruncate(fd, off_t(size)) }
        default:
            throw FormatError.malformedHeader("bad journal")
        }
        try syscall { fsync(fd) }
    }

    static func write(_ entry: Entry, cipherDir: String) throws {
        let data = try JSONEncoder().encode(entry)
        try FileIO.writeFileAtomically(cipherDir + "/" + name, contents: Array(data), mode: 0o600)
    }

    static func clear(cipherDir: String) {
        // The journal goes first: a copy without a journal is only a leftover, a journal without its copy
        // would name work that can no longer be redone.
        unlink(cipherDir + "/" + name)
        unlink(cipherDir + "/" + copyName)
        let d = Glibc.open(cipherDir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if d >= 0 { fsync(d); close(d) }
    }
}

/// Key rotation: re-wraps every file's data key under a new set of keys by rewriting headers only
/// (ReEncrypt, so with AWS KMS the plaintext key never leaves KMS); bodies are untouched.
public final class VolumeRewrapper: @unchecked Sendable {
    public struct Summary: Sendable {
        public var total = 0
        public var rewrapped = 0
        public var unchanged = 0
        public var failed: [(path: String, reason: String)] = []
        /// Files whose new header did not fit `headerLength` and got a longer one.
        public var longer = 0
    }

    let cipherDir: String
    let volume: VolumeConfig
    let keys: KeyService
    let targets: [String]
    /// The header length every rewritten file gets (a format 2 volume's uniform length), or nil to keep each
    /// file's own length where the new keys fit.
    let headerLength: Int?

    public init(cipherDir: String, volume: VolumeConfig, keys: KeyService, targets: [String], headerLength: Int? = nil) {
        self.cipherDir = cipherDir
        self.volume = volume
        self.keys = keys
        self.targets = targets
        self.headerLength = headerLength
    }

    /// Rewraps every regular file; `progress(done, total)` is called after each one.
    ///
    /// The key service calls (ReEncrypt, one per file and key) run on `jobs` threads at once; the headers are
    /// then written one at a time on the calling thread, each through the redo journal, so a rotation stopped
    /// at any point leaves at most one file to finish, exactly as a serial one would.
    public func run(jobs: Int = VolumeRewrapper.defaultJobs, progress: (Int, Int) -> Void) throws -> Summary {
        var files: [String] = []
        links = []
        seenLinks = [:]
        try collect("", into: &files)
        var summary = Summary()
        summary.total = files.count + links.count
        let queue = PreparedQueue(capacity: max(1, jobs) * 2)
        let next = Mutex(0)
        let workerCount = min(max(1, jobs), max(1, files.count))
        let all = files
        for _ in 0..<workerCount {
            let started = BackgroundThread.start { [self] in
                while true {
                    let i: Int = next.withLock { n in
                        defer { n += 1 }
                        return n
                    }
                    guard i < all.count, !queue.isCancelled else { break }
                    queue.put(i, Result { try prepare(all[i]) })
                }
                queue.workerDone()
            }
            if !started { queue.workerDone() }
        }
        defer { queue.cancel() }
        var done = 0
        while let (i, prepared) = queue.take(workers: workerCount) {
            done += 1
            let rel = all[i]
            do {
                if let p = try prepared.get() {
                    try apply(p)
                    summary.rewrapped += 1
                    if let h = headerLength, p.updated.headerLength != h { summary.longer += 1 }
                } else {
                    summary.unchanged += 1
                }
            } catch {
                summary.failed.append((rel, "\(error)"))
                // A step that failed after its journal was written must be redone before any other file is
                // touched (the next step would replace its journal): stop here; the next rewrap or mount redoes it.
                if RewrapJournal.isPending(cipherDir: cipherDir) {
                    queue.cancel()
                    throw RewrapJournal.Interrupted(path: rel, reason: "\(error)")
                }
            }
            progress(done, summary.total)
        }
        // A further name of a hard-linked file is done once its first name is.
        for link in links {
            if let f = summary.failed.first(where: { $0.path == link.first }) {
                summary.failed.append((link.name, f.reason))
            } else {
                summary.unchanged += 1
            }
            done += 1
            progress(done, summary.total)
        }
        return summary
    }

    public static let defaultJobs = 16

    /// A file's new header, made but not yet written.
    struct Prepared {
        let rel: String
        let old: FileHeader
        let updated: FileHeader
    }

    /// Reads a file's header and re-wraps its key under the targets (the key service calls); nil if it is
    /// already wrapped exactly under them.
    func prepare(_ rel: String) throws -> Prepared? {
        let fd = Glibc.open(cipherDir + "/" + rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 { throw Errno.current }
        defer { close(fd) }
        let header = try FileOpener.readHeader(fd: fd)
        try header.checkContext(volumeId: volume.volumeId)
        let underTargets = header.wrappedKeys.map(\.keyId) == targets
        if underTargets && (headerLength == nil || header.headerLength == headerLength) { return nil }
        // Already under the new keys but of another length: only the layout changes, no key service call.
        let wrapped = underTargets ? header.wrappedKeys
            : try keys.rewrap(header.wrappedKeys, to: targets, context: header.context,
                              subject: KeySubject(path: "/" + rel, fileId: header.fileId))
        return Prepared(rel: rel, old: header, updated: try header.replacingWrappedKeys(wrapped, length: headerLength))
    }

    /// Rewraps one file; false if it was already wrapped exactly under the targets.
    func rewrap(_ rel: String) throws -> Bool {
        guard let p = try prepare(rel) else { return false }
        try apply(p)
        return true
    }

    /// Writes a prepared header through the journal.
    func apply(_ p: Prepared) throws {
        let rel = p.rel, header = p.old, updated = p.updated
        let fd = Glibc.open(cipherDir + "/" + rel, O_RDWR | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 { throw Errno.current }
        defer { close(fd) }
        // Nothing else writes the volume during a rotation (it holds the volume lock): the header read when the
        // key was re-wrapped is still the file's header.
        let bytes = updated.encoded()
        if updated.headerLength == header.headerLength {
            try RewrapJournal.write(.init(path: rel, kind: "header", header: Base64.encode(bytes)), cipherDir: cipherDir)
            Failpoint.hit("rewrap-after-journal")
            try bytes.withUnsafeBytes { b in
                // Written in two halves, so a crash between them leaves a torn header for the journal to repair.
                let half = b.count / 2
                try FileIO.pwrite(fd, b.baseAddress!, count: half, offset: 0)
                Failpoint.hit("rewrap-mid-header")
                try FileIO.pwrite(fd, b.baseAddress! + half, count: b.count - half, offset: half)
            }
            try syscall { fsync(fd) }
        } else {
            // The header grows: the body moves. Make a complete new file first, then copy it over the old one
            // in place (hard links and the inode number stay).
            let copyPath = cipherDir + "/" + RewrapJournal.copyName
            let copy = Glibc.open(copyPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            if copy < 0 { throw Errno.current }
            defer { close(copy) }
            try bytes.withUnsafeBytes { try FileIO.pwrite(copy, $0.baseAddress!, count: $0.count, offset: 0) }
            let size = try FileIO.size(fd)
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var offset = header.headerLength
            while offset < size {
                let n = try buffer.withUnsafeMutableBytes { try FileIO.pread(fd, $0.baseAddress!, count: min($0.count, size - offset), offset: offset) }
                if n == 0 { break }
                try buffer.withUnsafeBytes { try FileIO.pwrite(copy, $0.baseAddress!, count: n, offset: updated.headerLength + offset - header.headerLength) }
                offset += n
            }
            try syscall { fsync(copy) }
            try RewrapJournal.write(.init(path: rel, kind: "copy", header: nil), cipherDir: cipherDir)
            Failpoint.hit("rewrap-after-journal")
            try RewrapJournal.apply(.init(path: rel, kind: "copy", header: nil), cipherDir: cipherDir)
        }
        Failpoint.hit("rewrap-before-clear")
        RewrapJournal.clear(cipherDir: cipherDir)
    }

    /// Hard links found by `collect`: a further name, and the first name of its file.
    private var links: [(name: String, first: String)] = []
    private var seenLinks: [String: String] = [:]

    private func collect(_ rel: String, into files: inout [String]) throws {
        let dir = rel.isEmpty ? cipherDir : cipherDir + "/" + rel
        guard let d = opendir(dir) else { throw Errno.current }
        defer { closedir(d) }
        let names = DirectoryEntry.names(d).filter { !isOwnBackingEntry($0, inRoot: rel.isEmpty, volume: volume) }
        for name in names.sorted() {
            let child = rel.isEmpty ? name : rel + "/" + name
            var st = stat()
            guard lstat(cipherDir + "/" + child, &st) == 0 else { continue }
            if st.st_mode & S_IFMT == S_IFDIR { try collect(child, into: &files) }
            if st.st_mode & S_IFMT == S_IFREG {
                // The further names of a hard-linked file are the same file: rewrapped once, through its first name.
                if st.st_nlink > 1 {
                    let key = "\(st.st_dev):\(st.st_ino)"
                    if let first = seenLinks[key] {
                        links.append((child, first))
                        continue
                    }
                    seenLinks[key] = child
                }
                files.append(child)
            }
        }
    }
}

/// Prepared rewraps handed from the worker threads to the writing thread, at most `capacity` waiting.
private final class PreparedQueue: @unchecked Sendable {
    private let condition = Condition()
    private var items: [(Int, Result<VolumeRewrapper.Prepared?, Error>)] = []
    private var finishedWorkers = 0
    private var cancelled = false
    private let capacity: Int

    init(capacity: Int) { self.capacity = capacity }

    var isCancelled: Bool { condition.withLock { cancelled } }

    func put(_ index: Int, _ item: Result<VolumeRewrapper.Prepared?, Error>) {
        condition.withLock {
            while items.count >= capacity && !cancelled { condition.wait() }
            if cancelled { return }
            items.append((index, item))
            condition.broadcast()
        }
    }

    func workerDone() {
        condition.withLock {
            finishedWorkers += 1
            condition.broadcast()
        }
    }

    /// The next prepared item; nil once every worker is done and nothing is left.
    func take(workers: Int) -> (Int, Result<VolumeRewrapper.Prepared?, Error>)? {
        condition.withLock {
            while items.isEmpty && finishedWorkers < workers { condition.wait() }
            guard !items.isEmpty else { return nil }
            condition.broadcast()
            return items.removeFirst()
        }
    }

    func cancel() {
        condition.withLock {
            cancelled = true
            condition.broadcast()
        }
    }
}
