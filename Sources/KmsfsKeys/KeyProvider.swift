import KmsfsCrypto
import KmsfsFormat

/// What went wrong with a key operation, in the terms a caller acts on.
public enum KeyErrorKind: Sendable, Equatable {
    /// The caller is not allowed to use the key (AccessDeniedException, bad signature, expired credentials).
    case accessDenied
    /// The key is disabled, pending deletion, missing, or otherwise unusable.
    case keyUnavailable
    /// The wrapped key is not valid for this key and encryption context (tampered or wrong context).
    case invalidCiphertext
    /// The key service could not be reached or kept failing (network, 5xx, throttling after retries).
    case unreachable
    /// Anything else: bad configuration, malformed responses, local failures.
    case other
}

/// A failed key operation. `errorType` is the provider's error name (e.g. "AccessDeniedException");
/// `message` explains it. Neither ever contains key material.
public struct KeyError: Error, CustomStringConvertible, Sendable {
    public var kind: KeyErrorKind
    public var errorType: String
    public var keyId: String
    public var message: String
    /// Requests sent before giving up (retries included; 0 when none was), and the seconds they took.
    public var attempts = 1
    public var elapsed: Double = 0
    /// True when the call gave up because its deadline came.
    public var gaveUpAtDeadline = false
    /// Set when no call was made: this is the failure the key (or its endpoint) had this many seconds ago, and
    /// the next probe comes in `retryIn` seconds.
    public var remembered: Double? = nil
    public var retryIn: Double = 0
    /// The other keys tried for the same operation, and how each failed.
    public var alsoTried: [KeyError] = []

    public init(_ kind: KeyErrorKind, errorType: String, keyId: String, message: String) {
        self.kind = kind
        self.errorType = errorType
        self.keyId = keyId
        self.message = message
    }

    /// The KMS asked kmsfs to slow down.
    public var isThrottling: Bool {
        ["ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded", "TooManyRequestsException",
         "LimitExceededException", "RateLimited"].contains(errorType)
    }

    /// What kmsfs did about it: "not tried: ...", "gave up after 4 attempts in 5.0 s at the deadline", ...
    public var outcome: String {
        if let ago = remembered {
            return "not asked: it failed so \(KeyError.seconds(ago)) ago; next try in \(KeyError.seconds(retryIn))"
        }
        if gaveUpAtDeadline && attempts == 0 { return "not sent: the deadline came first (other calls held every slot, or the rate limit)" }
        if gaveUpAtDeadline { return "gave up at the deadline after \(attempts) attempt\(attempts == 1 ? "" : "s") in \(KeyError.seconds(elapsed))" }
        if attempts > 1 { return "gave up after \(attempts) attempts in \(KeyError.seconds(elapsed))" }
        return ""
    }

    static func seconds(_ s: Double) -> String {
        let tenths = Int((max(0, s) * 10).rounded())
        return "\(tenths / 10).\(tenths % 10) s"
    }

    /// "key: ErrorType (outcome)", for lists of the keys that failed.
    public var briefly: String { "\(keyId): \(errorType)\(outcome.isEmpty ? "" : " (\(outcome))")" }

    /// "message; outcome", the parenthesised detail of log lines.
    public var detail: String { [message, outcome].filter { !$0.isEmpty }.joined(separator: "; ") }

    /// "ErrorType (message; outcome)", or just the error type.
    public var typeAndDetail: String { "\(errorType)\(detail.isEmpty ? "" : " (\(detail))")" }

    /// "; also tried key B: Timeout (...)" for the other keys tried, or "".
    public var alsoTriedText: String {
        alsoTried.map { "; also tried key \($0.keyId): \($0.typeAndDetail)" }.joined()
    }

    public var description: String {
        "\(errorType) for key \(keyId)\(detail.isEmpty ? "" : ": " + detail)\(alsoTriedText)"
    }
}

/// A key management service that wraps data keys under master keys it keeps to itself.
///
/// Every call carries the encryption context the wrapped key is bound to; unwrapping with any other context
/// fails. Implementations are thread-safe and may block (network calls).
public protocol KeyProvider: Sendable {
    /// The provider name written into headers ("local", "aws-kms").
    var name: String { get }

    /// The most bytes a wrapped data key of this provider takes: new volumes size their uniform header length
    /// for it (see kmsfs-format(5)).
    var wrappedKeySizeBound: Int { get }

    /// A new 256-bit data key: its plaintext and its wrapping under `keyId` (KMS GenerateDataKey).
    func generateDataKey(keyId: String, context: EncryptionContext) throws -> (plaintext: SecureBytes, wrapped: WrappedKey)

    /// Wraps an existing data key under `keyId` (KMS Encrypt).
    func encrypt(dataKey: SecureBytes, keyId: String, context: EncryptionContext) throws -> WrappedKey

    /// Unwraps a data key (KMS Decrypt).
    func decrypt(_ wrapped: WrappedKey, context: EncryptionContext) throws -> SecureBytes

    /// Re-wraps a wrapped data key under `keyId` without exposing it to the caller (KMS ReEncrypt).
    func reEncrypt(_ wrapped: WrappedKey, toKeyId keyId: String, context: EncryptionContext) throws -> WrappedKey

    /// Checks that `keyId` exists and is usable, returning its canonical ID (KMS DescribeKey).
    func describeKey(_ keyId: String) throws -> String

    /// Where calls for `keyId` go (an endpoint): failures to reach it are remembered for every key behind it.
    func route(forKeyId keyId: String) -> String
}
