import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// What a host trusts about a volume, kept outside the volume (as ssh's known_hosts keeps host keys): the key
/// provider, the wrapping keys it may use, the volume key's commitment and, for format 1 and 2 volumes, the KMS
/// endpoint. Whoever can write CIPHERDIR could otherwise name their own keys, endpoint or volume key in
/// `kmsfs.conf` and MAC it with a volume key they chose; a pinned host refuses that before any KMS call.
public struct VolumePin: Equatable, Sendable {
    public var volumeId: String
    public var provider: String
    /// The keys the volume may name (the config's keys must be among them).
    public var keyIds: [String]
    /// Lower-case hex of the volume key commitment; nil for format 1 and 2 volumes, which have no volume key.
    public var commitment: String?
    /// Format 1 and 2: the endpoint the config names, if any (format 3 never takes it from the volume).
    public var endpoint: String?
    /// AWS KMS: the region and shared-config profile the config names (a profile can carry its own endpoint or
    /// credential process, so another one is another KMS as far as trust goes).
    public var region: String?
    public var profile: String?
    /// The encrypted directory the volume was pinned at: another volume ID found there is a config replaced as
    /// a whole (a new volume there is accepted only explicitly, with `kmsfs pin`).
    public var directory: String?

    public init(volumeId: String, provider: String, keyIds: [String], commitment: String?, endpoint: String?,
                region: String? = nil, profile: String? = nil, directory: String? = nil) {
        self.region = region
        self.profile = profile
        self.volumeId = volumeId.lowercased()
        self.provider = provider
        self.keyIds = keyIds
        self.commitment = commitment
        self.endpoint = endpoint
        self.directory = directory
    }

    /// The pin a volume config asks for, at encrypted directory `directory`.
    public init(_ config: VolumeConfig, directory: String? = nil) {
        self.init(volumeId: config.volumeId, provider: config.keyProvider.type, keyIds: config.keyProvider.keyIds,
                  commitment: config.formatVersion >= 3 ? config.volumeKey?.commitment.lowercased() : nil,
                  endpoint: config.formatVersion >= 3 ? nil : config.keyProvider.endpoint,
                  region: config.keyProvider.region, profile: config.keyProvider.profile, directory: directory)
    }

    /// The line that stores this pin:
    /// `VOLUME-ID provider=P keys=K1,K2 commitment=HEX|none [endpoint=URL] [dir=PERCENT-ENCODED-PATH]`.
    public var line: String {
        var s = "\(volumeId) provider=\(provider) keys=\(keyIds.joined(separator: ",")) commitment=\(commitment ?? "none")"
        if let e = endpoint { s += " endpoint=\(e)" }
        if let r = region { s += " region=\(r)" }
        if let p = profile { s += " profile=\(p)" }
        if let d = directory { s += " dir=\(VolumePin.percentEncode(d))" }
        return s
    }

