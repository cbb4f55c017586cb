import ArgumentParser
import CSystem
import Glibc
import KmsfsCrypto
import KmsfsKeys
import KmsfsSystem

/// Where the passphrase of a protected local key file comes from: a file, a command, the descriptor a starting
/// mount hands its daemon, or else the terminal. Passphrases are read into locked memory, never into a String,
/// and wiped after use; one trailing newline (LF or CR LF) is not part of the passphrase.
struct PassphraseOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Local provider: read the key file's passphrase from the first line of this file.", valueName: "file"))
    var passfile: String?

    @Option(name: .long, help: ArgumentHelp("Local provider: run this command (/bin/sh -c) and read the key file's passphrase from the first line it prints.", valueName: "command"))
    var extpass: String?

    /// Set by a starting mount for its daemon: the passphrase it asked for on the terminal, on this descriptor.
    @Option(name: .long, help: .hidden)
    var passphraseFd: Int32?

    func validate() throws {
        if [passfile != nil, extpass != nil, passphraseFd != nil].filter({ $0 }).count > 1 {
            throw ValidationError("give at most one of --passfile and --extpass")
        }
    }

    /// True when a passphrase is given other than on the terminal.
    var isGiven: Bool { passfile != nil || extpass != nil || passphraseFd != nil }

    /// The reader handed to key file loading.
    var reader: LocalKeyFile.PassphraseReader {
        let file = passfile.map(Paths.absolute), command = extpass, fd = passphraseFd
        let once = PassphraseCache()
        return { keyFile in
            if let file { return try Passphrase.fromFile(file) }
            if let command { return try Passphrase.fromCommand(command) }
            if let fd { return try once.value { try Passphrase.fromDescriptor(fd, what: "the passphrase descriptor") } }
            return try Passphrase.fromTerminal(prompt: "Passphrase for key file \(Passphrase.printable(keyFile)): ")
        }
    }

    /// A reader that asks once, whatever the source, and gives that passphrase for every key file after: for a
    /// command that opens one key file and seals another under the same passphrase (rewrap), which must be the
    /// one that opened the first, not a second answer that could differ.
    var readerOnce: LocalKeyFile.PassphraseReader {
        let read = reader
        let once = PassphraseCache()
        return { keyFile in try once.value { try read(keyFile) } }
    }

    /// A new passphrase: from the file or command, else asked twice on the terminal.
    func newPassphrase(for keyFile: String) throws -> SecureBytes {
        try Passphrase.new(for: keyFile, file: passfile.map(Paths.absolute), command: extpass)
    }
}

extension Passphrase {
    /// A new passphrase: from `file` or `command`, else asked twice on the terminal.
    static func new(for keyFile: String, file: String?, command: String?) throws -> SecureBytes {
        if let file { return try fromFile(file) }
        if let command { return try fromCommand(command) }
        let first = try Passphrase.fromTerminal(prompt: "New passphrase for key file \(keyFile): ")
        let again = try Passphrase.fromTerminal(prompt: "Repeat the new passphrase: ")
        defer { again.wipe() }
        guard first.count == again.count, first.constantTimeEquals(again) else {
            first.wipe()
            throw CLIError("the two passphrases differ; nothing was changed")
        }
        return first
    }
}

/// A passphrase read once (from a descriptor, which cannot be read twice), copied out for each use.
final class PassphraseCache: @unchecked Sendable {
    private let lock = Lock()
    private var bytes: SecureBytes?

    func value(_ read: () throws -> SecureBytes) throws -> SecureBytes {
        try lock.withLock {
            if bytes == nil { bytes = try read() }
            return try bytes!.withUnsafeBytes { try SecureBytes(copying: $0) }
        }
    }

    deinit { bytes?.wipe() }
}

