import ArgumentParser
import CSystem
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Options shared by the commands that read a volume without mounting it.
struct OfflineOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Local provider: read the master key from this file.", valueName: "path"))
    var keyFile: String?

    @OptionGroup var passphrase: PassphraseOptions

    @OptionGroup var keyCommand: KeyCommandOption

    @OptionGroup var trust: TrustOptions

    @Argument(help: ArgumentHelp("The encrypted directory.", valueName: "cipherdir"))
    var cipherDir: String

    /// The volume's reader and name resolution (format 3: its volume key unwrapped, and its config
    /// authenticated, first).
    func open() throws -> (cipher: String, reader: OfflineReader, names: OfflineNames) {
        let cipher = try Paths.resolve(cipherDir)
        let volume = try VolumeAccess.loadConfig(cipher)
        let pinned = try VolumeAccess.checkPin(volume, cipher: cipher, trust: trust)
        let keys = try VolumeAccess.keyService(volume, cipher: cipher, keyFile: keyFile, audit: nil, passphrase: passphrase, keyCommand: keyCommand)
        var nameCipher: NameCipher? = nil
        var volumeKeys: VolumeKeys? = nil
        if volume.formatVersion >= 3 {
            volumeKeys = try VolumeAccess.openVolumeKey(volume, cipher: cipher, keys: keys)
            if volume.encryptsNames { nameCipher = NameCipher(keys: volumeKeys!) }
        }
        if !pinned {
            try VolumeAccess.pin(volume, cipher: cipher, trust: trust)
            printError("first use of volume \(volume.volumeId) on this host: pinned its provider, keys and volume key in \(trust.knownVolumes.path)")
        }
        return (cipher, OfflineReader(volume: volume, keys: keys, volumeKeys: volumeKeys), OfflineNames(cipherDir: cipher, volume: volume, cipher: nameCipher))
    }
}

struct DecryptCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "decrypt",
        abstract: "Decrypt a file, or with -r a directory tree, of a volume without mounting it (recovery).",
        discussion: """
            PATH is the file's path inside the volume (plaintext names; they are resolved through the encrypted \
            names). The plaintext goes to standard output, or to --output (created with mode 0600, and only kept \
            if the whole file decrypted). A corrupt chunk stops the command with exit status 1, unless \
            --skip-corrupt writes zeros in its place and reports it. With -r, PATH is a directory (or / for the \
            whole volume) restored under the --output directory: directories, files and symbolic links with \
            their modes; a file that fails is reported and left out, and the exit status is 1.
            """
    )

    @OptionGroup var volume: OfflineOptions

    @OptionGroup var progress: ProgressOptions

    @Argument(help: ArgumentHelp("The file's path inside the volume.", valueName: "path"))
    var path: String

    @Option(name: [.short, .long], help: ArgumentHelp("Write the plaintext to this file.", valueName: "file"))
    var output: String?

    @Flag(name: .long, help: "Write zeros for chunks that fail authentication instead of stopping.")
    var skipCorrupt = false

    @Flag(name: [.customShort("r"), .long], help: "Restore the directory tree at PATH into the --output directory.")
    var recursive = false

    func run() throws {
        let (cipher, reader, names) = try volume.open()
        if recursive {
            guard let output else { throw CLIError("-r needs --output DIR") }
            return try restoreTree(cipher: cipher, reader: reader, names: names, into: Paths.absolute(output))
        }
        let backing: String
        do {
            backing = cipher + "/" + (try names.backingPath(of: path))
        } catch {
            throw CLIError("\(error)")
        }
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
        if report.emptyMarkerMissing { printError("\(label): the file is empty but lacks its empty-file marker: it was emptied behind kmsfs's back") }
        if !report.isIntact { throw ExitCode(1) }
    }
}

