import KmsfsCrypto

/// The key schedule of one file (format v1). From the file's 256-bit data key (DEK) and its file ID,
/// HKDF-SHA256 (salt = file ID) derives:
///
///   chunk key   info "kmsfs v1 chunk key"      32 bytes, AES-256-GCM key of every body chunk
///   header key  info "kmsfs v1 header key"     32 bytes, HMAC-SHA256 key of the header MAC
///   commitment  info "kmsfs v1 key commitment" 32 bytes, stored in the header in the clear
///
/// The DEK itself is used for nothing else and is wiped as soon as these are derived.
public struct FileKeys: Sendable {
    public let chunkKey: SecureBytes
    public let headerKey: SecureBytes
    public let commitment: [UInt8]

    static let chunkInfo = Array("kmsfs v1 chunk key".utf8)
    static let headerInfo = Array("kmsfs v1 header key".utf8)
    static let commitmentInfo = Array("kmsfs v1 key commitment".utf8)

    public init(dataKey: SecureBytes, fileId: [UInt8]) throws {
        precondition(dataKey.count == FileHeader.dataKeySize && fileId.count == FileHeader.fileIdSize)
        let keys = try Digest.hkdfSHA256(ikm: dataKey, salt: fileId, infos: [FileKeys.chunkInfo, FileKeys.headerInfo, FileKeys.commitmentInfo],
                                         length: 32)
        chunkKey = keys[0]
        headerKey = keys[1]
        commitment = keys[2].withUnsafeBytes { Array($0) }
    }
}
