import Foundation
import Glibc
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Testing

@Suite("Command line")
struct CLITests {
    @Test("init creates missing parent directories; a key file other users can read is refused at mount unless --allow-open-key-file")
    func keyFileModeAndParents() throws {
        let dir = try TempDir()
        let env = ["XDG_CONFIG_HOME": dir.path + "/cfg", "XDG_STATE_HOME": dir.path + "/state"]
        let cipher = dir.path + "/deep/er/cipher", mnt = dir.path + "/mnt"
        let made = try run(kmsfsBinary, ["init", cipher], environment: env)
        #expect(made.status == 0, "\(made.stderr)")
        try syscall { mkdir(mnt, 0o755) }
        let keys = try FileManager.default.contentsOfDirectory(atPath: dir.path + "/cfg/kmsfs/keys")
        let key = dir.path + "/cfg/kmsfs/keys/" + keys[0]
        try syscall { chmod(key, 0o644) }
        let refused = try run(kmsfsBinary, ["mount", cipher, mnt], environment: env)
        #expect(refused.status == 1 && refused.stderr.contains("is open to other users (mode 644): chmod 600 it"), "\(refused.stderr)")
        let allowed = try run(kmsfsBinary, ["mount", "--allow-open-key-file", cipher, mnt], environment: env)
        #expect(allowed.status == 0, "\(allowed.stderr)")
        #expect(try run(kmsfsBinary, ["unmount", mnt], environment: env).status == 0)
    }

    @Test("init creates the config and a 0600 key file, says where it is, and refuses to overwrite anything")
    func initVolume() throws {
        let dir = try TempDir()
        let env = ["XDG_CONFIG_HOME": dir.path + "/cfg"]
        let r = try run(kmsfsBinary, ["init", "--context", "team=storage", "--context", "env=test", dir.path + "/vol"], environment: env)
        #expect(r.status == 0, "\(r.stderr)")
        let config = try VolumeConfig.decode(try FileIO.readFile(dir.path + "/vol/kmsfs.conf"))
        #expect(config.keyProvider.type == "local" && config.keyProvider.keyFile == nil)
        #expect(config.encryptionContext == ["team": "storage", "env": "test"])
        #expect(config.chunkSize == 4096)
        // Format 2: one header length for every file, enough for the context and the key.
        #expect(config.formatVersion == 3 && config.headerLength == 512 && config.encryptsNames)
        let keyPath = dir.path + "/cfg/kmsfs/keys/\(config.volumeId).key"
        #expect(r.stdout.contains(keyPath) && r.stdout.contains("Back this key file up"))
        var st = stat()
        #expect(stat(keyPath, &st) == 0 && st.st_mode & 0o777 == 0o600)
        #expect(stat(dir.path + "/cfg/kmsfs/keys", &st) == 0 && st.st_mode & 0o777 == 0o700)
        // The config holds no secret: not the key, not its hex.
        let keyHex = String(String(decoding: try FileIO.readFile(keyPath), as: UTF8.self).split(separator: "\n").last!)
        #expect(!String(decoding: try FileIO.readFile(dir.path + "/vol/kmsfs.conf"), as: UTF8.self).contains(keyHex))

        let again = try run(kmsfsBinary, ["init", dir.path + "/vol"], environment: env)
        #expect(again.status != 0 && again.stderr.contains("already holds a kmsfs volume"))
        try syscall { mkdir(dir.path + "/full", 0o755) }
        try P.writeFile(dir.path + "/full/x", [1])
        let full = try run(kmsfsBinary, ["init", dir.path + "/full"], environment: env)
        #expect(full.status != 0 && full.stderr.contains("is not empty"))
        let badContext = try run(kmsfsBinary, ["init", "--context", "kmsfs:volume-id=x", dir.path + "/c1"], environment: env)
        #expect(badContext.status != 0 && badContext.stderr.contains("reserved"))
        let badChunk = try run(kmsfsBinary, ["init", "--chunk-size", "5000", dir.path + "/c2"], environment: env)
        #expect(badChunk.status != 0 && badChunk.stderr.contains("power of two"))

        // --key-file: created if missing, reused (and recorded in the config) if present.
        let k = try run(kmsfsBinary, ["init", "--key-file", dir.path + "/shared.key", dir.path + "/v2"], environment: env)
        #expect(k.status == 0 && k.stdout.contains("New master key: \(dir.path)/shared.key"))
        let k2 = try run(kmsfsBinary, ["init", "--key-file", dir.path + "/shared.key", dir.path + "/v3"], environment: env)
        #expect(k2.status == 0 && k2.stdout.contains("Master key: \(dir.path)/shared.key"))
        let c2 = try VolumeConfig.decode(try FileIO.readFile(dir.path + "/v2/kmsfs.conf"))
        let c3 = try VolumeConfig.decode(try FileIO.readFile(dir.path + "/v3/kmsfs.conf"))
        #expect(c2.keyProvider.keyIds == c3.keyProvider.keyIds && c3.keyProvider.keyFile == dir.path + "/shared.key")
        #expect(c2.volumeId != c3.volumeId)
    }

