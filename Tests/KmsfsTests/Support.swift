import Foundation
import Glibc
import KmsfsSystem

/// A temporary directory removed (with everything in it) when the value goes away.
final class TempDir {
    let path: String

    init(_ prefix: String = "kmsfs-test") throws {
        var template = Array((FileManager.default.temporaryDirectory.path + "/\(prefix)-XXXXXX").utf8CString)
        guard let p = mkdtemp(&template) else { throw Errno.current }
        path = String(cString: p)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}
