import CSystem
import Glibc

/// A POSIX error number, thrown by system-call wrappers and returned (negated) to FUSE.
public struct Errno: Error, Equatable, CustomStringConvertible, Sendable {
    public let code: Int32

    public init(_ code: Int32) { self.code = code }

    /// The calling thread's current errno.
    public static var current: Errno { Errno(kmsfs_errno()) }

    public var description: String { String(cString: strerror(code)) }

    public static let EIO = Errno(Glibc.EIO)
    public static let ENOENT = Errno(Glibc.ENOENT)
    public static let EACCES = Errno(Glibc.EACCES)
    public static let EPERM = Errno(Glibc.EPERM)
    public static let EINVAL = Errno(Glibc.EINVAL)
    public static let ENOSPC = Errno(Glibc.ENOSPC)
    public static let EEXIST = Errno(Glibc.EEXIST)
    public static let ENOMEM = Errno(Glibc.ENOMEM)
    public static let EROFS = Errno(Glibc.EROFS)
    public static let EBADF = Errno(Glibc.EBADF)
    public static let EFBIG = Errno(Glibc.EFBIG)
    public static let ENOTSUP = Errno(Glibc.EOPNOTSUPP)
    public static let EISDIR = Errno(Glibc.EISDIR)
}

/// Runs a system call returning -1 on failure, retrying on EINTR; throws the errno.
@inlinable
@discardableResult
public func syscall<T: BinaryInteger>(_ body: () -> T) throws -> T {
    while true {
        let r = body()
        if r != -1 { return r }
        let e = Errno.current
        if e.code != EINTR { throw e }
    }
}
