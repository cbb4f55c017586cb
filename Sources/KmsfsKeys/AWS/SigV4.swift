import Glibc
import KmsfsCrypto

/// AWS credentials. The secret access key is kept in locked memory and never printed.
public struct AWSCredentials: Sendable, CustomStringConvertible {
    public let accessKeyId: String
    let secretAccessKey: SecureBytes
    public let sessionToken: String?
    /// Seconds since the epoch when temporary credentials expire (nil: long-term credentials).
    public let expiration: Double?
    /// Where they came from ("environment", "profile default", "web identity", ...), for messages.
    public let source: String

    public init(accessKeyId: String, secretAccessKey: String, sessionToken: String?, expiration: Double?, source: String) throws {
        self.accessKeyId = accessKeyId
        self.secretAccessKey = try Array(secretAccessKey.utf8).withUnsafeBytes { try SecureBytes(copying: $0) }
        self.sessionToken = sessionToken.flatMap { $0.isEmpty ? nil : $0 }
        self.expiration = expiration
        self.source = source
    }

    public var description: String { "credentials \(accessKeyId) from \(source)" }
}

/// AWS Signature Version 4 (the published algorithm: canonical request, string to sign, derived signing key).
public enum SigV4 {
    public struct Request {
        public var method: String
        /// Absolute path, already URI-encoded ("/" for KMS).
        public var path: String
        public var query: [(String, String)]
        /// Header names as given; they are lower-cased and trimmed for signing.
        public var headers: [(String, String)]
        public var payloadSHA256: String

        public init(method: String, path: String, query: [(String, String)] = [], headers: [(String, String)], payloadSHA256: String) {
            self.method = method
            self.path = path
            self.query = query
            self.headers = headers
            self.payloadSHA256 = payloadSHA256
        }
    }

    /// "20150830T123600Z" for a Unix time.
    public static func amzDate(_ time: time_t) -> String {
        var t = time
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func p(_ v: Int32, _ w: Int) -> String { let s = String(v); return String(repeating: "0", count: max(0, w - s.count)) + s }
        return "\(p(tmv.tm_year + 1900, 4))\(p(tmv.tm_mon + 1, 2))\(p(tmv.tm_mday, 2))T\(p(tmv.tm_hour, 2))\(p(tmv.tm_min, 2))\(p(tmv.tm_sec, 2))Z"
    }

    /// The Authorization header value for `request`, whose headers must already include host and x-amz-date
    /// (and x-amz-security-token for temporary credentials).
    public static func authorization(_ request: Request, credentials: AWSCredentials, region: String, service: String,
                                     amzDate: String) throws -> String {
        let date = String(amzDate.prefix(8))
        let scope = "\(date)/\(region)/\(service)/aws4_request"
        var canonicalHeaders: [(String, String)] = []
        for (name, value) in request.headers {
            let n = name.lowercased()
            let v = value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
            if let i = canonicalHeaders.firstIndex(where: { $0.0 == n }) {
                canonicalHeaders[i].1 += "," + v
            } else {
                canonicalHeaders.append((n, v))
            }
        }
        canonicalHeaders.sort { $0.0 < $1.0 }
        let signedHeaders = canonicalHeaders.map(\.0).joined(separator: ";")
        var encoded: [(String, String)] = request.query.map { (uriEncode($0.0), uriEncode($0.1)) }
        encoded.sort { (a: (String, String), b: (String, String)) -> Bool in a.0 == b.0 ? a.1 < b.1 : a.0 < b.0 }
        let canonicalQuery = encoded.map { (pair: (String, String)) -> String in pair.0 + "=" + pair.1 }.joined(separator: "&")
        let canonicalRequest = [
            request.method,
            request.path,
            canonicalQuery,
            canonicalHeaders.map { (h: (String, String)) -> String in h.0 + ":" + h.1 + "\n" }.joined(),
            signedHeaders,
            request.payloadSHA256,
        ].joined(separator: "\n")
        let stringToSign = "AWS4-HMAC-SHA256\n\(amzDate)\n\(scope)\n\(Hex.encode(Digest.sha256(Array(canonicalRequest.utf8))))"
        let signature = try sign(stringToSign, secret: credentials.secretAccessKey, date: date, region: region, service: service)
        return "AWS4-HMAC-SHA256 Credential=\(credentials.accessKeyId)/\(scope), SignedHeaders=\(signedHeaders), Signature=\(signature)"
    }

    /// HMAC chain: kDate = HMAC("AWS4" + secret, date), then region, service, "aws4_request", then the string.
    static func sign(_ stringToSign: String, secret: SecureBytes, date: String, region: String, service: String) throws -> String {
        let seed = try SecureBytes(count: 4 + secret.count)
        seed.withUnsafeMutableBytes { s in
            Array("AWS4".utf8).withUnsafeBytes { s.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: 4) }
            secret.withUnsafeBytes { (s.baseAddress! + 4).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        }
        let key = try SecureBytes(count: 32)
        try seed.withUnsafeBytes { s in
            try Array(date.utf8).withUnsafeBytes { d in try key.withUnsafeMutableBytes { try Digest.hmacSHA256(key: s, data: d, into: $0.baseAddress!) } }
        }
        for part in [region, service, "aws4_request"] {
            let next = try SecureBytes(count: 32)
            try key.withUnsafeBytes { k in
                try Array(part.utf8).withUnsafeBytes { d in try next.withUnsafeMutableBytes { try Digest.hmacSHA256(key: k, data: d, into: $0.baseAddress!) } }
            }
            key.withUnsafeMutableBytes { k in next.withUnsafeBytes { k.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: 32) } }
        }
        var mac = [UInt8](repeating: 0, count: 32)
        try key.withUnsafeBytes { k in
            try Array(stringToSign.utf8).withUnsafeBytes { d in try mac.withUnsafeMutableBytes { try Digest.hmacSHA256(key: k, data: d, into: $0.baseAddress!) } }
        }
        return Hex.encode(mac)
    }

    /// RFC 3986 percent-encoding of everything but unreserved characters.
    public static func uriEncode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(b))
            default:
                let h = String(b, radix: 16, uppercase: true)
                out += "%" + (h.count == 1 ? "0" + h : h)
            }
        }
        return out
    }
}
