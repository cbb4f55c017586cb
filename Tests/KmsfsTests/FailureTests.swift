import CSystem
import Foundation
import Glibc
import KmsfsFormat
import KmsfsSystem
import Testing

/// Flips one byte of a file in place.
func flipByte(_ path: String, at offset: Int) throws {
    let fd = try P.open(path, O_RDWR)
    defer { close(fd) }
    let b = try P.pread(fd, 1, offset)
    try P.pwrite(fd, [b[0] ^ 0x40], offset)
}

@Suite("Bad input: clear errors, nothing lost")
struct FailureTests {
    @Test("A corrupt chunk fails reads of that chunk only, with one log line naming the file and the chunk")
    func corruptChunk() throws {
        let v = try MountedVolume(chunkSize: 4096)
        var rng = SeededRandom(seed: 5)
        let data = rng.bytes(5 * 4096)
        try P.writeFile(v.path("f"), data)
        try P.writeFile(v.path("other"), [1, 2, 3])
        let layout = ChunkLayout(headerLength: try HeaderPrefix(try P.pread(P.open(v.backing("f"), O_RDONLY), 16, 0)).headerLength, chunkSize: 4096)
        try flipByte(v.backing("f"), at: layout.backingOffset(ofChunk: 2) + 100)

        let fd = try P.open(v.path("f"), O_RDONLY)
        defer { close(fd) }
        for chunk in [0, 1, 3, 4] {
            #expect(try P.pread(fd, 4096, chunk * 4096) == Array(data[(chunk * 4096)..<((chunk + 1) * 4096)]), "chunk \(chunk)")
        }
        #expect(P.errno { try P.pread(fd, 4096, 2 * 4096) } == EIO)
        #expect(P.errno { try P.pread(fd, 10, 3 * 4096 - 5) } == EIO)
        #expect(P.errno { try P.readFile(v.path("f")) } == EIO)
        // Reading the chunks again still works, and so does the rest of the mount.
        #expect(try P.pread(fd, 100, 4 * 4096) == Array(data[(4 * 4096)..<(4 * 4096 + 100)]))
        #expect(try P.readFile(v.path("other")) == [1, 2, 3])
        let lines = v.daemonLogText.split(separator: "\n").filter { $0.contains("corrupt chunk") }
        #expect(lines.count == 1, "\(lines)")
        #expect(lines.first?.contains("corrupt chunk 2 of /f") == true)
        // A write that does not touch the corrupt chunk still works; one that needs it fails.
        let w = try P.open(v.path("f"), O_WRONLY)
        defer { close(w) }
        try P.pwrite(w, [9, 9], 10)
        #expect(P.errno { try P.pwrite(w, [9], 2 * 4096 + 7) } == EIO)
        // Overwriting the whole chunk repairs it.
        try P.pwrite(w, Array(data[(2 * 4096)..<(3 * 4096)]), 2 * 4096)
        #expect(try P.pread(fd, 4096, 2 * 4096) == Array(data[(2 * 4096)..<(3 * 4096)]))
    }

    @Test("--log-format json: every daemon log line is one JSON object with time, level and event; a corrupt chunk names its file and chunk")
    func jsonLogs() throws {
        let v = try MountedVolume(mountArgs: ["--log-format", "json", "--direct-io"])
        try P.writeFile(v.path("f"), Array(repeating: 7, count: 3 * 4096))
        try #require(v.waitForKeysWiped("f"))
        try flipByte(v.backing("f"), at: try FileHeader(decoding: try P.readFile(v.backing("f"))).headerLength + 4096 + 28 + 10)
        #expect(P.errno { try P.readFile(v.path("f")) } == EIO)
        try v.unmount()
        let lines = v.daemonLogText.split(separator: "\n")
        var events: [[String: Any]] = []
        for line in lines {
            let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            #expect(object != nil, "not a JSON line: \(line)")
            if let o = object {
                #expect(o["time"] is String && o["level"] is String && o["event"] is String && o["message"] is String, "\(o)")
                events.append(o)
            }
        }
        #expect(events.contains { $0["event"] as? String == "mounted" })
        #expect(events.contains { $0["event"] as? String == "corrupt-chunk" && $0["file"] as? String == "/f" && $0["chunk"] as? String == "1" && $0["level"] as? String == "error" }, "\(events)")
        #expect(events.contains { $0["event"] as? String == "unmounted" })
    }

