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

/// Polls `condition` every 10 ms until it holds or `seconds` have passed; says whether it held.
/// For effects that FUSE delivers asynchronously (release and forget), never as a timing assertion.
func waitFor(seconds: Double = 5, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    repeat {
        if try condition() { return true }
        usleep(10_000)
    } while Date() < deadline
    return try condition()
}
