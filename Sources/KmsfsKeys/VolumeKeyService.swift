import KmsfsCrypto
import KmsfsFormat

/// The volume key (format 3): made at init, unwrapped once per mount, under its own encryption context
/// (`VolumeKeys.context`), so a key policy can allow it apart from the data keys of files.
extension KeyService {
    /// The audit log's name for volume key operations.
    public static let volumeKeySubject = KeySubject(path: "(volume key)", fileId: [])

    /// A new volume key for volume `volumeId`, wrapped under every configured key (each must answer).
    public func newVolumeKey(volumeId: String) throws -> (keys: VolumeKeys, stored: VolumeKeyConfig) {
        let (key, wrapped) = try newDataKey(context: VolumeKeys.context(volumeId: volumeId), subject: KeyService.volumeKeySubject)
        defer { key.wipe() }
        guard wrapped.count == keyIds.count else {
            let missing = keyIds.filter { id in !wrapped.contains { $0.keyId == id } }
            throw KeyError(.keyUnavailable, errorType: "KeyDidNotAnswer", keyId: missing.first ?? "",
                           message: "the volume key must be wrapped under every configured key, and \(missing.joined(separator: ", ")) did not answer")
        }
        let keys = try VolumeKeys(volumeKey: key, volumeId: volumeId)
        return (keys, VolumeKeyConfig(wrappedKeys: wrapped, commitment: keys.commitment))
    }

    /// Unwraps the volume key of `volume` (trying its keys in order, accepting only the key that matches the
    /// stored commitment), derives its keys and checks the config's MAC with them.
    public func openVolumeKey(_ volume: VolumeConfig) throws -> VolumeKeys {
        guard let stored = volume.volumeKey, let commitment = Hex.decode(stored.commitment) else {
            throw FormatError.invalidConfig("no volume key")
        }
        let wrapped = stored.wrappedKeys.compactMap(\.wrappedKey)
        let key = try unwrap(wrapped, context: VolumeKeys.context(volumeId: volume.volumeId), subject: KeyService.volumeKeySubject) { candidate in
            guard let c = try? VolumeKeys.commitment(of: candidate, volumeId: volume.volumeId) else { return false }
            return Digest.constantTimeEquals(c, commitment)
        }
        defer { key.wipe() }
        let keys = try VolumeKeys(volumeKey: key, volumeId: volume.volumeId)
        do {
            try volume.checkAuthenticity(with: keys)
        } catch {
            keys.wipe()
            throw error
        }
        return keys
    }

    /// Re-wraps the volume key under `keyIds` (key rotation). ReEncrypt never shows kmsfs the key it moves, so
    /// the source is first checked: only a wrapped copy that unwraps to the committed key is carried over (a copy
    /// someone added under another key, holding another key, would otherwise spread to every new key).
    public func rewrapVolumeKey(_ stored: VolumeKeyConfig, volumeId: String, to keyIds: [String]) throws -> VolumeKeyConfig {
        guard let commitment = Hex.decode(stored.commitment) else { throw FormatError.invalidConfig("no volume key commitment") }
        let context = VolumeKeys.context(volumeId: volumeId)
        var source: WrappedKey? = nil
        var lastError: Error? = nil
        for candidate in stored.wrappedKeys.compactMap(\.wrappedKey) where candidate.provider == provider.name {
            do {
                let key = try unwrap([candidate], context: context, subject: KeyService.volumeKeySubject) { k in
                    guard let c = try? VolumeKeys.commitment(of: k, volumeId: volumeId) else { return false }
                    return Digest.constantTimeEquals(c, commitment)
                }
                key.wipe()
                source = candidate
                break
            } catch {
                lastError = error
            }
        }
        guard let good = source else {
            throw lastError ?? KeyError(.keyUnavailable, errorType: "NoUsableWrappedKey", keyId: keyIds.first ?? "",
                                        message: "no wrapped volume key of this provider unwraps to the committed key")
        }
        var updated = stored
        let wrapped = try rewrap([good], to: keyIds, context: context, subject: KeyService.volumeKeySubject)
        updated.wrappedKeys = wrapped.map(VolumeKeyConfig.Wrapped.init)
        return updated
    }
}
