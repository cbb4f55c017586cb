import KmsfsCrypto
import Synchronization

/// The volume key as stored in the volume config (format 3): the key wrapped by each configured provider key,
/// and its public commitment. The plaintext key never touches the disk.
public struct VolumeKeyConfig: Codable, Equatable, Sendable {
    public struct Wrapped: Codable, Equatable, Sendable {
        public var provider: String
        public var keyId: String
        /// Standard base64 of the provider's ciphertext.
        public var blob: String

        public init(_ w: WrappedKey) {
            provider = w.provider
            keyId = w.keyId
            blob = Base64.encode(w.blob)
        }

        public var wrappedKey: WrappedKey? {
            Base64.decode(blob).map { WrappedKey(provider: provider, keyId: keyId, blob: $0) }
        }
    }

    public var wrappedKeys: [Wrapped]
    /// Lower-case hex of the 32-byte key commitment (`VolumeKeys.commitment`).
    public var commitment: String

    public init(wrappedKeys: [WrappedKey], commitment: [UInt8]) {
        self.wrappedKeys = wrappedKeys.map(Wrapped.init)
        self.commitment = Hex.encode(commitment)
    }
}

/// What a volume key is used for, derived from it with HKDF-SHA256 (salt: the 16-byte volume ID):
///
///   name key            info "kmsfs v3 name key"            64 bytes, AES-256-SIV of file names
///   xattr name key      info "kmsfs v3 xattr name key"      64 bytes, AES-256-SIV of extended attribute names
///   metadata key        info "kmsfs v3 metadata key"        32 bytes, AES-256-GCM of symlink targets and xattr values
///   directory ID key    info "kmsfs v3 directory id key"    32 bytes, HMAC-SHA256 of directory ID files
///   config key          info "kmsfs v3 config key"          32 bytes, HMAC-SHA256 of the volume config
///   commitment          info "kmsfs v3 volume key commitment" 32 bytes, public, stored in the config
///   empty file key      info "kmsfs v3 empty file key"      32 bytes, HMAC-SHA256 of empty-file markers
///   name binding key    info "kmsfs v3 name binding key"    32 bytes, HMAC-SHA256 of name bindings
///
/// The volume key itself is wiped once these are derived; the derived keys live in locked memory for the mount
/// and are wiped by `wipe()` at unmount.
public final class VolumeKeys: Sendable {
    public let volumeId: [UInt8]
    public let names: AESSIV
    public let xattrNames: AESSIV
    public let metadata: SecureBytes
    public let directoryIds: SecureBytes
    public let config: SecureBytes
    public let emptyFiles: SecureBytes
    public let nameBindings: SecureBytes
    public let commitment: [UInt8]

    public static let keySize = 32
    static let sivInfos = ["kmsfs v3 name key", "kmsfs v3 xattr name key"].map { Array($0.utf8) }
    static let infos = ["kmsfs v3 metadata key", "kmsfs v3 directory id key", "kmsfs v3 config key",
                        "kmsfs v3 volume key commitment", "kmsfs v3 empty file key",
                        "kmsfs v3 name binding key"].map { Array($0.utf8) }

    /// Derives the keys of volume `volumeId` (32 hex digits) from its volume key: one HKDF extraction for the
    /// 64-byte keys and one for the 32-byte ones.
    public init(volumeKey: SecureBytes, volumeId: String) throws {
        precondition(volumeKey.count == VolumeKeys.keySize)
        self.volumeId = try VolumeKeys.salt(volumeId)
        let siv = try Digest.hkdfSHA256(ikm: volumeKey, salt: self.volumeId, infos: VolumeKeys.sivInfos, length: 64)
        let keys = try Digest.hkdfSHA256(ikm: volumeKey, salt: self.volumeId, infos: VolumeKeys.infos, length: 32)
        names = try AESSIV(key: siv[0])
        xattrNames = try AESSIV(key: siv[1])
        metadata = keys[0]
        directoryIds = keys[1]
        config = keys[2]
        commitment = keys[3].withUnsafeBytes { Array($0) }
        emptyFiles = keys[4]
        nameBindings = keys[5]
    }

    /// HKDF's salt: the 16 bytes of the volume ID.
    static func salt(_ volumeId: String) throws -> [UInt8] {
        guard let id = Hex.decode(volumeId), id.count == 16 else { throw FormatError.invalidConfig("volumeId must be 32 hex digits") }
        return id
    }

    private let wiped = Atomic<Bool>(false)

    /// Overwrites every derived key (at unmount); every later use fails.
    public func wipe() {
        wiped.store(true, ordering: .relaxed)
        names.wipe()
        xattrNames.wipe()
        metadata.wipe()
        directoryIds.wipe()
        config.wipe()
        emptyFiles.wipe()
        nameBindings.wipe()
    }

