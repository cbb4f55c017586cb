import Glibc
import KmsfsFormat
import KmsfsSystem

/// Maps names in the mount to names in the backing directory, and back, one path component at a time.
///
/// This is the one place that knows how names are stored. Format v1 stores names in plaintext (the
/// identity mapping below); name encryption will replace this type without touching the handlers.
public protocol NameMapping: Sendable {
    /// The backing name of entry `name` of a directory (`inRoot`: the top of the volume).
    /// Throws ENOENT for names kmsfs reserves for itself, or EPERM when `creating` one.
    func backingName(_ name: String, inRoot: Bool, creating: Bool) throws -> String
    /// The mount name of a backing directory entry, or nil when the entry is kmsfs's own and stays hidden.
    func mountName(_ backingName: String, inRoot: Bool) -> String?
    /// The mount path ("/a/b") of a backing path relative to the backing root ("a/b"), for log lines.
    func mountPath(ofBacking relative: String) -> String
    /// Symlink targets as stored, and as shown.
    func backingLinkTarget(_ target: String) -> String
    func mountLinkTarget(_ stored: String) -> String
}

/// Format v1 names: stored as they are, except that kmsfs's own files are hidden and cannot be created, opened or
/// renamed through the mount: at the top of the backing directory the volume config, its temporary files and the
/// rotation journal (every name starting with "kmsfs.conf"), and in every directory the files being made under a
/// temporary name (".kmsfs-new.*", see `TemporaryNames`).
public struct PlaintextNames: NameMapping {
    public init() {}

    public func backingName(_ name: String, inRoot: Bool, creating: Bool) throws -> String {
        if (inRoot && PlaintextNames.isReserved(name)) || TemporaryNames.isTemporary(name) {
            throw creating ? Errno.EPERM : Errno.ENOENT
        }
        return name
    }

    public func mountName(_ backingName: String, inRoot: Bool) -> String? {
        (inRoot && PlaintextNames.isReserved(backingName)) || TemporaryNames.isTemporary(backingName) ? nil : backingName
    }

    public func mountPath(ofBacking relative: String) -> String { "/" + relative }

    public func backingLinkTarget(_ target: String) -> String { target }
    public func mountLinkTarget(_ stored: String) -> String { stored }

    static func isReserved(_ name: String) -> Bool {
        name == VolumeConfig.fileName || name.hasPrefix(VolumeConfig.fileName + ".")
    }
}
