import Foundation
import Glibc
import KmsfsFormat
import KmsfsSystem
import Testing

/// A passphrase file (mode 0600) in `dir`.
private func passfile(_ dir: TempDir, _ name: String, _ text: String) throws -> String {
    let path = dir.path + "/" + name
    try P.writeFile(path, Array((text + "\n").utf8))
    try syscall { chmod(path, 0o600) }
    return path
}

/// Every backing file's path and bytes, and every directory's path: what a change of passphrase must not touch.
private func snapshot(_ root: String) throws -> [String: [UInt8]] {
    var out: [String: [UInt8]] = [:]
    let walker = FileManager.default.enumerator(atPath: root)!
    while let rel = walker.nextObject() as? String {
        var st = stat()
        guard lstat(root + "/" + rel, &st) == 0 else { continue }
        out[rel] = st.st_mode & S_IFMT == S_IFREG ? try P.readFile(root + "/" + rel) : []
    }
    return out
}

/// Runs `command` on a pseudo-terminal (script(1)), typing `input` into it.
private func onTerminal(_ command: String, input: String, environment: [String: String]) throws -> CommandResult {
    try run("script", ["-qec", command, "/dev/null"], environment: environment, input: Array(input.utf8))
}

@Suite("Passphrase-protected local key files")
struct PassphraseTests {
    @Test("init --passfile protects the new key file (scrypt, default cost); mount, decrypt and verify take the passphrase from a file, a command or the terminal; a wrong or missing one fails with one line")
    func protectedKeyFile() throws {
        let secrets = try TempDir()
        let pw = try passfile(secrets, "pw", "correct horse battery staple")
        let wrong = try passfile(secrets, "wrong", "incorrect horse")
        let v = try MountedVolume(initArgs: ["--passfile", pw], mountArgs: ["--passfile", pw])
        try P.writeFile(v.path("note"), Array("protected".utf8))
        try v.unmount()
        let volumeId = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).volumeId
        let keyFile = v.configHome + "/kmsfs/keys/\(volumeId).key"
        let text = String(decoding: try P.readFile(keyFile), as: UTF8.self)
        #expect(text.contains("\nscrypt logN=17 r=8 p=1 salt="), "\(text)")
        // No unprotected key line, and not the passphrase.
        #expect(!text.split(separator: "\n").contains { $0.count == 64 && $0.allSatisfy(\.isHexDigit) })
        #expect(!text.contains("horse"))

        // No passphrase and no terminal; a wrong one.
        let none = try run("setsid", ["-w", kmsfsBinary, "mount", v.cipher, v.mount], environment: v.environment)
        #expect(none.status != 0 && none.stderr.contains("there is no terminal to ask for it"), "\(none.stderr)")
        let bad = try run(kmsfsBinary, ["mount", "--passfile", wrong, v.cipher, v.mount], environment: v.environment)
        #expect(bad.status != 0 && bad.stderr.contains("wrong passphrase for key file \(keyFile)"), "\(bad.stderr)")
        #expect(bad.stderr.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "\n").count == 1, "\(bad.stderr)")
        if isKmsfsMount(v.mount) {
            Issue.record("mounted without the right passphrase")
            _ = try run("fusermount3", ["-u", v.mount])
        }

        // A command (a background mount: the daemon runs it).
        let cmd = try run(kmsfsBinary, ["mount", "--extpass", "cat \(pw)", v.cipher, v.mount], environment: v.environment)
        #expect(cmd.status == 0, "\(cmd.stderr)")
        #expect(try P.readFile(v.path("note")) == Array("protected".utf8))
        #expect(try run("fusermount3", ["-u", v.mount]).status == 0)
        _ = try waitFor(seconds: 5) { !isKmsfsMount(v.mount) }

        // The terminal: a background mount asks there and hands the passphrase to its daemon.
        let tty = try onTerminal("\(kmsfsBinary) mount \(v.cipher) \(v.mount)", input: "correct horse battery staple\n", environment: v.environment)
        #expect(tty.status == 0 && tty.stdout.contains("Passphrase for key file \(keyFile):"), "\(tty.stdout)\(tty.stderr)")
        #expect(try P.readFile(v.path("note")) == Array("protected".utf8))
        #expect(try run("fusermount3", ["-u", v.mount]).status == 0)
        _ = try waitFor(seconds: 5) { !isKmsfsMount(v.mount) }

