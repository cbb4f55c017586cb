import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Synchronization
import Testing

@Suite("KMS failures: retries, outages, slow calls, TLS", .serialized)
struct KMSFailureTests {
    let moto: Moto
    init() throws { moto = try Moto.shared.get() }

    /// Without the key pool: its refills would meet the faults these tests inject for one operation at a time.
    /// A short deadline keeps failing calls short; failures are not remembered (probe interval 0) unless a test
    /// is about that.
    static let quick = ["--key-pool", "0", "--kms-deadline", "1.5", "--kms-probe-interval", "0"]

    func volume(_ key: String, _ proxy: KMSProxy, extra: [String: String] = [:], mountArgs: [String] = KMSFailureTests.quick) throws -> MountedVolume {
        var env = moto.clientEnvironment
        env["AWS_ENDPOINT_URL"] = proxy.url
        return try MountedVolume(chunkSize: 4096, initArgs: ["--kms", "aws", "--key-id", key], mountArgs: mountArgs, environment: env.merging(extra) { $1 })
    }

    @Test("Throttling is retried with backoff until it passes; a KMS that keeps failing gives EIO at the deadline")
    func retries() throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(key, proxy)
        try P.writeFile(v.path("f"), [1, 2, 3])
        #expect(v.waitForAudit("DiscardKey", count: 1))
        let atMount = proxy.count("Decrypt")  // the volume key's
        #expect(atMount == 1)

        proxy.set(.throttle(remaining: 2), forKey: key)
        #expect(try P.readFile(v.path("f")) == [1, 2, 3])
        #expect(proxy.count("Decrypt") == atMount + 3)
        #expect(v.auditLines().filter { $0["op"] as? String == "Decrypt" }.map { $0["result"] as? String } == ["ok"])
        #expect(v.waitForAudit("DiscardKey", count: 2))

