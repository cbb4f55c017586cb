import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Testing

/// A PKCS#11 token (SoftHSM, in a temporary directory) with one AES key, the shipped kmsfs-pkcs11 key command,
/// and a wrapper around it that logs each request and refuses or hangs when the test says so.
private final class Token {
    let dir: TempDir
    let state: String
    let wrapper: String
    let environment: [String: String]

    init(keys: [String]) throws {
        let dir = try TempDir("kmsfs-test-hsm")
        let state = dir.path + "/state"
        self.dir = dir
        self.state = state
        try syscall { mkdir(state, 0o700) }
        try syscall { mkdir(dir.path + "/tokens", 0o700) }
        let conf = dir.path + "/softhsm2.conf"
        try P.writeFile(conf, Array("directories.tokendir = \(dir.path)/tokens\nobjectstore.backend = file\nlog.level = ERROR\n".utf8))
        let pin = dir.path + "/pin"
        try P.writeFile(pin, Array("4321\n".utf8))
        try syscall { chmod(pin, 0o600) }
        let python = ProcessInfo.processInfo.environment["KMSFS_TEST_PKCS11_PYTHON"] ?? "/opt/kmsfs-test-venv/bin/python3"
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("scripts/key-commands/kmsfs-pkcs11").path
        let environment = ["SOFTHSM2_CONF": conf, "KMSFS_PKCS11_TOKEN": "kmsfs-test",
                       "KMSFS_PKCS11_MODULE": ProcessInfo.processInfo.environment["KMSFS_TEST_SOFTHSM_MODULE"] ?? "/usr/lib/softhsm/libsofthsm2.so",
                       "KMSFS_PKCS11_PIN_FILE": pin]
        self.environment = environment
        let initToken = try run("softhsm2-util", ["--init-token", "--free", "--label", "kmsfs-test", "--pin", "4321", "--so-pin", "87654321"], environment: environment)
        guard initToken.status == 0 else { throw TestFailure("softhsm2-util: \(initToken.stderr)") }
        for k in keys {
            let made = try run(python, [script, "create-key", k], environment: environment)
            guard made.status == 0 else { throw TestFailure("create-key: \(made.stderr)") }
        }
        // The test's control around the real provider: log the request, then refuse, hang or pass it on.
        let wrapper = dir.path + "/key-command"
        self.wrapper = wrapper
        try P.writeFile(wrapper, Array("""
            #!/bin/sh
            req=$(cat)
            printf '%s\\n' "$req" >> \(state)/requests.log
            if [ -e \(state)/refuse ]; then echo '{"error":{"type":"AccessDeniedException","message":"refused by the test"}}'; exit 1; fi
            if [ -e \(state)/hang ]; then sleep 61.25; fi
            printf '%s' "$req" | exec \(python) \(script)

            """.utf8))
        try syscall { chmod(wrapper, 0o755) }
    }

