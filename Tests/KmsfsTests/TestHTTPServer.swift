import Foundation
import Glibc
import Synchronization

/// A small HTTP/1.1 server on 127.0.0.1 for tests: instance metadata and container credential endpoints,
/// and a fault-injecting proxy in front of the real KMS-protocol server (moto), which adds what moto lacks
/// (key states, throttling, outages, held answers). One request per connection.
final class TestHTTPServer: @unchecked Sendable {
    struct Request: Sendable {
        var method: String
        var path: String
        /// Lower-cased names.
        var headers: [String: String]
        var body: [UInt8]
        var raw: [UInt8]

        /// The KMS operation (X-Amz-Target: TrentService.<op>).
        var kmsOperation: String? { headers["x-amz-target"].map { String($0.split(separator: ".").last ?? "") } }
        var json: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any]) ?? [:] }
    }

    struct Response: Sendable {
        var status: Int
        var headers: [(String, String)] = []
        var body: [UInt8] = []

        static func json(_ status: Int, _ object: [String: Any]) -> Response {
            Response(status: status, headers: [("Content-Type", "application/x-amz-json-1.1")],
                     body: Array(try! JSONSerialization.data(withJSONObject: object)))
        }

        static func text(_ status: Int, _ text: String, type: String = "text/plain") -> Response {
            Response(status: status, headers: [("Content-Type", type)], body: Array(text.utf8))
        }
    }

    enum Action: Sendable {
        case respond(Response)
        /// Pass the request unchanged to 127.0.0.1:port and relay the answer.
        case forward(UInt16)
        /// Close the connection without answering.
        case hangUp
    }

    let port: UInt16
    private let listenFd: Int32
    private let handler: @Sendable (Request) -> Action
    private let log = Mutex<[Request]>([])
    private let running = Atomic<Bool>(true)

    var url: String { "http://127.0.0.1:\(port)" }
    var requests: [Request] { log.withLock { $0 } }

    /// Keep connections open between answers (HTTP/1.1 keep-alive), counting them in `connections`.
    let keepAlive: Bool
    private let accepted = Atomic<Int>(0)
    var connections: Int { accepted.load(ordering: .relaxed) }

    init(keepAlive: Bool = false, handler: @escaping @Sendable (Request) -> Action) throws {
        self.handler = handler
        self.keepAlive = keepAlive
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, listen(fd, 64) == 0 else { throw TestFailure("cannot listen: \(String(cString: strerror(errno)))") }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        port = UInt16(bigEndian: addr.sin_port)
        listenFd = fd
        let t = Thread { [self] in acceptLoop() }
        t.start()
    }

    deinit { stop() }

    func stop() {
        if running.exchange(false, ordering: .relaxed) {
            shutdown(listenFd, Int32(SHUT_RDWR))
            close(listenFd)
        }
    }

    func count(_ op: String) -> Int { requests.filter { $0.kmsOperation == op }.count }

    /// Calls of `op` for the data keys of files (their encryption context names a file, not the volume key),
    /// optionally only those that named `keyId`.
    func fileCount(_ op: String, key keyId: String? = nil) -> Int {
        requests.filter { r in
            r.kmsOperation == op
                && ((r.json["EncryptionContext"] ?? r.json["SourceEncryptionContext"]) as? [String: String])?["kmsfs:file-id"] != nil
                && (keyId == nil || ["KeyId", "SourceKeyId", "DestinationKeyId"].contains { r.json[$0] as? String == keyId })
        }.count
    }

    /// Calls of `op` that named `keyId` (KeyId, SourceKeyId or DestinationKeyId).
    func count(_ op: String, key keyId: String) -> Int {
        requests.filter { r in
            r.kmsOperation == op && ["KeyId", "SourceKeyId", "DestinationKeyId"].contains { r.json[$0] as? String == keyId }
        }.count
    }

    private func acceptLoop() {
        while running.load(ordering: .relaxed) {
            let c = accept(listenFd, nil, nil)
            if c < 0 {
                if errno == EINTR { continue }
                return
            }
            accepted.add(1, ordering: .relaxed)
            let t = Thread { [self] in serve(c) }
            t.start()
        }
    }

    private func serve(_ fd: Int32) {
        defer { close(fd) }
        repeat {
            guard serveOne(fd) else { return }
        } while keepAlive
    }

    /// Answers one request; false when the connection should close.
    private func serveOne(_ fd: Int32) -> Bool {
        guard let request = TestHTTPServer.readRequest(fd) else { return false }
        log.withLock { $0.append(request) }
        switch handler(request) {
        case .respond(let r):
            var head = "HTTP/1.1 \(r.status) X\r\nContent-Length: \(r.body.count)\r\n" + (keepAlive ? "" : "Connection: close\r\n")
            for (k, v) in r.headers { head += "\(k): \(v)\r\n" }
            TestHTTPServer.writeAll(fd, Array((head + "\r\n").utf8) + r.body)
            return true
        case .forward(let port):
            let upstream = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(upstream) }
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            addr.sin_port = port.bigEndian
            let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(upstream, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            guard ok == 0 else { return false }
            // Ask for one answer per connection, then relay it.
            var raw = request.raw
            if let end = TestHTTPServer.find(Array("\r\n".utf8), in: raw) {
                raw.insert(contentsOf: Array("\r\nConnection: close".utf8), at: end)
            }
            TestHTTPServer.writeAll(upstream, raw)
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(upstream, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                TestHTTPServer.writeAll(fd, Array(buffer[0..<n]))
            }
            return false
        case .hangUp:
            return false
        }
    }

    static func readRequest(_ fd: Int32) -> Request? {
        var data = [UInt8]()
        var buffer = [UInt8](repeating: 0, count: 65536)
        var headerEnd: Int? = nil
        var contentLength = 0
        while true {
            if let h = headerEnd, data.count >= h + contentLength { break }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { return nil }
            data += buffer[0..<n]
            if headerEnd == nil, let e = find(Array("\r\n\r\n".utf8), in: data) {
                headerEnd = e + 4
                let head = String(decoding: data[0..<e], as: UTF8.self)
                for line in head.split(separator: "\r\n").dropFirst() {
                    if let c = line.firstIndex(of: ":"), line[..<c].lowercased() == "content-length" {
                        contentLength = Int(line[line.index(after: c)...].trimmingCharacters(in: .whitespaces)) ?? 0
                    }
                }
            }
        }
        let e = headerEnd!
        let head = String(decoding: data[0..<(e - 4)], as: UTF8.self)
        let lines = head.split(separator: "\r\n")
        let first = lines.first?.split(separator: " ") ?? []
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            if let c = line.firstIndex(of: ":") {
                headers[line[..<c].lowercased()] = line[line.index(after: c)...].trimmingCharacters(in: .whitespaces)
            }
        }
        return Request(method: first.count > 0 ? String(first[0]) : "", path: first.count > 1 ? String(first[1]) : "",
                       headers: headers, body: Array(data[e..<(e + contentLength)]), raw: Array(data[0..<(e + contentLength)]))
    }

    static func find(_ needle: [UInt8], in hay: [UInt8]) -> Int? {
        guard hay.count >= needle.count else { return nil }
        for i in 0...(hay.count - needle.count) where hay[i] == needle[0] && Array(hay[i..<(i + needle.count)]) == needle { return i }
        return nil
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
        var done = 0
        while done < bytes.count {
            // MSG_NOSIGNAL: a client that hung up must not kill the test process with SIGPIPE.
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            done += n
        }
    }
}
