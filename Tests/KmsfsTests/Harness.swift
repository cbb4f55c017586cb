import CSystem
import Foundation
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Testing

/// The kmsfs binary under test: $KMSFS_BIN, else the one built next to the test bundle.
let kmsfsBinary: String = {
    if let b = ProcessInfo.processInfo.environment["KMSFS_BIN"] { return b }
    var exe = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
    // Swift Testing may run from the .xctest bundle or from a helper next to it.
    for _ in 0..<3 {
        let candidate = exe.appendingPathComponent("kmsfs").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        exe = exe.deletingLastPathComponent()
    }
    return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent(".build/debug/kmsfs").path
}()

struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a program to completion, capturing its output.
@discardableResult
func run(_ program: String, _ args: [String], environment: [String: String] = [:], input: [UInt8]? = nil) throws -> CommandResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: program.hasPrefix("/") ? program : "/usr/bin/env")
    p.arguments = program.hasPrefix("/") ? args : [program] + args
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    p.environment = env
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    let inPipe = Pipe()
    p.standardInput = input == nil ? FileHandle.nullDevice : inPipe
    try p.run()
    if let input {
        inPipe.fileHandleForWriting.write(Data(input))
        try inPipe.fileHandleForWriting.close()
    }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    return CommandResult(status: exitStatus(p), stdout: String(decoding: o, as: UTF8.self),
                         stderr: String(decoding: e, as: UTF8.self))
}

/// Waits for a child to exit and returns its exit status (the signal number if a signal ended it), without
/// reaping it: Foundation's Process sometimes misses a child's exit among many concurrent ones, and
/// waitUntilExit then never returns; waitid(WNOWAIT) sees the exit either way and leaves the reaping to it.
func exitStatus(_ p: Process) -> Int32 {
    var info = siginfo_t()
    while true {
        if waitid(P_PID, id_t(p.processIdentifier), &info, WEXITED | WNOWAIT) == 0 {
            return info._sifields._sigchld.si_status
        }
        if errno == EINTR { continue }
        // Already reaped by Foundation: its status is there.
        p.waitUntilExit()
        return p.terminationStatus
    }
}

/// True when `path` is a kmsfs mount point.
func isKmsfsMount(_ path: String) -> Bool {
    let mounts = (try? FileIO.readFile("/proc/self/mounts")).map { String(decoding: $0, as: UTF8.self) } ?? ""
    return mounts.split(separator: "\n").contains { line in
        let f = line.split(separator: " ")
        return f.count > 2 && f[1] == path && f[2] == "fuse.kmsfs"
    }
}

/// A volume created with `kmsfs init` in a temporary directory and mounted with `kmsfs mount -f` as a
/// child process (its stderr goes to `daemonLog`). Unmounted and cleaned up when released.
final class MountedVolume {
    let dir: TempDir
    let cipher: String
    let mount: String
    let configHome: String
    let auditLog: String
    let daemonLog: String
    let chunkSize: Int
    /// The daemon's open-file limit (RLIMIT_NOFILE), when a test sets one.
    let openFileLimit: Int?
    /// A program (and its arguments) the daemon is started through, such as setpriv dropping capabilities.
    let wrapper: [String]
    private(set) var process: Process?
    private(set) var mountArgs: [String] = []

    let extraEnvironment: [String: String]
    var environment: [String: String] {
        ["XDG_CONFIG_HOME": configHome, "XDG_STATE_HOME": dir.path + "/state"].merging(extraEnvironment) { _, b in b }
    }

