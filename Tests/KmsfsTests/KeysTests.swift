import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Testing

@Suite("Local key provider and key service")
struct KeysTests {
    let context = EncryptionContext(["kmsfs:volume-id": "v", "kmsfs:file-id": "f", "team": "a"])

    @Test("Data keys unwrap only with the same key and the same encryption context")
    func wrapUnwrap() throws {
        let key = try LocalMasterKey.generate().key
        let provider = LocalKeyProvider(keys: [key])
        let (dek, wrapped) = try provider.generateDataKey(keyId: key.keyId, context: context)
        #expect(wrapped.provider == "local" && wrapped.keyId == key.keyId && wrapped.blob.count == 61)
        #expect(try provider.decrypt(wrapped, context: context).constantTimeEquals(dek))

        var otherContext = context.pairs
        otherContext["team"] = "b"
        #expect { try provider.decrypt(wrapped, context: EncryptionContext(otherContext)) } throws: { e in
            (e as? KeyError)?.errorType == "InvalidCiphertextException"
        }
        var flipped = wrapped
        flipped.blob[20] ^= 1
        #expect(throws: KeyError.self) { try provider.decrypt(flipped, context: context) }

        let other = try LocalMasterKey.generate().key
        #expect(other.keyId != key.keyId)
        let otherProvider = LocalKeyProvider(keys: [other])
        #expect { try otherProvider.decrypt(wrapped, context: context) } throws: { e in
            (e as? KeyError)?.kind == .keyUnavailable
        }
        // Wrapping under a second key and re-encrypting give the same data key.
        let both = LocalKeyProvider(keys: [key, other])
        let second = try both.encrypt(dataKey: dek, keyId: other.keyId, context: context)
        #expect(try both.decrypt(second, context: context).constantTimeEquals(dek))
        let moved = try both.reEncrypt(wrapped, toKeyId: other.keyId, context: context)
        #expect(moved.keyId == other.keyId)
        #expect(try both.decrypt(moved, context: context).constantTimeEquals(dek))
    }

    @Test("Key files are written 0600 in a 0700 directory, read back, and bad ones refused clearly")
    func keyFiles() throws {
        let dir = try TempDir()
        let path = dir.path + "/keys/sub/v.key"
        let (key, master) = try LocalMasterKey.generate()
        try LocalKeyFile.write(master, to: path, keyId: key.keyId)
        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_mode & 0o777 == 0o600)
        #expect(stat(dir.path + "/keys/sub", &st) == 0 && st.st_mode & 0o777 == 0o700)
        #expect(try LocalKeyFile.load(path: path).keyId == key.keyId)
        // Never overwritten.
        #expect(throws: KeyError.self) { try LocalKeyFile.write(master, to: path, keyId: key.keyId) }

        let text = String(decoding: try FileIO.readFile(path), as: UTF8.self)
        #expect(text.contains(key.keyId))
        let hexLine = text.split(separator: "\n").first { !$0.hasPrefix("#") }!
        #expect(hexLine.count == 64)

        func refused(_ contents: String, _ name: String) -> String {
            let p = dir.path + "/" + name
            try? FileIO.writeFileAtomically(p, contents: Array(contents.utf8), mode: 0o600)
            do {
                _ = try LocalKeyFile.load(path: p)
                return "accepted"
            } catch let e as KeyError {
                return e.message
            } catch {
                return "\(error)"
            }
        }
        #expect(refused("not a key\n", "a.key").contains("does not hold a kmsfs key"))
        #expect(refused(String(hexLine.dropLast()) + "\n", "b.key").contains("does not hold a kmsfs key"))
        #expect(refused(String(hexLine.dropLast()) + "g\n", "c.key").contains("does not hold a kmsfs key"))
        #expect(refused("# only a comment\n", "d.key").contains("does not hold a kmsfs key"))
        #expect(refused("  " + hexLine + "  \r\n", "e.key") == "accepted")
        #expect(throws: KeyError.self) { try LocalKeyFile.load(path: dir.path + "/missing.key") }
        // The error names the file but never its contents.
        #expect(!refused(String(hexLine.dropLast()) + "g\n", "f.key").contains(String(hexLine.prefix(16))))
    }

    @Test("The key service wraps under every configured key, tries them in order and falls back")
    func serviceFallback() throws {
        let dir = try TempDir()
        let a = try LocalMasterKey.generate().key
        let b = try LocalMasterKey.generate().key
        let audit = try AuditLog(path: dir.path + "/audit.log")
        let service = KeyService(provider: LocalKeyProvider(keys: [a, b]), keyIds: [a.keyId, b.keyId], audit: audit)
        let subject = KeySubject(path: "/x", fileId: [1, 2, 3])
        let (dek, wrapped) = try service.newDataKey(context: context, subject: subject)
        #expect(wrapped.map(\.keyId) == [a.keyId, b.keyId])

        let viaA = try service.unwrap(wrapped, context: context, subject: subject) { _ in true }
        #expect(viaA.constantTimeEquals(dek))

        // Only b's key loaded: the service falls back to the second wrapped key.
        let onlyB = KeyService(provider: LocalKeyProvider(keys: [b]), keyIds: [a.keyId, b.keyId], audit: audit)
        #expect(try onlyB.unwrap(wrapped, context: context, subject: subject) { _ in true }.constantTimeEquals(dek))

        // A key the commitment check rejects is skipped for the next one.
        var seen = 0
        let second = try service.unwrap(wrapped, context: context, subject: subject) { _ in seen += 1; return seen == 2 }
        #expect(second.constantTimeEquals(dek) && seen == 2)

        // Nothing unwraps: the most telling error comes back.
        let none = KeyService(provider: LocalKeyProvider(keys: []), keyIds: [a.keyId], audit: audit)
        #expect { try none.unwrap(wrapped, context: context, subject: subject) { _ in true } } throws: { e in
            (e as? KeyError)?.kind == .keyUnavailable
        }

        let lines = String(decoding: try FileIO.readFile(dir.path + "/audit.log"), as: UTF8.self).split(separator: "\n")
        #expect(lines.first?.contains("\"op\":\"GenerateDataKey\"") == true)
        #expect(lines.filter { $0.contains("\"op\":\"Encrypt\"") }.count == 1)
        #expect(lines.filter { $0.contains("\"op\":\"Decrypt\"") && $0.contains("\"result\":\"NotFoundException\"") }.count >= 2)
        #expect(lines.allSatisfy { $0.contains("\"path\":\"/x\"") && $0.contains("\"fileId\":\"010203\"") && $0.contains("\"latencyMs\":") })
    }
}
