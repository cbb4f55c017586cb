import CCurlBridge
import Glibc
import KmsfsCrypto
import KmsfsSystem

/// One HTTP request. The body is kept in locked memory because a KMS request may carry a data key.
struct HTTPRequest {
    var method: String
    var url: String
    var headers: [(name: String, value: String)] = []
    var body: SecureBuffer?
    /// This request's own timeout (milliseconds), when shorter than the client's.
    var timeoutMs: Int? = nil
}

struct HTTPResponse {
    var status: Int
    /// In locked memory: a KMS response may carry a plaintext data key.
    var body: SecureBuffer
}

/// A failure below HTTP: no connection, a timeout, a TLS error.
struct TransportError: Error, CustomStringConvertible {
    let code: Int
    let message: String
    var description: String { message }
    /// Connection refused, DNS, timeouts and resets are worth retrying; TLS verification failures are not.
    var isTransient: Bool {
        guard code >= 0 else { return false }
        let c = CURLcode(UInt32(code))
        return [CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST, CURLE_OPERATION_TIMEDOUT, CURLE_SEND_ERROR,
                CURLE_RECV_ERROR, CURLE_GOT_NOTHING, CURLE_PARTIAL_FILE].contains(c)
    }
}

/// HTTP(S) over libcurl, safe to use from many threads at once.
///
/// Easy handles are pooled and reused, so connections to KMS stay open between calls (keep-alive) and
/// concurrent calls each get their own handle and connection. Certificate verification is always on, except
/// that `KMSFS_INSECURE_SKIP_TLS_VERIFY=1` turns it off for loopback hosts only (test servers).
/// `AWS_CA_BUNDLE` names a CA file to trust, as for the AWS SDKs.
final class HTTPClient: @unchecked Sendable {
    struct Options: Sendable {
        var connectTimeoutMs = 3000
        var requestTimeoutMs = 10000
        var caBundle: String? = nil
        var insecureLoopback = false
        static let maxResponseBytes = 1 << 20

        init(environment: [String: String] = [:]) {
            caBundle = environment["AWS_CA_BUNDLE"].flatMap { $0.isEmpty ? nil : $0 }
            insecureLoopback = environment["KMSFS_INSECURE_SKIP_TLS_VERIFY"] == "1"
        }
    }

    let options: Options
    private let lock = Lock()
    private var idle: [UnsafeMutableRawPointer] = []

    /// Why libcurl cannot be used, or nil once it is loaded (`kmsfs_curl_load`: on the first request, so that
    /// a process that makes none never loads it).
    private static let loadFailure: String? = {
        var error = [UInt8](repeating: 0, count: 512)
        let loaded = error.withUnsafeMutableBufferPointer { b in
            b.baseAddress!.withMemoryRebound(to: CChar.self, capacity: b.count) { kmsfs_curl_load($0, b.count) == 0 }
        }
        return loaded ? nil : String(decoding: error.prefix { $0 != 0 }, as: UTF8.self)
    }()

    init(options: Options) {
        self.options = options
    }

    deinit {
        for h in idle { kmsfs_curl_easy_cleanup(h) }
    }

