import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// Which file a key operation is for: written to the audit log and to error log lines.
public struct KeySubject: Sendable {
    public var path: String
    public var fileId: [UInt8]

    public init(path: String, fileId: [UInt8]) {
        self.path = path
        self.fileId = fileId
    }
}

/// A data key for a new file, with the file ID and encryption context it was made for.
public struct FreshFileKey: Sendable {
    public let fileId: [UInt8]
    public let context: EncryptionContext
    /// The plaintext data key (locked memory); the caller wipes it once the file's keys are derived.
    public let dataKey: SecureBytes
    public let wrapped: [WrappedKey]
    /// The file's key schedule, derived ahead by the key pool (so that a create does not spend its time on it);
    /// nil when the key was made at create time.
    public var derived: FileKeys? = nil

    /// Wipes the data key and the keys derived from it (a key that no file will use).
    public func wipe() {
        dataKey.wipe()
        derived?.chunkKey.wipe()
        derived?.headerKey.wipe()
    }
}

/// The volume's key policy on top of its provider: which keys wrap new data keys, the order keys are tried
/// on open, falling back from one key to the next, and the audit record of every call.
public final class KeyService: Sendable {
    public let provider: KeyProvider
    /// Configured wrapping keys, in order: the first generates data keys, every one wraps them, and on open
    /// they are tried in this order.
    public let keyIds: [String]
    private let audit: AuditLog?
    /// Calls per operation, failures and latencies (for `kmsfs status`).
    public let metrics = CallMetrics()
    /// Bounds the provider calls in flight at once (KMS requests), whoever makes them.
    private let inFlight: KmsfsSystem.Semaphore
    public let policy: KMSPolicy
    /// Keys that refused and endpoints that failed lately (calls to them fail at once until the next probe).
    public let health: KeyHealth

    public static let defaultMaxInFlight = 16

    public init(provider: KeyProvider, keyIds: [String], audit: AuditLog?, maxInFlight: Int = KeyService.defaultMaxInFlight,
                policy: KMSPolicy = .defaults) {
        precondition(!keyIds.isEmpty)
        self.provider = provider
        self.keyIds = keyIds
        self.audit = audit
        self.policy = policy
        health = KeyHealth(probeInterval: policy.probeInterval)
        inFlight = KmsfsSystem.Semaphore(max(1, maxInFlight))
    }

    /// The most provider calls in flight at once.
    public var maxInFlight: Int { inFlight.limit }

    /// A new data key for a file, wrapped under every configured key that answers: GenerateDataKey asked of the
    /// first key that answers, then Encrypt under each of the others. Keys that refuse or cannot be reached are
    /// left out, with one warning naming them (rate-limited), unless the policy requires all keys; at least one
    /// key must answer. `kmsfs rewrap` adds the missing wrapped keys later.
    public func newDataKey(context: EncryptionContext, subject: KeySubject) throws -> (plaintext: SecureBytes, wrapped: [WrappedKey]) {
        var dataKey: SecureBytes?
        var wrapped: [WrappedKey] = []
        var missing: [KeyError] = []
        let budget = OperationBudget(seconds: policy.deadline)
        for (i, keyId) in keyIds.enumerated() {
            let deadline = budget.deadline(forKey: i, of: keyIds.count)
            do {
                if let key = dataKey {
                    wrapped.append(try audited("Encrypt", keyId: keyId, subject: subject, deadline: deadline) {
                        try provider.encrypt(dataKey: key, keyId: keyId, context: context)
                    })
                } else {
                    let (key, first) = try audited("GenerateDataKey", keyId: keyId, subject: subject, deadline: deadline) {
                        try provider.generateDataKey(keyId: keyId, context: context)
                    }
                    dataKey = key
                    wrapped.append(first)
                }
            } catch let e as KeyError {
                missing.append(e)
                if policy.requireAllKeys { break }
            }
        }
        guard let key = dataKey, !(policy.requireAllKeys && !missing.isEmpty) else {
            dataKey?.wipe()
            var e = KeyService.mostTelling(missing)
            e.alsoTried = missing.filter { $0.keyId != e.keyId || $0.errorType != e.errorType }
            if policy.requireAllKeys && dataKey != nil {
                e.message += e.message.isEmpty ? "every configured key must wrap new files (--require-all-keys)"
                                               : "; every configured key must wrap new files (--require-all-keys)"
            }
            throw e
        }
        if !missing.isEmpty {
            let names = missing.map(\.briefly)
            FailureLog.shared.log(.warning, kind: "create-missing-" + missing.map(\.keyId).joined(separator: ","),
                                  "new file \(subject.path.isEmpty ? "(made ahead)" : subject.path) wrapped without \(names.joined(separator: "; ")); kmsfs rewrap adds the missing keys later")
        }
        return (key, wrapped)
    }

