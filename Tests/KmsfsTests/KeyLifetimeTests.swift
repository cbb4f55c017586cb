import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Testing

@Suite("Key lifetime and secrecy")
struct KeyLifetimeTests {
    @Test("A file's key is unwrapped once for all its handles and wiped when the last one closes")
    func unwrapOncePerOpenFile() throws {
        // Without the key pool, whose refills would add audit lines of their own.
        let v = try MountedVolume(mountArgs: ["--key-pool", "0"])
        try P.writeFile(v.path("f"), Array(repeating: 1, count: 100))
        #expect(v.auditCount("GenerateDataKey", path: "/f") == 1)
        #expect(v.waitForAudit("DiscardKey", count: 1, path: "/f"))
        #expect(v.auditCount("Decrypt") == 0)   // creating needs no unwrap

        // Opening needs no key; the first read unwraps it, once for every handle.
        let a = try P.open(v.path("f"), O_RDONLY)
        let b = try P.open(v.path("f"), O_RDWR)
        #expect(v.auditCount("Decrypt") == 0)
        #expect(try P.pread(a, 1, 0) == [1])
        #expect(try P.pread(b, 1, 1) == [1])
        #expect(v.auditCount("Decrypt", path: "/f") == 1)
        // A third handle through a hard link shares the same key too.
        try syscall { link(v.path("f"), v.path("g")) }
        let c = try P.open(v.path("g"), O_RDONLY)
        #expect(try P.pread(c, 1, 2) == [1])
        #expect(v.auditCount("Decrypt") == 1)
        close(a)
        close(c)
        #expect(try P.pread(b, 1, 0) == [1])
        #expect(v.auditCount("Decrypt") == 1)
        #expect(v.auditCount("DiscardKey", path: "/f") == 1)
        close(b)
        // The last close wipes the key ...
        #expect(v.waitForAudit("DiscardKey", count: 2, path: "/f"))
        // ... so the next read unwraps again.
        let d = try P.open(v.path("f"), O_RDONLY)
        #expect(try P.pread(d, 1, 3) == [1])
        #expect(v.auditCount("Decrypt") == 2)
        close(d)
        #expect(v.waitForAudit("DiscardKey", count: 3, path: "/f"))

        // stat, ls -l and du need no key.
        let before = v.auditLines().count
        for _ in 0..<3 {
            _ = try P.stat(v.path("f"))
            _ = try FileManager.default.attributesOfItem(atPath: v.path("g"))
        }
        #expect(try run("ls", ["-l", v.mount]).status == 0)
        #expect(try run("du", ["-a", v.mount]).status == 0)
        try v.remount()
        #expect(try P.stat(v.path("f")).st_size == 100)
        #expect(v.auditLines().count == before)
    }