    @Test("info prints a header without any key, as text and as JSON")
    func info() throws {
        let v = try MountedVolume(chunkSize: 4096, initArgs: ["--context", "dept=qa"])
        try P.writeFile(v.path("f"), Array(repeating: 1, count: 10000))
        try v.unmount()
        let f = v.backing("f")
        // No key file at all: info must not need it.
        try FileManager.default.removeItem(atPath: v.configHome)
        let r = try run(kmsfsBinary, ["info", "--json", f])
        #expect(r.status == 0, "\(r.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as! [String: Any]
        #expect(json["formatVersion"] as? Int == 1)
        #expect(json["chunkSize"] as? Int == 4096)
        #expect(json["plaintextSize"] as? Int == 10000)
        #expect((json["fileId"] as? String)?.count == 32)
        let context = json["encryptionContext"] as! [String: String]
        #expect(context["dept"] == "qa" && context["kmsfs:file-id"] == json["fileId"] as? String)
        let wrapped = (json["wrappedKeys"] as! [[String: String]])[0]
        #expect(wrapped["provider"] == "local" && wrapped["keyId"]!.hasPrefix("local:"))
        #expect(Data(base64Encoded: wrapped["blob"]!)?.count == 61)
        let text = try run(kmsfsBinary, ["info", f])
        #expect(text.status == 0 && text.stdout.contains("plaintext size: 10000"))
        let bad = try run(kmsfsBinary, ["info", v.cipher + "/kmsfs.conf"])
        #expect(bad.status != 0 && bad.stderr.contains("not a kmsfs file"))
    }

