import Foundation
import Glibc
import KmsfsSystem
import Testing

@Suite("Scale: no file-count ceiling")
struct ScaleTests {
    @Test("With the daemon's open-file limit at 64, thousands of files in many directories and a deep path are created, listed, stat'ed, read and removed")
    func manyFilesFewDescriptors() throws {
        let v = try MountedVolume(openFileLimit: 64)
        let dirs = 30, perDir = 100
        var deep = v.mount
        for i in 0..<40 {
            deep += "/level\(i)"
            try syscall { mkdir(deep, 0o755) }
        }
        try P.writeFile(deep + "/bottom", Array("deep".utf8))
        for d in 0..<dirs {
            try syscall { mkdir(v.path("d\(d)"), 0o755) }
            for f in 0..<perDir { try P.writeFile(v.path("d\(d)/f\(f)"), Array("\(d)/\(f)".utf8)) }
        }
        // Hard links across directories still share one inode and one size.
        try syscall { link(v.path("d0/f0"), v.path("d29/link")) }
        try P.writeFile(v.path("d29/link"), Array("changed through the link".utf8))
        #expect(try P.stat(v.path("d0/f0")).st_ino == (try P.stat(v.path("d29/link")).st_ino))
        #expect(try P.readFile(v.path("d0/f0")) == Array("changed through the link".utf8))

        // A fresh mount: the kernel knows nothing, so every lookup reaches the daemon again.
        try v.remount()
        var listed = 0
        for d in 0..<dirs { listed += try FileManager.default.contentsOfDirectory(atPath: v.path("d\(d)")).count }
        #expect(listed == dirs * perDir + 1)
        for d in 0..<dirs {
            for f in 0..<perDir {
                let expected = d == 0 && f == 0 ? Array("changed through the link".utf8) : Array("\(d)/\(f)".utf8)
                #expect(try P.stat(v.path("d\(d)/f\(f)")).st_size == off_t(expected.count))
                #expect(try P.readFile(v.path("d\(d)/f\(f)")) == expected)
            }
        }
        #expect(try P.readFile(deep + "/bottom") == Array("deep".utf8))
        // Renaming a directory high up keeps everything below it reachable.
        try syscall { rename(v.path("level0"), v.path("moved")) }
        #expect(try P.readFile(deep.replacingOccurrences(of: v.mount + "/level0", with: v.mount + "/moved") + "/bottom") == Array("deep".utf8))
        #expect(try run("rm", ["-rf", v.path("moved")] + (0..<dirs).map { v.path("d\($0)") }).status == 0)
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount) == [])
        #expect(!v.daemonLogText.contains("Too many open files"))
    }

    @Test("Past --max-inodes the daemon asks the kernel to forget entries not used lately; open files, links and renames keep working")
    func boundedInodeTable() throws {
        let v = try MountedVolume(mountArgs: ["--max-inodes", "64", "--debug"])
        try P.writeFile(v.path("held"), Array("held open".utf8))
        let held = try P.open(v.path("held"), O_RDWR)
        defer { close(held) }
        for d in 0..<5 {
            try syscall { mkdir(v.path("d\(d)"), 0o755) }
            for f in 0..<100 { try P.writeFile(v.path("d\(d)/f\(f)"), Array("\(d)/\(f)".utf8)) }
        }
        try syscall { link(v.path("d0/f0"), v.path("d4/link")) }
        #expect(waitFor(seconds: 10) { v.daemonLogText.contains("asked the kernel to forget") })
        // Everything is still there, through whatever name.
        try syscall { rename(v.path("d1"), v.path("renamed")) }
        for d in 0..<5 {
            for f in 0..<100 {
                let dir = d == 1 ? "renamed" : "d\(d)"
                #expect(try P.readFile(v.path("\(dir)/f\(f)")) == Array("\(d)/\(f)".utf8))
            }
        }
        try P.writeFile(v.path("d4/link"), Array("through the link".utf8))
        #expect(try P.readFile(v.path("d0/f0")) == Array("through the link".utf8))
        #expect(try P.stat(v.path("d0/f0")).st_ino == (try P.stat(v.path("d4/link")).st_ino))
        // The file held open the whole time kept its inode, key and contents.
        try P.pwrite(held, Array(" and written".utf8), 9)
        #expect(try P.pread(held, 21, 0) == Array("held open and written".utf8))
        #expect(try P.readFile(v.path("held")) == Array("held open and written".utf8))
    }
}
