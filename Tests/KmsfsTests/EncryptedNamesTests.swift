import CSystem
import Foundation
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsSystem
import Testing

/// Byte-exact paths: names need not be UTF-8.
private func cPath(_ bytes: [UInt8]) -> [CChar] { (bytes + [0]).map { CChar(bitPattern: $0) } }

private func entries(_ dir: [UInt8]) throws -> Set<[UInt8]> {
    guard let d = cPath(dir).withUnsafeBufferPointer({ opendir($0.baseAddress!) }) else { throw Errno.current }
    defer { closedir(d) }
    var out = Set<[UInt8]>()
    while let e = readdir(d) {
        let name = DirectoryEntry.nameBytes(e)
        if name != [46] && name != [46, 46] { out.insert(name) }
    }
    return out
}

private func writeBytes(_ path: [UInt8], _ data: [UInt8]) throws {
    let fd = try syscall { cPath(path).withUnsafeBufferPointer { Glibc.open($0.baseAddress!, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) } }
    defer { close(fd) }
    try P.write(fd, data)
}

private func readBytes(_ path: [UInt8]) throws -> [UInt8] {
    let fd = try syscall { cPath(path).withUnsafeBufferPointer { Glibc.open($0.baseAddress!, O_RDONLY | O_CLOEXEC) } }
    defer { close(fd) }
    return try P.pread(fd, 1 << 20, 0)
}

/// Every file of a backing tree with its contents, and every name, symlink target and extended attribute in it.
private func backingBytes(_ root: String) throws -> [UInt8] {
    var all: [UInt8] = []
    let walker = FileManager.default.enumerator(atPath: root)!
    while let rel = walker.nextObject() as? String {
        let p = root + "/" + rel
        all += Array(rel.utf8) + [0]
        var st = stat()
        guard lstat(p, &st) == 0 else { continue }
        if st.st_mode & S_IFMT == S_IFREG { all += (try? P.readFile(p)) ?? [] }
        if st.st_mode & S_IFMT == S_IFLNK { all += Array(((try? FileManager.default.destinationOfSymbolicLink(atPath: p)) ?? "").utf8) }
        var names = [CChar](repeating: 0, count: 65536)
        let n = llistxattr(p, &names, names.count)
        if n > 0 {
            all += names[0..<n].map { UInt8(bitPattern: $0) }
            for name in names[0..<n].split(separator: 0) {
                var value = [UInt8](repeating: 0, count: 65536)
                let m = lgetxattr(p, Array(name) + [0], &value, value.count)
                if m > 0 { all += value[0..<m] }
            }
        }
    }
    return all
}

