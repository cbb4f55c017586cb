import CSystem
import Foundation
import Glibc
import KmsfsFilesystem
import KmsfsSystem
import Synchronization
import Testing

/// A JuiceFS volume (a FUSE-based distributed filesystem) with `clients` client mounts of it, standing in for
/// shared storage seen from several hosts. Its metadata is in the Redis server `scripts/test` starts
/// (KMSFS_TEST_REDIS_URL; one database per volume), or else in a SQLite file; its data is a local directory.
final class JuiceFS {
    let dir: TempDir
    private(set) var mounts: [String] = []
    /// True when the metadata is in Redis, an engine for several clients (SQLite is meant for one machine).
    let multiClientMetadata: Bool
    static var binary: String { ProcessInfo.processInfo.environment["KMSFS_TEST_JUICEFS"] ?? "juicefs" }
    /// Redis databases handed out so far (each JuiceFS volume gets a fresh one).
    private static let databases = Mutex(0)

    init(clients: Int) throws {
        dir = try TempDir()
        let meta: String
        multiClientMetadata = ProcessInfo.processInfo.environment["KMSFS_TEST_REDIS_URL"] != nil
        if let redis = ProcessInfo.processInfo.environment["KMSFS_TEST_REDIS_URL"] {
            meta = redis + "/" + String(JuiceFS.databases.withLock { $0 += 1; return $0 })
            // Empty, whatever an earlier run of the tests left in it.
            let flushed = try run("redis-cli", ["-u", meta, "flushdb"])
            guard flushed.status == 0 else { throw TestFailure("redis-cli flushdb failed: \(flushed.stderr)") }
        } else {
            meta = "sqlite3://\(dir.path)/meta.db"
        }
        let f = try run(JuiceFS.binary, ["format", "--storage", "file", "--bucket", dir.path + "/bucket/", meta, "vol"])
        guard f.status == 0 else { throw TestFailure("juicefs format failed: \(f.stderr)") }
        for i in 0..<clients {
            let m = dir.path + "/client\(i)"
            try syscall { mkdir(m, 0o755) }
            // The daemon it leaves behind must not hold the output pipes `run` reads to the end.
            let r = try run("sh", ["-c", "exec \"$0\" mount -d --log \"$1.log\" \"$2\" \"$1\" >\"$1.out\" 2>&1", JuiceFS.binary, m, meta])
            guard r.status == 0 else { throw TestFailure("juicefs mount failed: \(r.stderr)") }
            mounts.append(m)
        }
    }

    /// The last lines of each client's log, for a failure report.
    func logTails() -> String {
        mounts.map { m in
            let log = (try? String(contentsOfFile: m + ".log", encoding: .utf8)) ?? "(no log)"
            return "\(m): " + log.split(separator: "\n").suffix(15).joined(separator: "\n")
        }.joined(separator: "\n")
    }

    deinit {
        for m in mounts { _ = try? run("fusermount3", ["-uz", m]) }
    }

    /// Runs checks of data written from several clients at once: strict on Redis metadata; on SQLite metadata,
    /// whose clients are seen to serve stale data across a lock handoff now and then, a known intermittent issue.
    func consistency(_ comment: Comment, _ body: () throws -> Void) rethrows {
        if multiClientMetadata { return try body() }
        withKnownIssue(comment, isIntermittent: true) { try body() }
    }
}

