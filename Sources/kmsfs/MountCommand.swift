import ArgumentParser
import CSystem
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount an encrypted volume.",
        discussion: """
            Without -f, kmsfs starts a background daemon and returns once the mount is live (exit status 0) or \
            has failed (exit status 1 and one line saying why). The daemon logs to --log-file, else to syslog \
            when /dev/log exists, else to $XDG_STATE_HOME/kmsfs/<volume-id>.log; it tells you which.
            With -f it stays in the foreground and logs to standard error; SIGINT or SIGTERM unmounts.

            -o takes FUSE mount options (e.g. allow_other,default_permissions); allow_other always adds \
            default_permissions, so the kernel checks permissions for every user.
            """
    )

    @Flag(name: [.customShort("f"), .long], help: "Stay in the foreground and log to standard error.")
    var foreground = false

    @Flag(name: .long, help: "Local provider: accept a key file other users can read or write (refused otherwise).")
    var allowOpenKeyFile = false

    @Flag(name: .long, help: "Mount read-only.")
    var readOnly = false

    @Flag(name: .long, help: "Shared mode: other hosts may mount the volume at the same time (on a distributed filesystem whose byte-range locks reach every host); close-to-open consistency.")
    var shared = false

    @Option(name: .customShort("o"), parsing: .singleValue,
            help: ArgumentHelp("FUSE mount options, comma-separated (repeatable).", valueName: "options"))
    var fuseOptions: [String] = []

    @Flag(name: .long, help: "Bypass the kernel page cache (every read and write reaches kmsfs as issued; no shared mmap).")
    var directIo = false

    @Flag(name: .long, help: "Let the kernel cache writes and send them in batches: much faster small and random writes; a full disk is then reported by fsync and close rather than write, and writes not yet sent are lost if the daemon dies.")
    var writebackCache = false

    @Option(name: .long, help: ArgumentHelp("Local provider: read the master key from this file.", valueName: "path"))
    var keyFile: String?

    @OptionGroup var passphrase: PassphraseOptions

    @OptionGroup var keyCommand: KeyCommandOption

    @Option(name: .long, help: ArgumentHelp("Append one JSON line per key operation to this file.", valueName: "file"))
    var auditLog: String?

    @Option(name: .long, help: ArgumentHelp("Background mounts: log to this file.", valueName: "file"))
    var logFile: String?

    @Option(name: .long, help: ArgumentHelp("Data keys made ahead for new files, so creates do not wait for the KMS (0: off; default 64).", valueName: "count"))
    var keyPool: Int?

    @Option(name: .long, help: ArgumentHelp("Seconds an unused pooled key may wait before it is wiped.", valueName: "seconds"))
    var keyPoolAge: Double = DataKeyPool.Settings.defaults.maxAge

    @Option(name: .long, help: ArgumentHelp("Most KMS requests in flight at once.", valueName: "count"))
    var kmsMaxInflight: Int = KeyService.defaultMaxInFlight

    @Option(name: .long, help: ArgumentHelp("Seconds one KMS call may take, retries of throttled and failed attempts included.", valueName: "seconds"))
    var kmsDeadline: Double = KMSPolicy.defaults.deadline

    @Option(name: .long, help: ArgumentHelp("Seconds a key that refused, or a KMS endpoint that failed, is not asked again before a probe.", valueName: "seconds"))
    var kmsProbeInterval: Double = KMSPolicy.defaults.probeInterval

    @Option(name: .long, help: ArgumentHelp("Most KMS requests per second (0: no fixed limit; throttling always slows kmsfs down).", valueName: "rate"))
    var kmsMaxRate: Double = KMSPolicy.defaults.maxRate

    @Flag(name: .long, help: "Refuse to create a file unless every configured key wraps its data key (by default any key that answers is enough, and the missing ones are logged).")
    var requireAllKeys = false

    @Option(name: .long, help: ArgumentHelp("Files the daemon tracks before asking the kernel to forget the least recently used (0: no bound).", valueName: "count"))
    var maxInodes: Int = EncryptedFilesystem.defaultMaxInodes

    @Flag(name: .long, help: "Log every error and debug detail (never key material).")
    var debug = false

    @Option(name: .long, help: ArgumentHelp("Daemon log lines as text, or as one JSON object per line (time, level, event, message, file, keyId, chunk, error) for log pipelines.", valueName: "text|json"))
    var logFormat: LogFormat = .text

    @OptionGroup var trust: TrustOptions

    @Option(name: .long, help: .hidden)
    var notifyFd: Int32?

    /// Seconds the volume lease lasts without renewal (tests shorten it).
    @Option(name: .long, help: .hidden)
    var leaseSeconds: Double = VolumeLease.defaultSeconds

    @Argument(help: ArgumentHelp("The encrypted directory (made by kmsfs init).", valueName: "cipherdir"))
    var cipherDir: String

    @Argument(help: ArgumentHelp("An existing, empty directory to mount on.", valueName: "mountpoint"))
    var mountPoint: String

    func validate() throws {
        guard (keyPool ?? 0) >= 0 && (keyPool ?? 0) <= 100_000 else { throw ValidationError("--key-pool must be 0 to 100000") }
        guard keyPoolAge > 0 && keyPoolAge <= 86400 else { throw ValidationError("--key-pool-age must be more than 0 and at most 86400 seconds") }
        if shared && writebackCache { throw ValidationError("--shared and --writeback-cache do not go together: other hosts must see each write") }
        guard kmsMaxInflight >= 1 && kmsMaxInflight <= 1024 else { throw ValidationError("--kms-max-inflight must be 1 to 1024") }
        guard leaseSeconds >= 0.3 && leaseSeconds <= 3600 else { throw ValidationError("--lease-seconds must be from 0.3 to 3600") }
        guard kmsDeadline >= 0.1 && kmsDeadline <= 600 else { throw ValidationError("--kms-deadline must be from 0.1 to 600 seconds") }
        guard kmsProbeInterval >= 0 && kmsProbeInterval <= 3600 else { throw ValidationError("--kms-probe-interval must be from 0 to 3600 seconds") }
        guard kmsMaxRate >= 0 && kmsMaxRate <= 100_000 else { throw ValidationError("--kms-max-rate must be from 0 to 100000 per second") }
        guard maxInodes == 0 || (maxInodes >= 64 && maxInodes <= 100_000_000) else {
            throw ValidationError("--max-inodes must be 0 (no bound) or from 64 to 100000000")
        }
    }

    func run() throws {
        if !foreground {
            try startDaemon()
            return
        }
        let reporter = Reporter(notifyFd: notifyFd)
        do {
            let code = try serve(reporter)
            // Unmounted, keys wiped, lease released: the daemon ends here, without the exit handlers (OpenSSL's
            // and libcurl's teardown), which a helper thread still inside a call to a key service that does not
            // answer could race into a crash. Log lines are written with write(2) as they come; stdio is flushed.
            fflush(nil)
            _exit(code)
        } catch let e as CLIError {
            reporter.fail(e.description)
            throw ExitCode(1)
        }
    }

    // MARK: - the daemon side

    /// Mounts and serves until unmounted. Returns the exit status.
    private func serve(_ reporter: Reporter) throws -> Int32 {
        MountCounters.markStarted()
        if reporter.isDaemon { setsid() }
        Log.shared.configure(sink: .standardError, level: debug ? .debug : .info, format: logFormat)

        let cipher = try Paths.resolve(cipherDir)
        let mount = try Paths.resolve(mountPoint)
        guard Paths.isDirectory(mount) else { throw CLIError("\(mount) is not a directory") }
        let volume = try VolumeAccess.loadConfig(cipher)
        let pinned = try VolumeAccess.checkPin(volume, cipher: cipher, trust: trust)
        let env = Paths.environment

        // One user of a backing directory at a time: two mounts (or a mount and a key rotation) writing the
        // same files would corrupt them. The lock lives as long as this process.
        let lockFd = open(cipher, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard lockFd >= 0, VolumeLock.tryLock(lockFd, exclusive: !shared) else {
            let who = VolumeLease.describeHolders(cipherDir: cipher)
            throw CLIError("\(cipher) is in use by " + (who.isEmpty ? "another kmsfs mount or a kmsfs rewrap" : who))
        }
        defer { close(lockFd) }
        // flock does not reach other clients of a distributed filesystem: the lease does (see VolumeLease).
        let lease: VolumeLease
        do {
            lease = try VolumeLease.acquire(cipherDir: cipher, purpose: (readOnly ? "mount (read-only)" : "mount") + (shared ? " (shared)" : ""),
                                            seconds: leaseSeconds, shared: shared)
        } catch let held as VolumeLease.Held {
            throw CLIError("\(cipher) is \(held)")
        } catch {
            throw CLIError("cannot take the lease of \(cipher): \(error)")
        }
        let fenceBox = FenceBox()
        do {
            try lease.startRenewing(onRenewed: { fenceBox.renewed() }) { why in fenceBox.fence(why) }
        } catch {
            lease.release()
            throw CLIError("cannot start renewing the lease of \(cipher): \(error)")
        }
        defer { lease.release() }
        // Finishing an interrupted rotation writes files: only a holder of the whole volume may (two shared mounts
        // starting at once would both redo it, one over the other's new writes).
        if shared && RewrapJournal.isPending(cipherDir: cipher) {
            throw CLIError("\(cipher) has an interrupted key rotation to finish first: run kmsfs rewrap, or mount it once without --shared")
        }
        do {
            if !shared, let repaired = try RewrapJournal.recover(cipherDir: cipher) {
                Log.info("finished the interrupted key rotation of /\(repaired)")
            }
        } catch {
            throw CLIError("cannot finish the interrupted key rotation in \(cipher): \(error)")
        }

        var logDescription = "standard error"
        if reporter.isDaemon || logFile != nil {
            logDescription = try configureDaemonLog(volume: volume, environment: env)
        }
        if let (holder, age) = lease.tookOver {
            Log.warning("took over the lease of \(cipher) from kmsfs \(holder.purpose) on host \(holder.host) (pid \(holder.pid)), not renewed for \(Int(age)) s")
        }

        var audit: AuditLog? = nil
        if let path = auditLog {
            do {
                audit = try AuditLog(path: Paths.absolute(path))
            } catch {
                throw CLIError("cannot open audit log \(path): \(error)")
            }
        }
        let policy = KMSPolicy(deadline: kmsDeadline, probeInterval: kmsProbeInterval, maxRate: kmsMaxRate, requireAllKeys: requireAllKeys)
        let keyService = try VolumeAccess.keyService(volume, cipher: cipher, keyFile: keyFile, audit: audit, maxInFlight: kmsMaxInflight,
                                                     policy: policy, allowOpenKeyFile: allowOpenKeyFile, passphrase: passphrase,
                                                     keyCommand: keyCommand)

        // Keys must not reach a core dump or swap, and modes of new files come from the caller, not our umask.
        // Key buffers are locked one by one anyway; locking the whole daemon also keeps OpenSSL's expanded key
        // schedules and libcurl's buffers out of swap. It needs root or a large RLIMIT_MEMLOCK.
        _ = kmsfs_set_dumpable(0)
        if kmsfs_mlockall() != 0 {
            Log.warning("cannot lock the daemon's memory (\(Errno.current)): data keys are locked, but OpenSSL's key schedules of open files may be swapped; run as root or raise RLIMIT_MEMLOCK")
        }
        var noCore = rlimit(rlim_cur: 0, rlim_max: 0)
        setrlimit(__rlimit_resource_t(RLIMIT_CORE.rawValue), &noCore)
        umask(0)

        // Format 3: the volume key, unwrapped once for the mount (names need it for as long as the mount lives),
        // which also authenticates the config.
        var volumeKeys: VolumeKeys? = nil
        if volume.formatVersion >= 3 { volumeKeys = try VolumeAccess.openVolumeKey(volume, cipher: cipher, keys: keyService) }
        if !pinned {
            do {
                try VolumeAccess.pin(volume, cipher: cipher, trust: trust)
            } catch {
                volumeKeys?.wipe()
                throw error
            }
            Log.info("first use of volume \(volume.volumeId) on this host: pinned its provider, keys and volume key in \(trust.knownVolumes.path)")
        }
        let names: NameMapping = volume.encryptsNames ? EncryptedNames(cipher: NameCipher(keys: volumeKeys!), bindsLinkTargets: volume.bindsLinkTargets) : PlaintextNames()

        let localKeys = volume.keyProvider.type == LocalKeyProvider.providerName
        let poolSize = keyPool ?? DataKeyPool.Settings.defaults.capacity
        let fs: EncryptedFilesystem
        do {
            fs = try EncryptedFilesystem(.init(
                cipherDir: cipher, volume: volume,
                keys: keyService,
                readOnly: readOnly, directIO: directIo, writebackCache: writebackCache, names: names,
                // The local provider's keys are CPU work, not a wait: one refill thread, on a core a create is not
                // using, woken once per half a pool.
                keyPool: localKeys
                    ? DataKeyPool.Settings(capacity: poolSize, maxAge: keyPoolAge, concurrency: 1, wakeAt: poolSize / 2)
                    : DataKeyPool.Settings(capacity: poolSize, maxAge: keyPoolAge,
                                           concurrency: min(DataKeyPool.Settings.defaults.concurrency, max(1, kmsMaxInflight / 2))),
                maxInodes: maxInodes, volumeKeys: volumeKeys, shared: shared))
        } catch {
            volumeKeys?.wipe()
            throw CLIError("cannot open \(cipher): \(error)")
        }

        fenceBox.attach(fs)
        fs.leaseIsCurrent = { lease.isCurrent }
        let options = fuseOptionList(cipher: cipher)
        Log.debug("mounting \(cipher) on \(mount) with options \(options.joined(separator: ","))")
        let outcome = FuseServer.run(fs, mountpoint: mount, options: options) {
            Log.shared.log(.info, "mounted \(cipher) on \(mount)", event: "mounted", fields: ["cipherdir": cipher, "mountpoint": mount])
            // kmsfs status asks here (root and this user only).
            StatusChannel.serve(mountPoint: mount) { [fs] in fs.statusJSON(mountPoint: mount) }
            reporter.ready("mounted \(cipher) on \(mount) (log: \(logDescription))")
        }
        switch outcome {
        case .unmounted:
            Log.shared.log(.info, "unmounted \(mount)", event: "unmounted", fields: ["mountpoint": mount])
            return 0
        case .badOptions:
            throw CLIError("invalid mount options\(Log.shared.lastError.map { ": " + $0 } ?? "")")
        case .mountFailed:
            throw CLIError("cannot mount on \(mount)\(Log.shared.lastError.map { ": " + $0 } ?? "")")
        case .failed:
            throw CLIError("the filesystem loop failed\(Log.shared.lastError.map { ": " + $0 } ?? "")")
        }
    }

    /// The -o options for libfuse.
    private func fuseOptionList(cipher: String) -> [String] {
        var options = fuseOptions.flatMap { $0.split(separator: ",").map(String.init) }.filter { !$0.isEmpty }
        let escaped = cipher.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: ",", with: "\\,")
        options.append("fsname=" + escaped)
        options.append("subtype=kmsfs")
        if readOnly && !options.contains("ro") { options.append("ro") }
        if options.contains("allow_other") && !options.contains("default_permissions") {
            options.append("default_permissions")
        }
        return options
    }

    /// Sends daemon log lines to the chosen place; returns its description for the user.
    private func configureDaemonLog(volume: VolumeConfig, environment env: [String: String]) throws -> String {
        let level: LogLevel = debug ? .debug : .info
        var path = logFile.map(Paths.absolute)
        if path == nil {
            var st = stat()
            if stat("/dev/log", &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK {
                Log.shared.configure(sink: .syslog, level: level, format: logFormat)
                return "syslog"
            }
            let state = env["XDG_STATE_HOME"].flatMap { $0.hasPrefix("/") ? $0 : nil } ?? ((env["HOME"] ?? "/root") + "/.local/state")
            let dir = state + "/kmsfs"
            var current = ""
            for part in dir.split(separator: "/") {
                current += "/" + part
                mkdir(current, 0o700)
            }
            path = dir + "/" + volume.volumeId + ".log"
        }
        let fd = open(path!, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw CLIError("cannot open log file \(path!): \(Errno.current)") }
        dup2(fd, 2)  // anything the runtime prints on a crash lands in the log too
        Log.shared.configure(sink: .file(fd), level: level, format: logFormat)
        return path!
    }

    // MARK: - the starting side

    /// The path of the volume's local key file when it is protected by a passphrase (nil otherwise, or when the
    /// config cannot be read: the daemon then says why).
    private func protectedKeyFile() throws -> String? {
        guard let cipher = try? Paths.resolve(cipherDir), let volume = try? VolumeAccess.loadConfig(cipher),
              volume.keyProvider.type == LocalKeyProvider.providerName else { return nil }
        let path = ProviderFactory.localKeyFilePath(volume: volume, options: .init(keyFile: keyFile.map(Paths.absolute), environment: Paths.environment))
        return LocalKeyFile.isProtected(path: path) ? path : nil
    }

    /// Starts `kmsfs mount -f` in a new session and waits until it reports the mount live or failed.
    private func startDaemon() throws {
        var fds: [Int32] = [0, 0]
        guard kmsfs_pipe_cloexec(&fds) == 0 else { throw CLIError("pipe: \(Errno.current)") }
        var args = ["kmsfs", "mount", "--foreground", "--notify-fd", "3"]
        if readOnly { args.append("--read-only") }
        if shared { args.append("--shared") }
        if allowOpenKeyFile { args.append("--allow-open-key-file") }
        if directIo { args.append("--direct-io") }
        if writebackCache { args.append("--writeback-cache") }
        for o in fuseOptions { args += ["-o", o] }
        if let k = keyFile { args += ["--key-file", Paths.absolute(k)] }
        if let f = passphrase.passfile { args += ["--passfile", Paths.absolute(f)] }
        if let c = passphrase.extpass { args += ["--extpass", c] }
        if let c = keyCommand.command { args += ["--key-command", c] }
        // A protected key file and no other source: asked here, on the terminal, and handed to the daemon on its
        // standard input (a pipe, read once).
        var passphrasePipe: Int32? = nil
        defer { if let p = passphrasePipe { close(p) } }
        if !passphrase.isGiven, let keyFile = try protectedKeyFile() {
            let secret = try Passphrase.fromTerminal(prompt: "Passphrase for key file \(keyFile): ")
            defer { secret.wipe() }
            var p: [Int32] = [0, 0]
            guard kmsfs_pipe_cloexec(&p) == 0 else { throw CLIError("pipe: \(Errno.current)") }
            let written = secret.withUnsafeBytes { write(p[1], $0.baseAddress, $0.count) } == secret.count && write(p[1], "\n", 1) == 1
            close(p[1])
            passphrasePipe = p[0]
            guard written else { throw CLIError("cannot hand the passphrase to the mount daemon: \(Errno.current)") }
            args += ["--passphrase-fd", "0"]
        }
        if let a = auditLog { args += ["--audit-log", Paths.absolute(a)] }
        if let l = logFile { args += ["--log-file", Paths.absolute(l)] }
        if debug { args.append("--debug") }
        args += ["--log-format", logFormat.rawValue]
        if let n = keyPool { args += ["--key-pool", String(n)] }
        args += ["--key-pool-age", String(keyPoolAge), "--kms-max-inflight", String(kmsMaxInflight), "--max-inodes", String(maxInodes)]
        args += ["--kms-deadline", String(kmsDeadline), "--kms-probe-interval", String(kmsProbeInterval), "--kms-max-rate", String(kmsMaxRate)]
        if requireAllKeys { args.append("--require-all-keys") }
        if let k = trust.file.path { args += ["--known-volumes", Paths.absolute(k)] }
        if trust.requirePinned { args.append("--require-pinned") }
        args += ["--lease-seconds", String(leaseSeconds)]
        args += ["--", Paths.absolute(cipherDir), Paths.absolute(mountPoint)]

        let pid: pid_t
        do {
            pid = try Spawn.start("/proc/self/exe", args, stdinFd: passphrasePipe, passFd: fds[1])
        } catch {
            close(fds[0]); close(fds[1])
            throw error
        }
        close(fds[1])
        defer { close(fds[0]) }

        // The daemon writes one line: "ready\t<what>" or "error\t<why>".
        var message = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        var pfd = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
        let deadline = time(nil) + 120
        while time(nil) < deadline {
            let r = poll(&pfd, 1, 1000)
            if r < 0 && errno == EINTR { continue }
            if r == 0 { continue }
            let n = buf.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            message += buf[0..<n]
            if message.contains(UInt8(ascii: "\n")) { break }
        }
        let line = String(decoding: message, as: UTF8.self).split(separator: "\n").first.map(String.init) ?? ""
        if line.hasPrefix("ready\t") {
            print("kmsfs: " + line.dropFirst(6))
            return
        }
        if line.hasPrefix("error\t") {
            _ = Spawn.wait(pid)
            throw CLIError(String(line.dropFirst(6)))
        }
        if line.isEmpty && time(nil) >= deadline {
            kill(pid, SIGTERM)
            throw CLIError("the mount daemon did not become ready within 120 seconds (stopped it)")
        }
        let status = Spawn.wait(pid)
        throw CLIError("the mount daemon exited with status \(status) before the mount was live")
    }
}

