import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Testing

/// The independent decryptor of interop tests: Python with boto3 (the data key, from the same KMS server,
/// with the file's encryption context) and the `cryptography` package (the format, as kmsfs-format(5) says).
let pythonDecryptor = """
    import struct, hmac, hashlib, sys
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives import hashes
    data = open(sys.argv[1], 'rb').read()
    assert data[:4] == b'KMFS'
    version, flags, H, C = struct.unpack('>HHII', data[4:16])
    assert version == 1 and flags & ~1 == 0
    file_id, commitment = data[16:32], data[32:64]
    def u16(o): return struct.unpack('>H', data[o:o+2])[0]
    n = u16(64); off = 66; ctx = {}
    for _ in range(n):
        kl = u16(off); k = data[off+2:off+2+kl].decode(); off += 2 + kl
        vl = u16(off); v = data[off+2:off+2+vl].decode(); off += 2 + vl
        ctx[k] = v
    mac_at = off; mac = data[off:off+32]; off += 32
    wrapped = []
    count = data[off]; off += 1
    for _ in range(count):
        pl = data[off]; provider = data[off+1:off+1+pl].decode(); off += 1 + pl
        il = u16(off); key_id = data[off+2:off+2+il].decode(); off += 2 + il
        bl = u16(off); blob = data[off+2:off+2+bl]; off += 2 + bl
        wrapped.append((provider, key_id, blob))
    provider, key_id, blob = wrapped[0]
    assert provider == 'aws-kms'
    dek = kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx, KeyId=key_id)['Plaintext']
    def derive(info): return HKDF(algorithm=hashes.SHA256(), length=32, salt=file_id, info=info).derive(dek)
    assert derive(b'kmsfs v1 key commitment') == commitment, 'commitment'
    authed = bytearray(data[:mac_at]); authed[8:12] = b'\\0\\0\\0\\0'
    assert hmac.new(derive(b'kmsfs v1 header key'), bytes(authed), hashlib.sha256).digest() == mac, 'mac'
    chunk_key = AESGCM(derive(b'kmsfs v1 chunk key'))
    body = data[H:]; S = C + 28
    full, rest = divmod(len(body), S)
    size = full * C + max(rest - 28, 0)
    chunks = (size + C - 1) // C
    out = bytearray()
    for i in range(chunks):
        seg = body[i*S:min((i+1)*S, len(body))]
        last = i == chunks - 1
        if not last and len(seg) == S and not any(seg):
            out += bytes(C); continue
        ad = file_id + struct.pack('>Q', i) + bytes([1 if last else 0])
        out += chunk_key.decrypt(seg[:12], seg[12:], ad)
    try:
        changed = dict(ctx); changed['kmsfs:file-id'] = '0' * 32
        kms.decrypt(CiphertextBlob=blob, EncryptionContext=changed, KeyId=key_id)
        refused = 'no'
    except kms.exceptions.InvalidCiphertextException:
        refused = 'yes'
    print(hashlib.sha256(out).hexdigest(), len(out), refused)
    """

@Suite("AWS KMS provider against a KMS-protocol server", .serialized)
struct AWSKMSTests {
    let moto: Moto

    init() throws {
        moto = try Moto.shared.get()
    }

    /// A volume whose KMS calls go through a fault-injecting proxy in front of moto.
    /// Without the key pool unless asked: these tests count the KMS calls each operation makes.
    func volume(keys: [String], proxy: KMSProxy, context: [String] = [], mountArgs: [String] = ["--key-pool", "0"]) throws -> MountedVolume {
        var args = ["--kms", "aws"] + keys.flatMap { ["--key-id", $0] }
        for c in context { args += ["--context", c] }
        var env = moto.clientEnvironment
        env["AWS_ENDPOINT_URL"] = proxy.url
        return try MountedVolume(chunkSize: 4096, initArgs: args, mountArgs: mountArgs, environment: env)
    }