        // The offline tools.
        let out = v.dir.path + "/restored"
        let decrypt = try run(kmsfsBinary, ["decrypt", "-r", "--passfile", pw, v.cipher, "/", "-o", out], environment: v.environment)
        #expect(decrypt.status == 0 && (try? P.readFile(out + "/note")) == Array("protected".utf8), "\(decrypt.stderr)")
        let verify = try run(kmsfsBinary, ["verify", "--extpass", "cat \(pw)", v.cipher], environment: v.environment)
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
        let locked = try run("setsid", ["-w", kmsfsBinary, "verify", v.cipher], environment: v.environment)
        #expect(locked.status != 0 && locked.stderr.contains("there is no terminal"), "\(locked.stderr)")
        let failing = try run(kmsfsBinary, ["verify", "--extpass", "exit 3", v.cipher], environment: v.environment)
        #expect(failing.status != 0 && failing.stderr.contains("--extpass command exited with status 3"), "\(failing.stderr)")
    }

    @Test("kmsfs passwd adds a passphrase to a plain key file, changes it and removes it, without touching any file of the volume; a wrong current passphrase changes nothing")
    func passwd() throws {
        let secrets = try TempDir()
        let one = try passfile(secrets, "one", "first passphrase")
        let two = try passfile(secrets, "two", "second passphrase")
        let v = try MountedVolume()
        try P.writeFile(v.path("data"), Array(repeating: 7, count: 10_000))
        try v.unmount()
        let volumeId = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).volumeId
        let keyFile = v.configHome + "/kmsfs/keys/\(volumeId).key"
        let keyId = String(decoding: try P.readFile(keyFile), as: UTF8.self).split(separator: "\n")[0].split(separator: " ").last.map(String.init)
        let before = try snapshot(v.cipher)

        func passwd(_ args: [String]) throws -> CommandResult {
            try run(kmsfsBinary, ["passwd"] + args + [v.cipher], environment: v.environment)
        }
        let add = try passwd(["--new-passfile", one, "--scrypt-log-n", "12"])
        #expect(add.status == 0 && add.stdout.contains("now protected"), "\(add.stderr)")
        #expect(String(decoding: try P.readFile(keyFile), as: UTF8.self).contains("scrypt logN=12 "))
        #expect(try P.stat(keyFile).st_mode & 0o777 == 0o600)
        try v.start(["--passfile", one])
        #expect(try P.readFile(v.path("data")) == Array(repeating: 7, count: 10_000))
        try v.unmount()

        let change = try passwd(["--passfile", one, "--new-passfile", two])
        #expect(change.status == 0, "\(change.stderr)")
        let protected = try P.readFile(keyFile)
        let stale = try passwd(["--passfile", one, "--new-passfile", one])
        #expect(stale.status != 0 && stale.stderr.contains("wrong passphrase"), "\(stale.stderr)")
        #expect(try P.readFile(keyFile) == protected)
        let old = try run(kmsfsBinary, ["mount", "--passfile", one, v.cipher, v.mount], environment: v.environment)
        #expect(old.status != 0 && old.stderr.contains("wrong passphrase"), "\(old.stderr)")
        if old.status == 0 { _ = try run("fusermount3", ["-u", v.mount]) }
        try v.start(["--passfile", two])
        #expect(try P.readFile(v.path("data")) == Array(repeating: 7, count: 10_000))
        try v.unmount()

        let remove = try passwd(["--passfile", two, "--remove"])
        #expect(remove.status == 0, "\(remove.stderr)")
        let plain = String(decoding: try P.readFile(keyFile), as: UTF8.self)
        #expect(!plain.contains("scrypt") && plain.split(separator: "\n").contains { $0.count == 64 })
        #expect(plain.split(separator: "\n")[0].split(separator: " ").last.map(String.init) == keyId)
        try v.start()
        #expect(try P.readFile(v.path("data")) == Array(repeating: 7, count: 10_000))
        try v.unmount()
        // Not one byte of the volume changed, nor was anything added or removed; no temporary key file is left.
        #expect(try snapshot(v.cipher) == before)
        let keys = try FileManager.default.contentsOfDirectory(atPath: v.configHome + "/kmsfs/keys")
        #expect(keys == ["\(volumeId).key"], "\(keys)")
        // The cost is bounded: N = 2^20 with r = 8 needs over 1 GiB.
        let costly = try passwd(["--new-passfile", one, "--scrypt-log-n", "20"])
        #expect(costly.status != 0 && costly.stderr.contains("from 10 to 19"), "\(costly.stderr)")
    }

    @Test("rewrap to a new key file keeps the protection under the passphrase that opened the current one (asked once)")
    func rewrapKeepsProtection() throws {
        let secrets = try TempDir()
        let pw = try passfile(secrets, "pw", "rotation passphrase")
        let v = try MountedVolume(initArgs: ["--passfile", pw, "--scrypt-log-n", "12"], mountArgs: ["--passfile", pw])
        try P.writeFile(v.path("kept"), Array("across the rotation".utf8))
        try v.unmount()
        let newKey = v.dir.path + "/rotated.key"
        let rewrap = try run(kmsfsBinary, ["rewrap", "--key-file", newKey, "--passfile", pw, v.cipher], environment: v.environment)
        #expect(rewrap.status == 0, "\(rewrap.stderr)")
        #expect(String(decoding: try P.readFile(newKey), as: UTF8.self).contains("\nscrypt logN=17 r=8 p=1 salt="))
        try v.start(["--passfile", pw])
        #expect(try P.readFile(v.path("kept")) == Array("across the rotation".utf8))
        try v.unmount()
        let locked = try run("setsid", ["-w", kmsfsBinary, "verify", v.cipher], environment: v.environment)
        #expect(locked.status != 0 && locked.stderr.contains("there is no terminal"), "\(locked.stderr)")
    }

    @Test("init --passphrase asks twice on a terminal: two different answers create nothing, two equal ones protect the key")
    func askedTwice() throws {
        let d = try TempDir()
        let env = ["KMSFS_KNOWN_VOLUMES": d.path + "/known"]
        let key = d.path + "/key", cipher = d.path + "/cipher"
        let differ = try onTerminal("\(kmsfsBinary) init --passphrase --scrypt-log-n 12 --key-file \(key) \(cipher)", input: "one thing\nanother\n", environment: env)
        #expect(differ.status != 0 && differ.stdout.contains("the two passphrases differ"), "\(differ.stdout)")
        #expect(access(key, F_OK) != 0)
        let same = try onTerminal("\(kmsfsBinary) init --passphrase --scrypt-log-n 12 --key-file \(key) \(cipher)", input: "same words\nsame words\n", environment: env)
        #expect(same.status == 0 && same.stdout.contains("Repeat the new passphrase"), "\(same.stdout)")
        #expect(String(decoding: try P.readFile(key), as: UTF8.self).contains("scrypt logN=12 r=8 p=1"))
        let pw = try passfile(d, "pw", "same words")
        let check = try run(kmsfsBinary, ["verify", "--key-file", key, "--passfile", pw, cipher], environment: env)
        #expect(check.status == 0, "\(check.stderr)")
    }
}