/// Tells the starting process (or the terminal) whether the mount came up.
struct Reporter {
    let notifyFd: Int32?
    var isDaemon: Bool { notifyFd != nil }

    func ready(_ text: String) {
        guard let fd = notifyFd else { return }
        send("ready\t" + text + "\n", fd)
        close(fd)
    }

    func fail(_ text: String) {
        Log.error(text)
        guard let fd = notifyFd else { return }
        send("error\t" + text.replacingOccurrences(of: "\n", with: " ") + "\n", fd)
        close(fd)
    }

    private func send(_ s: String, _ fd: Int32) {
        var bytes = Array(s.utf8)
        _ = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress, $0.count) }
    }
}

/// Hands a lost lease to the filesystem once it exists (the lease is taken before the filesystem is made).
final class FenceBox: @unchecked Sendable {
    private let lock = Lock()
    private var fs: EncryptedFilesystem?
    private var pending: String?

    func attach(_ filesystem: EncryptedFilesystem) {
        let why: String? = lock.withLock {
            fs = filesystem
            return pending
        }
        if let why { filesystem.fence(why) }
    }

    func fence(_ why: String) {
        let target: EncryptedFilesystem? = lock.withLock {
            if fs == nil { pending = why }
            return fs
        }
        target?.fence(why)
    }

    /// After each lease renewal: a shared mount follows another host's change of the volume config.
    func renewed() {
        lock.withLock { fs }?.followUniformHeaderLength()
    }
}

extension LogFormat: ExpressibleByArgument {}
