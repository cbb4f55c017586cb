import CCurlBridge
import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem

/// The AWS KMS JSON protocol (AWS JSON 1.1, `X-Amz-Target: TrentService.<Operation>`), signed with SigV4.
///
/// Requests and responses that carry a plaintext data key (Encrypt, GenerateDataKey, Decrypt) are built and
/// parsed in locked memory: the base64 key is decoded straight into `SecureBytes` and blanked in the
/// response before the rest of it is parsed. Throttling, 5xx answers and connection failures are retried
/// with exponential backoff and full jitter until the call's deadline (`KMSPolicy.deadline`), each attempt's
/// timeout cut to what is left of it; throttling also slows every later call down (`AdaptiveRateLimiter`).
public final class KMSClient: Sendable {
    let settings: AWSSettings
    public let credentials: CredentialChain
    let http: HTTPClient
    let policy: KMSPolicy
    let limiter: AdaptiveRateLimiter

    public init(settings: AWSSettings, policy: KMSPolicy = .defaults) {
        self.settings = settings
        self.policy = policy
        limiter = AdaptiveRateLimiter(maxRate: policy.maxRate)
        http = HTTPClient(options: HTTPClient.Options(environment: settings.environment))
        var credentialOptions = HTTPClient.Options(environment: settings.environment)
        credentialOptions.connectTimeoutMs = 1000
        credentialOptions.requestTimeoutMs = 3000
        credentials = CredentialChain(settings: settings, http: HTTPClient(options: credentialOptions))
    }

    // MARK: - operations

    public struct KeyDescription: Sendable {
        public let arn: String
        public let state: String
        public let usage: String
        public let spec: String
    }

    public func describeKey(_ keyId: String) throws -> KeyDescription {
        let r = try call("DescribeKey", keyId: keyId, json: ["KeyId": keyId])
        guard let meta = r["KeyMetadata"] as? [String: Any], let arn = meta["Arn"] as? String else {
            throw invalidResponse("DescribeKey", keyId)
        }
        return KeyDescription(arn: arn, state: meta["KeyState"] as? String ?? ((meta["Enabled"] as? Bool) == true ? "Enabled" : "Unknown"),
                              usage: meta["KeyUsage"] as? String ?? "ENCRYPT_DECRYPT",
                              spec: meta["KeySpec"] as? String ?? meta["CustomerMasterKeySpec"] as? String ?? "SYMMETRIC_DEFAULT")
    }

    /// A new AES-256 data key: plaintext (locked memory), ciphertext blob, and the ARN of the key used.
    public func generateDataKey(keyId: String, context: EncryptionContext) throws -> (SecureBytes, [UInt8], String) {
        let body = try jsonBody(["KeyId": keyId, "KeySpec": "AES_256", "EncryptionContext": context.pairs])
        let (plaintext, r) = try callWithSecretResponse("GenerateDataKey", keyId: keyId, body: body)
        return (plaintext, try blob(r, "CiphertextBlob", "GenerateDataKey", keyId), (r["KeyId"] as? String) ?? keyId)
    }

    /// Wraps an existing data key under `keyId`.
    public func encrypt(keyId: String, plaintext: SecureBytes, context: EncryptionContext) throws -> ([UInt8], String) {
        // {"KeyId": ..., "EncryptionContext": {...}, "Plaintext": "<base64>"} built in locked memory.
        let prefix = try JSONSerialization.data(withJSONObject: ["KeyId": keyId, "EncryptionContext": context.pairs], options: [.sortedKeys])
        let body = try SecureBuffer(capacity: prefix.count + 80)
        try body.append(Array(prefix.dropLast()))
        try body.append(",\"Plaintext\":\"")
        try body.appendBase64(of: plaintext)
        try body.append("\"}")
        let r = try call("Encrypt", keyId: keyId, body: body)
        return (try blob(r, "CiphertextBlob", "Encrypt", keyId), (r["KeyId"] as? String) ?? keyId)
    }

    public func decrypt(keyId: String, blob ciphertext: [UInt8], context: EncryptionContext) throws -> SecureBytes {
        let body = try jsonBody(["KeyId": keyId, "CiphertextBlob": Base64.encode(ciphertext), "EncryptionContext": context.pairs])
        return try callWithSecretResponse("Decrypt", keyId: keyId, body: body).0
    }

    /// Re-wraps a ciphertext blob under `destinationKeyId` inside KMS.
    public func reEncrypt(sourceKeyId: String, blob ciphertext: [UInt8], context: EncryptionContext,
                          destinationKeyId: String) throws -> ([UInt8], String) {
        let r = try call("ReEncrypt", keyId: destinationKeyId, json: [
            "CiphertextBlob": Base64.encode(ciphertext), "SourceKeyId": sourceKeyId, "SourceEncryptionContext": context.pairs,
            "DestinationKeyId": destinationKeyId, "DestinationEncryptionContext": context.pairs,
        ], routeKey: sourceKeyId)
        return (try blob(r, "CiphertextBlob", "ReEncrypt", destinationKeyId), (r["KeyId"] as? String) ?? destinationKeyId)
    }

