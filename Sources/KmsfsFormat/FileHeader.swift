import KmsfsCrypto

/// One data key wrapped by a key provider.
public struct WrappedKey: Equatable, Sendable {
    /// The provider that can unwrap it: "local" or "aws-kms".
    public var provider: String
    /// The provider's name of the wrapping key (local key fingerprint, KMS key ARN).
    public var keyId: String
    /// The provider's ciphertext of the data key.
    public var blob: [UInt8]

    public init(provider: String, keyId: String, blob: [UInt8]) {
        self.provider = provider
        self.keyId = keyId
        self.blob = blob
    }
}

/// The fixed 16-byte start of every backing file: enough to compute the plaintext size from the backing
/// file size without parsing (or authenticating) the rest of the header.
public struct HeaderPrefix: Equatable, Sendable {
    public let version: Int
    public let flags: UInt16
    public let headerLength: Int
    public let chunkSize: Int

    public var layout: ChunkLayout {
        ChunkLayout(headerLength: headerLength, chunkSize: chunkSize, marksEmptyFile: flags & FileHeader.emptyFileMarkerFlag != 0)
    }

    /// Parses the prefix; throws for anything that is not a kmsfs v1 file.
    public init(_ bytes: UnsafeRawBufferPointer) throws {
        guard bytes.count >= FileHeader.prefixSize else { throw FormatError.truncatedHeader }
        guard bytes[0] == FileHeader.magic[0], bytes[1] == FileHeader.magic[1],
              bytes[2] == FileHeader.magic[2], bytes[3] == FileHeader.magic[3] else { throw FormatError.notAKmsfsFile }
        func be(_ at: Int, _ n: Int) -> Int { (at..<at + n).reduce(0) { $0 << 8 | Int(bytes[$1]) } }
        version = be(4, 2)
        guard version == Int(FileHeader.version) else { throw FormatError.unsupportedVersion(version) }
        flags = UInt16(be(6, 2))
        guard flags & ~FileHeader.knownFlags == 0 else { throw FormatError.malformedHeader("unknown flags") }
        headerLength = be(8, 4)
        chunkSize = be(12, 4)
        guard headerLength >= FileHeader.minimumLength, headerLength <= FileHeader.maximumLength else {
            throw FormatError.malformedHeader("header length \(headerLength) out of range")
        }
        guard ChunkLayout.isValidChunkSize(chunkSize) else {
            throw FormatError.malformedHeader("chunk size \(chunkSize) is not a power of two in 4 KiB...1 MiB")
        }
    }

    public init(_ bytes: [UInt8]) throws {
        self = try bytes.withUnsafeBytes { try HeaderPrefix($0) }
    }
}

/// The header of a backing file, format v1 (all integers big-endian; see man/kmsfs-format.5):
///
///     offset  size  field
///     0       4     magic "KMFS"
///     4       2     format version (1)
///     6       2     flags: bit 0 (0x0001) = an empty file's body is the 16-byte empty-file marker (format 3
///                   volumes); no other bit may be set
///     8       4     header length H: the body starts at byte H
///     12      4     chunk size C (plaintext bytes per chunk)
///     16      16    file ID (random)
///     32      32    key commitment
///     64      2+n   encryption context (u16 count; per pair sorted by key: u16 len, key, u16 len, value)
///     ..      32    header MAC: HMAC-SHA256(header key, bytes 0 ..< this field, with bytes 8..<12 zeroed)
///     ..      1     number of wrapped keys k (1...255)
///     ..            k times: u8 len, provider; u16 len, key ID; u16 len, blob
///     ..            zero padding up to H
///
/// The MAC covers everything but the header length and the wrapped keys, so that key rotation can replace
/// the wrapped keys (and grow the header) without the plaintext data key. Each wrapped key is authenticated
/// by its provider under the encryption context, and what it unwraps to must match the MAC'd commitment.
public struct FileHeader: Equatable, Sendable {
    public static let magic: [UInt8] = Array("KMFS".utf8)
    public static let version: UInt16 = 1
    /// Flag: an empty file's body is not empty but its empty-file marker (`VolumeKeys.emptyFileMarker`, under
    /// the volume key), so a file cut to its header is seen as damaged, not as empty. Set on every file of a
    /// format 3 volume.
    public static let emptyFileMarkerFlag: UInt16 = 0x0001
    public static let knownFlags: UInt16 = emptyFileMarkerFlag
    public static let prefixSize = 16
    public static let fileIdSize = 16
    public static let dataKeySize = 32
    public static let macSize = 32
    public static let commitmentSize = 32
    /// Header lengths are rounded up to this, leaving room for rotation to rewrite the header in place.
    public static let lengthGranule = 512
    public static let minimumLength = 64 + 2 + macSize + 1
    public static let maximumLength = 1 << 20

