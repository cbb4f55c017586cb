import CSystem
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
        mapping = cipher.map { EncryptedNames(cipher: $0, bindsLinkTargets: volume.bindsLinkTargets) } ?? PlaintextNames()
    }

    public enum Failure: Error, CustomStringConvertible {
        case notFound(String)
        case directoryId(String)
        case undecryptable(String)
        case unbound(String)

        public var description: String {
            switch self {
            case .unbound(let p): return "\(p): the backing entry does not carry its name's binding (names exchanged or moved in the backing directory)"
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
        for (i, part) in parts.enumerated() {
            let name = try withDirectory(rel) { fd, id in
                let name = try cipher.encrypt(part, directoryId: id).backingName
                // An entry that is there must carry its name's binding; one that is not is fine (not made yet).
                var st = stat()
                if fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && bindingProblem(fd, name, directoryId: id, type: st.st_mode & S_IFMT) != nil {
                    throw Failure.unbound("/" + parts[0...i].map { String(decoding: $0, as: UTF8.self) }.joined(separator: "/"))
                }
                return name
            }
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
    /// kmsfs's own files; each name that does not decrypt, or (name binding) names a node that does not carry
    /// its binding, is handed to `undecryptable` with the reason and left out.
    public func entries(of rel: String, shown: String, undecryptable: (_ backing: String, _ why: String) -> Void) throws -> [Entry] {
        try withDirectory(rel) { fd, id in
            var found: [Entry] = []
            for name in try EncryptedFilesystem.entryNames(of: fd) {
                if isOwnBackingEntry(name, inRoot: rel.isEmpty, volume: volume) { continue }
                let child = rel.isEmpty ? name : rel + "/" + name
                guard let plain = mapping.mountName(name, in: NameDirectory(inRoot: rel.isEmpty, id: id, fd: fd)) else {
                    undecryptable(child, "a backing name that does not decrypt in its directory (altered, or moved from another directory)")
                    continue
                }
                var st = stat()
                guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { continue }
                if let problem = bindingProblem(fd, name, directoryId: id, type: st.st_mode & S_IFMT) {
                    undecryptable(child, problem)
                    continue
                }
                let text = String(decoding: plain, as: UTF8.self)
                found.append(Entry(backing: child, name: text, path: shown.isEmpty ? text : shown + "/" + text, nameBytes: plain, status: st))
            }
            return found.sorted { $0.path < $1.path }
        }
    }

    /// Rewrites the name binding tags of every regular file and directory below backing directory `rel` to the
    /// names they have now, trusting them: for a tree restored by a copy that dropped extended attributes (see
    /// `kmsfs rebind`). Names that do not decrypt are handed to `undecryptable` and left alone. Returns the
    /// number of nodes tagged.
    public func rebind(_ rel: String = "", undecryptable: (String) -> Void) throws -> Int {
        guard volume.bindsNames, let cipher else { return 0 }
        var found: [InodeKey: (path: String, tags: [[UInt8]])] = [:]
        func walk(_ rel: String) throws {
            try withDirectory(rel) { fd, id in
                for name in try EncryptedFilesystem.entryNames(of: fd) {
                    if isOwnBackingEntry(name, inRoot: rel.isEmpty, volume: volume) { continue }
                    let child = rel.isEmpty ? name : rel + "/" + name
                    guard mapping.mountName(name, in: NameDirectory(inRoot: rel.isEmpty, id: id, fd: fd)) != nil else {
                        undecryptable(child)
                        continue
                    }
                    var st = stat()
                    guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { continue }
                    let type = st.st_mode & S_IFMT
                    guard type == S_IFREG || type == S_IFDIR else { continue }
                    let nodeId: [UInt8]
                    if type == S_IFREG {
                        let f = openat(fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
                        guard f >= 0, let fid = try? EncryptedFilesystem.fileId(f) else {
                            undecryptable(child + " (cannot read its header: \(f < 0 ? "\(Errno.current)" : "not a kmsfs file"))")
                            if f >= 0 { close(f) }
                            continue
                        }
                        close(f)
                        nodeId = fid
                    } else {
                        let d = openat(fd, name, O_PATH_FLAG | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                        guard d >= 0 else {
                            undecryptable(child + " (\(Errno.current))")
                            continue
                        }
                        defer { close(d) }
                        guard let c = EncryptedNames.readSibling(NameCipher.directoryIdFile, in: d), let did = cipher.directoryId(fromFile: c) else {
                            undecryptable(child + " (its directory ID file is missing or not this volume's)")
                            continue
                        }
                        nodeId = did
                    }
                    let tag = try cipher.keys.nameBindingTag(directoryId: id, nodeId: nodeId, backingName: Array(name.utf8))
                    found[InodeKey(st), default: (child, [])].tags.append(tag)
                    if type == S_IFDIR { try walk(child) }
                }
            }
        }
        try walk(rel)
        // Through a descriptor of each node (a name replaced by a link meanwhile is never followed).
        let top = open(cipherDir, O_PATH_FLAG | O_DIRECTORY | O_CLOEXEC)
        guard top >= 0 else { throw Errno.current }
        defer { close(top) }
        var count = 0
        for (_, node) in found {
            do {
                try EncryptedFilesystem.withBindable(top, node.path) { try EncryptedFilesystem.setTags(node.tags, at: EncryptedFilesystem.nodePath($0)) }
                count += 1
            } catch {
                undecryptable(node.path + " (cannot write its tags: \(error))")
            }
        }
        return count
    }

    /// Why backing entry `name` of directory `dfd` (whose ID is `directoryId`) cannot be trusted under that
    /// name, or nil when it can: it must carry its name's binding tag (volumes with name binding), or for a
    /// symbolic link have a target sealed for that name (volumes that bind links; special files are not bound).
    func bindingProblem(_ dfd: Int32, _ name: String, directoryId: [UInt8], type: mode_t) -> String? {
        guard volume.bindsNames, let cipher else { return nil }
        let nodeId: [UInt8]
        switch type {
        case S_IFREG:
            let fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { return "cannot be opened: \(Errno.current)" }
            defer { close(fd) }
            guard let id = try? EncryptedFilesystem.fileId(fd) else { return "not a kmsfs file (no header)" }
            nodeId = id
        case S_IFDIR:
            let fd = openat(dfd, name, O_PATH_FLAG | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { return "cannot be opened: \(Errno.current)" }
            defer { close(fd) }
            guard let c = EncryptedNames.readSibling(NameCipher.directoryIdFile, in: fd), let id = cipher.directoryId(fromFile: c) else {
                return "its directory ID file is missing, damaged or not this volume's"
            }
            nodeId = id
        case S_IFLNK where volume.bindsLinkTargets:
            // A link is bound by its target, sealed for its directory and backing name.
            return (try? linkTarget(dfd, name, directoryId: directoryId)) == nil
                ? "the symbolic link's target does not open under this name (names exchanged or moved in the backing directory, or the target altered)" : nil
        default:
            return nil
        }
        guard let tag = try? cipher.keys.nameBindingTag(directoryId: directoryId, nodeId: nodeId, backingName: Array(name.utf8)),
              (try? EncryptedFilesystem.withBindable(dfd, name) { EncryptedFilesystem.isBound(tag, at: EncryptedFilesystem.nodePath($0)) }) == true else {
            return "the entry does not carry its name's binding (names exchanged or moved in the backing directory)"
        }
        return nil
    }

    /// The target of the symbolic link at backing path `rel`, as the mount shows it.
    public func linkTarget(ofBacking rel: String) throws -> [UInt8] {
        let dir = rel.split(separator: "/").dropLast().joined(separator: "/")
        let name = String(rel.split(separator: "/").last ?? "")
        return try withDirectory(dir) { fd, id in try linkTarget(fd, name, directoryId: id) }
    }

    /// The target of symbolic link `name` of backing directory `dfd` (whose ID is `directoryId`).
    func linkTarget(_ dfd: Int32, _ name: String, directoryId: [UInt8]) throws -> [UInt8] {
        var raw = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = try syscall { readlinkat(dfd, name, &raw, raw.count - 1) }
        return try mapping.mountLinkTarget(raw[0..<n].map { UInt8(bitPattern: $0) },
                                           at: NameCipher.LinkPlace(directoryId: directoryId, backingName: name))
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
