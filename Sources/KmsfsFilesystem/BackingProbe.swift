import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// What the backing filesystem really does, found out at mount by trying it in the backing directory, so that
/// kmsfs uses only what works. FUSE-based and network filesystems differ: JuiceFS, for one, accepts O_TMPFILE
/// and a link of it, and the linked file is still there right after the close, yet gone a few seconds later
/// (it emulates O_TMPFILE with a name it removes). No quick probe can see that, so O_TMPFILE is used only on
/// local filesystems known to implement it (ext4, XFS, Btrfs, tmpfs, F2FS, bcachefs), and there only if the probe
/// also passes; elsewhere new files are made under a temporary name and renamed into place without replacing.
public struct BackingFeatures: Sendable, Equatable, CustomStringConvertible {
    /// An O_TMPFILE file linked into place survives the close of its descriptor.
    public var tmpfileLink: Bool
    /// renameat2(RENAME_NOREPLACE) refuses an existing target and moves to a free one.
    public var renameNoReplace: Bool
    /// Hard links: a second name for a file, counted in st_nlink.
    public var hardLinks: Bool
    /// The backing filesystem may be shared with other hosts (FUSE-based or network): flock of the backing
    /// directory may not reach them (the volume lease does).
    public var possiblyShared = false
    /// Extended attributes (user namespace) can be set; without them setxattr fails with the backing
    /// filesystem's ENOTSUP.
    public var xattrs = true
    /// The longest backing name (names longer fail with ENAMETOOLONG); 0 when unknown.
    public var nameMax = 0
    /// Open-file-description byte-range locks are enforced: a write lock taken through one open of a file keeps
    /// another open of it from taking one (shared mode needs them; see `EncryptedFilesystem.withIO`).
    public var locks = false
    /// A hole (a file written past its end) takes no space. kmsfs works either way, holes reading as zeros; without
    /// sparse files a hole's zeros are stored.
    public var sparseFiles = true

    /// What the mount assumes without probing (read-only mounts, which create nothing). Locks are tried at use.
    public static var assumed: BackingFeatures {
        var f = BackingFeatures(tmpfileLink: true, renameNoReplace: true, hardLinks: true)
        f.locks = true
        return f
    }

    public init(tmpfileLink: Bool, renameNoReplace: Bool, hardLinks: Bool) {
        self.tmpfileLink = tmpfileLink
        self.renameNoReplace = renameNoReplace
        self.hardLinks = hardLinks
    }

    public var description: String {
        let create = tmpfileLink ? "O_TMPFILE, linked when complete"
            : renameNoReplace ? "a temporary name, renamed into place without replacing"
            : hardLinks ? "a temporary name, hard-linked into place" : "O_EXCL on the final name"
        return "new files are made with \(create); O_TMPFILE+link \(tmpfileLink ? "works" : "does not survive close or fails"), "
            + "rename without replace \(renameNoReplace ? "works" : "unsupported"), hard links \(hardLinks ? "work" : "unsupported"), "
            + "extended attributes \(xattrs ? "work" : "unsupported (setxattr fails with ENOTSUP)"), "
            + "names up to \(nameMax > 0 ? "\(nameMax) bytes" : "an unknown length"), "
            + "byte-range locks \(locks ? "enforced" : "not enforced"), "
            + "holes \(sparseFiles ? "take no space" : "take space (a file written past its end stores the zeros)")"
    }

