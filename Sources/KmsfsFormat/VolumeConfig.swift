import Foundation
import KmsfsCrypto

/// Settings of the key provider that wraps the volume's data keys. No secret is ever stored here.
public struct KeyProviderConfig: Codable, Equatable, Sendable {
    /// "local" or "aws-kms".
    public var type: String
    /// Wrapping keys, in the order they are tried on open. Local: the key's fingerprint ID. AWS: key ARNs.
    public var keyIds: [String]
    /// Local provider: where the master key file is (absent: the default location for this volume).
    public var keyFile: String?
    /// AWS KMS: region, shared-config profile and endpoint override.
    public var region: String?
    public var profile: String?
    public var endpoint: String?

    public init(type: String, keyIds: [String], keyFile: String? = nil, region: String? = nil,
                profile: String? = nil, endpoint: String? = nil) {
        self.type = type
        self.keyIds = keyIds
        self.keyFile = keyFile
        self.region = region
        self.profile = profile
        self.endpoint = endpoint
    }
}

/// The volume config, `kmsfs.conf` at the top of the encrypted directory (JSON).
public struct VolumeConfig: Codable, Equatable, Sendable {
    public static let fileName = "kmsfs.conf"
    /// 2: every file has the same header length (`headerLength`), so sizes follow from the backing size alone.
    /// 1: each file's header length is read from its header.
    public static let currentFormatVersion = 2
    public static let supportedFormatVersions = 1...2

    public var formatVersion: Int
    /// 128-bit random volume ID, lower-case hex.
    public var volumeId: String
    /// Plaintext bytes per chunk of new files.
    public var chunkSize: Int
    /// User encryption context pairs added to every file's context.
    public var encryptionContext: [String: String]
    public var keyProvider: KeyProviderConfig
    /// Format 2: the header length of every file of the volume (a multiple of 512). Absent in format 1, and in a
    /// format 2 volume whose files have different header lengths for a while (a key rotation that had to grow
    /// the headers was interrupted, or a new file's keys did not fit): then each file's own length counts.
    public var headerLength: Int?

    public init(volumeId: String, chunkSize: Int, encryptionContext: [String: String], keyProvider: KeyProviderConfig,
                headerLength: Int? = nil) {
        formatVersion = VolumeConfig.currentFormatVersion
        self.volumeId = volumeId
        self.chunkSize = chunkSize
        self.encryptionContext = encryptionContext
        self.keyProvider = keyProvider
        self.headerLength = headerLength
    }

    /// The uniform header length for new volumes: room for the kmsfs context pairs, the user's pairs, and one
    /// wrapped key per configured key of at most `wrappedKeySize` bytes, rounded up to 512.
    public static func uniformHeaderLength(volumeId: String, userContext: [String: String], provider: String,
                                           keyIds: [String], wrappedKeySize: Int) -> Int {
        let context = EncryptionContext.forFile(volumeId: volumeId, fileId: [UInt8](repeating: 0, count: FileHeader.fileIdSize),
                                                user: userContext)
        let needed = FileHeader.requiredLength(context: context, wrappedKeys: keyIds.map { (provider, $0, wrappedKeySize) })
        return FileHeader.roundedLength(needed)
    }

    /// The layout every file of the volume has, when the header length is uniform.
    public var uniformLayout: ChunkLayout? {
        headerLength.map { ChunkLayout(headerLength: $0, chunkSize: chunkSize) }
    }

    /// A new random volume ID.
    public static func newVolumeId() throws -> String { Hex.encode(try SecureRandom.bytes(16)) }

    public static func path(in cipherDir: String) -> String {
        cipherDir.hasSuffix("/") ? cipherDir + fileName : cipherDir + "/" + fileName
    }

    /// Decodes and validates a config.
    public static func decode(_ bytes: [UInt8]) throws -> VolumeConfig {
        let config: VolumeConfig
        do {
            config = try JSONDecoder().decode(VolumeConfig.self, from: Data(bytes))
        } catch let e as DecodingError {
            throw FormatError.invalidConfig(VolumeConfig.describe(e))
        }
        try config.validate()
        return config
    }

    public func encoded() throws -> [UInt8] {
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return Array(try enc.encode(self)) + [UInt8(ascii: "\n")]
    }

    public func validate() throws {
        guard VolumeConfig.supportedFormatVersions.contains(formatVersion) else {
            throw FormatError.invalidConfig("format version \(formatVersion) is not supported (this kmsfs reads versions 1 and 2)")
        }
        if let h = headerLength {
            guard formatVersion >= 2 else { throw FormatError.invalidConfig("headerLength needs format version 2") }
            guard h % FileHeader.lengthGranule == 0, h >= FileHeader.minimumLength, h <= FileHeader.maximumLength else {
                throw FormatError.invalidConfig("headerLength must be a multiple of 512 from 512 to 1048576")
            }
        }
        guard let id = Hex.decode(volumeId), id.count == 16 else {
            throw FormatError.invalidConfig("volumeId must be 32 hex digits")
        }
        guard ChunkLayout.isValidChunkSize(chunkSize) else {
            throw FormatError.invalidConfig("chunkSize must be a power of two from 4096 to 1048576")
        }
        try EncryptionContext.validateUserPairs(encryptionContext)
        guard !keyProvider.keyIds.isEmpty else { throw FormatError.invalidConfig("no key configured") }
    }

    private static func describe(_ e: DecodingError) -> String {
        switch e {
        case .keyNotFound(let key, _): return "missing field \"\(key.stringValue)\""
        case .typeMismatch(_, let c), .valueNotFound(_, let c):
            return "wrong type at \"\(c.codingPath.map(\.stringValue).joined(separator: "."))\""
        case .dataCorrupted(let c):
            return c.codingPath.isEmpty ? "not valid JSON" : "bad value at \"\(c.codingPath.map(\.stringValue).joined(separator: "."))\""
        @unknown default: return "cannot decode"
        }
    }
}
