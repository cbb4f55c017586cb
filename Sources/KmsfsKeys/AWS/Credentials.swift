import Foundation
import Glibc
import KmsfsCrypto
import KmsfsSystem

/// The AWS credential chain, in the SDKs' order: environment variables (skipped when a profile is named
/// explicitly), the shared credentials/config files' profile, web identity (AssumeRoleWithWebIdentity),
/// container credentials, and EC2 instance metadata (IMDSv2). The first source that is configured is used.
///
/// Temporary credentials are cached and fetched again shortly before they expire (within five minutes, or
/// half their lifetime when that is shorter), on the first call that needs them.
public final class CredentialChain: @unchecked Sendable {
    private let settings: AWSSettings
    private let http: HTTPClient
    private let lock = Lock()
    private var cached: AWSCredentials?
    private var refreshAt: Double = 0
    private var source: Source?

    enum Source {
        case environment
        case profile(String)
        case webIdentity(tokenFile: String, roleArn: String, sessionName: String)
        case container(url: String, token: String?, tokenFile: String?)
        case instanceMetadata(endpoint: String)
    }

    init(settings: AWSSettings, http: HTTPClient) {
        self.settings = settings
        self.http = http
    }

    /// Valid credentials, fetching or refreshing them if needed.
    public func current() throws -> AWSCredentials {
        try lock.withLock {
            if let c = cached, now() < refreshAt { return c }
            if source == nil { source = try resolveSource() }
            let c = try fetch(source!)
            cached = c
            if let exp = c.expiration {
                let lifetime = max(exp - now(), 0)
                refreshAt = exp - min(300, lifetime / 2)
            } else {
                refreshAt = .infinity
            }
            return c
        }
    }

    /// Forgets cached credentials (after the service said they expired).
    public func invalidate() {
        lock.withLock { cached = nil }
    }

    /// Which source the chain uses (resolved on first use), for messages.
    public var sourceDescription: String {
        lock.withLock { cached?.source ?? "not yet resolved" }
    }

    // MARK: - resolution

