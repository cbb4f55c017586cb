import KmsfsCrypto

/// The encryption context of a file: string pairs bound to its wrapped data keys (as the AWS KMS encryption
/// context, checked by the key provider on every unwrap) and stored in its header.
///
/// kmsfs adds two pairs of its own to every file, `kmsfs:volume-id` and `kmsfs:file-id` (lower-case hex);
/// the rest are the volume's user-supplied pairs.
public struct EncryptionContext: Equatable, Hashable, Sendable {
    public static let volumeIdKey = "kmsfs:volume-id"
    public static let fileIdKey = "kmsfs:file-id"
    public static let reservedPrefix = "kmsfs:"
    /// The volume key's context (format 3) names its purpose instead of a file.
    public static let purposeKey = "kmsfs:purpose"
    public static let volumeKeyPurpose = "volume-key"

    public let pairs: [String: String]
    /// Canonical encoding: u16 count, then per pair (sorted) u16 key length, key, u16 value length, value.
    /// Made once: a new file's header, its MAC and its key wrapping each need it.
    public let canonicalBytes: [UInt8]

    public init(_ pairs: [String: String] = [:]) {
        self.pairs = pairs
        var w = ByteWriter()
        w.u16(UInt16(pairs.count))
        for (k, v) in Self.sorted(pairs) {
            w.lengthPrefixed16(Array(k.utf8))
            w.lengthPrefixed16(Array(v.utf8))
        }
        canonicalBytes = w.bytes
    }

    /// The context of one file of a volume.
    public static func forFile(volumeId: String, fileId: [UInt8], user: [String: String]) -> EncryptionContext {
        var p = user
        p[volumeIdKey] = volumeId
        p[fileIdKey] = Hex.encode(fileId)
        return EncryptionContext(p)
    }

    public subscript(key: String) -> String? { pairs[key] }

    /// Pairs sorted by the UTF-8 bytes of their keys: the order of the on-disk encoding.
    public var sortedPairs: [(key: String, value: String)] { Self.sorted(pairs) }

    private static func sorted(_ pairs: [String: String]) -> [(key: String, value: String)] {
        pairs.map { ($0.key, $0.value) }.sorted { $0.0.utf8.lexicographicallyPrecedes($1.0.utf8) }
    }

    static func decode(_ r: inout ByteReader) throws -> EncryptionContext {
        let count = Int(try r.u16())
        var pairs: [String: String] = [:]
        var previous: [UInt8]? = nil
        for _ in 0..<count {
            let k = try r.lengthPrefixed16()
            let v = try r.lengthPrefixed16()
            if let p = previous, !p.lexicographicallyPrecedes(k) {
                throw FormatError.malformedHeader("encryption context keys not in canonical order")
            }
            previous = k
            guard let ks = String(validating: k, as: UTF8.self), let vs = String(validating: v, as: UTF8.self) else {
                throw FormatError.malformedHeader("encryption context is not UTF-8")
            }
            // Swift strings compare by canonical equivalence: two byte-distinct keys that are the same text
            // would collapse into one and change what the MAC covers.
            guard pairs.updateValue(vs, forKey: ks) == nil else {
                throw FormatError.malformedHeader("encryption context has the same key twice")
            }
        }
        return EncryptionContext(pairs)
    }

    /// Validates user-supplied pairs: non-empty UTF-8 keys, no reserved prefix, each within 16-bit lengths.
    public static func validateUserPairs(_ pairs: [String: String]) throws {
        for (k, v) in pairs {
            if k.isEmpty { throw FormatError.invalidConfig("an encryption context key is empty") }
            if k.hasPrefix(reservedPrefix) {
                throw FormatError.invalidConfig("encryption context keys starting with \"\(reservedPrefix)\" are reserved")
            }
            if k.utf8.count > 1024 || v.utf8.count > 1024 {
                throw FormatError.invalidConfig("encryption context pair \"\(k)\" is longer than 1024 bytes")
            }
        }
    }
}
