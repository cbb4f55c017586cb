import Foundation
import Glibc
import KmsfsKeys
import KmsfsSystem
import Synchronization
import Testing

/// A moto server that checks every signature against IAM users and policies created in it.
final class AuthMoto: @unchecked Sendable {
    let moto: Moto
    let keyArn: String
    let good: (id: String, secret: String)
    let noDecrypt: (id: String, secret: String)
    let roleArn: String

    static let shared: Result<AuthMoto, Error> = Result { try AuthMoto() }

    private init() throws {
        moto = try Moto(environment: [:], authEnforced: true)
        let out = try moto.python("""
            iam = boto3.client('iam')
            arn = kms.create_key(Description='auth')['KeyMetadata']['Arn']
            allow = {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Action': ['kms:*', 'sts:*'], 'Resource': '*'}]}
            deny = {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Action': 'kms:*', 'Resource': '*'},
                                                          {'Effect': 'Deny', 'Action': 'kms:Decrypt', 'Resource': '*'}]}
            pa = iam.create_policy(PolicyName='allow', PolicyDocument=json.dumps(allow))['Policy']['Arn']
            pd = iam.create_policy(PolicyName='nodecrypt', PolicyDocument=json.dumps(deny))['Policy']['Arn']
            keys = {}
            for user, policy in (('good', pa), ('nodecrypt', pd)):
                iam.create_user(UserName=user)
                iam.attach_user_policy(UserName=user, PolicyArn=policy)
                k = iam.create_access_key(UserName=user)['AccessKey']
                keys[user] = [k['AccessKeyId'], k['SecretAccessKey']]
            trust = {'Version': '2012-10-17', 'Statement': [{'Effect': 'Allow', 'Principal': {'Federated': 'idp.example.com'},
                                                            'Action': 'sts:AssumeRoleWithWebIdentity'}]}
            role = iam.create_role(RoleName='web', AssumeRolePolicyDocument=json.dumps(trust))['Role']['Arn']
            iam.attach_role_policy(RoleName='web', PolicyArn=pa)
            print(json.dumps({'key': arn, 'keys': keys, 'role': role}))
            """)
        let obj = try JSONSerialization.jsonObject(with: Data(out.utf8)) as! [String: Any]
        let keys = obj["keys"] as! [String: [String]]
        keyArn = obj["key"] as! String
        good = (keys["good"]![0], keys["good"]![1])
        noDecrypt = (keys["nodecrypt"]![0], keys["nodecrypt"]![1])
        roleArn = obj["role"] as! String
        try moto.enforceAuth()
    }

    /// Environment for kmsfs with these credentials (and no other source).
    func environment(id: String, secret: String) -> [String: String] {
        moto.clientEnvironment.merging(["AWS_ACCESS_KEY_ID": id, "AWS_SECRET_ACCESS_KEY": secret]) { $1 }
    }
}

