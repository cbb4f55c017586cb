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
        // Not when /proc/self/exe is a loader or a tool running kmsfs (ld.so, valgrind), which would take the
        // arguments as its own.
        var target = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &target, target.count - 1)
        guard n > 0 else { return }
        let exe = String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let base = exe.split(separator: "/").last.map(String.init) ?? exe
        if base.hasPrefix("ld-") || base.hasPrefix("ld.so") || base.contains("valgrind") || base.contains("memcheck") { return }
        setenv("SWIFT_BACKTRACE", current.isEmpty ? setting : current + "," + setting, 1)
        var argv: [UnsafeMutablePointer<CChar>?] = CommandLine.arguments.map { strdup($0) } + [nil]
        execv("/proc/self/exe", &argv)
        // Still here: no /proc, say. Go on with the defaults rather than not at all.
        for a in argv { free(a) }
    }
}
