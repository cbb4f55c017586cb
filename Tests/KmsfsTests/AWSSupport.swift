import Foundation
import Glibc

/// A moto_server (the KMS-protocol test server): the one scripts/test started, or a private one.
final class Moto: @unchecked Sendable {
    let url: String
    let port: UInt16
    private let process: Process?
    let log: String?

    /// The server scripts/test started ($KMSFS_TEST_KMS_ENDPOINT), or one started for this test process.
    static let shared: Result<Moto, Error> = {
        if let e = ProcessInfo.processInfo.environment["KMSFS_TEST_KMS_ENDPOINT"], let port = UInt16(e.split(separator: ":").last ?? "") {
            return .success(Moto(url: e, port: port))
        }
        return Result { try Moto(environment: [:]) }
    }()

    /// Servers this process started and has not stopped; the shared ones live until the process exits.
    private static let started = Mutex<Set<Int32>>([])
    private static let stopAtExit: Void = { atexit { for pid in Moto.started.withLock({ $0 }) { kill(pid, SIGTERM) } } }()

    private init(url: String, port: UInt16) {
        self.url = url
        self.port = port
        process = nil
        log = nil
    }

    /// Starts a private server. `authEnforced`: after setup (see `enforceAuth`), every request must be signed
    /// by an IAM user created in it. `tls`: serve HTTPS with this certificate and key.
    init(environment: [String: String], authEnforced: Bool = false, tls: (cert: String, key: String)? = nil) throws {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &len) } }
        close(s)
        port = UInt16(bigEndian: addr.sin_port)
        url = "\(tls == nil ? "http" : "https")://127.0.0.1:\(port)"
        let p = Process()
        let server = ProcessInfo.processInfo.environment["KMSFS_TEST_MOTO_SERVER"] ?? "moto_server"
        var args = ["-H", "127.0.0.1", "-p", String(port)]
        if let tls { args += ["-c", tls.cert, "-k", tls.key] }
        // The test runner starts children with SIGTERM ignored; give moto default signal handling back so
        // it can be stopped.
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [ProcessInfo.processInfo.environment["KMSFS_TEST_PYTHON"] ?? "python3", "-c",
                       "import os, signal, sys\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP): signal.signal(s, signal.SIG_DFL)\n"
                       + "signal.pthread_sigmask(signal.SIG_SETMASK, [])\nos.execvp(sys.argv[1], sys.argv[1:])", server] + args
        var env = ProcessInfo.processInfo.environment
        if authEnforced { env["INITIAL_NO_AUTH_ACTION_COUNT"] = "100000" }
        for (k, v) in environment { env[k] = v }
        p.environment = env
        let logPath = FileManager.default.temporaryDirectory.path + "/moto-\(port).log"
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        p.standardOutput = FileHandle(forWritingAtPath: logPath)
        p.standardError = FileHandle(forWritingAtPath: logPath)
        try p.run()
        process = p
        log = logPath
        Moto.stopAtExit
        Moto.started.withLock { _ = $0.insert(p.processIdentifier) }
        // A readiness wait, not an assertion: moto_server starts slowly on a loaded machine.
        for _ in 0..<1200 {
            let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            addr.sin_port = port.bigEndian
            let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(c, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            close(c)
            if ok == 0 { return }
            if !p.isRunning { break }
            usleep(50_000)
        }
        throw TestFailure("moto_server did not start on port \(port)")
    }

    deinit {
        if let p = process, p.isRunning {
            Moto.started.withLock { _ = $0.remove(p.processIdentifier) }
            p.terminate()
            p.waitUntilExit()
        }
    }

    /// Credentials, region and endpoint for clients of this server (moto accepts any key until auth is enforced).
    var clientEnvironment: [String: String] {
        ["AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
         "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true",
         "AWS_SESSION_TOKEN": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"]
    }

    /// Runs a Python script with boto3 against this server; returns what it printed.
    @discardableResult
    func python(_ script: String, environment: [String: String] = [:]) throws -> String {
        let py = ProcessInfo.processInfo.environment["KMSFS_TEST_PYTHON"] ?? "python3"
        let r = try run(py, ["-c", "import boto3, json, base64\nkms = boto3.client('kms')\n" + script],
                        environment: clientEnvironment.merging(environment) { _, b in b })
        guard r.status == 0 else { throw TestFailure("python failed: \(r.stderr)") }
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// A new symmetric key's ARN.
    func createKey(alias: String? = nil) throws -> String {
        var script = "arn = kms.create_key(Description='kmsfs test')['KeyMetadata']['Arn']\n"
        if let alias { script += "kms.create_alias(AliasName='\(alias)', TargetKeyId=arn)\n" }
        return try python(script + "print(arn)")
    }

    func disableKey(_ arn: String) throws {
        // moto's DisableKey wants the key ID, not the ARN.
        try python("kms.disable_key(KeyId='\(arn)'.split('/')[-1])")
    }

    /// Makes every following request need a valid signature from an IAM user of this server.
    func enforceAuth() throws {
        try python("""
            import urllib.request
            urllib.request.urlopen(urllib.request.Request('\(url)/moto-api/reset-auth', data=b'0',
                headers={'Content-Type': 'application/json'}, method='POST')).read()
            """)
    }
}

/// A fault-injecting proxy in front of moto: it adds the key states moto does not enforce (a key marked
/// disabled here answers DisabledException, as AWS KMS does), and can throttle, fail, slow down or go away.
final class KMSProxy: @unchecked Sendable {
    enum Fault: Sendable {
        case none
        case disabled
        case throttle(remaining: Int)
        /// Throttle this fraction of calls, at random.
        case throttleSome(Double)
        case serverError
        /// Answer this fraction of calls with a 500, at random.
        case serverErrorSome(Double)
        /// AccessDeniedException, as for a key policy that does not allow the caller.
        case denied
        /// Hold each call until the fault is changed (at most 60 s), then forward it.
        case held
        case down
    }

    let server: TestHTTPServer
    private let faults = Mutex<[String: Fault]>([:])
    private let global = Mutex<Fault>(.none)
    private let heldNow = Atomic<Int>(0)
    var url: String { server.url }
    func count(_ op: String) -> Int { server.count(op) }
    func count(_ op: String, key: String) -> Int { server.count(op, key: key) }
    func fileCount(_ op: String, key: String? = nil) -> Int { server.fileCount(op, key: key) }
    /// Calls being held by `.held` right now.
    var heldCalls: Int { heldNow.load(ordering: .relaxed) }

    init(upstream: Moto) throws {
        let box = Box()
        server = try TestHTTPServer { request in box.proxy!.decide(request, upstream: upstream.port) }
        box.proxy = self
    }

    private final class Box: @unchecked Sendable { weak var proxy: KMSProxy? }

    /// A fault for calls naming `keyArn` (KeyId, SourceKeyId or DestinationKeyId), or for one file's calls
    /// when given its file ID.
    func set(_ fault: Fault, forKey keyArn: String) { faults.withLock { $0[keyArn] = fault } }
    /// A fault for every call.
    func setAll(_ fault: Fault) { global.withLock { $0 = fault } }

    private func decide(_ r: TestHTTPServer.Request, upstream: UInt16) -> TestHTTPServer.Action {
        let json = r.json
        var named = ["KeyId", "SourceKeyId", "DestinationKeyId"].compactMap { json[$0] as? String }
        // Faults can also target one file, by the file ID in its encryption context.
        if let fileId = (json["EncryptionContext"] as? [String: String])?["kmsfs:file-id"] { named.append(fileId) }
        var fault = current(named)
        // Holding targets the calls for files: the volume key's unwrap (one per mount or rewrap) goes through.
        let volumeKeyCall = (json["EncryptionContext"] as? [String: String])?["kmsfs:purpose"] != nil
        if case .held = fault, !volumeKeyCall {
            heldNow.add(1, ordering: .relaxed)
            _ = waitFor(seconds: 60) { if case .held = current(named) { false } else { true } }
            heldNow.subtract(1, ordering: .relaxed)
            fault = .none
        }
        switch fault {
        case .none: return .forward(upstream)
        case .disabled:
            return .respond(.json(400, ["__type": "DisabledException", "message": "\(named.first ?? "the key") is disabled."]))
        case .throttle(let n):
            if n <= 0 { return .forward(upstream) }
            decrement(named)
            return .respond(.json(400, ["__type": "ThrottlingException", "message": "Rate exceeded"]))
        case .serverError:
            return .respond(.text(500, "<html><body><h1>500 Internal Server Error</h1></body></html>", type: "text/html"))
        case .throttleSome(let p):
            if Double.random(in: 0..<1) >= p { return .forward(upstream) }
            return .respond(.json(400, ["__type": "ThrottlingException", "message": "Rate exceeded"]))
        case .serverErrorSome(let p):
            if Double.random(in: 0..<1) >= p { return .forward(upstream) }
            return .respond(.text(500, "<html><body><h1>500 Internal Server Error</h1></body></html>", type: "text/html"))
        case .denied:
            return .respond(.json(400, ["__type": "AccessDeniedException",
                                        "message": "User: arn:aws:iam::111122223333:user/test is not authorized to perform this operation on \(named.first ?? "the key") because no identity-based policy allows it"]))
        case .down:
            return .hangUp
        case .held:
            return .forward(upstream)
        }
    }

    private func current(_ named: [String]) -> Fault {
        let fault = global.withLock { $0 }
        if case .none = fault {
            return faults.withLock { f in named.compactMap { f[$0] }.first } ?? .none
        }
        return fault
    }

    private func decrement(_ named: [String]) {
        global.withLock { g in if case .throttle(let n) = g { g = .throttle(remaining: n - 1) } }
        faults.withLock { f in
            for k in named { if case .throttle(let n) = f[k] { f[k] = .throttle(remaining: n - 1) } }
        }
    }
}

import Synchronization
