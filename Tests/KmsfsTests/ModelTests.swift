import Foundation
import Glibc
import KmsfsSystem
import Testing

/// Random writes, truncates and reads through a real mount, checked against an in-memory model after every
/// operation, then checked again by decrypting the backing files offline and after a remount.
@Suite("Random operations against a model", .serialized)
struct ModelTests {
    struct Variant: CustomTestStringConvertible, Sendable {
        let name: String
        let chunkSize: Int
        let mountArgs: [String]
        let operations: Int
        let maxSpan: Int
        var testDescription: String { name }
    }

    static let variants = [
        // direct_io: every read and write reaches kmsfs with the application's own offsets and sizes.
        Variant(name: "4 KiB chunks, direct I/O", chunkSize: 4096, mountArgs: ["--direct-io"], operations: 2500, maxSpan: 3 * 4096),
        // The page cache in between: the kernel's own request sizes, readahead and cached pages.
        Variant(name: "64 KiB chunks, page cache", chunkSize: 65536, mountArgs: [], operations: 1500, maxSpan: 3 * 65536),
        // The kernel caches writes and sends them later, in its own batches, and reads pages back around them.
        Variant(name: "4 KiB chunks, writeback cache", chunkSize: 4096, mountArgs: ["--writeback-cache"], operations: 1500, maxSpan: 5 * 4096),
    ]

    @Test("Random operations match the model", arguments: variants)
    func randomOperations(variant: Variant) throws {
        // KMSFS_TEST_SEED replays a failed run's seed.
        let seed = ProcessInfo.processInfo.environment["KMSFS_TEST_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 0...UInt64.max)
        var rng = SeededRandom(seed: seed)
        let volume = try MountedVolume(chunkSize: variant.chunkSize, mountArgs: variant.mountArgs)
        let C = variant.chunkSize
        var models: [String: [UInt8]] = [:]

        for fileIndex in 0..<3 {
            let name = "model-\(fileIndex)"
            let model: [UInt8]?
            do {
                model = try ModelTests.exercise(paths: [volume.path(name)], rng: &rng, chunkSize: C, operations: variant.operations,
                                                maxSpan: variant.maxSpan, label: "seed \(seed), file \(fileIndex)")
            } catch {
                // An error from the mount: the daemon's log says why.
                Issue.record("\(error) (seed \(seed), file \(fileIndex)); daemon log:\n\(volume.daemonLogText.suffix(3000))")
                return
            }
            guard let model else { return }
            models[name] = model
        }

        // What is on disk decrypts to the model without the mount, and reads back after a remount.
        try volume.unmount()
        for (name, model) in models {
            let offline = try volume.offlineContents(name)
            #expect(offline != nil, "offline decryption of \(name) failed (seed \(seed))")
            let diff = difference(offline ?? [], model)
            #expect(diff == nil, "offline decryption of \(name): \(diff ?? "") (seed \(seed))")
        }
        try volume.start(variant.mountArgs)
        for (name, model) in models {
            let diff = difference(try P.readFile(volume.path(name)), model)
            #expect(diff == nil, "\(name) after remount: \(diff ?? "") (seed \(seed))")
        }
    }

    /// Random writes, truncates, reads and reopens of one file, checked against a model after each; the file is
    /// reached through `paths` (one per host: with two, operations move between hosts now and then, each move
    /// closing the file on one host and opening it on the other, as close-to-open consistency asks). Returns
    /// the model, or nil after recording a mismatch.
    static func exercise(paths: [String], rng: inout SeededRandom, chunkSize C: Int, operations: Int, maxSpan: Int,
                         label: String) throws -> [UInt8]? {
        var model = [UInt8]()
        var host = 0
        var fd = try P.open(paths[host], O_RDWR | O_CREAT | O_EXCL)
        // (fd is -1 between a close and the next open: a failed reopen must not close a number another test got.)
        defer { if fd >= 0 { close(fd) } }
        for step in 0..<operations {
            let where_ = "\(label), step \(step), host \(host)"
            let limit = max(model.count + 2 * C, 4 * C)
            if paths.count > 1 && Int.random(in: 0..<100, using: &rng) < 30 {
                close(fd)
                fd = -1
                host = (host + 1) % paths.count
                fd = try P.open(paths[host], O_RDWR)
            }
            switch Int.random(in: 0..<100, using: &rng) {
            case 0..<45:
                // Offsets near chunk boundaries half of the time.
                let offset = Bool.random(using: &rng)
                    ? Int.random(in: 0...limit, using: &rng)
                    : max(0, C * Int.random(in: 0...(limit / C), using: &rng) + Int.random(in: -3...3, using: &rng))
                let length = Int.random(in: 1...maxSpan, using: &rng)
                let data = rng.bytes(length)
                try P.pwrite(fd, data, offset)
                if offset > model.count { model += [UInt8](repeating: 0, count: offset - model.count) }
                let overlap = min(model.count - offset, length)
                model.replaceSubrange(offset..<(offset + overlap), with: data[0..<overlap])
                model += data[overlap...]
            case 45..<60:
                let size = Bool.random(using: &rng)
                    ? Int.random(in: 0...limit, using: &rng)
                    : max(0, C * Int.random(in: 0...(limit / C), using: &rng) + Int.random(in: -2...2, using: &rng))
                try syscall { ftruncate(fd, off_t(size)) }
                if size < model.count { model.removeSubrange(size...) } else { model += [UInt8](repeating: 0, count: size - model.count) }
            case 60..<95:
                let offset = Int.random(in: 0...(model.count + C), using: &rng)
                let length = Int.random(in: 1...maxSpan, using: &rng)
                let got = try P.pread(fd, length, offset)
                let expected = offset >= model.count ? [] : Array(model[offset..<min(model.count, offset + length)])
                let diff = difference(got, expected)
                #expect(diff == nil, "read \(length) at \(offset): \(diff ?? "") (\(where_))")
                if diff != nil { return nil }
            default:
                // Reopen: a new handle, and a fresh read of the backing file (the page cache is dropped on open).
                close(fd)
                fd = -1
                fd = try P.open(paths[host], O_RDWR)
            }
            let size = Int(try P.fstat(fd).st_size)
            #expect(size == model.count, "size \(size) != \(model.count) (\(where_))")
            if size != model.count { return nil }
        }
        for p in paths {
            // The size as an open sees it (a plain stat may show what another host's backing filesystem client
            // still caches, as NFS's stat may within actimeo).
            let check = try P.open(p, O_RDONLY)
            let size = Int(try P.fstat(check).st_size)
            close(check)
            #expect(size == model.count, "size through \(p): \(size) != \(model.count) (\(label))")
            let whole = difference(try P.readFile(p), model)
            #expect(whole == nil, "whole-file read through \(p): \(whole ?? "") (\(label))")
            if whole != nil { return nil }
        }
        return model
    }
}

