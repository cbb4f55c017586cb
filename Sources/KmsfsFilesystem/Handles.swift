import Glibc

/// What a FUSE handle (`fuse_file_info.fh`) points to: a retained `FileHandle` or `DirHandle`.
class Handle: @unchecked Sendable {  // immutable after creation; the kernel serializes use of a directory stream
    /// The handle as a `fh` value (retains it until `take` is called).
    func retainedValue() -> UInt64 {
        UInt64(UInt(bitPattern: Unmanaged.passRetained(self).toOpaque()))
    }

    /// The handle behind a `fh` value, still retained.
    static func peek(_ fh: UInt64) -> Handle {
        Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(fh))!).takeUnretainedValue()
    }

    /// The handle behind a `fh` value, releasing the retain of `retainedValue()`.
    static func take(_ fh: UInt64) -> Handle {
        Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(fh))!).takeRetainedValue()
    }
}

/// An open regular file: its backing descriptor (opened read-write whenever the handle may write, because
/// partial chunks are read back) and the shared entry of its inode.
final class FileHandle: Handle, @unchecked Sendable {
    let fd: Int32
    let file: OpenFile
    let writable: Bool
    /// Opened with O_APPEND: in shared mode each write goes at the end as the backing file has it (the kernel's
    /// idea of the end may be another host's behind).
    let append: Bool
    /// `fd` is open for writing (in shared mode a writable handle keeps a read-only one: `sharedDescriptor`).
    let fdWritable: Bool

    init(fd: Int32, file: OpenFile, writable: Bool, append: Bool = false, fdWritable: Bool? = nil) {
        self.fd = fd
        self.file = file
        self.writable = writable
        self.append = append
        self.fdWritable = fdWritable ?? writable
    }

    var content: ContentIO { ContentIO(fd: fd, file: file) }
}

/// An open directory stream.
final class DirHandle: Handle, @unchecked Sendable {
    let stream: OpaquePointer
    /// The directory listed (kept alive with the handle).
    let inode: Inode
    /// The directory as the name mapping sees it (set once by opendir).
    var names = NameDirectory(inRoot: false, id: [], fd: -1)

    init(stream: OpaquePointer, inode: Inode) {
        self.stream = stream
        self.inode = inode
    }

    deinit { closedir(stream) }
}