        proxy.set(.serverError, forKey: key)
        #expect(P.errno { try P.readFile(v.path("f")) } == EIO)
        #expect(proxy.count("Decrypt") > 3 + 1)
        #expect(v.daemonLogText.contains("cannot open /f: cannot unwrap the data key with key \(key): HTTP500"))
        #expect(v.daemonLogText.contains("gave up at the deadline after"))
    }

    @Test("Open files keep working through a KMS outage; files opened meanwhile fail their first read with EIO and a log line")
    func outage() throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(key, proxy)
        try P.writeFile(v.path("open"), Array(repeating: 1, count: 10000))
        try P.writeFile(v.path("closed"), [2])
        try #require(v.waitForKeysWiped("open", "closed"))
        let fd = try P.open(v.path("open"), O_RDWR)
        defer { close(fd) }
        #expect(try P.pread(fd, 1, 0) == [1])  // the first read unwraps the key
        proxy.setAll(.down)
        try P.pwrite(fd, [9, 9, 9], 20000)
        #expect(try P.pread(fd, 3, 20000) == [9, 9, 9])
        #expect(try P.fstat(fd).st_size == 20003)
        #expect(P.errno { try P.readFile(v.path("closed")) } == EIO)
        #expect(v.daemonLogText.contains("cannot open /closed: cannot unwrap the data key with key \(key): ConnectionError"))
        // stat and listing need no KMS at all.
        #expect(try P.stat(v.path("closed")).st_size == 1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: v.mount).sorted() == ["closed", "open"])
        proxy.setAll(.none)
        #expect(try P.readFile(v.path("closed")) == [2])
    }

    @Test("A slow KMS call for one file does not stall opens of other files, nor I/O on open files")
    func slowCallsDoNotStall() throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(key, proxy, mountArgs: ["--key-pool", "0", "--kms-deadline", "60"])
        try P.writeFile(v.path("slow"), [1])
        for i in 0..<4 { try P.writeFile(v.path("fast\(i)"), [UInt8(i)]) }
        try P.writeFile(v.path("busy"), [7])
        // Until its release arrives, "slow" still holds its key and an open would share it without a KMS call.
        try #require(v.waitForKeysWiped("slow"))
        let busy = try P.open(v.path("busy"), O_RDWR)
        defer { close(busy) }
        let slowId = Hex.encode(try FileHeader(decoding: try P.readFile(v.backing("slow"))).fileId)
        proxy.set(.held, forKey: slowId)

        let done = Atomic<Bool>(false)
        let slowPath = v.path("slow")
        let slowReader = Thread { _ = try? P.readFile(slowPath); done.store(true, ordering: .relaxed) }
        slowReader.start()
        try #require(waitFor(seconds: 10) { proxy.heldCalls == 1 }, "the slow file's Decrypt never reached the KMS")
        // While that call hangs, other files open and open files are read and written.
        for i in 0..<4 { #expect(try P.readFile(v.path("fast\(i)")) == [UInt8(i)]) }
        try P.pwrite(busy, [8], 1)
        #expect(try P.pread(busy, 2, 0) == [7, 8])
        _ = try P.stat(v.path("slow"))
        // (The daemon's request timeout may have retried the held call meanwhile: then two are held.)
        let stillWaiting = !done.load(ordering: .relaxed) && proxy.heldCalls >= 1
        #expect(stillWaiting, "the other operations waited for the slow KMS call")
        proxy.set(.none, forKey: slowId)
        #expect(waitFor(seconds: 15) { done.load(ordering: .relaxed) })
    }

    @Test("Calls reuse connections (keep-alive), and concurrent calls run on connections of their own")
    func connectionReuse() throws {
        let arn = "arn:aws:kms:us-east-1:111122223333:key/reuse"
        // Once armed, the server holds each call until four are in flight at once (or 10 s have passed): a client
        // that serialized its calls would never get there.
        let gate = InFlightGate()
        let server = try TestHTTPServer(keepAlive: true) { r in
            guard r.kmsOperation == "DescribeKey" else { return .respond(.json(400, ["__type": "UnsupportedOperationException"])) }
            gate.hold(until: 4, seconds: 10)
            return .respond(.json(200, ["KeyMetadata": ["Arn": arn, "KeyState": "Enabled", "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT"]]))
        }
        var env = moto.clientEnvironment
        env["AWS_ENDPOINT_URL"] = server.url
        let client = KMSClient(settings: AWSSettings(region: nil, profile: nil, endpoint: nil, environment: env))
        for _ in 0..<5 { #expect(try client.describeKey("alias/x").arn == arn) }
        #expect(server.connections == 1)
        gate.arm()
        let finished = DispatchGroup()
        for _ in 0..<4 {
            finished.enter()
            Thread { _ = try? client.describeKey("alias/x"); finished.leave() }.start()
        }
        finished.wait()
        #expect(gate.maxInFlight == 4, "at most \(gate.maxInFlight) calls were in flight at once")
        #expect(server.connections <= 4 && server.requests.count == 9)
    }

    @Test("HTTPS with certificate verification: refused without the CA, accepted with AWS_CA_BUNDLE or the loopback-only switch")
    func tls() throws {
        let dir = try TempDir()
        let gen = try run("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                                      "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", dir.path + "/key.pem", "-out", dir.path + "/cert.pem"])
        try #require(gen.status == 0, "\(gen.stderr)")
        let server = try Moto(environment: [:], tls: (dir.path + "/cert.pem", dir.path + "/key.pem"))
        var env = server.clientEnvironment
        env["AWS_CA_BUNDLE"] = dir.path + "/cert.pem"
        let key = try server.python("print(boto3.client('kms', verify='\(dir.path)/cert.pem').create_key()['KeyMetadata']['Arn'])")
        var untrusted = env
        untrusted["AWS_CA_BUNDLE"] = ""
        let refused = try run(kmsfsBinary, ["init", "--kms", "aws", "--key-id", key, dir.path + "/a"], environment: untrusted)
        #expect(refused.status == 1 && refused.stderr.contains("certificate"), "\(refused.stderr)")
        let trusted = try run(kmsfsBinary, ["init", "--kms", "aws", "--key-id", key, dir.path + "/b"], environment: env)
        #expect(trusted.status == 0, "\(trusted.stderr)")
        untrusted["KMSFS_INSECURE_SKIP_TLS_VERIFY"] = "1"
        let skipped = try run(kmsfsBinary, ["init", "--kms", "aws", "--key-id", key, dir.path + "/c"], environment: untrusted)
        #expect(skipped.status == 0, "\(skipped.stderr)")
    }

    @Test("Temporary credentials are fetched again while mounted, before they expire")
    func refreshWhileMounted() throws {
        let auth = try AuthMoto.shared.get()
        let fetches = Atomic<Int>(0)
        let good = auth.good
        let creds = try TestHTTPServer { _ in
            fetches.add(1, ordering: .relaxed)
            var t = time(nil) + 4
            var tmv = tm()
            gmtime_r(&t, &tmv)
            let stamp = String(format: "%04d-%02d-%02dT%02d:%02d:%02dZ", tmv.tm_year + 1900, tmv.tm_mon + 1, tmv.tm_mday, tmv.tm_hour, tmv.tm_min, tmv.tm_sec)
            return .respond(.json(200, ["AccessKeyId": good.id, "SecretAccessKey": good.secret, "Expiration": stamp]))
        }
        var env = auth.moto.clientEnvironment
        env["AWS_ACCESS_KEY_ID"] = ""
        env["AWS_SECRET_ACCESS_KEY"] = ""
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = creds.url + "/creds"
        // Without the key pool, so that each create is a KMS call that needs credentials now.
        let v = try MountedVolume(initArgs: ["--kms", "aws", "--key-id", auth.keyArn], mountArgs: ["--key-pool", "0"], environment: env)
        let initFetches = fetches.load(ordering: .relaxed)
        try P.writeFile(v.path("a"), [1])
        let afterFirst = fetches.load(ordering: .relaxed)
        // The mount's unwrap of the volume key fetched credentials already; the first create may reuse them.
        #expect(afterFirst <= initFetches + 1)
        usleep(2_600_000)
        try P.writeFile(v.path("b"), [2])
        #expect(fetches.load(ordering: .relaxed) == afterFirst + 1)
        #expect(try P.readFile(v.path("a")) == [1])
        #expect(!v.auditLines().contains { ($0["result"] as? String) != "ok" })
    }
}

/// Counts requests in flight in a test server's handler and, once armed, holds each one until `count` are in
/// flight together.
final class InFlightGate: @unchecked Sendable {
    private let state = Mutex((armed: false, now: 0, max: 0))

    func arm() { state.withLock { $0.armed = true } }
    var maxInFlight: Int { state.withLock { $0.max } }

    func hold(until count: Int, seconds: Double) {
        let armed = state.withLock { s -> Bool in
            guard s.armed else { return false }
            s.now += 1
            s.max = Swift.max(s.max, s.now)
            return true
        }
        guard armed else { return }
        _ = waitFor(seconds: seconds) { maxInFlight >= count }
        state.withLock { $0.now -= 1 }
    }
}
