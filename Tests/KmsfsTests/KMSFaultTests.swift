import Foundation
import Glibc
import KmsfsFormat
import Testing

/// What users see when the KMS throttles, fails, hangs, goes away or refuses a key (kmsfs(1), "When the KMS
/// fails"), through the fault-injecting proxy in front of moto. No timing assertions: calls are held or refused
/// at the proxy, and the tests check what completes and which calls reached the KMS.
@Suite("KMS faults: deadlines, remembered failures, fallback for creates, log lines", .serialized)
struct KMSFaultTests {
    let moto: Moto
    init() throws { moto = try Moto.shared.get() }

    func volume(keys: [String], _ proxy: KMSProxy, mountArgs: [String]) throws -> MountedVolume {
        var env = moto.clientEnvironment
        env["AWS_ENDPOINT_URL"] = proxy.url
        return try MountedVolume(chunkSize: 4096, initArgs: ["--kms", "aws"] + keys.flatMap { ["--key-id", $0] },
                                 mountArgs: mountArgs, environment: env)
    }

    func wrappedKeyIds(_ v: MountedVolume, _ name: String) throws -> [String] {
        try FileHeader(decoding: try P.readFile(v.backing(name))).wrappedKeys.map(\.keyId)
    }

    @Test("With half of all calls throttled, copying 200 files and reading them all back succeeds", arguments: [false, true])
    func throttledHalf(pool: Bool) throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        // Half of all calls throttled, at random: a call may meet many throttles in a row, and the shared test
        // server is slow under the parallel suite, so each call gets a long deadline (what is tested is that
        // every call gets through in the end, not how fast).
        let v = try volume(keys: [key], proxy, mountArgs: (pool ? [] : ["--key-pool", "0"]) + ["--kms-deadline", "30"])
        proxy.setAll(.throttleSome(0.5))
        let files = pool ? 50 : 200
        for i in 0..<files { try P.writeFile(v.path("f\(i)"), Array("file \(i)".utf8)) }
        try v.remount()  // every key wiped: each read below unwraps again
        for i in 0..<files { #expect(try P.readFile(v.path("f\(i)")) == Array("file \(i)".utf8)) }
        let audit = v.auditLines()
        // The KMS really throttled, the audit log shows the retried attempts, and no file operation failed.
        #expect(audit.contains { ($0["retried"] as? [String])?.contains("ThrottlingException") == true && ($0["attempts"] as? Int ?? 0) > 1 })
        #expect(audit.filter { $0["op"] as? String == "Decrypt" && $0["result"] as? String == "ok" }.count == files)
        #expect(!v.daemonLogText.contains("cannot open") && !v.daemonLogText.contains("cannot create"))
    }