    // MARK: - the protocol

    private func jsonBody(_ object: [String: Any]) throws -> SecureBuffer {
        let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
        let b = try SecureBuffer(capacity: data.count)
        try b.append(Array(data))
        return b
    }

    private func call(_ op: String, keyId: String, json: [String: Any], routeKey: String? = nil) throws -> [String: Any] {
        try call(op, keyId: keyId, body: try jsonBody(json), routeKey: routeKey)
    }

    private func call(_ op: String, keyId: String, body: SecureBuffer, routeKey: String? = nil) throws -> [String: Any] {
        let response = try send(op, keyId: keyId, body: body, routeKey: routeKey)
        return try parse(response.body, op: op, keyId: keyId)
    }

    /// For operations whose answer holds "Plaintext": decodes it into locked memory and blanks it before the
    /// rest of the answer is parsed.
    private func callWithSecretResponse(_ op: String, keyId: String, body: SecureBuffer) throws -> (SecureBytes, [String: Any]) {
        let response = try send(op, keyId: keyId, body: body)
        let plaintext = try SecureBytes(count: FileHeader.dataKeySize)
        let found: Int? = response.body.withUnsafeMutableBytes { b in
            guard let (start, end) = KMSClient.findStringValue(of: "Plaintext", in: UnsafeRawBufferPointer(b)) else { return nil }
            let n = plaintext.withUnsafeMutableBytes { Base64.decode(UnsafeRawBufferPointer(rebasing: b[start..<end]), into: $0) }
            for i in start..<end { b[i] = UInt8(ascii: "A") }
            return n
        }
        guard found == FileHeader.dataKeySize else {
            plaintext.wipe()
            throw invalidResponse(op, keyId)
        }
        return (plaintext, try parse(response.body, op: op, keyId: keyId))
    }

    /// Sends one operation with retries until its deadline; returns a 200 answer or throws the KMS error, which
    /// says how many attempts were made and whether the deadline ended them.
    private func send(_ op: String, keyId: String, body: SecureBuffer, routeKey: String? = nil) throws -> HTTPResponse {
        let region = try settings.region(forKey: routeKey ?? keyId)
        let url = settings.kmsEndpoint(region: region)
        let payloadHash = body.withUnsafeBytes { Hex.encode(Digest.sha256($0)) }
        let start = Monotonic.seconds()
        let deadline = min(start + policy.deadline, CallAttempts.current.deadline ?? .infinity)
        var refreshedCredentials = false
        var attempt = 0
        var failure: KeyError?
        func givingUp(_ e: KeyError, atDeadline: Bool) -> KeyError {
            var e = e
            e.attempts = attempt
            e.elapsed = Monotonic.seconds() - start
            e.gaveUpAtDeadline = atDeadline
            return e
        }
        while true {
            guard limiter.acquire(until: deadline) else {
                throw givingUp(failure ?? KeyError(.unreachable, errorType: "RateLimited", keyId: keyId,
                                                   message: "the KMS throttled kmsfs, and its rate limit left no room before the deadline"),
                               atDeadline: true)
            }
            let remainingMs = Int((deadline - Monotonic.seconds()) * 1000)
            guard remainingMs > 0 else {
                throw givingUp(failure ?? KeyError(.unreachable, errorType: "DeadlineExceeded", keyId: keyId, message: ""), atDeadline: true)
            }
            attempt += 1
            CallAttempts.current.attempts = attempt
            if let f = failure, attempt > 1 { CallAttempts.current.retried.append(f.errorType) }
            let creds = try credentials.current()
            let date = SigV4.amzDate(time(nil))
            var headers: [(String, String)] = [
                ("Host", HTTPClient.hostPart(url).components(separatedBy: "://").last!),
                ("Content-Type", "application/x-amz-json-1.1"),
                ("X-Amz-Target", "TrentService.\(op)"),
                ("X-Amz-Date", date),
            ]
            if let t = creds.sessionToken { headers.append(("X-Amz-Security-Token", t)) }
            let auth = try SigV4.authorization(SigV4.Request(method: "POST", path: "/", headers: headers, payloadSHA256: payloadHash),
                                               credentials: creds, region: region, service: "kms", amzDate: date)
            headers.append(("Authorization", auth))
            headers.append(("User-Agent", "kmsfs/0.1"))
            do {
                var request = HTTPRequest(method: "POST", url: url.hasSuffix("/") ? url : url + "/",
                                          headers: headers.map { (name: $0.0, value: $0.1) }, body: body)
                request.timeoutMs = remainingMs
                let r = try http.perform(request)
                if r.status == 200 {
                    limiter.succeeded()
                    return r
                }
                let e = KMSClient.error(from: r, op: op, keyId: keyId)
                failure = e
                if e.errorType == "ExpiredTokenException" && !refreshedCredentials {
                    credentials.invalidate()
                    refreshedCredentials = true
                    attempt -= 1
                    continue
                }
                if e.isThrottling { limiter.throttled() }
                if !KMSClient.isRetryable(status: r.status, errorType: e.errorType) { throw givingUp(e, atDeadline: false) }
            } catch let e as TransportError {
                let timedOut = e.code == Int(CURLE_OPERATION_TIMEDOUT.rawValue)
                let err = KeyError(.unreachable, errorType: timedOut ? "Timeout" : "ConnectionError", keyId: keyId, message: e.message)
                failure = err
                if Monotonic.seconds() >= deadline - 0.01 { throw givingUp(err, atDeadline: true) }
                if !e.isTransient { throw givingUp(err, atDeadline: false) }
            }
            // Full jitter: a random wait up to 25 ms * 2^attempt, at most 1 s, and never past the deadline.
            let cap = min(1000.0, 25.0 * pow(2.0, Double(attempt)))
            let wait = Double.random(in: 0...cap) / 1000
            if Monotonic.seconds() + wait >= deadline { throw givingUp(failure!, atDeadline: true) }
            usleep(useconds_t(wait * 1_000_000))
        }
    }

