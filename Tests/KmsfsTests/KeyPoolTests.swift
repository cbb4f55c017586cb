import Foundation
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsSystem
import Synchronization
import Testing

/// Lines of the audit log for one op, by file ID.
private func fileIds(_ v: MountedVolume, op: String, path: String? = nil) -> [String] {
    v.auditLines().filter { $0["op"] as? String == op && (path == nil || $0["path"] as? String == path) }
        .compactMap { $0["fileId"] as? String }
}

private func headerFileId(_ path: String) throws -> String {
    Hex.encode(try FileHeader(decoding: try P.readFile(path)).fileId)
}

@Suite("Data keys made ahead for new files")
struct KeyPoolTests {
    @Test("Every pooled key was made for the file that uses it, is handed over once, and every key is wiped by unmount")
    func poolLifecycle() throws {
        let v = try MountedVolume(mountArgs: ["--key-pool", "8"])
        for i in 0..<30 { try P.writeFile(v.path("f\(i)"), Array("file \(i)".utf8)) }
        // The first create made its own key; later ones found keys made ahead.
        let assigned = fileIds(v, op: "AssignDataKey")
        #expect(assigned.count >= 1 && assigned.count <= 29)
        let generated = Set(fileIds(v, op: "GenerateDataKey"))
        for i in 0..<30 {
            let id = try headerFileId(v.backing("f\(i)"))
            // The key was generated under this file's own ID (its encryption context), exactly once ...
            #expect(fileIds(v, op: "GenerateDataKey").filter { $0 == id }.count == 1, "f\(i)")
            // ... either at create time for this path, or ahead of time and then handed to this path.
            let madeHere = fileIds(v, op: "GenerateDataKey", path: "/f\(i)").contains(id)
            let handedOver = fileIds(v, op: "AssignDataKey", path: "/f\(i)").contains(id)
            #expect(madeHere != handedOver, "f\(i)")
            #expect(try P.readFile(v.path("f\(i)")) == Array("file \(i)".utf8))
        }
        // At most `--key-pool` keys wait at any time: made minus used.
        #expect(generated.count - 30 <= 8)
        try v.unmount()
        // Unmounting wiped the keys still waiting in the pool: every key made was wiped.
        #expect(Set(fileIds(v, op: "DiscardKey")).isSuperset(of: generated))
        #expect(try v.offlineContents("f7") == Array("file 7".utf8))
    }

    @Test("A key nobody takes is wiped after --key-pool-age, and an idle pool is not refilled")
    func poolKeysAge() throws {
        let v = try MountedVolume(mountArgs: ["--key-pool", "4", "--key-pool-age", "1"])
        try P.writeFile(v.path("f"), [1])
        #expect(waitFor { fileIds(v, op: "GenerateDataKey", path: "").count >= 4 })
        // Keys made ahead and never used are wiped once they are a second old.
        #expect(waitFor { fileIds(v, op: "DiscardKey", path: "").count >= 4 })
        let made = fileIds(v, op: "GenerateDataKey", path: "").count
        let wiped = Set(fileIds(v, op: "DiscardKey", path: ""))
        #expect(wiped.isSuperset(of: Set(fileIds(v, op: "GenerateDataKey", path: ""))))
        // No demand since: nothing more is made.
        usleep(1_500_000)
        #expect(fileIds(v, op: "GenerateDataKey", path: "").count == made)
    }

    @Test("--key-pool 0 makes every key at create time")
    func poolOff() throws {
        let v = try MountedVolume(mountArgs: ["--key-pool", "0"])
        for i in 0..<5 { try P.writeFile(v.path("f\(i)"), [UInt8(i)]) }
        #expect(fileIds(v, op: "AssignDataKey").isEmpty)
        for i in 0..<5 {
            #expect(fileIds(v, op: "GenerateDataKey", path: "/f\(i)") == [try headerFileId(v.backing("f\(i)"))])
        }
        #expect(v.auditCount("GenerateDataKey") == 5)
    }
}

@Suite("Data keys made ahead, with AWS KMS", .serialized)
struct AWSKeyPoolTests {
    let moto: Moto
    init() throws { moto = try Moto.shared.get() }

    func volume(_ key: String, _ proxy: KMSProxy, mountArgs: [String]) throws -> MountedVolume {
        var env = moto.clientEnvironment
        env["AWS_ENDPOINT_URL"] = proxy.url
        return try MountedVolume(chunkSize: 4096, initArgs: ["--kms", "aws", "--key-id", key], mountArgs: mountArgs, environment: env)
    }

