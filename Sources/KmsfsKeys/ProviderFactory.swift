import KmsfsFormat
import KmsfsSystem

/// Builds the key provider a volume config names.
public enum ProviderFactory {
    public struct Options: Sendable {
        /// Local provider: use this key file instead of the configured or default one.
        public var keyFile: String?
        /// The process environment (key file default location; AWS credentials and region).
        public var environment: [String: String]
        /// Deadlines and rate limits of KMS calls.
        public var policy: KMSPolicy
        /// Local provider: accept a key file other users can read (refused otherwise).
        public var allowOpenKeyFile: Bool
        /// Local provider: reads the passphrase of a protected key file (nil: such a file is refused).
        public var passphrase: LocalKeyFile.PassphraseReader?
        /// Exec provider: the host's key command (else KMSFS_KEY_COMMAND from `environment`).
        public var keyCommand: String?

        public init(keyFile: String? = nil, environment: [String: String], policy: KMSPolicy = .defaults, allowOpenKeyFile: Bool = false,
                    passphrase: LocalKeyFile.PassphraseReader? = nil, keyCommand: String? = nil) {
            self.keyCommand = keyCommand
            self.keyFile = keyFile
            self.environment = environment
            self.policy = policy
            self.allowOpenKeyFile = allowOpenKeyFile
            self.passphrase = passphrase
        }
    }

    public static func makeProvider(volume: VolumeConfig, options: Options) throws -> KeyProvider {
        try checkKeyIds(volume.keyProvider)
        switch volume.keyProvider.type {
        case LocalKeyProvider.providerName:
            let path = localKeyFilePath(volume: volume, options: options)
            let key = try LocalKeyFile.load(path: path, allowOpen: options.allowOpenKeyFile, passphrase: options.passphrase)
            guard volume.keyProvider.keyIds.contains(key.keyId) else {
                throw KeyError(.keyUnavailable, errorType: "WrongKeyFile", keyId: key.keyId,
                               message: "key file \(path) holds key \(key.keyId), but this volume's files are wrapped under \(volume.keyProvider.keyIds.joined(separator: ", "))")
            }
            return LocalKeyProvider(keys: [key])
        case AWSKMSProvider.providerName:
            let c = volume.keyProvider
            return AWSKMSProvider(settings: AWSSettings(region: c.region, profile: c.profile, endpoint: c.endpoint,
                                                        environment: options.environment), policy: options.policy)
        case ExecKeyProvider.providerName:
            return ExecKeyProvider(command: try keyCommand(options), timeout: options.policy.deadline)
        default:
            throw FormatError.invalidConfig("unknown key provider \"\(volume.keyProvider.type)\"")
        }
    }

    /// The key command of the host: never from the volume, which whoever writes CIPHERDIR could change.
    public static func keyCommand(_ options: Options) throws -> String {
        guard let c = options.keyCommand ?? options.environment["KMSFS_KEY_COMMAND"], !c.isEmpty else {
            throw KeyError(.keyUnavailable, errorType: "NoKeyCommand", keyId: "",
                           message: "this volume's keys are in an exec key service: give its command with --key-command or KMSFS_KEY_COMMAND")
        }
        return c
    }


    /// Refuses key IDs that cannot belong to the provider the config names (a config edited by hand, or by
    /// someone else), before any of them is used: local keys are `local:` and 16 lower-case hex digits; AWS KMS
    /// keys are key IDs, multi-Region key IDs, alias names, or key or alias ARNs.
    public static func checkKeyIds(_ config: KeyProviderConfig) throws {
        let valid: (String) -> Bool
        let shape: String
        switch config.type {
        case LocalKeyProvider.providerName:
            valid = isLocalKeyId
            shape = "a local key ID (local: and 16 lower-case hex digits)"
        case AWSKMSProvider.providerName:
            valid = isAWSKeyId
            shape = "an AWS KMS key ID, alias name (alias/...) or ARN (arn:aws...:kms:...)"
        case ExecKeyProvider.providerName:
            valid = isExecKeyId
            shape = "a key command's key ID (1 to 256 printable ASCII characters, no spaces or commas, not local:...)"
        default:
            throw FormatError.invalidConfig("unknown key provider \"\(config.type)\" (kmsfs knows \"local\", \"aws-kms\" and \"exec\")")
        }
        if let bad = config.keyIds.first(where: { !valid($0) }) {
            throw FormatError.invalidConfig("key \"\(bad)\" is not \(shape), but the config names key provider \(config.type)")
        }
    }

    static func isLocalKeyId(_ id: String) -> Bool {
        let b = Array(id.utf8)
        return b.count == 22 && id.hasPrefix("local:") && b[6...].allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }

    public static func isExecKeyId(_ id: String) -> Bool {
        let b = Array(id.utf8)
        return (1...256).contains(b.count) && !id.hasPrefix("local:") && b.allSatisfy { $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: ",") }
    }

    static func isAWSKeyId(_ id: String) -> Bool {
        let b = Array(id.utf8)
        guard !b.isEmpty, b.count <= 2048, !id.hasPrefix("local:"),
              b.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: ",") }) else { return false }
        func isKeyId(_ s: Substring) -> Bool {
            let u = Array(s.utf8)
            let hex: (UInt8) -> Bool = { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) || (0x41...0x46).contains($0) }
            if s.hasPrefix("mrk-") { return u.count == 36 && u[4...].allSatisfy(hex) }
            return u.count == 36 && u.enumerated().allSatisfy { i, c in [8, 13, 18, 23].contains(i) ? c == UInt8(ascii: "-") : hex(c) }
        }
        if id.hasPrefix("alias/") { return b.count > 6 }
        if id.hasPrefix("arn:") {
            // arn:PARTITION:kms:REGION:ACCOUNT:key/ID or :alias/NAME
            let parts = id.split(separator: ":", maxSplits: 5, omittingEmptySubsequences: false)
            guard parts.count == 6, parts[1].hasPrefix("aws"), parts[2] == "kms", !parts[3].isEmpty, !parts[4].isEmpty else { return false }
            if parts[5].hasPrefix("key/") { return isKeyId(parts[5].dropFirst(4)) }
            return parts[5].hasPrefix("alias/") && parts[5].count > 6
        }
        return isKeyId(Substring(id))
    }

    /// Where the local provider's key file is: the override, the configured path, or the default location.
    public static func localKeyFilePath(volume: VolumeConfig, options: Options) -> String {
        options.keyFile ?? volume.keyProvider.keyFile
            ?? LocalKeyFile.defaultPath(volumeId: volume.volumeId, environment: options.environment)
    }
}
