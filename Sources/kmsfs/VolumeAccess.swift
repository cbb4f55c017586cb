import ArgumentParser
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Opening a volume's config and its key provider, with the error messages every command shares.
enum VolumeAccess {
    static func loadConfig(_ cipher: String) throws -> VolumeConfig {
        let path = VolumeConfig.path(in: cipher)
        let bytes: [UInt8]
        do {
            bytes = try FileIO.readFile(path)
        } catch let e as Errno where e == .ENOENT {
            throw CLIError("\(cipher) is not a kmsfs volume: it has no \(VolumeConfig.fileName) (create one with kmsfs init)")
        } catch {
            throw CLIError("cannot read \(path): \(error)")
        }
        let config: VolumeConfig
        do {
            config = try VolumeConfig.decode(bytes)
        } catch {
            throw CLIError("\(path): \(error)")
        }
        // A config of an older format put over a volume with encrypted names (a downgrade, which would drop the
        // MAC check and could name a KMS endpoint) is refused.
        if config.formatVersion < 3, let top = try? FileIO.readFile(cipher + "/" + NameCipher.directoryIdFile),
           NameCipher.looksLikeDirectoryIdFile(top) {
            throw CLIError("\(path): the config says format \(config.formatVersion), but the volume has encrypted names (\(NameCipher.directoryIdFile)): the config was replaced; restore the volume's own config")
        }
        return config
    }

    /// Checks the volume against the host's pin before any of its keys is used: a config that names another
    /// provider, a key the host has not pinned, another volume key or endpoint is refused with one line. Returns
    /// whether the volume was pinned (false: first use, to be pinned once its volume key has opened).
    static func checkPin(_ volume: VolumeConfig, cipher: String, trust: TrustOptions) throws -> Bool {
        let known = trust.knownVolumes
        let found: (pin: VolumePin, line: Int)?
        let here: (pin: VolumePin, line: Int)?
        do {
            found = try known.pin(of: volume.volumeId)
            here = try known.pin(at: cipher)
        } catch {
            throw CLIError("\(error)")
        }
        guard let (pin, line) = found else {
            // A config replaced as a whole may also name a new volume ID: the directory remembers its volume.
            if let (other, otherLine) = here {
                throw CLIError("refusing volume \(volume.volumeId) (\(cipher)): this directory was pinned as volume \(other.volumeId) (\(known.path) line \(otherLine)), and its config now names another volume (replaced as a whole?); if it really is a new volume, run kmsfs pin \(cipher) after checking it")
            }
            if trust.requirePinned {
                throw CLIError("volume \(volume.volumeId) (\(cipher)) is not pinned in \(known.path), and --require-pinned was given: add its line from kmsfs pin --print on a host that trusts it")
            }
            return false
        }
        if let why = pin.mismatch(with: volume) {
            throw CLIError("refusing volume \(volume.volumeId) (\(cipher)): \(why) (\(known.path) line \(line)); if you changed the volume yourself, check it and run kmsfs pin --update \(cipher)")
        }
        return true
    }

    /// Pins a volume whose config has just been authenticated (first use, or `kmsfs pin`), at `cipher`.
    static func pin(_ volume: VolumeConfig, cipher: String, trust: TrustOptions) throws {
        do {
            try trust.knownVolumes.record(VolumePin(volume, directory: cipher))
        } catch {
            throw CLIError("\(error)")
        }
    }