    @Test("verify, decrypt -r and rewrap show progress (redrawn on a terminal, plain lines otherwise), --quiet and --json summaries")
    func progressAndSummaries() throws {
        let v = try MountedVolume()
        for i in 0..<3 { try P.writeFile(v.path("f\(i)"), Array(repeating: UInt8(i), count: 5000 * (i + 1))) }
        try v.unmount()
        let plain = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(plain.status == 0 && plain.stderr.contains("checked 1/3 files") && plain.stdout.contains("3 files, 30000 bytes checked: all intact"), "\(plain.stderr)\(plain.stdout)")
        let quiet = try run(kmsfsBinary, ["verify", "--quiet", v.cipher], environment: v.environment)
        #expect(quiet.status == 0 && quiet.stdout.isEmpty && !quiet.stderr.contains("checked"), "\(quiet.stdout)\(quiet.stderr)")
        let json = try run(kmsfsBinary, ["verify", "--json", v.cipher], environment: v.environment)
        let summary = try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any]
        #expect(summary?["files"] as? Int == 3 && summary?["bytes"] as? Int == 30000 && summary?["damaged"] as? Int == 0 && summary?["intact"] as? Bool == true, "\(json.stdout)")
        let out = v.dir.path + "/restored"
        let restore = try run(kmsfsBinary, ["decrypt", "-r", "--json", "-o", out, v.cipher, "/"], environment: v.environment)
        let r = try JSONSerialization.jsonObject(with: Data(restore.stdout.utf8)) as? [String: Any]
        #expect(r?["files"] as? Int == 3 && r?["failed"] as? Int == 0, "\(restore.stdout)\(restore.stderr)")
        let rewrap = try run(kmsfsBinary, ["rewrap", "--json", "--key-file", v.dir.path + "/new.key", v.cipher], environment: v.environment)
        let w = try JSONSerialization.jsonObject(with: Data((rewrap.stdout.split(separator: "\n").last.map(String.init) ?? "").utf8)) as? [String: Any]
        #expect(w?["files"] as? Int == 3 && w?["rewrapped"] as? Int == 3, "\(rewrap.stdout)\(rewrap.stderr)")
        // On a terminal the line is redrawn in place.
        let tty = try run("script", ["-qec", "\(kmsfsBinary) verify \(v.cipher)", "/dev/null"], environment: v.environment)
        #expect(tty.stdout.contains("\r\u{1b}[K") && tty.stdout.contains("checked"), "\(tty.stdout.debugDescription)")
    }

    @Test("An fstab line of type fuse.kmsfs (and the kmsfs#CIPHERDIR form) mounts through the real mount binary, mount -a and umount, with kmsfs options as mount options")
    func fstab() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [4, 2])
        try v.unmount()
        let volumeId = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).volumeId
        let key = v.configHome + "/kmsfs/keys/\(volumeId).key"
        let known = v.configHome + "/kmsfs/known-volumes"
        // mount(8) runs mount.fuse3 with a clean environment, which runs "kmsfs" from the default PATH: the binary
        // under test stands in there for the installed one while this test runs.
        let helper = "/usr/local/sbin/kmsfs"
        #expect(access(helper, F_OK) != 0, "\(helper) already exists; this test will not replace it")
        try syscall { symlink(kmsfsBinary, helper) }
        defer { unlink(helper) }
        let options = "defaults,_netdev,nofail,allow_other,key_file=\(key),known_volumes=\(known)"
        for line in ["\(v.cipher) \(v.mount) fuse.kmsfs \(options) 0 0", "kmsfs#\(v.cipher) \(v.mount) fuse \(options) 0 0"] {
            let fstab = v.dir.path + "/fstab"
            try P.writeFile(fstab, Array((line + "\n").utf8))
            let m = try run("mount", ["-T", fstab, v.mount])
            #expect(m.status == 0 && isKmsfsMount(v.mount), "\(line): \(m.stderr)")
            #expect(try P.readFile(v.path("f")) == [4, 2])
            #expect(try run("umount", [v.mount]).status == 0)
            #expect(!isKmsfsMount(v.mount))
            let all = try run("mount", ["-a", "-T", fstab])
            #expect(all.status == 0 && isKmsfsMount(v.mount), "\(all.stderr)")
            #expect(try run("umount", [v.mount]).status == 0)
        }
        // Only mount.fuse3's exact form is taken as a mount: other words after the paths are left to the parser.
        let odd = try run(kmsfsBinary, [v.cipher, v.mount, "--read-only"], environment: v.environment)
        #expect(odd.status != 0 && !isKmsfsMount(v.mount), "\(odd.stderr)")
        // ro becomes kmsfs's --read-only; x-* options are for systemd and dropped.
        let fstab = v.dir.path + "/fstab"
        try P.writeFile(fstab, Array("\(v.cipher) \(v.mount) fuse.kmsfs ro,x-systemd.automount,\(options) 0 0\n".utf8))
        let ro = try run("mount", ["-T", fstab, v.mount])
        #expect(ro.status == 0, "\(ro.stderr)")
        #expect(try P.readFile(v.path("f")) == [4, 2])
        #expect(P.errno { try P.writeFile(v.path("g"), [1]) } == EROFS)
        #expect(try run("umount", [v.mount]).status == 0)
    }

    @Test("The systemd unit passes systemd-analyze verify (and a broken copy does not)")
    func systemdUnit() throws {
        let dir = try TempDir()
        let unit = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/systemd/kmsfs@.service").path
        let text = String(decoding: try FileIO.readFile(unit), as: UTF8.self)
        #expect(text.contains("Restart=no") && text.contains("After=network-online.target") && text.contains("KillSignal=SIGTERM"))
        #expect(!text.contains("ExecStop="))  // SIGTERM unmounts; an ExecStop would fail once the mount is gone
        // The binary under test stands in for the installed one.
        let here = text.replacingOccurrences(of: "/usr/local/bin/kmsfs", with: kmsfsBinary)
        try P.writeFile(dir.path + "/kmsfs@test.service", Array(here.utf8))
        let ok = try run("systemd-analyze", ["verify", dir.path + "/kmsfs@test.service"])
        #expect(ok.status == 0, "\(ok.stdout)\(ok.stderr)")
        let broken = here.replacingOccurrences(of: kmsfsBinary, with: dir.path + "/no-such-kmsfs")
        try P.writeFile(dir.path + "/kmsfs@broken.service", Array(broken.utf8))
        #expect(try run("systemd-analyze", ["verify", dir.path + "/kmsfs@broken.service"]).status != 0)
    }

    @Test("Shell completion: bash, zsh and fish scripts come from kmsfs itself; the bash one completes subcommands and options")
    func shellCompletion() throws {
        let dir = try TempDir()
        for shell in ["bash", "zsh", "fish"] {
            let r = try run(kmsfsBinary, ["--generate-completion-script", shell])
            #expect(r.status == 0 && r.stdout.contains("rebind") && r.stdout.contains("known-volumes"), "\(shell): \(r.stderr)")
            try P.writeFile(dir.path + "/kmsfs.\(shell)", Array(r.stdout.utf8))
        }
        #expect(try run("bash", ["-n", dir.path + "/kmsfs.bash"]).status == 0)
        func complete(_ words: [String]) throws -> [String] {
            let line = words.joined(separator: " ")
            let script = """
                source '\(dir.path)/kmsfs.bash'
                COMP_WORDS=(\(words.map { "'\($0)'" }.joined(separator: " "))); COMP_CWORD=\(words.count - 1)
                COMP_LINE='\(line)'; COMP_POINT=${#COMP_LINE}
                _kmsfs kmsfs '\(words.last!)' '\(words[words.count - 2])'
                printf '%s\\n' "${COMPREPLY[@]}"
                """
            let r = try run("bash", ["-c", script])
            return r.stdout.split(separator: "\n").map(String.init)
        }
        #expect(Set(try complete(["kmsfs", "re"])) == ["rewrap", "rebind"])
        #expect(try complete(["kmsfs", "mount", "--require-p"]).contains("--require-pinned"))
    }

    @Test("Every command has --help; --version names the format; unmount refuses what is not a kmsfs mount")
    func helpVersionUnmount() throws {
        for command in [[], ["init"], ["mount"], ["unmount"], ["info"], ["decrypt"], ["verify"], ["path"], ["pin"], ["rebind"]] {
            let r = try run(kmsfsBinary, command + ["--help"])
            #expect(r.status == 0 && r.stdout.contains("USAGE:"), "\(command)")
        }
        let v = try run(kmsfsBinary, ["--version"])
        #expect(v.status == 0 && v.stdout.contains("on-disk format 3; reads 1 to 3"))
        let dir = try TempDir()
        let u = try run(kmsfsBinary, ["unmount", dir.path])
        #expect(u.status != 0 && u.stderr.contains("is not a kmsfs mount"))
        let missing = try run(kmsfsBinary, ["mount"])
        #expect(missing.status != 0 && missing.stderr.contains("Missing expected argument"))
    }
}

