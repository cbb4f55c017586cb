/// kmsfs as a mount helper: mount(8) hands an fstab line of type `fuse.kmsfs` (or `kmsfs#CIPHERDIR` of type
/// `fuse`) to mount.fuse3, which runs `kmsfs CIPHERDIR MOUNTPOINT -o OPTIONS`. That form becomes
/// `kmsfs mount [options] CIPHERDIR MOUNTPOINT`: kmsfs's own options (`key_file=`, `audit_log=`, ...) become its
/// flags, options meant for mount(8) alone are dropped, and the rest go to FUSE with `-o`.
enum MountHelper {
    /// kmsfs options that take a value: `name=value` becomes `--flag value`.
    static let valued: [String: String] = [
        "key_file": "--key-file", "audit_log": "--audit-log", "log_file": "--log-file",
        "known_volumes": "--known-volumes", "key_pool": "--key-pool", "key_pool_age": "--key-pool-age",
        "kms_deadline": "--kms-deadline", "kms_max_inflight": "--kms-max-inflight", "kms_max_rate": "--kms-max-rate",
        "kms_probe_interval": "--kms-probe-interval", "max_inodes": "--max-inodes", "log_format": "--log-format",
        "passfile": "--passfile", "key_command": "--key-command",
    ]
    /// kmsfs options that are flags.
    static let flags: [String: String] = [
        "ro": "--read-only", "require_pinned": "--require-pinned", "allow_open_key_file": "--allow-open-key-file",
        "direct_io": "--direct-io", "writeback_cache": "--writeback-cache", "require_all_keys": "--require-all-keys",
        "debug": "--debug", "shared": "--shared",
    ]
    /// Options for mount(8) and fstab only, meaningless to the filesystem.
    /// `dev` and `suid` too: mount.fuse3 adds them to every line, and kmsfs mounts are always nosuid,nodev (as
    /// `kmsfs mount` is), since modes and device numbers come from a backing directory others may write.
    static let mountOnly: Set<String> = ["defaults", "rw", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "owner", "group", "comment", "dev", "suid"]

    /// The arguments for kmsfs's parser: the `mount` form when `arguments` (argv) is the helper form, else nil.
    static func arguments(_ argv: [String], subcommands: [String]) -> [String]? {
        guard argv.count >= 3, !argv[1].hasPrefix("-"), !argv[2].hasPrefix("-"), !subcommands.contains(argv[1]) else { return nil }
        // Exactly what mount.fuse3 passes after the two paths: -o OPTIONS (or -oOPTIONS), nothing else. Any other
        // command line (a mistyped subcommand, flags after the paths) is left to the parser, which names the error.
        var k = 3
        while k < argv.count {
            if argv[k] == "-o" && k + 1 < argv.count { k += 2 } else if argv[k].hasPrefix("-o") && argv[k].count > 2 { k += 1 } else { return nil }
        }
        var result = ["mount"]
        var fuse: [String] = []
        var i = 3
        while i < argv.count {
            var group: String? = nil
            if argv[i] == "-o", i + 1 < argv.count {
                group = argv[i + 1]
                i += 2
            } else if argv[i].hasPrefix("-o") {
                group = String(argv[i].dropFirst(2))
                i += 1
            } else {
                i += 1
            }
            for option in (group ?? "").split(separator: ",").map(String.init) where !option.isEmpty {
                let name = option.split(separator: "=", maxSplits: 1).first.map(String.init) ?? option
                if let flag = valued[name], let eq = option.firstIndex(of: "=") {
                    result += [flag, String(option[option.index(after: eq)...])]
                } else if let flag = flags[name], !option.contains("=") {
                    // A flag given a value (allow_open_key_file=no) is not taken as the flag: FUSE refuses it.
                    result.append(flag)
                } else if !mountOnly.contains(name) && !name.hasPrefix("x-") && !name.hasPrefix("comment=") {
                    fuse.append(option)
                }
            }
        }
        if !fuse.isEmpty { result += ["-o", fuse.joined(separator: ",")] }
        return result + ["--", argv[1], argv[2]]
    }
}
