import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// Name resolution without a mount, for the offline tools (and an administrator restoring one file from a
/// backup of the backing directory): plaintext paths to backing paths and back, through each directory's ID.
public struct OfflineNames {
    public let cipherDir: String
    public let volume: VolumeConfig
    /// nil: the volume stores names in plaintext.
    public let cipher: NameCipher?
    private let mapping: NameMapping

    public init(cipherDir: String, volume: VolumeConfig, cipher: NameCipher?) {
        self.cipherDir = cipherDir
        self.volume = volume
        self.cipher = cipher
        mapping = cipher.map { EncryptedNames(cipher: $0) } ?? PlaintextNames()
    }

    public enum Failure: Error, CustomStringConvertible {
        case notFound(String)
        case directoryId(String)
        case undecryptable(String)

        public var description: String {
            switch self {
            case .notFound(let p): return "\(p): no such file or directory in the volume"
            case .directoryId(let p): return "\(p): the backing directory's ID file is missing or not this volume's"
            case .undecryptable(let p): return "\(p): the backing name does not decrypt in its directory"
            }
        }
    }

    /// One entry of a backing directory, with its plaintext name.
    public struct Entry {
        /// Backing path relative to the backing directory.
        public let backing: String
        /// Plaintext name, and path relative to the top of the volume (no leading "/"), for display (a name that
        /// is not UTF-8 shows replacement characters).
        public let name: String
        public let path: String
        /// The plaintext name exactly, as bytes.
        public let nameBytes: [UInt8]
        public let status: stat
    }

    /// The backing path (relative to the backing directory, "" for the top) of plaintext path `path` ("/a/b" or
    /// "a/b"). The entry need not exist; its directory must.
    public func backingPath(of path: String) throws -> String {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).map { Array($0.utf8) }
        guard let cipher else {
            return parts.map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/")
        }
        var rel = ""
        for part in parts {
            let name = try withDirectory(rel) { _, id in try cipher.encrypt(part, directoryId: id).backingName }
            rel = rel.isEmpty ? name : rel + "/" + name
        }
        return rel
    }

    /// The plaintext path ("/a/b") of a backing path relative to the backing directory.
    public func plaintextPath(of backing: String) throws -> String {
        let parts = backing.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        guard cipher != nil else { return "/" + parts.joined(separator: "/") }
        var rel = ""
        var shown: [String] = []
        for part in parts {
            guard let name = try withDirectory(rel, { fd, id in mapping.mountName(part, in: NameDirectory(inRoot: rel.isEmpty, id: id, fd: fd)) }) else {
                throw Failure.undecryptable(rel.isEmpty ? part : rel + "/" + part)
            }
            shown.append(String(decoding: name, as: UTF8.self))
            rel = rel.isEmpty ? part : rel + "/" + part
        }
        return "/" + shown.joined(separator: "/")
    }

    /// The entries of backing directory `rel` (plaintext path `shown`), sorted by plaintext name, leaving out
    /// kmsfs's own files; each name that does not decrypt is handed to `undecryptable` and left out.
    public func entries(of rel: String, shown: String, undecryptable: (String) -> Void) throws -> [Entry] {
        try withDirectory(rel) { fd, id in
            var found: [Entry] = []
            for name in try EncryptedFilesystem.entryNames(of: fd) {
                if isOwnBackingEntry(name, inRoot: rel.isEmpty, volume: volume) { continue }
                let child = rel.isEmpty ? name : rel + "/" + name
                guard let plain = mapping.mountName(name, in: NameDirectory(inRoot: rel.isEmpty, id: id, fd: fd)) else {
                    undecryptable(child)
                    continue
                }
                var st = stat()
                guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { continue }
                let text = String(decoding: plain, as: UTF8.self)
                found.append(Entry(backing: child, name: text, path: shown.isEmpty ? text : shown + "/" + text, nameBytes: plain, status: st))
            }
            return found.sorted { $0.path < $1.path }
        }
    }

    /// The target of the symbolic link at backing path `rel`, as the mount shows it.
    public func linkTarget(ofBacking rel: String) throws -> [UInt8] {
        var raw = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = try syscall { readlink(cipherDir + "/" + rel, &raw, raw.count - 1) }
        return try mapping.mountLinkTarget(raw[0..<n].map { UInt8(bitPattern: $0) })
    }

    /// Runs `body` with a descriptor of backing directory `rel` and its ID (empty with plaintext names).
    private func withDirectory<R>(_ rel: String, _ body: (Int32, [UInt8]) throws -> R) throws -> R {
        let fd = open(rel.isEmpty ? cipherDir : cipherDir + "/" + rel, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure.notFound(rel) }
        defer { close(fd) }
        guard let cipher else { return try body(fd, []) }
        guard let bytes = EncryptedNames.readSibling(NameCipher.directoryIdFile, in: fd),
              let id = cipher.directoryId(fromFile: bytes) else { throw Failure.directoryId(rel) }
        return try body(fd, id)
    }
}
