import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Synchronization

// Name binding (format 3 volumes with encrypted names made since names are bound: config `nameBinding`).
//
// An encrypted name is bound to its directory (the directory ID is its associated data) but not to the node it
// names, so two entries of one directory whose backing names were exchanged would show under each other's
// names. So every regular file and directory carries, in the backing extended attribute `user.kmsfs.names`,
// one 16-byte tag per name it has (`VolumeKeys.nameBindingTag`: directory ID, node ID, backing name), where the
// node ID is a file's file ID and a directory's own ID. The tag is checked when a file is first opened and when
// a directory is first used; creating, linking, renaming and unlinking keep the tags current. Symbolic links
// and special files cannot carry user attributes on Linux and are not bound.
extension EncryptedFilesystem {
    static let bindingAttribute = "user.kmsfs.names"
    static let tagSize = 16

    /// The tag of backing name `name` in directory `dirId` for node `nodeId`.
    func bindingTag(_ dirId: [UInt8], _ nodeId: [UInt8], _ name: String) throws -> [UInt8] {
        guard let k = volumeKeys else { throw Errno.EIO }
        return try k.nameBindingTag(directoryId: dirId, nodeId: nodeId, backingName: Array(name.utf8))
    }

    /// The path of descriptor `fd` for the *xattr and chmod calls (which take no O_PATH descriptor). It reaches
    /// exactly the node the descriptor holds, whatever its name has become since.
    static func nodePath(_ fd: Int32) -> String { "/proc/self/fd/\(fd)" }

    /// Runs `body` with an O_PATH descriptor of backing entry `name` of `dfd`, which must be a regular file or a
    /// directory (a symbolic link planted there is never followed: EIO).
    static func withBindable<R>(_ dfd: Int32, _ name: String, _ body: (Int32) throws -> R) throws -> R {
        let fd = try syscall { openat(dfd, name, O_PATH_FLAG | O_NOFOLLOW | O_CLOEXEC) }
        defer { close(fd) }
        var st = stat()
        try syscall { fstat(fd, &st) }
        guard st.st_mode & S_IFMT == S_IFREG || st.st_mode & S_IFMT == S_IFDIR else { throw Errno.EIO }
        return try body(fd)
    }

    /// Lending owner permission is serialized (a chmod through the mount takes this lock too), so that two
    /// lends, or a lend and a chmod, never restore each other's modes.
    static let lendLock = Lock()
    /// False in a read-only mount's daemon (one mount per process): it changes nothing in the backing directory,
    /// not even a mode for a moment, and a check that would need it fails instead.
    static let lendingAllowed = Atomic<Bool>(true)

    /// The tags a node carries (none when it has no attribute); an attribute that cannot be read throws, so that
    /// a change never replaces tags it could not see.
    static func tags(at path: String) throws -> [[UInt8]] {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = try withOwnerAccess(path) { () throws -> Int in
            let n = buffer.withUnsafeMutableBytes { CSystem.getxattr(path, bindingAttribute, $0.baseAddress, $0.count) }
            if n < 0 && errno != ENODATA { throw Errno.current }
            return n
        }
        if n < 0 { return [] }
        guard n % tagSize == 0 else { return [] }
        return stride(from: 0, to: n, by: tagSize).map { Array(buffer[$0..<$0 + tagSize]) }
    }

    /// Stores `tags` as the node's attribute (removes it when empty). Setting a user attribute takes write
    /// permission on the node: a daemon that does not bypass permissions lends its own node owner write
    /// permission for the moment (a file created read-only, say).
    static func setTags(_ tags: [[UInt8]], at path: String) throws {
        let bytes = tags.flatMap { $0 }
        _ = try withOwnerAccess(path) {
            try syscall {
                if bytes.isEmpty {
                    let r = CSystem.removexattr(path, bindingAttribute)
                    return r != 0 && errno == ENODATA ? 0 : r
                }
                return bytes.withUnsafeBytes { CSystem.setxattr(path, bindingAttribute, $0.baseAddress, $0.count, 0) }
            }
        }
    }