    @Test("A file cut at a chunk boundary fails reading its end; chunks swapped on disk fail too")
    func truncatedAndSwapped() throws {
        let v = try MountedVolume(chunkSize: 4096)
        var rng = SeededRandom(seed: 6)
        let data = rng.bytes(4 * 4096 + 10)
        try P.writeFile(v.path("cut"), data)
        try P.writeFile(v.path("swap"), data)
        let h = try HeaderPrefix(try P.pread(P.open(v.backing("cut"), O_RDONLY), 16, 0))
        let layout = h.layout
        try syscall { truncate(v.backing("cut"), off_t(layout.backingOffset(ofChunk: 3))) }
        #expect(try P.stat(v.path("cut")).st_size == 3 * 4096)
        let fd = try P.open(v.path("cut"), O_RDONLY)
        defer { close(fd) }
        #expect(try P.pread(fd, 4096, 0) == Array(data[0..<4096]))
        #expect(P.errno { try P.pread(fd, 4096, 2 * 4096) } == EIO)
        // A file cut while open: the mount knows its size, and the backing file ends before it (asked again, as a
        // short read may come from a backing filesystem's stale cached size, it still does).
        try P.writeFile(v.path("cut-open"), data)
        let open = try P.open(v.path("cut-open"), O_RDONLY)
        defer { close(open) }
        try syscall { truncate(v.backing("cut-open"), off_t(layout.backingOffset(ofChunk: 3) + 100)) }
        #expect(try P.pread(open, 4096, 4096) == Array(data[4096..<8192]))
        #expect(P.errno { try P.pread(open, 4096, 3 * 4096) } == EIO)
        #expect(v.daemonLogText.contains("corrupt chunk 3 of /cut-open: the backing file ends at byte \(layout.backingOffset(ofChunk: 3) + 100), before the chunk's end"), "\(v.daemonLogText)")
        #expect(!v.daemonLogText.contains("stale-backing-size") && !v.daemonLogText.contains("until asked for its size again"))

        let a = layout.backingOffset(ofChunk: 0), b = layout.backingOffset(ofChunk: 1)
        let sfd = try P.open(v.backing("swap"), O_RDWR)
        let first = try P.pread(sfd, layout.storedChunkSize, a), second = try P.pread(sfd, layout.storedChunkSize, b)
        try P.pwrite(sfd, second, a)
        try P.pwrite(sfd, first, b)
        close(sfd)
        let s = try P.open(v.path("swap"), O_RDONLY)
        defer { close(s) }
        #expect(P.errno { try P.pread(s, 4096, 0) } == EIO)
        #expect(P.errno { try P.pread(s, 4096, 4096) } == EIO)
        #expect(try P.pread(s, 4096, 2 * 4096) == Array(data[(2 * 4096)..<(3 * 4096)]))
    }

