import CSystem
import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem
import Testing

/// `Tests/Decryptor/kmsfs_decrypt.py`: a second decryptor, written in Python from kmsfs-format(5) alone (never
/// from kmsfs's sources). It must read back exactly what the mount wrote, names, links and attributes included,
/// in every format, and refuse what was tampered with.
@Suite("An independent decryptor written from the format page", .serialized)
struct IndependentDecryptorTests {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Decryptor/kmsfs_decrypt.py").path

    static let variants: [[String]] = [[], ["--plaintext-names"], ["--format-version", "2"], ["--format-version", "1"]]

    @Test("It decrypts names, symbolic links, extended attributes and contents of every format, and refuses a changed chunk or an emptied file",
          arguments: variants)
    func decryptsWhatTheMountWrote(initArgs: [String]) throws {
        let v = try MountedVolume(chunkSize: 4096, initArgs: initArgs)
        let expected: [String]
        do {
            try populate(v, anyBytes: initArgs.isEmpty)
            expected = try manifest(of: v.mount)
        } catch {
            // An error from the mount: the daemon's log says why.
            Issue.record("\(error); daemon log:\n\(v.daemonLogText.suffix(3000))")
            return
        }
        try v.unmount()
        #expect(expected.count > 20)

        let volumeId = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).volumeId
        let keyFile = v.configHome + "/kmsfs/keys/\(volumeId).key"
        let python = ProcessInfo.processInfo.environment["KMSFS_TEST_PYTHON"] ?? "python3"
        let r = try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile], environment: v.environment)
        #expect(r.status == 0, "\(r.stderr)")
        if r.status != 0 { return }
        let got = try r.stdout.split(separator: "\n").map { try canonical(String($0)) }
        #expect(got == expected, "\(Set(got).symmetricDifference(Set(expected)).sorted())")

        // A flipped byte in a chunk, then (format 3) a file cut to its header: refused, one line each.
        let big = try offline(v, "dir/sub/three-chunks")
        let header = try FileHeader(decoding: try P.readFile(big))
        try flipByte(big, at: header.headerLength + 4096 + 28 + 100)
        let bad = try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile], environment: v.environment)
        #expect(bad.status == 1 && bad.stdout.isEmpty, "\(bad.stdout)")
        #expect(bad.stderr.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "\n").count == 1, "\(bad.stderr)")
        try flipByte(big, at: header.headerLength + 4096 + 28 + 100)
        #expect(try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile], environment: v.environment).status == 0)
        if initArgs.isEmpty {
            // Two files' backing names exchanged (name binding), the same for two symbolic links (their targets
            // are sealed for their names), then a file cut to its header (empty-file marker).
            for (x, y) in [("chunk", "chunk+1"), ("long-link", "rel-link")] {
                let a = try offline(v, x), b = try offline(v, y)
                try syscall { rename(a, a + ".swap") }
                try syscall { rename(b, a) }
                try syscall { rename(a + ".swap", b) }
                let swapped = try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile], environment: v.environment)
                #expect(swapped.status == 1 && swapped.stdout.isEmpty, "\(x) \(swapped.stdout)")
                try syscall { rename(a, a + ".swap") }
                try syscall { rename(b, a) }
                try syscall { rename(a + ".swap", b) }
                #expect(try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile], environment: v.environment).status == 0)
            }
            // The key file protected by a passphrase (kmsfs passwd): read with it, refused without it.
            let pw = v.dir.path + "/pw"
            try P.writeFile(pw, Array("a passphrase\n".utf8))
            let passwd = try run(kmsfsBinary, ["passwd", "--new-passfile", pw, "--scrypt-log-n", "12", v.cipher], environment: v.environment)
            #expect(passwd.status == 0, "\(passwd.stderr)")
            let locked = try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile], environment: v.environment)
            #expect(locked.status == 1 && locked.stderr.contains("protected by a passphrase"), "\(locked.stderr)")
            let unlocked = try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile, "--passfile", pw], environment: v.environment)
            #expect(unlocked.status == 0, "\(unlocked.stderr)")
            let one = try offline(v, "one")
            try syscall { truncate(one, off_t(header.headerLength)) }
            let emptied = try run(python, [IndependentDecryptorTests.script, v.cipher, "--key-file", keyFile, "--passfile", pw], environment: v.environment)
            #expect(emptied.status == 1 && emptied.stderr.contains("empty"), "\(emptied.stdout)\(emptied.stderr)")
        }
    }

    /// The backing path of a plaintext path.
    private func offline(_ v: MountedVolume, _ path: String) throws -> String {
        let rel = try v.offlineNames().backingPath(of: path)
        return v.cipher + "/" + rel
    }

    /// A tree with what a decryptor has to get right.
    private func populate(_ v: MountedVolume, anyBytes: Bool) throws {
        var rng = SeededRandom(seed: 77)
        try syscall { mkdir(v.path("dir"), 0o755) }
        try syscall { mkdir(v.path("dir/sub"), 0o700) }
        try P.writeFile(v.path("empty"), [])
        try P.writeFile(v.path("one"), [42])
        try P.writeFile(v.path("chunk"), rng.bytes(4096))
        try P.writeFile(v.path("chunk+1"), rng.bytes(4097))
        try P.writeFile(v.path("dir/sub/three-chunks"), rng.bytes(3 * 4096 + 5))
        try P.writeFile(v.path("emptied"), rng.bytes(9000))
        try syscall { truncate(v.path("emptied"), 0) }
        let s = try P.open(v.path("sparse"), O_WRONLY | O_CREAT)
        try P.pwrite(s, [1, 2, 3], 5 * 4096 + 7)
        close(s)
        try P.writeFile(v.path("grown"), [])
        let g = try P.open(v.path("grown"), O_WRONLY)
        try P.pwrite(g, [9, 9], 9000)
        close(g)
        try P.writeFile(v.path("shrunk"), rng.bytes(10_000))
        try syscall { truncate(v.path("shrunk"), 4100) }
        // Names: 255 bytes, every byte from 1 to 255 but '/', not UTF-8.
        let long = [UInt8](repeating: UInt8(ascii: "n"), count: 255)
        try writeBytes(Array(v.mount.utf8) + [UInt8(ascii: "/")] + long, [5])
        // Names that are not UTF-8 only where names are encrypted (plaintext names must be UTF-8).
        if anyBytes {
            let odd = (1...255).map(UInt8.init).filter { $0 != UInt8(ascii: "/") && $0 != UInt8(ascii: ".") }
            try writeBytes(Array(v.mount.utf8) + Array("/dir/".utf8) + Array(odd.prefix(200)), [6])
            try writeBytes(Array(v.mount.utf8) + Array("/dir/".utf8) + [0xff, 0xfe, 0x80], [7])
        } else {
            try writeBytes(Array(v.mount.utf8) + Array("/dir/".utf8) + Array("naïve-ünïcödé-名前".utf8), [6])
        }
        for i in 0..<12 { try P.writeFile(v.path("dir/many-\(i)"), [UInt8(i)]) }
        try syscall { mkdir(v.path("before"), 0o755) }
        try P.writeFile(v.path("before/child"), [8])
        try syscall { rename(v.path("before"), v.path("dir/after")) }
        // Links: symbolic (long target, relative, dangling), hard across directories; a FIFO.
        try syscall { symlink(String(repeating: "t", count: 3000), v.path("long-link")) }
        try syscall { symlink("dir/sub/three-chunks", v.path("rel-link")) }
        try syscall { link(v.path("one"), v.path("dir/sub/hard-one")) }
        try syscall { mkfifo(v.path("fifo"), 0o644) }
        // Extended attributes on a file and a directory.
        for (path, name, value) in [("one", "user.colour", Array("blue".utf8)), ("dir", "user.note", rng.bytes(300)),
                                    ("chunk", "user.empty", [UInt8]())] {
            let r = value.withUnsafeBytes { setxattr(v.path(path), name, $0.baseAddress, value.count, 0) }
            if r != 0 { throw TestFailure("setxattr \(path) \(name): \(Errno.current)") }
        }
    }

    private func writeBytes(_ path: [UInt8], _ data: [UInt8]) throws {
        let c = (path + [0]).map { CChar(bitPattern: $0) }
        let fd = try syscall { Glibc.open(c, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
        defer { close(fd) }
        try P.pwrite(fd, data, 0)
    }

    /// The manifest the decryptor prints, built from the mounted tree, as canonical lines.
    private func manifest(of root: String) throws -> [String] {
        var lines: [String] = []
        func walk(_ dir: [UInt8], _ rel: [UInt8]) throws {
            let c = (dir + [0]).map { CChar(bitPattern: $0) }
            guard let d = opendir(c) else { throw Errno.current }
            var names: [[UInt8]] = []
            while let e = readdir(d) {
                let name = DirectoryEntry.nameBytes(e)
                if name != [46] && name != [46, 46] { names.append(name) }
            }
            closedir(d)
            for name in names {
                let path = dir + [47] + name
                let relPath = rel.isEmpty ? name : rel + [47] + name
                let cp = (path + [0]).map { CChar(bitPattern: $0) }
                var st = stat()
                try syscall { lstat(cp, &st) }
                var entry: [String: String] = ["path": Hex.encode(relPath)]
                switch st.st_mode & S_IFMT {
                case S_IFREG:
                    let data = try readBytes(cp)
                    entry["type"] = "file"
                    entry["size"] = String(data.count)
                    entry["sha256"] = Hex.encode(Digest.sha256(data))
                    entry["xattrs"] = try xattrs(cp)
                case S_IFDIR:
                    entry["type"] = "dir"
                    entry["xattrs"] = try xattrs(cp)
                    try walk(path, relPath)
                case S_IFLNK:
                    var buf = [CChar](repeating: 0, count: 8192)
                    let n = readlink(cp, &buf, buf.count)
                    entry["type"] = "symlink"
                    entry["target"] = Hex.encode(buf[0..<max(n, 0)].map { UInt8(bitPattern: $0) })
                default:
                    entry["type"] = "other"
                }
                lines.append(entry.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
            }
        }
        try walk(Array(root.utf8), [])
        return lines.sorted()
    }

    /// Reads a whole file whose name may not be UTF-8.
    private func readBytes(_ path: [CChar]) throws -> [UInt8] {
        let fd = try syscall { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 { throw Errno.current }
            if n == 0 { return out }
            out += buf[0..<n]
        }
    }

    private func xattrs(_ path: [CChar]) throws -> String {
        var names = [CChar](repeating: 0, count: 65536)
        let n = llistxattr(path, &names, names.count)
        if n < 0 { throw Errno.current }
        var pairs: [String] = []
        for raw in names[0..<n].split(separator: 0) {
            let name = Array(raw).map { UInt8(bitPattern: $0) }
            guard name.starts(with: Array("user.".utf8)) || name.starts(with: Array("trusted.".utf8)) else { continue }
            var value = [UInt8](repeating: 0, count: 65536)
            let m = lgetxattr(path, Array(raw) + [0], &value, value.count)
            if m < 0 { throw Errno.current }
            pairs.append("\(Hex.encode(name)):\(Hex.encode(Array(value[0..<m])))")
        }
        return pairs.sorted().joined(separator: ",")
    }

    /// One line of the decryptor's manifest, in the same canonical form.
    private func canonical(_ line: String) throws -> String {
        guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            throw TestFailure("not a JSON object: \(line)")
        }
        var entry: [String: String] = [:]
        for (k, value) in object {
            switch value {
            case let s as String: entry[k] = s
            case let n as NSNumber: entry[k] = n.stringValue
            case let d as [String: String]: entry[k] = d.map { "\($0.key):\($0.value)" }.sorted().joined(separator: ",")
            default: throw TestFailure("unexpected field \(k) in \(line)")
            }
        }
        return entry.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
    }
}