    private func parse(_ body: SecureBuffer, op: String, keyId: String) throws -> [String: Any] {
        let data = body.withUnsafeBytes { Data($0) }
        guard let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { throw invalidResponse(op, keyId) }
        return obj
    }

    private func blob(_ r: [String: Any], _ field: String, _ op: String, _ keyId: String) throws -> [UInt8] {
        guard let text = r[field] as? String, let bytes = Base64.decode(text), !bytes.isEmpty else { throw invalidResponse(op, keyId) }
        return bytes
    }

    private func invalidResponse(_ op: String, _ keyId: String) -> KeyError {
        KeyError(.other, errorType: "InvalidResponse", keyId: keyId, message: "\(op) returned an answer kmsfs cannot read")
    }

    /// The byte range of the string value of `"key"` in a JSON text (top level or nested; keys are unique here).
    static func findStringValue(of key: String, in json: UnsafeRawBufferPointer) -> (Int, Int)? {
        let needle = Array("\"\(key)\"".utf8)
        var i = 0
        while i + needle.count <= json.count {
            var match = true
            for j in 0..<needle.count where json[i + j] != needle[j] { match = false; break }
            if match {
                var k = i + needle.count
                while k < json.count && (json[k] == 32 || json[k] == 9 || json[k] == 10 || json[k] == 13) { k += 1 }
                guard k < json.count, json[k] == UInt8(ascii: ":") else { i += 1; continue }
                k += 1
                while k < json.count && (json[k] == 32 || json[k] == 9 || json[k] == 10 || json[k] == 13) { k += 1 }
                guard k < json.count, json[k] == UInt8(ascii: "\"") else { return nil }
                let start = k + 1
                var end = start
                while end < json.count && json[end] != UInt8(ascii: "\"") { end += 1 }
                return end < json.count ? (start, end) : nil
            }
            i += 1
        }
        return nil
    }

    // MARK: - errors

    /// Reads a KMS error answer: JSON {"__type": ..., "message": ...}, an XML ErrorResponse (authentication
    /// failures), an empty or `null` body, or an HTML page.
    static func error(from r: HTTPResponse, op: String, keyId: String) -> KeyError {
        let text = r.body.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
        var type = "HTTP\(r.status)"
        var message = ""
        if let obj = try? JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed]) as? [String: Any] {
            if let t = obj["__type"] as? String ?? obj["code"] as? String { type = String(t.split(separator: "#").last ?? Substring(t)) }
            message = obj["message"] as? String ?? obj["Message"] as? String ?? ""
        } else if let code = CredentialChain.xmlValue("Code", in: text) {
            type = code
            message = CredentialChain.xmlValue("Message", in: text) ?? ""
        }
        if message.count > 300 { message = String(message.prefix(300)) + "..." }
        return KeyError(kind(of: type, status: r.status), errorType: type, keyId: keyId, message: message)
    }

    static func kind(of type: String, status: Int) -> KeyErrorKind {
        switch type {
        case "AccessDeniedException", "AccessDenied", "SignatureDoesNotMatch", "InvalidClientTokenId",
             "UnrecognizedClientException", "ExpiredTokenException", "IncompleteSignature", "MissingAuthenticationToken",
             "InvalidSignatureException":
            return .accessDenied
        case "DisabledException", "KMSInvalidStateException", "NotFoundException", "KeyUnavailableException",
             "InvalidKeyUsageException":
            return .keyUnavailable
        case "InvalidCiphertextException", "IncorrectKeyException":
            return .invalidCiphertext
        default:
            if isRetryable(status: status, errorType: type) { return .unreachable }
            return status == 403 ? .accessDenied : .other
        }
    }

    static func isRetryable(status: Int, errorType: String) -> Bool {
        if ["ThrottlingException", "Throttling", "ThrottledException", "RequestLimitExceeded", "TooManyRequestsException",
            "LimitExceededException", "KMSInternalException", "DependencyTimeoutException", "InternalFailure",
            "ServiceUnavailable", "RequestTimeout"].contains(errorType) { return true }
        return status == 429 || (500...599).contains(status)
    }
}
