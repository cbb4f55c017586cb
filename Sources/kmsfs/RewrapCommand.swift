import ArgumentParser
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

struct RewrapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewrap",
        abstract: "Rotate keys: re-wrap every file's data key under a new set of keys.",
        discussion: """
            Rewrites only the headers (file contents are not re-encrypted). With AWS KMS each data key is moved \
            with ReEncrypt, so its plaintext never leaves KMS; --key-id gives the new keys (default: the configured \
            ones). With the local provider, --key-file names the new master key file (created if missing). \
            The volume config is updated once every file is done.

            Crash-safe: stopped at any point, every file stays readable, and the next rewrap or mount finishes the \
            interrupted step. The volume must not be mounted.
            """
    )

    @Option(name: .long, parsing: .singleValue,
            help: ArgumentHelp("AWS KMS: a new wrapping key (repeatable; the new key set, in order).", valueName: "key"))
    var keyId: [String] = []

    @Option(name: .long, help: ArgumentHelp("Local provider: the new master key file (created if missing).", valueName: "path"))
    var keyFile: String?

    @Option(name: .long, help: ArgumentHelp("Local provider: the current master key file, if not the configured one.", valueName: "path"))
    var currentKeyFile: String?

    /// The passphrase of protected key files (the current one, an existing new one, and a new one made here when
    /// the current one is protected: a rotation keeps the protection and the passphrase).
    @OptionGroup var passphrase: PassphraseOptions

    @OptionGroup var keyCommand: KeyCommandOption

    @Option(name: .long, help: ArgumentHelp("AWS KMS: region override.", valueName: "region"))
    var region: String?

    @Option(name: .long, help: ArgumentHelp("AWS KMS: profile override.", valueName: "profile"))
    var profile: String?

    @Option(name: .long, help: ArgumentHelp("AWS KMS: endpoint override.", valueName: "url"))
    var endpoint: String?

    @Option(name: .long, help: ArgumentHelp("Key service requests in flight at once.", valueName: "count"))
    var jobs: Int = VolumeRewrapper.defaultJobs

    @OptionGroup var trust: TrustOptions

    @OptionGroup var progress: ProgressOptions

    @Argument(help: ArgumentHelp("The encrypted directory.", valueName: "cipherdir"))
    var cipherDir: String

    func validate() throws {
        guard jobs >= 1 && jobs <= 256 else { throw ValidationError("--jobs must be 1 to 256") }
    }

    func run() throws {
        let cipher = try Paths.resolve(cipherDir)
        var volume = try VolumeAccess.loadConfig(cipher)
        let pinned = try VolumeAccess.checkPin(volume, cipher: cipher, trust: trust)
        let original = volume
        let (dirFd, lease) = try VolumeAccess.holdExclusively(cipher, purpose: "rewrap")
        defer { close(dirFd) }
        do {
            // Another host has the volume now: stop at once. Rotation is crash-safe, so stopping anywhere leaves
            // every file readable, and whoever mounts or rewraps next finishes the interrupted step.
            try lease.startRenewing { why in
                printError("kmsfs rewrap: \(why); stopping")
                _exit(3)
            }
        } catch {
            lease.release()
            throw CLIError("cannot start renewing the lease of \(cipher): \(error)")
        }
        defer { lease.release() }
        if let (holder, age) = lease.tookOver {
            printError("took over the lease of \(cipher) from kmsfs \(holder.purpose) on host \(holder.host) (pid \(holder.pid)), not renewed for \(Int(age)) s")
        }
        if let repaired = try RewrapJournal.recover(cipherDir: cipher) {
            printError("finished the interrupted rotation of /\(repaired)")
        }

        let provider: KeyProvider
        let targets: [String]
        let originalKeyIds = volume.keyProvider.keyIds
        switch volume.keyProvider.type {
        case AWSKMSProvider.providerName:
            if keyFile != nil || currentKeyFile != nil { throw CLIError("--key-file is for the local provider") }
            let c = volume.keyProvider
            let settings = AWSSettings(region: region ?? c.region, profile: profile ?? c.profile, endpoint: endpoint ?? c.endpoint,
                                       environment: Paths.environment)
            let aws = AWSKMSProvider(settings: settings)
            provider = aws
            let arns = try VolumeAccess.checkAWSKeys(keyId.isEmpty ? c.keyIds : keyId, provider: aws)
            targets = arns
            volume.keyProvider.keyIds = arns
        case ExecKeyProvider.providerName:
            if keyFile != nil || currentKeyFile != nil { throw CLIError("--key-file is for the local provider") }
            let exec = try keyCommand.provider()
            provider = exec
            targets = try VolumeAccess.checkExecKeys(keyId.isEmpty ? volume.keyProvider.keyIds : keyId, provider: exec)
            volume.keyProvider.keyIds = targets
        case LocalKeyProvider.providerName:
            if !keyId.isEmpty || region != nil || profile != nil || endpoint != nil {
                throw CLIError("--key-id, --region, --profile and --endpoint are for AWS KMS volumes")
            }
            let env = Paths.environment
            let currentPath = currentKeyFile.map(Paths.absolute)
                ?? ProviderFactory.localKeyFilePath(volume: volume, options: .init(environment: env))
            let current: LocalMasterKey
            let next: LocalMasterKey
            do {
                // One passphrase for the run: the one that opened the current key file seals the new one.
                let once = passphrase.readerOnce
                current = try LocalKeyFile.load(path: currentPath, passphrase: once)
                if let path = keyFile.map(Paths.absolute) {
                    if Paths.exists(path) {
                        next = try LocalKeyFile.load(path: path, passphrase: once)
                    } else {
                        let (key, master) = try LocalMasterKey.generate()
                        var protection: LocalKeyFile.Protection? = nil
                        if LocalKeyFile.isProtected(path: currentPath) {
                            protection = LocalKeyFile.Protection(passphrase: try once(currentPath))
                        }
                        defer { protection?.passphrase.wipe() }
                        try LocalKeyFile.write(master, to: path, keyId: key.keyId, protection: protection)
                        if progress.json { printError("New master key: \(path) (back it up)") } else { print("New master key: \(path) (back it up)") }
                        next = key
                    }
                    volume.keyProvider.keyFile = path
                } else {
                    next = current
                }
            } catch let e as KeyError {
                throw CLIError(e.message)
            }
            provider = LocalKeyProvider(keys: [current, next])
            targets = [next.keyId]
            volume.keyProvider.keyIds = targets
        default:
            throw CLIError("unknown key provider \"\(volume.keyProvider.type)\"")
        }

        // Format 3: the volume key is re-wrapped with every config written (under the keys that config names), and
        // the config authenticated again; first, the volume key opens (and the config authenticates) as it is.
        var volumeKeys: VolumeKeys? = nil
        if original.formatVersion >= 3 {
            volumeKeys = try VolumeAccess.openVolumeKey(original, cipher: cipher,
                                                        keys: KeyService(provider: provider, keyIds: originalKeyIds, audit: nil))
        }
        defer { volumeKeys?.wipe() }
        if !pinned {
            try VolumeAccess.pin(original, cipher: cipher, trust: trust)
            printError("first use of volume \(volume.volumeId) on this host: pinned its provider, keys and volume key in \(trust.knownVolumes.path)")
        }
        // While files move to the new keys, this host accepts the config naming old and new ones; once the
        // rotation is done, only the new ones. Other hosts refuse the new keys until pinned there (kmsfs pin).
        var during = VolumePin(original)
        for k in targets where !during.keyIds.contains(k) { during.keyIds.append(k) }
        if let found = try? trust.knownVolumes.pin(of: volume.volumeId) {
            for k in found.pin.keyIds where !during.keyIds.contains(k) { during.keyIds.append(k) }
        }
        do {
            try trust.knownVolumes.record(during)
        } catch {
            throw CLIError("\(error)")
        }
        let writeConfig = { (config: VolumeConfig) throws in
            try self.writeConfig(config, cipher, provider: provider, volumeKeys: volumeKeys)
        }

        // A local volume is mounted with one key file. So a local rotation first wraps every file under both
        // keys, then switches the config to the new key file, then drops the old key: at every moment, the key
        // file the config names opens every file.
        var passes: [[String]] = [targets]
        if volume.keyProvider.type == LocalKeyProvider.providerName, let old = originalKeyIds.first, old != targets[0] {
            passes = [[targets[0], old], targets]
        }
        // Format 2: every file gets one header length, enough for every pass's keys (never shorter than now, so
        // bodies move only when the keys need more room). While lengths may differ, the config says so first.
        var uniformLength: Int? = nil
        if volume.formatVersion >= 2 {
            let needed = passes.map {
                VolumeConfig.uniformHeaderLength(volumeId: volume.volumeId, userContext: volume.encryptionContext,
                                                 provider: provider.name, keyIds: $0, wrappedKeySize: provider.wrappedKeySizeBound)
            }.max()!
            uniformLength = max(needed, volume.headerLength ?? 0)
            if volume.headerLength != uniformLength {
                volume.headerLength = nil
                // Only that: the keys the config names change once every file is wrapped under them.
                var early = original
                early.headerLength = nil
                try writeConfig(early)
            }
        }
        var allUniform = true
        var last: VolumeRewrapper.Summary? = nil
        for (n, pass) in passes.enumerated() {
            let summary = try rewrap(cipher: cipher, volume: volume, provider: provider, targets: pass, headerLength: uniformLength)
            if summary.longer > 0 { allUniform = false }
            if n == 0 { try writeConfig(volume) }
            if n == passes.count - 1 { last = summary }
        }
        if let h = uniformLength, volume.headerLength != h {
            if allUniform {
                volume.headerLength = h
                try writeConfig(volume)
            } else {
                printError("some files needed headers longer than \(h) bytes: sizes in this volume are read from each file's header")
            }
        }
        do {
            try trust.knownVolumes.record(VolumePin(volume))
        } catch {
            printError("warning: \(error); this host still accepts the old keys for this volume")
        }
        let s = last!
        if progress.json {
            let keys = targets.map(JSON.quote).joined(separator: ",")
            print("{\"files\":\(s.total),\"rewrapped\":\(s.rewrapped),\"unchanged\":\(s.unchanged),\"failed\":0,\"keys\":[\(keys)]}")
        } else if !progress.quiet {
            print("\(s.total) files: \(s.rewrapped) rewrapped, \(s.unchanged) already under the new keys, 0 failed")
            print("Every file is now wrapped under: \(targets.joined(separator: ", "))")
        }
    }

    private func writeConfig(_ volume: VolumeConfig, _ cipher: String, provider: KeyProvider, volumeKeys: VolumeKeys?) throws {
        var volume = volume
        if let vk = volumeKeys, let stored = volume.volumeKey {
            do {
                let ids = volume.keyProvider.keyIds
                volume.volumeKey = try KeyService(provider: provider, keyIds: ids, audit: nil)
                    .rewrapVolumeKey(stored, volumeId: volume.volumeId, to: ids)
                try volume.authenticate(with: vk)
            } catch let e as KeyError {
                throw CLIError("cannot re-wrap the volume key under \(e.keyId): \(e.typeAndDetail)")
            }
        }
        do {
            try FileIO.writeFileAtomically(VolumeConfig.path(in: cipher), contents: try volume.encoded(), mode: 0o644)
        } catch {
            throw CLIError("cannot update \(VolumeConfig.path(in: cipher)): \(error)")
        }
    }

    /// One pass over every file; throws (leaving the config alone) if any file failed.
    private func rewrap(cipher: String, volume: VolumeConfig, provider: KeyProvider, targets: [String],
                        headerLength: Int?) throws -> VolumeRewrapper.Summary {
        let keys = KeyService(provider: provider, keyIds: targets, audit: nil, maxInFlight: jobs)
        let rewrapper = VolumeRewrapper(cipherDir: cipher, volume: volume, keys: keys, targets: targets, headerLength: headerLength)
        let meter = Progress("rewrapped", options: progress)
        let summary: VolumeRewrapper.Summary
        do {
            summary = try rewrapper.run(jobs: jobs) { done, total in
                meter.total = total
                while meter.done < done { meter.step() }
            }
        } catch let e as RewrapJournal.Interrupted {
            meter.clearLine()
            throw CLIError(e.description)
        }
        meter.clearLine()
        for f in summary.failed { printError("/\(f.path): \(f.reason)") }
        guard summary.failed.isEmpty else {
            print("\(summary.total) files: \(summary.rewrapped) rewrapped, \(summary.unchanged) already under the new keys, \(summary.failed.count) failed")
            throw CLIError("\(summary.failed.count) files were not rewrapped; the volume config still names the old keys. Fix them and run kmsfs rewrap again")
        }
        return summary
    }
}
