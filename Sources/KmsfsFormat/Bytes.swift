/// Big-endian encoding helpers for the on-disk structures.
struct ByteWriter {
    private(set) var bytes: [UInt8] = []

    init(capacity: Int = 256) { bytes.reserveCapacity(capacity) }

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { bytes.append(UInt8(v >> 8)); bytes.append(UInt8(v & 0xff)) }
    mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8((v >> UInt32(s)) & 0xff)) } }
    mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((v >> UInt64(s)) & 0xff)) } }
    mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }

    /// A string or byte string with a 16-bit length prefix.
    mutating func lengthPrefixed16(_ v: [UInt8]) { u16(UInt16(v.count)); raw(v) }
    /// A string or byte string with an 8-bit length prefix.
    mutating func lengthPrefixed8(_ v: [UInt8]) { u8(UInt8(v.count)); raw(v) }

    mutating func setU32(_ v: UInt32, at offset: Int) {
        for i in 0..<4 { bytes[offset + i] = UInt8((v >> UInt32(24 - 8 * i)) & 0xff) }
    }
}

struct ByteReader {
    let bytes: [UInt8]
    private(set) var offset: Int

    init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }

    var remaining: Int { bytes.count - offset }

    mutating func u8() throws -> UInt8 { try need(1); defer { offset += 1 }; return bytes[offset] }
    mutating func u16() throws -> UInt16 {
        try need(2); defer { offset += 2 }
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }
    mutating func u32() throws -> UInt32 {
        try need(4); defer { offset += 4 }
        return (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(bytes[offset + $1]) }
    }
    mutating func raw(_ n: Int) throws -> [UInt8] {
        try need(n); defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }
    mutating func lengthPrefixed16() throws -> [UInt8] { try raw(Int(try u16())) }
    mutating func lengthPrefixed8() throws -> [UInt8] { try raw(Int(try u8())) }

    private func need(_ n: Int) throws {
        if remaining < n { throw FormatError.truncatedHeader }
    }
}

extension UInt64 {
    /// Big-endian bytes.
    var bigEndianBytes: [UInt8] { (0..<8).map { UInt8((self >> UInt64(56 - 8 * $0)) & 0xff) } }
}
