import KmsfsCrypto

/// Encrypted names (format 3): file names, symbolic link targets, extended attribute names and values, and the
/// directory ID files that bind names to their directory. See kmsfs-format(5), ENCRYPTED NAMES.
///
/// A name is padded to a multiple of 16 bytes (PKCS#7: 1 to 16 bytes, each the pad length), encrypted with
/// AES-256-SIV under the name key with its directory's 16-byte ID as the one associated data element, and stored
/// as the base64url text (no padding) of SIV || ciphertext. AES-SIV is deterministic, so a lookup finds the entry
/// by encrypting the name it was asked for, and authenticated, so an altered name, or one moved to another
/// directory, does not decrypt. A text longer than 255 characters is stored as "kmsfs.long." followed by the
/// base64url SHA-256 of the text, with the text itself in a sibling file of that name plus ".name".
public struct NameCipher: Sendable {
    public let keys: VolumeKeys

    public static let directoryIdFile = "kmsfs.dirid"
    public static let directoryIdSize = 16
    static let directoryIdMagic = Array("kmsfs dirid v3".utf8)
    public static let longPrefix = "kmsfs.long."
    public static let longSuffix = ".name"
    /// Longest name stored as it is; longer ones take the long form.
    public static let maxStoredName = 255
    public static let maxName = 255
    /// Longest symbolic link target the backing filesystem stores (PATH_MAX - 1) once encrypted and encoded.
    public static let maxStoredLinkTarget = 4095
    static let linkTargetAD = Array("kmsfs v3 symlink".utf8)
    static let xattrValueAD = Array("kmsfs v3 xattr".utf8)

    public init(keys: VolumeKeys) { self.keys = keys }

    /// Where an encrypted name is stored in its directory.
    public enum Stored: Equatable, Sendable {
        /// The encoded text is the backing name.
        case short(String)
        /// The backing name is `hashed`; `encoded` is the content of its sibling `hashed + ".name"`.
        case long(hashed: String, encoded: String)

        public var backingName: String {
            switch self {
            case .short(let n): return n
            case .long(let h, _): return h
            }
        }
    }

    // MARK: - names

    /// The stored form of `name` (1 to 255 bytes, no "/" or NUL) in the directory with ID `directoryId`.
    public func encrypt(_ name: [UInt8], directoryId: [UInt8]) throws -> Stored {
        let encoded = Base64URL.encode(try keys.names.seal(ad: [directoryId], plaintext: NameCipher.pad(name)))
        if encoded.utf8.count <= NameCipher.maxStoredName { return .short(encoded) }
        return .long(hashed: NameCipher.longName(of: encoded), encoded: encoded)
    }

    /// The name an encoded text stands for in directory `directoryId`, or nil when it does not decrypt there,
    /// or is not a valid name.
    public func decrypt(encoded: String, directoryId: [UInt8]) -> [UInt8]? {
        guard let sealed = Base64URL.decode(encoded), sealed.count >= AESSIV.tagSize + 16,
              (sealed.count - AESSIV.tagSize) % 16 == 0,
              let padded = keys.names.open(ad: [directoryId], sealed: sealed),
              let name = NameCipher.unpad(padded), NameCipher.isValidName(name) else { return nil }
        return name
    }

    /// The backing name of a long name's encoded text.
    public static func longName(of encoded: String) -> String {
        longPrefix + Base64URL.encode(Digest.sha256(Array(encoded.utf8)))
    }

    /// True for a backing name in the long form (not its ".name" sibling).
    public static func isLongName(_ backingName: String) -> Bool {
        backingName.hasPrefix(longPrefix) && !backingName.hasSuffix(longSuffix)
    }

    /// True for a backing name that can be an encrypted name in the short form.
    public static func isShortName(_ backingName: String) -> Bool {
        let n = backingName.utf8.count
        return n >= Base64URL.encodedLength(AESSIV.tagSize + 16) && n <= maxStoredName && !backingName.utf8.contains(UInt8(ascii: "."))
    }

    /// The encoded text in a long name's sibling file, checked against the hash in the name; nil when they differ.
    public static func checkLongName(_ backingName: String, sibling contents: [UInt8]) -> String? {
        guard contents.count <= 1024, let text = String(validating: contents, as: UTF8.self),
              text.utf8.count > maxStoredName, longName(of: text) == backingName else { return nil }
        return text
    }

