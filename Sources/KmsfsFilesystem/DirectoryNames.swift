import CSystem
import Glibc
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Names in directories: the directory ID files of encrypted names, long names' siblings, and mount paths
/// for log lines. The handlers reach every entry through `withEntry`.
extension EncryptedFilesystem {
    /// Runs `body` with a descriptor of directory `parent` and the backing name of its entry `name`.
    func withEntry<R>(_ parent: Inode, _ name: [UInt8], creating: Bool, _ body: (Int32, BackingName) throws -> R) throws -> R {
        try inodes.withDirectory(parent) { dfd in
            let dir = try nameDirectory(parent, fd: dfd)
            return try body(dfd, try names.backingName(name, in: dir, creating: creating))
        }
    }

    /// What the name mapping needs to know of directory `dir`, reached through `fd`.
    func nameDirectory(_ dir: Inode, fd: Int32) throws -> NameDirectory {
        let inRoot = dir === inodes.root
        guard names.usesDirectoryIds else { return NameDirectory(inRoot: inRoot, id: [], fd: fd) }
        if let id = inodes.directoryId(of: dir) { return NameDirectory(inRoot: inRoot, id: id, fd: fd) }
        let id = try readDirectoryId(fd, of: dir)
        inodes.setDirectoryId(id, of: dir)
        return NameDirectory(inRoot: inRoot, id: id, fd: fd)
    }

    /// Reads the ID file of the backing directory `fd`. A directory that has none, or a damaged one, and holds
    /// nothing else (a crash during mkdir) is given a new one; otherwise the directory cannot be used (EIO).
    private func readDirectoryId(_ fd: Int32, of dir: Inode) throws -> [UInt8] {
        guard let cipher = names.cipher else { return [] }
        if let c = EncryptedNames.readSibling(NameCipher.directoryIdFile, in: fd), let id = cipher.directoryId(fromFile: c) {
            // A bound directory must carry the tag of the name it was reached by. An empty one without it (a crash
            // inside mkdir, between its ID and its tag) is given the tag: it has nothing to confuse.
            if bindsNames, dir !== inodes.root, let (parent, name) = inodes.location(of: dir) {
                do {
                    try checkBinding(path: Self.nodePath(fd), nodeId: id, parent: parent, name: name, quiet: true) { mountPath(of: dir) }
                } catch {
                    guard !readOnly, EncryptedFilesystem.holdsOnlyOwnEntries(fd, inRoot: false) else {
                        try checkBinding(path: Self.nodePath(fd), nodeId: id, parent: parent, name: name) { mountPath(of: dir) }
                        return id
                    }
                    Log.info("backing directory of \(mountPath(of: dir)) is empty and lacks its name's binding: binding it")
                    try bind(try bindingTag(try knownDirectoryId(parent), id, name), at: Self.nodePath(fd))
                }
            }
            return id
        }
        // The parent's ID, for the new ID's binding tag, is read before the repair lock (reading it may repair).
        var binding: (parentId: [UInt8], name: String)? = nil
        if bindsNames, dir !== inodes.root, let (parent, name) = inodes.location(of: dir) {
            binding = (try knownDirectoryId(parent), name)
        }
        // One repair at a time, and each looks again: another lookup may have just given the directory its ID.
        return try directoryIdRepair.withLock {
            if let id = inodes.directoryId(of: dir) { return id }
            let contents = EncryptedNames.readSibling(NameCipher.directoryIdFile, in: fd)
            if let c = contents, let id = cipher.directoryId(fromFile: c) { return id }
            let why = contents == nil ? "has no directory ID file (\(NameCipher.directoryIdFile))"
                                      : "has a directory ID file that is not this volume's, or was altered"
            if !readOnly, EncryptedFilesystem.holdsOnlyOwnEntries(fd, inRoot: dir === inodes.root) {
                Log.info("backing directory of \(mountPath(of: dir)) \(why) and is empty: giving it a new ID")
                let id = try writeDirectoryId(fd, replacing: contents != nil)
                if let (parentId, name) = binding { try bind(try bindingTag(parentId, id, name), at: Self.nodePath(fd)) }
                inodes.setDirectoryId(id, of: dir)
                return id
            }
            FailureLog.shared.log(.error, kind: "directory-id", "cannot use directory \(mountPath(of: dir)): its backing directory \(why); its entries cannot be decrypted")
            throw Errno.EIO
        }
    }

    /// Gives backing directory `fd` an ID file and returns the ID. The file is written complete under a temporary
    /// name and then linked into place (renamed over a damaged one when `replacing`), so a crash never leaves a
    /// partial ID file, and an ID file that appeared meanwhile is kept (its ID is returned) rather than replaced.
    @discardableResult
    func writeDirectoryId(_ fd: Int32, replacing: Bool = false) throws -> [UInt8] {
        guard let cipher = names.cipher else { return [] }
        let (id, contents) = try cipher.newDirectoryIdFile()
        let temp = TemporaryNames.make()
        let f = try syscall { openat(fd, temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o444) }
        do {
            try contents.withUnsafeBytes { _ = try FileIO.pwrite(f, $0.baseAddress!, count: $0.count, offset: 0) }
            close(f)
        } catch {
            close(f)
            unlinkat(fd, temp, 0)
            throw error
        }
        defer { unlinkat(fd, temp, 0) }
        if replacing {
            try syscall { renameat(fd, temp, fd, NameCipher.directoryIdFile) }
            return id
        }
        if linkat(fd, temp, fd, NameCipher.directoryIdFile, 0) == 0 { return id }
        let e = Errno.current
        if e.code == EEXIST {
            if let c = EncryptedNames.readSibling(NameCipher.directoryIdFile, in: fd), let existing = cipher.directoryId(fromFile: c) {
                return existing
            }
            throw Errno.EIO
        }
        // No hard links on this backing filesystem: a rename that does not replace, where there is one.
        if kmsfs_renameat2(fd, temp, fd, NameCipher.directoryIdFile, UInt32(kmsfs_rename_noreplace())) == 0 { return id }
        throw Errno.current
    }

