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
    /// 3: format 2 plus a volume key (`volumeKey`) that encrypts names, symlink targets and extended attributes
    ///    (`names`), and authenticates this config (`mac`).
    /// 2: every file has the same header length (`headerLength`), so sizes follow from the backing size alone.
    /// 1: each file's header length is read from its header.
    public static let currentFormatVersion = 3
    public static let supportedFormatVersions = 1...3

    /// `names` values (format 3).
    public static let encryptedNames = "encrypted"
    public static let plaintextNames = "plaintext"
    /// `nameBinding` values: "xattr" binds the names of regular files and directories (tags in an extended
    /// attribute); "xattr+symlinks" also binds symbolic links' names, by their sealed targets.
    public static let xattrNameBinding = "xattr"
    public static let linkNameBinding = "xattr+symlinks"

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
    /// Format 3: "encrypted" or "plaintext" (names, symlink targets and extended attributes as they are).
    public var names: String?
    /// Format 3: the volume key, wrapped under every configured key.
    public var volumeKey: VolumeKeyConfig?
    /// Format 3 with encrypted names: "xattr" when every file and directory carries the tags that bind its names
    /// to it (`VolumeKeys.nameBindingTag`) in the backing extended attribute `user.kmsfs.names`; "xattr+symlinks"
    /// when, besides, every symbolic link's target is sealed for its directory and backing name; absent in
    /// volumes made before names were bound.
    public var nameBinding: String?
    /// Format 3: lower-case hex HMAC-SHA256 of `authenticatedBytes` under the config key.
    public var mac: String?

    public init(volumeId: String, chunkSize: Int, encryptionContext: [String: String], keyProvider: KeyProviderConfig,
                headerLength: Int? = nil, formatVersion: Int = VolumeConfig.currentFormatVersion) {
        self.formatVersion = formatVersion
        self.volumeId = volumeId
        self.chunkSize = chunkSize
        self.encryptionContext = encryptionContext
        self.keyProvider = keyProvider
        self.headerLength = headerLength
    }

    /// True when names are stored encrypted (format 3 without --plaintext-names).
    public var encryptsNames: Bool { formatVersion >= 3 && names == VolumeConfig.encryptedNames }

    /// True when files and directories carry name binding tags.
    public var bindsNames: Bool {
        encryptsNames && (nameBinding == VolumeConfig.xattrNameBinding || nameBinding == VolumeConfig.linkNameBinding)
    }

    /// True when symbolic link targets are sealed for their link's directory and backing name.
    public var bindsLinkTargets: Bool { encryptsNames && nameBinding == VolumeConfig.linkNameBinding }

    /// What the config MAC covers: every field but the wrapped volume keys (a wrong one fails the commitment) and
    /// the MAC itself, in a fixed binary encoding (kmsfs-format(5), VOLUME CONFIG):
    /// "kmsfs v3 config", u32 format version, the 16 volume ID bytes, u32 chunk size, u32 header length (0:
    /// absent), names (u8 length + bytes), the user context's canonical encoding, the provider type (u8 length
    /// + bytes), u16 key count and each key ID (u16 length + bytes), key file, region and profile (each u8 0
    /// when absent, or 1 and u16 length + bytes), the 32-byte volume key commitment.
    public func authenticatedBytes() throws -> [UInt8] {
        guard let id = Hex.decode(volumeId), id.count == 16,
              let commitment = volumeKey.flatMap({ Hex.decode($0.commitment) }), commitment.count == 32 else {
            throw FormatError.invalidConfig("no volume key commitment")
        }
        var w = ByteWriter()
        w.raw(Array("kmsfs v3 config".utf8))
        w.u32(UInt32(formatVersion))
        w.raw(id)
        w.u32(UInt32(chunkSize))
        w.u32(UInt32(headerLength ?? 0))
        w.lengthPrefixed8(Array((names ?? "").utf8))
        w.raw(EncryptionContext(encryptionContext).canonicalBytes)
        w.lengthPrefixed8(Array(keyProvider.type.utf8))
        w.u16(UInt16(keyProvider.keyIds.count))
        for k in keyProvider.keyIds { w.lengthPrefixed16(Array(k.utf8)) }
        for optional in [keyProvider.keyFile, keyProvider.region, keyProvider.profile] {
            if let v = optional {
                w.u8(1)
                w.lengthPrefixed16(Array(v.utf8))
            } else {
                w.u8(0)
            }
        }
        w.raw(commitment)
        // Added later: present only when set, so that configs written before keep their MAC.
        if let b = nameBinding {
            w.raw(Array("binding".utf8))
            w.lengthPrefixed8(Array(b.utf8))
        }
        return w.bytes
    }

    /// Sets `mac` for the current contents (format 3).
    public mutating func authenticate(with keys: VolumeKeys) throws {
        mac = nil
        mac = Hex.encode(try keys.configMAC(try authenticatedBytes()))
    }

    /// Checks `mac` against the volume's keys (format 3); the volume key itself was accepted by its commitment.
    public func checkAuthenticity(with keys: VolumeKeys) throws {
        guard let m = mac.flatMap(Hex.decode), m.count == 32,
              Digest.constantTimeEquals(m, try keys.configMAC(try authenticatedBytes())) else {
            throw FormatError.invalidConfig("the volume config was changed by someone without the volume key (its MAC does not verify)")
        }
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
            throw FormatError.invalidConfig("format version \(formatVersion) is not supported (this kmsfs reads versions 1 to 3)")
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
        guard keyProvider.keyIds.count <= 255 else { throw FormatError.invalidConfig("more than 255 keys configured") }
        if formatVersion >= 3 {
            guard names == VolumeConfig.encryptedNames || names == VolumeConfig.plaintextNames else {
                throw FormatError.invalidConfig("names must be \"encrypted\" or \"plaintext\"")
            }
            guard let vk = volumeKey, !vk.wrappedKeys.isEmpty, Hex.decode(vk.commitment)?.count == 32,
                  vk.wrappedKeys.allSatisfy({ $0.wrappedKey != nil }) else {
                throw FormatError.invalidConfig("format 3 needs a wrapped volume key and its commitment")
            }
            guard mac != nil else { throw FormatError.invalidConfig("format 3 needs a config MAC") }
            guard nameBinding == nil || ([VolumeConfig.xattrNameBinding, VolumeConfig.linkNameBinding].contains(nameBinding!)
                                         && names == VolumeConfig.encryptedNames) else {
                throw FormatError.invalidConfig("nameBinding must be \"xattr\" or \"xattr+symlinks\", and only with encrypted names")
            }
            guard keyProvider.endpoint == nil else {
                throw FormatError.invalidConfig("the KMS endpoint is never taken from the volume: it comes from the host (AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL, the profile, or the region)")
            }
        } else if names != nil || volumeKey != nil || mac != nil || nameBinding != nil {
            throw FormatError.invalidConfig("names, volumeKey, nameBinding and mac need format version 3")
        }
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
