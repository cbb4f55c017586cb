import ArgumentParser
import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Print the header of a backing file, or the settings of a volume, without unwrapping anything.",
        discussion: """
            Given CIPHERDIR, prints the volume's format version, ID, chunk size, names mode and keys, and whether \
            this host has pinned the volume and the config matches the pin. Given a \
            backing file, reads only its header (no key provider call, no key needed). --json prints \
            {"formatVersion", "fileId", "encryptionContext", "wrappedKeys": [{"provider", "keyId", "blob"}], \
            "chunkSize", "plaintextSize", "headerLength", "flags"} with the blob in base64.
            """
    )

    @Flag(name: .long, help: "Print JSON for scripts.")
    var json = false

    @OptionGroup var known: KnownVolumesOption

    @Argument(help: ArgumentHelp("A file in the encrypted directory, or the encrypted directory.", valueName: "backing-file"))
    var backingFile: String

    func run() throws {
        if Paths.isDirectory(backingFile) { return try volumeInfo() }
        let fd = open(backingFile, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw CLIError("\(backingFile): \(Errno.current)") }
        defer { close(fd) }
        let backingSize = try FileIO.size(fd)
        let header: FileHeader
        do {
            header = try FileOpener.readHeader(fd: fd)
        } catch {
            throw CLIError("\(backingFile): \(error)")
        }
        let size = header.layout.plaintextSize(backingSize: backingSize)
        if json {
            let object: [String: Any] = [
                "formatVersion": Int(FileHeader.version),
                "fileId": Hex.encode(header.fileId),
                "encryptionContext": header.context.pairs,
                "wrappedKeys": header.wrappedKeys.map { ["provider": $0.provider, "keyId": $0.keyId, "blob": Data($0.blob).base64EncodedString()] },
                "chunkSize": header.chunkSize,
                "plaintextSize": size,
                "headerLength": header.headerLength,
                "flags": Int(header.flags),
            ]
            return try printJSON(object)
        }
        print("file:           \(backingFile)")
        print("format version: \(FileHeader.version)")
        print("file ID:        \(Hex.encode(header.fileId))")
        print("chunk size:     \(header.chunkSize)")
        print("header length:  \(header.headerLength)")
        print("flags:          \(header.flags)\(header.layout.marksEmptyFile ? " (empty-file marker: an empty file's body is its marker)" : "")")
        print("plaintext size: \(size)")
        print("encryption context:")
        for (k, v) in header.context.sortedPairs { print("  \(k) = \(v)") }
        print("wrapped keys:")
        for (i, k) in header.wrappedKeys.enumerated() {
            print("  \(i + 1). \(k.provider) \(k.keyId) (\(k.blob.count)-byte blob)")
        }
        if !header.layout.isConsistent(backingSize: backingSize) {
            print("warning: the backing size \(backingSize) does not match any plaintext size: the file's tail is damaged")
        }
    }

    private func printJSON(_ object: [String: Any]) throws {
        let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes])
        print(String(decoding: data, as: UTF8.self))
    }

    /// The volume's settings, from its config alone.
    private func volumeInfo() throws {
        let cipher = try Paths.resolve(backingFile)
        let volume = try VolumeAccess.loadConfig(cipher)
        let knownVolumes = known.knownVolumes
        let pin: (state: String, detail: String)
        do {
            if let (p, line) = try knownVolumes.pin(of: volume.volumeId) {
                if let why = p.mismatch(with: volume) {
                    pin = ("mismatch", "MISMATCH: \(why) (\(knownVolumes.path) line \(line)); mount refuses it")
                } else {
                    pin = ("pinned", "pinned in \(knownVolumes.path) line \(line), and the config matches")
                }
            } else {
                pin = ("unpinned", "not pinned on this host (the first mount pins it)")
            }
        } catch {
            pin = ("unreadable", "\(error)")
        }
        let names = volume.formatVersion < 3 ? "plaintext (format \(volume.formatVersion) has no name encryption)"
                                             : (volume.encryptsNames ? "encrypted" : "plaintext")
        if json {
            let object: [String: Any] = [
                "formatVersion": volume.formatVersion, "volumeId": volume.volumeId, "chunkSize": volume.chunkSize,
                "names": volume.formatVersion < 3 ? "plaintext" : (volume.names ?? ""),
                "provider": volume.keyProvider.type, "keyIds": volume.keyProvider.keyIds,
                "configAuthenticated": volume.formatVersion >= 3, "encryptionContext": volume.encryptionContext,
                "pin": pin.state, "pinDetail": pin.detail,
            ]
            return try printJSON(object)
        }
        print("volume:         \(cipher)")
        print("format version: \(volume.formatVersion)")
        print("volume ID:      \(volume.volumeId)")
        print("chunk size:     \(volume.chunkSize)")
        print("names:          \(names)")
        print("config:         \(volume.formatVersion >= 3 ? "authenticated with the volume key (checked at mount)" : "not authenticated (format \(volume.formatVersion))")")
        print("key provider:   \(volume.keyProvider.type)")
        for (i, k) in volume.keyProvider.keyIds.enumerated() { print("  key \(i + 1): \(k)") }
        print("host pin:       \(pin.detail)")
    }
}
