import ArgumentParser
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Options shared by the commands that read a volume without mounting it.
struct OfflineOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Local provider: read the master key from this file.", valueName: "path"))
    var keyFile: String?

    @Argument(help: ArgumentHelp("The encrypted directory.", valueName: "cipherdir"))
    var cipherDir: String

    func open() throws -> (cipher: String, reader: OfflineReader) {
        let cipher = try Paths.resolve(cipherDir)
        let volume = try VolumeAccess.loadConfig(cipher)
        let keys = try VolumeAccess.keyService(volume, cipher: cipher, keyFile: keyFile, audit: nil)
        return (cipher, OfflineReader(volume: volume, keys: keys))
    }
}

struct DecryptCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decrypt",
        abstract: "Decrypt one file of a volume without mounting it (recovery).",
        discussion: """
            PATH is the file's path inside the volume. The plaintext goes to standard output, or to --output \
            (created with mode 0600, and only kept if the whole file decrypted). A corrupt chunk stops the \
            command with exit status 1, unless --skip-corrupt writes zeros in its place and reports it.
            """
    )

    @OptionGroup var volume: OfflineOptions

    @Argument(help: ArgumentHelp("The file's path inside the volume.", valueName: "path"))
    var path: String

    @Option(name: [.short, .long], help: ArgumentHelp("Write the plaintext to this file.", valueName: "file"))
    var output: String?

    @Flag(name: .long, help: "Write zeros for chunks that fail authentication instead of stopping.")
    var skipCorrupt = false

    func run() throws {
        let (cipher, reader) = try volume.open()
        let backing = cipher + "/" + path.split(separator: "/").joined(separator: "/")
        let label = "/" + path.split(separator: "/").joined(separator: "/")
        var fd: Int32 = 1
        var tmp: String? = nil
        if let output {
            tmp = Paths.absolute(output) + ".kmsfs-partial"
            fd = Glibc.open(tmp!, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            if fd < 0 { throw CLIError("cannot create \(tmp!): \(Errno.current)") }
        }
        let report: OfflineReader.Report
        do {
            report = try reader.read(backingPath: backing, label: label, stopAtCorrupt: !skipCorrupt) { bytes in
                if bytes.count > 0 { try FileIO.writeAll(fd, bytes.baseAddress!, count: bytes.count) }
            }
        } catch {
            if let tmp { close(fd); unlink(tmp) }
            throw CLIError("\(label): \(error)")
        }
        if let tmp, let output {
            close(fd)
            if !report.isIntact && !skipCorrupt {
                unlink(tmp)
            } else if rename(tmp, Paths.absolute(output)) != 0 {
                throw CLIError("cannot write \(output): \(Errno.current)")
            }
        }
        if !report.corruptChunks.isEmpty {
            let list = report.corruptChunks.map(String.init).joined(separator: ", ")
            if skipCorrupt {
                printError("\(label): chunks \(list) failed authentication and were written as zeros")
            } else {
                throw CLIError("\(label): chunk \(list) failed authentication; rerun with --skip-corrupt to recover the rest")
            }
        }
        if report.damagedTail { printError("\(label): the end of the backing file is damaged; \(report.plaintextSize) bytes recovered") }
        if !report.isIntact { throw ExitCode(1) }
    }
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every file of a volume (header, key, every chunk) without mounting it.",
        discussion: "Reports each damaged file and a summary. Exit status 0 when everything is intact, 1 otherwise."
    )

    @OptionGroup var volume: OfflineOptions

    @Argument(help: ArgumentHelp("Only these paths inside the volume (default: all).", valueName: "path"))
    var paths: [String] = []

    func run() throws {
        let (cipher, reader) = try volume.open()
        var files: [String] = []
        if paths.isEmpty {
            try walk(cipher, "", into: &files)
        } else {
            files = paths.map { $0.split(separator: "/").joined(separator: "/") }
        }
        var damaged = 0, bytes = 0
        for rel in files {
            do {
                let report = try reader.read(backingPath: cipher + "/" + rel, label: "/" + rel) { _ in }
                bytes += report.plaintextSize
                if !report.isIntact {
                    damaged += 1
                    var what: [String] = []
                    if !report.corruptChunks.isEmpty { what.append("corrupt chunks \(report.corruptChunks.map(String.init).joined(separator: ", "))") }
                    if report.damagedTail { what.append("damaged tail") }
                    print("/\(rel): \(what.joined(separator: "; "))")
                }
            } catch {
                damaged += 1
                print("/\(rel): \(error)")
            }
        }
        print("\(files.count) files, \(bytes) bytes checked: \(damaged == 0 ? "all intact" : "\(damaged) damaged")")
        if damaged > 0 { throw ExitCode(1) }
    }

    /// Regular files under `dir` (relative paths), skipping the volume config at the top.
    private func walk(_ root: String, _ rel: String, into files: inout [String]) throws {
        for name in try Paths.entries(rel.isEmpty ? root : root + "/" + rel).sorted() {
            let child = rel.isEmpty ? name : rel + "/" + name
            if PlaintextNames().mountName(name, inRoot: rel.isEmpty) == nil { continue }
            var st = stat()
            guard lstat(root + "/" + child, &st) == 0 else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFDIR: try walk(root, child, into: &files)
            case S_IFREG: files.append(child)
            default: break
            }
        }
    }
}

func printError(_ s: String) {
    var bytes = Array(("kmsfs: " + s + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}