    /// The commitment of a volume key, without deriving the rest.
    public static func commitment(of volumeKey: SecureBytes, volumeId: String) throws -> [UInt8] {
        try Digest.hkdfSHA256Public(ikm: volumeKey, salt: try salt(volumeId), info: infos[3], length: 32)
    }

    /// The encryption context the volume key is wrapped under: a key policy can allow it apart from data keys.
    public static func context(volumeId: String) -> EncryptionContext {
        EncryptionContext([EncryptionContext.volumeIdKey: volumeId, EncryptionContext.purposeKey: EncryptionContext.volumeKeyPurpose])
    }

    /// The body of an empty file whose header has `FileHeader.emptyFileMarkerFlag`: the first 16 bytes of
    /// HMAC-SHA256 under the empty file key of "kmsfs v3 empty file" || the file ID. Truncating a file to zero
    /// writes it without the file's data key; a file cut to its header lacks it and reads as damaged.
    public func emptyFileMarker(fileId: [UInt8]) throws -> [UInt8] {
        Array(try hmac(emptyFiles, Array("kmsfs v3 empty file".utf8) + fileId)[0..<ChunkLayout.emptyMarkerSize])
    }

    /// The tag that binds backing name `backingName` in the directory whose ID is `directoryId` to the node
    /// `nodeId` (a file's file ID, a directory's own ID): the first 16 bytes of HMAC-SHA256 under the name
    /// binding key of "kmsfs v3 name" || directory ID || node ID || backing name. A node carries the tags of
    /// all its names, so two entries whose backing names were swapped are caught.
    public func nameBindingTag(directoryId: [UInt8], nodeId: [UInt8], backingName: [UInt8]) throws -> [UInt8] {
        Array(try hmac(nameBindings, Array("kmsfs v3 name".utf8) + directoryId + nodeId + backingName)[0..<16])
    }

    /// HMAC-SHA256 under the config key.
    public func configMAC(_ data: [UInt8]) throws -> [UInt8] {
        try hmac(config, data)
    }

    func hmac(_ key: SecureBytes, _ data: [UInt8]) throws -> [UInt8] {
        guard !wiped.load(ordering: .relaxed) else { throw CryptoError.openSSL("volume keys already wiped") }
        var out = [UInt8](repeating: 0, count: 32)
        try key.withUnsafeBytes { (k) in
            try data.withUnsafeBytes { (d) in
                try out.withUnsafeMutableBytes { o in try Digest.hmacSHA256(key: k, data: d, into: o.baseAddress!) }
            }
        }
        return out
    }

    /// AES-256-GCM under the metadata key: nonce || ciphertext || tag, with a fresh random nonce.
    func sealMetadata(_ plaintext: [UInt8], ad: [UInt8]) throws -> [UInt8] {
        guard !wiped.load(ordering: .relaxed) else { throw CryptoError.openSSL("volume keys already wiped") }
        let gcm = try AESGCM(key: metadata)
        var out = [UInt8](repeating: 0, count: AESGCM.nonceSize + plaintext.count + AESGCM.tagSize)
        try out.withUnsafeMutableBytes { o in
            try SecureRandom.fill(UnsafeMutableRawBufferPointer(start: o.baseAddress!, count: AESGCM.nonceSize))
            try ad.withUnsafeBytes { a in
                try plaintext.withUnsafeBytes { p in
                    try gcm.seal(nonce: o.baseAddress!, aad: a, plaintext: p, ciphertext: o.baseAddress! + AESGCM.nonceSize,
                                 tag: o.baseAddress! + AESGCM.nonceSize + plaintext.count)
                }
            }
        }
        return out
    }

    /// The plaintext of `sealMetadata`'s output, or nil when it does not authenticate under `ad`.
    func openMetadata(_ sealed: [UInt8], ad: [UInt8]) -> [UInt8]? {
        let overhead = AESGCM.nonceSize + AESGCM.tagSize
        guard !wiped.load(ordering: .relaxed), sealed.count >= overhead, let gcm = try? AESGCM(key: metadata) else { return nil }
        let n = sealed.count - overhead
        var out = [UInt8](repeating: 0, count: n)
        let ok = sealed.withUnsafeBytes { s in
            ad.withUnsafeBytes { a in
                out.withUnsafeMutableBytes { o in
                    gcm.open(nonce: s.baseAddress!, aad: a,
                             ciphertext: UnsafeRawBufferPointer(start: s.baseAddress! + AESGCM.nonceSize, count: n),
                             tag: s.baseAddress! + AESGCM.nonceSize + n, plaintext: o.baseAddress ?? UnsafeMutableRawPointer(mutating: s.baseAddress!))
                }
            }
        }
        return ok ? out : nil
    }
}