    @Test("touch, opening without reading or writing, and truncating to zero need no key")
    func noKeyWithoutIO() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), Array(repeating: 3, count: 5000))
        try #require(v.waitForKeysWiped("f"))
        #expect(try run("touch", [v.path("f")]).status == 0)
        close(try P.open(v.path("f"), O_RDONLY))
        close(try P.open(v.path("f"), O_WRONLY))
        #expect(try P.stat(v.path("f")).st_size == 5000)
        #expect(try run("truncate", ["-s", "0", v.path("f")]).status == 0)
        #expect(try P.stat(v.path("f")).st_size == 0)
        #expect(try P.readFile(v.path("f")) == [])
        #expect(v.auditCount("Decrypt") == 0)
        // The emptied file is a valid encrypted file: writing it unwraps its key, once.
        let fd = try P.open(v.path("f"), O_RDWR | O_APPEND)
        defer { close(fd) }
        try P.write(fd, [1, 2])
        #expect(try P.pread(fd, 2, 0) == [1, 2])
        #expect(v.auditCount("Decrypt", path: "/f") == 1)
    }

    @Test("A new file gets a fresh data key; every file has its own file ID")
    func freshKeys() throws {
        let v = try MountedVolume()
        for i in 0..<5 { try P.writeFile(v.path("f\(i)"), [UInt8(i)]) }
        let reader = try v.offlineReader()
        var fileIds = Set<String>(), blobs = Set<[UInt8]>()
        for i in 0..<5 {
            let fd = Glibc.open(v.backing("f\(i)"), O_RDONLY)
            defer { close(fd) }
            let header = try FileOpener.readHeader(fd: fd)
            fileIds.insert(Hex.encode(header.fileId))
            blobs.insert(header.wrappedKeys[0].blob)
            #expect(header.context.pairs["kmsfs:volume-id"] == reader.volume.volumeId)
        }
        #expect(fileIds.count == 5 && blobs.count == 5)
        // Each file's key was made once, for that file (made ahead by the pool or at create time).
        for id in fileIds {
            #expect(v.auditLines().filter { $0["op"] as? String == "GenerateDataKey" && $0["fileId"] as? String == id }.count == 1)
        }
    }

    @Test("A crashing daemon's report names the functions, but shows no register and no memory contents")
    func crashReportShowsNoMemory() throws {
        // The daemon crashes (a bad pointer) right after decrypting a read: the file's key and plaintext are in
        // its memory, and in registers.
        let v = try MountedVolume(mountArgs: ["--direct-io"], environment: ["KMSFS_FAILPOINT": "crash-after-read:1"])
        let secret = Array("KMSFS-CRASH-SECRET-0123456789".utf8)
        try P.writeFile(v.path("f"), secret)
        let fd = try P.open(v.path("f"), O_RDONLY)
        #expect(P.errno { try P.pread(fd, secret.count, 0) } != nil)
        close(fd)
        let daemon = try #require(v.process)
        #expect(waitFor(seconds: 60) { !daemon.isRunning })
        v.stop()
        let log = v.daemonLogText
        #expect(log.contains("Program crashed") && log.contains("Thread 0"), "\(log)")
        #expect(!log.contains("Registers:"), "\(log)")
        // A memory dump line: an address, then bytes in hex.
        let dump = log.split(separator: "\n").filter { $0.contains(/0x[0-9a-f]{16}\s+([0-9a-f]{2} ){8}/) }
        #expect(dump.isEmpty, "\(dump)")
        #expect(find(secret, in: Array(log.utf8)) == nil)
        #expect(!log.contains("Images ("), "\(log)")
    }

    @Test("No plaintext and no key material anywhere under the encrypted directory or in the logs")
    func noPlaintextOnDisk() throws {
        let v = try MountedVolume(chunkSize: 4096)
        let marker = Array("KMSFS-PLAINTEXT-MARKER-".utf8)
        var rng = SeededRandom(seed: 99)
        // Repetitive, compressible and random contents, small and large, written in different ways.
        let texts: [(String, [UInt8])] = [
            ("small.txt", marker),
            ("repeated.txt", Array((0..<2000).flatMap { _ in marker })),
            ("mixed.bin", Array((0..<50).flatMap { _ in marker + rng.bytes(300) })),
            ("zeros-and-marker", [UInt8](repeating: 0, count: 9000) + marker),
        ]
        for (name, data) in texts { try P.writeFile(v.path(name), data) }
        let fd = try P.open(v.path("appended"), O_WRONLY | O_CREAT | O_APPEND)
        for _ in 0..<100 { try P.write(fd, marker) }
        close(fd)
        try v.unmount()

        // Everything stored under CIPHERDIR, byte for byte.
        var stored = [UInt8]()
        let walker = FileManager.default.enumerator(atPath: v.cipher)!
        while let rel = walker.nextObject() as? String {
            stored += (try? P.readFile(v.cipher + "/" + rel)) ?? []
        }
        #expect(stored.count > 60_000)
        #expect(find(marker, in: stored) == nil)
        #expect(find(Array(marker[0..<12]), in: stored) == nil)

        // The master key (and the data keys it wraps) appear nowhere on disk or in the logs.
        let keyFile = String(decoding: try FileIO.readFile(v.configHome + "/kmsfs/keys/" + (try v.offlineReader().volume.volumeId) + ".key"), as: UTF8.self)
        let masterHex = String(keyFile.split(separator: "\n").first { !$0.hasPrefix("#") }!)
        let master = Hex.decode(masterHex) ?? []
        let logs = Array(v.daemonLogText.utf8) + (try P.readFile(v.auditLog))
        for haystack in [stored, logs] {
            #expect(find(Array(masterHex.utf8), in: haystack) == nil)
            #expect(find(master, in: haystack) == nil)
        }
        let reader = try v.offlineReader()
        for (name, _) in texts {
            let bfd = Glibc.open(v.backing(name), O_RDONLY)
            defer { close(bfd) }
            let header = try FileOpener.readHeader(fd: bfd)
            let dek = try reader.keys.provider.decrypt(header.wrappedKeys[0], context: header.context)
            let dekBytes = dek.withUnsafeBytes { Array($0) }
            for haystack in [stored, logs] {
                #expect(find(dekBytes, in: haystack) == nil)
                #expect(find(Array(Hex.encode(dekBytes).utf8), in: haystack) == nil)
            }
        }
    }
}

/// The first index of `needle` in `haystack`.
func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
    guard !needle.isEmpty, haystack.count >= needle.count else { return nil }
    let first = needle[0]
    var i = 0
    let last = haystack.count - needle.count
    while i <= last {
        if haystack[i] == first && Array(haystack[i..<(i + needle.count)]) == needle { return i }
        i += 1
    }
    return nil
}