@Suite("Recovery commands")
struct RecoveryTests {
    @Test("decrypt and verify read a volume without mounting it, and report corruption precisely")
    func decryptAndVerify() throws {
        let v = try MountedVolume(chunkSize: 4096)
        var rng = SeededRandom(seed: 3)
        let data = rng.bytes(3 * 4096 + 5)
        try syscall { mkdir(v.path("d"), 0o755) }
        try P.writeFile(v.path("d/f"), data)
        try P.writeFile(v.path("g"), [1, 2, 3])
        try P.writeFile(v.path("empty"), [])
        try v.unmount()

        let ok = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(ok.status == 0 && ok.stdout.contains("3 files, \(data.count + 3) bytes checked: all intact"), "\(ok.stdout)\(ok.stderr)")
        let text = try run(kmsfsBinary, ["decrypt", v.cipher, "g"], environment: v.environment)
        #expect(text.status == 0 && Array(text.stdout.utf8) == [1, 2, 3])
        let toFile = try run(kmsfsBinary, ["decrypt", "-o", v.dir.path + "/out", v.cipher, "/d/f"], environment: v.environment)
        #expect(toFile.status == 0, "\(toFile.stderr)")
        #expect(try P.readFile(v.dir.path + "/out") == data)

        let header = try HeaderPrefix(try P.pread(P.open(v.backing("d/f"), O_RDONLY), 16, 0))
        try flipByte(v.backing("d/f"), at: header.layout.backingOffset(ofChunk: 1) + 30)
        let bad = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(bad.status == 1 && bad.stdout.contains("/d/f: corrupt chunks 1") && bad.stdout.contains("1 damaged"), "\(bad.stdout)")
        let stop = try run(kmsfsBinary, ["decrypt", "-o", v.dir.path + "/out2", v.cipher, "d/f"], environment: v.environment)
        #expect(stop.status == 1 && stop.stderr.contains("chunk 1 failed authentication"))
        #expect(!FileManager.default.fileExists(atPath: v.dir.path + "/out2"))
        let skip = try run(kmsfsBinary, ["decrypt", "--skip-corrupt", "-o", v.dir.path + "/out3", v.cipher, "d/f"], environment: v.environment)
        #expect(skip.status == 1 && skip.stderr.contains("written as zeros"))
        var expected = data
        expected.replaceSubrange(4096..<8192, with: [UInt8](repeating: 0, count: 4096))
        #expect(try P.readFile(v.dir.path + "/out3") == expected)
        // Without the key nothing can be read, and the message says which key file is missing.
        try FileManager.default.removeItem(atPath: v.configHome)
        let nokey = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment)
        #expect(nokey.status == 1 && nokey.stderr.contains("cannot open key file"))
    }
}