    @Test("A mount with --kms aws round-trips files; the header holds the KMS blob and key ARN; the audit log shows the calls")
    func roundTrip() throws {
        let arn = try moto.createKey(alias: "alias/kmsfs-round-trip")
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: ["alias/kmsfs-round-trip"], proxy: proxy, context: ["app=kmsfs"])
        let config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        #expect(config.keyProvider.type == "aws-kms" && config.keyProvider.keyIds == [arn] && config.keyProvider.region == "us-east-1")
        var rng = SeededRandom(seed: 1)
        let data = rng.bytes(3 * 4096 + 17)
        try P.writeFile(v.path("f"), data)
        try #require(v.waitForKeysWiped("f"))
        #expect(try P.readFile(v.path("f")) == data)
        #expect(v.auditLines().contains { $0["op"] as? String == "GenerateDataKey" && $0["keyId"] as? String == arn && $0["result"] as? String == "ok" })
        #expect(v.auditLines().contains { $0["op"] as? String == "Decrypt" && $0["path"] as? String == "/f" })
        #expect(proxy.fileCount("GenerateDataKey") == 1 && proxy.fileCount("Decrypt") == 1)
        // The volume key: made at init, unwrapped once at mount, under its own context.
        let volumeCalls = proxy.server.requests.filter { ($0.json["EncryptionContext"] as? [String: String])?["kmsfs:purpose"] == "volume-key" }
        #expect(volumeCalls.map(\.kmsOperation) == ["GenerateDataKey", "Decrypt"])
        #expect(volumeCalls.allSatisfy { ($0.json["EncryptionContext"] as? [String: String])?["kmsfs:volume-id"] == config.volumeId })
        // Every file call carried the file's encryption context.
        let decrypt = proxy.server.requests.first { $0.kmsOperation == "Decrypt" && ($0.json["EncryptionContext"] as? [String: String])?["kmsfs:file-id"] != nil }!
        let context = decrypt.json["EncryptionContext"] as? [String: String]
        #expect(context?["app"] == "kmsfs" && context?["kmsfs:volume-id"] == config.volumeId && context?["kmsfs:file-id"]?.count == 32)
        #expect(decrypt.json["KeyId"] as? String == arn)
        #expect(decrypt.headers["authorization"]?.hasPrefix("AWS4-HMAC-SHA256 Credential=testing/") == true)

