import Glibc
import Synchronization

/// Crash points for testing crash safety: when the environment variable KMSFS_FAILPOINT names a point
/// ("name", or "name:N" for its N-th hit), the process exits there at once (status 99), as if it had lost
/// power. Unset in normal use.
public enum Failpoint {
    private static let armed: (name: String, hit: Int)? = {
        guard let raw = getenv("KMSFS_FAILPOINT").map({ String(cString: $0) }), !raw.isEmpty else { return nil }
        let parts = raw.split(separator: ":")
        return (String(parts[0]), parts.count > 1 ? Int(parts[1]) ?? 1 : 1)
    }()
    private static let hits = Atomic<Int>(0)

    public static func hit(_ name: String) {
        guard let a = armed, a.name == name else { return }
        if hits.add(1, ordering: .relaxed).newValue == a.hit { _exit(99) }
    }

    /// Like `hit`, but a real crash (a bad pointer dereference) instead of an exit: what the crash report shows.
    public static func crash(_ name: String) {
        guard let a = armed, a.name == name else { return }
        if hits.add(1, ordering: .relaxed).newValue == a.hit {
            UnsafeMutablePointer<Int>(bitPattern: 8 + Int(getpid() & 0))!.pointee = 1
        }
    }
}
