import Glibc
import KmsfsSystem
import Testing

@Suite("System helpers")
struct SystemTests {
    @Test("A directory entry's name is read where it lies, never past its record (the last entry of a buffer that ends at unmapped memory)")
    func directoryEntryNameStaysInItsRecord() throws {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let base = mmap(nil, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        #expect(base != MAP_FAILED)
        guard let base, base != MAP_FAILED else { return }
        defer { munmap(base, 2 * page) }
        // The second page is a guard: touching it kills the process.
        #expect(mprotect(base + page, page, PROT_NONE) == 0)
        // A 24-byte record (d_ino, d_off, d_reclen, d_type, "ab\0", padding) ending at the guard page, as
        // getdents64 lays records out; struct dirent itself is 280 bytes.
        let record = base + page - 24
        record.storeBytes(of: UInt64(7), toByteOffset: 0, as: UInt64.self)
        record.storeBytes(of: Int64(24), toByteOffset: 8, as: Int64.self)
        record.storeBytes(of: UInt16(24), toByteOffset: 16, as: UInt16.self)
        record.storeBytes(of: UInt8(DT_REG), toByteOffset: 18, as: UInt8.self)
        for (i, b) in Array("ab".utf8 + [0]).enumerated() { record.storeBytes(of: b, toByteOffset: 19 + i, as: UInt8.self) }
        let entry = record.assumingMemoryBound(to: dirent.self)
        #expect(DirectoryEntry.name(entry) == "ab")
        #expect(DirectoryEntry.nameBytes(entry) == Array("ab".utf8))
    }
}