        let info = try run(kmsfsBinary, ["info", "--json", v.backing("f")])
        let json = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as! [String: Any]
        let wrapped = (json["wrappedKeys"] as! [[String: String]])[0]
        #expect(wrapped["provider"] == "aws-kms" && wrapped["keyId"] == arn)
        let blob = Data(base64Encoded: wrapped["blob"]!)!
        let generate = proxy.server.requests.first { $0.kmsOperation == "GenerateDataKey" }!
        #expect(generate.json["KeySpec"] as? String == "AES_256")
        try v.unmount()
        #expect(try v.offlineContents("f") == data)
        #expect(blob.count > 32)
    }

    @Test("libcurl is loaded only where a key service speaks HTTP: an AWS mount maps it once it has called KMS, a local-provider mount never")
    func libcurlOnlyWhenNeeded() throws {
        func mapsLibcurl(_ v: MountedVolume) throws -> Bool {
            let pid = try #require(v.process?.processIdentifier)
            let maps = String(decoding: try FileIO.readFile("/proc/\(pid)/maps"), as: UTF8.self)
            // The daemon's own mappings, so that an empty read cannot pass for "no libcurl".
            try #require(maps.contains("libfuse3") && maps.contains("libcrypto"))
            return maps.contains("libcurl")
        }
        let local = try MountedVolume()
        try P.writeFile(local.path("f"), [1, 2, 3])
        #expect(try P.readFile(local.path("f")) == [1, 2, 3])
        #expect(try !mapsLibcurl(local))
        _ = try moto.createKey(alias: "alias/kmsfs-libcurl")
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: ["alias/kmsfs-libcurl"], proxy: proxy)
        try P.writeFile(v.path("f"), [4, 5])
        #expect(try P.readFile(v.path("f")) == [4, 5])
        #expect(try mapsLibcurl(v))
    }

    @Test("Interoperability: boto3 unwraps the header's key with its context, and the file decrypts by the format document")
    func interoperability() throws {
        let arn = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [arn], proxy: proxy, context: ["team=storage"])
        var rng = SeededRandom(seed: 2)
        let data = rng.bytes(2 * 4096 + 999)
        try P.writeFile(v.path("interop"), data)
        // A sparse file too: holes must decrypt as zeros.
        let fd = try P.open(v.path("sparse"), O_RDWR | O_CREAT)
        try P.pwrite(fd, [1, 2, 3], 5 * 4096 + 10)
        close(fd)
        try v.unmount()
        let script = "import sys\n" + pythonDecryptor
        for (name, expected) in [("interop", data), ("sparse", [UInt8](repeating: 0, count: 5 * 4096 + 10) + [1, 2, 3])] {
            let py = ProcessInfo.processInfo.environment["KMSFS_TEST_PYTHON"] ?? "python3"
            let r = try run(py, ["-c", "import boto3\nkms = boto3.client('kms')\n" + script, v.backing(name)], environment: moto.clientEnvironment)
            #expect(r.status == 0, "\(r.stderr)")
            #expect(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) ==
                    "\(Hex.encode(Digest.sha256(expected))) \(expected.count) yes", "\(name)")
        }
    }

    @Test("A header whose encryption context was changed cannot be unwrapped: KMS refuses, open gives EIO")
    func changedContext() throws {
        let arn = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [arn], proxy: proxy, context: ["dept=aaaa"])
        try P.writeFile(v.path("f"), [1, 2, 3])
        try #require(v.waitForKeysWiped("f"))
        // Same length, other value: "dept=aaab".
        var bytes = try P.readFile(v.backing("f"))
        let at = find(Array("aaaa".utf8), in: bytes)!
        bytes[at + 3] = UInt8(ascii: "b")
        let fd = try P.open(v.backing("f"), O_WRONLY)
        try P.pwrite(fd, Array(bytes[0..<(at + 4)]), 0)
        close(fd)
        #expect(P.errno { try P.readFile(v.path("f")) } == EIO)
        #expect(v.daemonLogText.contains("cannot open /f: cannot unwrap the data key with key \(arn): InvalidCiphertextException"))
        #expect(v.auditLines().contains { $0["op"] as? String == "Decrypt" && $0["result"] as? String == "InvalidCiphertextException" })
    }

    @Test("init refuses a missing or disabled key with a clear message and creates nothing")
    func initChecksKeys() throws {
        let dir = try TempDir()
        let missing = try run(kmsfsBinary, ["init", "--kms", "aws", "--key-id", "alias/does-not-exist", dir.path + "/a"], environment: moto.clientEnvironment)
        #expect(missing.status == 1 && missing.stderr.contains("key alias/does-not-exist: not found"), "\(missing.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/a"))
        let arn = try moto.createKey()
        try moto.disableKey(arn)
        let disabled = try run(kmsfsBinary, ["init", "--kms", "aws", "--key-id", arn, dir.path + "/b"], environment: moto.clientEnvironment)
        #expect(disabled.status == 1 && disabled.stderr.contains("not usable: the key is Disabled"), "\(disabled.stderr)")
        let noKey = try run(kmsfsBinary, ["init", "--kms", "aws", dir.path + "/c"], environment: moto.clientEnvironment)
        #expect(noKey.status != 0 && noKey.stderr.contains("at least one --key-id"))
        var unreachable = moto.clientEnvironment
        unreachable["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
        let down = try run(kmsfsBinary, ["init", "--kms", "aws", "--key-id", arn, dir.path + "/d"], environment: unreachable)
        #expect(down.status == 1 && down.stderr.contains("KMS could not be reached"), "\(down.stderr)")
    }

    @Test("A disabled key fails the open clearly; with two keys the second one takes over")
    func disabledKeyAndFallback() throws {
        let k1 = try moto.createKey(), k2 = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [k1, k2], proxy: proxy)
        try P.writeFile(v.path("f"), Array("both keys".utf8))
        try #require(v.waitForKeysWiped("f"))
        #expect(proxy.fileCount("GenerateDataKey") == 1 && proxy.fileCount("Encrypt") == 1)
        let header = try FileHeader(decoding: try P.readFile(v.backing("f")))
        #expect(header.wrappedKeys.map(\.keyId) == [k1, k2])

        try moto.disableKey(k1)
        proxy.set(.disabled, forKey: k1)
        #expect(try P.readFile(v.path("f")) == Array("both keys".utf8))
        let decrypts = v.auditLines().filter { $0["op"] as? String == "Decrypt" }
        #expect(decrypts.map { $0["keyId"] as? String ?? "" } == [k1, k2])
        #expect(decrypts.map { $0["result"] as? String ?? "" } == ["DisabledException", "ok"])

        try moto.disableKey(k2)
        proxy.set(.disabled, forKey: k2)
        #expect(v.waitForAudit("DiscardKey", count: 2, path: "/f"))
        #expect(P.errno { try P.readFile(v.path("f")) } == EIO)
        #expect(v.daemonLogText.contains("cannot open /f: cannot unwrap the data key with key \(k1): DisabledException"))
        // Creating needs the first key: refused as well, and nothing is left behind.
        #expect(P.errno { try P.writeFile(v.path("g"), [1]) } != nil)
        #expect(P.errno { try P.stat(v.path("g")) } == ENOENT)
    }

    @Test("rewrap moves every file to a new key without touching bodies; the old key can then be disabled")
    func rewrap() throws {
        let old = try moto.createKey(), new = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [old], proxy: proxy)
        var rng = SeededRandom(seed: 4)
        var files: [String: [UInt8]] = [:]
        try syscall { mkdir(v.path("d"), 0o755) }
        for i in 0..<6 {
            let name = i % 2 == 0 ? "f\(i)" : "d/f\(i)"
            files[name] = rng.bytes(i * 3000)
            try P.writeFile(v.path(name), files[name]!)
        }
        try syscall { link(v.path("f0"), v.path("f0-link")) }
        let bodies = try files.keys.sorted().map { name -> [UInt8] in
            let all = try P.readFile(v.backing(name))
            return Array(all[(try HeaderPrefix(all).headerLength)...])
        }

        let busy = try run(kmsfsBinary, ["rewrap", "--key-id", new, v.cipher], environment: v.environment)
        #expect(busy.status == 1 && busy.stderr.contains("is in use"), "\(busy.stderr)")
        try v.unmount()

        let r = try run(kmsfsBinary, ["rewrap", "--key-id", new, v.cipher], environment: v.environment)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("7 files: 6 rewrapped, 1 already under the new keys, 0 failed"), "\(r.stdout)")
        #expect(proxy.fileCount("ReEncrypt") == 6)
        let reEncrypt = proxy.server.requests.first { $0.kmsOperation == "ReEncrypt" }!
        #expect(reEncrypt.json["DestinationKeyId"] as? String == new && reEncrypt.json["SourceKeyId"] as? String == old)
        #expect(reEncrypt.json["SourceEncryptionContext"] as? [String: String] == reEncrypt.json["DestinationEncryptionContext"] as? [String: String])
        let config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        #expect(config.keyProvider.keyIds == [new])
        let after = try files.keys.sorted().map { name -> [UInt8] in
            let all = try P.readFile(v.backing(name))
            #expect(try FileHeader(decoding: all).wrappedKeys.map(\.keyId) == [new])
            return Array(all[(try HeaderPrefix(all).headerLength)...])
        }
        #expect(after == bodies)

        try moto.disableKey(old)
        proxy.set(.disabled, forKey: old)
        try v.start()
        for (name, data) in files { #expect(try P.readFile(v.path(name)) == data, "\(name)") }
        #expect(!v.auditLines().contains { $0["op"] as? String == "Decrypt" && $0["keyId"] as? String == old })
    }

    @Test("rewrap to more keys than the headers hold moves every file to one longer header length, and the config says so last")
    func rewrapGrowsUniformHeaders() throws {
        let k1 = try moto.createKey(), k2 = try moto.createKey(), k3 = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [k1], proxy: proxy)
        var rng = SeededRandom(seed: 31)
        var files: [String: [UInt8]] = [:]
        for i in 0..<5 {
            files["f\(i)"] = rng.bytes(i * 5000 + 1)
            try P.writeFile(v.path("f\(i)"), files["f\(i)"]!)
        }
        try v.unmount()
        let before = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        let r = try run(kmsfsBinary, ["rewrap", "--key-id", k1, "--key-id", k2, "--key-id", k3, v.cipher], environment: v.environment)
        #expect(r.status == 0, "\(r.stderr)")
        let after = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        let h = try #require(after.headerLength)
        #expect(h > before.headerLength!)
        for (name, data) in files {
            let header = try FileHeader(decoding: try P.readFile(v.backing(name)))
            #expect(header.headerLength == h && header.wrappedKeys.map(\.keyId) == [k1, k2, k3])
            #expect(try v.offlineContents(name) == data)
        }
        try v.start(["--key-pool", "0"])
        for (name, data) in files {
            #expect(try P.stat(v.path(name)).st_size == off_t(data.count))
            #expect(try P.readFile(v.path(name)) == data)
        }
    }

    @Test("rewrap stopped at any point leaves every file readable, and the next run finishes", arguments: [
        ("rewrap-after-journal", 1), ("rewrap-mid-header", 1), ("rewrap-before-clear", 1),
        ("rewrap-after-journal", 3), ("rewrap-before-clear", 3),
    ])
    func rewrapCrashSafety(failpoint: String, newKeys: Int) throws {
        let old = try moto.createKey()
        let targets = try (0..<newKeys).map { _ in try moto.createKey() }
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [old], proxy: proxy)
        var rng = SeededRandom(seed: 8)
        var files: [String: [UInt8]] = [:]
        for i in 0..<3 {
            files["f\(i)"] = rng.bytes(5000 + i)
            try P.writeFile(v.path("f\(i)"), files["f\(i)"]!)
        }
        try v.unmount()
        var env = v.environment
        env["KMSFS_FAILPOINT"] = failpoint
        let args = ["rewrap"] + targets.flatMap { ["--key-id", $0] } + [v.cipher]
        let crashed = try run(kmsfsBinary, args, environment: env)
        #expect(crashed.status == 99, "\(crashed.stderr)")
        #expect(FileManager.default.fileExists(atPath: v.cipher + "/" + RewrapJournal.name) || failpoint == "rewrap-before-clear")
        // A mount finishes the interrupted step; every file reads.
        try v.start()
        for (name, data) in files { #expect(try P.readFile(v.path(name)) == data, "\(name) after \(failpoint)") }
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount).sorted() == files.keys.sorted())
        try v.unmount()
        #expect(!FileManager.default.fileExists(atPath: v.cipher + "/" + RewrapJournal.name))
        let finish = try run(kmsfsBinary, args, environment: v.environment)
        #expect(finish.status == 0, "\(finish.stderr)")
        for name in files.keys {
            #expect(try FileHeader(decoding: try P.readFile(v.backing(name))).wrappedKeys.map(\.keyId) == targets)
        }
        try moto.disableKey(old)
        proxy.set(.disabled, forKey: old)
        try v.start()
        for (name, data) in files { #expect(try P.readFile(v.path(name)) == data, "\(name) at the end") }
    }
}
