import Foundation
import Glibc
import KmsfsFormat
import KmsfsSystem
import Testing

@Suite("kmsfs status: a live mount's volume, keys, files, key calls and traffic")
struct StatusTests {
    private func status(_ v: MountedVolume, _ args: [String]) throws -> CommandResult {
        try run(kmsfsBinary, ["status"] + args, environment: v.environment)
    }

    private func mine(_ v: MountedVolume) throws -> [String: Any] {
        let r = try status(v, ["--json", v.mount])
        #expect(r.status == 0, "\(r.stderr)")
        let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        let mounts = obj?["mounts"] as? [[String: Any]] ?? []
        #expect(mounts.count == 1, "\(r.stdout)")
        return mounts.first ?? [:]
    }

    @Test("status shows the volume, keys, open files and held keys, key calls with latency, traffic, corrupt chunks and uptime, as text, JSON and Prometheus; only root and the mounting user may ask; never key material")
    func liveMount() throws {
        let v = try MountedVolume()
        let config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        let data = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        try P.writeFile(v.path("a"), data)
        #expect(try P.readFile(v.path("a")) == data)
        // One file open with its key in memory (a read loads it).
        // (Closed before the unmount below, and only there: a second close could take another test's descriptor.)
        let fd = try syscall { open(v.path("a"), O_RDONLY | O_CLOEXEC) }
        #expect(try P.pread(fd, 10, 0) == Array(data[0..<10]))
        usleep(1_100_000)
        let s = try mine(v)
        #expect(s["mountPoint"] as? String == v.mount && s["cipherDir"] as? String == v.cipher)
        #expect(s["volumeId"] as? String == config.volumeId && s["provider"] as? String == "local")
        #expect(s["keyIds"] as? [String] == config.keyProvider.keyIds && s["formatVersion"] as? Int == 3)
        #expect((s["filesOpen"] as? Int ?? 0) >= 1 && (s["dataKeysHeld"] as? Int ?? 0) >= 1, "\(s)")
        #expect(s["volumeKeyHeld"] as? Bool == true && s["readOnly"] as? Bool == false)
        #expect((s["bytesWritten"] as? Int ?? 0) >= 100_000 && (s["bytesRead"] as? Int ?? 0) >= 100_000, "\(s)")
        #expect((s["uptimeSeconds"] as? Double ?? 0) >= 1, "\(s)")
        let calls = s["keyCalls"] as? [String: [String: Any]] ?? [:]
        #expect((calls["GenerateDataKey"]?["calls"] as? Int ?? 0) >= 1 && calls["GenerateDataKey"]?["errors"] as? Int == 0, "\(calls)")
        #expect(calls["Decrypt"]?["p50Ms"] as? Double != nil && calls["Decrypt"]?["p99Ms"] as? Double != nil, "\(calls)")
        #expect(s["corruptChunks"] as? Int == 0)

        // A chunk that fails authentication is counted.
        try P.writeFile(v.path("b"), [UInt8](repeating: 5, count: 10_000))
        #expect(v.waitForKeysWiped("b"))
        let header = try FileHeader(decoding: try P.readFile(v.backing("b")))
        try flipByte(v.backing("b"), at: header.headerLength + 100)
        #expect(P.errno { try P.readFile(v.path("b")) } == EIO)
        #expect(try mine(v)["corruptChunks"] as? Int == 1)

        // Text: ours, and ours among every mount (other tests' mounts may be coming and going: their answers
        // are not checked).
        let text = try status(v, [v.mount])
        #expect(text.status == 0 && text.stdout.contains("\(v.mount)  (backing \(v.cipher))") && text.stdout.contains("corrupt chunks 1"), "\(text.stdout)\(text.stderr)")
        #expect(try status(v, []).stdout.contains("\(v.mount)  (backing \(v.cipher))"))
        #expect(text.stdout.contains("GenerateDataKey") && text.stdout.contains(config.volumeId))
        // Prometheus: well-formed samples, labelled by mount point and volume.
        let prom = try status(v, ["--prometheus", v.mount])
        #expect(prom.status == 0)
        let labels = "mountpoint=\"\(v.mount)\",volume_id=\"\(config.volumeId)\""
        #expect(prom.stdout.contains("kmsfs_corrupt_chunks_total{\(labels)} 1"), "\(prom.stdout)")
        #expect(prom.stdout.contains("kmsfs_key_calls_total{\(labels),op=\"Decrypt\"}"))
        #expect(prom.stdout.contains("kmsfs_key_call_latency_seconds{\(labels),op=\"Decrypt\",quantile=\"0.99\"}"))
        let sample = try NSRegularExpression(pattern: #"^kmsfs_[a-z_]+\{([a-z_]+="([^"\\]|\\.)*",?)+\} [0-9.]+$"#)
        for line in prom.stdout.split(separator: "\n") where !line.hasPrefix("#") {
            let l = String(line)
            #expect(sample.firstMatch(in: l, range: NSRange(l.startIndex..., in: l)) != nil, "\(l)")
        }
        // Nothing secret: not the master key, in any form.
        let keyFile = v.configHome + "/kmsfs/keys/\(config.volumeId).key"
        let keyHex = String(decoding: try P.readFile(keyFile), as: UTF8.self).split(separator: "\n").first { $0.count == 64 }.map(String.init) ?? "?"
        for out in [text.stdout, prom.stdout, try status(v, ["--json"]).stdout] {
            #expect(!out.contains(keyHex) && !out.lowercased().contains(keyHex.lowercased()))
        }
        // Another user may not ask.
        let nobody = try run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", kmsfsBinary, "status", v.mount], environment: v.environment)
        #expect(nobody.status == 1 && nobody.stderr.contains("not allowed: only root and the user who mounted it"), "\(nobody.stdout)\(nobody.stderr)")
        #expect(!nobody.stdout.contains(config.volumeId))
        close(fd)
        try v.unmount()
        let gone = try status(v, [v.mount])
        #expect(gone.status != 0 && gone.stderr.contains("is not a kmsfs mount"), "\(gone.stderr)")
    }
}
