import Glibc
import KmsfsKeys
import Synchronization
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// The directory a name is looked up, listed or made in, as a name mapping needs it.
public struct NameDirectory {
    /// The top of the volume (where the volume config lives).
    public let inRoot: Bool
    /// The directory's ID (encrypted names; empty otherwise).
    public let id: [UInt8]
    /// A descriptor of the backing directory (O_PATH), valid during the call.
    public let fd: Int32

    public init(inRoot: Bool, id: [UInt8], fd: Int32) {
        self.inRoot = inRoot
        self.id = id
        self.fd = fd
    }
}

/// An entry's name in the backing directory.
public struct BackingName: Equatable {
    public let name: String
    /// A long encrypted name: the text its sibling `name + ".name"` holds.
    public let longText: String?

    public init(_ name: String, longText: String? = nil) {
        self.name = name
        self.longText = longText
    }

    /// The sibling file of a long name.
    public var sibling: String? { longText == nil ? nil : name + NameCipher.longSuffix }
}

/// Maps names in the mount to names in the backing directory, and back, one path component at a time, and
/// symbolic link targets likewise. This is the one place that knows how names are stored.
public protocol NameMapping: Sendable {
    /// True when names depend on their directory's ID (`NameDirectory.id` must be given).
    var usesDirectoryIds: Bool { get }
    /// The backing name of entry `name` of a directory. Throws ENOENT for names kmsfs reserves for itself (EPERM
    /// when `creating` one), ENAMETOOLONG for names that cannot be stored.
    func backingName(_ name: [UInt8], in dir: NameDirectory, creating: Bool) throws -> BackingName
    /// The mount name of a backing directory entry, or nil when the entry is kmsfs's own and stays hidden, or
    /// does not decrypt (then logged once).
    func mountName(_ backingName: String, in dir: NameDirectory) -> [UInt8]?
    /// Symlink targets as stored, and as shown, for the link at `place` (its directory's ID and backing name);
    /// `linkTargetSize` is the shown length of a stored one.
    func backingLinkTarget(_ target: [UInt8], at place: NameCipher.LinkPlace, linkId: [UInt8]?) throws -> String
    func mountLinkTarget(_ stored: [UInt8], at place: NameCipher.LinkPlace) throws -> [UInt8]
    func linkTargetSize(storedLength: Int) -> Int
    /// True when a stored target is sealed for its link's place, so that a link moved to another name must be
    /// stored again, keeping its link ID (`NameCipher.linkId(ofStored:)`; volumes that bind links' names).
    var bindsLinkTargets: Bool { get }
    /// The volume's name cipher (names, directory IDs, link targets, extended attributes), or nil when all of
    /// these are stored as they are.
    var cipher: NameCipher? { get }
}

/// Names stored as they are (formats 1 and 2, and format 3 volumes made with --plaintext-names), except that
/// kmsfs's own files are hidden and cannot be created, opened or renamed through the mount: at the top of the
/// backing directory the volume config, its temporary files and the rotation journal (every name starting with
/// "kmsfs.conf"), and in every directory the files being made under a temporary name (".kmsfs-new.*", see
/// `TemporaryNames`). Names are UTF-8 here (bytes that are not are replaced).
public struct PlaintextNames: NameMapping {
    public init() {}

    public var usesDirectoryIds: Bool { false }
    public var cipher: NameCipher? { nil }

    /// Names are stored as they are, so they must be UTF-8 (the backing calls take them as text): creating any
    /// other name fails with EILSEQ, as on a filesystem that accepts only UTF-8 names, and looking one up finds
    /// nothing. Volumes with encrypted names take any bytes.
    public func backingName(_ name: [UInt8], in dir: NameDirectory, creating: Bool) throws -> BackingName {
        guard let text = String(validating: name, as: UTF8.self) else { throw creating ? Errno(EILSEQ) : Errno.ENOENT }
        if PlaintextNames.isOwn(text, inRoot: dir.inRoot) { throw creating ? Errno.EPERM : Errno.ENOENT }
        return BackingName(text)
    }

    public func mountName(_ backingName: String, in dir: NameDirectory) -> [UInt8]? {
        PlaintextNames.isOwn(backingName, inRoot: dir.inRoot) ? nil : Array(backingName.utf8)
    }

    public func backingLinkTarget(_ target: [UInt8], at place: NameCipher.LinkPlace, linkId: [UInt8]?) throws -> String {
        guard let text = String(validating: target, as: UTF8.self) else { throw Errno(EILSEQ) }
        return text
    }
    public func mountLinkTarget(_ stored: [UInt8], at place: NameCipher.LinkPlace) throws -> [UInt8] { stored }
    public var bindsLinkTargets: Bool { false }
    public func linkTargetSize(storedLength: Int) -> Int { storedLength }

    /// kmsfs's own entries in a backing directory with plaintext names.
    public static func isOwn(_ name: String, inRoot: Bool) -> Bool {
        (inRoot && isReserved(name)) || TemporaryNames.isTemporary(name)
    }

