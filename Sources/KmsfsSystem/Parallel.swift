import CSystem
import Dispatch

/// Running one piece of work on several CPUs at once.
public enum Parallel {
    /// The number of CPUs this process may run on.
    public static let cpuCount = Int(kmsfs_cpu_count())

    /// Calls `body(0) ... body(count - 1)` concurrently (on libdispatch's threads and the calling one) and
    /// returns when all have returned. `body` must only touch what its index gives it, or what is locked.
    public static func forEach(_ count: Int, _ body: (Int) -> Void) {
        if count <= 1 {
            if count == 1 { body(0) }
            return
        }
        withoutActuallyEscaping(body) { escaping in
            let box = UncheckedBox(escaping)
            DispatchQueue.concurrentPerform(iterations: count) { box.value($0) }
        }
    }

    /// Hands a value to the threads of `forEach`; safe because `forEach` does not return before they are done.
    private struct UncheckedBox<T>: @unchecked Sendable {
        let value: T
        init(_ v: T) { value = v }
    }
}
