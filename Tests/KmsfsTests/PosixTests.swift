import CSystem
import Foundation
import Glibc
import KmsfsFormat
import KmsfsSystem
import Testing

@Suite("POSIX behaviour through the mount")
struct PosixTests {
    @Test("Directories: mkdir, nested paths, readdir, rmdir; the volume config stays hidden and reserved")
    func directories() throws {
        let v = try MountedVolume()
        try syscall { mkdir(v.path("a"), 0o755) }
        try syscall { mkdir(v.path("a/b"), 0o700) }
        try P.writeFile(v.path("a/b/f.txt"), Array("deep".utf8))
        try P.writeFile(v.path("top.txt"), Array("top".utf8))
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: v.mount)) == ["a", "top.txt"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.path("a/b")) == ["f.txt"])
        #expect(try P.stat(v.path("a/b")).st_mode & 0o7777 == 0o700)
        #expect(try P.readFile(v.path("a/b/f.txt")) == Array("deep".utf8))
        #expect(FileManager.default.fileExists(atPath: v.backing(VolumeConfig_fileName)))
        #expect(P.errno { try P.stat(v.path(VolumeConfig_fileName)) } == ENOENT)
        // With encrypted names a mount name never meets the backing directory's own names: "kmsfs.conf" is an
        // ordinary name in the mount, stored encrypted beside the real config.
        try P.writeFile(v.path(VolumeConfig_fileName), [7])
        #expect(try P.readFile(v.path(VolumeConfig_fileName)) == [7])
        #expect(try VolumeConfig.decode(try P.readFile(v.cipher + "/" + VolumeConfig_fileName)).encryptsNames)
        try syscall { unlink(v.path(VolumeConfig_fileName)) }
        try P.writeFile(v.path("a/" + VolumeConfig_fileName), [1])
        #expect(try P.readFile(v.path("a/" + VolumeConfig_fileName)) == [1])
        #expect(P.errno { try syscall { rmdir(v.path("a")) } } == ENOTEMPTY)
        try syscall { unlink(v.path("a/b/f.txt")) }
        try syscall { rmdir(v.path("a/b")) }
        #expect(P.errno { try P.stat(v.path("a/b")) } == ENOENT)
        // A large directory lists completely (readdir continues across several kernel requests).
        try syscall { mkdir(v.path("many"), 0o755) }
        for i in 0..<1500 { try P.writeFile(v.path("many/file-with-a-longish-name-\(i)"), []) }
        let listed = try FileManager.default.contentsOfDirectory(atPath: v.path("many"))
        #expect(listed.count == 1500, "\(listed.count) listed, missing: \(Set((0..<1500).map { "file-with-a-longish-name-\($0)" }).subtracting(listed).sorted().prefix(20)); \(v.daemonLogText.suffix(2000))")
    }

    @Test("open flags: O_EXCL, O_TRUNC, O_APPEND, O_CREAT on an existing file, O_RDONLY refuses writes")
    func openFlags() throws {
        let v = try MountedVolume()
        do { try openFlagsSteps(v) } catch {
            // An error from the mount: the daemon's log says why.
            Issue.record("\(error); daemon log:\n\(v.daemonLogText.suffix(3000))")
        }
    }

    private func openFlagsSteps(_ v: MountedVolume) throws {
        let f = v.path("f")
        try P.writeFile(f, Array(repeating: 7, count: 10000))
        #expect(P.errno { try P.open(f, O_WRONLY | O_CREAT | O_EXCL) } == EEXIST)
        let keep = try P.open(f, O_RDWR | O_CREAT)
        #expect(try P.pread(keep, 3, 9997) == [7, 7, 7])
        close(keep)

        let a1 = try P.open(f, O_WRONLY | O_APPEND)
        let a2 = try P.open(f, O_WRONLY | O_APPEND)
        try P.write(a1, [1, 2])
        try P.write(a2, [3])
        try P.write(a1, [4])
        close(a1); close(a2)
        let content = try P.readFile(f)
        #expect(content.count == 10004 && Array(content.suffix(4)) == [1, 2, 3, 4])

        let t = try P.open(f, O_RDWR | O_TRUNC)
        #expect(try P.fstat(t).st_size == 0)
        try P.write(t, [9])
        close(t)
        #expect(try P.readFile(f) == [9])

        let r = try P.open(f, O_RDONLY)
        #expect(P.errno { try P.write(r, [1]) } == EBADF)
        close(r)
        // An empty file is a header and nothing more, and reads as empty.
        try P.writeFile(v.path("empty"), [])
        #expect(try P.readFile(v.path("empty")) == [])
        #expect(try P.stat(v.path("empty")).st_size == 0)
    }

    @Test("rename (replace, no-replace, exchange, directories) and hard links keep data, sizes and inodes")
    func renameAndLinks() throws {
        let v = try MountedVolume()
        let one = Array(repeating: UInt8(1), count: 5000), two = Array(repeating: UInt8(2), count: 9000)
        try P.writeFile(v.path("one"), one)
        try P.writeFile(v.path("two"), two)
        let ino = try P.stat(v.path("one")).st_ino
        try syscall { Glibc.rename(v.path("one"), v.path("two")) }
        #expect(try P.readFile(v.path("two")) == one)
        #expect(try P.stat(v.path("two")).st_ino == ino)
        #expect(P.errno { try P.stat(v.path("one")) } == ENOENT)

        try P.writeFile(v.path("three"), two)
        #expect(P.errno { try syscall { kmsfs_renameat2(AT_FDCWD, v.path("three"), AT_FDCWD, v.path("two"), kmsfs_rename_noreplace()) } } == EEXIST)
        try syscall { kmsfs_renameat2(AT_FDCWD, v.path("three"), AT_FDCWD, v.path("two"), kmsfs_rename_exchange()) }
        #expect(try P.readFile(v.path("two")) == two)
        #expect(try P.readFile(v.path("three")) == one)

        try syscall { mkdir(v.path("d1"), 0o755) }
        try P.writeFile(v.path("d1/in"), [5, 6])
        try syscall { Glibc.rename(v.path("d1"), v.path("d2")) }
        #expect(try P.readFile(v.path("d2/in")) == [5, 6])

        // Hard links: one inode, one size, writes through either name.
        try syscall { link(v.path("two"), v.path("two-link")) }
        let a = try P.stat(v.path("two")), b = try P.stat(v.path("two-link"))
        #expect(a.st_ino == b.st_ino && b.st_nlink == 2 && b.st_size == 9000)
        let fd = try P.open(v.path("two-link"), O_WRONLY)
        try P.pwrite(fd, [42], 9500)
        close(fd)
        #expect(try P.stat(v.path("two")).st_size == 9501)
        #expect(try P.readFile(v.path("two")).last == 42)
        try syscall { unlink(v.path("two")) }
        #expect(try P.stat(v.path("two-link")).st_nlink == 1)
        #expect(try P.readFile(v.path("two-link")).count == 9501)

        // Inode numbers survive a remount.
        let before = try P.stat(v.path("two-link")).st_ino
        try v.remount()
        #expect(try P.stat(v.path("two-link")).st_ino == before)
    }

    @Test("Symbolic links: create, readlink, follow, dangle")
    func symlinks() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("target"), Array(repeating: 3, count: 4097))
        try syscall { symlink("target", v.path("link")) }
        try syscall { symlink("../nowhere/at/all", v.path("dangling")) }
        var buf = [CChar](repeating: 0, count: 256)
        let n = try syscall { readlink(v.path("link"), &buf, buf.count) }
        #expect(String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) == "target")
        #expect(try P.stat(v.path("link")).st_mode & S_IFMT == S_IFLNK)
        var st = stat()
        try syscall { stat(v.path("link"), &st) }
        #expect(st.st_size == 4097)
        #expect(try P.readFile(v.path("link")).count == 4097)
        #expect(P.errno { try P.readFile(v.path("dangling")) } == ENOENT)
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: v.path("dangling")) == "../nowhere/at/all")
    }

    @Test("chmod, chown and utimens, by path and by descriptor")
    func attributes() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [1, 2, 3])
        try syscall { chmod(v.path("f"), 0o640) }
        #expect(try P.stat(v.path("f")).st_mode & 0o7777 == 0o640)
        try syscall { chown(v.path("f"), 1234, 5678) }
        var st = try P.stat(v.path("f"))
        #expect(st.st_uid == 1234 && st.st_gid == 5678)
        var times = [timespec(tv_sec: 1_000_000_000, tv_nsec: 123_456_789), timespec(tv_sec: 1_500_000_000, tv_nsec: 5)]
        try syscall { utimensat(AT_FDCWD, v.path("f"), &times, 0) }
        st = try P.stat(v.path("f"))
        #expect(st.st_atim.tv_sec == 1_000_000_000 && st.st_mtim.tv_sec == 1_500_000_000 && st.st_mtim.tv_nsec == 5)
        let fd = try P.open(v.path("f"), O_RDWR)
        defer { close(fd) }
        try syscall { fchmod(fd, 0o600) }
        times[1] = timespec(tv_sec: 1_600_000_000, tv_nsec: 0)
        try syscall { futimens(fd, &times) }
        st = try P.fstat(fd)
        #expect(st.st_mode & 0o7777 == 0o600 && st.st_mtim.tv_sec == 1_600_000_000)
        #expect(st.st_size == 3)
        // The backing file carries the same attributes.
        let b = try P.stat(v.backing("f"))
        #expect(b.st_mode & 0o7777 == 0o600 && b.st_uid == 1234 && b.st_mtim.tv_sec == 1_600_000_000)
    }

    @Test("statfs, access, fsync, fdatasync, and fallocate")
    func statfsAccessSyncAllocate() throws {
        let v = try MountedVolume()
        var fs = statvfs()
        try syscall { statvfs(v.mount, &fs) }
        #expect(fs.f_bsize > 0 && fs.f_blocks > 0 && fs.f_namemax > 0)
        try P.writeFile(v.path("f"), [1])
        #expect(P.errno { try syscall { access(v.path("f"), R_OK | W_OK) } } == nil)
        #expect(P.errno { try syscall { access(v.path("missing"), F_OK) } } == ENOENT)

        let fd = try P.open(v.path("f"), O_RDWR)
        defer { close(fd) }
        try P.pwrite(fd, [2, 3], 1)
        try syscall { fsync(fd) }
        try syscall { fdatasync(fd) }
        try syscall { kmsfs_fallocate(fd, 0, 0, 20000) }
        #expect(try P.fstat(fd).st_size == 20000)
        let data = try P.pread(fd, 20000, 0)
        #expect(Array(data[0..<3]) == [1, 2, 3] && data[3...].allSatisfy { $0 == 0 })
        try syscall { kmsfs_fallocate(fd, kmsfs_falloc_keep_size(), 0, 100_000) }
        #expect(try P.fstat(fd).st_size == 20000)
        #expect(P.errno { try syscall { kmsfs_fallocate(fd, 0x02 | kmsfs_falloc_keep_size(), 0, 100) } } == EOPNOTSUPP)
        #expect(try P.pread(fd, 3, 0) == [1, 2, 3])
    }

    @Test("truncate by path and by descriptor, growing and shrinking mid-chunk; sparse files stay sparse")
    func truncateAndSparse() throws {
        let v = try MountedVolume()
        var rng = SeededRandom(seed: 7)
        let data = rng.bytes(3 * 4096 + 100)
        try P.writeFile(v.path("f"), data)
        try syscall { truncate(v.path("f"), 5000) }
        #expect(try P.readFile(v.path("f")) == Array(data[0..<5000]))
        try syscall { truncate(v.path("f"), 9000) }
        #expect(try P.readFile(v.path("f")) == Array(data[0..<5000]) + Array(repeating: 0, count: 4000))
        let fd = try P.open(v.path("f"), O_RDWR)
        try syscall { ftruncate(fd, 4096) }
        #expect(try P.fstat(fd).st_size == 4096)
        try syscall { ftruncate(fd, 0) }
        #expect(try P.pread(fd, 10, 0) == [])
        close(fd)
        #expect(try P.stat(v.path("f")).st_size == 0)

        // A write 10 MiB into an empty file leaves a hole that reads as zeros and takes no space.
        let s = try P.open(v.path("sparse"), O_RDWR | O_CREAT)
        try P.pwrite(s, [0xAB], 10 << 20)
        #expect(try P.fstat(s).st_size == (10 << 20) + 1)
        #expect(try P.pread(s, 8192, 5 << 20).allSatisfy { $0 == 0 })
        #expect(try P.pread(s, 2, 10 << 20) == [0xAB])
        close(s)
        // (Holes take no space only where the backing filesystem's own holes do: JuiceFS counts them.)
        let sparse = try v.backingFeatures().sparseFiles
        if sparse { #expect(try P.stat(v.backing("sparse")).st_blocks * 512 < 1 << 20) }
        try syscall { truncate(v.path("sparse"), 20 << 20) }
        #expect(try P.stat(v.path("sparse")).st_size == 20 << 20)
        #expect(Array(try P.readFile(v.path("sparse")).suffix(4)) == [0, 0, 0, 0])
        if sparse { #expect(try P.stat(v.backing("sparse")).st_blocks * 512 < 1 << 20) }
    }

    @Test("Extended attributes: set, get, list, remove; the security and system namespaces are not supported")
    func xattrs() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [1])
        let value = Array("blue".utf8)
        guard try v.backingFeatures().userXattrs else {
            // A backing filesystem without extended attributes (JuiceFS by default): kmsfs says so, and the file
            // is unharmed.
            #expect(P.errno { try syscall { setxattr(v.path("f"), "user.colour", value, value.count, 0) } } == EOPNOTSUPP)
            var none = [CChar](repeating: 0, count: 16)
            #expect(P.errno { try syscall { listxattr(v.path("f"), &none, none.count) } } == EOPNOTSUPP)
            #expect(try P.readFile(v.path("f")) == [1])
            return
        }
        try syscall { setxattr(v.path("f"), "user.colour", value, value.count, 0) }
        var buf = [UInt8](repeating: 0, count: 64)
        let n = try syscall { getxattr(v.path("f"), "user.colour", &buf, buf.count) }
        #expect(Array(buf[0..<n]) == value)
        var list = [CChar](repeating: 0, count: 256)
        let ln = try syscall { listxattr(v.path("f"), &list, list.count) }
        let names = list[0..<ln].split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        #expect(names.contains("user.colour"))
        #expect(P.errno { try syscall { setxattr(v.path("f"), "user.colour", value, value.count, Int32(XATTR_CREATE)) } } == EEXIST)
        try syscall { removexattr(v.path("f"), "user.colour") }
        #expect(P.errno { try syscall { getxattr(v.path("f"), "user.colour", &buf, buf.count) } } == ENODATA)
        // Only the user and trusted namespaces are kept: SELinux labels, capabilities and POSIX ACLs are not
        // supported, and say so, even where the backing file has such an attribute.
        for name in ["security.selinux", "security.capability", "system.posix_acl_access"] {
            #expect(P.errno { try syscall { getxattr(v.path("f"), name, &buf, buf.count) } } == EOPNOTSUPP, "\(name)")
            // (The kernel itself refuses "blue" as an ACL, before asking the filesystem.)
            if name == "security.selinux" {
                #expect(P.errno { try syscall { setxattr(v.path("f"), name, value, value.count, 0) } } == EOPNOTSUPP, "\(name)")
            }
        }
        try syscall { setxattr(v.backing("f"), "security.kmsfs-test", value, value.count, 0) }
        try syscall { setxattr(v.path("f"), "trusted.kept", value, value.count, 0) }
        let all = try syscall { listxattr(v.path("f"), &list, list.count) }
        #expect(try syscall { listxattr(v.path("f"), nil, 0) } == all)
        let shown = list[0..<all].split(separator: 0).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        #expect(shown == ["trusted.kept"])
        // ls -l asks for the label and the ACL of the first file only, then knows the filesystem has neither.
        for i in 0..<20 { try P.writeFile(v.path("many\(i)"), [1]) }
        let trace = v.dir.path + "/ls.trace"
        let ls = try run("strace", ["-c", "-e", "trace=getxattr,lgetxattr", "-o", trace, "ls", "-l", v.mount])
        #expect(ls.status == 0, "\(ls.stderr)")
        let calls = String(decoding: try P.readFile(trace), as: UTF8.self).split(separator: "\n")
            .filter { $0.hasSuffix(" getxattr") || $0.hasSuffix(" lgetxattr") }
            .compactMap { line in line.split(separator: " ").dropFirst(3).first.flatMap { Int($0) } }
        #expect(calls.reduce(0, +) <= 4, "\(calls)")
    }

    @Test("Shared writable mmap: stores reach the file, and mapped reads see written data")
    func mmapShared() throws {
        let v = try MountedVolume()
        let fd = try P.open(v.path("m"), O_RDWR | O_CREAT)
        let size = 5 * 4096 + 123
        try syscall { ftruncate(fd, off_t(size)) }
        guard let map = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), map != MAP_FAILED else {
            throw Errno.current
        }
        let bytes = map.assumingMemoryBound(to: UInt8.self)
        for (i, at) in [0, 4095, 4096, 10000, size - 1].enumerated() { bytes[at] = UInt8(i + 1) }
        try syscall { msync(map, size, MS_SYNC) }
        munmap(map, size)
        close(fd)
        let back = try P.readFile(v.path("m"))
        #expect(back.count == size)
        #expect([0, 4095, 4096, 10000, size - 1].map { back[$0] } == [1, 2, 3, 4, 5])
        #expect(back.filter { $0 != 0 }.count == 5)
        // What is mapped after a remount comes from the backing file.
        try v.remount()
        let rfd = try P.open(v.path("m"), O_RDONLY)
        defer { close(rfd) }
        guard let rmap = mmap(nil, size, PROT_READ, MAP_SHARED, rfd, 0), rmap != MAP_FAILED else { throw Errno.current }
        defer { munmap(rmap, size) }
        #expect(rmap.load(fromByteOffset: 10000, as: UInt8.self) == 4)
    }

    @Test("An unlinked file stays usable through its open descriptors")
    func unlinkWhileOpen() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), Array(repeating: 5, count: 6000))
        let fd = try P.open(v.path("f"), O_RDWR)
        try syscall { unlink(v.path("f")) }
        #expect(P.errno { try P.stat(v.path("f")) } == ENOENT)
        try P.pwrite(fd, [6], 7000)
        #expect(try P.fstat(fd).st_size == 7001)
        let data = try P.pread(fd, 7001, 0)
        #expect(data[5999] == 5 && data[6500] == 0 && data[7000] == 6)
        close(fd)
    }

    @Test("Special files: FIFOs are created as such")
    func specialFiles() throws {
        let v = try MountedVolume()
        try syscall { mkfifo(v.path("fifo"), 0o600) }
        #expect(try P.stat(v.path("fifo")).st_mode & S_IFMT == S_IFIFO)
        // mknod of a regular file makes an (empty) encrypted file.
        try syscall { mknod(v.path("reg"), S_IFREG | 0o644, 0) }
        #expect(try P.stat(v.path("reg")).st_size == 0)
        try P.writeFile(v.path("reg"), [1, 2])
        #expect(try P.readFile(v.path("reg")) == [1, 2])
    }

    @Test("A read-only mount reads and refuses every change")
    func readOnly() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [1, 2, 3])
        try v.unmount()
        try v.start(["--read-only"])
        #expect(try P.readFile(v.path("f")) == [1, 2, 3])
        #expect(P.errno { try P.open(v.path("f"), O_WRONLY) } == EROFS)
        #expect(P.errno { try P.open(v.path("g"), O_WRONLY | O_CREAT) } == EROFS)
        #expect(P.errno { try syscall { mkdir(v.path("d"), 0o755) } } == EROFS)
        #expect(P.errno { try syscall { unlink(v.path("f")) } } == EROFS)
    }
}

let VolumeConfig_fileName = "kmsfs.conf"