    /// Gives the new file open as `fd` (a readable and writable descriptor, not O_PATH) its tags: one
    /// fsetxattr, where the path form costs a /proc lookup. Where that is refused (a daemon that is not root, a
    /// mode without owner write), the path form, which lends owner permission for the moment.
    static func setTags(_ tags: [[UInt8]], onNew fd: Int32) throws {
        let bytes = tags.flatMap { $0 }
        if bytes.withUnsafeBytes({ fsetxattr(fd, bindingAttribute, $0.baseAddress, $0.count, 0) }) == 0 { return }
        let e = Errno.current
        guard e.code == EACCES || e.code == EPERM else { throw e }
        try setTags(tags, at: nodePath(fd))
    }

    /// Runs `body` (an extended attribute call on the node at `path`, a descriptor's `nodePath`); if it fails
    /// with EACCES or EPERM on a regular file or directory the daemon owns, runs it again with read and write
    /// lent to the owner for the moment. User attributes take the node's read (get) and write (set) permission,
    /// and a daemon that does not bypass permissions meets nodes whose owner has neither (`chmod 000`).
    static func withOwnerAccess<R>(_ path: String, _ body: () throws -> R) throws -> R {
        do {
            return try body()
        } catch let e as Errno where e.code == EACCES || e.code == EPERM {
            return try lending(path, 0o600, e, body)
        }
    }

    /// Runs `body` again with `bits` lent to the owner of the node at `path` (a descriptor's `nodePath`), under
    /// `lendLock`; rethrows `original` when the node is not the daemon's regular file or directory.
    private static func lending<R>(_ path: String, _ bits: mode_t, _ original: Errno, _ body: () throws -> R) throws -> R {
        guard lendingAllowed.load(ordering: .relaxed) else { throw original }
        return try lendLock.withLock {
            var st = stat()
            guard stat(path, &st) == 0, st.st_mode & S_IFMT == S_IFREG || st.st_mode & S_IFMT == S_IFDIR,
                  st.st_uid == geteuid(), chmod(path, (st.st_mode & 0o7777) | bits) == 0 else { throw original }
            defer { chmod(path, st.st_mode & 0o7777) }
            return try body()
        }
    }

    /// Most names (hard links) a bound file may have: their tags take 2 KiB, which fits the extended attribute
    /// space of every common filesystem (ext4 keeps about 4 KiB per inode). A link past it fails with EMLINK.
    static let maxNames = 128

    /// Adds `tag` to the node at `path` (kept once). `newName`: a name is being added (link), not replaced
    /// (rename, which holds one more tag only for a moment), so the node may not pass `maxNames`.
    func bind(_ tag: [UInt8], at path: String, newName: Bool = false) throws {
        try bindingLock.withLock {
            var all = try EncryptedFilesystem.tags(at: path)
            if all.contains(tag) { return }
            if newName && all.count >= EncryptedFilesystem.maxNames { throw Errno(EMLINK) }
            all.append(tag)
            try EncryptedFilesystem.setTags(all, at: path)
        }
    }

    /// Removes `tag` from the node at `path`, if it is there (best effort: a tag left behind only lets that old
    /// name be put back).
    func unbind(_ tag: [UInt8], at path: String) {
        bindingLock.withLock {
            guard let all = try? EncryptedFilesystem.tags(at: path) else { return }
            let rest = all.filter { $0 != tag }
            if rest.count != all.count { try? EncryptedFilesystem.setTags(rest, at: path) }
        }
    }

    /// True when the node at `path` carries `tag` (compared in constant time).
    static func isBound(_ tag: [UInt8], at path: String) -> Bool {
        var found = false
        for t in (try? tags(at: path)) ?? [] where Digest.constantTimeEquals(t, tag) { found = true }
        return found
    }

    /// The node ID of backing entry `name` of `dfd`: a regular file's file ID (bytes 16 to 31 of its header), a
    /// directory's ID; nil for other nodes, which are not bound.
    func nodeId(_ dfd: Int32, _ name: String, type: mode_t) throws -> [UInt8]? {
        guard type == S_IFREG || type == S_IFDIR else { return nil }
        return try EncryptedFilesystem.withBindable(dfd, name) { try nodeId(node: $0) }
    }