    init(chunkSize: Int = 4096, initArgs: [String] = [], mountArgs: [String] = [], cipherParent: String? = nil,
         environment extra: [String: String] = [:], openFileLimit: Int? = nil, wrapper: [String] = []) throws {
        self.wrapper = wrapper
        extraEnvironment = extra
        self.openFileLimit = openFileLimit
        dir = try TempDir()
        // KMSFS_TEST_BACKING_ROOT puts every volume's backing directory under that directory (a JuiceFS mount, say)
        // unless a test chooses its own: the suites' round trip on another backing filesystem.
        if cipherParent == nil, let root = ProcessInfo.processInfo.environment["KMSFS_TEST_BACKING_ROOT"] {
            var template = Array((root + "/backing-XXXXXX").utf8CString)
            guard let p = mkdtemp(&template) else { throw Errno.current }
            cipher = String(cString: p) + "/cipher"
        } else {
            cipher = (cipherParent ?? dir.path) + "/cipher"
        }
        mount = dir.path + "/mnt"
        configHome = dir.path + "/config"
        auditLog = dir.path + "/audit.log"
        daemonLog = dir.path + "/daemon.log"
        self.chunkSize = chunkSize
        try syscall { mkdir(mount, 0o755) }
        let r = try run(kmsfsBinary, ["init", "--chunk-size", String(chunkSize)] + initArgs + [cipher], environment: environment)
        guard r.status == 0 else { throw TestFailure("kmsfs init failed: \(r.stderr)") }
        try start(mountArgs)
    }

    /// Another "host" of `other`'s volume: the backing directory as another client of shared storage sees it
    /// (`cipher`), the same keys and pins, and a mount point and log of its own.
    init(host other: MountedVolume, cipher: String, mountArgs: [String]) throws {
        dir = try TempDir()
        self.cipher = cipher
        mount = dir.path + "/mnt"
        configHome = other.configHome
        auditLog = dir.path + "/audit.log"
        daemonLog = dir.path + "/daemon.log"
        chunkSize = other.chunkSize
        openFileLimit = nil
        wrapper = []
        extraEnvironment = other.extraEnvironment
        try syscall { mkdir(mount, 0o755) }
        try start(mountArgs)
    }

    /// The same backing directory, key files and paths as `other` (which must be unmounted), mounted again
    /// with another environment.
    init(existing other: MountedVolume, environment extra: [String: String]) throws {
        dir = other.dir
        cipher = other.cipher
        mount = other.mount
        configHome = other.configHome
        auditLog = other.auditLog
        daemonLog = other.daemonLog
        chunkSize = other.chunkSize
        openFileLimit = other.openFileLimit
        wrapper = other.wrapper
        extraEnvironment = extra
        try start()
    }

    deinit { stop() }

