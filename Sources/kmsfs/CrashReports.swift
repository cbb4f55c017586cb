import CSystem
import Glibc

/// What the Swift runtime's crash report may show. By default a crash report (when output is not a terminal)
/// lists every register with the memory around the addresses they hold: a crash inside crypto code could put
/// key bytes into the daemon's log. kmsfs keeps the backtrace (which functions, which lines) and drops the
/// registers, the memory they point to and the loaded-image list, and never waits for a debugger.
///
/// The runtime reads SWIFT_BACKTRACE once, when the process starts, so the setting is put in place by
/// re-executing the program (once, at the start of every command) with it appended to whatever the user set:
/// later settings win.
enum CrashReports {
    static let setting = "interactive=no,registers=none,images=none,sanitize=yes"

    /// Re-executes this program with the safe setting unless it already has it; returns only when it does
    /// (or when re-executing failed, which leaves the runtime's defaults: a crash report could then show memory).
    static func restrict() {
        let current = getenv("SWIFT_BACKTRACE").map { String(cString: $0) } ?? ""
        if current.hasSuffix(setting) { return }
        // Only when /proc/self/exe is kmsfs itself, not a loader or a tool running it (ld.so, valgrind), which
        // would take the arguments as its own.
        guard kmsfs_exe_is_self() == 1 else { return }
        setenv("SWIFT_BACKTRACE", current.isEmpty ? setting : current + "," + setting, 1)
        var argv: [UnsafeMutablePointer<CChar>?] = CommandLine.arguments.map { strdup($0) } + [nil]
        execv("/proc/self/exe", &argv)
        // Still here: no /proc, say. Go on with the defaults rather than not at all.
        for a in argv { free(a) }
    }
}
