import ArgumentParser
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

struct PasswdCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "passwd",
        abstract: "Change the passphrase of a local master key file (or add or remove one).",
        discussion: """
            The master key stays the same, so no file of the volume changes: only the key file is rewritten \
            (beside it, then renamed over it). Give the key file with --key-file, or the volume whose key file \
            it is. The current passphrase comes from --passfile, --extpass or the terminal; the new one from \
            --new-passfile, --new-extpass, or the terminal (asked twice). --remove stores the key unprotected.
            """
    )

    @Option(name: .long, help: ArgumentHelp("The key file (default: the volume's).", valueName: "path"))
    var keyFile: String?

    @OptionGroup var current: PassphraseOptions

    @Option(name: .long, help: ArgumentHelp("Read the new passphrase from the first line of this file.", valueName: "file"))
    var newPassfile: String?

    @Option(name: .long, help: ArgumentHelp("Run this command (/bin/sh -c) and read the new passphrase from the first line it prints.", valueName: "command"))
    var newExtpass: String?

    @Flag(name: .long, help: "Store the key without a passphrase.")
    var remove = false

    @Option(name: .long, help: ArgumentHelp("The scrypt cost of the new protection, log2 of N (r = 8, p = 1).", valueName: "n"))
    var scryptLogN: Int = LocalKeyFile.defaultLogN

    @Argument(help: ArgumentHelp("The encrypted directory whose key file it is (not needed with --key-file).", valueName: "cipherdir"))
    var cipherDir: String?

    func validate() throws {
        guard keyFile != nil || cipherDir != nil else { throw ValidationError("give the volume's directory, or --key-file") }
        guard !(newPassfile != nil && newExtpass != nil) else { throw ValidationError("give at most one of --new-passfile and --new-extpass") }
        guard !remove || (newPassfile == nil && newExtpass == nil) else { throw ValidationError("--remove takes no new passphrase") }
        guard Scrypt.isAcceptable(logN: scryptLogN, r: LocalKeyFile.defaultR, p: LocalKeyFile.defaultP) else {
            throw ValidationError("--scrypt-log-n must be from 10 to 19 (19: 512 MiB)")
        }
    }

    func run() throws {
        let path: String
        if let k = keyFile {
            path = Paths.absolute(k)
        } else {
            let cipher = try Paths.resolve(cipherDir!)
            let volume = try VolumeAccess.loadConfig(cipher)
            guard volume.keyProvider.type == LocalKeyProvider.providerName else {
                throw CLIError("\(cipher) uses \(volume.keyProvider.type): passphrases protect local key files only")
            }
            path = ProviderFactory.localKeyFilePath(volume: volume, options: .init(environment: Paths.environment))
        }
        let wasProtected = LocalKeyFile.isProtected(path: path)
        let master: SecureBytes
        let key: LocalMasterKey
        do {
            (key, master) = try LocalKeyFile.loadWithMaster(path: path, passphrase: current.reader)
        } catch let e as KeyError {
            throw CLIError(e.message)
        }
        defer { master.wipe() }
        var protection: LocalKeyFile.Protection? = nil
        if !remove {
            let next = try Passphrase.new(for: path, file: newPassfile.map(Paths.absolute), command: newExtpass)
            protection = LocalKeyFile.Protection(passphrase: next, logN: scryptLogN)
        }
        defer { protection?.passphrase.wipe() }
        do {
            try LocalKeyFile.rewrite(master, at: path, keyId: key.keyId, protection: protection)
        } catch let e as KeyError {
            throw CLIError(e.message)
        }
        if remove {
            print("\(path): key \(key.keyId) stored without a passphrase\(wasProtected ? "" : " (it had none)"); keep the file secret")
        } else {
            print("\(path): key \(key.keyId) now protected by the new passphrase (scrypt, N = 2^\(scryptLogN)); no file of the volume changed")
        }
    }
}
