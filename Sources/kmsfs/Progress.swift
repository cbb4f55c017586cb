import ArgumentParser
import Glibc
import KmsfsSystem

/// How a long offline command (verify, decrypt -r, rewrap) reports progress: a line redrawn in place on a
/// terminal (files, bytes, rate, ETA), a plain line every few seconds otherwise, nothing with --quiet; and with
/// --json, one JSON summary on standard output at the end instead of the text one.
struct ProgressOptions: ParsableArguments {
    @Flag(name: .long, help: "No progress and no summary line (damage is still reported, and the exit status says it all).")
    var quiet = false

    @Flag(name: .long, help: "Print the summary as one JSON object on standard output.")
    var json = false
}

final class Progress {
    let what: String
    var total: Int?
    let totalBytes: Int?
    let options: ProgressOptions
    private let start = Monotonic.seconds()
    private var last = 0.0
    private let terminal = isatty(2) == 1
    private var drawn = false
    private(set) var done = 0
    private(set) var bytes = 0

    init(_ what: String, total: Int? = nil, totalBytes: Int? = nil, options: ProgressOptions) {
        self.what = what
        self.total = total
        self.totalBytes = totalBytes
        self.options = options
    }

    /// One more item done (`bytes` of it).
    func step(bytes: Int = 0) {
        done += 1
        self.bytes += bytes
        let now = Monotonic.seconds()
        guard !options.quiet, now - last >= (terminal ? 0.2 : 5) else { return }
        last = now
        let text = line(now: now)
        if terminal {
            printErrorRaw("\r\u{1b}[K" + text)
            drawn = true
        } else {
            printError(text)
        }
    }

    /// A line that reports something else (damage) must not be drawn over: the progress line is cleared first.
    func clearLine() {
        if drawn {
            printErrorRaw("\r\u{1b}[K")
            drawn = false
        }
    }

    private func line(now: Double) -> String {
        let elapsed = max(now - start, 0.001)
        var s = "\(what) \(done)\(total.map { "/\($0)" } ?? "") files"
        s += bytes > 0 ? ", \(Progress.size(bytes)) (\(Progress.size(Int(Double(bytes) / elapsed)))/s" : " ("
        if bytes == 0 { s += "\(Int((Double(done) / elapsed).rounded())) files/s" }
        if let t = totalBytes, t > 0, bytes > 0 {
            let eta = Double(t - bytes) / (Double(bytes) / elapsed)
            s += ", about \(Int(max(eta, 0).rounded())) s left"
        } else if let t = total, t > 0, done > 0 {
            let eta = Double(t - done) / (Double(done) / elapsed)
            s += ", about \(Int(max(eta, 0).rounded())) s left"
        }
        return s + ")"
    }

    /// The end: the text summary (unless --quiet) or the JSON one.
    func finish(summary: String, fields: [(String, Any)]) {
        clearLine()
        let seconds = Monotonic.seconds() - start
        if options.json {
            var all = fields
            all.append(("seconds", (seconds * 1000).rounded() / 1000))
            let body = all.map { key, value -> String in
                let v: String
                switch value {
                case let b as Bool: v = b ? "true" : "false"
                case let i as Int: v = String(i)
                case let d as Double: v = String(d)
                default: v = JSON.quote(String(describing: value))
                }
                return "\"\(key)\":\(v)"
            }
            print("{" + body.joined(separator: ",") + "}")
        } else if !options.quiet {
            print(summary)
        }
    }

    static func size(_ n: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = Double(n), u = 0
        while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
        let tenths = Int((v * 10).rounded())
        return u == 0 ? "\(n) B" : "\(tenths / 10).\(tenths % 10) \(units[u])"
    }
}

func printErrorRaw(_ s: String) {
    var bytes = Array(s.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}