    func resolveSource() throws -> Source {
        let env = settings.environment
        if !settings.profileExplicit, let id = env["AWS_ACCESS_KEY_ID"], !id.isEmpty,
           let secret = env["AWS_SECRET_ACCESS_KEY"], !secret.isEmpty {
            return .environment
        }
        let profile = settings.profileSettings
        if settings.profileExplicit && profile == nil {
            throw KeyError(.other, errorType: "ProfileNotFound", keyId: "",
                           message: "AWS profile \"\(settings.profile)\" is not in \(settings.files.credentialsPath) or \(settings.files.configPath)")
        }
        if let p = profile, p["aws_access_key_id"] != nil, p["aws_secret_access_key"] != nil {
            return .profile(settings.profile)
        }
        let sessionName = env["AWS_ROLE_SESSION_NAME"] ?? profile?["role_session_name"] ?? "kmsfs-\(getpid())"
        if let tokenFile = env["AWS_WEB_IDENTITY_TOKEN_FILE"], !tokenFile.isEmpty, let role = env["AWS_ROLE_ARN"], !role.isEmpty {
            return .webIdentity(tokenFile: tokenFile, roleArn: role, sessionName: sessionName)
        }
        if let p = profile, let tokenFile = p["web_identity_token_file"], let role = p["role_arn"] {
            return .webIdentity(tokenFile: tokenFile, roleArn: role, sessionName: sessionName)
        }
        let token = env["AWS_CONTAINER_AUTHORIZATION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
        let tokenFile = env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"].flatMap { $0.isEmpty ? nil : $0 }
        if let relative = env["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"], !relative.isEmpty {
            return .container(url: "http://169.254.170.2" + relative, token: token, tokenFile: tokenFile)
        }
        if let full = env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], !full.isEmpty {
            guard full.hasPrefix("https://") || CredentialChain.isAllowedContainerHost(HTTPClient.host(full)) else {
                throw KeyError(.other, errorType: "InvalidContainerCredentialsURI", keyId: "",
                               message: "AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, or http to a loopback or ECS/EKS link-local address")
            }
            return .container(url: full, token: token, tokenFile: tokenFile)
        }
        if (env["AWS_EC2_METADATA_DISABLED"] ?? "").lowercased() != "true" {
            return .instanceMetadata(endpoint: env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] ?? "http://169.254.169.254")
        }
        throw KeyError(.other, errorType: "NoCredentials", keyId: "",
                       message: "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, configure a profile, or run with a role")
    }

    static func isAllowedContainerHost(_ host: String) -> Bool {
        HTTPClient.isLoopback("http://\(host)/") || host == "169.254.170.2" || host == "169.254.170.23" || host.lowercased() == "fd00:ec2::23"
    }

    // MARK: - fetching

    private func fetch(_ source: Source) throws -> AWSCredentials {
        let env = settings.environment
        switch source {
        case .environment:
            return try AWSCredentials(accessKeyId: env["AWS_ACCESS_KEY_ID"]!, secretAccessKey: env["AWS_SECRET_ACCESS_KEY"]!,
                                      sessionToken: env["AWS_SESSION_TOKEN"], expiration: nil, source: "environment")
        case .profile(let name):
            let p = settings.profileSettings ?? [:]
            return try AWSCredentials(accessKeyId: p["aws_access_key_id"]!, secretAccessKey: p["aws_secret_access_key"]!,
                                      sessionToken: p["aws_session_token"], expiration: nil, source: "profile \(name)")
        case .webIdentity(let tokenFile, let roleArn, let sessionName):
            return try assumeRoleWithWebIdentity(tokenFile: tokenFile, roleArn: roleArn, sessionName: sessionName)
        case .container(let url, let token, let tokenFile):
            var headers: [(String, String)] = [("Accept", "application/json")]
            if let f = tokenFile {
                let t = try readTrimmed(f, what: "container authorization token file")
                headers.append(("Authorization", t))
            } else if let t = token {
                headers.append(("Authorization", t))
            }
            let r = try get(url, headers: headers, what: "container credentials")
            return try credentialsFromJSON(r, source: "container credentials")
        case .instanceMetadata(let endpoint):
            let base = endpoint.hasSuffix("/") ? String(endpoint.dropLast()) : endpoint
            let tokenResponse = try send(HTTPRequest(method: "PUT", url: base + "/latest/api/token",
                                                     headers: [("X-aws-ec2-metadata-token-ttl-seconds", "21600")]),
                                         what: "the instance metadata token")
            let token = tokenResponse.trimmingCharacters(in: .whitespacesAndNewlines)
            let roles = try get(base + "/latest/meta-data/iam/security-credentials/", headers: [("X-aws-ec2-metadata-token", token)],
                                what: "the instance role")
            guard let role = roles.split(separator: "\n").first.map({ $0.trimmingCharacters(in: .whitespaces) }), !role.isEmpty else {
                throw KeyError(.other, errorType: "NoCredentials", keyId: "", message: "the instance has no IAM role")
            }
            let r = try get(base + "/latest/meta-data/iam/security-credentials/" + role, headers: [("X-aws-ec2-metadata-token", token)],
                            what: "instance role credentials")
            return try credentialsFromJSON(r, source: "instance role \(role)")
        }
    }

    private func assumeRoleWithWebIdentity(tokenFile: String, roleArn: String, sessionName: String) throws -> AWSCredentials {
        let token = try readTrimmed(tokenFile, what: "web identity token file")
        let form = [("Action", "AssumeRoleWithWebIdentity"), ("Version", "2011-06-15"), ("RoleArn", roleArn),
                    ("RoleSessionName", sessionName), ("WebIdentityToken", token)]
            .map { "\($0.0)=\(SigV4.uriEncode($0.1))" }.joined(separator: "&")
        let body = try SecureBuffer(capacity: form.utf8.count)
        try body.append(form)
        let xml = try send(HTTPRequest(method: "POST", url: settings.stsEndpoint(region: settings.region),
                                       headers: [("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")], body: body),
                           what: "AssumeRoleWithWebIdentity")
        guard let id = CredentialChain.xmlValue("AccessKeyId", in: xml), let secret = CredentialChain.xmlValue("SecretAccessKey", in: xml) else {
            throw KeyError(.other, errorType: "InvalidResponse", keyId: roleArn, message: "AssumeRoleWithWebIdentity returned no credentials")
        }
        return try AWSCredentials(accessKeyId: id, secretAccessKey: secret, sessionToken: CredentialChain.xmlValue("SessionToken", in: xml),
                                  expiration: CredentialChain.xmlValue("Expiration", in: xml).flatMap(CredentialChain.parseTime),
                                  source: "web identity (\(roleArn))")
    }

    private func credentialsFromJSON(_ text: String, source: String) throws -> AWSCredentials {
        guard let obj = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any],
              let id = obj["AccessKeyId"] as? String, let secret = obj["SecretAccessKey"] as? String else {
            throw KeyError(.other, errorType: "InvalidResponse", keyId: "", message: "\(source): the answer holds no credentials")
        }
        return try AWSCredentials(accessKeyId: id, secretAccessKey: secret, sessionToken: obj["Token"] as? String,
                                  expiration: (obj["Expiration"] as? String).flatMap(CredentialChain.parseTime), source: source)
    }

    private func get(_ url: String, headers: [(String, String)], what: String) throws -> String {
        try send(HTTPRequest(method: "GET", url: url, headers: headers.map { (name: $0.0, value: $0.1) }), what: what)
    }

    private func send(_ request: HTTPRequest, what: String) throws -> String {
        var last: Error? = nil
        for attempt in 0..<3 {
            if attempt > 0 { usleep(useconds_t(100_000 * attempt)) }
            do {
                let r = try http.perform(request)
                let text = r.body.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
                if r.status == 200 { return text }
                if r.status < 500 && r.status != 429 {
                    throw KeyError(r.status == 401 || r.status == 403 ? .accessDenied : .other, errorType: "HTTP\(r.status)", keyId: "",
                                   message: "\(what): \(HTTPClient.hostPart(request.url)) answered \(r.status)")
                }
                last = KeyError(.unreachable, errorType: "HTTP\(r.status)", keyId: "", message: "\(what): \(HTTPClient.hostPart(request.url)) answered \(r.status)")
            } catch let e as TransportError {
                last = KeyError(.unreachable, errorType: "ConnectionError", keyId: "", message: "\(what): \(e.message)")
            }
        }
        throw last!
    }

    private func readTrimmed(_ path: String, what: String) throws -> String {
        do {
            return String(decoding: try FileIO.readFile(path), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        } catch {
            throw KeyError(.other, errorType: "CredentialsFileUnreadable", keyId: "", message: "cannot read \(what) \(path): \(error)")
        }
    }

    private func now() -> Double { Double(time(nil)) }

    /// The text of the first <tag>...</tag>.
    static func xmlValue(_ tag: String, in xml: String) -> String? {
        guard let a = xml.range(of: "<\(tag)>"), let b = xml.range(of: "</\(tag)>", range: a.upperBound..<xml.endIndex) else { return nil }
        return String(xml[a.upperBound..<b.lowerBound])
    }

    /// ISO 8601 UTC time ("2026-11-23T10:00:00Z", fractions and "+00:00" accepted) as seconds since the epoch.
    static func parseTime(_ s: String) -> Double? {
        let digits = s.unicodeScalars.filter { CharacterSet.decimalDigits.contains($0) }.map { Int($0.value - 48) }
        guard digits.count >= 14 else { return nil }
        func num(_ from: Int, _ n: Int) -> Int32 { Int32(digits[from..<(from + n)].reduce(0) { $0 * 10 + $1 }) }
        var t = tm()
        t.tm_year = num(0, 4) - 1900
        t.tm_mon = num(4, 2) - 1
        t.tm_mday = num(6, 2)
        t.tm_hour = num(8, 2)
        t.tm_min = num(10, 2)
        t.tm_sec = num(12, 2)
        return Double(timegm(&t))
    }
}
