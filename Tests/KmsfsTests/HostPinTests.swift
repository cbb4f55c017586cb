import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Testing

/// Someone who can write CIPHERDIR rewrites kmsfs.conf to name their own provider, key, volume key or endpoint,
/// with a config MAC that verifies under the volume key they chose. The host's pin refuses each before any KMS
/// call; a host with no pin (first use) would accept the same forgery, which shows the forgery is consistent.
@Suite("Host pinning of volumes", .serialized)
struct HostPinTests {
    let moto: Moto

    init() throws {
        moto = try Moto.shared.get()
    }

    /// `config` re-keyed as an attacker would: the given provider settings, a volume key of their own wrapped
    /// under `keyIds` through `provider`, and a config MAC made with it.
    func forged(_ config: VolumeConfig, _ providerConfig: KeyProviderConfig, provider: KeyProvider) throws -> VolumeConfig {
        var c = config
        c.keyProvider = providerConfig
        let (keys, stored) = try KeyService(provider: provider, keyIds: providerConfig.keyIds, audit: nil).newVolumeKey(volumeId: c.volumeId)
        defer { keys.wipe() }
        c.volumeKey = stored
        try c.authenticate(with: keys)
        return c
    }

    func mount(_ v: MountedVolume, env: [String: String]) throws -> CommandResult {
        let r = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: v.environment.merging(env) { _, b in b })
        if isKmsfsMount(v.mount) { _ = try run("fusermount3", ["-u", v.mount]) }
        return r
    }

    @Test("A config forged to name another provider, key, volume key or endpoint (MAC-consistent, served by a second KMS-protocol server) is refused at mount before any KMS call; an unpinned host would have accepted it")
    func forgedConfigsAreRefused() throws {
        let legit = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        var env = moto.clientEnvironment
        env["AWS_ENDPOINT_URL"] = proxy.url
        let v = try MountedVolume(initArgs: ["--kms", "aws", "--key-id", legit], mountArgs: ["--key-pool", "0"], environment: env)
        try P.writeFile(v.path("f"), [1, 2, 3])
        try v.unmount()
        let known = v.configHome + "/kmsfs/known-volumes"
        let pinText = String(decoding: try FileIO.readFile(known), as: UTF8.self)
        let config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        #expect(pinText.contains("\(config.volumeId) provider=aws-kms keys=\(legit) commitment=\(config.volumeKey!.commitment)"), "\(pinText)")

        // The attacker's own KMS-protocol server and key, behind a counting proxy.
        let attackerServer = try Moto(environment: [:])
        let attackerProxy = try KMSProxy(upstream: attackerServer)
        let attackerKey = try attackerServer.createKey()
        // A key of the attacker's in the volume's own KMS.
        let otherKey = try moto.createKey()
        let legitAWS = AWSKMSProvider(settings: AWSSettings(region: "us-east-1", profile: nil, endpoint: moto.url, environment: moto.clientEnvironment))
        // A local key file the attacker drops into CIPHERDIR.
        let (evil, evilMaster) = try LocalMasterKey.generate()
        let evilFile = v.cipher + "/evil.key"
        try LocalKeyFile.write(evilMaster, to: evilFile, keyId: evil.keyId)
        evilMaster.wipe()

        let aws = config.keyProvider
        let cases: [(String, VolumeConfig, String)] = [
            ("another provider", try forged(config, KeyProviderConfig(type: "local", keyIds: [evil.keyId], keyFile: evilFile),
                                            provider: LocalKeyProvider(keys: [evil])),
             "its config names key provider local, but this host pinned aws-kms"),
            ("another key", try forged(config, KeyProviderConfig(type: "aws-kms", keyIds: [otherKey], region: aws.region), provider: legitAWS),
             "its config names key \(otherKey), which this host has not pinned"),
            ("another volume key under the pinned key (an attacker allowed kms:Encrypt only)",
             try forged(config, aws, provider: legitAWS),
             "its volume key is not the one this host pinned"),
        ]
        let before = proxy.server.requests.count
        for (what, bad, message) in cases {
            try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try bad.encoded())
            let r = try mount(v, env: [:])
            #expect(r.status == 1 && r.stderr.contains("refusing volume \(config.volumeId)") && r.stderr.contains(message), "\(what): \(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(what): \(r.stderr)")
            #expect(!isKmsfsMount(v.mount))
        }
        #expect(proxy.server.requests.count == before, "the refusals made no KMS call")

        // The same forgeries on a host that has never seen the volume: they mount (trust on first use is
        // exactly what the pin protects later mounts from).
        for (what, bad, _) in cases {
            try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try bad.encoded())
            let fresh = v.dir.path + "/fresh-\(UUID().uuidString)"
            let r = try mount(v, env: ["KMSFS_KNOWN_VOLUMES": fresh])
            #expect(r.status == 0, "\(what): the forgery should be self-consistent: \(r.stderr)")
        }

        // The endpoint: a format 3 config naming one is refused outright; a format 2 config (no volume key, so
        // no MAC) naming the attacker's server and key, with the top directory ID deleted so the downgrade is not
        // seen in the volume itself, is refused by the pin, and the attacker's server hears nothing.
        var withEndpoint = try forged(config, KeyProviderConfig(type: "aws-kms", keyIds: [legit], region: aws.region), provider: legitAWS)
        withEndpoint.keyProvider.endpoint = attackerProxy.url
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try withEndpoint.encoded())
        let e = try mount(v, env: [:])
        #expect(e.status == 1 && e.stderr.contains("the KMS endpoint is never taken from the volume"), "\(e.stderr)")
        var downgraded = config
        downgraded.formatVersion = 2
        downgraded.names = nil
        downgraded.volumeKey = nil
        downgraded.mac = nil
        downgraded.nameBinding = nil
        downgraded.keyProvider = KeyProviderConfig(type: "aws-kms", keyIds: [attackerKey], region: "us-east-1", endpoint: attackerProxy.url)
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try downgraded.encoded())
        let dirId = v.cipher + "/" + NameCipher.directoryIdFile
        let savedDirId = try FileIO.readFile(dirId)
        try syscall { unlink(dirId) }
        let d = try mount(v, env: [:])
        #expect(d.status == 1 && d.stderr.contains("refusing volume \(config.volumeId)"), "\(d.stderr)")
        #expect(d.stderr.contains("which this host has not pinned"), "\(d.stderr)")
        downgraded.keyProvider = aws
        downgraded.keyProvider.endpoint = attackerProxy.url
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try downgraded.encoded())
        let d2 = try mount(v, env: [:])
        #expect(d2.status == 1 && d2.stderr.contains("without a volume key, but this host pinned a format 3 volume with one (a downgraded config)"), "\(d2.stderr)")
        #expect(attackerProxy.server.requests.isEmpty, "the attacker's server was never asked")

        // A config replaced as a whole may name a new volume ID too: the directory remembers its volume.
        var renamed = try forged(config, aws, provider: legitAWS)
        renamed.volumeId = "0123456789abcdef0123456789abcdef"
        renamed = try forged(renamed, aws, provider: legitAWS)
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try renamed.encoded())
        let n = try mount(v, env: [:])
        #expect(n.status == 1 && n.stderr.contains("this directory was pinned as volume \(config.volumeId)"), "\(n.stderr)")

        // A config whose provider does not match its keys is refused at mount (on a host with no pin).
        var mismatched = config
        mismatched.keyProvider.keyIds = ["local:0123456789abcdef"]
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try mismatched.encoded())
        let m = try mount(v, env: ["KMSFS_KNOWN_VOLUMES": v.dir.path + "/fresh-mismatch"])
        #expect(m.status == 1 && m.stderr.contains("key \"local:0123456789abcdef\" is not an AWS KMS key ID"), "\(m.stderr)")

        // The real config back: the pinned host mounts it and reads the file.
        try FileIO.writeFileAtomically(dirId, contents: savedDirId, mode: 0o444)
        try FileIO.writeFileAtomically(VolumeConfig.path(in: v.cipher), contents: try config.encoded())
        try v.start(["--key-pool", "0"])
        #expect(try P.readFile(v.path("f")) == [1, 2, 3])
        try v.unmount()
    }

    @Test("A rotation on one host is refused on another until pinned there (kmsfs pin --update); pin --print, --forget, --require-pinned, info, and a pin file others can write")
    func pinAcrossHosts() throws {
        let v = try MountedVolume()
        try P.writeFile(v.path("f"), [7])
        try v.unmount()
        let hostA = v.configHome + "/kmsfs/known-volumes"
        let hostB = v.dir.path + "/host-b/known-volumes"
        let volumeId = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher))).volumeId
        let envB = v.environment.merging(["KMSFS_KNOWN_VOLUMES": hostB]) { _, b in b }

        // --require-pinned refuses a volume host B has never seen; its first plain use pins it.
        let strict = try run(kmsfsBinary, ["verify", "--require-pinned", v.cipher, "/"], environment: envB)
        #expect(strict.status == 1 && strict.stderr.contains("is not pinned in \(hostB), and --require-pinned was given"), "\(strict.stderr)")
        let first = try run(kmsfsBinary, ["verify", v.cipher, "/"], environment: envB)
        #expect(first.status == 0 && first.stderr.contains("first use of volume \(volumeId) on this host"), "\(first.stderr)")

        // Host A rotates to a new master key.
        let newKey = v.dir.path + "/new.key"
        let rw = try run(kmsfsBinary, ["rewrap", "--key-file", newKey, v.cipher], environment: v.environment)
        #expect(rw.status == 0, "\(rw.stderr)")
        let rotated = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: v.cipher)))
        let pinA = String(decoding: try FileIO.readFile(hostA), as: UTF8.self)
        #expect(pinA.contains("\(volumeId) provider=local keys=\(rotated.keyProvider.keyIds[0]) commitment="), "\(pinA)")

        // Host B refuses the new key until told; info says why.
        let refused = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: envB)
        #expect(refused.status == 1 && refused.stderr.contains("its config names key \(rotated.keyProvider.keyIds[0]), which this host has not pinned"), "\(refused.stderr)")
        let info = try run(kmsfsBinary, ["info", v.cipher], environment: envB)
        #expect(info.stdout.contains("host pin:       MISMATCH:"), "\(info.stdout)")
        let printed = try run(kmsfsBinary, ["pin", "--print", v.cipher], environment: v.environment)
        #expect(printed.status == 0 && printed.stdout.hasPrefix(volumeId + " provider=local keys="), "\(printed.stdout)")
        // Host B will not print (for other hosts) a config its pin does not match.
        let printB = try run(kmsfsBinary, ["pin", "--print", v.cipher], environment: envB)
        #expect(printB.status == 1 && printB.stderr.contains("is pinned differently"), "\(printB.stderr)")
        let noUpdate = try run(kmsfsBinary, ["pin", v.cipher], environment: envB)
        #expect(noUpdate.status == 1 && noUpdate.stderr.contains("give --update"), "\(noUpdate.stderr)")
        let update = try run(kmsfsBinary, ["pin", "--update", v.cipher], environment: envB)
        #expect(update.status == 0 && update.stdout.contains("Pinned volume \(volumeId)"), "\(update.stderr)")
        let ok = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: envB)
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(try P.readFile(v.path("f")) == [7])
        _ = try run("fusermount3", ["-u", v.mount])

        // --forget, then a pin file other users could write is no anchor.
        let forget = try run(kmsfsBinary, ["pin", "--forget", volumeId], environment: envB)
        #expect(forget.status == 0 && forget.stdout.contains("Forgot volume \(volumeId)"), "\(forget.stdout)")
        #expect(!String(decoding: try FileIO.readFile(hostB), as: UTF8.self).contains(volumeId))
        try syscall { chmod(hostB, 0o666) }
        let open = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: envB)
        #expect(open.status == 1 && open.stderr.contains("may be changed by other users"), "\(open.stderr)")
        #expect(!isKmsfsMount(v.mount))
        // A malformed line fails closed, naming the line.
        try syscall { chmod(hostB, 0o644) }
        try FileIO.writeFileAtomically(hostB, contents: Array("# pins\n\(volumeId) provider=local\n".utf8))
        let malformed = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: envB)
        #expect(malformed.status == 1 && malformed.stderr.contains("\(hostB) line 2 is not a volume pin"), "\(malformed.stderr)")
    }
}
