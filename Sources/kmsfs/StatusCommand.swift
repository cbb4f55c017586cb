import ArgumentParser
import Foundation
import Glibc
import KmsfsFilesystem
import KmsfsSystem

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show live kmsfs mounts: volume, keys, open files, key service calls and their latency, traffic.",
        discussion: """
            Lists every kmsfs mount of this machine (or the one at MOUNTPOINT) as its daemon reports it: volume \
            ID and format, key provider and key IDs, files open, data keys held and pooled, calls to the key \
            service per operation with their errors and p50/p99 latency (over each operation's last 2048 \
            calls), bytes read and written through the mount, chunks that failed authentication, and uptime. \
            Only root and the user who mounted a volume may ask its daemon. --json prints one JSON object; \
            --prometheus prints the Prometheus text exposition format, for a node exporter's textfile \
            collector or a scrape wrapper. No key material is ever part of it.
            """
    )

    @Flag(name: .long, help: "Print JSON: {\"mounts\": [...]}.")
    var json = false

    @Flag(name: .long, help: "Print the Prometheus text format.")
    var prometheus = false

    @Argument(help: ArgumentHelp("Only this mount.", valueName: "mountpoint"))
    var mountPoint: String?

    func validate() throws {
        if json && prometheus { throw ValidationError("give at most one of --json and --prometheus") }
    }

    struct Entry {
        let mountPoint: String
        let cipherDir: String
        let owner: uid_t
    }

    /// The kmsfs mounts in the mount table, with the user each was mounted by.
    static func mounts() throws -> [Entry] {
        let text = try String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)
        return text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            guard f.count >= 4, f[2] == "fuse.kmsfs" else { return nil }
            let owner = f[3].split(separator: ",").first { $0.hasPrefix("user_id=") }.flatMap { uid_t($0.dropFirst(8)) } ?? 0
            return Entry(mountPoint: MountTable.unescape(f[1]), cipherDir: MountTable.unescape(f[0]), owner: owner)
        }
    }

    func run() throws {
        var entries = try StatusCommand.mounts()
        if let m = mountPoint {
            // (A mount point the caller may not traverse to is still named in the mount table.)
            let path = (try? Paths.resolve(m)) ?? Paths.absolute(m)
            entries = entries.filter { $0.mountPoint == path }
            if entries.isEmpty { throw CLIError("\(path) is not a kmsfs mount") }
        }
        var statuses: [MountStatus] = []
        var failed = 0
        for e in entries {
            do {
                let bytes = try StatusChannel.query(mountPoint: e.mountPoint, owner: e.owner)
                statuses.append(try JSONDecoder().decode(MountStatus.self, from: Data(bytes)))
            } catch {
                printError("\(e.mountPoint): \(error)")
                failed += 1
            }
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            print("{\"mounts\":" + String(decoding: try encoder.encode(statuses), as: UTF8.self) + "}")
        } else if prometheus {
            print(StatusCommand.prometheusText(statuses), terminator: "")
        } else if statuses.isEmpty && failed == 0 {
            print("no kmsfs mounts")
        } else {
            for s in statuses { print(StatusCommand.text(s)) }
        }
        if failed > 0 { throw ExitCode(1) }
    }

    static func text(_ s: MountStatus) -> String {
        var lines = ["\(s.mountPoint)  (backing \(s.cipherDir))"]
        let up = Int(s.uptimeSeconds)
        let uptime = up >= 3600 ? "\(up / 3600) h \(up % 3600 / 60) min" : up >= 60 ? "\(up / 60) min \(up % 60) s" : "\(up) s"
        lines.append("  volume        \(s.volumeId) (format \(s.formatVersion)), \(s.readOnly ? "read-only" : "read-write")\(s.shared ? ", shared" : ""), pid \(s.pid), up \(uptime)")
        lines.append("  key provider  \(s.provider): \(s.keyIds.joined(separator: ", "))")
        lines.append("  open files    \(s.filesOpen) (data keys held \(s.dataKeysHeld), pooled \(s.dataKeysPooled)\(s.volumeKeyHeld ? "; volume key held" : ""))")
        lines.append("  traffic       read \(Progress.size(s.bytesRead)), written \(Progress.size(s.bytesWritten)); corrupt chunks \(s.corruptChunks)")
        if s.keyCalls.isEmpty {
            lines.append("  key calls     none yet")
        } else {
            lines.append("  key calls     " + pad("operation", 18) + lpad("calls", 8) + lpad("errors", 8) + lpad("p50 ms", 10) + lpad("p99 ms", 10))
            for (op, c) in s.keyCalls.sorted(by: { $0.key < $1.key }) {
                lines.append("                " + pad(op, 18) + lpad(String(c.calls), 8) + lpad(String(c.errors), 8)
                             + lpad(c.p50Ms.map { String(format: "%.1f", $0) } ?? "-", 10) + lpad(c.p99Ms.map { String(format: "%.1f", $0) } ?? "-", 10))
            }
        }
        return lines.joined(separator: "\n")
    }

    private static func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }
    private static func lpad(_ s: String, _ n: Int) -> String { s.count >= n ? " " + s : String(repeating: " ", count: n - s.count) + s }

    /// The Prometheus text exposition format (version 0.0.4): each metric's HELP and TYPE once, then a sample
    /// per mount, labelled by mount point and volume ID.
    static func prometheusText(_ statuses: [MountStatus]) -> String {
        func label(_ v: String) -> String {
            "\"" + v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
                .replacingOccurrences(of: "\n", with: "\\n") + "\""
        }
        func labels(_ s: MountStatus, _ extra: [(String, String)] = []) -> String {
            "{" + ([("mountpoint", s.mountPoint), ("volume_id", s.volumeId)] + extra).map { "\($0.0)=\(label($0.1))" }.joined(separator: ",") + "}"
        }
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, String)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (l, v) in samples { out += "\(name)\(l) \(v)\n" }
        }
        metric("kmsfs_info", "gauge", "A kmsfs mount, with its backing directory, key provider and key IDs.", statuses.map {
            (labels($0, [("cipherdir", $0.cipherDir), ("provider", $0.provider), ("key_ids", $0.keyIds.joined(separator: ",")),
                         ("format", String($0.formatVersion)), ("read_only", $0.readOnly ? "1" : "0"),
                         ("shared", $0.shared ? "1" : "0")]), "1")
        })
        metric("kmsfs_uptime_seconds", "gauge", "Seconds since the mount's daemon started.", statuses.map { (labels($0), String(format: "%.3f", $0.uptimeSeconds)) })
        metric("kmsfs_files_open", "gauge", "Files with open handles.", statuses.map { (labels($0), String($0.filesOpen)) })
        metric("kmsfs_data_keys_held", "gauge", "Data keys in memory (of open files).", statuses.map { (labels($0), String($0.dataKeysHeld)) })
        metric("kmsfs_data_keys_pooled", "gauge", "Data keys made ahead for new files.", statuses.map { (labels($0), String($0.dataKeysPooled)) })
        metric("kmsfs_read_bytes_total", "counter", "Plaintext bytes read through the mount.", statuses.map { (labels($0), String($0.bytesRead)) })
        metric("kmsfs_written_bytes_total", "counter", "Plaintext bytes written through the mount.", statuses.map { (labels($0), String($0.bytesWritten)) })
        metric("kmsfs_corrupt_chunks_total", "counter", "Chunks that failed authentication.", statuses.map { (labels($0), String($0.corruptChunks)) })
        let calls = statuses.flatMap { s in s.keyCalls.sorted(by: { $0.key < $1.key }).map { (s, $0.key, $0.value) } }
        metric("kmsfs_key_calls_total", "counter", "Calls to the key service, per operation.", calls.map { (labels($0.0, [("op", $0.1)]), String($0.2.calls)) })
        metric("kmsfs_key_call_errors_total", "counter", "Failed calls to the key service, per operation.", calls.map { (labels($0.0, [("op", $0.1)]), String($0.2.errors)) })
        metric("kmsfs_key_call_latency_seconds", "summary", "Latency of the key service's most recent calls, per operation.", calls.flatMap { c in
            [("0.5", c.2.p50Ms), ("0.99", c.2.p99Ms)].compactMap { q, v in
                v.map { (labels(c.0, [("op", c.1), ("quantile", q)]), String(format: "%.6f", $0 / 1000)) }
            } + [(labels(c.0, [("op", c.1)]).replacingOccurrences(of: "{", with: "_count{"), String(c.2.calls))]
        })
        return out
    }
}
