import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// AWS KMS as a key provider: data keys from GenerateDataKey, wrapped under more keys with Encrypt, unwrapped
/// with Decrypt and re-wrapped with ReEncrypt, every call carrying the file's encryption context.
/// Wrapped keys are stored with the key's ARN, and each call goes to the region in that ARN.
public final class AWSKMSProvider: KeyProvider {
    public static let providerName = "aws-kms"
    public let name = AWSKMSProvider.providerName
    /// AWS KMS's CiphertextBlob of a 256-bit data key under a symmetric key is 184 bytes; room is left for more.
    public let wrappedKeySizeBound = 256
    public let client: KMSClient

    public init(settings: AWSSettings, policy: KMSPolicy = .defaults) {
        client = KMSClient(settings: settings, policy: policy)
    }

    public func route(forKeyId keyId: String) -> String {
        client.settings.kmsEndpoint(region: (try? client.settings.region(forKey: keyId)) ?? "")
    }

    public func describeKey(_ keyId: String) throws -> String {
        let d = try client.describeKey(keyId)
        guard d.state == "Enabled" else {
            throw KeyError(.keyUnavailable, errorType: d.state == "Disabled" ? "DisabledException" : "KMSInvalidStateException",
                           keyId: d.arn, message: "the key is \(d.state)")
        }
        guard d.usage == "ENCRYPT_DECRYPT", d.spec == "SYMMETRIC_DEFAULT" else {
            throw KeyError(.keyUnavailable, errorType: "InvalidKeyUsageException", keyId: d.arn,
                           message: "kmsfs needs a symmetric encryption key (ENCRYPT_DECRYPT, SYMMETRIC_DEFAULT), not \(d.usage) \(d.spec)")
        }
        return d.arn
    }

    public func generateDataKey(keyId: String, context: EncryptionContext) throws -> (plaintext: SecureBytes, wrapped: WrappedKey) {
        let (plaintext, blob, arn) = try client.generateDataKey(keyId: keyId, context: context)
        return (plaintext, WrappedKey(provider: name, keyId: arn, blob: blob))
    }

    public func encrypt(dataKey: SecureBytes, keyId: String, context: EncryptionContext) throws -> WrappedKey {
        let (blob, arn) = try client.encrypt(keyId: keyId, plaintext: dataKey, context: context)
        return WrappedKey(provider: name, keyId: arn, blob: blob)
    }

    public func decrypt(_ wrapped: WrappedKey, context: EncryptionContext) throws -> SecureBytes {
        try client.decrypt(keyId: wrapped.keyId, blob: wrapped.blob, context: context)
    }

    public func reEncrypt(_ wrapped: WrappedKey, toKeyId keyId: String, context: EncryptionContext) throws -> WrappedKey {
        let (blob, arn) = try client.reEncrypt(sourceKeyId: wrapped.keyId, blob: wrapped.blob, context: context, destinationKeyId: keyId)
        return WrappedKey(provider: name, keyId: arn, blob: blob)
    }
}