    /// A data key for a new file of volume `volumeId`: a fresh random file ID, its encryption context, and a
    /// new data key wrapped under every configured key.
    public func newFileKey(volumeId: String, userContext: [String: String], path: String) throws -> FreshFileKey {
        let fileId = try SecureRandom.bytes(FileHeader.fileIdSize)
        let context = EncryptionContext.forFile(volumeId: volumeId, fileId: fileId, user: userContext)
        let (dataKey, wrapped) = try newDataKey(context: context, subject: KeySubject(path: path, fileId: fileId))
        return FreshFileKey(fileId: fileId, context: context, dataKey: dataKey, wrapped: wrapped)
    }

    /// Unwraps a file's data key, trying its wrapped keys in the configured order (then any others the header
    /// carries) until one unwraps to a key that `accept` approves (the key commitment check).
    /// Throws the most telling failure when none does.
    public func unwrap(_ wrapped: [WrappedKey], context: EncryptionContext, subject: KeySubject,
                       accept: (SecureBytes) -> Bool) throws -> SecureBytes {
        var failures: [KeyError] = []
        let candidates = orderForUnwrap(wrapped)
        let budget = OperationBudget(seconds: policy.deadline)
        for (i, candidate) in candidates.enumerated() {
            guard candidate.provider == provider.name else {
                failures.append(KeyError(.keyUnavailable, errorType: "UnsupportedProvider", keyId: candidate.keyId,
                                         message: "this volume uses the \(provider.name) provider, not \(candidate.provider)"))
                continue
            }
            do {
                let key = try audited("Decrypt", keyId: candidate.keyId, subject: subject,
                                      deadline: budget.deadline(forKey: i, of: candidates.count)) {
                    try provider.decrypt(candidate, context: context)
                }
                if accept(key) {
                    if !failures.isEmpty {
                        let skipped = failures.map(\.briefly)
                        FailureLog.shared.log(.warning, kind: "unwrap-fallback-" + failures.map(\.keyId).joined(separator: ","),
                                              "\(subject.path): unwrapped with key \(candidate.keyId) after \(skipped.joined(separator: "; "))")
                    }
                    return key
                }
                key.wipe()
                failures.append(KeyError(.invalidCiphertext, errorType: "KeyCommitmentMismatch", keyId: candidate.keyId,
                                         message: "the unwrapped key does not match its stored commitment (the header's, or the config's for the volume key)"))
            } catch let e as KeyError {
                failures.append(e)
            }
        }
        var worst = KeyService.mostTelling(failures)
        worst.alsoTried = failures.filter { $0.keyId != worst.keyId || $0.errorType != worst.errorType }
        throw worst
    }

    /// Re-wraps a file's data key under `keyIds` (key rotation), without the plaintext key leaving the provider
    /// when it supports ReEncrypt.
    public func rewrap(_ wrapped: [WrappedKey], to keyIds: [String], context: EncryptionContext,
                       subject: KeySubject) throws -> [WrappedKey] {
        var result: [WrappedKey] = []
        var lastError: KeyError?
        for target in keyIds {
            var done = false
            for source in orderForUnwrap(wrapped) where source.provider == provider.name {
                do {
                    result.append(try audited("ReEncrypt", keyId: target, subject: subject) {
                        try provider.reEncrypt(source, toKeyId: target, context: context)
                    })
                    done = true
                    break
                } catch let e as KeyError {
                    lastError = e
                }
            }
            if !done {
                throw lastError ?? KeyError(.keyUnavailable, errorType: "NoUsableWrappedKey", keyId: target, message: "no wrapped key of this provider")
            }
        }
        return result
    }