    static func isReserved(_ name: String) -> Bool {
        name == VolumeConfig.fileName || name.hasPrefix(VolumeConfig.fileName + ".")
    }
}

/// Encrypted names (format 3, see `NameCipher`): every entry of a backing directory that is not a valid
/// encrypted name (the volume config, directory ID files, long names' ".name" siblings, temporary files) is
/// kmsfs's own or foreign, and never shown.
public final class EncryptedNames: NameMapping, @unchecked Sendable {
    let encryption: NameCipher
    public let bindsLinkTargets: Bool
    /// Backing names already reported as not decrypting (each is logged once).
    private let reported = Mutex(Set<String>())
    /// Names encrypted lately, by directory ID and name: a create encrypts the name its lookup just did.
    private let encrypted = BoundedCache<EncryptedKey, NameCipher.Stored>(capacity: 256)

    private struct EncryptedKey: Hashable {
        let directoryId: [UInt8]
        let name: [UInt8]
    }

    /// `bindsLinkTargets`: the volume's config says so (`VolumeConfig.bindsLinkTargets`).
    public init(cipher: NameCipher, bindsLinkTargets: Bool) {
        encryption = cipher
        self.bindsLinkTargets = bindsLinkTargets
    }

    public var usesDirectoryIds: Bool { true }
    public var cipher: NameCipher? { encryption }

    public func backingName(_ name: [UInt8], in dir: NameDirectory, creating: Bool) throws -> BackingName {
        guard NameCipher.isValidName(name) else { throw Errno(ENAMETOOLONG) }
        let key = EncryptedKey(directoryId: dir.id, name: name)
        let result: NameCipher.Stored
        if let known = encrypted[key] {
            result = known
        } else {
            result = try encryption.encrypt(name, directoryId: dir.id)
            encrypted[key] = result
        }
        switch result {
        case .short(let n): return BackingName(n)
        case .long(let h, let text): return BackingName(h, longText: text)
        }
    }

    public func mountName(_ backingName: String, in dir: NameDirectory) -> [UInt8]? {
        let text: String
        if NameCipher.isShortName(backingName) {
            text = backingName
        } else if NameCipher.isLongName(backingName) {
            guard let contents = EncryptedNames.readSibling(backingName + NameCipher.longSuffix, in: dir.fd),
                  let t = NameCipher.checkLongName(backingName, sibling: contents) else {
                report(backingName, "its \(NameCipher.longSuffix) file is missing or does not match")
                return nil
            }
            text = t
        } else {
            return nil  // kmsfs's own (config, directory ID, long-name siblings, temporary files) or foreign
        }
        guard let name = encryption.decrypt(encoded: text, directoryId: dir.id) else {
            report(backingName, "it does not decrypt in this directory (altered, or moved here from another directory)")
            return nil
        }
        return name
    }

    public func backingLinkTarget(_ target: [UInt8], at place: NameCipher.LinkPlace, linkId: [UInt8]?) throws -> String {
        guard let stored = try encryption.encryptLinkTarget(target, for: bindsLinkTargets ? place : nil, linkId: linkId) else {
            throw Errno(ENAMETOOLONG)
        }
        return stored
    }

    public func mountLinkTarget(_ stored: [UInt8], at place: NameCipher.LinkPlace) throws -> [UInt8] {
        guard let text = String(validating: stored, as: UTF8.self),
              let target = encryption.decryptLinkTarget(text, for: bindsLinkTargets ? place : nil) else {
            throw Errno.EIO
        }
        return target
    }

    public func linkTargetSize(storedLength: Int) -> Int {
        NameCipher.linkTargetSize(storedLength: storedLength, bound: bindsLinkTargets)
    }

    /// Logs once per backing name that an entry is left out of listings.
    func report(_ backingName: String, _ why: String) {
        let first = reported.withLock { set -> Bool in
            if set.count > 10_000 { set.removeAll() }
            return set.insert(backingName).inserted
        }
        if first {
            FailureLog.shared.log(.error, kind: "undecryptable-name",
                                  "left out of the listing: backing entry \(backingName): \(why)")
        }
    }

    /// The contents of a small file in a backing directory (a long name's sibling), or nil.
    static func readSibling(_ name: String, in dfd: Int32) -> [UInt8]? {
        let fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1025)
        let n = buffer.withUnsafeMutableBytes { (try? FileIO.pread(fd, $0.baseAddress!, count: $0.count, offset: 0)) ?? -1 }
        guard n >= 0, n <= 1024 else { return nil }
        return Array(buffer[0..<n])
    }
}

/// kmsfs's own entries of a backing directory, for tools that walk the backing tree (rewrap, verify): the
/// volume config and its companions at the top, temporary files, and with encrypted names every entry that is
/// not an encrypted name (directory ID files, long names' siblings).
public func isOwnBackingEntry(_ name: String, inRoot: Bool, volume: VolumeConfig) -> Bool {
    if volume.encryptsNames { return !(NameCipher.isShortName(name) || NameCipher.isLongName(name)) }
    return PlaintextNames.isOwn(name, inRoot: inRoot)
}