    /// Probes in directory `dirFd` (the top of the backing directory) with names kmsfs reserves, and removes
    /// what it made.
    public static func probe(dirFd: Int32) -> BackingFeatures {
        let tag = Hex.encode((try? SecureRandom.bytes(6)) ?? [0, 0, 0, 0, 0, 0])
        let a = "\(TemporaryNames.prefix)probe-\(tag)-a", b = "\(TemporaryNames.prefix)probe-\(tag)-b"
        let c = "\(TemporaryNames.prefix)probe-\(tag)-c"
        defer { for n in [a, b, c] { unlinkat(dirFd, n, 0) } }

        var features = BackingFeatures(tmpfileLink: false, renameNoReplace: false, hardLinks: false)
        let type = kmsfs_fstatfs_type(dirFd)
        features.nameMax = Int(max(0, kmsfs_fstatfs_namelen(dirFd)))
        features.possiblyShared = type >= 0 && sharedFilesystems.contains(UInt(UInt32(truncatingIfNeeded: type)))
        let tmp = isLocalWithTmpfile(dirFd) ? openat(dirFd, ".", kmsfs_o_tmpfile() | O_RDWR | O_CLOEXEC, 0o600) : -1
        if tmp >= 0 {
            var byte: UInt8 = 7
            let wrote = Glibc.write(tmp, &byte, 1) == 1
            let linked = linkat(tmp, "", dirFd, a, AT_EMPTY_PATH_FLAG) == 0
                || linkat(AT_FDCWD, "/proc/self/fd/\(tmp)", dirFd, a, AT_SYMLINK_FOLLOW) == 0
            close(tmp)
            var st = stat()
            features.tmpfileLink = wrote && linked && fstatat(dirFd, a, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_size == 1
            unlinkat(dirFd, a, 0)
        }

        let fa = openat(dirFd, a, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        let fb = openat(dirFd, b, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fa >= 0 { close(fa) }
        if fb >= 0 { close(fb) }
        if fa >= 0 {
            let probeFd = openat(dirFd, a, O_RDONLY | O_CLOEXEC)
            if probeFd >= 0 {
                var v: UInt8 = 1
                features.xattrs = fsetxattr(probeFd, "user.kmsfs.probe", &v, 1, 0) == 0
                close(probeFd)
            }
            // Two opens of one file: a write lock through the first must keep the second from a read lock, and
            // must be gone once released.
            let l1 = openat(dirFd, a, O_RDWR | O_CLOEXEC), l2 = openat(dirFd, a, O_RDWR | O_CLOEXEC)
            if l1 >= 0 && l2 >= 0 && kmsfs_ofd_lock(l1, Int32(F_WRLCK), 0) == 0 {
                let blocked = kmsfs_ofd_lock(l2, Int32(F_RDLCK), 0) != 0 && (errno == EAGAIN || errno == EACCES)
                _ = kmsfs_ofd_lock(l1, Int32(F_UNLCK), 0)
                features.locks = blocked && kmsfs_ofd_lock(l2, Int32(F_RDLCK), 0) == 0
                _ = kmsfs_ofd_lock(l2, Int32(F_UNLCK), 0)
            }
            if l1 >= 0 { close(l1) }
            if l2 >= 0 { close(l2) }
        }
        // One byte 1 MiB into an empty file: a hole before it that takes no space, or 1 MiB of zeros.
        let sparseFd = fb >= 0 ? openat(dirFd, b, O_RDWR | O_CLOEXEC) : -1
        if sparseFd >= 0 {
            var byte: UInt8 = 1
            var st = stat()
            if pwrite(sparseFd, &byte, 1, 1 << 20) == 1 && fstat(sparseFd, &st) == 0 {
                features.sparseFiles = Int(st.st_blocks) * 512 < 1 << 19
            }
            _ = ftruncate(sparseFd, 0)
            close(sparseFd)
        }
        if fa >= 0 && fb >= 0 {
            let refused = kmsfs_renameat2(dirFd, a, dirFd, b, kmsfs_rename_noreplace()) != 0 && errno == EEXIST
            var sa = stat(), sb = stat()
            let bothThere = fstatat(dirFd, a, &sa, AT_SYMLINK_NOFOLLOW) == 0 && fstatat(dirFd, b, &sb, AT_SYMLINK_NOFOLLOW) == 0
            let moved = refused && bothThere && kmsfs_renameat2(dirFd, a, dirFd, c, kmsfs_rename_noreplace()) == 0
                && fstatat(dirFd, a, &sa, AT_SYMLINK_NOFOLLOW) != 0 && fstatat(dirFd, c, &sa, AT_SYMLINK_NOFOLLOW) == 0
            features.renameNoReplace = moved
            // The file now at `source` gets a second name at the free `target`.
            let (source, target) = moved ? (c, a) : (a, c)
            if linkat(dirFd, source, dirFd, target, 0) == 0 {
                var st = stat()
                features.hardLinks = fstatat(dirFd, source, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_nlink == 2
            }
        }
        return features
    }
}

extension BackingFeatures {
    /// statfs magic numbers of local filesystems whose O_TMPFILE is the kernel's own.
    static let localTmpfileFilesystems: Set<UInt> = [
        0xEF53,      // ext2/3/4
        0x5846_5342, // XFS
        0x9123_683E, // Btrfs
        0x0102_1994, // tmpfs
        0xF2F5_2010, // F2FS
        0xCA45_1A4E, // bcachefs
    ]

    /// statfs magic numbers of FUSE (JuiceFS, GlusterFS, s3fs, ...) and network filesystems.
    static let sharedFilesystems: Set<UInt> = [
        0x6573_5546, // FUSE
        0x6969,      // NFS
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x00C3_6400, // CephFS
        0x0BD0_0BD0, // Lustre
        0x4750_4653, // GPFS
    ]

    static func isLocalWithTmpfile(_ dirFd: Int32) -> Bool {
        let type = kmsfs_fstatfs_type(dirFd)
        return type >= 0 && localTmpfileFilesystems.contains(UInt(UInt32(truncatingIfNeeded: type)))
    }
}

/// Names kmsfs gives backing files while they are being made (when O_TMPFILE cannot be used): hidden from
/// listings and refused through the mount, in every directory.
public enum TemporaryNames {
    public static let prefix = ".kmsfs-new."

    public static func isTemporary(_ name: String) -> Bool { name.hasPrefix(prefix) }

    /// A fresh temporary name.
    public static func make() -> String {
        prefix + Hex.encode((try? SecureRandom.bytes(12)) ?? (0..<12).map { _ in UInt8.random(in: 0...255) })
    }
}