    /// Holds the volume for an offline command that changes it (rewrap, rebind): the flock of the backing
    /// directory (other processes here) and the lease (other hosts). Both go when `dirFd` is closed and the lease
    /// released.
    static func holdExclusively(_ cipher: String, purpose: String) throws -> (dirFd: Int32, lease: VolumeLease) {
        let dirFd = open(cipher, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dirFd < 0 { throw CLIError("\(cipher): \(Errno.current)") }
        guard VolumeLock.tryLock(dirFd, exclusive: true) else {
            close(dirFd)
            let who = VolumeLease.describeHolders(cipherDir: cipher)
            throw CLIError("\(cipher) is in use (\(who.isEmpty ? "mounted, or a rewrap or rebind is running" : who)); unmount it first")
        }
        do {
            return (dirFd, try VolumeLease.acquire(cipherDir: cipher, purpose: purpose))
        } catch let held as VolumeLease.Held {
            close(dirFd)
            throw CLIError("\(cipher) is \(held); unmount it first")
        } catch {
            close(dirFd)
            throw CLIError("cannot take the lease of \(cipher): \(error)")
        }
    }

    static func keyService(_ volume: VolumeConfig, cipher: String, keyFile: String?, audit: AuditLog?,
                           maxInFlight: Int = KeyService.defaultMaxInFlight, policy: KMSPolicy = .defaults,
                           allowOpenKeyFile: Bool = false, passphrase: PassphraseOptions, keyCommand: KeyCommandOption) throws -> KeyService {
        do {
            let provider = try ProviderFactory.makeProvider(
                volume: volume, options: .init(keyFile: keyFile.map(Paths.absolute), environment: Paths.environment, policy: policy,
                                               allowOpenKeyFile: allowOpenKeyFile, passphrase: passphrase.reader,
                                               keyCommand: keyCommand.command))
            return KeyService(provider: provider, keyIds: volume.keyProvider.keyIds, audit: audit, maxInFlight: maxInFlight,
                              policy: policy)
        } catch let e as KeyError {
            throw CLIError(e.message.isEmpty ? e.description : e.message)
        } catch let e as FormatError {
            throw CLIError("\(VolumeConfig.path(in: cipher)): \(e)")
        }
    }

    /// Unwraps the volume key of a format 3 volume (and authenticates its config), with one clear line on failure.
    static func openVolumeKey(_ volume: VolumeConfig, cipher: String, keys: KeyService) throws -> VolumeKeys {
        do {
            return try keys.openVolumeKey(volume)
        } catch let e as KeyError {
            throw CLIError("cannot unwrap the volume key of \(cipher) with key \(e.keyId): \(e.typeAndDetail)\(e.alsoTriedText)")
        } catch {
            throw CLIError("\(VolumeConfig.path(in: cipher)): \(error)")
        }
    }

    /// A key command's describe-key on each key: the IDs it gives, checked as the config's will be at mount
    /// (well-formed, no key twice), or one line saying which key is unusable and why.
    static func checkExecKeys(_ keys: [String], provider: ExecKeyProvider) throws -> [String] {
        if let bad = keys.first(where: { !ProviderFactory.isExecKeyId($0) }) {
            throw CLIError("key \"\(bad)\" is not a key command's key ID (1 to 256 printable ASCII characters, no spaces or commas)")
        }
        let ids = try checkAWSKeys(keys, provider: provider)
        if let bad = ids.first(where: { !ProviderFactory.isExecKeyId($0) }) {
            throw CLIError("the key command's describe-key names key \"\(bad)\", which is not a valid key ID")
        }
        if Set(ids).count != ids.count { throw CLIError("the same key is given twice") }
        return ids
    }

    /// DescribeKey on each key: their ARNs, or one line saying which key is unusable and why.
    static func checkAWSKeys(_ keys: [String], provider: KeyProvider) throws -> [String] {
        try keys.map { key in
            do {
                return try provider.describeKey(key)
            } catch let e as KeyError {
                let why: String
                switch e.kind {
                case .accessDenied where provider is AWSKMSProvider: why = "not allowed (\(e.errorType)): the credentials need kms:DescribeKey on it"
                case .accessDenied: why = "not allowed (\(e.errorType)\(e.message.isEmpty ? "" : ": " + e.message))"
                case .keyUnavailable: why = e.errorType == "NotFoundException" ? "not found" : "not usable: \(e.message)"
                case .unreachable: why = "KMS could not be reached: \(e.message)"
                default: why = "\(e.errorType)\(e.message.isEmpty ? "" : ": " + e.message)"
                }
                throw CLIError("key \(key): \(why)")
            }
        }
    }
}

/// The host's key command, for volumes whose keys are in an exec key service (kmsfs(1), KEY COMMANDS).
struct KeyCommandOption: ParsableArguments {
    @Option(name: .customLong("key-command"), help: ArgumentHelp("Exec provider: the key service's command, run with /bin/sh -c for every key operation (default: $KMSFS_KEY_COMMAND).", valueName: "command"))
    var command: String?

    /// The exec provider for offline commands (init, rewrap), or one line saying that no command was given.
    func provider() throws -> ExecKeyProvider {
        do {
            let c = try ProviderFactory.keyCommand(.init(environment: Paths.environment, keyCommand: command))
            return ExecKeyProvider(command: c, timeout: KMSPolicy.defaults.deadline)
        } catch let e as KeyError {
            throw CLIError(e.message)
        }
    }
}

/// Where the host keeps its pinned volumes.
struct KnownVolumesOption: ParsableArguments {
    @Option(name: .customLong("known-volumes"), help: ArgumentHelp("The host's pinned volumes (default: $KMSFS_KNOWN_VOLUMES, else $XDG_CONFIG_HOME/kmsfs/known-volumes).",
                                                                  valueName: "file"))
    var path: String?

    var knownVolumes: KnownVolumes {
        KnownVolumes(path: path.map(Paths.absolute) ?? KnownVolumes.defaultPath(environment: Paths.environment))
    }
}

/// The host's pinned volumes, and whether an unpinned volume may be trusted on first use.
struct TrustOptions: ParsableArguments {
    @OptionGroup var file: KnownVolumesOption

    @Flag(name: .long, help: "Refuse a volume this host has not pinned (no trust on first use).")
    var requirePinned = false

    var knownVolumes: KnownVolumes { file.knownVolumes }
}