@Suite("Backing filesystems that are not local: probed at mount, nothing lost", .serialized)
struct BackingFilesystemTests {
    @Test("On JuiceFS, whose O_TMPFILE files vanish after close, every file written is there after close, remount and from another client")
    func juicefsKeepsFiles() throws {
        let juice = try JuiceFS(clients: 2)
        try withExtendedLifetime(juice) {
            let v = try MountedVolume(cipherParent: juice.mounts[0])
            #expect(v.daemonLogText.contains("backing filesystem: new files are made with a temporary name"), "\(v.daemonLogText)")
            #expect(v.daemonLogText.contains("other hosts are kept out by the volume lease"))
            // JuiceFS stores a hole's zeros (counted in st_blocks); kmsfs says so and works the same.
            #expect(v.daemonLogText.contains("holes take space (a file written past its end stores the zeros)"), "\(v.daemonLogText)")
            var rng = SeededRandom(seed: 9)
            let big = (0..<3_000_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
            try P.writeFile(v.path("small"), Array("hello\n".utf8))
            try P.writeFile(v.path("big"), big)
            try syscall { mkdir(v.path("d"), 0o755) }
            let shell = try run("sh", ["-c", "echo from-shell > \(v.path("d/echo")) && dd if=/dev/zero of=\(v.path("d/dd")) bs=64k count=16 status=none"])
            #expect(shell.status == 0, "\(shell.stderr)")
            // A create that loses the race to an existing name, and O_EXCL on it.
            #expect(P.errno { _ = try P.open(v.path("small"), O_WRONLY | O_CREAT | O_EXCL, 0o644) } == EEXIST)
            // JuiceFS without --enable-xattr has no extended attributes: kmsfs says so, and the file is unharmed.
            #expect(v.daemonLogText.contains("extended attributes unsupported"))
            #expect(P.errno { try syscall { setxattr(v.path("small"), "user.colour", "blue", 4, 0) } } == EOPNOTSUPP)
            #expect(try P.readFile(v.path("small")) == Array("hello\n".utf8))
            // Names kmsfs uses while making files are ordinary names in the mount (they are stored encrypted), and
            // no temporary file is left behind.
            try P.writeFile(v.path(".kmsfs-new.x"), [1])
            #expect(try P.readFile(v.path(".kmsfs-new.x")) == [1])
            let backingNames = try FileManager.default.contentsOfDirectory(atPath: v.cipher) + FileManager.default.contentsOfDirectory(atPath: v.backing("d"))
            #expect(!backingNames.contains { $0.hasPrefix(".kmsfs-new.") }, "\(backingNames)")

            _ = try v.unmount()
            // JuiceFS drops a linked O_TMPFILE file about a second after its close: give a lost file time to go.
            usleep(2_500_000)
            let other = juice.mounts[1] + "/" + URL(fileURLWithPath: v.cipher).lastPathComponent
            // Seen from the other client: every name, resolved through the encrypted names of this volume.
            let mine = try v.offlineNames()
            let names = OfflineNames(cipherDir: other, volume: mine.volume, cipher: mine.cipher)
            for file in ["big", "small", "d/dd", "d/echo"] {
                #expect(FileManager.default.fileExists(atPath: other + "/" + (try names.backingPath(of: file))), "\(file)")
            }
            let top = try FileManager.default.contentsOfDirectory(atPath: other).filter { !$0.hasPrefix("kmsfs.") }
            #expect(Set(try top.map { try names.plaintextPath(of: $0) }) == ["/big", "/d", "/small", "/.kmsfs-new.x"])
            try v.start()
            #expect(try P.readFile(v.path("small")) == Array("hello\n".utf8))
            #expect(try P.readFile(v.path("big")) == big)
            #expect(try P.readFile(v.path("d/echo")) == Array("from-shell\n".utf8))
            #expect(try P.readFile(v.path("d/dd")) == [UInt8](repeating: 0, count: 1 << 20))
            v.stop()
        }
    }

    @Test("Exclusive across hosts: a second client's mount and rewrap are refused with the holder's host and pid; the lease of a killed holder on this host is taken over at once")
    func exclusiveAcrossClients() throws {
        let juice = try JuiceFS(clients: 2)
        try withExtendedLifetime(juice) {
            let v = try MountedVolume(mountArgs: ["--lease-seconds", "3"], cipherParent: juice.mounts[0])
            try P.writeFile(v.path("f"), [1, 2, 3])
            let otherCipher = juice.mounts[1] + "/cipher"
            let otherMount = try TempDir()
            var host = [CChar](repeating: 0, count: 256)
            gethostname(&host, 255)
            let pid = v.process!.processIdentifier
            // Renewed every second: the lease stays fresh while the holder lives, longer than its 3 s duration.
            usleep(4_000_000)
            let second = try run(kmsfsBinary, ["mount", otherCipher, otherMount.path], environment: v.environment)
            #expect(second.status == 1, "\(second.stdout)\(second.stderr)")
            #expect(second.stderr.contains("is in use by kmsfs mount on host \(String(cString: host)) (pid \(pid))"), "\(second.stderr)")
            #expect(!isKmsfsMount(otherMount.path))
            let rewrap = try run(kmsfsBinary, ["rewrap", otherCipher], environment: v.environment)
            #expect(rewrap.status != 0 && rewrap.stderr.contains("is in use by kmsfs mount on host"), "\(rewrap.stderr)")

            // The holder dies without releasing: on this host its pid is gone, which frees the lease at once;
            // the file it wrote is there for the next holder.
            kill(pid, SIGKILL)
            _ = exitStatus(v.process!)
            _ = try? run("fusermount3", ["-uz", v.mount])
            let third = try run(kmsfsBinary, ["mount", otherCipher, otherMount.path], environment: v.environment)
            #expect(third.status == 0, "\(third.stderr)")
            #expect(try P.readFile(otherMount.path + "/f") == [1, 2, 3])
            _ = try run("fusermount3", ["-u", otherMount.path])
            #expect(waitFor(seconds: 10) { VolumeLease.holder(cipherDir: otherCipher) == nil }, "the lease was not released at unmount")
        }
    }

    @Test("A lease not renewed for twice its duration is taken over, with a warning; a fresh one from another host is not")
    func staleLeaseFromAnotherHost() throws {
        let v = try MountedVolume()
        _ = try v.unmount()
        let path = v.cipher + "/" + VolumeLease.fileName
        func writeLease(renewedAgo: Double) throws {
            let json = "{\"host\":\"elsewhere\",\"pid\":4242,\"purpose\":\"mount\",\"holderId\":\"00\",\"renewedAt\":\(Date().timeIntervalSince1970 - renewedAgo),\"seconds\":30}"
            try P.writeFile(path, Array(json.utf8))
        }
        try writeLease(renewedAgo: 5)
        let refused = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: v.environment)
        #expect(refused.status == 1 && refused.stderr.contains("is in use by kmsfs mount on host elsewhere (pid 4242), lease renewed 5 s ago"), "\(refused.stderr)")
        try writeLease(renewedAgo: 61)
        try v.start()
        #expect(v.daemonLogText.contains("took over the lease of \(v.cipher) from kmsfs mount on host elsewhere (pid 4242)"))
        #expect(VolumeLease.holder(cipherDir: v.cipher)?.pid == v.process!.processIdentifier)
    }

