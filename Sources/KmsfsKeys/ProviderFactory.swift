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

        public init(keyFile: String? = nil, environment: [String: String], policy: KMSPolicy = .defaults, allowOpenKeyFile: Bool = false) {
            self.keyFile = keyFile
            self.environment = environment
            self.policy = policy
            self.allowOpenKeyFile = allowOpenKeyFile
        }
    }

    public static func makeProvider(volume: VolumeConfig, options: Options) throws -> KeyProvider {
        switch volume.keyProvider.type {
        case LocalKeyProvider.providerName:
            let path = localKeyFilePath(volume: volume, options: options)
            let key = try LocalKeyFile.load(path: path, allowOpen: options.allowOpenKeyFile)
            guard volume.keyProvider.keyIds.contains(key.keyId) else {
                throw KeyError(.keyUnavailable, errorType: "WrongKeyFile", keyId: key.keyId,
                               message: "key file \(path) holds key \(key.keyId), but this volume's files are wrapped under \(volume.keyProvider.keyIds.joined(separator: ", "))")
            }
            return LocalKeyProvider(keys: [key])
        case AWSKMSProvider.providerName:
            let c = volume.keyProvider
            return AWSKMSProvider(settings: AWSSettings(region: c.region, profile: c.profile, endpoint: c.endpoint,
                                                        environment: options.environment), policy: options.policy)
        default:
            throw FormatError.invalidConfig("unknown key provider \"\(volume.keyProvider.type)\"")
        }
    }

    /// Where the local provider's key file is: the override, the configured path, or the default location.
    public static func localKeyFilePath(volume: VolumeConfig, options: Options) -> String {
        options.keyFile ?? volume.keyProvider.keyFile
            ?? LocalKeyFile.defaultPath(volumeId: volume.volumeId, environment: options.environment)
    }
}