@Suite("AWS credentials, signatures and refusals", .serialized)
struct CredentialTests {
    /// Settings with nothing from the test runner's own environment.
    func settings(_ env: [String: String], profile: String? = nil) -> AWSSettings {
        let base = ["HOME": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": "us-east-1"]
        return AWSSettings(region: nil, profile: profile, endpoint: nil, environment: base.merging(env) { $1 })
    }

    @Test("Environment variables, with a session token")
    func environmentCredentials() throws {
        let c = try KMSClient(settings: settings(["AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "VERYSECRETVALUE", "AWS_SESSION_TOKEN": "tok"]))
            .credentials.current()
        #expect(c.accessKeyId == "AKIAENV" && c.sessionToken == "tok" && c.source == "environment" && c.expiration == nil)
        // The secret is never printed.
        #expect(!"\(c)".contains("VERYSECRETVALUE") && !String(reflecting: c).contains("VERYSECRETVALUE"))
        let none = KMSClient(settings: settings([:]))
        #expect { try none.credentials.current() } throws: { ($0 as? KeyError)?.errorType == "NoCredentials" }
    }

    @Test("Shared credentials and config files with profiles: AWS_PROFILE, --profile, the files' locations")
    func profiles() throws {
        let dir = try TempDir()
        try writeText(dir.path + "/credentials", "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n\n[dev]\naws_access_key_id=AKIADEV\naws_secret_access_key=x\naws_session_token = devtoken\n")
        try writeText(dir.path + "/config", "[default]\nregion = us-east-2\n[profile dev]\nregion = eu-west-1\ns3 =\n  max_concurrent_requests = 10\n")
        let files = ["AWS_SHARED_CREDENTIALS_FILE": dir.path + "/credentials", "AWS_CONFIG_FILE": dir.path + "/config", "AWS_REGION": ""]
        let d = settings(files)
        #expect(d.region == "us-east-2")
        #expect(try KMSClient(settings: d).credentials.current().accessKeyId == "AKIADEFAULT")
        let viaEnv = settings(files.merging(["AWS_PROFILE": "dev", "AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "e"]) { $1 })
        let c = try KMSClient(settings: viaEnv).credentials.current()
        #expect(c.accessKeyId == "AKIADEV" && c.sessionToken == "devtoken" && c.source == "profile dev" && viaEnv.region == "eu-west-1")
        let explicit = settings(files, profile: "dev")
        #expect(try KMSClient(settings: explicit).credentials.current().accessKeyId == "AKIADEV")
        // Without a named profile, environment variables come first.
        let envFirst = settings(files.merging(["AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "e"]) { $1 })
        #expect(try KMSClient(settings: envFirst).credentials.current().accessKeyId == "AKIAENV")
        let missing = KMSClient(settings: settings(files, profile: "nope"))
        #expect { try missing.credentials.current() } throws: { ($0 as? KeyError)?.message.contains("profile \"nope\" is not in") == true }
    }

    @Test("Container credentials: full URI, authorization token from a file, refreshed before they expire")
    func containerCredentials() throws {
        let fetches = Atomic<Int>(0)
        let server = try TestHTTPServer { request in
            guard request.path == "/v2/credentials", request.headers["authorization"] == "Bearer secret-token" else {
                return .respond(.text(401, "no"))
            }
            let n = fetches.add(1, ordering: .relaxed).newValue
            var t = time(nil) + 8
            var tmv = tm()
            gmtime_r(&t, &tmv)
            let stamp = String(format: "%04d-%02d-%02dT%02d:%02d:%02dZ", tmv.tm_year + 1900, tmv.tm_mon + 1, tmv.tm_mday, tmv.tm_hour, tmv.tm_min, tmv.tm_sec)
            return .respond(.json(200, ["AccessKeyId": "ASIACONTAINER\(n)", "SecretAccessKey": "s", "Token": "t\(n)", "Expiration": stamp]))
        }
        let dir = try TempDir()
        try writeText(dir.path + "/token", "Bearer secret-token\n")
        let client = KMSClient(settings: settings(["AWS_CONTAINER_CREDENTIALS_FULL_URI": server.url + "/v2/credentials",
                                                   "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": dir.path + "/token"]))
        let first = try client.credentials.current()
        #expect(first.accessKeyId == "ASIACONTAINER1" && first.sessionToken == "t1" && first.expiration != nil)
        #expect(try client.credentials.current().accessKeyId == "ASIACONTAINER1")
        #expect(fetches.load(ordering: .relaxed) == 1)
        // Eight-second credentials are refreshed once half their lifetime is left. Timestamps are whole seconds,
        // so that is 3 to 4 s after the fetch: the cache hit above has at least 3 s, the refresh 0.6 s of margin.
        usleep(4_600_000)
        #expect(try client.credentials.current().accessKeyId == "ASIACONTAINER2")
        #expect(fetches.load(ordering: .relaxed) == 2)
        // Plain http to a non-loopback host is refused.
        let remote = KMSClient(settings: settings(["AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://203.0.113.9/creds"]))
        #expect { try remote.credentials.current() } throws: { ($0 as? KeyError)?.errorType == "InvalidContainerCredentialsURI" }
    }

    @Test("EC2 instance metadata with IMDSv2 session tokens")
    func instanceMetadata() throws {
        let server = try TestHTTPServer { r in
            switch (r.method, r.path) {
            case ("PUT", "/latest/api/token"):
                return r.headers["x-aws-ec2-metadata-token-ttl-seconds"] == nil ? .respond(.text(400, "ttl")) : .respond(.text(200, "imds-session-token"))
            case ("GET", "/latest/meta-data/iam/security-credentials/"):
                return r.headers["x-aws-ec2-metadata-token"] == "imds-session-token" ? .respond(.text(200, "instance-role\n")) : .respond(.text(401, ""))
            case ("GET", "/latest/meta-data/iam/security-credentials/instance-role"):
                guard r.headers["x-aws-ec2-metadata-token"] == "imds-session-token" else { return .respond(.text(401, "")) }
                return .respond(.json(200, ["Code": "Success", "AccessKeyId": "ASIAIMDS", "SecretAccessKey": "s", "Token": "imds",
                                            "Expiration": "2099-01-01T00:00:00Z"]))
            default:
                return .respond(.text(404, ""))
            }
        }
        let client = KMSClient(settings: settings(["AWS_EC2_METADATA_DISABLED": "false", "AWS_EC2_METADATA_SERVICE_ENDPOINT": server.url]))
        let c = try client.credentials.current()
        #expect(c.accessKeyId == "ASIAIMDS" && c.sessionToken == "imds" && c.source == "instance role instance-role")
        #expect(server.requests.map { "\($0.method) \($0.path)" } == ["PUT /latest/api/token", "GET /latest/meta-data/iam/security-credentials/",
                                                                       "GET /latest/meta-data/iam/security-credentials/instance-role"])
    }

    @Test("Web identity: AssumeRoleWithWebIdentity at STS, then KMS calls signed with the role's temporary credentials")
    func webIdentity() throws {
        // moto's STS needs no signature for this call only when its auth enforcement is off (AWS never needs one).
        let moto = try Moto.shared.get()
        let proxy = try KMSProxy(upstream: moto)
        let dir = try TempDir()
        try writeText(dir.path + "/token", "eyJhbGciOiJSUzI1NiJ9.e30.signature\n")
        var env = moto.clientEnvironment
        env["AWS_ACCESS_KEY_ID"] = ""
        env["AWS_SECRET_ACCESS_KEY"] = ""
        env["AWS_WEB_IDENTITY_TOKEN_FILE"] = dir.path + "/token"
        env["AWS_ROLE_ARN"] = "arn:aws:iam::123456789012:role/kmsfs-web"
        env["AWS_ROLE_SESSION_NAME"] = "kmsfs-test"
        env["AWS_ENDPOINT_URL_STS"] = moto.url
        env["AWS_ENDPOINT_URL"] = proxy.url
        let client = KMSClient(settings: AWSSettings(region: nil, profile: nil, endpoint: nil, environment: env))
        let c = try client.credentials.current()
        #expect(c.accessKeyId.hasPrefix("ASIA") && c.sessionToken != nil && c.expiration != nil)
        #expect(c.source == "web identity (arn:aws:iam::123456789012:role/kmsfs-web)")
        // kmsfs end to end: every KMS request is signed with the role's key and carries its session token.
        let key = try moto.createKey()
        let v = try MountedVolume(initArgs: ["--kms", "aws", "--key-id", key], environment: env)
        try P.writeFile(v.path("f"), [4, 5, 6])
        try v.remount()
        #expect(try P.readFile(v.path("f")) == [4, 5, 6])
        let kmsRequests = proxy.server.requests.filter { $0.kmsOperation != nil }
        #expect(kmsRequests.count >= 3)
        #expect(kmsRequests.allSatisfy {
            ($0.headers["authorization"] ?? "").contains("Credential=ASIA") && ($0.headers["x-amz-security-token"] ?? "").count > 20
        })
    }

    @Test("The server verifies signatures: the right secret is accepted, a wrong one refused with a clear error")
    func signaturesVerified() throws {
        let auth = try AuthMoto.shared.get()
        let right = auth.environment(id: auth.good.id, secret: auth.good.secret)
        let wrong = auth.environment(id: auth.good.id, secret: auth.good.secret + "x")
        let dir = try TempDir()
        let refused = try run(kmsfsBinary, ["init", "--kms", "aws", "--key-id", auth.keyArn, dir.path + "/v"], environment: wrong)
        #expect(refused.status == 1 && refused.stderr.contains("not allowed (SignatureDoesNotMatch)"), "\(refused.stderr)")

        let v = try MountedVolume(initArgs: ["--kms", "aws", "--key-id", auth.keyArn], environment: right)
        try P.writeFile(v.path("f"), [1, 2, 3])
        try v.unmount()
        #expect(try v.offlineContents("f") == [1, 2, 3])
        // Mounting unwraps the volume key: with a wrong secret the mount is refused, with one clear line.
        let refusedMount = try run(kmsfsBinary, ["mount", v.cipher, v.mount], environment: v.environment.merging(wrong) { $1 })
        #expect(refusedMount.status == 1 && refusedMount.stderr.contains("cannot unwrap the volume key of \(v.cipher) with key \(auth.keyArn): SignatureDoesNotMatch"),
                "\(refusedMount.stderr)")

        // A format 2 volume (no volume key) mounted with a wrong secret mounts (no KMS call) but cannot open files.
        let bad = try MountedVolume(initArgs: ["--kms", "aws", "--key-id", auth.keyArn, "--format-version", "2"], environment: right)
        try P.writeFile(bad.path("f"), [7])
        try bad.unmount()
        let wrongMount = try MountedVolumeRestart(bad, environment: wrong)
        #expect(P.errno { try P.readFile(wrongMount.path("f")) } == EACCES)
        #expect(wrongMount.daemonLogText.contains("cannot open /f: cannot unwrap the data key with key \(auth.keyArn): SignatureDoesNotMatch"))
        #expect(!wrongMount.daemonLogText.contains(auth.good.secret))
    }

    @Test("A principal denied kms:Decrypt gets EACCES on first read, with one log line naming the file, key and error")
    func accessDenied() throws {
        let auth = try AuthMoto.shared.get()
        let good = auth.environment(id: auth.good.id, secret: auth.good.secret)
        let noDecrypt = auth.environment(id: auth.noDecrypt.id, secret: auth.noDecrypt.secret)
        // Format 3: the volume key cannot be unwrapped, so the mount is refused with one line.
        let v3 = try MountedVolume(initArgs: ["--kms", "aws", "--key-id", auth.keyArn], environment: good)
        try v3.unmount()
        let refused = try run(kmsfsBinary, ["mount", v3.cipher, v3.mount], environment: v3.environment.merging(noDecrypt) { $1 })
        #expect(refused.status == 1 && refused.stderr.contains("cannot unwrap the volume key") && refused.stderr.contains("AccessDenied"), "\(refused.stderr)")
        // Format 2 (no volume key): the mount goes on, and each file's open is refused.
        let v = try MountedVolume(initArgs: ["--kms", "aws", "--key-id", auth.keyArn, "--format-version", "2"], environment: good)
        try P.writeFile(v.path("secret"), Array("top".utf8))
        try v.unmount()
        let denied = try MountedVolumeRestart(v, environment: auth.environment(id: auth.noDecrypt.id, secret: auth.noDecrypt.secret))
        #expect(P.errno { try P.readFile(denied.path("secret")) } == EACCES)
        let lines = denied.daemonLogText.split(separator: "\n").filter { $0.contains("cannot open /secret") }
        #expect(lines.count == 1 && lines[0].contains("AccessDenied") && lines[0].contains(auth.keyArn), "\(denied.daemonLogText)")
        // Creating still works: GenerateDataKey is allowed.
        try P.writeFile(denied.path("new"), [1])
        // moto reports IAM refusals as the XML error "AccessDenied" (AWS KMS says AccessDeniedException); kmsfs passes on
        // whichever the server said.
        #expect(denied.auditLines().contains { $0["op"] as? String == "Decrypt" && ($0["result"] as? String)?.hasPrefix("AccessDenied") == true })
    }
}

/// Mounts an existing volume again with another environment (other credentials).
func MountedVolumeRestart(_ v: MountedVolume, environment: [String: String]) throws -> MountedVolume {
    try MountedVolume(existing: v, environment: environment)
}