    /// Two hosts writing interleaved `piece`-byte pieces of the same chunks of one 20,000-byte file at once, each
    /// through its own open file: `one` the even pieces as 0xAA, `two` the odd ones as 0xBB. Returns the writers'
    /// errors.
    func interleave(_ one: String, _ two: String, piece: Int) throws -> [String] {
        try P.writeFile(one, [UInt8](repeating: 0, count: 20_000))
        let writers = [(one, 0, UInt8(0xAA)), (two, 1, UInt8(0xBB))]
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 2) { w in
            let (path, parity, value) = writers[w]
            do {
                let fd = try syscall { open(path, O_WRONLY | O_CLOEXEC) }
                defer { close(fd) }
                for i in stride(from: parity, to: 20_000 / piece, by: 2) {
                    _ = try [UInt8](repeating: value, count: piece).withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: piece, offset: i * piece) }
                }
            } catch {
                failures.withLock { $0.append("\(error)") }
            }
        }
        return failures.withLock { $0 }
    }

    /// The size of the file `interleave` wrote, read through `path`, and the pieces not holding their writer's bytes.
    func lostPieces(_ path: String, piece: Int) throws -> (size: Int, lost: [Int]) {
        let data = try P.readFile(path)
        guard data.count == 20_000 else { return (data.count, Array(0..<20_000 / piece)) }
        return (data.count, (0..<20_000 / piece).filter { i in
            data[i * piece..<i * piece + piece] != ArraySlice(repeating: i % 2 == 0 ? 0xAA : 0xBB, count: piece)
        })
    }

    /// Appends 60 records from each of two paths (hosts) at once, then checks that every record is there once.
    func appendFromBoth(_ one: String, _ two: String) throws {
        let appenders = [(one, UInt8(0x41)), (two, UInt8(0x42))]
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 2) { w in
            let (path, tag) = appenders[w]
            do {
                let fd = try syscall { open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644) }
                defer { close(fd) }
                for i in 0..<60 {
                    try P.write(fd, [tag] + Array(String(format: "%03d", i).utf8) + [UInt8](repeating: tag, count: 45) + [10])
                }
            } catch {
                failures.withLock { $0.append("\(error)") }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        let records = try P.readFile(two).split(separator: 10)
        #expect(records.count == 120 && Set(records.map { Array($0) }).count == 120, "\(records.count) records")
        for tag in [UInt8(0x41), 0x42] {
            let mine = records.filter { $0.first == tag }.map { String(decoding: $0.dropFirst().prefix(3), as: UTF8.self) }
            #expect(mine == (0..<60).map { String(format: "%03d", $0) }, "host \(tag): \(mine)")
        }
    }

    @Test("Shared mode, two mounts of one local directory: interleaved writers of the same chunks lose nothing")
    func sharedSameChunkLocally() throws {
        let a = try MountedVolume(mountArgs: ["--shared"])
        let b = try MountedVolume(host: a, cipher: a.cipher, mountArgs: ["--shared"])
        for round in 0..<4 {
            let failures = try interleave(a.path("shared"), b.path("shared"), piece: 50)
            #expect(failures.isEmpty, "\(failures)")
            let (size, lost) = try lostPieces(b.path("shared"), piece: 50)
            #expect(size == 20_000 && lost.isEmpty, "round \(round): size \(size), \(lost)")
        }
        try appendFromBoth(a.path("log"), b.path("log"))
        // Random operations on one file, moving between the two mounts, against one model.
        let seed = UInt64.random(in: 0...UInt64.max)
        var rng = SeededRandom(seed: seed)
        let model = try ModelTests.exercise(paths: [a.path("model"), b.path("model")], rng: &rng, chunkSize: 4096,
                                            operations: 500, maxSpan: 3 * 4096, label: "two local mounts, seed \(seed)")
        #expect(model != nil)
        b.stop()
    }

    @Test("Shared mode: a file's lock against other hosts is the byte of the volume's locks file at its backing inode number, as kmsfs-format(5) says; a change waits while another host holds it")
    func sharedLockProtocol() throws {
        let v = try MountedVolume()
        try v.unmount()
        // A read-only shared mount makes nothing: without the locks file (a writable shared mount makes it), it is
        // refused, saying what to do.
        let refused = try run(kmsfsBinary, ["mount", "--shared", "--read-only", v.cipher, v.mount], environment: v.environment)
        #expect(refused.status != 0 && refused.stderr.contains("mount it once with --shared and not read-only"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: v.cipher + "/kmsfs.conf.locks"))
        try v.start(["--shared"])
        try P.writeFile(v.path("f"), [1, 2, 3])
        let fd = try P.open(v.path("f"), O_WRONLY)
        defer { close(fd) }
        // Another host, written from the format page alone: a write lock on that byte.
        let ino = try P.stat(v.cipher + "/" + v.offlineNames().backingPath(of: "f")).st_ino
        let locks = try P.open(v.cipher + "/kmsfs.conf.locks", O_RDWR)
        defer { close(locks) }
        // (Once this host's open has given up the read lock it keeps for 20 ms.)
        #expect(waitFor(seconds: 5) { kmsfs_ofd_lock_range(locks, Int32(F_WRLCK), Int64(ino), 1) == 0 })
        let wrote = Atomic<Bool>(false)
        DispatchQueue.global().async {
            _ = try? P.pwrite(fd, [9], 1)
            wrote.store(true, ordering: .releasing)
        }
        usleep(400_000)
        let early = wrote.load(ordering: .acquiring)
        #expect(!early, "a write went ahead while another host held the file's lock")
        #expect(kmsfs_ofd_lock_range(locks, Int32(F_UNLCK), Int64(ino), 1) == 0)
        let hasWritten = { wrote.load(ordering: .acquiring) }
        #expect(waitFor(seconds: 10, hasWritten))
        #expect(try P.readFile(v.path("f")) == [1, 9, 3])
        // The locks file is the volume's own: not listed.
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount) == ["f"])
        // Now that it exists, a read-only shared mount takes read locks through it, and reads what the other wrote.
        let reader = try MountedVolume(host: v, cipher: v.cipher, mountArgs: ["--shared", "--read-only"])
        defer { reader.stop() }
        #expect(try P.readFile(reader.path("f")) == [1, 9, 3])
        try P.pwrite(fd, [7], 2)
        #expect(try P.readFile(reader.path("f")) == [1, 9, 7])
    }

    @Test("Shared mode: when one host gives up the uniform header length (a new file's header does not fit), the others follow it, at a renewal or at the open of such a file, and read and size its files")
    func sharedUniformHeaderLength() throws {
        // A volume whose config promises 512-byte headers, with a context too long for them (as in
        // VolumeFormatTests), mounted by three hosts; C renews its lease every half second, B every 10 s.
        let long = String(repeating: "x", count: 700)
        let a = try MountedVolume(initArgs: ["--context", "note=\(long)"], mountArgs: ["--shared"])
        try a.unmount()
        try a.rewriteConfig { $0.headerLength = 512 }
        try a.start(["--shared"])
        let b = try MountedVolume(host: a, cipher: a.cipher, mountArgs: ["--shared"])
        defer { b.stop() }
        let c = try MountedVolume(host: a, cipher: a.cipher, mountArgs: ["--shared", "--lease-seconds", "1.5"])
        defer { c.stop() }
        try P.writeFile(a.path("first"), Array("longer header".utf8))
        #expect(a.daemonLogText.contains("more than the volume's uniform 512"))
        // B opens A's file before a renewal tells it: the header length differs from the uniform one, B finds the
        // config changed, follows it and reads the file.
        #expect(try P.readFile(b.path("first")) == Array("longer header".utf8))
        #expect(try P.stat(b.path("first")).st_size == 13)
        #expect(b.daemonLogText.contains("another host gave up the volume's uniform header length"), "\(b.daemonLogText)")
        // C learns it at a renewal, without opening anything; then a stat sizes A's file from its header.
        #expect(waitFor(seconds: 5) { c.daemonLogText.contains("another host gave up the volume's uniform header length") }, "\(c.daemonLogText)")
        #expect(try P.stat(c.path("first")).st_size == 13)
        #expect(try P.readFile(c.path("first")) == Array("longer header".utf8))
        // Listings with attributes stay right for files of either length, on every host.
        try P.writeFile(a.path("second"), Array("another".utf8))
        for host in [a, b, c] {
            let ls = try run("ls", ["-ln", host.mount])
            let sizes = Dictionary(uniqueKeysWithValues: ls.stdout.split(separator: "\n").dropFirst().map { line in
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                return (String(f.last!), Int(f[4])!)
            })
            #expect(sizes == ["first": 13, "second": 7], "\(ls.stdout)")
        }
    }

    @Test("Shared and exclusive leases exclude each other through the lease files alone (for backing filesystems whose flock does not reach other hosts); a stale shared lease of another host does not block")
    func sharedLeases() throws {
        let d = try TempDir()
        let one = try VolumeLease.acquire(cipherDir: d.path, purpose: "mount (shared)", shared: true)
        let two = try VolumeLease.acquire(cipherDir: d.path, purpose: "mount (shared)", shared: true)
        #expect(throws: VolumeLease.Held.self) { _ = try VolumeLease.acquire(cipherDir: d.path, purpose: "rewrap") }
        do {
            _ = try VolumeLease.acquire(cipherDir: d.path, purpose: "mount")
        } catch let held as VolumeLease.Held {
            #expect(held.holder.purpose == "mount (shared)", "\(held)")
        }
        // A refused exclusive taker leaves no lease behind, and no shared holder lost its own.
        #expect(!FileManager.default.fileExists(atPath: d.path + "/" + VolumeLease.fileName))
        #expect(VolumeLease.describeHolders(cipherDir: d.path).components(separatedBy: "(shared)").count == 3)
        one.release()
        two.release()
        let exclusive = try VolumeLease.acquire(cipherDir: d.path, purpose: "mount")
        #expect(throws: VolumeLease.Held.self) { _ = try VolumeLease.acquire(cipherDir: d.path, purpose: "mount (shared)", shared: true) }
        exclusive.release()
        // A shared lease another host stopped renewing a while ago does not keep an exclusive mount out.
        let json = "{\"host\":\"elsewhere\",\"pid\":4242,\"purpose\":\"mount (shared)\",\"holderId\":\"01\",\"renewedAt\":\(Date().timeIntervalSince1970 - 61),\"seconds\":30}"
        try P.writeFile(d.path + "/" + VolumeLease.sharedPrefix + "01", Array(json.utf8))
        let after = try VolumeLease.acquire(cipherDir: d.path, purpose: "mount")
        #expect(!FileManager.default.fileExists(atPath: d.path + "/" + VolumeLease.sharedPrefix + "01"))
        after.release()
        #expect(try FileManager.default.contentsOfDirectory(atPath: d.path).isEmpty)
    }

    @Test("A mount whose lease another host took over stops writing (EROFS) and keeps reading")
    func fencedWhenLeaseLost() throws {
        let v = try MountedVolume(mountArgs: ["--lease-seconds", "3"])
        try P.writeFile(v.path("f"), [1, 2, 3])
        let fd = try P.open(v.path("f"), O_RDWR)
        let json = "{\"host\":\"elsewhere\",\"pid\":4242,\"purpose\":\"mount\",\"holderId\":\"ff\",\"renewedAt\":\(Date().timeIntervalSince1970),\"seconds\":30}"
        try P.writeFile(v.cipher + "/" + VolumeLease.fileName, Array(json.utf8))
        #expect(waitFor(seconds: 10) { P.errno { try P.writeFile(v.path("g"), [4]) } == EROFS })
        #expect(P.errno { try P.pwrite(fd, [9], 0) } == EROFS)
        #expect(P.errno { try syscall { mkdir(v.path("d"), 0o755) } } == EROFS)
        #expect(try P.pread(fd, 3, 0) == [1, 2, 3])
        #expect(try P.readFile(v.path("f")) == [1, 2, 3])
        #expect(v.daemonLogText.contains("no longer writing to \(v.cipher): its lease is now held by kmsfs mount on host elsewhere (pid 4242)"))
        close(fd)
        // Its lease is not removed at unmount: it is not this mount's.
        _ = try v.unmount()
        #expect(VolumeLease.holder(cipherDir: v.cipher)?.host == "elsewhere")
    }

    @Test("A mount that cannot renew its lease stops writing once the lease has run out")
    func fencedWhenLeaseNotRenewed() throws {
        let v = try MountedVolume(mountArgs: ["--lease-seconds", "3"])
        try P.writeFile(v.path("f"), [1])
        // The lease can no longer be read or replaced (a directory stands in its place).
        let lease = v.cipher + "/" + VolumeLease.fileName
        try syscall { unlink(lease) }
        try syscall { mkdir(lease, 0o700) }
        #expect(waitFor(seconds: 15) { P.errno { try P.writeFile(v.path("g"), [2]) } == EROFS })
        #expect(try P.readFile(v.path("f")) == [1])
        #expect(v.daemonLogText.contains("lease was not renewed in time") || v.daemonLogText.contains("could not be"), "\(v.daemonLogText)")
        try syscall { rmdir(lease) }
    }

    @Test("A file a crash left half made under a temporary name is hidden, and does not keep its directory from being removed")
    func leftoverTemporaryFile() throws {
        let v = try MountedVolume()
        try syscall { mkdir(v.path("d"), 0o755) }
        try P.writeFile(v.path("d/keep"), [1])
        // As a crash between writing the header and the rename would leave it.
        try P.writeFile(v.backing("d/.kmsfs-new.0123456789abcdef01234567"), [0, 1, 2])
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.path("d")) == ["keep"])
        #expect(P.errno { try syscall { rmdir(v.path("d")) } } == ENOTEMPTY)
        try syscall { unlink(v.path("d/keep")) }
        try syscall { rmdir(v.path("d")) }
        #expect(!FileManager.default.fileExists(atPath: v.backing("d")))
    }

    @Test("Shared mode on two JuiceFS clients: close-to-open reads, writers of one chunk from both hosts lose nothing, create races have one winner, exclusive mounts and rewrap are refused meanwhile, and a killed host leaves the other working")
    func sharedMode() throws {
        let juice = try JuiceFS(clients: 2)
        try withExtendedLifetime(juice) {
            let a = try MountedVolume(mountArgs: ["--shared"], cipherParent: juice.mounts[0])
            let bCipher = juice.mounts[1] + "/" + URL(fileURLWithPath: a.cipher).lastPathComponent
            let b = try MountedVolume(host: a, cipher: bCipher, mountArgs: ["--shared"])
            do {
                try sharedModeSteps(juice, a, b, bCipher)
            } catch {
                Issue.record("\(error); A's daemon log:\n\(a.daemonLogText.suffix(3000))\nB's daemon log:\n\(b.daemonLogText.suffix(3000))\nJuiceFS client logs:\n\(juice.logTails())")
            }
            b.stop()
        }
    }

    /// The steps of `sharedMode`, whose errors it records with the daemons' logs.
    private func sharedModeSteps(_ juice: JuiceFS, _ a: MountedVolume, _ b: MountedVolume, _ bCipher: String) throws {
        #expect(a.daemonLogText.contains("byte-range locks enforced"), "\(a.daemonLogText)")
        let status = try run(kmsfsBinary, ["status", b.mount], environment: b.environment)
        #expect(status.stdout.contains("read-write, shared"), "\(status.stdout)\(status.stderr)")
        // Close-to-open: what one host wrote and closed, the other reads on its next open, size included.
        try P.writeFile(a.path("note"), Array("from A".utf8))
        #expect(try P.readFile(b.path("note")) == Array("from A".utf8))
        let fd = try syscall { open(b.path("note"), O_WRONLY | O_APPEND | O_CLOEXEC) }
        try P.write(fd, Array(", then B".utf8))
        close(fd)
        #expect(try P.readFile(a.path("note")) == Array("from A, then B".utf8))
        #expect(try P.stat(a.path("note")).st_size == 14)
        // A host that has a file open for writing sees another host cut it: in the sizes of its next open and in
        // reads through the handle it had open. (A JuiceFS client takes the length of a file it holds open for
        // writing from its own writes: kmsfs keeps no writable backing descriptor open between requests.)
        try P.writeFile(a.path("resized"), [UInt8](repeating: 7, count: 50_000))
        let writer = try P.open(b.path("resized"), O_RDWR)
        defer { close(writer) }
        try P.pwrite(writer, [8], 0)
        #expect(try P.fstat(writer).st_size == 50_000)
        let cut = try P.open(a.path("resized"), O_WRONLY)
        try syscall { ftruncate(cut, 4098) }
        close(cut)
        do {
            let reopened = try P.open(b.path("resized"), O_RDONLY)
            defer { close(reopened) }
            #expect(try P.fstat(reopened).st_size == 4098)
            #expect(try P.pread(reopened, 5000, 0) == [8] + [UInt8](repeating: 7, count: 4097))
        }
        #expect(try P.pread(writer, 5000, 0) == [8] + [UInt8](repeating: 7, count: 4097))
        try P.pwrite(writer, [9], 4098)
        #expect(try P.readFile(a.path("resized")) == [8] + [UInt8](repeating: 7, count: 4097) + [9])

        // Two hosts writing interleaved 100-byte pieces of the same chunks of one file, each through its own
        // open file: every piece is there afterwards (no read-modify-write lost the other host's).
        let failures = try interleave(a.path("shared"), b.path("shared"), piece: 100)
        #expect(failures.isEmpty, "\(failures) B: \(b.daemonLogText.split(separator: "\n").filter { !$0.contains("backing filesystem:") }) A: \(a.daemonLogText.split(separator: "\n").filter { !$0.contains("backing filesystem:") })")
        for v in [a, b] {
            let (size, lost) = try lostPieces(v.path("shared"), piece: 100)
            #expect(size == 20_000)
            // Strict with Redis metadata. With SQLite metadata (meant for one machine) JuiceFS's two clients
            // now and then serve a read-modify-write stale data across a lock handoff, and about one piece in
            // 200 is lost in a third of runs: known, not kmsfs's (none is lost on Redis, or on two mounts of a
            // local directory: sharedSameChunkLocally).
            juice.consistency("same-chunk writers on two JuiceFS clients over SQLite occasionally lose a piece") {
                #expect(lost.isEmpty, "pieces lost or damaged, read through \(v === a ? "A" : "B"): \(lost)")
            }
        }

        // Both hosts create the same names at once with O_EXCL: each name is made once, with its header.
        let names = (0..<20).map { "race-\($0)" }
        let won = Mutex<[String: Int]>([:])
        let hosts = [(a.mount, UInt8(1)), (b.mount, UInt8(2))]
        DispatchQueue.concurrentPerform(iterations: 2) { h in
            let (mount, tag) = hosts[h]
            for n in names {
                if let fd = try? P.open(mount + "/" + n, O_WRONLY | O_CREAT | O_EXCL, 0o644) {
                    _ = try? P.write(fd, [tag])
                    close(fd)
                    won.withLock { $0[n, default: 0] += 1 }
                }
            }
        }
        #expect(won.withLock { $0 }.count == 20 && won.withLock { $0 }.values.allSatisfy { $0 == 1 }, "\(won.withLock { $0 })")
        for n in names {
            let fromA = try P.readFile(a.path(n)), fromB = try P.readFile(b.path(n))
            #expect(fromA == fromB && (fromA == [1] || fromA == [2]), "\(n): \(fromA) \(fromB)")
        }

        // Both hosts making the same directories and long names at once: one directory (one ID: what one host
        // puts in it, the other reads), one file per long name.
        let longName = String(repeating: "L", count: 200)
        let mkdirs = Mutex<[String: Int]>([:])
        let mounts = [a.mount, b.mount]
        DispatchQueue.concurrentPerform(iterations: 2) { h in
            let mount = mounts[h]
            for i in 0..<10 where mkdir(mount + "/dir-\(i)", 0o755) == 0 { mkdirs.withLock { $0["dir-\(i)", default: 0] += 1 } }
            for i in 0..<10 {
                if let fd = try? P.open(mount + "/\(longName)-\(i)", O_WRONLY | O_CREAT | O_EXCL, 0o644) {
                    _ = try? P.write(fd, [UInt8(h)])
                    close(fd)
                    mkdirs.withLock { $0["long-\(i)", default: 0] += 1 }
                }
            }
        }
        #expect(mkdirs.withLock { $0 }.count == 20 && mkdirs.withLock { $0 }.values.allSatisfy { $0 == 1 }, "\(mkdirs.withLock { $0 })")
        for i in 0..<10 {
            try P.writeFile(a.path("dir-\(i)/inside"), [UInt8(i)])
            #expect(try P.readFile(b.path("dir-\(i)/inside")) == [UInt8(i)])
            #expect(try P.readFile(b.path("\(longName)-\(i)")) == P.readFile(a.path("\(longName)-\(i)")))
        }
        // A directory emptied on one host is removed from the other (its ID file goes with it).
        try syscall { unlink(b.path("dir-0/inside")) }
        try syscall { rmdir(a.path("dir-0")) }
        // (B's JuiceFS client may hold the name for its --entry-cache second.)
        #expect(waitFor(seconds: 5) { P.errno { _ = try P.stat(b.path("dir-0")) } == ENOENT })
        #expect(P.errno { try syscall { rmdir(b.path("dir-1")) } } == ENOTEMPTY)
        // A directory renamed over an empty one (which still holds its ID in the backing store).
        try syscall { unlink(a.path("dir-1/inside")) }
        try syscall { Glibc.rename(b.path("dir-2"), b.path("dir-1")) }
        // (A's JuiceFS client may hold the replaced directory's name for its --entry-cache second.)
        #expect(waitFor(seconds: 5) { (try? P.readFile(a.path("dir-1/inside"))) == [2] })
        #expect(try P.readFile(b.path("dir-1/inside")) == [2])

        // Two hosts appending at once (O_APPEND): every record of both is there once, whole.
        try juice.consistency("appends from two JuiceFS clients over SQLite occasionally lose a record") {
            try appendFromBoth(a.path("log"), b.path("log"))
        }

        // Random operations on one file, moving between the hosts, checked against one model.
        let seed = UInt64.random(in: 0...UInt64.max)
        var rng = SeededRandom(seed: seed)
        try juice.consistency("a read-modify-write on two JuiceFS clients over SQLite occasionally sees stale data") {
            let model = try ModelTests.exercise(paths: [a.path("model"), b.path("model")], rng: &rng, chunkSize: 4096,
                                                operations: 400, maxSpan: 3 * 4096, label: "two hosts, seed \(seed)")
            #expect(model != nil)
        }

        // Meanwhile an exclusive mount and a rewrap are refused, naming a shared holder.
        let third = a.dir.path + "/third"
        try syscall { mkdir(third, 0o755) }
        let exclusive = try run(kmsfsBinary, ["mount", bCipher, third], environment: a.environment)
        #expect(exclusive.status != 0 && exclusive.stderr.contains("(shared)"), "\(exclusive.stderr)")
        let rewrap = try run(kmsfsBinary, ["rewrap", a.cipher], environment: a.environment)
        #expect(rewrap.status != 0 && rewrap.stderr.contains("(shared)"), "\(rewrap.stderr)")

        // Host A's daemon killed in the middle of writing: B goes on, and every file A had closed reads.
        let busy = try syscall { open(a.path("being-written"), O_WRONLY | O_CREAT | O_CLOEXEC, 0o644) }
        try P.write(busy, [UInt8](repeating: 3, count: 50_000))
        kill(a.process!.processIdentifier, SIGKILL)
        close(busy)
        _ = try run("fusermount3", ["-uz", a.mount])
        try P.writeFile(b.path("after"), Array("B still works".utf8))
        #expect(try P.readFile(b.path("after")) == Array("B still works".utf8))
        #expect(try P.readFile(b.path("note")) == Array("from A, then B".utf8))
        #expect(try P.readFile(b.path("race-0")).count == 1)
        // verify reads every file; at most the one being written when A died is damaged, and it is named.
        let verify = try run(kmsfsBinary, ["verify", bCipher], environment: b.environment)
        let damaged = verify.stdout.split(separator: "\n").filter { !$0.contains("all intact") && !$0.contains("checked") }
        #expect(verify.status == 0 || damaged.allSatisfy { $0.contains("/being-written") }, "\(verify.stdout)\(verify.stderr)")
    }

    @Test("On a local filesystem the probe finds O_TMPFILE and uses it")
    func localUsesTmpfile() throws {
        let v = try MountedVolume()
        #expect(v.daemonLogText.contains("backing filesystem: new files are made with O_TMPFILE, linked when complete"), "\(v.daemonLogText)")
        #expect(!v.daemonLogText.contains("other hosts are kept out"))
        #expect(v.daemonLogText.contains("extended attributes work, names up to 255 bytes"), "\(v.daemonLogText)")
        // (Under KMSFS_TEST_BACKING_ROOT the backing filesystem is another one, whose holes may take space.)
        if try v.backingFeatures().sparseFiles { #expect(v.daemonLogText.contains("holes take no space"), "\(v.daemonLogText)") }
        try P.writeFile(v.path("f"), [1])
        #expect(try P.readFile(v.path("f")) == [1])
    }
}