    /// Stops the daemon however it is doing: lazy unmount, SIGTERM, and SIGKILL if it is still there after
    /// two seconds (a daemon whose mount still has open files never sees the unmount).
    func stop() {
        // KMSFS_TEST_DAEMON_ERRORS=1 prints the error lines of every daemon's log (to find what a test's EIO was).
        if ProcessInfo.processInfo.environment["KMSFS_TEST_DAEMON_ERRORS"] != nil {
            let errors = daemonLogText.split(separator: "\n").filter { $0.contains("error") }
            if !errors.isEmpty { FileHandle.standardError.write(Data("daemon errors, \(mount):\n\(errors.joined(separator: "\n"))\n".utf8)) }
        }
        if isKmsfsMount(mount) { _ = try? run("fusermount3", ["-uz", mount]) }
        guard let p = process, p.isRunning else { return }
        p.terminate()
        for _ in 0..<200 where p.isRunning { usleep(10_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        _ = exitStatus(p)
    }

    /// Starts the daemon and waits for the mount to appear.
    func start(_ args: [String] = []) throws {
        mountArgs = args
        let p = Process()
        p.executableURL = URL(fileURLWithPath: kmsfsBinary)
        p.arguments = ["mount", "-f", "--audit-log", auditLog] + args + [cipher, mount]
        if !wrapper.isEmpty {
            p.executableURL = URL(fileURLWithPath: wrapper[0])
            p.arguments = Array(wrapper.dropFirst()) + [kmsfsBinary] + p.arguments!
        }
        if let n = openFileLimit {
            p.executableURL = URL(fileURLWithPath: "/usr/bin/prlimit")
            p.arguments = ["--nofile=\(n):\(n)", "--", kmsfsBinary] + p.arguments!
        }
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        p.environment = env
        _ = FileManager.default.createFile(atPath: daemonLog, contents: nil)
        let log = FileHandle(forWritingAtPath: daemonLog)!
        log.seekToEndOfFile()
        p.standardError = log
        p.standardOutput = log
        p.standardInput = FileHandle.nullDevice
        try p.run()
        process = p
        for _ in 0..<1000 {
            if isKmsfsMount(mount) { return }
            if !p.isRunning { throw TestFailure("kmsfs mount exited with \(p.terminationStatus): \(daemonLogText)") }
            usleep(10_000)
        }
        throw TestFailure("the mount did not appear within 10 s")
    }

    /// Unmounts and waits for the daemon; returns its exit status.
    @discardableResult
    func unmount() throws -> Int32 {
        // Tests run in parallel in one process, and a child that another test is spawning holds copies of this
        // process's descriptors until it execs (close-on-exec): the mount can be busy for that moment.
        var r = try run("fusermount3", ["-u", mount])
        _ = try waitFor(seconds: 5) {
            if r.status == 0 || !r.stderr.contains("busy") { return true }
            r = try run("fusermount3", ["-u", mount])
            return r.status == 0
        }
        guard r.status == 0 else { throw TestFailure("fusermount3 -u failed: \(r.stderr)") }
        return process.map(exitStatus) ?? -1
    }

    func remount() throws {
        try unmount()
        try start(mountArgs)
    }

    var daemonLogText: String { (try? String(contentsOfFile: daemonLog, encoding: .utf8)) ?? "" }

    /// Audit lines of files' keys (the volume key's lines, one unwrap per mount and its wipe, are in
    /// `volumeKeyAuditLines`).
    func auditLines() -> [[String: Any]] {
        allAuditLines().filter { $0["path"] as? String != KeyService.volumeKeySubject.path }
    }

    func volumeKeyAuditLines() -> [[String: Any]] {
        allAuditLines().filter { $0["path"] as? String == KeyService.volumeKeySubject.path }
    }

    func allAuditLines() -> [[String: Any]] {
        guard let text = try? String(contentsOfFile: auditLog, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap {
            try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }
    }

    /// Data keys files loaded (made at create, taken from the pool, or unwrapped) and wiped again: audit lines
    /// with a path, so keys made ahead for the pool and not yet given to a file do not count.
    var fileKeysLoaded: Int {
        auditLines().filter { ["GenerateDataKey", "AssignDataKey", "Decrypt"].contains($0["op"] as? String ?? "")
            && $0["result"] as? String == "ok" && !($0["path"] as? String ?? "").isEmpty }.count
    }
    var fileKeysWiped: Int {
        auditLines().filter { $0["op"] as? String == "DiscardKey" && !($0["path"] as? String ?? "").isEmpty }.count
    }

    func auditCount(_ op: String, path: String? = nil) -> Int {
        auditLines().filter { ($0["op"] as? String) == op && (path == nil || ($0["path"] as? String) == path) }.count
    }

    /// Waits until the audit log holds at least `count` lines of `op` (release is asynchronous in FUSE).
    func waitForAudit(_ op: String, count: Int, path: String? = nil) -> Bool {
        waitFor { auditCount(op, path: path) >= count }
    }

    /// Waits until the data keys the daemon loaded (created or unwrapped) for the files `names` have all been
    /// wiped again. FUSE sends release asynchronously: right after close(2) a file may still hold its key, and
    /// an open then would share it instead of reading the header and unwrapping.
    func waitForKeysWiped(_ names: String...) -> Bool {
        waitFor {
            let lines = auditLines()
            return names.allSatisfy { name in
                let mine = lines.filter { $0["path"] as? String == "/" + name }
                let loaded = mine.filter { ["GenerateDataKey", "AssignDataKey", "Decrypt"].contains($0["op"] as? String ?? "") && $0["result"] as? String == "ok" }
                return mine.filter { $0["op"] as? String == "DiscardKey" }.count >= loaded.count
            }
        }
    }

    /// What the backing filesystem itself does, probed beside the volume (not through kmsfs), so that a suite run
    /// with KMSFS_TEST_BACKING_ROOT on a filesystem without a feature checks kmsfs's answer for its absence instead.
    struct BackingFeatures {
        /// A file with a 10 MiB hole takes less than 1 MiB.
        var sparseFiles: Bool
        /// A user.* extended attribute can be set.
        var userXattrs: Bool
    }

    func backingFeatures() throws -> BackingFeatures {
        let probe = (cipher as NSString).deletingLastPathComponent + "/.feature-probe"
        let fd = try P.open(probe, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        defer { close(fd); unlink(probe) }
        try P.pwrite(fd, [1], 10 << 20)
        _ = fsync(fd)
        let sparse = try P.fstat(fd).st_blocks * 512 < 1 << 20
        let xattr = fsetxattr(fd, "user.kmsfs-probe", [1], 1, 0) == 0
        return BackingFeatures(sparseFiles: sparse, userXattrs: xattr)
    }

    func path(_ name: String) -> String { mount + "/" + name }
    /// The backing path of plaintext path `name` (through the encrypted names, resolved offline); kmsfs's own
    /// files (the config, its lease, the journal) are at the top under their own names.
    func backing(_ name: String) -> String {
        if name.hasPrefix("kmsfs.conf") || name.contains(".kmsfs-new.") {
            // Reserved names: the directory part is resolved, the last component is kept.
            let parent = (name as NSString).deletingLastPathComponent
            let base = (name as NSString).lastPathComponent
            return (parent.isEmpty ? cipher : backing(parent)) + "/" + base
        }
        guard let names = try? offlineNames(), let rel = try? names.backingPath(of: name) else { return cipher + "/" + name }
        return rel.isEmpty ? cipher : cipher + "/" + rel
    }

    private var cachedNames: OfflineNames?
    private var cachedKeys: VolumeKeys?

    /// The volume key's derived keys (unwrapped through the provider once).
    func volumeKeys() throws -> VolumeKeys {
        if let k = cachedKeys { return k }
        let volume = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: cipher)))
        let provider = try ProviderFactory.makeProvider(volume: volume, options: .init(environment: environment))
        let k = try KeyService(provider: provider, keyIds: volume.keyProvider.keyIds, audit: nil).openVolumeKey(volume)
        cachedKeys = k
        return k
    }

    /// Changes the volume config as an administrator holding the volume key would (authenticated again).
    func rewriteConfig(_ change: (inout VolumeConfig) -> Void) throws {
        var config = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: cipher)))
        change(&config)
        if config.formatVersion >= 3 { try config.authenticate(with: try volumeKeys()) }
        try FileIO.writeFileAtomically(VolumeConfig.path(in: cipher), contents: try config.encoded())
    }

    /// Offline name resolution of this volume (the volume key unwrapped through the provider once).
    func offlineNames() throws -> OfflineNames {
        if let n = cachedNames { return n }
        let volume = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: cipher)))
        var cipherNames: NameCipher? = nil
        if volume.encryptsNames { cipherNames = NameCipher(keys: try volumeKeys()) }
        let n = OfflineNames(cipherDir: cipher, volume: volume, cipher: cipherNames)
        cachedNames = n
        return n
    }

    /// The volume's config and a key service over its local key file, for offline checks.
    func offlineReader() throws -> OfflineReader {
        let volume = try VolumeConfig.decode(try FileIO.readFile(VolumeConfig.path(in: cipher)))
        let provider = try ProviderFactory.makeProvider(volume: volume, options: .init(environment: environment))
        return OfflineReader(volume: volume, keys: KeyService(provider: provider, keyIds: volume.keyProvider.keyIds, audit: nil),
                             volumeKeys: volume.formatVersion >= 3 ? try volumeKeys() : nil)
    }

    /// The plaintext of a backing file, decrypted without the mount; nil if any chunk fails.
    func offlineContents(_ name: String) throws -> [UInt8]? {
        var out = [UInt8]()
        let report = try offlineReader().read(backingPath: backing(name), label: "/" + name) { out += $0 }
        return report.isIntact ? out : nil
    }
}