@Suite("Local key rotation")
struct LocalRewrapTests {
    @Test("rewrap --key-file moves a local volume to a new master key; the old one is then not needed")
    func rotateLocalKey() throws {
        let v = try MountedVolume(chunkSize: 4096)
        try P.writeFile(v.path("a"), [1, 2, 3])
        try syscall { mkdir(v.path("d"), 0o755) }
        try P.writeFile(v.path("d/b"), Array(repeating: 9, count: 9000))
        try v.unmount()
        let volume = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        let oldKey = v.configHome + "/kmsfs/keys/\(volume.volumeId).key"
        let newKey = v.dir.path + "/new.key"
        let r = try run(kmsfsBinary, ["rewrap", "--key-file", newKey, v.cipher], environment: v.environment)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("2 files: 2 rewrapped") && r.stdout.contains("New master key: \(newKey)"))
        let updated = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        #expect(updated.keyProvider.keyFile == newKey && updated.keyProvider.keyIds != volume.keyProvider.keyIds)
        try FileManager.default.removeItem(atPath: oldKey)
        // What killed rewraps leave behind (atomic writes' temporaries, a copy whose step was finished) is removed
        // by the next mount; an entry that only looks similar is not.
        let leftovers = ["kmsfs.conf.tmp-99999", "kmsfs.conf.rewrap-journal.tmp-99998", "kmsfs.conf.rewrap-copy"]
        for name in leftovers + ["kmsfs.conf.tmp-notapid"] { try P.writeFile(v.cipher + "/" + name, [1]) }
        try v.start()
        for name in leftovers { #expect(access(v.cipher + "/" + name, F_OK) != 0, "\(name)") }
        #expect(access(v.cipher + "/kmsfs.conf.tmp-notapid", F_OK) == 0)
        #expect(try P.readFile(v.path("a")) == [1, 2, 3])
        #expect(try P.readFile(v.path("d/b")) == Array(repeating: 9, count: 9000))
        let again = try run(kmsfsBinary, ["rewrap", v.cipher], environment: v.environment)
        #expect(again.status == 1 && again.stderr.contains("is in use"))
    }
}

