import Glibc
import KmsfsFormat
import KmsfsSystem

/// Maps names in the mount to names in the backing directory, and back.
///
/// This is the one place that knows how names are stored. Format v1 stores names in plaintext (the
/// identity mapping below); name encryption will replace this type without touching the handlers.
public protocol NameMapping: Sendable {
    /// The backing path, relative to the backing root ("." for the root), of a mount path ("/a/b").
    /// Throws ENOENT for names kmsfs reserves for itself, or EPERM when `creating` one.
    func backingPath(_ mountPath: String, creating: Bool) throws -> String
    /// The mount name of a backing directory entry, or nil when the entry is kmsfs's own and stays hidden.
    func mountName(_ backingName: String, inRoot: Bool) -> String?
    /// Symlink targets as stored, and as shown.
    func backingLinkTarget(_ target: String) -> String
    func mountLinkTarget(_ stored: String) -> String
}

/// Format v1 names: stored as they are, except that the volume config (and its temporary files) at the top
/// of the backing directory is hidden and cannot be created, opened or renamed through the mount.
public struct PlaintextNames: NameMapping {
    public init() {}

    public func backingPath(_ mountPath: String, creating: Bool) throws -> String {
        var rel = Substring(mountPath)
        while rel.first == "/" { rel = rel.dropFirst() }
        if rel.isEmpty { return "." }
        let top = rel.prefix { $0 != "/" }
        if PlaintextNames.isReserved(top) && top.count == rel.count {
            throw creating ? Errno.EPERM : Errno.ENOENT
        }
        return String(rel)
    }

    public func mountName(_ backingName: String, inRoot: Bool) -> String? {
        inRoot && PlaintextNames.isReserved(Substring(backingName)) ? nil : backingName
    }

    public func backingLinkTarget(_ target: String) -> String { target }
    public func mountLinkTarget(_ stored: String) -> String { stored }

    static func isReserved(_ name: Substring) -> Bool {
        name == VolumeConfig.fileName || name.hasPrefix(VolumeConfig.fileName + ".tmp-")
    }
}