    static func pad(_ name: [UInt8]) -> [UInt8] {
        let k = 16 - name.count % 16
        return name + [UInt8](repeating: UInt8(k), count: k)
    }

    static func unpad(_ padded: [UInt8]) -> [UInt8]? {
        guard let last = padded.last, last >= 1, last <= 16, Int(last) <= padded.count,
              padded.suffix(Int(last)).allSatisfy({ $0 == last }) else { return nil }
        return Array(padded.dropLast(Int(last)))
    }

    /// 1 to 255 bytes, no "/" or NUL, not "." or "..".
    public static func isValidName(_ name: [UInt8]) -> Bool {
        !name.isEmpty && name.count <= maxName && !name.contains(0) && !name.contains(UInt8(ascii: "/"))
            && name != [UInt8(ascii: ".")] && name != [UInt8(ascii: "."), UInt8(ascii: ".")]
    }

    // MARK: - directory IDs

    /// A new directory's ID file: magic, 16 random bytes, HMAC-SHA256 under the directory ID key of both.
    public func newDirectoryIdFile() throws -> (id: [UInt8], contents: [UInt8]) {
        let id = try SecureRandom.bytes(NameCipher.directoryIdSize)
        let body = NameCipher.directoryIdMagic + id
        return (id, body + (try keys.hmac(keys.directoryIds, body)))
    }

    /// True when `contents` has the size and magic of a directory ID file (of any volume: nothing is checked
    /// against a key). A user's file of that name in a volume with plaintext names is an encrypted file, which
    /// starts with "KMFS" instead.
    public static func looksLikeDirectoryIdFile(_ contents: [UInt8]) -> Bool {
        contents.count == directoryIdMagic.count + directoryIdSize + 32 && Array(contents.prefix(directoryIdMagic.count)) == directoryIdMagic
    }

    /// The ID in a directory ID file, or nil when the file is not one of this volume's.
    public func directoryId(fromFile contents: [UInt8]) -> [UInt8]? {
        let m = NameCipher.directoryIdMagic.count
        guard contents.count == m + NameCipher.directoryIdSize + 32,
              Array(contents[0..<m]) == NameCipher.directoryIdMagic,
              let expected = try? keys.hmac(keys.directoryIds, Array(contents[0..<m + NameCipher.directoryIdSize])),
              Digest.constantTimeEquals(expected, Array(contents[(m + NameCipher.directoryIdSize)...])) else { return nil }
        return Array(contents[m..<m + NameCipher.directoryIdSize])
    }

    // MARK: - symbolic links

    /// Where a symbolic link is, for a target sealed for it: its directory's ID and its backing name.
    public struct LinkPlace: Sendable {
        public let directoryId: [UInt8]
        public let backingName: String
        public init(directoryId: [UInt8], backingName: String) {
            self.directoryId = directoryId
            self.backingName = backingName
        }
    }

    /// The stored form of a link target X, nil when X is empty or longer than `maxLinkTarget(bound:)`:
    /// - unbound: base64url(nonce || AES-256-GCM ciphertext || tag) under the metadata key, associated data
    ///   "kmsfs v3 symlink" || volume ID;
    /// - bound to `place` (volumes that bind links' names): base64url(link ID || nonce || ciphertext || tag),
    ///   associated data "kmsfs v3 symlink" || volume ID || link ID || directory ID || backing name, where the
    ///   16-byte link ID is random for a new link and kept (`linkId`) when a link is stored again under a new
    ///   name: it is the link's identity (its inode number in the mount, see `shownInode`).
    public func encryptLinkTarget(_ target: [UInt8], for place: LinkPlace?, linkId: [UInt8]? = nil) throws -> String? {
        guard !target.isEmpty, target.count <= NameCipher.maxLinkTarget(bound: place != nil) else { return nil }
        guard let place else { return Base64URL.encode(try keys.sealMetadata(target, ad: linkTargetAD(nil, nil))) }
        let id = try linkId ?? SecureRandom.bytes(NameCipher.linkIdSize)
        guard id.count == NameCipher.linkIdSize else { return nil }
        return Base64URL.encode(id + (try keys.sealMetadata(target, ad: linkTargetAD(id, place))))
    }

    public func decryptLinkTarget(_ stored: String, for place: LinkPlace?) -> [UInt8]? {
        guard let bytes = Base64URL.decode(stored) else { return nil }
        var id: [UInt8]? = nil
        var sealed = bytes
        if place != nil {
            guard bytes.count > NameCipher.linkIdSize else { return nil }
            id = Array(bytes[0..<NameCipher.linkIdSize])
            sealed = Array(bytes[NameCipher.linkIdSize...])
        }
        guard let target = keys.openMetadata(sealed, ad: linkTargetAD(id, place)), !target.isEmpty else { return nil }
        return target
    }

