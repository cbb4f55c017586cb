import CSystem
import Glibc
import Synchronization

/// Log severities, most severe first.
public enum LogLevel: Int, Sendable, Comparable {
    case error = 0, warning, info, debug

    public static func < (a: LogLevel, b: LogLevel) -> Bool { a.rawValue < b.rawValue }

    var name: String {
        switch self {
        case .error: return "error"
        case .warning: return "warning"
        case .info: return "info"
        case .debug: return "debug"
        }
    }

    var syslogPriority: Int32 {
        switch self {
        case .error: return LOG_ERR
        case .warning: return LOG_WARNING
        case .info: return LOG_INFO
        case .debug: return LOG_DEBUG
        }
    }
}

/// Where log lines go.
public enum LogSink: Sendable, Equatable {
    /// Standard error (foreground mounts, CLI commands).
    case standardError
    /// An append-only file descriptor (background mounts with a log file).
    case file(Int32)
    /// syslog(3) with facility LOG_DAEMON.
    case syslog
}

/// How log lines written to standard error or a file look.
public enum LogFormat: String, Sendable {
    /// One line of text per event (with time and pid in files).
    case text
    /// One JSON object per line, for log pipelines: "time", "level", "event" (a stable name of what happened),
    /// "message", and what the event names ("file", "keyId", "chunk", "error", ...).
    case json
}

/// The process-wide logger. Messages must never contain key material: callers log file paths, key IDs,
/// chunk indices and error types, never key bytes or plaintext.
public final class Log: Sendable {
    public static let shared = Log()

    private struct Config: Sendable {
        var sink: LogSink = .standardError
        var level: LogLevel = .info
        var format: LogFormat = .text
        var lastError: String? = nil
    }
    private let config = Mutex(Config())

    public func configure(sink: LogSink, level: LogLevel, format: LogFormat? = nil) {
        if sink == .syslog { kmsfs_openlog("kmsfs") }
        config.withLock {
            $0.sink = sink
            $0.level = level
            if let f = format { $0.format = f }
        }
    }

    /// The most recent error message (reported to the user when a mount fails).
    public var lastError: String? { config.withLock { $0.lastError } }

    public var level: LogLevel { config.withLock { $0.level } }

    /// Logs `message`; `event` names what happened (stable, for log pipelines) and `fields` what it concerns
    /// (file, key ID, chunk, error). They show in the JSON format; the text format is the message alone.
    public func log(_ level: LogLevel, _ message: String, event: String = "message", fields: [String: String] = [:]) {
        let c = config.withLock { c in
            if level == .error { c.lastError = message }
            return c
        }
        guard level <= c.level else { return }
        if c.format == .json && c.sink != .syslog {
            var object: [(String, String)] = [("time", Log.timestamp()), ("level", level.name), ("event", event),
                                               ("pid", String(getpid())), ("message", message)]
            object += fields.sorted { $0.key < $1.key }
            let line = "{" + object.map { "\(JSON.quote($0.0)):\(JSON.quote($0.1))" }.joined(separator: ",") + "}\n"
            if case .file(let fd) = c.sink { write(fd: fd, line: line) } else { write(fd: 2, line: line) }
            return
        }
        switch c.sink {
        case .syslog:
            kmsfs_syslog(level.syslogPriority, message)
        case .standardError:
            write(fd: 2, line: "kmsfs: \(level == .info ? "" : level.name + ": ")\(message)\n")
        case .file(let fd):
            write(fd: fd, line: "\(Log.timestamp()) kmsfs[\(getpid())] \(level.name): \(message)\n")
        }
    }

    public static func error(_ message: String) { shared.log(.error, message) }
    public static func warning(_ message: String) { shared.log(.warning, message) }
    public static func info(_ message: String) { shared.log(.info, message) }
    public static func debug(_ message: String) { shared.log(.debug, message) }

    private func write(fd: Int32, line: String) {
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { b in
            var done = 0
            while done < b.count {
                let n = Glibc.write(fd, b.baseAddress! + done, b.count - done)
                if n <= 0 { if n < 0 && errno == EINTR { continue }; return }
                done += n
            }
        }
    }

    /// UTC time as 2026-01-02T03:04:05.678Z.
    public static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = time_t(ts.tv_sec)
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func pad(_ v: Int32, _ w: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, w - s.count)) + s
        }
        return "\(pad(tmv.tm_year + 1900, 4))-\(pad(tmv.tm_mon + 1, 2))-\(pad(tmv.tm_mday, 2))T" +
            "\(pad(tmv.tm_hour, 2)):\(pad(tmv.tm_min, 2)):\(pad(tmv.tm_sec, 2)).\(pad(Int32(ts.tv_nsec / 1_000_000), 3))Z"
    }
}
