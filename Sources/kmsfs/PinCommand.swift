import ArgumentParser
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

struct PinCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pin",
        abstract: "Pin a volume on this host: the key provider, keys and volume key its config must keep.",
        discussion: """
            Every command that uses a volume checks its config against this host's pin before any key is used, \
            and refuses a config that names another provider, a key the host has not pinned, another volume key \
            or (formats 1 and 2) another KMS endpoint. The first use of a volume pins it; kmsfs pin does so \
            explicitly, after unwrapping the volume key and authenticating the config. --update accepts a \
            changed config (after a kmsfs rewrap on another host, say); check the change first. --print prints \
            the pin line without recording it (copy it to the known-volumes file of other hosts, or use \
            --require-pinned there). --forget removes the pin of CIPHERDIR's volume (or of a volume ID).
            """
    )

    @Option(name: .long, help: ArgumentHelp("Local provider: read the master key from this file.", valueName: "path"))
    var keyFile: String?

    @OptionGroup var passphrase: PassphraseOptions

    @OptionGroup var keyCommand: KeyCommandOption

    @Flag(name: .long, help: "Replace a pin the config no longer matches.")
    var update = false

    @Flag(name: .long, help: "Print the volume's pin line; record nothing.")
    var print = false

    @Flag(name: .long, help: "Remove the pin of this volume (CIPHERDIR, or a 32-digit volume ID).")
    var forget = false

    @OptionGroup var known: KnownVolumesOption

    @Argument(help: ArgumentHelp("The encrypted directory.", valueName: "cipherdir"))
    var cipherDir: String

    func validate() throws {
        if [update, print, forget].filter({ $0 }).count > 1 { throw ValidationError("give at most one of --update, --print and --forget") }
    }

    func run() throws {
        let knownVolumes = known.knownVolumes
        if forget {
            let volumeId: String
            if cipherDir.count == 32, Hex.decode(cipherDir) != nil, !Paths.exists(cipherDir) {
                volumeId = cipherDir.lowercased()
            } else {
                volumeId = try VolumeAccess.loadConfig(try Paths.resolve(cipherDir)).volumeId
            }
            do {
                Swift.print(try knownVolumes.forget(volumeId) ? "Forgot volume \(volumeId)." : "Volume \(volumeId) was not pinned.")
            } catch {
                throw CLIError("\(error)")
            }
            return
        }
        let cipher = try Paths.resolve(cipherDir)
        let volume = try VolumeAccess.loadConfig(cipher)
        let existing: (pin: VolumePin, line: Int)?
        do {
            existing = try knownVolumes.pin(of: volume.volumeId)
        } catch {
            throw CLIError("\(error)")
        }
        let why = existing.flatMap { $0.pin.mismatch(with: volume) }
        if let why, !update {
            throw CLIError("volume \(volume.volumeId) is pinned differently (\(knownVolumes.path) line \(existing!.line)): \(why); give --update to accept the config as it is now")
        }
        if print, var (pin, _) = existing {
            // What this host trusts, not what the config now says; without this host's directory.
            pin.directory = nil
            Swift.print(pin.line)
            return
        }
        if existing != nil && why == nil && !update && !print {
            Swift.print("Volume \(volume.volumeId) is already pinned, and its config matches.")
            return
        }
        // Trust only a config its own volume key authenticates.
        if volume.formatVersion >= 3 {
            let keys = try VolumeAccess.keyService(volume, cipher: cipher, keyFile: keyFile, audit: nil, passphrase: passphrase, keyCommand: keyCommand)
            try VolumeAccess.openVolumeKey(volume, cipher: cipher, keys: keys).wipe()
        }
        let pin = VolumePin(volume, directory: cipher)
        if print {
            var shared = pin
            shared.directory = nil
            Swift.print(shared.line)
            return
        }
        do {
            try knownVolumes.record(pin)
        } catch {
            throw CLIError("\(error)")
        }
        Swift.print("Pinned volume \(volume.volumeId) in \(knownVolumes.path): \(pin.line)")
        if volume.formatVersion < 3 {
            Swift.print("Note: a format \(volume.formatVersion) volume has no volume key, so its config is pinned as it is, unauthenticated.")
        }
    }
}