enum Passphrase {
    /// The first line of a file.
    static func fromFile(_ path: String) throws -> SecureBytes {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw CLIError("cannot open passphrase file \(path): \(Errno.current)") }
        defer { close(fd) }
        return try fromDescriptor(fd, what: "passphrase file \(path)")
    }

    /// The first line a command prints on standard output (its standard error stays the caller's, for prompts).
    static func fromCommand(_ command: String) throws -> SecureBytes {
        var fds: [Int32] = [0, 0]
        guard kmsfs_pipe_cloexec(&fds) == 0 else { throw CLIError("pipe: \(Errno.current)") }
        let pid: pid_t
        do {
            pid = try Spawn.start("/bin/sh", ["sh", "-c", command], stdoutFd: fds[1], stderrFd: 2)
        } catch {
            close(fds[0]); close(fds[1])
            throw error
        }
        close(fds[1])
        let result = Result { try fromDescriptor(fds[0], what: "the output of --extpass") }
        // Whatever it prints after the first line is read and dropped, so that it never blocks on a full pipe.
        if let sink = try? SecureBytes(count: 4096) {  // wiped when released
            while sink.withUnsafeMutableBytes({ read(fds[0], $0.baseAddress, $0.count) }) > 0 {}
        }
        close(fds[0])
        let status = Spawn.wait(pid)
        guard status == 0 else {
            if case .success(let p) = result { p.wipe() }
            throw CLIError("--extpass command exited with status \(status)")
        }
        return try result.get()
    }

    /// Reads up to the first LF (or the end) from `fd`: the passphrase, without that LF or a CR before it.
    static func fromDescriptor(_ fd: Int32, what: String) throws -> SecureBytes {
        let limit = LocalKeyFile.maximumPassphrase
        let buffer = try SecureBytes(count: limit + 2)
        var n = 0
        var sawNewline = false
        try buffer.withUnsafeMutableBytes { b in
            while n < b.count {
                let r = read(fd, b.baseAddress! + n, 1)
                if r < 0 && errno == EINTR { continue }
                if r < 0 { throw CLIError("cannot read \(what): \(Errno.current)") }
                if r == 0 { break }
                if b[n] == UInt8(ascii: "\n") {
                    b[n] = 0
                    sawNewline = true
                    break
                }
                n += 1
            }
        }
        if !sawNewline && n == limit + 2 {
            buffer.wipe()
            // The rest of the line is read and dropped, so that it is not left for whatever reads next (a shell).
            var c: UInt8 = 0
            while read(fd, &c, 1) == 1 && c != UInt8(ascii: "\n") {}
            throw CLIError("\(what): the passphrase is longer than \(limit) bytes")
        }
        if n > 0 && buffer.withUnsafeBytes({ $0[n - 1] }) == 13 { n -= 1 }
        guard n > 0 else { throw CLIError("\(what): the passphrase is empty") }
        guard n <= limit else { buffer.wipe(); throw CLIError("\(what): the passphrase is longer than \(limit) bytes") }
        let out = try buffer.withUnsafeBytes { try SecureBytes(copying: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        buffer.wipe()
        return out
    }

    /// A path for a prompt: control characters (which could drive the terminal) shown as "?".
    static func printable(_ s: String) -> String {
        String(s.unicodeScalars.map { $0.value < 0x20 || ($0.value >= 0x7f && $0.value < 0xa0) ? "?" : Character($0) })
    }

    /// The terminal and its settings while echo is off, for the signal handler that puts them back.
    nonisolated(unsafe) private static var echoTerminal: Int32 = -1
    nonisolated(unsafe) private static var echoSaved = termios()
    private static let restoringSignals: [Int32] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT]

    /// Asks on the controlling terminal, without echo (put back if the process is interrupted meanwhile). Input
    /// typed ahead is kept, so that a program may answer on a pseudo-terminal.
    static func fromTerminal(prompt: String) throws -> SecureBytes {
        let tty = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard tty >= 0 else {
            throw CLIError("a passphrase is needed and there is no terminal to ask for it: give --passfile FILE or --extpass COMMAND")
        }
        defer { close(tty) }
        var saved = termios()
        let isTerminal = tcgetattr(tty, &saved) == 0
        var previous: [Int32: sighandler_t?] = [:]
        if isTerminal {
            echoSaved = saved
            echoTerminal = tty
            for s in restoringSignals {
                previous[s] = signal(s) { sig in
                    if Passphrase.echoTerminal >= 0 { tcsetattr(Passphrase.echoTerminal, TCSANOW, &Passphrase.echoSaved) }
                    signal(sig, SIG_DFL)
                    raise(sig)
                }
            }
            var quiet = saved
            quiet.c_lflag &= ~tcflag_t(ECHO)
            quiet.c_lflag |= tcflag_t(ICANON)
            tcsetattr(tty, TCSANOW, &quiet)
        }
        defer {
            if isTerminal {
                tcsetattr(tty, TCSANOW, &saved)
                echoTerminal = -1
                for (s, h) in previous { signal(s, h ?? SIG_DFL) }
            }
            _ = write(tty, "\n", 1)
        }
        _ = prompt.withCString { write(tty, $0, strlen($0)) }
        return try fromDescriptor(tty, what: "the terminal")
    }
}
