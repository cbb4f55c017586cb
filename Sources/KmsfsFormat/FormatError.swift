/// Why on-disk data was rejected. Messages name structures, never key material or plaintext.
public enum FormatError: Error, Equatable, CustomStringConvertible {
    case notAKmsfsFile
    case unsupportedVersion(Int)
    case truncatedHeader
    case malformedHeader(String)
    case headerAuthenticationFailed
    case keyCommitmentMismatch
    case invalidConfig(String)
    /// A new header does not fit the volume's uniform header length.
    case headerTooLong(needed: Int, length: Int)

    public var description: String {
        switch self {
        case .notAKmsfsFile: return "not a kmsfs file (bad magic)"
        case .unsupportedVersion(let v): return "unsupported format version \(v)"
        case .truncatedHeader: return "truncated header"
        case .malformedHeader(let why): return "malformed header: \(why)"
        case .headerAuthenticationFailed: return "header authentication failed (header was modified)"
        case .keyCommitmentMismatch: return "the unwrapped data key does not match the header's key commitment"
        case .invalidConfig(let why): return "invalid volume config: \(why)"
        case .headerTooLong(let needed, let length): return "the header needs \(needed) bytes, more than the volume's \(length)"
        }
    }
}