    /// True when backing directory `fd` holds nothing but kmsfs's own entries.
    static func holdsOnlyOwnEntries(_ fd: Int32, inRoot: Bool) -> Bool {
        ownEntries(fd, inRoot: inRoot) != nil
    }

    /// kmsfs's own entries of backing directory `fd` (directory ID, temporary files, long-name siblings whose
    /// entry is gone; at the top, the config and its companions too, which are never removed), or nil when it
    /// holds anything else.
    static func ownEntries(_ fd: Int32, inRoot: Bool = false, encryptedNames: Bool = true) -> [String]? {
        guard let names = try? entryNames(of: fd) else { return nil }
        let all = Set(names)
        var own: [String] = []
        for n in all {
            if inRoot && PlaintextNames.isReserved(n) { continue }
            if TemporaryNames.isTemporary(n) || (encryptedNames && n == NameCipher.directoryIdFile) {
                own.append(n)
            } else if encryptedNames && n.hasPrefix(NameCipher.longPrefix) && n.hasSuffix(NameCipher.longSuffix)
                        && !all.contains(String(n.dropLast(NameCipher.longSuffix.count))) {
                own.append(n)
            } else {
                return nil
            }
        }
        return own
    }

    /// The entry names of directory `fd` (which may be an O_PATH descriptor) but "." and "..".
    static func entryNames(of fd: Int32) throws -> [String] {
        let listFd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if listFd < 0 { throw Errno.current }
        guard let stream = fdopendir(listFd) else {
            let e = Errno.current
            close(listFd)
            throw e
        }
        defer { closedir(stream) }
        return DirectoryEntry.names(stream)
    }

    /// Before a long name is given to an entry: its sibling holding the full encrypted name.
    func placeSibling(_ b: BackingName, in dfd: Int32) throws {
        guard let sibling = b.sibling, let text = b.longText else { return }
        let bytes = Array(text.utf8)
        if EncryptedNames.readSibling(sibling, in: dfd) == bytes { return }
        // Written whole under a temporary name, then renamed over: a crash never leaves a long name without its text.
        let temp = TemporaryNames.make()
        let f = try syscall { openat(dfd, temp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644) }
        do {
            try bytes.withUnsafeBytes { _ = try FileIO.pwrite(f, $0.baseAddress!, count: $0.count, offset: 0) }
            close(f)
            try syscall { renameat(dfd, temp, dfd, sibling) }
        } catch {
            close(f)
            unlinkat(dfd, temp, 0)
            throw error
        }
    }

    /// After a long name was removed: its sibling, unless another entry took the name meanwhile.
    func removeSibling(_ b: BackingName, in dfd: Int32) {
        guard let sibling = b.sibling else { return }
        var st = stat()
        if fstatat(dfd, b.name, &st, AT_SYMLINK_NOFOLLOW) != 0 { unlinkat(dfd, sibling, 0) }
    }

    /// The current mount path of a node, for log lines and the audit log ("?" once its names are gone).
    func mountPath(of inode: Inode) -> String {
        guard let chain = inodes.chain(of: inode) else { return "?" }
        if chain.isEmpty { return "/" }
        var path = ""
        for (parent, name) in chain {
            path += "/" + (shownName(name, in: parent).map { String(decoding: $0, as: UTF8.self) } ?? "?")
        }
        return path
    }

    /// The mount name of backing entry `name` of `parent`, if it has one.
    func shownName(_ name: String, in parent: Inode) -> [UInt8]? {
        if !names.usesDirectoryIds { return names.mountName(name, in: NameDirectory(inRoot: parent === inodes.root, id: [], fd: -1)) }
        if let id = inodes.directoryId(of: parent), let known = shownNames[ShownNameKey(directoryId: id, name: name)] { return known }
        let shown = try? inodes.withDirectory(parent) { dfd in
            let dir = try nameDirectory(parent, fd: dfd)
            let n = names.mountName(name, in: dir)
            if let n { shownNames[ShownNameKey(directoryId: dir.id, name: name)] = n }
            return n
        }
        return shown ?? nil
    }

    /// The mount path of entry `name` of `parent`.
    func mountPath(of parent: Inode, _ name: [UInt8]) -> String {
        let p = mountPath(of: parent)
        return (p == "/" ? "" : p) + "/" + String(decoding: name, as: UTF8.self)
    }
}

/// A backing name of a directory, by the directory's ID (`EncryptedFilesystem.shownNames`).
struct ShownNameKey: Hashable {
    let directoryId: [UInt8]
    let name: String
}
