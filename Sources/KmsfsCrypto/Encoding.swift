/// Hexadecimal encoding of public bytes (identifiers, fingerprints).
public enum Hex {
    private static let digits = Array("0123456789abcdef".utf8)

    public static func encode<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for b in bytes {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Decodes lower- or upper-case hex; nil for odd length or a non-hex character.
    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 2 == 0 else { return nil }
        var out = [UInt8]()
        out.reserveCapacity(chars.count / 2)
        var i = 0
        while i < chars.count {
            guard let hi = value(chars[i]), let lo = value(chars[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }

    /// The value of one hex digit, or nil.
    public static func value(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

/// Base64url without padding (RFC 4648 §5): the encoding of encrypted names in the backing directory. Decoding
/// is strict: one text per byte string (no padding, no other characters, unused trailing bits zero), so two
/// backing names can never decode to the same ciphertext.
public enum Base64URL {
    public static func encodedLength(_ count: Int) -> Int { (count * 8 + 5) / 6 }

    /// Standard base64 with the URL-safe alphabet's last two characters and no padding.
    public static func encode(_ bytes: [UInt8]) -> String {
        let standard = Base64.encode(bytes).utf8.prefix(encodedLength(bytes.count))
        return String(decoding: standard.map { $0 == UInt8(ascii: "+") ? UInt8(ascii: "-") : $0 == UInt8(ascii: "/") ? UInt8(ascii: "_") : $0 },
                      as: UTF8.self)
    }

    public static func decode(_ text: String) -> [UInt8]? {
        var out = [UInt8]()
        var acc: UInt32 = 0
        var bits = 0
        var count = 0
        for c in text.utf8 {
            guard let v = Base64.sextet(c, UInt8(ascii: "-"), UInt8(ascii: "_")) else { return nil }
            acc = (acc << 6 | v) & 0xffff
            bits += 6
            count += 1
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
            }
        }
        // A length of 1 mod 4 is never produced; leftover bits must be zero.
        guard count % 4 != 1, acc & ((1 << UInt32(bits)) - 1) == 0 else { return nil }
        return out
    }
}
