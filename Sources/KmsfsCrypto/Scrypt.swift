import CLibCrypto
import Glibc

/// scrypt (RFC 7914) through OpenSSL: the key derivation of passphrase-protected key files.
public enum Scrypt {
    /// Parameters a reader accepts: N = 2^logN with logN in 10...22 and below 16 * r (RFC 7914's N < 2^(128r/8)),
    /// r in 1...32, p in 1...16, and at most 1 GiB of memory (128 * r * (N + p + 2) bytes), so a key file cannot
    /// make kmsfs allocate without bound. With r = 8 that allows logN 10 to 19.
    public static func isAcceptable(logN: Int, r: Int, p: Int) -> Bool {
        (10...22).contains(logN) && (1...32).contains(r) && (1...16).contains(p) && logN < 16 * r
            && memory(logN: logN, r: r, p: p) <= 1 << 30
    }

    /// The memory scrypt needs: 128 * r * (N + p + 2) bytes.
    public static func memory(logN: Int, r: Int, p: Int) -> Int {
        128 * r * ((1 << logN) + p + 2)
    }

    /// A 32-byte key from `passphrase` and `salt`, in locked memory.
    public static func deriveKey(passphrase: SecureBytes, salt: [UInt8], logN: Int, r: Int, p: Int) throws -> SecureBytes {
        guard isAcceptable(logN: logN, r: r, p: p), passphrase.count > 0 else { throw CryptoError.openSSL("scrypt parameters") }
        let key = try SecureBytes(count: 32)
        let ok = passphrase.withUnsafeBytes { pw in
            salt.withUnsafeBytes { s in
                key.withUnsafeMutableBytes { k in
                    EVP_PBE_scrypt(pw.baseAddress!.assumingMemoryBound(to: CChar.self), pw.count,
                                   s.baseAddress?.assumingMemoryBound(to: UInt8.self), s.count,
                                   UInt64(1) << UInt64(logN), UInt64(r), UInt64(p),
                                   UInt64(memory(logN: logN, r: r, p: p) + (1 << 20)),
                                   k.baseAddress!.assumingMemoryBound(to: UInt8.self), 32) == 1
                }
            }
        }
        guard ok else {
            key.wipe()
            throw CryptoError.openSSL("scrypt (out of memory?)")
        }
        return key
    }
}
