import ArgumentParser
import Glibc
import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

struct RebindCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebind",
        abstract: "Bind every file and directory to the name it has now (after a restore that lost extended attributes).",
        discussion: """
            In a format 3 volume with name binding, every file and directory carries the tags of its names in \
            the backing extended attribute user.kmsfs.names, and one without its name's tag gives EIO. A copy \
            of the backing directory that dropped extended attributes (cp without -a, rsync without -X, many sync \
            tools) loses them all. rebind walks the volume and writes each node's tags for the names it has now, \
            trusting them: run it only on a tree you trust to be what you backed up. The volume must not be \
            mounted.
            """
    )

    @OptionGroup var volume: OfflineOptions

    func run() throws {
        let (cipher, _, names) = try volume.open()
        guard names.volume.bindsNames else {
            print("\(cipher) does not bind names: nothing to do")
            return
        }
        let (dirFd, lease) = try VolumeAccess.holdExclusively(cipher, purpose: "rebind")
        defer {
            lease.release()
            close(dirFd)
        }
        do {
            // Another host took the volume: stop before writing tags from an old walk over its changes.
            try lease.startRenewing { why in
                printError("kmsfs rebind: \(why); stopping")
                _exit(3)
            }
        } catch {
            throw CLIError("cannot start renewing the lease of \(cipher): \(error)")
        }
        var skipped = 0
        let count: Int
        do {
            count = try names.rebind { backing in
                printError("\(backing): does not decrypt in its directory; left alone")
                skipped += 1
            }
        } catch {
            throw CLIError("cannot rebind \(cipher): \(error)")
        }
        print("\(count) files and directories bound to their current names\(skipped > 0 ? ", \(skipped) entries left alone" : "")")
        if skipped > 0 { throw ExitCode(1) }
    }
}
