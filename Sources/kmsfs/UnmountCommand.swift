import ArgumentParser
import Glibc
import KmsfsSystem

struct UnmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "unmount",
        abstract: "Unmount a kmsfs mount.",
        discussion: "The daemon then wipes every data key still in memory and exits. A busy mount is refused unless --lazy."
    )

    @Flag(name: [.customShort("z"), .long], help: "Detach now even if busy; the mount goes once no longer in use.")
    var lazy = false

    @Argument(help: ArgumentHelp("Where the volume is mounted.", valueName: "mountpoint"))
    var mountPoint: String

    func run() throws {
        let target = Paths.absolute(mountPoint)
        let mounts = (try? FileIO.readFile("/proc/self/mounts")).map { String(decoding: $0, as: UTF8.self) } ?? ""
        let ours = mounts.split(separator: "\n").contains { line in
            let f = line.split(separator: " ")
            return f.count > 2 && MountTable.unescape(String(f[1])) == target && f[2] == "fuse.kmsfs"
        }
        guard ours else { throw CLIError("\(target) is not a kmsfs mount") }
        let (status, stderr) = try Spawn.run("fusermount3", ["fusermount3", "-u"] + (lazy ? ["-z"] : []) + [target])
        if status != 0 {
            let why = stderr.split(separator: "\n").first.map(String.init) ?? "fusermount3 exited with status \(status)"
            throw CLIError("cannot unmount \(target): \(why)")
        }
    }
}
