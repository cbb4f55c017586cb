import Glibc

/// Crash points for testing crash safety: when the environment variable KMSFS_FAILPOINT names a point,
/// the process exits there at once (status 99), as if it had lost power. Unset in normal use.
public enum Failpoint {
    private static let armed: String? = getenv("KMSFS_FAILPOINT").map { String(cString: $0) }

    public static func hit(_ name: String) {
        if armed == name { _exit(99) }
    }
}