extension DecryptCommand {
    /// Restores the tree at `path` into `target` (created if missing); exits 1 when anything failed.
    func restoreTree(cipher: String, reader: OfflineReader, names: OfflineNames, into target: String) throws {
        let start: String
        do {
            start = try names.backingPath(of: path)
        } catch {
            throw CLIError("\(error)")
        }
        guard Paths.isDirectory(start.isEmpty ? cipher : cipher + "/" + start) else { throw CLIError("\(path): not a directory in the volume") }
        try? Paths.makeDirectories(target, mode: 0o700)
        let top = Glibc.open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard top >= 0 else { throw CLIError("cannot open \(target): \(Errno.current)") }
        defer { close(top) }
        var failed = 0, files = 0
        let meter = Progress("restored", options: progress)
        func complain(_ line: String) {
            meter.clearLine()
            printError(line)
        }
        // Everything is made relative to the output directory's descriptor with the names' exact bytes (a name
        // need not be UTF-8), and nothing already there is overwritten.
        func restore(_ rel: String, _ shown: String, _ out: Int32) throws {
            let entries = try names.entries(of: rel, shown: shown) { backing, why in
                complain("\(backing): \(why); skipped")
                failed += 1
            }
            for entry in entries {
                let child = entry.backing
                let label = "/" + entry.path
                let name = (entry.nameBytes + [0]).map { CChar(bitPattern: $0) }
                let st = entry.status
                switch st.st_mode & S_IFMT {
                case S_IFDIR:
                    if mkdirat(out, name, 0o700) != 0 && errno != EEXIST {
                        complain("\(label): cannot create it: \(Errno.current)")
                        failed += 1
                        continue
                    }
                    let sub = openat(out, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                    guard sub >= 0 else {
                        complain("\(label): cannot open it: \(Errno.current)")
                        failed += 1
                        continue
                    }
                    defer { close(sub) }
                    try restore(child, entry.path, sub)
                    fchmod(sub, st.st_mode & 0o7777)
                case S_IFREG:
                    files += 1
                    defer { meter.step(bytes: Int(st.st_size)) }
                    let tmp = TemporaryNames.make()
                    let fd = openat(out, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
                    guard fd >= 0 else {
                        complain("\(label): cannot create a file beside it: \(Errno.current)")
                        failed += 1
                        continue
                    }
                    do {
                        let report = try reader.read(backingPath: cipher + "/" + child, label: label, stopAtCorrupt: !skipCorrupt) { bytes in
                            if bytes.count > 0 { try FileIO.writeAll(fd, bytes.baseAddress!, count: bytes.count) }
                        }
                        fchmod(fd, st.st_mode & 0o7777)
                        close(fd)
                        if !report.isIntact {
                            failed += 1
                            complain("\(label): \(report.damage)")
                        }
                        if report.isIntact || skipCorrupt {
                            if kmsfs_renameat2(out, tmp, out, name, UInt32(kmsfs_rename_noreplace())) != 0
                                // No RENAME_NOREPLACE here (NFS, say): a hard link never replaces either.
                                && !((errno == EINVAL || errno == ENOSYS) && linkat(out, tmp, out, name, 0) == 0 && unlinkat(out, tmp, 0) == 0) {
                                let e = Errno.current
                                unlinkat(out, tmp, 0)
                                complain("\(label): \(e.code == EEXIST ? "already exists in the output; not overwritten" : "cannot put it in place: \(e)")")
                                failed += 1
                            }
                        } else {
                            unlinkat(out, tmp, 0)
                        }
                    } catch {
                        close(fd)
                        unlinkat(out, tmp, 0)
                        complain("\(label): \(error)")
                        failed += 1
                    }
                case S_IFLNK:
                    guard let t = try? names.linkTarget(ofBacking: child),
                          symlinkat((t + [0]).map { CChar(bitPattern: $0) }, out, name) == 0 else {
                        complain("\(label): cannot restore the symbolic link\(errno == EEXIST ? ": already exists in the output" : "")")
                        failed += 1
                        continue
                    }
                default:
                    complain("\(label): a special file; not restored")
                }
            }
        }
        try restore(start, path.split(separator: "/").joined(separator: "/"), top)
        meter.finish(summary: "\(files) files restored into \(target)\(failed > 0 ? ", \(failed) failed" : "")",
                     fields: [("files", files), ("failed", failed), ("output", target)])
        if failed > 0 { throw ExitCode(1) }
    }
}

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every file of a volume (header, key, every chunk) without mounting it.",
        discussion: "Reports each damaged file and a summary. Exit status 0 when everything is intact, 1 otherwise."
    )

    @OptionGroup var volume: OfflineOptions

    @OptionGroup var progress: ProgressOptions

    @Argument(help: ArgumentHelp("Only these files, or the files below these directories, inside the volume (default: all).", valueName: "path"))
    var paths: [String] = []

