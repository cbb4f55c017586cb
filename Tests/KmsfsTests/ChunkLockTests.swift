import Foundation
import Glibc
@testable import KmsfsFilesystem
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Synchronization
import Testing

/// The kernel serializes write(2) calls to one inode, but not page-cache writeback (mmap) against writes,
/// nor reads against writes. These tests call the filesystem's handlers directly from many threads, as the
/// multithreaded FUSE loop would, so the per-file read-modify-write lock is what keeps the data right.
@Suite("Per-file serialization of chunk read-modify-write")
struct ChunkLockTests {
    func makeFilesystem(_ dir: TempDir) throws -> EncryptedFilesystem {
        let (key, _) = try LocalMasterKey.generate()
        let volume = VolumeConfig(volumeId: try VolumeConfig.newVolumeId(), chunkSize: 4096, encryptionContext: [:],
                                  keyProvider: KeyProviderConfig(type: "local", keyIds: [key.keyId]))
        let keys = KeyService(provider: LocalKeyProvider(keys: [key]), keyIds: [key.keyId], audit: nil)
        return try EncryptedFilesystem(.init(cipherDir: dir.path, volume: volume, keys: keys, readOnly: false))
    }

    @Test("Concurrent writers of disjoint bytes of the same chunks lose no update; readers never see a torn chunk")
    func concurrentHandlers() throws {
        let dir = try TempDir()
        let fs = try makeFilesystem(dir)
        let (_, _, first) = try fs.create(fs.inodes.root, Array("f".utf8), 0o644, O_RDWR, Caller(uid: 0, gid: 0))
        let size = 4 * 4096
        let zeros = [UInt8](repeating: 0, count: size)
        _ = try zeros.withUnsafeBytes { try fs.write(first, from: $0.baseAddress!, count: size, offset: 0) }
        let threads = 8
        let failures = Mutex<[String]>([])
        let results = Mutex<[[UInt8]]>(Array(repeating: [], count: threads))
        let writing = Atomic<Int>(threads)

        DispatchQueue.concurrentPerform(iterations: threads + 2) { t in
            if t >= threads {
                // Readers: every whole-file read succeeds while the writers run.
                var buffer = [UInt8](repeating: 0, count: size)
                while writing.load(ordering: .relaxed) > 0 {
                    do {
                        let n = try buffer.withUnsafeMutableBytes { try fs.read(first, into: $0.baseAddress!, count: size, offset: 0) }
                        if n != size { failures.withLock { $0.append("short read \(n)") } }
                    } catch {
                        failures.withLock { $0.append("read: \(error)") }
                        return
                    }
                }
                return
            }
            defer { writing.subtract(1, ordering: .relaxed) }
            var rng = SeededRandom(seed: UInt64(t))
            var mine = [UInt8](repeating: 0, count: size)
            for _ in 0..<400 {
                let chunk = Int.random(in: 0..<4, using: &rng)
                let at = chunk * 4096 + t * 512 + Int.random(in: 0..<500, using: &rng)
                let data = rng.bytes(Int.random(in: 1...12, using: &rng))
                do {
                    _ = try data.withUnsafeBytes { try fs.write(first, from: $0.baseAddress!, count: data.count, offset: at) }
                } catch {
                    failures.withLock { $0.append("write: \(error)") }
                    return
                }
                mine.replaceSubrange(at..<(at + data.count), with: data)
            }
            let final = mine
            results.withLock { $0[t] = final }
        }
        #expect(failures.withLock { $0 } == [])
        var content = [UInt8](repeating: 0, count: size)
        _ = try content.withUnsafeMutableBytes { try fs.read(first, into: $0.baseAddress!, count: size, offset: 0) }
        let expected = results.withLock { $0 }
        for t in 0..<threads {
            for c in 0..<4 {
                let r = (c * 4096 + t * 512)..<(c * 4096 + (t + 1) * 512)
                #expect(Array(content[r]) == Array(expected[t][r]), "thread \(t), chunk \(c)")
            }
        }
        fs.releaseFile(first)
        #expect(fs.openFileCount == 0)
    }
}
