import Glibc
import KmsfsSystem

enum Paths {
    /// The absolute, symlink-free form of an existing path.
    static func resolve(_ path: String) throws -> String {
        guard let r = realpath(path, nil) else {
            throw CLIError("\(path): \(Errno.current)")
        }
        defer { free(r) }
        return String(cString: r)
    }

    /// An absolute form of a path that may not exist yet (its parent must).
    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX))
        guard getcwd(&buf, buf.count) != nil else { return path }
        let cwd = buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return (cwd == "/" ? "" : cwd) + "/" + path
    }

    /// Creates `path` and any missing parents (like mkdir -p); parents get mode 0755, `path` itself `mode`.
    static func makeDirectories(_ path: String, mode: mode_t) throws {
        try FileIO.makeDirectories(absolute(path), mode: mode)
    }

    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFDIR
    }

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    /// Entries of a directory other than . and ..
    static func entries(_ path: String) throws -> [String] {
        guard let d = opendir(path) else { throw CLIError("\(path): \(Errno.current)") }
        defer { closedir(d) }
        return DirectoryEntry.names(d)
    }

    static var environment: [String: String] {
        var env: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return env
    }
}