/// Where two byte strings first differ, or nil when equal (readable where a full dump is not).
func difference(_ a: [UInt8], _ b: [UInt8]) -> String? {
    if a == b { return nil }
    let n = min(a.count, b.count)
    var i = 0
    while i < n && a[i] == b[i] { i += 1 }
    if i == n { return "lengths differ: \(a.count) vs \(b.count)" }
    return "first difference at byte \(i) of \(a.count) vs \(b.count) bytes: \(a[i]) vs \(b[i])"
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Thin POSIX wrappers that throw Errno, for driving the mount exactly as applications do.
enum P {
    static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0o644) throws -> Int32 {
        try syscall { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    static func pwrite(_ fd: Int32, _ bytes: [UInt8], _ offset: Int) throws {
        try bytes.withUnsafeBytes { b in
            let n = try syscall { Glibc.pwrite(fd, b.baseAddress, b.count, off_t(offset)) }
            if n != b.count { throw TestFailure("short write: \(n) of \(b.count)") }
        }
    }

    static func write(_ fd: Int32, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { b in
            let n = try syscall { Glibc.write(fd, b.baseAddress, b.count) }
            if n != b.count { throw TestFailure("short write: \(n) of \(b.count)") }
        }
    }

    static func pread(_ fd: Int32, _ count: Int, _ offset: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = try out.withUnsafeMutableBytes { b in
                try syscall { Glibc.pread(fd, b.baseAddress! + done, count - done, off_t(offset + done)) }
            }
            if n == 0 { break }
            done += n
        }
        return Array(out[0..<done])
    }

    static func readFile(_ path: String) throws -> [UInt8] {
        let fd = try open(path, O_RDONLY)
        defer { close(fd) }
        var out = [UInt8]()
        var offset = 0
        while true {
            let chunk = try pread(fd, 1 << 20, offset)
            out += chunk
            offset += chunk.count
            if chunk.count < 1 << 20 { return out }
        }
    }

    static func writeFile(_ path: String, _ bytes: [UInt8], mode: mode_t = 0o644) throws {
        let fd = try open(path, O_WRONLY | O_CREAT | O_TRUNC, mode)
        defer { close(fd) }
        try write(fd, bytes)
    }

    static func stat(_ path: String) throws -> Glibc.stat {
        var st = Glibc.stat()
        try syscall { lstat(path, &st) }
        return st
    }

    static func fstat(_ fd: Int32) throws -> Glibc.stat {
        var st = Glibc.stat()
        try syscall { Glibc.fstat(fd, &st) }
        return st
    }

    /// The errno a throwing call failed with, or nil if it succeeded.
    static func errno<T>(_ body: () throws -> T) -> Int32? {
        do {
            _ = try body()
            return nil
        } catch let e as Errno {
            return e.code
        } catch {
            return -1
        }
    }
}

/// A small deterministic generator (SplitMix64), so a failing random run can be replayed from its seed.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }

    mutating func bytes(_ n: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: n)
        var i = 0
        while i < n {
            var v = next()
            for _ in 0..<8 where i < n {
                out[i] = UInt8(truncatingIfNeeded: v)
                v >>= 8
                i += 1
            }
        }
        return out
    }
}

