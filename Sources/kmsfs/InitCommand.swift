import ArgumentParser
import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create an encrypted volume in CIPHERDIR.",
        discussion: """
            Writes the volume config (kmsfs.conf: format version, volume ID, chunk size, key provider settings, \
            the volume key wrapped by the provider; no secret) into CIPHERDIR, creating the directory and its \
            parents if needed. CIPHERDIR must be empty. File names, symbolic link targets and extended \
            attributes are encrypted with the volume key unless --plaintext-names is given.

            With the local key provider and no --key-file, a new 256-bit master key is written to \
            $XDG_CONFIG_HOME/kmsfs/keys/<volume-id>.key (default ~/.config/kmsfs/keys, mode 0600). \
            With --key-file, an existing key file is used, or a new one is created at that path. \
            Back the key file up: without it the volume cannot be decrypted.
            """
    )

    @Option(name: .long, help: ArgumentHelp("Key provider: local (the default) or aws.", valueName: "provider"))
    var kms: String = "local"

    @Option(name: .long, help: ArgumentHelp("Local provider: use (or create) this master key file.", valueName: "path"))
    var keyFile: String?

    @Flag(name: .long, help: "Local provider: protect the new master key file with a passphrase (asked twice on the terminal, or from --passfile or --extpass).")
    var passphrase = false

    @OptionGroup var passphraseSource: PassphraseOptions

    @OptionGroup var keyCommand: KeyCommandOption

    @Option(name: .long, help: ArgumentHelp("Local provider: the scrypt cost of a protected key file, log2 of N (r = 8, p = 1); 10 to 19; 17 uses 128 MiB for about a third of a second.", valueName: "n"))
    var scryptLogN: Int = LocalKeyFile.defaultLogN

    @Option(name: .long, parsing: .singleValue,
            help: ArgumentHelp("AWS KMS: a key ID, key ARN, alias name or alias ARN (repeatable; tried in this order).", valueName: "key"))
    var keyId: [String] = []

    @Option(name: .long, help: ArgumentHelp("AWS KMS: the region (default: AWS_REGION, the profile, or the key ARN).", valueName: "region"))
    var region: String?

    @Option(name: .long, help: ArgumentHelp("AWS KMS: the shared-config profile for credentials and region.", valueName: "profile"))
    var profile: String?

    @Option(name: .long, help: ArgumentHelp("AWS KMS: the endpoint URL (default: AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL, or the region's).", valueName: "url"))
    var endpoint: String?

    @Option(name: .long, parsing: .singleValue,
            help: ArgumentHelp("Add KEY=VALUE to every file's encryption context (repeatable).", valueName: "key=value"))
    var context: [String] = []

    @Option(name: .long, help: ArgumentHelp("Plaintext bytes per chunk: a power of two from 4096 to 1048576.", valueName: "bytes"))
    var chunkSize: Int = ChunkLayout.defaultChunkSize

    @Flag(name: .long, help: "Store names, symbolic link targets and extended attributes as they are (the config is still authenticated).")
    var plaintextNames = false

    @Option(name: .long, help: ArgumentHelp("On-disk format: 3 (the default), or 2 or 1 for a volume older kmsfs releases must also mount (no volume key: names in plaintext, config not authenticated).", valueName: "n"))
    var formatVersion: Int = VolumeConfig.currentFormatVersion

    @OptionGroup var known: KnownVolumesOption

    @Argument(help: ArgumentHelp("The directory that will hold the ciphertext.", valueName: "cipherdir"))
    var cipherDir: String

    func validate() throws {
        guard Scrypt.isAcceptable(logN: scryptLogN, r: LocalKeyFile.defaultR, p: LocalKeyFile.defaultP) else {
            throw ValidationError("--scrypt-log-n must be from 10 to 19 (19: 512 MiB)")
        }
    }

    /// A new key file is protected with --passphrase, or when a passphrase is given by file or command.
    private var protectsKey: Bool { passphrase || passphraseSource.passfile != nil || passphraseSource.extpass != nil }

    func run() throws {
        let pairs = try parseContext(context)
        switch kms {
        case "local":
            if !keyId.isEmpty || region != nil || profile != nil || endpoint != nil {
                throw CLIError("--key-id, --region, --profile and --endpoint are for --kms aws")
            }
        case "aws", "aws-kms":
            if keyFile != nil { throw CLIError("--key-file is for the local provider") }
            if protectsKey { throw CLIError("--passphrase, --passfile and --extpass are for the local provider") }
            if keyId.isEmpty { throw CLIError("--kms aws needs at least one --key-id") }
        case "exec":
            if keyFile != nil || protectsKey { throw CLIError("--key-file, --passphrase, --passfile and --extpass are for the local provider") }
            if region != nil || profile != nil || endpoint != nil { throw CLIError("--region, --profile and --endpoint are for --kms aws") }
            if keyId.isEmpty { throw CLIError("--kms exec needs at least one --key-id") }
            if formatVersion < 3 { throw CLIError("--kms exec needs format 3 (the key command comes from the host, never from the volume)") }
        default:
            throw CLIError("unknown key provider \"\(kms)\" (available: local, aws, exec)")
        }
        guard VolumeConfig.supportedFormatVersions.contains(formatVersion) else {
            throw CLIError("--format-version must be 1, 2 or 3")
        }
        if plaintextNames && formatVersion < 3 { throw CLIError("--plaintext-names is for format 3 (older formats always have plaintext names)") }
        guard ChunkLayout.isValidChunkSize(chunkSize) else {
            throw CLIError("--chunk-size must be a power of two from 4096 to 1048576")
        }
        let dir = Paths.absolute(cipherDir)
        // AWS keys are checked before anything is created.
        let aws = kms == "local" || kms == "exec" ? nil : try resolveAWSKeys()
        let exec = kms == "exec" ? try resolveExecKeys() : nil
        if Paths.exists(VolumeConfig.path(in: dir)) {
            throw CLIError("\(dir) already holds a kmsfs volume (\(VolumeConfig.fileName))")
        }
        if Paths.exists(dir) {
            guard Paths.isDirectory(dir) else { throw CLIError("\(dir) is not a directory") }
            guard try Paths.entries(dir).isEmpty else { throw CLIError("\(dir) is not empty; kmsfs init needs an empty directory") }
        } else {
            do {
                try Paths.makeDirectories(dir, mode: 0o700)
            } catch {
                throw CLIError("cannot create \(dir): \(error)")
            }
        }
        let volumeId = try VolumeConfig.newVolumeId()

        if let aws {
            try initAWS(dir: dir, volumeId: volumeId, pairs: pairs, settings: aws.settings, arns: aws.arns)
        } else if let exec {
            try initExec(dir: dir, volumeId: volumeId, pairs: pairs, provider: exec.provider, keyIds: exec.keyIds)
        } else {
            try initLocal(dir: dir, volumeId: volumeId, pairs: pairs)
        }
    }

    /// Checks every key with DescribeKey; returns their ARNs, so each call goes to the key's region.
    private func resolveAWSKeys() throws -> (settings: AWSSettings, arns: [String]) {
        let settings = AWSSettings(region: region, profile: profile, endpoint: endpoint, environment: Paths.environment)
        let arns = try VolumeAccess.checkAWSKeys(keyId, provider: AWSKMSProvider(settings: settings))
        if Set(arns).count != arns.count { throw CLIError("the same key is given twice") }
        return (settings, arns)
    }

    /// Checks every key with the key command's describe-key; returns the IDs it gives.
    private func resolveExecKeys() throws -> (provider: ExecKeyProvider, keyIds: [String]) {
        let provider = try keyCommand.provider()
        return (provider, try VolumeAccess.checkExecKeys(keyId, provider: provider))
    }

    private func initExec(dir: String, volumeId: String, pairs: [String: String], provider: ExecKeyProvider, keyIds: [String]) throws {
        let headerLength = VolumeConfig.uniformHeaderLength(volumeId: volumeId, userContext: pairs, provider: ExecKeyProvider.providerName,
                                                            keyIds: keyIds, wrappedKeySize: provider.wrappedKeySizeBound)
        // The command is not recorded: it comes from the host at every use.
        let config = VolumeConfig(volumeId: volumeId, chunkSize: chunkSize, encryptionContext: pairs,
                                  keyProvider: KeyProviderConfig(type: ExecKeyProvider.providerName, keyIds: keyIds),
                                  headerLength: headerLength, formatVersion: formatVersion)
        try write(config, to: dir, keys: KeyService(provider: provider, keyIds: keyIds, audit: nil))
        print("Created kmsfs volume \(volumeId) in \(dir) (exec key service).")
        for (i, id) in keyIds.enumerated() { print("  key \(i + 1): \(id)") }
        print("Give the same key command to every mount (--key-command or KMSFS_KEY_COMMAND); the volume does not record it.")
    }

    private func initAWS(dir: String, volumeId: String, pairs: [String: String], settings: AWSSettings, arns: [String]) throws {
        let headerLength = VolumeConfig.uniformHeaderLength(volumeId: volumeId, userContext: pairs, provider: AWSKMSProvider.providerName,
                                                            keyIds: arns, wrappedKeySize: AWSKMSProvider(settings: settings).wrappedKeySizeBound)
        // Format 3 never names the endpoint: it comes from the host at every mount.
        let config = VolumeConfig(volumeId: volumeId, chunkSize: chunkSize, encryptionContext: pairs,
                                  keyProvider: KeyProviderConfig(type: AWSKMSProvider.providerName, keyIds: arns,
                                                                 region: settings.region, profile: profile,
                                                                 endpoint: formatVersion >= 3 ? nil : endpoint),
                                  headerLength: formatVersion >= 2 ? headerLength : nil, formatVersion: formatVersion)
        try write(config, to: dir, keys: KeyService(provider: AWSKMSProvider(settings: settings), keyIds: arns, audit: nil))
        if endpoint != nil && formatVersion >= 3 {
            printError("note: --endpoint was used for init only; a format 3 volume never records its KMS endpoint, so give it to every mount on this host (AWS_ENDPOINT_URL_KMS or AWS_ENDPOINT_URL)")
        }
        print("Created kmsfs volume \(volumeId) in \(dir) (AWS KMS).")
        for (i, arn) in arns.enumerated() { print("  key \(i + 1): \(arn)") }
    }

    private func initLocal(dir: String, volumeId: String, pairs: [String: String]) throws {
        let env = Paths.environment
        let path = keyFile.map(Paths.absolute) ?? LocalKeyFile.defaultPath(volumeId: volumeId, environment: env)
        let keyId: String
        let created: Bool
        let loaded: LocalMasterKey
        do {
            if keyFile != nil && Paths.exists(path) {
                if passphrase {
                    throw CLIError("\(path) exists: --passphrase protects a new key file (kmsfs passwd --key-file \(path) protects this one)")
                }
                loaded = try LocalKeyFile.load(path: path, passphrase: passphraseSource.reader)
                keyId = loaded.keyId
                created = false
            } else {
                let (key, master) = try LocalMasterKey.generate()
                var protection: LocalKeyFile.Protection? = nil
                if protectsKey {
                    protection = LocalKeyFile.Protection(passphrase: try passphraseSource.newPassphrase(for: path), logN: scryptLogN)
                }
                defer { protection?.passphrase.wipe() }
                try LocalKeyFile.write(master, to: path, keyId: key.keyId, protection: protection)
                loaded = key
                keyId = key.keyId
                created = true
            }
        } catch let e as KeyError {
            throw CLIError(e.message)
        }
        let headerLength = VolumeConfig.uniformHeaderLength(volumeId: volumeId, userContext: pairs, provider: LocalKeyProvider.providerName,
                                                            keyIds: [keyId], wrappedKeySize: LocalKeyProvider(keys: []).wrappedKeySizeBound)
        let config = VolumeConfig(volumeId: volumeId, chunkSize: chunkSize, encryptionContext: pairs,
                                  keyProvider: KeyProviderConfig(type: LocalKeyProvider.providerName, keyIds: [keyId],
                                                                 keyFile: keyFile == nil ? nil : path),
                                  headerLength: formatVersion >= 2 ? headerLength : nil, formatVersion: formatVersion)
        do {
            try write(config, to: dir, keys: KeyService(provider: LocalKeyProvider(keys: [loaded]), keyIds: [keyId], audit: nil))
        } catch {
            if created { unlink(path) }
            if let e = error as? KeyError { throw CLIError(e.message.isEmpty ? e.description : e.message) }
            throw error
        }
        print("Created kmsfs volume \(volumeId) in \(dir) (local key provider, key \(keyId)).")
        if created {
            print("New master key: \(path)")
        } else {
            print("Master key: \(path)")
        }
        print("Back this key file up and keep it secret: without it the files in \(dir) cannot be decrypted.")
    }
}