    @Test("With keys made ahead, creating files needs no KMS call, and each key's GenerateDataKey carried its file's context")
    func createsDoNotWaitForKMS() throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(key, proxy, mountArgs: ["--key-pool", "16"])
        try P.writeFile(v.path("first"), [0])
        #expect(waitFor { fileIds(v, op: "GenerateDataKey", path: "").count >= 16 })
        // The KMS stops answering: files are still created, written and read back.
        proxy.setAll(.held)
        for i in 0..<10 { try P.writeFile(v.path("f\(i)"), Array("pooled \(i)".utf8)) }
        let fd = try P.open(v.path("f3"), O_RDONLY)
        defer { close(fd) }
        proxy.setAll(.none)
        #expect(try P.pread(fd, 8, 0) == Array("pooled 3".utf8))
        // The request that made each file's key named that file.
        let contexts = proxy.server.requests.filter { $0.kmsOperation == "GenerateDataKey" }
            .compactMap { ($0.json["EncryptionContext"] as? [String: String])?["kmsfs:file-id"] }
        for i in 0..<10 {
            #expect(contexts.contains(try headerFileId(v.backing("f\(i)"))), "f\(i)")
            #expect(fileIds(v, op: "AssignDataKey", path: "/f\(i)").count == 1, "f\(i)")
        }
    }

    @Test("Unmounted while refills wait on the KMS: the daemon waits for them, wipes and audits every key they made, and exits 0")
    func unmountDuringRefill() throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(key, proxy, mountArgs: ["--key-pool", "8"])
        try P.writeFile(v.path("first"), [0])
        #expect(waitFor { fileIds(v, op: "GenerateDataKey", path: "").count >= 8 })
        // Refills now hang in the KMS: taking pooled keys starts refills that do not come back.
        proxy.setAll(.held)
        for i in 0..<6 { try P.writeFile(v.path("f\(i)"), [UInt8(i)]) }
        try #require(waitFor { proxy.heldCalls > 0 })
        let inFlight = proxy.heldCalls
        // The KMS answers again a moment after the unmount began.
        let release = Thread {
            usleep(700_000)
            proxy.setAll(.none)
        }
        release.start()
        #expect(try v.unmount() == 0)
        // Every key made ahead, those in flight at the unmount included, was handed to a file or wiped.
        let generated = Set(fileIds(v, op: "GenerateDataKey", path: ""))
        let accounted = Set(fileIds(v, op: "AssignDataKey")).union(fileIds(v, op: "DiscardKey"))
        #expect(generated.count >= 8 + inFlight)
        #expect(accounted.isSuperset(of: generated), "made ahead but neither used nor wiped: \(generated.subtracting(accounted))")
    }

    @Test("A burst of creates never has more KMS calls in flight than --kms-max-inflight")
    func inFlightBound() throws {
        let key = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(key, proxy, mountArgs: ["--key-pool", "0", "--kms-max-inflight", "3"])
        proxy.setAll(.held)
        let done = Atomic<Int>(0)
        var threads: [Thread] = []
        for t in 0..<6 {
            try syscall { mkdir(v.path("d\(t)"), 0o755) }
            let dir = v.path("d\(t)")
            let th = Thread {
                for i in 0..<3 { _ = try? P.writeFile(dir + "/f\(i)", [UInt8(i)]) }
                done.add(1, ordering: .relaxed)
            }
            th.start()
            threads.append(th)
        }
        // Six creators in six directories: three calls reach the KMS, the others wait for a slot.
        #expect(waitFor { proxy.heldCalls == 3 })
        usleep(500_000)
        #expect(proxy.heldCalls == 3)
        proxy.setAll(.none)
        #expect(waitFor(seconds: 30) { done.load(ordering: .relaxed) == 6 })
        for t in 0..<6 {
            for i in 0..<3 { #expect(try P.readFile(v.path("d\(t)/f\(i)")) == [UInt8(i)]) }
        }
    }

    @Test("rewrap makes its ReEncrypt calls several at a time, and every file stays readable")
    func parallelRewrap() throws {
        let k1 = try moto.createKey(), k2 = try moto.createKey()
        let proxy = try KMSProxy(upstream: moto)
        let v = try volume(k1, proxy, mountArgs: ["--key-pool", "0"])
        for i in 0..<12 { try P.writeFile(v.path("f\(i)"), Array("rotate \(i)".utf8)) }
        try v.unmount()
        // Calls naming the old key (every ReEncrypt's source) are held; DescribeKey of the new one is not.
        proxy.set(.held, forKey: k1)
        let env = v.environment
        let result = Mutex<CommandResult?>(nil)
        let cipher = v.cipher
        let runner = Thread {
            let r = try? run(kmsfsBinary, ["rewrap", "--jobs", "4", "--key-id", k2, cipher], environment: env)
            result.withLock { $0 = r }
        }
        runner.start()
        #expect(waitFor(seconds: 30) { proxy.heldCalls == 4 })
        usleep(300_000)
        #expect(proxy.heldCalls == 4)
        proxy.set(.none, forKey: k1)
        #expect(waitFor(seconds: 60) { result.withLock { $0 } != nil })
        let r = result.withLock { $0 }
        #expect(r?.status == 0, "\(r?.stderr ?? "")")
        #expect(proxy.fileCount("ReEncrypt") == 12)
        for i in 0..<12 {
            let header = try FileHeader(decoding: try P.readFile(v.backing("f\(i)")))
            #expect(header.wrappedKeys.map(\.keyId) == [k2])
        }
        try v.start()
        for i in 0..<12 { #expect(try P.readFile(v.path("f\(i)")) == Array("rotate \(i)".utf8)) }
    }
}