    public var flags: UInt16
    public var headerLength: Int
    public var chunkSize: Int
    public var fileId: [UInt8]
    public var commitment: [UInt8]
    public var context: EncryptionContext
    public var mac: [UInt8]
    public var wrappedKeys: [WrappedKey]

    public var layout: ChunkLayout {
        ChunkLayout(headerLength: headerLength, chunkSize: chunkSize, marksEmptyFile: flags & FileHeader.emptyFileMarkerFlag != 0)
    }

    /// A new, authenticated header for a file whose data key is `dataKey` (the keys derived from it are passed in),
    /// `length` bytes long (a volume's uniform header length), or as short as it can be when nil.
    /// Throws `headerTooLong` when the header does not fit in `length`.
    /// `marksEmptyFile` sets `emptyFileMarkerFlag` (format 3 volumes).
    public init(fileId: [UInt8], chunkSize: Int, context: EncryptionContext, wrappedKeys: [WrappedKey],
                keys: FileKeys, length: Int? = nil, marksEmptyFile: Bool = false) throws {
        precondition(fileId.count == FileHeader.fileIdSize && ChunkLayout.isValidChunkSize(chunkSize))
        self.flags = marksEmptyFile ? FileHeader.emptyFileMarkerFlag : 0
        self.fileId = fileId
        self.chunkSize = chunkSize
        self.context = context
        self.commitment = keys.commitment
        self.wrappedKeys = wrappedKeys
        self.mac = []
        self.headerLength = 0
        try validateWrappedKeys(wrappedKeys)
        headerLength = FileHeader.roundedLength(encodedLengthWithoutPadding)
        if let length {
            guard encodedLengthWithoutPadding <= length else { throw FormatError.headerTooLong(needed: encodedLengthWithoutPadding, length: length) }
            headerLength = length
        }
        mac = try computeMAC(headerKey: keys.headerKey)
    }

    /// Parses a header (structure only: call `authenticate(with:)` once the data key is known).
    /// `bytes` must hold at least the header length given by the prefix.
    public init(decoding bytes: [UInt8]) throws {
        let prefix = try HeaderPrefix(bytes)
        guard bytes.count >= prefix.headerLength else { throw FormatError.truncatedHeader }
        var r = ByteReader(Array(bytes[0..<prefix.headerLength]), offset: FileHeader.prefixSize)
        flags = prefix.flags
        headerLength = prefix.headerLength
        chunkSize = prefix.chunkSize
        fileId = try r.raw(FileHeader.fileIdSize)
        commitment = try r.raw(FileHeader.commitmentSize)
        context = try EncryptionContext.decode(&r)
        mac = try r.raw(FileHeader.macSize)
        let count = Int(try r.u8())
        guard count >= 1 else { throw FormatError.malformedHeader("no wrapped key") }
        var keys: [WrappedKey] = []
        for _ in 0..<count {
            let provider = try r.lengthPrefixed8()
            let keyId = try r.lengthPrefixed16()
            let blob = try r.lengthPrefixed16()
            guard let p = String(validating: provider, as: UTF8.self), let k = String(validating: keyId, as: UTF8.self) else {
                throw FormatError.malformedHeader("wrapped key names are not UTF-8")
            }
            keys.append(WrappedKey(provider: p, keyId: k, blob: blob))
        }
        wrappedKeys = keys
        let padding = try r.raw(r.remaining)
        guard padding.allSatisfy({ $0 == 0 }) else { throw FormatError.malformedHeader("non-zero padding") }
    }

    /// Checks the unwrapped key against the commitment, then the header MAC.
    public func authenticate(with keys: FileKeys) throws {
        guard Digest.constantTimeEquals(keys.commitment, commitment) else { throw FormatError.keyCommitmentMismatch }
        guard Digest.constantTimeEquals(try computeMAC(headerKey: keys.headerKey), mac) else {
            throw FormatError.headerAuthenticationFailed
        }
    }