    var requests: [[String: Any]] {
        ((try? String(contentsOfFile: state + "/requests.log", encoding: .utf8)) ?? "").split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    func set(_ flag: String, _ on: Bool) throws {
        if on { try P.writeFile(state + "/" + flag, []) } else { unlink(state + "/" + flag) }
    }
}

@Suite("Exec key service: kmsfs-pkcs11 on a SoftHSM token")
struct ExecKeyServiceTests {
    @Test("A volume whose keys are on a PKCS#11 token: files through the mount and over a remount, the encryption context reaches the key command, the audit log records its calls, keys are wiped on close, verify and decrypt work")
    func pkcs11Volume() throws {
        let token = try Token(keys: ["vol-key-1"])
        let v = try MountedVolume(initArgs: ["--kms", "exec", "--key-command", token.wrapper, "--key-id", "vol-key-1", "--context", "tenant=acme"],
                                  mountArgs: ["--key-command", token.wrapper, "--key-pool", "0"], environment: token.environment)
        let volumeId = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).volumeId
        let data = (0..<20_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try P.writeFile(v.path("report"), data)
        #expect(try P.readFile(v.path("report")) == data)
        #expect(v.waitForKeysWiped("report"))
        #expect(try P.readFile(v.path("report")) == data)
        #expect(v.waitForKeysWiped("report"))
        try v.remount()
        #expect(try P.readFile(v.path("report")) == data)
        #expect(v.waitForKeysWiped("report"))
        // The command saw each operation with the file's full context, and never a request without a version.
        let requests = token.requests
        let ops = Set(requests.compactMap { $0["operation"] as? String })
        #expect(ops.isSuperset(of: ["describe-key", "generate-data-key", "decrypt"]), "\(ops)")
        let fileCalls = requests.filter { ($0["encryptionContext"] as? [String: String])?["kmsfs:file-id"] != nil }
        #expect(!fileCalls.isEmpty && fileCalls.allSatisfy {
            let c = $0["encryptionContext"] as? [String: String]
            return c?["tenant"] == "acme" && c?["kmsfs:volume-id"] == volumeId && $0["keyId"] as? String == "vol-key-1" && $0["version"] as? Int == 1
        }, "\(fileCalls)")
        #expect(requests.contains { ($0["encryptionContext"] as? [String: String])?["kmsfs:purpose"] == "volume-key" })
        #expect(v.auditCount("GenerateDataKey", path: "/report") == 1 && v.auditCount("Decrypt", path: "/report") >= 2)
        // The backing header names the provider "exec" and the key, and the volume needs the token to be read.
        try v.unmount()
        let verify = try run(kmsfsBinary, ["verify", "--key-command", token.wrapper, v.cipher], environment: v.environment.merging(token.environment) { $1 })
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
        let noCommand = try run(kmsfsBinary, ["verify", v.cipher], environment: v.environment.merging(token.environment) { $1 })
        #expect(noCommand.status != 0 && noCommand.stderr.contains("give its command with --key-command or KMSFS_KEY_COMMAND"), "\(noCommand.stderr)")
        let env = v.environment.merging(token.environment) { $1 }.merging(["KMSFS_KEY_COMMAND": token.wrapper]) { $1 }
        let decrypted = try run(kmsfsBinary, ["decrypt", v.cipher, "report", "-o", v.dir.path + "/out"], environment: env)
        #expect(decrypted.status == 0 && (try? P.readFile(v.dir.path + "/out")) == data, "\(decrypted.stderr)")
        // A wrong PIN: the token refuses, and the mount fails with one line naming the refusal.
        var wrongPin = token.environment
        try P.writeFile(token.dir.path + "/bad-pin", Array("0000\n".utf8))
        wrongPin["KMSFS_PKCS11_PIN_FILE"] = token.dir.path + "/bad-pin"
        let refused = try run(kmsfsBinary, ["mount", "--key-command", token.wrapper, v.cipher, v.mount], environment: v.environment.merging(wrongPin) { $1 })
        #expect(refused.status != 0 && refused.stderr.contains("AccessDeniedException") && refused.stderr.contains("the token refused the PIN"), "\(refused.stderr)")
        if isKmsfsMount(v.mount) { _ = try run("fusermount3", ["-u", v.mount]) }
    }

    @Test("A key command that refuses gives EACCES on open, one that hangs is stopped (with its children) at the deadline and gives an error, and the volume reads again when it answers")
    func refusalAndTimeout() throws {
        let token = try Token(keys: ["k1"])
        let v = try MountedVolume(initArgs: ["--kms", "exec", "--key-command", token.wrapper, "--key-id", "k1"],
                                  mountArgs: ["--key-command", token.wrapper, "--key-pool", "0", "--kms-deadline", "1", "--kms-probe-interval", "0"],
                                  environment: token.environment)
        try P.writeFile(v.path("a"), [1, 2, 3])
        #expect(v.waitForKeysWiped("a"))
        try token.set("refuse", true)
        #expect(P.errno { try P.readFile(v.path("a")) } == EACCES)
        try token.set("refuse", false)
        try token.set("hang", true)
        let started = Date()
        let hung = P.errno { try P.readFile(v.path("a")) }
        let took = Date().timeIntervalSince(started)
        #expect(hung != nil && hung != EACCES, "\(String(describing: hung))")
        #expect(took < 8, "\(took) s")
        // The command's process group was killed: no sleep of the wrapper is left.
        #expect(try waitFor(seconds: 3) { try run("pgrep", ["-f", "sleep 61.25"]).status != 0 })
        try token.set("hang", false)
        #expect(try P.readFile(v.path("a")) == [1, 2, 3])
        let log = v.daemonLogText
        #expect(log.contains("AccessDeniedException") && log.contains("refused by the test"), "\(log)")
        #expect(log.contains("Timeout") && log.contains("did not answer decrypt"), "\(log)")
    }

    @Test("Key commands that misbehave: one that never reads its request still answers; an answer over 64 KiB, a nested, repeated or escaped plaintext, a plaintext where none belongs, or a non-zero exit are refused; refusal types and messages are cleaned for the log; the command sees no descriptor but 0 to 2")
    func misbehavingCommands() throws {
        let key = Base64.encode([UInt8](repeating: 7, count: 32))
        let context = EncryptionContext(["kmsfs:volume-id": String(repeating: "a", count: 32)])
        func provider(_ script: String) -> ExecKeyProvider { ExecKeyProvider(command: script, timeout: 5) }
        func failure(_ body: () throws -> Void) -> KeyError? {
            do { try body(); return nil } catch let e as KeyError { return e } catch { return nil }
        }
        // Never reads its request (which is small enough for the pipe, and its EPIPE is ignored).
        #expect(try provider(#"echo '{"keyId":"canonical"}'"#).describeKey("k") == "canonical")
        // Only 0, 1 and 2 are open in the command.
        #expect(try provider(#"n=0; i=3; while [ $i -lt 1024 ]; do [ -e /proc/$$/fd/$i ] && n=$((n+1)); i=$((i+1)); done; echo "{\"keyId\":\"extra-$n\"}""#).describeKey("k") == "extra-0")
        let started = Date()
        let long = failure { _ = try provider("head -c 70000 /dev/zero | tr '\\0' x; sleep 30").describeKey("k") }
        #expect(long?.errorType == "InvalidResponse" && long?.message.contains("longer than 64 KiB") == true, "\(String(describing: long))")
        #expect(Date().timeIntervalSince(started) < 4)
        for bad in [#"{"plaintext":"\#(key)","ciphertext":"AAAA","x":{"plaintext":"\#(key)"}}"#,
                    #"{"plaintext":"\#(key)","plaintext":"\#(key)","ciphertext":"AAAA"}"#,
                    #"{"plain\u0074ext":"\#(key)","ciphertext":"AAAA"}"#,
                    #"{"ciphertext":"AAAA","note":"no key"}"#] {
            let e = failure { _ = try provider("cat >/dev/null; printf '%s' '\(bad)'").generateDataKey(keyId: "k", context: context) }
            #expect(e?.errorType == "InvalidResponse", "\(bad): \(String(describing: e))")
        }
        #expect(try provider(#"cat >/dev/null; printf '%s' '{"plaintext":"\#(key)","ciphertext":"AAAA"}'"#)
            .generateDataKey(keyId: "k", context: context).wrapped.blob == [0, 0, 0])
        let echoed = failure { _ = try provider(#"echo '{"keyId":"k","plaintext":"\#(key)"}'"#).describeKey("k") }
        #expect(echoed?.errorType == "InvalidResponse")
        let exited = failure { _ = try provider(#"printf '%s' '{"plaintext":"\#(key)","ciphertext":"AAAA"}'; exit 3"#).generateDataKey(keyId: "k", context: context) }
        #expect(exited?.errorType == "KeyCommandFailed" && exited?.kind == .unreachable, "\(String(describing: exited))")
        let refused = failure { _ = try provider(#"printf '%s' '{"error":{"type":"Access\nDenied<x>Exception","message":"no\u0001 way"}}'; exit 1"#).describeKey("k") }
        #expect(refused?.errorType == "AccessDeniedxException" && refused?.message == "no way", "\(String(describing: refused))")
        let denied = failure { _ = try provider(#"echo '{"error":{"type":"AccessDeniedException"}}'"#).describeKey("k") }
        #expect(denied?.kind == .accessDenied)
    }

    @Test("init --kms exec checks each key with the command (a missing key fails with one line) and records no command in the volume")
    func initChecksKeys() throws {
        let token = try Token(keys: ["present"])
        let d = try TempDir()
        let env = token.environment.merging(["KMSFS_KNOWN_VOLUMES": d.path + "/known"]) { $1 }
        let missing = try run(kmsfsBinary, ["init", "--kms", "exec", "--key-command", token.wrapper, "--key-id", "absent", d.path + "/c1"], environment: env)
        #expect(missing.status != 0 && missing.stderr.contains("key absent: not found"), "\(missing.stderr)")
        #expect(access(d.path + "/c1/kmsfs.conf", F_OK) != 0)
        let noCommand = try run(kmsfsBinary, ["init", "--kms", "exec", "--key-id", "present", d.path + "/c2"], environment: env)
        #expect(noCommand.status != 0 && noCommand.stderr.contains("--key-command"), "\(noCommand.stderr)")
        let made = try run(kmsfsBinary, ["init", "--kms", "exec", "--key-command", token.wrapper, "--key-id", "present", d.path + "/c3"], environment: env)
        #expect(made.status == 0, "\(made.stderr)")
        let config = String(decoding: try P.readFile(d.path + "/c3/kmsfs.conf"), as: UTF8.self)
        #expect(config.contains("\"exec\"") && !config.contains(token.wrapper) && !config.contains("key-command"), "\(config)")
    }
}