    /// DescribeKey on every configured key; returns their canonical IDs.
    public func describeKeys() throws -> [String] {
        try keyIds.map { id in
            try audited("DescribeKey", keyId: id, subject: KeySubject(path: "", fileId: [])) { try provider.describeKey(id) }
        }
    }

    /// Records that a data key made ahead (`DataKeyPool`) was given to the new file at `path`.
    public func recordAssign(fileId: [UInt8], path: String) {
        audit?.record(op: "AssignDataKey", keyId: "", fileId: Hex.encode(fileId), path: path, result: "ok", latencyMs: 0)
    }

    /// Records that the plaintext data key of a file was wiped.
    public func recordDiscard(subject: KeySubject) {
        audit?.record(op: "DiscardKey", keyId: "", fileId: Hex.encode(subject.fileId), path: subject.path, result: "ok", latencyMs: 0)
    }

    // MARK: - internals

    private func orderForUnwrap(_ wrapped: [WrappedKey]) -> [WrappedKey] {
        var ordered: [WrappedKey] = []
        for id in keyIds { ordered += wrapped.filter { $0.keyId == id } }
        ordered += wrapped.filter { !keyIds.contains($0.keyId) }
        return ordered
    }

    /// One provider call: refused at once if the key or its endpoint failed lately (see `KeyHealth`), else made
    /// within the in-flight bound, audited, and its outcome remembered.
    private func audited<T>(_ op: String, keyId: String, subject: KeySubject, deadline: Double? = nil,
                            _ body: () throws -> T) throws -> T {
        // ReEncrypt (rewrap) fails for its source key as often as for its target: no breaker for it.
        let guarded = op != "ReEncrypt"
        let route = provider.route(forKeyId: keyId)
        if guarded, let remembered = health.admit(op: op, keyId: keyId, route: route) { throw remembered }
        do {
            let slotDeadline = deadline ?? (Monotonic.seconds() + policy.deadline)
            guard let r = try inFlight.withPermit(until: slotDeadline, {
                try auditedCall(op, keyId: keyId, subject: subject, deadline: deadline, body)
            }) else {
                var e = KeyError(.unreachable, errorType: "DeadlineExceeded", keyId: keyId, message: "")
                e.attempts = 0
                e.gaveUpAtDeadline = true
                throw e
            }
            if guarded { health.succeeded(op: op, keyId: keyId, route: route) }
            return r
        } catch let e as KeyError {
            if guarded { health.failed(op: op, keyId: keyId, route: route, error: e) }
            throw e
        }
    }

    private func auditedCall<T>(_ op: String, keyId: String, subject: KeySubject, deadline: Double?,
                                _ body: () throws -> T) throws -> T {
        let start = KeyService.now()
        let tries = CallAttempts.current
        tries.reset()
        tries.deadline = deadline
        defer { tries.deadline = nil }
        func record(_ result: String) {
            let elapsed = KeyService.now() - start
            metrics.record(op, milliseconds: elapsed, failed: result != "ok")
            audit?.record(op: op, keyId: keyId, fileId: Hex.encode(subject.fileId), path: subject.path, result: result,
                          latencyMs: elapsed, attempts: max(1, tries.attempts), retried: tries.retried)
        }
        do {
            let r = try body()
            record("ok")
            return r
        } catch let e as KeyError {
            record(e.errorType)
            throw e
        } catch {
            record("InternalError")
            throw KeyError(.other, errorType: "InternalError", keyId: keyId, message: "\(error)")
        }
    }

    static func mostTelling(_ failures: [KeyError]) -> KeyError {
        for kind in [KeyErrorKind.accessDenied, .keyUnavailable, .invalidCiphertext, .unreachable, .other] {
            if let f = failures.first(where: { $0.kind == kind }) { return f }
        }
        return KeyError(.keyUnavailable, errorType: "NoWrappedKey", keyId: "", message: "the header carries no wrapped key")
    }

    /// Milliseconds on the monotonic clock.
    static func now() -> Double { Monotonic.seconds() * 1000 }
}