    func run() throws {
        let (cipher, reader, names) = try volume.open()
        // (backing path, plaintext path) of each file.
        var files: [(String, String)] = []
        var undecryptable = 0
        if paths.isEmpty {
            try walk(names, "", "", into: &files, undecryptable: &undecryptable)
        } else {
            for p in paths {
                let rel = p.split(separator: "/").joined(separator: "/")
                let backing: String
                do {
                    backing = try names.backingPath(of: rel)
                } catch {
                    throw CLIError("\(error)")
                }
                // A directory: every file below it.
                if Paths.isDirectory(backing.isEmpty ? cipher : cipher + "/" + backing) {
                    try walk(names, backing, rel, into: &files, undecryptable: &undecryptable)
                } else {
                    files.append((backing, rel))
                }
            }
        }
        var damaged = undecryptable, bytes = 0
        // Progress counts backing bytes (known before reading: the ETA needs them).
        let sizes = files.map { backing, _ -> Int in
            var st = stat()
            return stat(cipher + "/" + backing, &st) == 0 ? Int(st.st_size) : 0
        }
        let totalBytes = sizes.reduce(0, +)
        let meter = Progress("checked", total: files.count, totalBytes: totalBytes, options: progress)
        // Damage goes to standard output, or with --json to standard error (standard output is the summary).
        func report(_ line: String) {
            meter.clearLine()
            if progress.json { printErrorRaw(line + "\n") } else { print(line) }
        }
        for (n, (backing, rel)) in files.enumerated() {
            defer { meter.step(bytes: sizes[n]) }
            do {
                let r = try reader.read(backingPath: cipher + "/" + backing, label: "/" + rel) { _ in }
                bytes += r.plaintextSize
                if !r.isIntact {
                    damaged += 1
                    report("/\(rel): \(r.damage)")
                }
            } catch {
                damaged += 1
                report("/\(rel): \(error)")
            }
        }
        meter.finish(summary: "\(files.count) files, \(bytes) bytes checked: \(damaged == 0 ? "all intact" : "\(damaged) damaged")",
                     fields: [("files", files.count), ("bytes", bytes), ("damaged", damaged), ("intact", damaged == 0)])
        if damaged > 0 { throw ExitCode(1) }
    }

    /// Regular files under backing directory `rel` (plaintext path `shown`), as (backing, plaintext) relative
    /// paths, skipping kmsfs's own files; names that do not decrypt are reported and skipped.
    private func walk(_ names: OfflineNames, _ rel: String, _ shown: String, into files: inout [(String, String)],
                      undecryptable: inout Int) throws {
        var bad = 0
        for entry in try names.entries(of: rel, shown: shown, undecryptable: { backing, why in
            // With --json, standard output is the summary alone.
            if progress.json { printErrorRaw("\(backing): \(why)\n") } else { print("\(backing): \(why)") }
            bad += 1
        }) {
            switch entry.status.st_mode & S_IFMT {
            case S_IFDIR: try walk(names, entry.backing, entry.path, into: &files, undecryptable: &undecryptable)
            case S_IFREG: files.append((entry.backing, entry.path))
            default: break
            }
        }
        undecryptable += bad
    }
}

func printError(_ s: String) {
    var bytes = Array(("kmsfs: " + s + "\n").utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
}

struct PathCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "path",
        abstract: "Map a path inside the volume to its backing path, or back (--reverse).",
        discussion: """
            For an administrator restoring one file from a backup of the backing directory: prints the backing \
            path (relative to CIPHERDIR) of a plaintext PATH, or with --reverse the plaintext path of a backing \
            path. Needs the volume key (one unwrap); the file itself is not read.
            """
    )

    @OptionGroup var volume: OfflineOptions

    @Flag(name: .long, help: "PATH is a backing path (relative to CIPHERDIR, or under it); print its plaintext path.")
    var reverse = false

    @Argument(help: ArgumentHelp("The path to map.", valueName: "path"))
    var path: String

    func run() throws {
        let (cipher, _, names) = try volume.open()
        do {
            if reverse {
                var rel = path
                if rel.hasPrefix(cipher + "/") { rel = String(rel.dropFirst(cipher.count + 1)) }
                print(try names.plaintextPath(of: rel))
            } else {
                print(try names.backingPath(of: path))
            }
        } catch {
            throw CLIError("\(error)")
        }
    }
}
