import Glibc

/// Directory entries from readdir(3).
public enum DirectoryEntry {
    /// The name of an entry, read where it lies. An entry from readdir is only `d_reclen` bytes long, often less
    /// than `struct dirent` (whose `d_name` has room for 256 bytes): copying the struct or its `d_name`, as
    /// `entry.pointee.d_name` does, reads past the record, and past the end of the stream's buffer when the entry
    /// is its last one (a crash when that is the end of mapped memory).
    public static func name(_ entry: UnsafeMutablePointer<dirent>) -> String {
        String(cString: UnsafeRawPointer(entry).advanced(by: nameOffset).assumingMemoryBound(to: CChar.self))
    }

    /// The name of an entry as bytes (a name need not be UTF-8), read where it lies.
    public static func nameBytes(_ entry: UnsafeMutablePointer<dirent>) -> [UInt8] {
        let p = UnsafeRawPointer(entry).advanced(by: nameOffset).assumingMemoryBound(to: CChar.self)
        return Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
    }

    /// Every entry name of an open directory stream, read to its end, but "." and "..".
    public static func names(_ stream: OpaquePointer) -> [String] {
        var names: [String] = []
        while let entry = readdir(stream) {
            let n = name(entry)
            if n != "." && n != ".." { names.append(n) }
        }
        return names
    }

    private static let nameOffset = MemoryLayout<dirent>.offset(of: \dirent.d_name)!
}