    /// A path with every byte outside printable ASCII, and space, "%" and ",", as %XX.
    static func percentEncode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            if b > 0x20 && b < 0x7f && b != UInt8(ascii: "%") && b != UInt8(ascii: ",") {
                out.append(Character(UnicodeScalar(b)))
            } else {
                out += "%" + Hex.encode([b]).uppercased()
            }
        }
        return out
    }

    static func percentDecode(_ s: String) -> String? {
        var bytes: [UInt8] = []
        var i = s.utf8.startIndex
        let u = s.utf8
        while i != u.endIndex {
            if u[i] == UInt8(ascii: "%") {
                let a = u.index(after: i)
                guard a != u.endIndex, u.index(after: a) != u.endIndex,
                      let v = Hex.decode(String(decoding: [u[a], u[u.index(after: a)]], as: UTF8.self)) else { return nil }
                bytes += v
                i = u.index(i, offsetBy: 3)
            } else {
                bytes.append(u[i])
                i = u.index(after: i)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    /// Parses a stored line; nil if it is not one.
    public init?(line: String) {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard fields.count >= 4, Hex.decode(fields[0])?.count == 16, fields[0] == fields[0].lowercased() else { return nil }
        var values: [String: String] = [:]
        for f in fields.dropFirst() {
            guard let eq = f.firstIndex(of: "="), values[String(f[..<eq])] == nil else { return nil }
            values[String(f[..<eq])] = String(f[f.index(after: eq)...])
        }
        guard let p = values["provider"], !p.isEmpty, let k = values["keys"], let c = values["commitment"],
              Set(values.keys).isSubset(of: ["provider", "keys", "commitment", "endpoint", "region", "profile", "dir"]) else { return nil }
        var directory: String? = nil
        if let d = values["dir"] {
            guard let decoded = VolumePin.percentDecode(d), decoded.hasPrefix("/") else { return nil }
            directory = decoded
        }
        let keys = k.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard !keys.contains(where: \.isEmpty) else { return nil }
        if c != "none" && Hex.decode(c)?.count != 32 { return nil }
        self.init(volumeId: fields[0], provider: p, keyIds: keys, commitment: c == "none" ? nil : c.lowercased(),
                  endpoint: values["endpoint"], region: values["region"], profile: values["profile"], directory: directory)
    }

    /// True when every field can be written on one line (key IDs and endpoints never hold spaces or commas).
    var isStorable: Bool {
        let all = [provider] + keyIds + [endpoint, region, profile].compactMap { $0 }
        return all.allSatisfy { s in !s.isEmpty && !s.utf8.contains { $0 <= 0x20 || $0 == UInt8(ascii: ",") || $0 == 0x7f } }
    }

    /// Why a volume config may not be used under this pin, or nil when it may: the same provider, keys among the
    /// pinned ones, the same volume key and endpoint.
    public func mismatch(with config: VolumeConfig) -> String? {
        let asked = VolumePin(config)
        if asked.provider != provider {
            return "its config names key provider \(asked.provider), but this host pinned \(provider)"
        }
        let unknown = asked.keyIds.filter { !keyIds.contains($0) }
        if !unknown.isEmpty {
            return "its config names key\(unknown.count == 1 ? "" : "s") \(unknown.joined(separator: ", ")), which this host has not pinned (pinned: \(keyIds.joined(separator: ", ")))"
        }
        if asked.commitment != commitment {
            if commitment != nil && asked.commitment == nil {
                return "its config says format \(config.formatVersion), without a volume key, but this host pinned a format 3 volume with one (a downgraded config)"
            }
            return "its volume key is not the one this host pinned (the key commitment differs: the config was replaced)"
        }
        if asked.endpoint != endpoint {
            return "its config names KMS endpoint \(asked.endpoint ?? "(none)"), but this host pinned \(endpoint ?? "(none)")"
        }
        // Pins written before region and profile were pinned have neither: nothing to compare.
        if (region != nil || profile != nil) && (asked.region != region || asked.profile != profile) {
            return "its config names region \(asked.region ?? "(none)") and profile \(asked.profile ?? "(none)"), but this host pinned \(region ?? "(none)") and \(profile ?? "(none)")"
        }
        return nil
    }
}

/// The host's file of pinned volumes: one `VolumePin` line per volume, `#` comments and blank lines allowed.
/// Written atomically under a lock file beside it; refused if other users could write it.
public struct KnownVolumes: Sendable {
    public let path: String

    public init(path: String) { self.path = path }

    /// `$KMSFS_KNOWN_VOLUMES`, else `$XDG_CONFIG_HOME/kmsfs/known-volumes` (`~/.config` by default), beside
    /// the local provider's default key files.
    public static func defaultPath(environment: [String: String]) -> String {
        if let p = environment["KMSFS_KNOWN_VOLUMES"], p.hasPrefix("/") { return p }
        let base: String
        if let x = environment["XDG_CONFIG_HOME"], x.hasPrefix("/") {
            base = x
        } else {
            base = (environment["HOME"] ?? "/root") + "/.config"
        }
        return base + "/kmsfs/known-volumes"
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// The pin of `volumeId` and its line number, or nil when the host has none.
    public func pin(of volumeId: String) throws(Failure) -> (pin: VolumePin, line: Int)? {
        let id = volumeId.lowercased()
        for (n, entry) in try entries().enumerated() {
            if case .pin(let p) = entry, p.volumeId == id { return (p, lineNumber(n)) }
        }
        return nil
    }

    /// The pin recorded for encrypted directory `directory`, if any.
    public func pin(at directory: String) throws(Failure) -> (pin: VolumePin, line: Int)? {
        for (n, entry) in try entries().enumerated() {
            if case .pin(let p) = entry, p.directory == directory { return (p, lineNumber(n)) }
        }
        return nil
    }

    /// Records `pin`, replacing the volume's earlier pin if there is one (keeping the directory it was pinned at
    /// when `pin` names none). Another volume's pin at the same directory loses its directory: that directory
    /// now holds this volume.
    public func record(_ pin: VolumePin) throws(Failure) {
        guard pin.isStorable, VolumePin(line: pin.line) == pin else {
            throw Failure(description: "cannot pin volume \(pin.volumeId): a key ID or endpoint holds a space or comma")
        }
        try update { entries in
            var pin = pin
            for i in entries.indices {
                guard case .pin(var p) = entries[i] else { continue }
                if p.volumeId == pin.volumeId {
                    if pin.directory == nil { pin.directory = p.directory }
                } else if pin.directory != nil && p.directory == pin.directory {
                    p.directory = nil
                    entries[i] = .pin(p)
                }
            }
            if let i = entries.firstIndex(where: { if case .pin(let p) = $0 { return p.volumeId == pin.volumeId } else { return false } }) {
                entries[i] = .pin(pin)
            } else {
                entries.append(.pin(pin))
            }
        }
    }

    /// Removes the pin of `volumeId`; says whether there was one.
    public func forget(_ volumeId: String) throws(Failure) -> Bool {
        var found = false
        try update { entries in
            let before = entries.count
            entries.removeAll { if case .pin(let p) = $0 { return p.volumeId == volumeId } else { return false } }
            found = entries.count != before
        }
        return found
    }

    // MARK: - the file

    private enum Entry {
        case pin(VolumePin)
        case other(String)
    }

    private func lineNumber(_ index: Int) -> Int { index + 1 }

    private func entries() throws(Failure) -> [Entry] {
        let bytes: [UInt8]
        do {
            let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
            if fd < 0 {
                if errno == ENOENT { return [] }
                throw Errno.current
            }
            defer { close(fd) }
            var st = stat()
            try syscall { fstat(fd, &st) }
            guard st.st_mode & S_IFMT == S_IFREG else { throw Failure(description: "\(path) is not a regular file") }
            // As ssh does with known_hosts and keys: a trust file others may change is no anchor.
            guard st.st_mode & 0o022 == 0, st.st_uid == 0 || st.st_uid == getuid() else {
                throw Failure(description: "\(path) may be changed by other users (mode \(String(st.st_mode & 0o777, radix: 8)), owner \(st.st_uid)): refusing to trust it; make it owned by you and not group- or world-writable")
            }
            // The contents of the very file whose owner and mode were checked.
            var all = [UInt8](repeating: 0, count: Int(st.st_size) + 1)
            var got = 0
            while got < all.count {
                let n = try all.withUnsafeMutableBytes { try FileIO.pread(fd, $0.baseAddress! + got, count: $0.count - got, offset: got) }
                if n == 0 { break }
                got += n
                if got == all.count { all += [UInt8](repeating: 0, count: all.count) }
            }
            bytes = Array(all[0..<got])
        } catch let f as Failure {
            throw f
        } catch {
            throw Failure(description: "cannot read \(path): \(error)")
        }
        var result: [Entry] = []
        for (n, raw) in String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = String(raw)
            let trimmed = line.trimmingCharacters(in: [" ", "\t", "\r"])
            if trimmed.isEmpty || trimmed.hasPrefix("#") {
                if n < bytes.count { result.append(.other(line)) }
                continue
            }
            guard let p = VolumePin(line: trimmed) else {
                throw Failure(description: "\(path) line \(n + 1) is not a volume pin (VOLUME-ID provider=P keys=K1,K2 commitment=HEX|none [endpoint=URL])")
            }
            result.append(.pin(p))
        }
        // The split leaves one empty string after the final newline.
        if case .other(let last) = result.last, last.isEmpty { result.removeLast() }
        return result
    }

    /// Reads, changes and rewrites the file under an exclusive lock on `<path>.lock`.
    private func update(_ change: (inout [Entry]) -> Void) throws(Failure) {
        do {
            let dir = FileIO.directoryName(path)
            try FileIO.makeDirectories(dir, mode: 0o700)
            let lockFd = try syscall { open(path + ".lock", O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600) }
            defer { close(lockFd) }
            try syscall { flock(lockFd, LOCK_EX) }
            var entries = try entries()
            change(&entries)
            var text = ""
            if entries.isEmpty || { if case .other(let l) = entries[0] { return !l.hasPrefix("#") } else { return true } }() {
                text = "# kmsfs known volumes: the provider, keys and volume key each volume must have on this host (see kmsfs(1)).\n"
            }
            for e in entries {
                switch e {
                case .pin(let p): text += p.line + "\n"
                case .other(let l): text += l + "\n"
                }
            }
            try FileIO.writeFileAtomically(path, contents: Array(text.utf8), mode: 0o644)
        } catch let f as Failure {
            throw f
        } catch {
            throw Failure(description: "cannot update \(path): \(error)")
        }
    }
}