private func linkTarget(_ path: String) throws -> String {
    var raw = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = try syscall { readlink(path, &raw, raw.count - 1) }
    return String(decoding: raw[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

private func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard !needle.isEmpty, haystack.count >= needle.count else { return false }
    let first = needle[0]
    var i = 0
    while i <= haystack.count - needle.count {
        if haystack[i] == first && Array(haystack[i..<i + needle.count]) == needle { return true }
        i += 1
    }
    return false
}

@Suite("Encrypted names, symlink targets and extended attributes (format 3)")
struct EncryptedNamesTests {
    @Test("Long names, every byte value a name may hold, a directory renamed with its children, hard links across directories, long symlink targets, xattrs; all kept over a remount")
    func throughTheMount() throws {
        let v = try MountedVolume()
        let m = Array(v.mount.utf8) + [47]
        // Every byte but NUL and "/", in one name (254 bytes), a 255-byte name, and a short one.
        let allBytes = (1...255).map { UInt8($0) }.filter { $0 != 47 }
        let longest = [UInt8](repeating: 0x61, count: 255)
        let invalidUTF8: [UInt8] = [0xff, 0xfe, 0x80, 0x41]
        for (i, name) in [allBytes, longest, invalidUTF8, Array("short".utf8)].enumerated() {
            try writeBytes(m + name, Array("content \(i)".utf8))
        }
        #expect(P.errno { try writeBytes(m + longest + [0x61], [1]) } == ENAMETOOLONG)
        try syscall { mkdir(v.path("dir"), 0o755) }
        try syscall { mkdir(v.path("dir/sub"), 0o700) }
        try P.writeFile(v.path("dir/sub/child"), Array("child".utf8))
        try P.writeFile(v.path("dir/" + String(repeating: "é", count: 127)), Array("long child".utf8))
        try syscall { link(v.path("short"), v.path("dir/hardlink")) }
        let target = String(repeating: "t/", count: 1400) + "end"  // 2803 bytes
        try syscall { symlink(target, v.path("dir/longlink")) }
        var lst = stat()
        try syscall { lstat(v.path("dir/longlink"), &lst) }
        #expect(lst.st_size == off_t(target.utf8.count))
        #expect(P.errno { try syscall { symlink(String(repeating: "x", count: 3100), v.path("toolong")) } } == ENAMETOOLONG)
        try syscall { setxattr(v.path("short"), "user.comment", "a secret note", 13, 0) }
        try syscall { setxattr(v.path("dir"), "user.dirnote", "on a directory", 14, 0) }

        func check() throws {
            #expect(try entries(Array(v.mount.utf8)) == [allBytes, longest, invalidUTF8, Array("short".utf8), Array("renamed".utf8)])
            for (i, name) in [allBytes, longest, invalidUTF8, Array("short".utf8)].enumerated() where i != 3 {
                #expect(try readBytes(m + name) == Array("content \(i)".utf8))
            }
            #expect(try linkTarget(v.path("renamed/longlink")) == target)
            #expect(try P.readFile(v.path("renamed/sub/child")) == Array("child".utf8))
            #expect(try P.readFile(v.path("renamed/" + String(repeating: "é", count: 127))) == Array("long child".utf8))
            #expect(try P.readFile(v.path("renamed/hardlink")) == Array("content 3".utf8))
            #expect(try P.stat(v.path("short")).st_nlink == 2)
            var value = [CChar](repeating: 0, count: 64)
            let n = getxattr(v.path("short"), "user.comment", &value, value.count)
            #expect(n == 13 && String(cString: Array(value[0..<13]) + [0]) == "a secret note")
            #expect(getxattr(v.path("short"), "user.comment", nil, 0) == 13)
            var list = [CChar](repeating: 0, count: 256)
            let l = listxattr(v.path("renamed"), &list, list.count)
            #expect(l > 0 && String(cString: Array(list[0..<l])) == "user.dirnote")
        }
        // A directory renamed over an empty one (which still holds its directory ID in the backing store).
        try syscall { mkdir(v.path("e1"), 0o755) }
        try syscall { mkdir(v.path("e2"), 0o755) }
        try P.writeFile(v.path("e1/inside"), [9])
        try syscall { Glibc.rename(v.path("e1"), v.path("e2")) }
        #expect(try P.readFile(v.path("e2/inside")) == [9])
        try FileManager.default.removeItem(atPath: v.path("e2"))
        // A directory rename moves the directory alone in the backing store: its children keep their names.
        let before = try FileManager.default.contentsOfDirectory(atPath: v.backing("dir")).sorted()
        try syscall { Glibc.rename(v.path("dir"), v.path("renamed")) }
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.backing("renamed")).sorted() == before)
        try check()
        try v.remount()
        try check()
        // Removing everything leaves an empty backing directory but for kmsfs's own files.
        for name in [allBytes, longest, invalidUTF8, Array("short".utf8)] {
            try syscall { cPath(m + name).withUnsafeBufferPointer { unlink($0.baseAddress!) } }
        }
        try FileManager.default.removeItem(atPath: v.path("renamed"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount).isEmpty)
        let left = try FileManager.default.contentsOfDirectory(atPath: v.cipher).filter { !$0.hasPrefix("kmsfs.conf") }
        #expect(left == [NameCipher.directoryIdFile], "\(left)")
    }

    @Test("No name, symlink target, xattr name or value, or other user-supplied string appears anywhere in the backing directory")
    func nothingLeaks() throws {
        let v = try MountedVolume(initArgs: ["--context", "tenant=acme-corp-tenant"])
        let secrets = ["quarterly-results-draft", "medical-records", "passwords.kdbx", "symlink-destination-secret",
                       "user.attribute-name-secret", "attribute-value-secret", "a-very-long-directory-name-" + String(repeating: "z", count: 200)]
        try syscall { mkdir(v.path(secrets[1]), 0o755) }
        try syscall { mkdir(v.path(secrets[1] + "/" + secrets[6]), 0o755) }
        try P.writeFile(v.path(secrets[1] + "/" + secrets[0]), Array("contents of \(secrets[0])".utf8))
        try P.writeFile(v.path(secrets[1] + "/" + secrets[6] + "/" + secrets[2]), [1, 2, 3])
        try syscall { symlink("/home/" + secrets[3], v.path(secrets[1] + "/shortcut")) }
        try syscall { setxattr(v.path(secrets[1] + "/" + secrets[0]), secrets[4], secrets[5], secrets[5].utf8.count, 0) }
        try syscall { setxattr(v.path(secrets[1]), secrets[4], secrets[5], secrets[5].utf8.count, 0) }
        try v.unmount()
        let stored = try backingBytes(v.cipher)
        for s in secrets + ["contents of", "shortcut", "home", "attribute"] {
            #expect(!contains(stored, Array(s.utf8)), "\(s) is in the backing directory")
        }
        // The user's context is in file headers by design (it is the KMS encryption context), and nothing else.
        #expect(contains(stored, Array("acme-corp-tenant".utf8)))
    }

    @Test("An entry moved to another backing directory, two files' or directories' names exchanged, an altered name, a damaged directory ID, symlink target or xattr value: skipped or EIO, with a log line; never garbage")
    func tamperingIsDetected() throws {
        let v = try MountedVolume()
        try syscall { mkdir(v.path("a"), 0o755) }
        try syscall { mkdir(v.path("b"), 0o755) }
        try syscall { mkdir(v.path("c"), 0o755) }
        try P.writeFile(v.path("a/moved"), [1])
        try P.writeFile(v.path("a/stays"), [2])
        try P.writeFile(v.path("b/altered"), [3])
        try P.writeFile(v.path("c/x"), [4])
        try P.writeFile(v.path("f"), [5])
        try P.writeFile(v.path("g"), [6])
        try P.writeFile(v.path("salary-alice"), Array("alice: 100".utf8))
        try P.writeFile(v.path("salary-bob"), Array("bob: 200".utf8))
        try syscall { mkdir(v.path("d1"), 0o755) }
        try syscall { mkdir(v.path("d2"), 0o755) }
        try P.writeFile(v.path("d1/in-one"), [1])
        try P.writeFile(v.path("d2/in-two"), [2])
        try syscall { symlink("target", v.path("link")) }
        try syscall { symlink("/srv/safe", v.path("to-safe")) }
        try syscall { symlink("/tmp/evil", v.path("to-evil")) }
        try syscall { setxattr(v.path("f"), "user.k", "value-f", 7, 0) }
        try syscall { setxattr(v.path("g"), "user.k", "value-g", 7, 0) }
        let moved = v.backing("a/moved"), altered = v.backing("b/altered")
        let link = v.backing("link"), dirId = v.backing("c") + "/" + NameCipher.directoryIdFile
        let f = v.backing("f"), g = v.backing("g")
        let alice = v.backing("salary-alice"), bob = v.backing("salary-bob"), d1 = v.backing("d1"), d2 = v.backing("d2")
        let safe = v.backing("to-safe"), evil = v.backing("to-evil")
        // Renames, hard links and unlinks through the mount keep the bindings current.
        try syscall { Glibc.link(v.path("f"), v.path("a/f-link")) }
        try syscall { Glibc.rename(v.path("a/f-link"), v.path("b/f-link2")) }
        try syscall { unlink(v.path("b/f-link2")) }
        try syscall { mkdir(v.path("a/sub"), 0o755) }
        try syscall { Glibc.rename(v.path("a/sub"), v.path("b/sub2")) }
        try v.unmount()
        // Exchanged names: the files' backing names, then the directories', then the symbolic links'.
        for (x, y) in [(alice, bob), (d1, d2), (safe, evil)] {
            try syscall { Glibc.rename(x, x + ".swap") }
            try syscall { Glibc.rename(y, x) }
            try syscall { Glibc.rename(x + ".swap", y) }
        }

        // Moved from a to b in the backing store: it no longer decrypts in b.
        try syscall { Glibc.rename(moved, v.backing("b") + "/" + (moved as NSString).lastPathComponent) }
        // One character of a name changed.
        var chars = Array(altered.utf8)
        chars[chars.count - 3] = chars[chars.count - 3] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
        try syscall { Glibc.rename(altered, String(decoding: chars, as: UTF8.self)) }
        // A directory ID file damaged.
        var id = try P.readFile(dirId)
        id[20] ^= 1
        try syscall { chmod(dirId, 0o644) }
        try P.writeFile(dirId, id)
        // A symlink target replaced by another valid-looking one.
        let stored = try FileManager.default.destinationOfSymbolicLink(atPath: link)
        try syscall { unlink(link) }
        try syscall { symlink(String(stored.reversed()), link) }
        // g's attribute value copied onto f.
        var value = [UInt8](repeating: 0, count: 256)
        var names = [CChar](repeating: 0, count: 256)
        let nl = listxattr(g, &names, names.count)
        let stored_name = Array(names[0..<nl].split(separator: 0).first { Array($0) != Array("user.kmsfs.names".utf8).map { CChar(bitPattern: $0) } }!) + [0]
        let vl = getxattr(g, stored_name, &value, value.count)
        try syscall { setxattr(f, stored_name, value, vl, 0) }

        let verify = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(verify.status == 1, "\(verify.stdout)\(verify.stderr)")
        // verify names what was exchanged, and decrypt refuses to resolve a path through it.
        #expect(verify.stdout.split(separator: "\n").filter { $0.contains("does not carry its name's binding") }.count == 4, "\(verify.stdout)")
        // ... and the links whose targets do not open under their names (the two exchanged, the one altered).
        #expect(verify.stdout.split(separator: "\n").filter { $0.contains("target does not open under this name") }.count == 3, "\(verify.stdout)")
        let through = try run(kmsfsBinary, ["decrypt", v.cipher, "salary-alice"], environment: v.environment)
        #expect(through.status == 1 && through.stderr.contains("/salary-alice: the backing entry does not carry its name's binding"), "\(through.stderr)")
        try v.start()
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.path("a")) == ["stays"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.path("b")) == ["sub2"])
        #expect(P.errno { try P.readFile(v.path("b/moved")) } == ENOENT)
        #expect(P.errno { try FileManager.default.contentsOfDirectory(atPath: v.path("c")) } != nil)
        #expect(P.errno { try P.readFile(v.path("c/x")) } == EIO)
        #expect(P.errno { _ = try FileManager.default.destinationOfSymbolicLink(atPath: v.path("link")) } != nil)
        for name in ["to-safe", "to-evil"] {
            var raw = [CChar](repeating: 0, count: 256)
            #expect(readlink(v.path(name), &raw, raw.count) == -1 && Glibc.errno == EIO, "\(name)")
        }
        var out = [CChar](repeating: 0, count: 64)
        #expect(getxattr(v.path("f"), "user.k", &out, out.count) == -1 && Glibc.errno == EIO)
        #expect(getxattr(v.path("g"), "user.k", &out, out.count) == 7)
        #expect(P.errno { try P.readFile(v.path("salary-alice")) } == EIO)
        #expect(P.errno { try P.readFile(v.path("salary-bob")) } == EIO)
        #expect(P.errno { try FileManager.default.contentsOfDirectory(atPath: v.path("d1")) } != nil)
        #expect(P.errno { try P.readFile(v.path("d2/in-one")) } == EIO)
        // What was renamed and linked through the mount is sound.
        #expect(try P.readFile(v.path("f")) == [5])
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.path("b/sub2")).isEmpty)
        let log = v.daemonLogText
        #expect(log.contains("left out of the listing") && log.contains("does not decrypt in this directory"))
        #expect(log.contains("cannot use directory /c") && log.contains("directory ID file that is not this volume's, or was altered"))
        #expect(log.contains("cannot read symbolic link /link"))
        #expect(log.contains("cannot read symbolic link /to-safe") && log.contains("cannot read symbolic link /to-evil"), "\(log)")
        #expect(log.contains("cannot read extended attribute user.k of /f"))
        #expect(log.contains("cannot use /salary-alice: the backing entry does not carry its name's binding"), "\(log)")
        #expect(log.contains("cannot use /d1: the backing entry does not carry its name's binding") || log.contains("cannot use /d2: the backing entry does not carry its name's binding"), "\(log)")
    }

    @Test("A symbolic link renamed (in place, across directories, over a file) keeps its target and inode number, stored again for each new name; a hard link of it is a copy; RENAME_EXCHANGE with a link gives EINVAL")
    func linksFollowTheirNames() throws {
        let v = try MountedVolume()
        try syscall { mkdir(v.path("sub"), 0o755) }
        try syscall { symlink("../some/target", v.path("s1")) }
        try P.writeFile(v.path("file"), [7])
        try P.writeFile(v.path("sub/victim"), [8])
        let before = try P.stat(v.path("s1"))
        func target(_ p: String) throws -> String { try FileManager.default.destinationOfSymbolicLink(atPath: v.path(p)) }
        let stored1 = try FileManager.default.destinationOfSymbolicLink(atPath: v.backing("s1"))
        try syscall { Glibc.rename(v.path("s1"), v.path("s2")) }
        #expect(try target("s2") == "../some/target")
        var raw = [CChar](repeating: 0, count: 64)
        #expect(Glibc.readlink(v.path("s1"), &raw, raw.count) == -1 && Glibc.errno == ENOENT)
        // Stored again for the new name: the old stored target is not the new one.
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: v.backing("s2")) != stored1)
        try syscall { Glibc.rename(v.path("s2"), v.path("sub/s3")) }
        #expect(try target("sub/s3") == "../some/target")
        // Owner and modification time move with the link.
        let moved = try P.stat(v.path("sub/s3"))
        #expect(moved.st_uid == before.st_uid && moved.st_mtim.tv_sec == before.st_mtim.tv_sec && moved.st_mtim.tv_nsec == before.st_mtim.tv_nsec)
        #expect(moved.st_size == off_t("../some/target".utf8.count))
        // The link keeps its inode number (its link ID's) through both renames, here and in a listing.
        #expect(moved.st_ino == before.st_ino && before.st_ino >= 1 << 63, "\(before.st_ino) \(moved.st_ino)")
        let listed = try FileManager.default.contentsOfDirectory(atPath: v.path("sub"))
        #expect(Set(listed) == ["s3", "victim"])
        if let d = opendir(v.path("sub")) {
            while let e = Glibc.readdir(d) {
                if DirectoryEntry.name(e) == "s3" {
                    #expect(e.pointee.d_ino == before.st_ino)
                }
            }
            closedir(d)
        }
        // The longest target a bound link holds is 3027 bytes.
        try syscall { symlink(String(repeating: "y", count: 3027), v.path("longest")) }
        #expect(try P.stat(v.path("longest")).st_size == 3027)
        #expect(P.errno { try syscall { symlink(String(repeating: "y", count: 3028), v.path("too-long")) } } == ENAMETOOLONG)
        try syscall { unlink(v.path("longest")) }
        #expect(P.errno { try syscall { kmsfs_renameat2(AT_FDCWD, v.path("sub/s3"), AT_FDCWD, v.path("sub/victim"), kmsfs_rename_noreplace()) } } == EEXIST)
        #expect(P.errno { try syscall { kmsfs_renameat2(AT_FDCWD, v.path("sub/s3"), AT_FDCWD, v.path("file"), kmsfs_rename_exchange()) } } == EINVAL)
        #expect(P.errno { try syscall { kmsfs_renameat2(AT_FDCWD, v.path("file"), AT_FDCWD, v.path("sub/s3"), kmsfs_rename_exchange()) } } == EINVAL)
        #expect(try P.readFile(v.path("sub/victim")) == [8] && P.readFile(v.path("file")) == [7])
        try syscall { Glibc.rename(v.path("sub/s3"), v.path("sub/victim")) }
        #expect(try target("sub/victim") == "../some/target")
        // A hard link of a link is a second link with the same target.
        try syscall { Glibc.link(v.path("sub/victim"), v.path("hard")) }
        #expect(try target("hard") == "../some/target" && target("sub/victim") == "../some/target")
        #expect(try P.stat(v.path("hard")).st_mtim.tv_sec == before.st_mtim.tv_sec)
        #expect(try P.stat(v.path("hard")).st_ino != P.stat(v.path("sub/victim")).st_ino)
        #expect(try P.stat(v.path("sub/victim")).st_ino == before.st_ino)
        try v.unmount()
        // No temporary name is left behind, and the offline tools agree.
        let leftovers = try FileManager.default.subpathsOfDirectory(atPath: v.cipher).filter { $0.contains(TemporaryNames.prefix) }
        #expect(leftovers.isEmpty, "\(leftovers)")
        let verify = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
        try v.start()
        #expect(try target("hard") == "../some/target" && target("sub/victim") == "../some/target")
        #expect(try Set(FileManager.default.contentsOfDirectory(atPath: v.mount)) == ["sub", "file", "hard"])
    }

    @Test("While mounted: a backing entry replaced by a hard link of another file the mount knows, or two known directories' names exchanged, gives EIO (the new name is checked at lookup)")
    func tamperWhileMounted() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("a"), Array("content of a".utf8))
        try P.writeFile(v.path("b"), Array("content of b".utf8))
        try syscall { mkdir(v.path("d1"), 0o755) }
        try syscall { mkdir(v.path("d2"), 0o755) }
        try P.writeFile(v.path("d1/one"), [1])
        try P.writeFile(v.path("d2/two"), [2])
        // The mount keeps b and d2 known (held open) while their backing entries are tampered with.
        let holdB = try P.open(v.path("b"), O_RDONLY)
        defer { close(holdB) }
        let holdD2 = try P.open(v.path("d2"), O_RDONLY | O_DIRECTORY)
        defer { close(holdD2) }
        let a = v.backing("a"), b = v.backing("b"), d1 = v.backing("d1"), d2 = v.backing("d2")
        try syscall { unlink(a) }
        try syscall { Glibc.link(b, a) }
        try syscall { Glibc.rename(d1, d1 + ".swap") }
        try syscall { Glibc.rename(d2, d1) }
        try syscall { Glibc.rename(d1 + ".swap", d2) }
        // Past the kernel's name cache, the names are looked up again.
        usleep(1_300_000)  // the mount caches names for 1 s
        #expect(P.errno { try P.readFile(v.path("a")) } == EIO)
        #expect(P.errno { try P.readFile(v.path("d1/two")) } == EIO)
        #expect(try P.readFile(v.path("b")) == Array("content of b".utf8))
        #expect(v.daemonLogText.contains("cannot use /a: the backing entry does not carry its name's binding"), "\(v.daemonLogText)")
    }

    @Test("A copy of the backing directory that dropped extended attributes fails its name bindings until kmsfs rebind tags it again")
    func rebindAfterCopy() throws {
        let v = try MountedVolume()
        try syscall { mkdir(v.path("d"), 0o755) }
        try P.writeFile(v.path("d/f"), [1, 2, 3])
        try syscall { Glibc.link(v.path("d/f"), v.path("g")) }
        try v.unmount()
        // cp -r keeps no extended attributes, as many backup and sync tools.
        let copy = v.dir.path + "/copy"
        #expect(try run("cp", ["-r", v.cipher, copy]).status == 0)
        let before = try run(kmsfsBinary, ["verify", copy], environment: v.environment)
        #expect(before.status == 1 && before.stdout.contains("does not carry its name's binding"), "\(before.stdout)")
        let rebind = try run(kmsfsBinary, ["rebind", copy], environment: v.environment)
        #expect(rebind.status == 0 && rebind.stdout.contains("3 files and directories bound"), "\(rebind.stdout)\(rebind.stderr)")
        let after = try run(kmsfsBinary, ["verify", copy], environment: v.environment)
        #expect(after.status == 0 && after.stdout.contains("all intact"), "\(after.stdout)")
        let m = v.dir.path + "/m2"
        try syscall { mkdir(m, 0o755) }
        let mounted = try run(kmsfsBinary, ["mount", copy, m], environment: v.environment)
        #expect(mounted.status == 0, "\(mounted.stderr)")
        defer { _ = try? run("fusermount3", ["-u", m]) }
        #expect(try P.readFile(m + "/d/f") == [1, 2, 3])
        #expect(try P.readFile(m + "/g") == [1, 2, 3])
    }

    @Test("A directory without its name's tag: bound on first use if empty (a crash inside mkdir), EIO otherwise")
    func directoryWithoutTag() throws {
        let v = try MountedVolume()
        try syscall { mkdir(v.path("empty"), 0o755) }
        try syscall { mkdir(v.path("full"), 0o755) }
        try P.writeFile(v.path("full/f"), [1])
        try v.unmount()
        for name in ["empty", "full"] { #expect(removexattr(v.backing(name), "user.kmsfs.names") == 0) }
        try v.start()
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.path("empty")).isEmpty)
        #expect(getxattr(v.backing("empty"), "user.kmsfs.names", nil, 0) == 16)
        #expect(P.errno { try FileManager.default.contentsOfDirectory(atPath: v.path("full")) } != nil)
        let log = v.daemonLogText
        #expect(log.contains("/empty is empty and lacks its name's binding: binding it"), "\(log)")
        #expect(log.contains("cannot use /full: the backing entry does not carry its name's binding"), "\(log)")
    }

    @Test("A file may have 128 names (their binding tags fit the backing attributes); one more link fails with EMLINK, and every name still opens")
    func linkLimit() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [1])
        for i in 1..<128 { try syscall { Glibc.link(v.path("f"), v.path("l\(i)")) } }
        #expect(P.errno { try syscall { Glibc.link(v.path("f"), v.path("one-too-many")) } } == EMLINK)
        try syscall { Glibc.rename(v.path("l1"), v.path("renamed")) }
        try syscall { unlink(v.path("l2")) }
        try syscall { Glibc.link(v.path("f"), v.path("again")) }
        try v.remount()
        for name in ["f", "l3", "l127", "renamed", "again"] { #expect(try P.readFile(v.path(name)) == [1], "\(name)") }
        #expect(try P.stat(v.path("f")).st_nlink == 128)
        // A file replaced by a rename that keeps another name loses the replaced name's tag.
        try P.writeFile(v.path("x"), [2])
        try syscall { Glibc.link(v.path("x"), v.path("y")) }
        try P.writeFile(v.path("z"), [3])
        try syscall { Glibc.rename(v.path("z"), v.path("x")) }
        #expect(getxattr(v.backing("y"), "user.kmsfs.names", nil, 0) == 16)
        #expect(try P.readFile(v.path("y")) == [2])
        // Nodes without tags link, rename and unlink as they are: a FIFO; a symbolic link (whose target is sealed
        // for its name, so that its "hard link" is a second link with the same target).
        try syscall { mkfifo(v.path("fifo"), 0o644) }
        try syscall { symlink("target", v.path("sym")) }
        for (a, b, c, links) in [("fifo", "fifo2", "fifo3", 2), ("sym", "sym2", "sym3", 1)] {
            try syscall { Glibc.link(v.path(a), v.path(b)) }
            try syscall { Glibc.rename(v.path(b), v.path(c)) }
            var lst = stat()
            #expect(Glibc.lstat(v.path(c), &lst) == 0 && lst.st_nlink == links)
            if a == "sym" { #expect(try FileManager.default.destinationOfSymbolicLink(atPath: v.path(c)) == "target") }
            try syscall { unlink(v.path(c)) }
            try syscall { unlink(v.path(a)) }
        }
    }

    @Test("rmdir of an empty directory without write permission works for a daemon that does not bypass permissions")
    func rmdirOfReadOnlyDirectory() throws {
        // Root without CAP_DAC_OVERRIDE: the daemon meets permissions as a user's daemon would.
        let v = try MountedVolume(wrapper: ["/usr/bin/setpriv", "--bounding-set=-dac_override,-dac_read_search",
                                            "--inh-caps=-dac_override,-dac_read_search", "--"])
        do { try rmdirOfReadOnlyDirectorySteps(v) } catch {
            Issue.record("\(error); daemon log:\n\(v.daemonLogText.suffix(3000))")
        }
    }

    private func rmdirOfReadOnlyDirectorySteps(_ v: MountedVolume) throws {
        try syscall { mkdir(v.path("d"), 0o755) }
        try syscall { chmod(v.path("d"), 0o555) }
        // The daemon really is refused inside such a directory (the test's own process is not)...
        #expect(P.errno { try P.writeFile(v.path("d/x"), [1]) } == EACCES)
        // ...yet the directory, empty through the mount, goes (its ID file with it).
        try syscall { rmdir(v.path("d")) }
        #expect(P.errno { try P.stat(v.path("d")) } == ENOENT)
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount).isEmpty)
        // A file its owner may not read and a directory its owner may not search can be renamed and linked (their
        // tags need their IDs), as on any filesystem.
        try P.writeFile(v.path("secret"), [1])
        try syscall { chmod(v.path("secret"), 0) }
        try syscall { mkdir(v.path("closed"), 0) }
        try syscall { Glibc.rename(v.path("secret"), v.path("secret2")) }
        try syscall { Glibc.link(v.path("secret2"), v.path("secret3")) }
        try syscall { Glibc.rename(v.path("closed"), v.path("closed2")) }
        try syscall { chmod(v.path("secret2"), 0o600) }
        try syscall { chmod(v.path("closed2"), 0o700) }
        #expect(try P.readFile(v.path("secret3")) == [1])
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.path("closed2")).isEmpty)
    }

    @Test("A config that was changed, or that names a KMS endpoint, is refused at mount with one line; the names mode cannot be turned off")
    func configIsAuthenticated() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [1])
        try v.unmount()
        let path = VolumeConfig.path(in: v.cipher)
        let original = try FileIO.readFile(path)
        var config = try VolumeConfig.decode(original)
        for change in [{ (c: inout VolumeConfig) in c.names = VolumeConfig.plaintextNames; c.nameBinding = nil },
                       { (c: inout VolumeConfig) in c.chunkSize = 8192 },
                       { (c: inout VolumeConfig) in c.encryptionContext = ["x": "y"] },
                       { (c: inout VolumeConfig) in c.headerLength = 1024 }] {
            var bad = config
            change(&bad)
            try FileIO.writeFileAtomically(path, contents: try bad.encoded())
            let r = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: v.environment)
            #expect(r.status == 1 && r.stderr.contains("the volume config was changed by someone without the volume key"), "\(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1)
        }
        // Downgraded to format 2 (no MAC to check, names shown as stored): refused.
        var old = config
        old.formatVersion = 2
        old.names = nil
        old.volumeKey = nil
        old.mac = nil
        old.nameBinding = nil
        try FileIO.writeFileAtomically(path, contents: try old.encoded())
        let d = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: v.environment)
        #expect(d.status == 1 && d.stderr.contains("the config says format 2, but the volume has encrypted names"), "\(d.stderr)")
        config.keyProvider.endpoint = "http://127.0.0.1:1"
        try FileIO.writeFileAtomically(path, contents: try config.encoded())
        let e = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: v.environment)
        #expect(e.status == 1 && e.stderr.contains("the KMS endpoint is never taken from the volume"), "\(e.stderr)")
        try FileIO.writeFileAtomically(path, contents: original)
        try v.start()
        #expect(try P.readFile(v.path("f")) == [1])
        // The volume key is unwrapped once per mount, under its own context, and wiped at unmount.
        try v.unmount()
        let volumeKeyOps = v.volumeKeyAuditLines().map { $0["op"] as? String ?? "" }
        #expect(volumeKeyOps == ["Decrypt", "DiscardKey", "Decrypt", "DiscardKey"], "\(volumeKeyOps)")
    }

    @Test("--plaintext-names keeps names visible (and kmsfs's own names reserved), with an authenticated config")
    func plaintextNames() throws {
        let v = try MountedVolume(initArgs: ["--plaintext-names"])
        try P.writeFile(v.path("visible.txt"), [1])
        try syscall { symlink("target-visible", v.path("l")) }
        #expect(FileManager.default.fileExists(atPath: v.cipher + "/visible.txt"))
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: v.cipher + "/l") == "target-visible")
        #expect(P.errno { try P.open(v.path(VolumeConfig.fileName), O_WRONLY | O_CREAT) } == EPERM)
        #expect(P.errno { try syscall { Glibc.rename(v.path("visible.txt"), v.path(VolumeConfig.fileName)) } } == EPERM)
        #expect(P.errno { try P.writeFile(v.path(".kmsfs-new.x"), [1]) } == EPERM)
        // Names and targets are stored as they are, so only UTF-8 ones: anything else is refused, never mangled.
        let bad = Array(v.mount.utf8) + Array("/bad-\u{1}".utf8) + [0xff, 0xfe]
        #expect(P.errno { try writeBytes(bad, [1]) } == EILSEQ)
        let target = [UInt8]([0x61, 0xc3, 0x28])
        let linked = symlink((target + [0]).map { CChar(bitPattern: $0) }, v.path("badlink"))
        #expect(linked == -1 && errno == EILSEQ)
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount).sorted() == ["l", "visible.txt"])
        try v.unmount()
        let config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        #expect(config.formatVersion == 3 && !config.encryptsNames && config.mac != nil)
        #expect(throws: Never.self) { try config.checkAuthenticity(with: try v.volumeKeys()) }
        let info = try run(kmsfsBinary, ["info", v.cipher], environment: v.environment)
        #expect(info.status == 0 && info.stdout.contains("names:          plaintext"), "\(info.stdout)\(info.stderr)")
    }

    @Test("Offline tools take plaintext paths: decrypt -r restores a tree, verify names files, path maps both ways")
    func offlineTools() throws {
        let v = try MountedVolume()
        try syscall { mkdir(v.path("docs"), 0o755) }
        try syscall { mkdir(v.path("docs/deep"), 0o755) }
        try P.writeFile(v.path("docs/a.txt"), Array("alpha".utf8))
        try P.writeFile(v.path("docs/deep/b.bin"), [UInt8](repeating: 7, count: 10000))
        try syscall { symlink("a.txt", v.path("docs/link")) }
        // A name and a link target that are not UTF-8.
        let oddName: [UInt8] = Array("odd-".utf8) + [0xff, 0x80]
        let oddTarget: [UInt8] = [0x74, 0xfe, 0x01]
        try writeBytes(Array(v.mount.utf8) + Array("/docs/".utf8) + oddName, [9])
        #expect(symlink(cPath(oddTarget), cPath(Array(v.mount.utf8) + Array("/docs/oddlink".utf8))) == 0)
        try v.unmount()
        let one = try run(kmsfsBinary, ["decrypt", v.cipher, "docs/a.txt"], environment: v.environment)
        #expect(one.status == 0 && one.stdout == "alpha", "\(one.stderr)")
        let verify = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(verify.status == 0 && verify.stdout.contains("3 files, 10006 bytes checked: all intact"), "\(verify.stdout)\(verify.stderr)")
        let out = v.dir.path + "/restored"
        let tree = try run(kmsfsBinary, ["decrypt", "-r", "-o", out, v.cipher, "docs"], environment: v.environment)
        #expect(tree.status == 0, "\(tree.stderr)")
        #expect(try P.readFile(out + "/a.txt") == Array("alpha".utf8))
        #expect(try P.readFile(out + "/deep/b.bin") == [UInt8](repeating: 7, count: 10000))
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: out + "/link") == "a.txt")
        #expect(try readBytes(Array(out.utf8) + [UInt8(ascii: "/")] + oddName) == [9])
        var raw = [CChar](repeating: 0, count: 64)
        let n = readlink(cPath(Array(out.utf8) + Array("/oddlink".utf8)), &raw, raw.count)
        #expect(n == 3 && raw[0..<3].map { UInt8(bitPattern: $0) } == oddTarget)
        #expect(try entries(Array(out.utf8)) == Set([Array("a.txt".utf8), Array("deep".utf8), Array("link".utf8), oddName, Array("oddlink".utf8)]))
        // A second restore into the same place overwrites nothing: each existing file is reported, exit status 1.
        try P.writeFile(out + "/a.txt", Array("mine".utf8))
        let again = try run(kmsfsBinary, ["decrypt", "-r", "-o", out, v.cipher, "docs"], environment: v.environment)
        #expect(again.status == 1 && again.stderr.contains("/docs/a.txt: already exists in the output; not overwritten"), "\(again.stderr)")
        #expect(try P.readFile(out + "/a.txt") == Array("mine".utf8))
        #expect(try entries(Array(out.utf8)).count == 5)
        let forward = try run(kmsfsBinary, ["path", v.cipher, "/docs/deep/b.bin"], environment: v.environment)
        let backing = forward.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(forward.status == 0 && v.cipher + "/" + backing == v.backing("docs/deep/b.bin"), "\(forward.stdout)\(forward.stderr)")
        let back = try run(kmsfsBinary, ["path", "--reverse", "--", v.cipher, backing], environment: v.environment)
        #expect(back.status == 0 && back.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "/docs/deep/b.bin", "\(back.stdout)\(back.stderr)")
    }
}
