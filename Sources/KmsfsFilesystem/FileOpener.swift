import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Opening an existing encrypted file: read its header, unwrap its data key through the key service with
/// the header's encryption context, and accept the key only if it matches the key commitment and the header
/// MAC. Used by the mount on first open and by the offline tools.
public struct OpenedHeader: Sendable {
    public let header: FileHeader
    public let keys: FileKeys
}

public enum FileOpener {
    /// Why a file could not be opened.
    public enum Failure: Error, CustomStringConvertible {
        /// The header is damaged, foreign, or belongs to another volume.
        case header(FormatError)
        /// No wrapped key could be unwrapped (the most telling provider error).
        case key(KeyError)

        public var description: String {
            switch self {
            case .header(let e): return "\(e)"
            case .key(let e):
                return "cannot unwrap the data key with key \(e.keyId): \(e.typeAndDetail)\(e.alsoTriedText)"
            }
        }
    }

    /// Reads the header of an open backing file.
    public static func readHeader(fd: Int32) throws(Failure) -> FileHeader {
        do {
            // One read covers the header of almost every file; a longer one (many wrapped keys) takes a second.
            let first = 4096
            let bytes: [UInt8] = try BufferPool.shared.withBuffer(first) { buffer in
                // (A named file's header is complete, so a short read of it is read again: `FileIO.preadStored`.)
                var n = try FileIO.pread(fd, buffer, count: first, offset: 0)
                if n < FileHeader.prefixSize {
                    n = try FileIO.preadStored(fd, buffer, count: FileHeader.prefixSize, offset: 0).count
                }
                guard n >= FileHeader.prefixSize else { throw FormatError.truncatedHeader }
                let length = try HeaderPrefix(UnsafeRawBufferPointer(start: buffer, count: FileHeader.prefixSize)).headerLength
                if length <= first {
                    if n < length { n = try FileIO.preadStored(fd, buffer, count: length, offset: 0).count }
                    guard n >= length else { throw FormatError.truncatedHeader }
                    return Array(UnsafeRawBufferPointer(start: buffer, count: length))
                }
                var all = [UInt8](repeating: 0, count: length)
                let m = try all.withUnsafeMutableBytes { try FileIO.preadStored(fd, $0.baseAddress!, count: length, offset: 0).count }
                guard m == length else { throw FormatError.truncatedHeader }
                return all
            }
            return try FileHeader(decoding: bytes)
        } catch let e as FormatError {
            throw .header(e)
        } catch {
            throw .header(.malformedHeader("cannot read: \(error)"))
        }
    }

    /// Reads, unwraps and authenticates the header of an open backing file of volume `volumeId`.
    public static func open(fd: Int32, volumeId: String, keys: KeyService, path: String) throws(Failure) -> OpenedHeader {
        try open(header: try readHeader(fd: fd), volumeId: volumeId, keys: keys, path: path)
    }

    /// Unwraps and authenticates a header already read.
    public static func open(header: FileHeader, volumeId: String, keys: KeyService, path: String) throws(Failure) -> OpenedHeader {
        do {
            try header.checkContext(volumeId: volumeId)
        } catch let e as FormatError {
            throw .header(e)
        } catch {
            throw .header(.malformedHeader("\(error)"))
        }
        var accepted: FileKeys?
        var rejection: FormatError?
        do {
            let dataKey = try keys.unwrap(header.wrappedKeys, context: header.context,
                                          subject: KeySubject(path: path, fileId: header.fileId)) { candidate in
                do {
                    let k = try FileKeys(dataKey: candidate, fileId: header.fileId)
                    try header.authenticate(with: k)
                    accepted = k
                    return true
                } catch let e as FormatError {
                    rejection = e
                    return false
                } catch {
                    return false
                }
            }
            dataKey.wipe()
        } catch let e as KeyError {
            // A key that unwrapped but failed the header checks means the header was altered.
            if e.errorType == "KeyCommitmentMismatch", let r = rejection { throw .header(r) }
            throw .key(e)
        } catch {
            throw .key(KeyError(.other, errorType: "InternalError", keyId: "", message: "\(error)"))
        }
        return OpenedHeader(header: header, keys: accepted!)
    }
}
