/// Reading /proc/self/mounts and /proc/self/mountinfo.
public enum MountTable {
    /// A path field as those files write it: space, tab, newline and backslash become \ooo octal escapes.
    public static func unescape<S: StringProtocol>(_ field: S) -> String {
        var out: [UInt8] = []
        let b = Array(field.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 3 < b.count,
               let v = UInt8(String(decoding: b[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