extension LocalRewrapTests {
    @Test("rewrap carries over only a wrapped volume key that opens to the committed key, not one added to the config")
    func rewrapChecksTheVolumeKey() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("a"), [1])
        try v.unmount()
        // Someone adds, first in the list, a copy under the volume's own key that holds another key (the config
        // MAC does not cover wrapped keys: a wrong one fails the commitment, so mounts skip it).
        var config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        let key = try LocalKeyFile.load(path: v.configHome + "/kmsfs/keys/\(config.volumeId).key")
        let (other, wrapped) = try LocalKeyProvider(keys: [key]).generateDataKey(keyId: key.keyId, context: VolumeKeys.context(volumeId: config.volumeId))
        other.wipe()
        config.volumeKey!.wrappedKeys.insert(VolumeKeyConfig.Wrapped(wrapped), at: 0)
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try config.encoded())
        try v.start()
        #expect(try P.readFile(v.path("a")) == [1])
        try v.unmount()
        let r = try run(kmsfsBinary, ["rewrap", "--key-file", v.dir.path + "/new.key", v.cipher], environment: v.environment)
        #expect(r.status == 0, "\(r.stderr)")
        let rotated = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        #expect(rotated.volumeKey!.wrappedKeys.count == 1)
        try v.start()
        #expect(try P.readFile(v.path("a")) == [1])
    }


    @Test("A local rotation stopped in either pass leaves a volume the configured key file opens", arguments: [1, 2, 3, 4])
    func localRotationCrash(hit: Int) throws {
        let v = try MountedVolume(chunkSize: 4096)
        try P.writeFile(v.path("a"), [1])
        try P.writeFile(v.path("b"), [2])
        try v.unmount()
        let newKey = v.dir.path + "/new.key"
        var env = v.environment
        env["KMSFS_FAILPOINT"] = "rewrap-before-clear:\(hit)"
        let crashed = try run(kmsfsBinary, ["rewrap", "--key-file", newKey, v.cipher], environment: env)
        #expect(crashed.status == 99, "\(crashed.stderr)")
        // Whatever key file the config names now opens every file.
        try v.start()
        #expect(try P.readFile(v.path("a")) == [1])
        #expect(try P.readFile(v.path("b")) == [2])
        try v.unmount()
        let finish = try run(kmsfsBinary, ["rewrap", "--key-file", newKey, v.cipher], environment: v.environment)
        #expect(finish.status == 0, "\(finish.stderr)")
        let volume = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        try FileManager.default.removeItem(atPath: v.configHome + "/kmsfs/keys/\(volume.volumeId).key")
        try v.start()
        #expect(try P.readFile(v.path("a")) == [1] && (try P.readFile(v.path("b"))) == [2])
    }
}
