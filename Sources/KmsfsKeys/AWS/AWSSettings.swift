import Foundation
import KmsfsSystem

/// The shared AWS `credentials` and `config` files (INI), as the AWS SDKs read them.
struct AWSConfigFiles: Sendable {
    var credentials: [String: [String: String]] = [:]
    var config: [String: [String: String]] = [:]
    var credentialsPath: String
    var configPath: String

    init(environment env: [String: String]) {
        let home = env["HOME"] ?? "/root"
        func expand(_ p: String) -> String { p.hasPrefix("~/") ? home + p.dropFirst() : p }
        credentialsPath = expand(env["AWS_SHARED_CREDENTIALS_FILE"] ?? "~/.aws/credentials")
        configPath = expand(env["AWS_CONFIG_FILE"] ?? "~/.aws/config")
        credentials = AWSConfigFiles.parse(credentialsPath, configStyle: false)
        config = AWSConfigFiles.parse(configPath, configStyle: true)
    }

    /// Settings of a profile: the config file's, overridden by the credentials file's.
    func profile(_ name: String) -> [String: String]? {
        let c = config[name], k = credentials[name]
        if c == nil && k == nil { return nil }
        return (c ?? [:]).merging(k ?? [:]) { _, fromCredentials in fromCredentials }
    }

    /// Sections and keys of an INI file. In the config file, profiles other than "default" are written
    /// "[profile NAME]"; indented lines continue a nested setting and are skipped.
    static func parse(_ path: String, configStyle: Bool) -> [String: [String: String]] {
        guard let bytes = try? FileIO.readFile(path) else { return [:] }
        var sections: [String: [String: String]] = [:]
        var current: String? = nil
        for raw in String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: true) {
            if raw.first == " " || raw.first == "\t" { continue }
            let line = raw.trimmingCharacters(in: .whitespacesAndNewlines)
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                var name = line.dropFirst().dropLast().trimmingCharacters(in: .whitespaces)
                if configStyle {
                    if name.hasPrefix("profile ") {
                        name = String(name.dropFirst(8)).trimmingCharacters(in: .whitespaces)
                    } else if name != "default" {
                        current = nil  // [sso-session x], [services x]: not profiles
                        continue
                    }
                }
                current = name
                if sections[name] == nil { sections[name] = [:] }
                continue
            }
            guard let section = current, let eq = line.firstIndex(of: "=") else { continue }
            let key = line[..<eq].trimmingCharacters(in: .whitespaces).lowercased()
            let value = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            if !value.isEmpty { sections[section]?[key] = value }
        }
        return sections
    }
}

/// Where a volume's AWS KMS calls go and which profile they use, resolved as the AWS SDKs resolve them.
public struct AWSSettings: Sendable {
    /// The profile: --profile (stored in the volume config), else AWS_PROFILE, else "default".
    public let profile: String
    /// True when the profile was named explicitly (then environment credentials are not used).
    public let profileExplicit: Bool
    /// Default region: --region, else AWS_REGION, else AWS_DEFAULT_REGION, else the profile's region.
    public let region: String?
    /// KMS endpoint override: --endpoint, else AWS_ENDPOINT_URL_KMS, else AWS_ENDPOINT_URL.
    public let kmsEndpointOverride: String?
    /// STS endpoint override: AWS_ENDPOINT_URL_STS, else AWS_ENDPOINT_URL.
    public let stsEndpointOverride: String?
    let files: AWSConfigFiles
    let environment: [String: String]

    public init(region: String?, profile: String?, endpoint: String?, environment env: [String: String]) {
        files = AWSConfigFiles(environment: env)
        environment = env
        if let p = profile, !p.isEmpty {
            self.profile = p
            profileExplicit = true
        } else if let p = env["AWS_PROFILE"], !p.isEmpty {
            self.profile = p
            profileExplicit = true
        } else {
            self.profile = "default"
            profileExplicit = false
        }
        let profileSettings = files.profile(self.profile) ?? [:]
        self.region = [region, env["AWS_REGION"], env["AWS_DEFAULT_REGION"], profileSettings["region"]]
            .compactMap { $0 }.first { !$0.isEmpty }
        kmsEndpointOverride = [endpoint, env["AWS_ENDPOINT_URL_KMS"], profileSettings["endpoint_url"], env["AWS_ENDPOINT_URL"]]
            .compactMap { $0 }.first { !$0.isEmpty }
        stsEndpointOverride = [env["AWS_ENDPOINT_URL_STS"], env["AWS_ENDPOINT_URL"]].compactMap { $0 }.first { !$0.isEmpty }
    }

    /// The settings of the named profile, if it exists in either file.
    var profileSettings: [String: String]? { files.profile(profile) }

    /// The region a key lives in: the one in its ARN, else the default region.
    public func region(forKey keyId: String) throws -> String {
        if let arn = AWSSettings.parseARN(keyId) { return arn.region }
        guard let r = region else {
            throw KeyError(.other, errorType: "NoRegion", keyId: keyId,
                           message: "no AWS region: pass --region, set AWS_REGION, set a region in the profile, or use key ARNs")
        }
        return r
    }

    public func kmsEndpoint(region: String) -> String {
        kmsEndpointOverride ?? "https://kms.\(region).\(AWSSettings.dnsSuffix(region))"
    }

    public func stsEndpoint(region: String?) -> String {
        if let o = stsEndpointOverride { return o }
        guard let r = region else { return "https://sts.amazonaws.com" }
        return "https://sts.\(r).\(AWSSettings.dnsSuffix(r))"
    }

    static func dnsSuffix(_ region: String) -> String {
        region.hasPrefix("cn-") ? "amazonaws.com.cn" : "amazonaws.com"
    }

    /// arn:PARTITION:kms:REGION:ACCOUNT:key/ID or alias/NAME
    public static func parseARN(_ s: String) -> (partition: String, service: String, region: String, account: String, resource: String)? {
        let parts = s.split(separator: ":", maxSplits: 5, omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 6, parts[0] == "arn", !parts[3].isEmpty else { return nil }
        return (parts[1], parts[2], parts[3], parts[4], parts[5])
    }
}