    func perform(_ request: HTTPRequest) throws -> HTTPResponse {
        if let why = HTTPClient.loadFailure { throw TransportError(code: -1, message: why) }
        let handle = lock.withLock { idle.popLast() } ?? kmsfs_curl_easy_init()
        guard let handle else { throw TransportError(code: -1, message: "cannot create a libcurl handle") }
        var reusable = true
        defer {
            if reusable {
                kmsfs_curl_easy_reset(handle)
                lock.withLock { idle.append(handle) }
            } else {
                kmsfs_curl_easy_cleanup(handle)
            }
        }
        let body = try SecureBuffer(capacity: 4096)
        let sink = Unmanaged.passRetained(ResponseSink(body))
        defer { sink.release() }

        var headerList: UnsafeMutablePointer<curl_slist>? = nil
        defer { kmsfs_curl_slist_free_all(headerList) }
        for (name, value) in request.headers {
            headerList = kmsfs_curl_slist_append(headerList, "\(name): \(value)")
        }
        headerList = kmsfs_curl_slist_append(headerList, "Expect:")

        kmsfs_curl_set_string(handle, CURLOPT_URL, request.url)
        kmsfs_curl_set_long(handle, CURLOPT_NOSIGNAL, 1)
        let timeout = max(1, min(options.requestTimeoutMs, request.timeoutMs ?? Int.max))
        kmsfs_curl_set_long(handle, CURLOPT_CONNECTTIMEOUT_MS, min(options.connectTimeoutMs, timeout))
        kmsfs_curl_set_long(handle, CURLOPT_TIMEOUT_MS, timeout)
        kmsfs_curl_set_long(handle, CURLOPT_FOLLOWLOCATION, 0)
        kmsfs_curl_set_string(handle, CURLOPT_PROTOCOLS_STR, "http,https")
        kmsfs_curl_set_pointer(handle, CURLOPT_HTTPHEADER, headerList)
        kmsfs_curl_set_callback(handle, CURLOPT_WRITEFUNCTION) { data, size, count, context in
            let sink = Unmanaged<ResponseSink>.fromOpaque(context!).takeUnretainedValue()
            let n = size * count
            if sink.buffer.count + n > HTTPClient.Options.maxResponseBytes { return 0 }
            do {
                try sink.buffer.append(UnsafeRawBufferPointer(start: data, count: n))
            } catch {
                return 0
            }
            return n
        }
        kmsfs_curl_set_pointer(handle, CURLOPT_WRITEDATA, sink.toOpaque())
        if let ca = options.caBundle { kmsfs_curl_set_string(handle, CURLOPT_CAINFO, ca) }
        if options.insecureLoopback && HTTPClient.isLoopback(request.url) {
            kmsfs_curl_set_long(handle, CURLOPT_SSL_VERIFYPEER, 0)
            kmsfs_curl_set_long(handle, CURLOPT_SSL_VERIFYHOST, 0)
        } else {
            kmsfs_curl_set_long(handle, CURLOPT_SSL_VERIFYPEER, 1)
            kmsfs_curl_set_long(handle, CURLOPT_SSL_VERIFYHOST, 2)
        }

        let code: CURLcode = try withBody(request) { pointer, length in
            switch request.method {
            case "GET":
                kmsfs_curl_set_long(handle, CURLOPT_HTTPGET, 1)
            case "POST":
                kmsfs_curl_set_long(handle, CURLOPT_POST, 1)
                kmsfs_curl_set_pointer(handle, CURLOPT_POSTFIELDS, pointer)
                kmsfs_curl_set_offset(handle, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(length))
            default:
                kmsfs_curl_set_string(handle, CURLOPT_CUSTOMREQUEST, request.method)
                kmsfs_curl_set_pointer(handle, CURLOPT_POSTFIELDS, pointer)
                kmsfs_curl_set_offset(handle, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(length))
            }
            return kmsfs_curl_easy_perform(handle)
        }
        guard code == CURLE_OK else {
            reusable = false
            let what = String(cString: kmsfs_curl_easy_strerror(code))
            throw TransportError(code: Int(code.rawValue), message: "\(HTTPClient.hostPart(request.url)): \(what)")
        }
        var status = 0
        kmsfs_curl_response_code(handle, &status)
        return HTTPResponse(status: status, body: body)
    }

    private func withBody<R>(_ request: HTTPRequest, _ body: (UnsafeRawPointer?, Int) throws -> R) throws -> R {
        if let b = request.body, b.count > 0 {
            return try b.withUnsafeBytes { try body($0.baseAddress, $0.count) }
        }
        let empty: [UInt8] = [0]
        return try empty.withUnsafeBytes { try body($0.baseAddress, 0) }
    }

    /// "scheme://host[:port]" of a URL, for error messages.
    static func hostPart(_ url: String) -> String {
        guard let r = url.range(of: "://") else { return url }
        let rest = url[r.upperBound...]
        let end = rest.firstIndex(of: "/") ?? rest.endIndex
        return String(url[..<r.upperBound]) + rest[..<end]
    }

    static func host(_ url: String) -> String {
        var h = Substring(hostPart(url))
        if let r = h.range(of: "://") { h = h[r.upperBound...] }
        if h.hasPrefix("[") { return String(h.dropFirst().prefix { $0 != "]" }) }
        return String(h.prefix { $0 != ":" })
    }

    /// localhost, ::1, or an IPv4 address in 127.0.0.0/8 (a host name merely starting with "127." is not).
    static func isLoopback(_ url: String) -> Bool {
        let h = host(url).lowercased()
        if h == "localhost" || h == "::1" { return true }
        var addr = in_addr()
        guard inet_pton(AF_INET, h, &addr) == 1 else { return false }
        return UInt32(bigEndian: addr.s_addr) >> 24 == 127
    }

    private final class ResponseSink {
        let buffer: SecureBuffer
        init(_ b: SecureBuffer) { buffer = b }
    }
}