    /// The node ID of the regular file or directory held by O_PATH descriptor `node`. A node its owner may not
    /// read (a file) or search (a directory) is read with that permission lent for the moment: renaming or
    /// linking it needs none, so neither may reading its ID for its tags.
    func nodeId(node: Int32) throws -> [UInt8] {
        var st = stat()
        try syscall { fstat(node, &st) }
        let path = EncryptedFilesystem.nodePath(node)
        func read() throws -> [UInt8] {
            if st.st_mode & S_IFMT == S_IFREG {
                let fd = try syscall { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
                defer { close(fd) }
                return try EncryptedFilesystem.fileId(fd)
            }
            // The ID file is opened once to learn why it cannot be (no search permission: lent below).
            let probe = openat(node, NameCipher.directoryIdFile, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
            if probe < 0 { throw Errno.current.code == EACCES ? Errno(EACCES) : Errno.EIO }
            close(probe)
            guard let c = EncryptedNames.readSibling(NameCipher.directoryIdFile, in: node),
                  let id = names.cipher?.directoryId(fromFile: c) else { throw Errno.EIO }
            return id
        }
        do {
            return try read()
        } catch let e as Errno where e.code == EACCES {
            return try EncryptedFilesystem.lending(path, st.st_mode & S_IFMT == S_IFREG ? 0o400 : 0o100, e, read)
        }
    }

    /// The file ID in the header of the backing file `fd`.
    static func fileId(_ fd: Int32) throws -> [UInt8] {
        var header = [UInt8](repeating: 0, count: 32)
        let n = try header.withUnsafeMutableBytes { try FileIO.pread(fd, $0.baseAddress!, count: 32, offset: 0) }
        guard n == 32, Array(header[0..<4]) == FileHeader.magic else { throw Errno.EIO }
        return Array(header[16..<32])
    }

    /// The ID of directory `dir` (reading it if it was not yet).
    func knownDirectoryId(_ dir: Inode) throws -> [UInt8] {
        if let id = inodes.directoryId(of: dir) { return id }
        return try inodes.withDirectory(dir) { try nameDirectory(dir, fd: $0).id }
    }

    /// Checks that node `nodeId` at `path`, reached as backing name `name` of directory `parent`, carries that
    /// name's tag; otherwise logs once (unless `quiet`) and fails with EIO.
    func checkBinding(path: String, nodeId: [UInt8], parent: Inode, name: String, quiet: Bool = false, what: () -> String) throws {
        let tag = try bindingTag(try knownDirectoryId(parent), nodeId, name)
        guard EncryptedFilesystem.isBound(tag, at: path) else {
            if !quiet {
                let file = what()
                // Which of its names, and whether the tags could be read at all (a node its owner may not read
                // has them read with permission lent): what tells a damaged volume from a failure here.
                let shown = shownName(name, in: parent).map { String(decoding: $0, as: UTF8.self) } ?? "?"
                var why = "the backing entry does not carry its name's binding (of \"\(shown)\": names exchanged or moved in the backing directory, or the attribute removed)"
                do { _ = try EncryptedFilesystem.tags(at: path) } catch { why = "its name bindings cannot be read (\(error))" }
                FailureLog.shared.log(.error, kind: "binding-\(Hex.encode(nodeId))", "cannot use \(file): \(why); it gives EIO",
                                      event: "name-binding", fields: ["file": file])
            }
            throw Errno.EIO
        }
    }

    /// Before a name of `parent` is recorded for the node `st` describes (lookup, readdirplus): a node already
    /// known under another name must carry this name's tag too (a backing entry made a hard link of another, or
    /// two directories' names exchanged, would otherwise pass as it). New nodes are checked at first use.
    func checkNewName(_ parent: Inode, _ dfd: Int32, _ name: String, _ st: stat, _ what: () -> String) throws {
        let type = st.st_mode & S_IFMT
        guard bindsNames && (type == S_IFREG || type == S_IFDIR) && inodes.isKnownElsewhere(InodeKey(st), parent: parent, name: name) else { return }
        try EncryptedFilesystem.withBindable(dfd, name) { node in
            try checkBinding(path: EncryptedFilesystem.nodePath(node), nodeId: try nodeId(node: node), parent: parent, name: name, what: what)
        }
    }

    /// Checks every name in `names` (see above).
    func checkBinding(path: String, nodeId: [UInt8], names: [(parent: Inode, name: String)], what: () -> String) throws {
        for (parent, name) in names { try checkBinding(path: path, nodeId: nodeId, parent: parent, name: name, what: what) }
    }
}
