import ArgumentParser

/// The kmsfs command line: one subcommand per file.
@main
struct Kmsfs: ParsableCommand {
    static let version = "0.1.0"

    /// Every command first makes sure a crash report cannot show memory contents (see CrashReports).
    static func main() {
        CrashReports.restrict()
        // Run by mount.fuse3 for an fstab line (see MountHelper): the mount form; else as given.
        let names = configuration.subcommands.compactMap { $0.configuration.commandName }
        main(MountHelper.arguments(CommandLine.arguments, subcommands: names + ["help"]))
    }

    static let configuration = CommandConfiguration(
        commandName: "kmsfs",
        abstract: "An encrypted FUSE filesystem with per-file data keys wrapped by a key management service.",
        discussion: """
            Create a volume with `kmsfs init CIPHERDIR`, mount it with `kmsfs mount CIPHERDIR MOUNTPOINT`, and work \
            with plaintext files in MOUNTPOINT while CIPHERDIR holds only ciphertext. See kmsfs(1) and kmsfs-format(5).
            """,
        version: "kmsfs \(version) (on-disk format 3; reads 1 to 3)",
        subcommands: [InitCommand.self, MountCommand.self, UnmountCommand.self, InfoCommand.self,
                      RewrapCommand.self, DecryptCommand.self, VerifyCommand.self, PathCommand.self, PinCommand.self, RebindCommand.self,
                      PasswdCommand.self, StatusCommand.self]
    )
}

/// A failure the user can act on: printed as one line, exit status 1.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}