    private func linkTargetAD(_ id: [UInt8]?, _ place: LinkPlace?) -> [UInt8] {
        var ad = NameCipher.linkTargetAD + keys.volumeId
        if let id, let p = place { ad += id + p.directoryId + Array(p.backingName.utf8) }
        return ad
    }

    public static let linkIdSize = 16

    /// The link ID at the front of a bound link's stored target (not authenticated by itself: only a target
    /// that opens vouches for it), or nil.
    public static func linkId(ofStored stored: [UInt8]) -> [UInt8]? {
        // 24 base64url characters hold 18 bytes, the first 16 of which are the ID.
        guard stored.count >= 24, let text = String(validating: stored[0..<24], as: UTF8.self),
              let bytes = Base64URL.decode(text) else { return nil }
        return Array(bytes[0..<linkIdSize])
    }

    /// The inode number the mount shows for a bound link: its link ID's first 8 bytes (little-endian) with the
    /// top bit set, the same under every name the link is stored under (a backing filesystem's own inode
    /// numbers stay below 2^63).
    public static func shownInode(linkId: [UInt8]) -> UInt64 {
        var n: UInt64 = 0
        for i in (0..<8).reversed() { n = n << 8 | UInt64(linkId[i]) }
        return n | (1 << 63)
    }

    /// Longest target that fits once encrypted: 4095 characters of base64url hold 3071 bytes, less 28 of GCM
    /// (3043), and less 16 more for the link ID of a bound link (3027).
    public static func maxLinkTarget(bound: Bool) -> Int {
        maxStoredLinkTarget * 6 / 8 - AESGCM.nonceSize - AESGCM.tagSize - (bound ? linkIdSize : 0)
    }

    /// The target length of a link whose stored target is `storedLength` characters long (its st_size).
    public static func linkTargetSize(storedLength: Int, bound: Bool) -> Int {
        max(0, storedLength * 6 / 8 - AESGCM.nonceSize - AESGCM.tagSize - (bound ? linkIdSize : 0))
    }

    // MARK: - extended attributes

    /// The backing name of attribute `namespace` + `rest` ("user." + "comment"): the namespace as it is (the
    /// kernel enforces its rules on the backing node) and the rest encrypted like a file name, with the namespace
    /// as associated data. nil when the result would exceed the 255-byte limit of attribute names.
    public func encryptXattrName(namespace: [UInt8], rest: [UInt8]) throws -> [UInt8]? {
        guard !rest.isEmpty else { return nil }
        let encoded = Array(Base64URL.encode(try keys.xattrNames.seal(ad: [namespace], plaintext: NameCipher.pad(rest))).utf8)
        guard namespace.count + encoded.count <= 255 else { return nil }
        return namespace + encoded
    }

    public func decryptXattrName(namespace: [UInt8], encoded: [UInt8]) -> [UInt8]? {
        guard let text = String(validating: encoded, as: UTF8.self), let sealed = Base64URL.decode(text),
              sealed.count >= AESSIV.tagSize + 16, (sealed.count - AESSIV.tagSize) % 16 == 0,
              let padded = keys.xattrNames.open(ad: [namespace], sealed: sealed), let rest = NameCipher.unpad(padded),
              !rest.isEmpty, !rest.contains(0) else { return nil }
        return namespace + rest
    }

    /// An attribute value: nonce || AES-256-GCM ciphertext || tag under the metadata key, with associated data
    /// "kmsfs v3 xattr" || the node's 16-byte ID (a file's file ID, a directory's directory ID) || the plaintext
    /// attribute name, so a value moved to another node or another attribute does not open.
    public func sealXattrValue(_ value: [UInt8], nodeId: [UInt8], name: [UInt8]) throws -> [UInt8] {
        try keys.sealMetadata(value, ad: NameCipher.xattrValueAD + nodeId + name)
    }

    public func openXattrValue(_ sealed: [UInt8], nodeId: [UInt8], name: [UInt8]) -> [UInt8]? {
        keys.openMetadata(sealed, ad: NameCipher.xattrValueAD + nodeId + name)
    }

    public static let xattrValueOverhead = AESGCM.nonceSize + AESGCM.tagSize
}