    @Test("A corrupt, foreign or empty header gives EIO (at open, or at first read when only the key shows it) and a log line; stat still works")
    func badHeaders() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("mac"), Array(repeating: 1, count: 100))
        try P.writeFile(v.path("ctx"), Array(repeating: 2, count: 100))
        try P.writeFile(v.path("blob"), Array(repeating: 3, count: 100))
        try #require(v.waitForKeysWiped("mac", "ctx", "blob"))
        try flipByte(v.backing("mac"), at: 40)            // key commitment
        try flipByte(v.backing("ctx"), at: 20)            // file ID (no longer matches its context)
        let header = try FileHeader(decoding: try P.readFile(v.backing("blob")))
        try flipByte(v.backing("blob"), at: header.headerLength - 60)  // inside the wrapped key
        try P.writeFile(v.backing("foreign"), Array("just some plaintext that was dropped here".utf8))
        try P.writeFile(v.backing("empty"), [])
        for name in ["mac", "ctx", "blob", "foreign", "empty"] {
            #expect(P.errno { try P.readFile(v.path(name)) } == EIO, "\(name)")
            #expect(P.errno { try P.stat(v.path(name)) } == nil)
            #expect(v.daemonLogText.contains("cannot open /\(name)"), "\(name)")
        }
        // Damage that shows without the key fails the open itself; the rest fails when the key is first needed.
        for name in ["ctx", "foreign", "empty"] {
            #expect(P.errno { try P.open(v.path(name), O_RDONLY) } == EIO, "\(name)")
        }
        #expect(try P.stat(v.path("foreign")).st_size == 0)
        #expect(v.daemonLogText.contains("not a kmsfs file"))
        // A header copied from another file does not make its body readable.
        try P.writeFile(v.path("x"), Array(repeating: 4, count: 5000))
        try P.writeFile(v.path("y"), Array(repeating: 5, count: 5000))
        try #require(v.waitForKeysWiped("x", "y"))
        let hx = try FileHeader(decoding: try P.readFile(v.backing("x")))
        let yfd = try P.open(v.backing("y"), O_RDWR)
        try P.pwrite(yfd, Array(try P.readFile(v.backing("x"))[0..<hx.headerLength]), 0)
        close(yfd)
        // Refused at open when names are bound (the header's file ID is not the one y's name is bound to), else
        // at the first read.
        #expect(P.errno { let y = try P.open(v.path("y"), O_RDONLY); defer { close(y) }; _ = try P.pread(y, 100, 0) } == EIO)
    }

    @Test("Format 3: an empty file holds a marker made with the volume key, so a file cut to its header, or to a few bytes of body, is damaged (EIO, a log line, verify and decrypt say so), never silently empty")
    func emptiedBehindOurBack() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("empty"), [])
        for name in ["cut", "cut16", "grown", "hole", "trunc"] { try P.writeFile(v.path(name), Array(repeating: 9, count: 6000)) }
        try #require(v.waitForKeysWiped("empty", "cut", "cut16", "grown", "hole", "trunc"))
        let h = try FileHeader(decoding: try P.readFile(v.backing("empty")))
        #expect(h.layout.marksEmptyFile)
        let marker = try v.volumeKeys().emptyFileMarker(fileId: h.fileId)
        #expect(try P.readFile(v.backing("empty")) == h.encoded() + marker)
        #expect(try P.readFile(v.path("empty")) == [])

        // Through the mount: truncation to zero, O_TRUNC, and growth from empty (a write past a hole, truncate up)
        // keep every file sound, and none of them needs a data key to empty a file.
        let decrypts = v.auditCount("Decrypt")
        try syscall { truncate(v.path("trunc"), 0) }
        #expect(try P.stat(v.backing("trunc")).st_size == h.headerLength + 16)
        #expect(try P.readFile(v.path("trunc")) == [])
        #expect(v.auditCount("Decrypt") == decrypts)
        let g = try P.open(v.path("grown"), O_WRONLY | O_TRUNC)
        try P.pwrite(g, [1, 2, 3], 10_000)
        close(g)
        try syscall { truncate(v.path("hole"), 0) }
        try syscall { truncate(v.path("hole"), 5000) }
        #expect(try P.readFile(v.path("grown")) == Array(repeating: 0, count: 10_000) + [1, 2, 3])
        #expect(try P.readFile(v.path("hole")) == Array(repeating: 0, count: 5000))
        try #require(v.waitForKeysWiped("grown", "hole", "trunc"))

        // Behind kmsfs's back: one file cut to exactly its header, another to its header and 16 bytes.
        try syscall { truncate(v.backing("cut"), off_t(h.headerLength)) }
        try syscall { truncate(v.backing("cut16"), off_t(h.headerLength + 16)) }
        #expect(try P.stat(v.path("cut16")).st_size == 0)
        #expect(P.errno { try P.open(v.path("cut"), O_RDONLY) } == EIO)
        #expect(v.daemonLogText.contains("cannot open /cut: malformed header: the file was cut to \(h.headerLength) bytes"), "\(v.daemonLogText)")
        #expect(P.errno { try P.readFile(v.path("cut16")) } == EIO)
        #expect(v.daemonLogText.contains("/cut16 is empty but lacks its empty-file marker"), "\(v.daemonLogText)")
        try v.unmount()

        let verify = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(verify.status == 1)
        #expect(verify.stdout.contains("/cut: damaged tail"), "\(verify.stdout)")
        #expect(verify.stdout.contains("/cut16: empty without its empty-file marker"), "\(verify.stdout)")
        #expect(verify.stdout.contains("6 files") && verify.stdout.contains("2 damaged"), "\(verify.stdout)")
        for name in ["cut", "cut16"] {
            let d = try run(kmsfsBinary, ["decrypt", v.cipher, name], environment: v.environment)
            #expect(d.status == 1 && d.stderr.contains("/\(name)"), "\(name): \(d.stderr)")
        }
        for name in ["empty", "trunc", "grown", "hole"] {
            let d = try run(kmsfsBinary, ["decrypt", v.cipher, name], environment: v.environment)
            #expect(d.status == 0, "\(name): \(d.stderr)")
        }
        let info = try run(kmsfsBinary, ["info", v.backing("cut")])
        #expect(info.stdout.contains("warning: the backing size"), "\(info.stdout)")
    }

    @Test("Sizes and offsets past what the format can address fail with EFBIG, and the mount stays up")
    func hugeOffsets() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [1, 2, 3])
        let huge: off_t = 9_200_000_000_000_000_000
        #expect(P.errno { try syscall { truncate(v.path("f"), huge) } } == EFBIG)
        let fd = try P.open(v.path("f"), O_RDWR)
        defer { close(fd) }
        #expect(P.errno { try P.pwrite(fd, [9], Int(huge)) } == EFBIG)
        #expect(kmsfs_fallocate(fd, 0, huge, 4096) == -1 && errno == EFBIG)
        // Nothing changed, and the daemon still serves.
        #expect(try P.readFile(v.path("f")) == [1, 2, 3])
        try P.writeFile(v.path("g"), [4])
        #expect(try P.readFile(v.path("g")) == [4])
    }

    /// Runs `kmsfs mount` (in the background, as a user would) and returns its status and output.
    func mountCommand(_ v: MountedVolume, _ args: [String], mountpoint: String? = nil) throws -> CommandResult {
        try run(kmsfsBinary, ["mount"] + args + [v.cipher, mountpoint ?? v.mount], environment: v.environment)
    }

    @Test("mount fails with one clear line for a missing, wrong or broken key, a non-volume and bad options")
    func mountFailures() throws {
        let v = try MountedVolume()
        try v.unmount()
        let volume = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        let keyPath = v.configHome + "/kmsfs/keys/\(volume.volumeId).key"

        func expectFailure(_ r: CommandResult, _ fragment: String, sourceLocation: SourceLocation = #_sourceLocation) {
            #expect(r.status == 1, sourceLocation: sourceLocation)
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1, "\(r.stderr)", sourceLocation: sourceLocation)
            #expect(r.stderr.contains(fragment), "\(r.stderr)", sourceLocation: sourceLocation)
            #expect(!isKmsfsMount(v.mount), sourceLocation: sourceLocation)
        }

        try syscall { rename(keyPath, keyPath + ".away") }
        expectFailure(try mountCommand(v, []), "cannot open key file \(keyPath)")
        try syscall { rename(keyPath + ".away", keyPath) }

        let other = try TempDir()
        #expect(try run(kmsfsBinary, ["init", "--key-file", other.path + "/other.key", other.path + "/c"]).status == 0)
        expectFailure(try mountCommand(v, ["--key-file", other.path + "/other.key"]), "but this volume's files are wrapped under")

        try FileIO.writeFileAtomically(other.path + "/broken.key", contents: Array("0123\n".utf8), mode: 0o600)
        expectFailure(try mountCommand(v, ["--key-file", other.path + "/broken.key"]), "does not hold a kmsfs key")

        let empty = try TempDir()
        let r = try run(kmsfsBinary, ["mount", empty.path, v.mount], environment: v.environment)
        #expect(r.status == 1 && r.stderr.contains("is not a kmsfs volume"))

        expectFailure(try mountCommand(v, ["-o", "no_such_option"]), "invalid mount options")
        expectFailure(try mountCommand(v, [], mountpoint: v.dir.path + "/missing"), "missing")

        let configText = try FileIO.readFile(VolumeConfig.path(in: v.cipher))
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: Array("{\"formatVersion\": 1}".utf8))
        expectFailure(try mountCommand(v, []), "missing field")
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: configText)

        // In the foreground the same failure is reported the same way.
        try syscall { rename(keyPath, keyPath + ".away") }
        let fg = try mountCommand(v, ["-f"])
        #expect(fg.status == 1 && fg.stderr.contains("cannot open key file"))
        try syscall { rename(keyPath + ".away", keyPath) }

        // And with everything right it mounts, in the background, and says where it logs.
        let ok = try mountCommand(v, [])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("mounted \(v.cipher) on \(v.mount) (log: "))
        #expect(isKmsfsMount(v.mount))
        let u = try run(kmsfsBinary, ["unmount", v.mount])
        #expect(u.status == 0, "\(u.stderr)")
        #expect(!isKmsfsMount(v.mount))
    }

    @Test("A full disk gives ENOSPC and loses nothing already written")
    func fullDisk() throws {
        let disk = try SmallDisk(megabytes: 3)
        defer { withExtendedLifetime(disk) {} }  // mounted until the volume on it is stopped
        let small = disk.path

        let v = try MountedVolume(chunkSize: 4096, cipherParent: small)
        defer { v.stop() }
        var rng = SeededRandom(seed: 11)
        let keep = rng.bytes(512 * 1024)
        try P.writeFile(v.path("keep"), keep)
        // A file whose last chunk is partial: appends to it rewrite that chunk.
        let tail = rng.bytes(4096 + 100)
        try P.writeFile(v.path("tail"), tail)

        var model = [UInt8]()
        let fd = try P.open(v.path("fill"), O_WRONLY | O_CREAT)
        var failure: Int32? = nil
        for _ in 0..<200 {
            let block = rng.bytes(64 * 1024 + 123)
            // The kernel may split a write into several requests: a short count is what got in.
            let n = block.withUnsafeBytes { Glibc.pwrite(fd, $0.baseAddress, $0.count, off_t(model.count)) }
            if n < 0 {
                failure = Errno.current.code
                break
            }
            model += block[0..<n]
        }
        close(fd)
        #expect(failure == ENOSPC)
        #expect(model.count > 1024 * 1024)
        // Appending to the partial last chunk of a file on the full disk fails and leaves that chunk whole.
        let t = try P.open(v.path("tail"), O_WRONLY | O_APPEND)
        var appended = tail
        for _ in 0..<20 {
            let piece = rng.bytes(3000)
            let n = piece.withUnsafeBytes { Glibc.write(t, $0.baseAddress, $0.count) }
            if n < 0 { break }
            appended += piece[0..<n]
        }
        close(t)
        #expect(difference(try P.readFile(v.path("tail")), appended) == nil)
        // Both files are exactly what was successfully written.
        #expect(try P.stat(v.path("fill")).st_size == off_t(model.count))
        #expect(difference(try P.readFile(v.path("fill")), model) == nil)
        #expect(difference(try P.readFile(v.path("keep")), keep) == nil)
        // Overwriting in place still works on a full disk.
        let k = try P.open(v.path("keep"), O_WRONLY)
        try P.pwrite(k, [1, 2, 3], 1000)
        close(k)
        var keep2 = keep
        keep2.replaceSubrange(1000..<1003, with: [1, 2, 3])
        #expect(difference(try P.readFile(v.path("keep")), keep2) == nil)
        // Creating a file either works or fails cleanly, leaving nothing behind.
        if P.errno({ try P.writeFile(v.path("new"), rng.bytes(200_000)) }) != nil {
            if let st = try? P.stat(v.path("new")) {
                #expect(try P.readFile(v.path("new")).count == Int(st.st_size))
            }
        }
        // Space freed, writing works again, and what is on disk decrypts offline.
        try syscall { unlink(v.path("fill")) }
        try? FileManager.default.removeItem(atPath: v.path("new"))
        // The daemon gives the space back when the kernel's release and forget of the file arrive, which FUSE
        // sends asynchronously after close(2) and unlink(2) have returned.
        let freed = waitFor(seconds: 10) {
            var fs = statvfs()
            return statvfs(small, &fs) == 0 && UInt64(fs.f_bavail) * UInt64(fs.f_frsize) >= 1024 * 1024
        }
        try #require(freed, "unlinking the full file did not give its space back")
        try P.writeFile(v.path("after"), [7, 7, 7])
        try v.unmount()
        #expect(try v.offlineContents("keep") == keep2)
        #expect(try v.offlineContents("tail") == appended)
        #expect(try v.offlineContents("after") == [7, 7, 7])
    }

    @Test("With --writeback-cache a full disk is reported by fsync; what fsync confirmed is kept, and nothing else is garbage")
    func fullDiskWriteback() throws {
        let disk = try SmallDisk(megabytes: 3)
        defer { withExtendedLifetime(disk) {} }  // mounted until the volume on it is stopped
        let small = disk.path

        let v = try MountedVolume(chunkSize: 4096, mountArgs: ["--writeback-cache"], cipherParent: small)
        defer { v.stop() }
        var rng = SeededRandom(seed: 12)
        let keep = rng.bytes(512 * 1024)
        try P.writeFile(v.path("keep"), keep)

        var confirmed = [UInt8]()  // what a successful fsync covered
        var attempted = [UInt8]()  // everything write(2) accepted
        var failure: Int32? = nil
        let fd = try P.open(v.path("fill"), O_WRONLY | O_CREAT)
        for _ in 0..<200 {
            let block = rng.bytes(64 * 1024 + 123)
            let n = block.withUnsafeBytes { Glibc.pwrite(fd, $0.baseAddress, $0.count, off_t(attempted.count)) }
            if n < 0 {
                failure = Errno.current.code
                break
            }
            attempted += block[0..<n]
            if fsync(fd) != 0 {
                failure = Errno.current.code
                break
            }
            confirmed = attempted
        }
        close(fd)
        #expect(failure == ENOSPC)
        #expect(confirmed.count > 1024 * 1024)
        try v.unmount()
        // On disk: everything fsync confirmed, then at most a prefix of what it did not, and the other file whole.
        let stored = try #require(try v.offlineContents("fill"))
        #expect(stored.count >= confirmed.count && stored.count <= attempted.count)
        #expect(difference(stored, Array(attempted[0..<stored.count])) == nil)
        #expect(try v.offlineContents("keep") == keep)
    }
}

/// A 3 MiB tmpfs of its own, to fill up; unmounted when released.
final class SmallDisk {
    let dir: TempDir
    let path: String

    init(megabytes: Int) throws {
        dir = try TempDir()
        path = dir.path + "/small"
        try syscall { mkdir(path, 0o755) }
        let m = try run("mount", ["-t", "tmpfs", "-o", "size=\(megabytes)m", "tmpfs", path])
        guard m.status == 0 else { throw TestFailure("cannot mount a tmpfs: \(m.stderr)") }
    }

    deinit { _ = try? run("umount", ["-l", path]) }
}
