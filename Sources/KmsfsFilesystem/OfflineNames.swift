import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// Name resolution without a mount, for the offline tools (and an administrator restoring one file from a
/// backup of the backing directory): plaintext paths to backing paths and back, through each directory's ID.
public struct OfflineNames {
    public let cipherDir: String
    /// nil: the volume stores names in plaintext.
    public let cipher: NameCipher?

    public init(cipherDir: String, cipher: NameCipher?) {
        self.cipherDir = cipherDir
        self.cipher = cipher
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

    /// The backing path (relative to the backing directory, "" for the top) of plaintext path `path` ("/a/b" or
    /// "a/b"). The entry need not exist; its directory must.
    public func backingPath(of path: String) throws -> String {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true).map { Array($0.utf8) }
        guard let cipher else {
            return parts.map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/")
        }
        var rel = ""
        for part in parts {
            let id = try directoryId(rel)
            let name = try cipher.encrypt(part, directoryId: id).backingName
            rel = rel.isEmpty ? name : rel + "/" + name
        }
        return rel
    }

    /// The plaintext path ("/a/b") of a backing path relative to the backing directory.
    public func plaintextPath(of backing: String) throws -> String {
        let parts = backing.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        guard let cipher else { return "/" + parts.joined(separator: "/") }
        var rel = ""
        var shown: [String] = []
        for part in parts {
            guard let name = try mountName(part, in: rel, cipher: cipher) else {
                throw Failure.undecryptable(rel.isEmpty ? part : rel + "/" + part)
            }
            shown.append(String(decoding: name, as: UTF8.self))
            rel = rel.isEmpty ? part : rel + "/" + part
        }
        return "/" + shown.joined(separator: "/")
    }

    /// The plaintext name of backing entry `name` of backing directory `rel`, or nil when it has none
    /// (kmsfs's own files, or a name that does not decrypt there).
    public func mountName(_ name: String, in rel: String, cipher: NameCipher) throws -> [UInt8]? {
        let dir = rel.isEmpty ? cipherDir : cipherDir + "/" + rel
        let fd = open(dir, O_PATH_FLAG | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure.notFound(rel) }
        defer { close(fd) }
        let mapping = EncryptedNames(cipher: cipher)
        return mapping.mountName(name, in: NameDirectory(inRoot: rel.isEmpty, id: try directoryId(rel), fd: fd))
    }

    /// The ID of backing directory `rel`.
    public func directoryId(_ rel: String) throws -> [UInt8] {
        guard let cipher else { return [] }
        let dir = rel.isEmpty ? cipherDir : cipherDir + "/" + rel
        guard let bytes = try? FileIO.readFile(dir + "/" + NameCipher.directoryIdFile) else {
            if !Paths.isDirectory(dir) { throw Failure.notFound(rel) }
            throw Failure.directoryId(rel)
        }
        guard let id = cipher.directoryId(fromFile: bytes) else { throw Failure.directoryId(rel) }
        return id
    }
}

private enum Paths {
    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR
    }
}
