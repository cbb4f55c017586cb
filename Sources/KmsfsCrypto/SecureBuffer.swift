/// A growable byte buffer in locked memory, for protocol messages that carry key material (a KMS response
/// with a plaintext data key, a request that sends one). Growing copies into a larger locked buffer and
/// wipes the old one; the contents are wiped when the buffer is released.
public final class SecureBuffer: @unchecked Sendable {
    private var storage: SecureBytes
    public private(set) var count = 0

    public init(capacity: Int = 4096) throws {
        storage = try SecureBytes(count: max(capacity, 64))
    }

    public func append(_ bytes: UnsafeRawBufferPointer) throws {
        guard bytes.count > 0 else { return }
        try reserve(count + bytes.count)
        storage.withUnsafeMutableBytes { s in
            (s.baseAddress! + count).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        }
        count += bytes.count
    }

    public func append(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try append($0) }
    }

    public func append(_ text: String) throws {
        try append(Array(text.utf8))
    }

    /// Appends the standard base64 encoding of a secret.
    public func appendBase64(of secret: SecureBytes) throws {
        let n = (secret.count + 2) / 3 * 4
        try reserve(count + n)
        secret.withUnsafeBytes { src in
            storage.withUnsafeMutableBytes { dst in
                Base64.encode(src, into: dst.baseAddress! + count)
            }
        }
        count += n
    }

    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try storage.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
    }

    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try storage.withUnsafeMutableBytes { try body(UnsafeMutableRawBufferPointer(rebasing: $0[0..<count])) }
    }

    private func reserve(_ needed: Int) throws {
        guard needed > storage.count else { return }
        var capacity = storage.count
        while capacity < needed { capacity *= 2 }
        let bigger = try SecureBytes(count: capacity)
        storage.withUnsafeBytes { old in
            bigger.withUnsafeMutableBytes { new in new.baseAddress!.copyMemory(from: old.baseAddress!, byteCount: count) }
        }
        storage = bigger  // the old storage is wiped when released
    }
}

/// Standard base64 (RFC 4648) working on raw memory, so secrets can be encoded and decoded in place
/// without passing through Swift strings.
public enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    /// Writes (count + 2) / 3 * 4 characters.
    public static func encode(_ src: UnsafeRawBufferPointer, into dst: UnsafeMutableRawPointer) {
        var o = 0
        var i = 0
        while i < src.count {
            let b0 = UInt32(src[i])
            let b1 = i + 1 < src.count ? UInt32(src[i + 1]) : 0
            let b2 = i + 2 < src.count ? UInt32(src[i + 2]) : 0
            let v = b0 << 16 | b1 << 8 | b2
            dst.storeBytes(of: alphabet[Int(v >> 18 & 63)], toByteOffset: o, as: UInt8.self)
            dst.storeBytes(of: alphabet[Int(v >> 12 & 63)], toByteOffset: o + 1, as: UInt8.self)
            dst.storeBytes(of: i + 1 < src.count ? alphabet[Int(v >> 6 & 63)] : UInt8(ascii: "="), toByteOffset: o + 2, as: UInt8.self)
            dst.storeBytes(of: i + 2 < src.count ? alphabet[Int(v & 63)] : UInt8(ascii: "="), toByteOffset: o + 3, as: UInt8.self)
            i += 3
            o += 4
        }
    }

    public static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8](repeating: 0, count: (bytes.count + 2) / 3 * 4)
        bytes.withUnsafeBytes { src in out.withUnsafeMutableBytes { encode(src, into: $0.baseAddress!) } }
        return String(decoding: out, as: UTF8.self)
    }

    /// Decodes base64 text (padding optional, "\/" accepted as "/") into `dst`; returns the number of bytes
    /// written, or nil if the text is not base64 or does not fit.
    public static func decode(_ text: UnsafeRawBufferPointer, into dst: UnsafeMutableRawBufferPointer) -> Int? {
        var acc: UInt32 = 0
        var bits = 0
        var n = 0
        var padding = false
        for c in text {
            if c == UInt8(ascii: "\\") { continue }
            if c == UInt8(ascii: "=") {
                padding = true
                continue
            }
            guard let v = sextet(c, UInt8(ascii: "+"), UInt8(ascii: "/")), !padding else { return nil }
            acc = acc << 6 | v
            bits += 6
            if bits >= 8 {
                bits -= 8
                guard n < dst.count else { return nil }
                dst[n] = UInt8(truncatingIfNeeded: acc >> UInt32(bits))
                n += 1
            }
        }
        acc = 0
        return n
    }

    /// The 6-bit value of a base64 character, with `c62` and `c63` the alphabet's last two ("+/" or "-_").
    static func sextet(_ c: UInt8, _ c62: UInt8, _ c63: UInt8) -> UInt32? {
        switch c {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): return UInt32(c - UInt8(ascii: "A"))
        case UInt8(ascii: "a")...UInt8(ascii: "z"): return UInt32(c - UInt8(ascii: "a")) + 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return UInt32(c - UInt8(ascii: "0")) + 52
        case c62: return 62
        case c63: return 63
        default: return nil
        }
    }

    public static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        var out = [UInt8](repeating: 0, count: chars.count / 4 * 3 + 3)
        let n = chars.withUnsafeBytes { t in out.withUnsafeMutableBytes { decode(t, into: $0) } }
        guard let n else { return nil }
        return Array(out[0..<n])
    }
}