    @Test("With 30% of calls answered 500, creates and opens succeed")
    func serverErrors() throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [key], proxy, mountArgs: ["--key-pool", "0"])
        proxy.setAll(.serverErrorSome(0.3))
        for i in 0..<100 { try P.writeFile(v.path("f\(i)"), [UInt8(i)]) }
        try v.remount()
        for i in 0..<100 { #expect(try P.readFile(v.path("f\(i)")) == [UInt8(i)]) }
        #expect(v.auditLines().contains { ($0["retried"] as? [String])?.contains("HTTP500") == true })
    }

    @Test("A hung KMS costs one deadline; later calls fail at once until a probe finds it back", arguments: ["hang", "down"])
    func hungOrDead(fault: String) throws {
        let a = try moto.createKey(), b = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [a, b], proxy, mountArgs: ["--key-pool", "0", "--kms-deadline", "1", "--kms-probe-interval", "3"])
        try P.writeFile(v.path("old"), [1])
        try #require(v.waitForKeysWiped("old"))
        proxy.setAll(fault == "hang" ? .held : .down)
        let requestsBefore = proxy.server.requests.count

        // The first create pays the deadline (both keys are behind the same endpoint), and fails cleanly.
        #expect(P.errno { try P.writeFile(v.path("new1"), [2]) } == EIO)
        #expect(P.errno { try P.stat(v.path("new1")) } == ENOENT)
        let requestsAfterFirst = proxy.server.requests.count
        #expect(requestsAfterFirst > requestsBefore)
        // The endpoint is now known to be failing: creates and opens fail without asking it.
        #expect(P.errno { try P.writeFile(v.path("new2"), [3]) } == EIO)
        #expect(P.errno { try P.readFile(v.path("old")) } == EIO)
        #expect(proxy.server.requests.count == requestsAfterFirst)
        let log = v.daemonLogText
        let what = fault == "hang" ? "Timeout" : "ConnectionError"
        #expect(log.contains("cannot create /new1: no data key from key \(a): \(what)"), "\(log)")
        #expect(log.contains("gave up at the deadline"))
        #expect(log.contains("cannot create /new2: no data key from key \(a): \(what)") && log.contains("not asked: it failed"))
        #expect(log.contains("cannot open /old: cannot unwrap the data key with key \(a): \(what)"))
        // Listing and stat need no KMS and never waited for it.
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount) == ["old"])

        // Back again: after the probe interval a call goes through, and everything works without a remount.
        proxy.setAll(.none)
        #expect(waitFor(seconds: 30) { (try? P.writeFile(v.path("new3"), [4])) != nil })
        #expect(try P.readFile(v.path("old")) == [1])
        #expect(try P.readFile(v.path("new3")) == [4])
        // Each key is probed on its own: soon every new file is wrapped under both again.
        var n = 4
        #expect(waitFor(seconds: 30) {
            n += 1
            return (try? P.writeFile(v.path("new\(n)"), [5])) != nil && (try? wrappedKeyIds(v, "new\(n)")) == [a, b]
        })
    }

    @Test("One key that hangs costs one deadline; creates and opens then go straight to the other key")
    func oneHungKey() throws {
        let a = try moto.createKey(), b = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [a, b], proxy, mountArgs: ["--key-pool", "0", "--kms-deadline", "1", "--kms-probe-interval", "600"])
        try P.writeFile(v.path("old"), [1])
        try #require(v.waitForKeysWiped("old"))
        proxy.set(.held, forKey: a)
        for i in 0..<5 { try P.writeFile(v.path("new\(i)"), [UInt8(i)]) }
        for i in 0..<5 { #expect(try wrappedKeyIds(v, "new\(i)") == [b]) }
        #expect(try P.readFile(v.path("old")) == [1])
        // Only the first call for key A went out (and was held until the deadline); none since.
        #expect(proxy.fileCount("GenerateDataKey", key: a) == 2 && proxy.fileCount("Decrypt", key: a) == 0)
        #expect(v.daemonLogText.contains("new file /new0 wrapped without \(a): Timeout (gave up at the deadline"))
        #expect(v.daemonLogText.contains("new file /new1 wrapped without \(a): Timeout (not asked: it failed so"))
        proxy.set(.none, forKey: a)
    }

    @Test("A refused first key: creates wrap under the second and say so; opens ask the first key once per probe interval",
          arguments: ["disabled", "denied"])
    func refusedFirstKey(refusal: String) throws {
        let a = try moto.createKey(), b = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [a, b], proxy, mountArgs: ["--key-pool", "0", "--kms-probe-interval", "600"])
        for i in 0..<3 { try P.writeFile(v.path("old\(i)"), [UInt8(i)]) }
        try #require(v.waitForKeysWiped("old0", "old1", "old2"))
        proxy.set(refusal == "disabled" ? .disabled : .denied, forKey: a)
        let errorType = refusal == "disabled" ? "DisabledException" : "AccessDeniedException"

        for i in 0..<5 { try P.writeFile(v.path("new\(i)"), [UInt8(10 + i)]) }
        for i in 0..<5 { #expect(try wrappedKeyIds(v, "new\(i)") == [b]) }
        // Key A was asked once; the other creates went straight to key B.
        #expect(proxy.fileCount("GenerateDataKey", key: a) == 1 + 3)
        #expect(proxy.fileCount("GenerateDataKey", key: b) == 5)
        #expect(v.daemonLogText.contains("new file /new0 wrapped without \(a): \(errorType)"))
        #expect(v.daemonLogText.contains("kmsfs rewrap adds the missing keys later"))

        for i in 0..<3 { #expect(try P.readFile(v.path("old\(i)")) == [UInt8(i)]) }
        for i in 0..<5 { #expect(try P.readFile(v.path("new\(i)")) == [UInt8(10 + i)]) }
        // Key A was asked to Decrypt once (refusals are remembered per key and operation: a key policy may allow
        // one and not the other); the other opens went straight to key B.
        #expect(proxy.fileCount("Decrypt", key: a) == 1)
        #expect(v.daemonLogText.contains("/old0: unwrapped with key \(b) after \(a): \(errorType)"))
        // The audit log records the refused call.
        #expect(v.auditLines().contains { $0["op"] as? String == "GenerateDataKey" && $0["keyId"] as? String == a
            && $0["result"] as? String == errorType })

        // Once the key is back, rewrap adds it to the files that miss it.
        proxy.set(.none, forKey: a)
        _ = try v.unmount()
        let r = try run(kmsfsBinary, ["rewrap", v.cipher], environment: v.environment)
        #expect(r.status == 0, "\(r.stderr)")
        for i in 0..<5 { #expect(try wrappedKeyIds(v, "new\(i)").sorted() == [a, b].sorted()) }
        // And new files get both keys again.
        try v.start(["--key-pool", "0"])
        try P.writeFile(v.path("after"), [9])
        #expect(try wrappedKeyIds(v, "after") == [a, b])
        #expect(try P.readFile(v.path("new0")) == [10])
    }

    @Test("Repeated identical failures: five lines per ten seconds, the rest counted and reported")
    func repeatedFailuresRateLimited() throws {
        let a = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [a], proxy, mountArgs: ["--key-pool", "0"])
        proxy.set(.disabled, forKey: a)
        for i in 0..<8 { #expect(P.errno { try P.writeFile(v.path("f\(i)"), [1]) } == EIO) }
        _ = try v.unmount()
        let lines = v.daemonLogText.split(separator: "\n").filter { $0.contains("cannot create /f") }
        #expect(lines.count == 5, "\(v.daemonLogText)")
        #expect(v.daemonLogText.contains("3 more failure lines of kind create-\(a)-DisabledException were not logged"))
    }

    @Test("--require-all-keys refuses creates that a key cannot wrap, with a log line, until the key is back")
    func requireAllKeys() throws {
        let a = try moto.createKey(), b = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(keys: [a, b], proxy, mountArgs: ["--key-pool", "0", "--require-all-keys", "--kms-probe-interval", "1"])
        try P.writeFile(v.path("ok"), [1])
        proxy.set(.disabled, forKey: b)
        #expect(P.errno { try P.writeFile(v.path("refused"), [2]) } == EIO)
        #expect(P.errno { try P.stat(v.path("refused")) } == ENOENT)
        #expect(v.daemonLogText.contains("cannot create /refused: no data key from key \(b): DisabledException"))
        #expect(v.daemonLogText.contains("--require-all-keys"))
        #expect(try P.readFile(v.path("ok")) == [1])
        // The key comes back: once its refusal is probed again, creates work without a remount.
        proxy.set(.none, forKey: b)
        #expect(waitFor(seconds: 30) { (try? P.writeFile(v.path("later"), [3])) != nil })
        #expect(try wrappedKeyIds(v, "later") == [a, b])
    }
}
