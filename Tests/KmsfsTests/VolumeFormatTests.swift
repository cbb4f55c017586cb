import Foundation
import Glibc
import KmsfsFormat
import KmsfsSystem
import Testing

@Suite("Volume formats: a uniform header length, and format 1")
struct VolumeFormatTests {
    @Test("Listing a directory, with or without attributes, reads no file header and calls no key service")
    func listingReadsNoHeader() throws {
        let v = try MountedVolume(mountArgs: ["--debug"])
        try syscall { mkdir(v.path("d"), 0o755) }
        for i in 0..<200 { try P.writeFile(v.path("d/f\(i)"), Array(repeating: UInt8(i & 0xff), count: i * 37)) }
        try v.remount()
        let audit = v.auditLines().count
        let listed = try run("ls", ["-l", v.path("d")]).stdout
        #expect(try run("ls", [v.path("d")]).status == 0)
        #expect(try run("ls", ["-lR", v.mount]).status == 0)
        // The sizes listed are the plaintext sizes, found without reading a header (the daemon logs every such
        // read at debug level) or calling the key service.
        #expect(listed.contains(" \(150 * 37) "))
        #expect(try P.stat(v.path("d/f199")).st_size == 199 * 37)
        #expect(!v.daemonLogText.contains("reading the header prefix"))
        #expect(v.auditLines().count == audit)
        // In a volume whose header lengths differ, sizes do come from the headers (the same log line shows it).
        try v.unmount()
        try v.rewriteConfig { $0.headerLength = nil }
        try v.start(["--debug"])
        #expect(try P.stat(v.path("d/f199")).st_size == 199 * 37)
        #expect(v.daemonLogText.contains("reading the header prefix"))
    }

    @Test("A format 1 volume, whose files each have their own header length, still mounts, reads and grows")
    func formatOneVolume() throws {
        let v = try MountedVolume(initArgs: ["--format-version", "2"])
        var rng = SeededRandom(seed: 21)
        let data = rng.bytes(3 * 4096 + 99)
        try P.writeFile(v.path("old"), data)
        try v.unmount()
        // What the previous release wrote: format version 1, no uniform header length.
        var config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        config.formatVersion = 1
        config.headerLength = nil
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try config.encoded())
        try v.start()
        #expect(try P.stat(v.path("old")).st_size == off_t(data.count))
        #expect(try P.readFile(v.path("old")) == data)
        try P.writeFile(v.path("new"), [1, 2, 3])
        // A user's file named like a directory ID file is an ordinary (encrypted) file here, not a sign of a
        // downgraded format 3 volume.
        try P.writeFile(v.path("kmsfs.dirid"), Array(repeating: 7, count: 62))
        let a = try P.open(v.path("old"), O_WRONLY | O_APPEND)
        try P.write(a, [4, 5])
        close(a)
        try v.remount()
        #expect(try P.readFile(v.path("old")) == data + [4, 5])
        #expect(try P.readFile(v.path("new")) == [1, 2, 3])
        #expect(try P.readFile(v.path("kmsfs.dirid")) == Array(repeating: 7, count: 62))
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount).sorted() == ["kmsfs.dirid", "new", "old"])
        #expect(try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).formatVersion == 1)
    }

    @Test("A new file whose header does not fit the uniform length gets a longer one, and the volume says its lengths now differ")
    func headerLongerThanUniform() throws {
        // A volume whose config promises 512-byte headers, with a context too long for them.
        let long = String(repeating: "x", count: 700)
        let v = try MountedVolume(initArgs: ["--context", "note=\(long)"])
        try v.unmount()
        #expect(try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).headerLength == 1024)
        try v.rewriteConfig { $0.headerLength = 512 }
        try v.start()
        try P.writeFile(v.path("f"), Array("longer header".utf8))
        #expect(try P.readFile(v.path("f")) == Array("longer header".utf8))
        #expect(try P.stat(v.path("f")).st_size == 13)
        #expect(v.daemonLogText.contains("more than the volume's uniform 512"))
        let changed = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        #expect(changed.headerLength == nil)
        // The mount authenticated the config it changed.
        #expect(throws: Never.self) { try changed.checkAuthenticity(with: try v.volumeKeys()) }
        try v.remount()
        #expect(try P.stat(v.path("f")).st_size == 13)
        #expect(try P.readFile(v.path("f")) == Array("longer header".utf8))
    }
}
