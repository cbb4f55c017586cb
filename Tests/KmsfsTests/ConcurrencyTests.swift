import Foundation
import Glibc
import KmsfsSystem
import Synchronization
import Testing

@Suite("Concurrent access")
struct ConcurrencyTests {
    @Test("Threads and processes writing disjoint bytes of the same chunks lose no update", arguments: [false, true])
    func sharedChunks(directIO: Bool) throws {
        let v = try MountedVolume(chunkSize: 4096, mountArgs: directIO ? ["--direct-io"] : [])
        let chunks = 8
        let size = chunks * 4096
        try P.writeFile(v.path("shared"), [UInt8](repeating: 0, count: size))
        let path = v.path("shared")
        // Worker k owns bytes [k*512, (k+1)*512) of every chunk; workers 0...5 are threads, 6 and 7 processes.
        let failures = Mutex<[String]>([])
        let expected = Mutex<[[UInt8]]>(Array(repeating: [UInt8](repeating: 0, count: size), count: 8))
        let readersDone = Atomic<Bool>(false)

        // Two reader threads keep reading the whole file: never an error, never a wrong size.
        let readers = DispatchGroup()
        for _ in 0..<2 {
            DispatchQueue.global().async(group: readers) {
                guard let fd = try? P.open(path, O_RDONLY) else { return }
                defer { close(fd) }
                while !readersDone.load(ordering: .relaxed) {
                    do {
                        let data = try P.pread(fd, size, 0)
                        if data.count != size { failures.withLock { $0.append("reader saw \(data.count) bytes") } }
                    } catch {
                        failures.withLock { $0.append("reader: \(error)") }
                        return
                    }
                }
            }
        }

        // Two other processes write their own regions through their own descriptors.
        var processes: [Process] = []
        for k in 6..<8 {
            let script = """
                import os, random
                random.seed(\(k))
                fd = os.open(\(String(reflecting: path)), os.O_WRONLY)
                for _ in range(150):
                    c = random.randrange(\(chunks)); o = random.randrange(512 - 40); n = random.randrange(1, 40)
                    os.pwrite(fd, bytes([\(k) * 16 + 1]) * n, c * 4096 + \(k) * 512 + o)
                os.close(fd)
                """
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["python3", "-c", script]
            try p.run()
            processes.append(p)
        }

        DispatchQueue.concurrentPerform(iterations: 6) { k in
            var rng = SeededRandom(seed: UInt64(k) + 100)
            guard let fd = try? P.open(path, O_WRONLY) else {
                failures.withLock { $0.append("open failed") }
                return
            }
            defer { close(fd) }
            var mine = [UInt8](repeating: 0, count: size)
            for _ in 0..<300 {
                let c = Int.random(in: 0..<chunks, using: &rng)
                let o = Int.random(in: 0..<(512 - 40), using: &rng)
                let n = Int.random(in: 1...40, using: &rng)
                let at = c * 4096 + k * 512 + o
                let data = rng.bytes(n)
                do {
                    try P.pwrite(fd, data, at)
                } catch {
                    failures.withLock { $0.append("writer \(k): \(error)") }
                    return
                }
                mine.replaceSubrange(at..<(at + n), with: data)
            }
            let final = mine
            expected.withLock { $0[k] = final }
        }
        for p in processes { p.waitUntilExit(); #expect(p.terminationStatus == 0) }
        readersDone.store(true, ordering: .relaxed)
        readers.wait()

        #expect(failures.withLock { $0 } == [])
        let content = try P.readFile(path)
        #expect(content.count == size)
        let wanted = expected.withLock { $0 }
        for c in 0..<chunks {
            for k in 0..<6 {
                let range = (c * 4096 + k * 512)..<(c * 4096 + (k + 1) * 512)
                #expect(Array(content[range]) == Array(wanted[k][range]), "chunk \(c), thread \(k)")
            }
            for k in 6..<8 {
                let region = content[(c * 4096 + k * 512)..<(c * 4096 + (k + 1) * 512)]
                #expect(region.allSatisfy { $0 == 0 || $0 == UInt8(k * 16 + 1) }, "chunk \(c), process \(k)")
            }
        }
        #expect(content.contains(UInt8(6 * 16 + 1)) && content.contains(UInt8(7 * 16 + 1)))
        try v.unmount()
        #expect(try v.offlineContents("shared") == content)
    }

    @Test("Many files opened, written, read and closed in parallel keep their own keys and contents")
    func manyFiles() throws {
        let v = try MountedVolume(chunkSize: 4096)
        let failures = Mutex<[String]>([])
        let mount = v.mount
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            var rng = SeededRandom(seed: UInt64(t))
            for round in 0..<25 {
                let name = mount + "/t\(t)-\(round % 5)"
                let data = rng.bytes(Int.random(in: 0...20000, using: &rng))
                do {
                    try P.writeFile(name, data)
                    let back = try P.readFile(name)
                    if back != data { failures.withLock { $0.append("\(name) differs") } }
                } catch {
                    failures.withLock { $0.append("\(name): \(error)") }
                }
            }
        }
        #expect(failures.withLock { $0 } == [])
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount).count == 40)
        // Every handle was released: every key that was unwrapped or generated was also wiped.
        #expect(waitFor { v.fileKeysWiped >= v.fileKeysLoaded && v.fileKeysLoaded >= 40 })
    }

    @Test("With allow_other, other users are held to the file permissions, own what they create, and their writes clear set-user-ID bits")
    func allowOther() throws {
        let v = try MountedVolume(mountArgs: ["-o", "allow_other"])
        try syscall { chmod(v.dir.path, 0o755) }
        try syscall { chmod(v.mount, 0o755) }
        try syscall { mkdir(v.path("pub"), 0o777) }
        try syscall { chmod(v.path("pub"), 0o777) }
        try P.writeFile(v.path("secret"), Array("root only".utf8), mode: 0o600)
        try syscall { chmod(v.path("secret"), 0o600) }
        try P.writeFile(v.path("public"), Array("everyone".utf8), mode: 0o644)
        try syscall { chmod(v.path("public"), 0o644) }

        func asNobody(_ command: String) throws -> CommandResult {
            try run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", command])
        }
        let denied = try asNobody("cat \(v.path("secret"))")
        #expect(denied.status != 0 && denied.stderr.contains("Permission denied"))
        #expect(try asNobody("cat \(v.path("public"))").stdout == "everyone")
        #expect(try asNobody("echo mine > \(v.path("public"))").status != 0)
        #expect(try asNobody("echo mine > \(v.path("pub/mine")) && mkdir \(v.path("pub/dir"))").status == 0)
        let st = try P.stat(v.path("pub/mine"))
        #expect(st.st_uid == 65534 && st.st_gid == 65534)
        #expect(try P.stat(v.backing("pub/mine")).st_uid == 65534)
        #expect(try P.stat(v.path("pub/dir")).st_uid == 65534)
        #expect(try P.readFile(v.path("pub/mine")) == Array("mine\n".utf8))

        // Set-user-ID and set-group-ID bits: root's writes keep them; another user's write or truncation clears
        // them, as on any filesystem (kmsfs lets the backing filesystem do it for that user).
        try P.writeFile(v.path("pub/setuid"), Array("#!/bin/sh\n".utf8))
        try syscall { chmod(v.path("pub/setuid"), 0o6777) }
        try P.writeFile(v.path("pub/setuid"), Array("#!/bin/sh\necho root\n".utf8))
        #expect(try P.stat(v.path("pub/setuid")).st_mode & 0o7777 == 0o6777)
        #expect(try asNobody("echo changed >> \(v.path("pub/setuid"))").status == 0)
        #expect(try P.stat(v.path("pub/setuid")).st_mode & 0o7777 == 0o0777)
        #expect(try P.stat(v.backing("pub/setuid")).st_mode & 0o7777 == 0o0777)
        try syscall { chmod(v.path("pub/setuid"), 0o4777) }
        #expect(try asNobody("truncate -s 3 \(v.path("pub/setuid"))").status == 0)
        #expect(try P.stat(v.path("pub/setuid")).st_mode & 0o7777 == 0o0777)
        #expect(try P.readFile(v.path("pub/setuid")) == Array("#!/".utf8))
        // Without allow_other other users see nothing at all.
        try v.unmount()
        try v.start()
        #expect(try asNobody("ls \(v.mount)").status != 0)
    }
}