    /// Checks the context the header carries against the file it is supposed to belong to.
    public func checkContext(volumeId: String) throws {
        guard context[EncryptionContext.volumeIdKey] == volumeId else {
            throw FormatError.malformedHeader("the header belongs to another volume")
        }
        guard context[EncryptionContext.fileIdKey] == Hex.encode(fileId) else {
            throw FormatError.malformedHeader("the encryption context names another file")
        }
    }

    /// The encoded header, padded with zeros to `headerLength`.
    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: headerLength)
        w.raw(authenticatedPart(zeroLength: false))
        w.raw(mac)
        w.u8(UInt8(wrappedKeys.count))
        for k in wrappedKeys {
            w.lengthPrefixed8(Array(k.provider.utf8))
            w.lengthPrefixed16(Array(k.keyId.utf8))
            w.lengthPrefixed16(k.blob)
        }
        w.zeros(headerLength - w.bytes.count)
        return w.bytes
    }

    /// The same header with another set of wrapped keys (key rotation), `length` bytes long when given (a
    /// volume's new uniform length; at least what the keys need). Otherwise the length is kept when the new keys
    /// fit, so the body need not move, or grows to the next granule.
    public func replacingWrappedKeys(_ keys: [WrappedKey], length: Int? = nil) throws -> FileHeader {
        var h = self
        try validateWrappedKeys(keys)
        h.wrappedKeys = keys
        let needed = h.encodedLengthWithoutPadding
        if let length, length >= needed {
            h.headerLength = length
        } else if needed > headerLength {
            h.headerLength = FileHeader.roundedLength(needed)
        }
        return h
    }

    /// Bytes a header needs, before padding, for `context` and wrapped keys of these sizes: what a volume's
    /// uniform header length must hold.
    public static func requiredLength(context: EncryptionContext, wrappedKeys: [(provider: String, keyId: String, blobSize: Int)]) -> Int {
        var n = 64 + context.canonicalBytes.count + macSize + 1
        for k in wrappedKeys { n += 1 + k.provider.utf8.count + 2 + k.keyId.utf8.count + 2 + k.blobSize }
        return n
    }

    // MARK: - internals

    private var encodedLengthWithoutPadding: Int {
        var n = 64 + context.canonicalBytes.count + FileHeader.macSize + 1
        for k in wrappedKeys { n += 1 + k.provider.utf8.count + 2 + k.keyId.utf8.count + 2 + k.blob.count }
        return n
    }

    /// `n` rounded up to the header length granule (512).
    public static func roundedLength(_ n: Int) -> Int { (n + lengthGranule - 1) / lengthGranule * lengthGranule }

    private func validateWrappedKeys(_ keys: [WrappedKey]) throws {
        guard (1...255).contains(keys.count) else { throw FormatError.malformedHeader("1 to 255 wrapped keys needed") }
        for k in keys where k.provider.utf8.count > 255 || k.keyId.utf8.count > 65535 || k.blob.count > 65535 {
            throw FormatError.malformedHeader("wrapped key field too long")
        }
    }

    /// Bytes 0 ..< MAC field; the header length field is zeroed when `zeroLength` is set (the MAC input).
    private func authenticatedPart(zeroLength: Bool) -> [UInt8] {
        var w = ByteWriter()
        w.raw(FileHeader.magic)
        w.u16(FileHeader.version)
        w.u16(flags)
        w.u32(zeroLength ? 0 : UInt32(headerLength))
        w.u32(UInt32(chunkSize))
        w.raw(fileId)
        w.raw(commitment)
        w.raw(context.canonicalBytes)
        return w.bytes
    }

    private func computeMAC(headerKey: SecureBytes) throws -> [UInt8] {
        let input = authenticatedPart(zeroLength: true)
        var out = [UInt8](repeating: 0, count: FileHeader.macSize)
        try headerKey.withUnsafeBytes { k in
            try input.withUnsafeBytes { d in
                try out.withUnsafeMutableBytes { o in try Digest.hmacSHA256(key: k, data: d, into: o.baseAddress!) }
            }
        }
        return out
    }
}
