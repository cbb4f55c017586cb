import CLibCrypto
import CSystem

public enum CryptoError: Error, CustomStringConvertible {
    case randomFailed
    case openSSL(String)

    public var description: String {
        switch self {
        case .randomFailed: return "the OpenSSL random generator failed"
        case .openSSL(let what): return "OpenSSL failed: \(what)"
        }
    }
}

/// The OpenSSL CSPRNG (`RAND_bytes`): file IDs, volume IDs and fresh keys; and the kernel's for nonces.
public enum SecureRandom {
    public static func fill(_ buffer: UnsafeMutableRawBufferPointer) throws {
        var offset = 0
        while offset < buffer.count {
            let n = min(buffer.count - offset, Int(Int32.max))
            guard RAND_bytes(buffer.baseAddress!.advanced(by: offset).assumingMemoryBound(to: UInt8.self), Int32(n)) == 1 else {
                throw CryptoError.randomFailed
            }
            offset += n
        }
    }

    /// Fills `buffer` with public random values that must never repeat (AES-GCM nonces), from the kernel's
    /// CSPRNG through a per-thread buffer (`kmsfs_random_public`): a write draws its nonces for a fraction of
    /// what a `RAND_bytes` call costs. Never for keys.
    public static func fillNonces(_ buffer: UnsafeMutableRawBufferPointer) throws {
        guard buffer.count > 0 else { return }
        guard kmsfs_random_public(buffer.baseAddress!, buffer.count) == 0 else { throw CryptoError.randomFailed }
    }

    /// Public random bytes (identifiers, nonces); never use this for keys.
    public static func bytes(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { b in try fill(b) }
        return out
    }
}