extension InitCommand {
    /// Format 3: makes the volume key, authenticates the config with it and, with encrypted names, gives the
    /// top directory its ID. Then writes the config, last: a volume exists once its config does.
    func write(_ config: VolumeConfig, to dir: String, keys: KeyService) throws {
        var config = config
        var dirIdFile: String? = nil
        if formatVersion >= 3 {
            let made: (keys: VolumeKeys, stored: VolumeKeyConfig)
            do {
                made = try keys.newVolumeKey(volumeId: config.volumeId)
            } catch let e as KeyError {
                throw CLIError("cannot make the volume key with key \(e.keyId): \(e.typeAndDetail)")
            }
            defer { made.keys.wipe() }
            config.volumeKey = made.stored
            config.names = plaintextNames ? VolumeConfig.plaintextNames : VolumeConfig.encryptedNames
            // Names are bound to what they name with a backing extended attribute, where the backing filesystem
            // has user attributes (tmpfs before Linux 6.6 does not, for one).
            if config.encryptsNames {
                if InitCommand.supportsUserAttributes(dir) {
                    config.nameBinding = VolumeConfig.linkNameBinding
                } else {
                    printError("note: \(dir) has no user extended attributes: names are encrypted but not bound to what they name (two entries of a directory whose names are exchanged in the backing store are not caught)")
                }
            }
            try config.authenticate(with: made.keys)
            if config.encryptsNames {
                let path = dir + "/" + NameCipher.directoryIdFile
                do {
                    try FileIO.writeFileAtomically(path, contents: try NameCipher(keys: made.keys).newDirectoryIdFile().contents,
                                                   mode: 0o444, exclusive: true)
                } catch {
                    throw CLIError("cannot write \(path): \(error)")
                }
                dirIdFile = path
            }
        }
        do {
            try FileIO.writeFileAtomically(VolumeConfig.path(in: dir), contents: try config.encoded(), mode: 0o644, exclusive: true)
        } catch {
            if let d = dirIdFile { unlink(d) }
            throw CLIError("cannot write \(VolumeConfig.path(in: dir)): \(error)")
        }
        // The host that made the volume trusts it as made.
        do {
            // The directory as every later command resolves it (symbolic links, "." and trailing "/" gone).
            try known.knownVolumes.record(VolumePin(config, directory: (try? Paths.resolve(dir)) ?? dir))
        } catch {
            printError("warning: the volume was created, but could not be pinned on this host (its first mount will pin it): \(error)")
        }
    }
}

extension InitCommand {
    /// True when user extended attributes can be set in directory `dir`.
    static func supportsUserAttributes(_ dir: String) -> Bool {
        var one: UInt8 = 1
        guard setxattr(dir, "user.kmsfs.probe", &one, 1, 0) == 0 else { return false }
        removexattr(dir, "user.kmsfs.probe")
        return true
    }
}

/// Parses repeated KEY=VALUE options.
func parseContext(_ items: [String]) throws -> [String: String] {
    var pairs: [String: String] = [:]
    for item in items {
        guard let eq = item.firstIndex(of: "="), eq != item.startIndex else {
            throw CLIError("--context wants KEY=VALUE, got \"\(item)\"")
        }
        let k = String(item[..<eq])
        if pairs[k] != nil { throw CLIError("--context key \"\(k)\" given twice") }
        pairs[k] = String(item[item.index(after: eq)...])
    }
    do {
        try EncryptionContext.validateUserPairs(pairs)
    } catch let e as FormatError {
        if case .invalidConfig(let why) = e { throw CLIError(why) }
        throw e
    }
    return pairs
}
