import CSystem
import Glibc
import KmsfsCrypto
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem
import Synchronization

/// Opening, creating, reading, writing and resizing regular files.
extension EncryptedFilesystem {
    /// Opens a regular file. Reads and checks its header (no key needed); the data key is unwrapped only when
    /// a handle of the file first needs it, and only if no other handle already did.
    func open(_ inode: Inode, flags: Int32) throws -> FileHandle {
        guard inode.type == S_IFREG else { throw Errno.EISDIR }
        let writable = flags & O_ACCMODE != O_RDONLY
        if writable { try checkWritable() }
        let backingFlags = self.backingFlags(flags)
        let opened = try withNode(inode, { dfd, name in
            try syscall { openat(dfd, name, backingFlags | O_NOFOLLOW) }
        }, viaDescriptor: { fd in
            try syscall { Glibc.open("/proc/self/fd/\(fd)", backingFlags) }
        })
        let (fd, fdWritable) = writable ? sharedDescriptor(opened) : (opened, false)
        let handle: FileHandle
        do {
            var st = stat()
            try syscall { fstat(fd, &st) }
            guard InodeKey(st) == inode.key else { throw Errno(ESTALE) }
            var header: FileHeader? = nil
            let layout: ChunkLayout
            if let open = table.lookup(inode.key) {
                layout = open.layout
            } else {
                // The first handle: check the header's structure and context now, so that damage shows at open.
                do {
                    let h = try FileOpener.readHeader(fd: fd)
                    try h.checkContext(volumeId: volume.volumeId)
                    if let u = uniformLayout, h.headerLength != u.headerLength, !followUniformHeaderLength() {
                        throw FormatError.malformedHeader("header length \(h.headerLength) differs from the volume's \(u.headerLength)")
                    }
                    // Format 3: even an empty file holds a marker after its header, so one cut to its header is damaged.
                    if h.layout.marksEmptyFile, st.st_size < h.layout.backingSize(plaintextSize: 0) {
                        throw FormatError.malformedHeader("the file was cut to \(st.st_size) bytes, shorter than its header and the empty-file marker every file of this volume holds (damaged, or emptied behind kmsfs's back)")
                    }
                    if h.layout.marksEmptyFile && volumeKeys == nil {
                        throw FormatError.malformedHeader("an empty-file marker flag in a volume without a volume key")
                    }
                    header = h
                    layout = h.layout
                } catch {
                    Log.shared.log(.error, "cannot open \(mountPath(of: inode)): \(error)", event: "open-failed",
                                   fields: ["file": mountPath(of: inode), "error": "\(error)"])
                    throw Errno.EIO
                }
            }
            // A bound file must carry the tags of the names it was reached by (checked at its first open; names
            // found later are checked at lookup). A rename may move the recorded name meanwhile: a failed check is
            // tried once more with the names then recorded.
            if bindsNames, let h = header {
                func check() throws {
                    for (parent, name) in inodes.names(of: inode) {
                        try checkBinding(path: Self.nodePath(fd), nodeId: h.fileId, parent: parent, name: name, quiet: true) { mountPath(of: inode) }
                    }
                }
                do {
                    try check()
                } catch {
                    try checkBinding(path: Self.nodePath(fd), nodeId: h.fileId, names: inodes.names(of: inode)) { mountPath(of: inode) }
                }
            }
            inodes.setLayout(.known(layout), of: inode)
            let file = try table.acquire(inode.key, fd: fd, path: { [unowned self] in mountPath(of: inode) }, layout: layout,
                                         size: { layout.plaintextSize(backingSize: try FileIO.syncedSize(fd)) }, header: header,
                                         emptyMarker: {
                                             // Made for a new entry only (another handle's entry may have gone meanwhile).
                                             guard layout.marksEmptyFile, let k = volumeKeys else { return nil }
                                             return try k.emptyFileMarker(fileId: try header?.fileId ?? Self.fileId(fd))
                                         })
            handle = FileHandle(fd: fd, file: file, writable: writable, append: flags & O_APPEND != 0, fdWritable: fdWritable)
        } catch {
            close(fd)
            throw error
        }
        do {
            if writable && flags & O_TRUNC != 0 {
                try withIO(handle, exclusive: true) { try $0.truncateToZero() }
            } else if shared {
                // Close-to-open: the size as the backing file has it now (another host may have written since
                // this host last looked), and an empty file's marker checked.
                try withIO(handle, exclusive: false) { c in
                    if flags & O_ACCMODE != O_WRONLY && handle.file.size == 0 { try c.checkEmpty() }
                }
            } else if flags & O_ACCMODE != O_WRONLY && handle.file.size == 0 {
                // Reading an empty file reads nothing (the kernel does not even ask): its marker is checked now.
                try handle.file.io.withReadLock { try handle.content.checkEmpty() }
            }
        } catch {
            releaseFile(handle)
            throw error
        }
        return handle
    }

    /// Creates a new encrypted file with a fresh data key and opens it. The header is written to an unnamed
    /// file (O_TMPFILE) that is linked into place only when complete, so no headerless file is ever visible.
    func create(_ parent: Inode, _ name: [UInt8], _ mode: mode_t, _ flags: Int32, _ caller: Caller) throws -> (Inode, stat, FileHandle) {
        try checkWritable()
        let b = try withEntry(parent, name, creating: true) { _, b in b }
        let n = b.name
        let path = mountPath(of: parent, name)
        let fresh: FreshFileKey
        do {
            fresh = try pool.take(path: path)
        } catch let e as KeyError {
            // One line per failed create (rate-limited when the same failure repeats), naming key, error and outcome.
            FailureLog.shared.log(.error, kind: "create-\(e.keyId)-\(e.errorType)",
                                  "cannot create \(path): no data key from key \(e.keyId): \(e.typeAndDetail)\(e.alsoTriedText)",
                                  event: "create-failed", fields: ["file": path, "keyId": e.keyId, "error": e.errorType])
            throw e.kind == .accessDenied ? Errno.EACCES : Errno.EIO
        }
        var created = false
        defer {
            // A key made for a file that was not created after all: its wipe is audited like any other.
            if !created { keys.recordDiscard(subject: KeySubject(path: path, fileId: fresh.fileId)) }
        }
        let fileKeys: FileKeys
        do {
            fileKeys = try fresh.derived ?? FileKeys(dataKey: fresh.dataKey, fileId: fresh.fileId)
        } catch {
            fresh.dataKey.wipe()
            throw error
        }
        fresh.dataKey.wipe()
        let header: FileHeader
        let marksEmpty = volume.formatVersion >= 3
        do {
            header = try FileHeader(fileId: fresh.fileId, chunkSize: volume.chunkSize, context: fresh.context,
                                    wrappedKeys: fresh.wrapped, keys: fileKeys, length: uniformLayout?.headerLength, marksEmptyFile: marksEmpty)
        } catch FormatError.headerTooLong(let needed, let length) {
            giveUpUniformHeaderLength(because: "the header of \(path) needs \(needed) bytes, more than the volume's uniform \(length)")
            header = try FileHeader(fileId: fresh.fileId, chunkSize: volume.chunkSize, context: fresh.context,
                                    wrappedKeys: fresh.wrapped, keys: fileKeys, marksEmptyFile: marksEmpty)
        }
        let secrets = FileSecrets(chunkKey: fileKeys.chunkKey, fileId: fresh.fileId, layout: header.layout)
        let tag = bindsNames ? try bindingTag(try knownDirectoryId(parent), fresh.fileId, n) : nil
        // The header, and in format 3 the marker of an empty file.
        var bytes = header.encoded()
        var marker: [UInt8]? = nil
        if marksEmpty, let k = volumeKeys {
            marker = try k.emptyFileMarker(fileId: fresh.fileId)
            bytes += marker!
        }

        let createdFile: (Inode, stat, FileHandle)? = try inodes.withDirectory(parent) { dfd in
            // Again, right before the backing store is touched: the key may have taken a while.
            try checkWritable()
            try placeSibling(b, in: dfd)
            let made: Int32?
            do {
                made = try createLinked(dfd, n, mode: mode, exclusive: flags & O_EXCL != 0, caller: caller, fill: { fd in
                    try bytes.withUnsafeBytes { try FileIO.pwrite(fd, $0.baseAddress!, count: $0.count, offset: 0) }
                    if let t = tag { try Self.setTags([t], onNew: fd) }
                })
            } catch {
                removeSibling(b, in: dfd)
                throw error
            }
            guard let madeFd = made else { return nil }
            let (fd, fdWritable) = sharedDescriptor(madeFd)
            do {
                var st = stat()
                try syscall { fstat(fd, &st) }
                let inode = inodes.remember(parent: parent, name: n, st: st)
                inodes.setLayout(.known(header.layout), of: inode)
                do {
                    let file = try table.acquire(inode.key, fd: fd, path: { path }, layout: header.layout, size: { 0 },
                                                                emptyMarker: { marker }, secrets: secrets)
                    st.st_size = 0
                    return (inode, st, FileHandle(fd: fd, file: file, writable: true, append: flags & O_APPEND != 0, fdWritable: fdWritable))
                } catch {
                    forget(inode.nodeId, count: 1)
                    throw error
                }
            } catch {
                close(fd)
                throw error
            }
        }
        if let c = createdFile {
            created = true
            return c
        }
        // Another creator won the race and the caller did not ask for O_EXCL: open that file instead.
        secrets.wipe()
        let (inode, _) = try lookup(parent, name)
        do {
            let handle = try open(inode, flags: flags & ~O_CREAT)
            do {
                return (inode, try getattr(inode), handle)
            } catch {
                releaseFile(handle)
                throw error
            }
        } catch {
            forget(inode.nodeId, count: 1)
            throw error
        }
    }

    /// Creates `name` in directory `dfd` with its content written by `fill` before it becomes visible. Returns
    /// the open descriptor, or nil when the name appeared meanwhile and `exclusive` is false.
    private func createLinked(_ dfd: Int32, _ name: String, mode: mode_t, exclusive: Bool, caller: Caller,
                              fill: (Int32) throws -> Void) throws -> Int32? {
        if backing.tmpfileLink {
            let tmp = openat(dfd, ".", kmsfs_o_tmpfile() | O_RDWR | O_CLOEXEC, mode)
            if tmp >= 0 {
                do {
                    try fill(tmp)
                    giveToCaller(fd: tmp, caller)
                    if shared { try syscall { Glibc.fsync(tmp) } }
                    // AT_EMPTY_PATH links the descriptor itself (it needs CAP_DAC_READ_SEARCH); else through /proc.
                    if linkat(tmp, "", dfd, name, AT_EMPTY_PATH_FLAG) == 0 { return tmp }
                    if [ENOENT, EPERM].contains(Errno.current.code),
                       linkat(AT_FDCWD, "/proc/self/fd/\(tmp)", dfd, name, AT_SYMLINK_FOLLOW) == 0 { return tmp }
                    let e = Errno.current
                    if e.code == EEXIST && !exclusive { close(tmp); return nil }
                    throw e
                } catch {
                    close(tmp)
                    throw error
                }
            } else if ![EOPNOTSUPP, EISDIR, EINVAL].contains(Errno.current.code) {
                throw Errno.current
            }
        }
        if backing.renameNoReplace || backing.hardLinks {
            // Made complete under a temporary name, then given its name without replacing anything: the name
            // never shows a file without its header.
            let temp = TemporaryNames.make()
            let fd = openat(dfd, temp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
            if fd < 0 { throw Errno.current }
            var placed = false
            defer {
                if !placed {
                    close(fd)
                    unlinkat(dfd, temp, 0)
                }
            }
            try fill(fd)
            giveToCaller(fd: fd, caller)
            // Shared mode: the header reaches the backing filesystem before the name does, so another host never
            // opens the name and finds a file its client has not been sent yet (a distributed filesystem's
            // client may hold written data until fsync or close).
            if shared { try syscall { Glibc.fsync(fd) } }
            if backing.renameNoReplace {
                if kmsfs_renameat2(dfd, temp, dfd, name, kmsfs_rename_noreplace()) == 0 {
                    placed = true
                    return fd
                }
            } else if linkat(dfd, temp, dfd, name, 0) == 0 {
                unlinkat(dfd, temp, 0)
                placed = true
                return fd
            }
            let e = Errno.current
            if e.code == EEXIST && !exclusive { return nil }
            throw e
        }
        // Neither: create the name itself, write the header, remove it on failure.
        let fd = openat(dfd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        if fd < 0 {
            let e = Errno.current
            if e.code == EEXIST && !exclusive { return nil }
            throw e
        }
        do {
            try fill(fd)
            giveToCaller(fd: fd, caller)
            return fd
        } catch {
            close(fd)
            unlinkat(dfd, name, 0)
            throw error
        }
    }

    /// The file's secrets, unwrapping its data key if no handle has needed it yet. A failure is logged (one
    /// line naming the file, the key and the error) and fails the operation that needed the key.
    func secrets(of handle: FileHandle) throws -> FileSecrets {
        let file = handle.file
        return try file.secrets {
            do throws(FileOpener.Failure) {
                let header: FileHeader
                if let h = file.header { header = h } else { header = try FileOpener.readHeader(fd: handle.fd) }
                let opened = try FileOpener.open(header: header, volumeId: volume.volumeId, keys: keys, path: file.path)
                return FileSecrets(chunkKey: opened.keys.chunkKey, fileId: header.fileId, layout: file.layout)
            } catch {
                if case .key(let e) = error {
                    FailureLog.shared.log(.error, kind: "open-\(e.keyId)-\(e.errorType)", "cannot open \(file.path): \(error)",
                                          event: "open-failed", fields: ["file": file.path, "keyId": e.keyId, "error": e.errorType])
                } else {
                    Log.shared.log(.error, "cannot open \(file.path): \(error)", event: "open-failed",
                                   fields: ["file": file.path, "error": "\(error)"])
                }
                if case .key(let e) = error, e.kind == .accessDenied { throw Errno.EACCES }
                throw Errno.EIO
            }
        }
    }

    /// Runs `body` with the file's contents under its lock, shared (`exclusive` false) or exclusive.
    ///
    /// In shared mode other hosts write the backing file too, and a distributed filesystem promises only
    /// close-to-open consistency: a client may serve its own cached copy of data and attributes that another
    /// client changed, until it opens the file again. So each call first takes an open-file-description lock on
    /// the file's byte of the volume's locks file (a read lock for reads, a write lock for changes; the backing
    /// filesystem carries it to the other hosts: `sharedLockRange`), then opens the file afresh (after the lock,
    /// so that what the open fetches is what the last holder of the lock left), reads the size as that open sees
    /// it, runs `body` through it, and closes it, which sends what it wrote to the backing filesystem before the
    /// lock goes. No chunk is read half written or rewritten from a stale copy. Calls on one file are serialized
    /// on this host then.
    func withIO<R>(_ h: FileHandle, exclusive: Bool, _ body: (ContentIO) throws -> R) throws -> R {
        guard shared else {
            return exclusive ? try h.file.io.withWriteLock { try body(h.content) } : try h.file.io.withReadLock { try body(h.content) }
        }
        return try h.file.io.withWriteLock {
            // A read lock kept from this host's last read of the file serves the next reads for a few
            // milliseconds: while it is held no host can have changed the file, so its size and this host's
            // view of it are still current. A change gives it up first.
            if !exclusive, let held = h.file.heldRead, Monotonic.seconds() - held.since < Self.heldReadSeconds {
                return try body(ContentIO(fd: held.ioFd, file: h.file))
            }
            // A lock held for its time while this host kept reading is given up for a moment, and this read's
            // lock is not kept, so that another host waiting to write gets its turn.
            let heldForItsTime = !exclusive && h.file.heldRead != nil
            h.file.endHeldRead()
            if heldForItsTime { usleep(1000) }
            let keep = !exclusive && !heldForItsTime
            let flags = (exclusive ? O_RDWR : O_RDONLY) | O_CLOEXEC
            // The lock is the file's byte of the volume's locks file (`sharedLockRange`), so no descriptor of the
            // file itself is opened before it is held: on JuiceFS a writable one opened while another host was
            // changing the file would keep that host's truncation from showing here (`sharedDescriptor`).
            // Requests on this file take turns on this host (`io`), so one descriptor of the locks file serves
            // them all.
            let range = Self.sharedLockRange(h.file.inode)
            var kept = false
            defer { if !kept { _ = kmsfs_ofd_lock_range(sharedLocks, Int32(F_UNLCK), range, 1) } }
            try lockAgainstOtherHosts(range, exclusive: exclusive, h)
            let lockedAt = Monotonic.seconds()
            // The file opened afresh under the lock; a read may keep this descriptor (a handle's own closes with
            // the handle). Without one (the file's mode forbids opening it again, to a daemon that is not root, or
            // on NFS with root_squash), the handle's descriptor serves, which a change needs to be writable.
            let own = try reopen(h, flags)
            if exclusive && !h.fdWritable && own == nil { throw Errno(EACCES) }
            let fd = own ?? h.fd
            var closed = false
            defer { if let o = own, !closed { close(o) } }
            // The size as the backing filesystem has it now (this host's kernel may cache an older one), and none
            // of the pages this host cached of it, which may predate another host's last write.
            var backingSize: Int64 = -1
            repeat { backingSize = kmsfs_size_synced(fd) } while backingSize < 0 && errno == EINTR
            guard backingSize >= 0 else {
                Log.error("cannot read the size of \(h.file.path) from the backing filesystem: \(Errno.current)")
                throw Errno.EIO
            }
            _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            h.file.size = h.file.layout.plaintextSize(backingSize: Int(backingSize))
            let r: R
            do {
                r = try body(ContentIO(fd: fd, file: h.file))
            } catch {
                // What a failed change did write (or put back) reaches the backing filesystem before the lock goes.
                if exclusive { _ = Glibc.fsync(fd) }
                throw error
            }
            // A change is synced before the lock goes: closing alone may leave it in this host's client.
            if exclusive {
                var synced: Int32 = -1
                repeat { synced = Glibc.fsync(fd) } while synced != 0 && errno == EINTR
                if synced != 0 {
                    Log.error("cannot write \(h.file.path) out to the backing filesystem: \(Errno.current)")
                    throw Errno.EIO
                }
            }
            if keep, let o = own {
                // Kept for the next reads, and given up when they stop.
                kept = true
                closed = true
                h.file.heldReads += 1
                h.file.heldRead = (lockFd: sharedLocks, lockStart: range, ioFd: o, since: lockedAt, number: h.file.heldReads)
                h.file.expireHeldRead(h.file.heldReads, after: Self.heldReadSeconds)
                return r
            }
            if let o = own {
                closed = true
                if close(o) != 0 && exclusive && errno != EINTR {
                    Log.error("cannot write \(h.file.path) out to the backing filesystem: \(Errno.current)")
                    throw Errno.EIO
                }
            }
            return r
        }
    }

    /// Shared mode: how long a read lock is kept for further reads of the file on this host. Another host's
    /// change of the file waits for it about this long; a steady reader then gives the lock up for a moment
    /// and takes its next one for one request only, before keeping one again.
    static let heldReadSeconds = 0.02

    /// The descriptor a handle keeps of its writable backing file `fd`, and whether it is writable. In shared
    /// mode it is a read-only one (`fd` is closed), so that no writable descriptor stays open between requests:
    /// a JuiceFS client takes the length of a file it holds open for writing from its own writes (the larger of
    /// the two), so there another host's truncation would not show, in sizes or reads, until that descriptor
    /// closed. Each change opens a writable descriptor for its own time (`withIO`). `fd` is kept when the file
    /// cannot be opened for reading alone (a daemon that is not root, and a mode that allows writing only).
    private func sharedDescriptor(_ fd: Int32) -> (Int32, Bool) {
        guard shared, let readOnly = try? Self.openAgain(fd, O_RDONLY | O_CLOEXEC) else { return (fd, true) }
        close(fd)
        return (readOnly, false)
    }

    /// A new descriptor of the handle's backing file, or nil when its mode forbids opening it again (EACCES,
    /// EPERM).
    private func reopen(_ h: FileHandle, _ flags: Int32) throws -> Int32? {
        do {
            return try Self.openAgain(h.fd, flags)
        } catch {
            Log.error("cannot open \(h.file.path) again for a shared read or write: \(error)")
            throw Errno.EIO
        }
    }

    /// A new descriptor, with `flags`, of the file open as `fd`, or nil when its mode forbids opening it again
    /// (EACCES, EPERM); other failures throw.
    private static func openAgain(_ fd: Int32, _ flags: Int32) throws -> Int32? {
        while true {
            let new = Glibc.open(nodePath(fd), flags)
            if new >= 0 { return new }
            let e = Errno.current
            if e.code == EINTR { continue }
            if e.code == EACCES || e.code == EPERM { return nil }
            throw e
        }
    }

    /// The longest wait for another host's lock on a file: each host holds it for one request (or 20 ms of
    /// reads) only, so a longer wait means a host that stopped (its locks last until the backing filesystem ends
    /// its session).
    static let sharedLockWait = 30.0

    /// The volume's locks file (shared mode), in the backing root: a file's lock is one byte of it.
    static let sharedLocksFile = VolumeConfig.fileName + ".locks"

    /// The byte of the locks file that stands for the backing file with inode `key` (its inode number, which
    /// every client of a distributed filesystem sees the same, below 2^62).
    static func sharedLockRange(_ key: InodeKey) -> Int64 { Int64(key.inode & 0x3FFF_FFFF_FFFF_FFFF) }

    /// Takes the cross-host lock on byte `range` of the locks file, waiting at most `sharedLockWait` (then EIO,
    /// logged).
    private func lockAgainstOtherHosts(_ range: Int64, exclusive: Bool, _ h: FileHandle) throws {
        let deadline = Monotonic.seconds() + Self.sharedLockWait
        var pause: useconds_t = 1000
        while kmsfs_ofd_lock_range(sharedLocks, Int32(exclusive ? F_WRLCK : F_RDLCK), range, 1) != 0 {
            let e = Errno.current
            guard e.code == EAGAIN || e.code == EACCES || e.code == EINTR else {
                Log.error("cannot lock \(h.file.path) against other hosts: \(e)")
                throw Errno.EIO
            }
            if Monotonic.seconds() >= deadline {
                FailureLog.shared.log(.error, kind: "shared-lock", "another host has held the lock on \(h.file.path) for \(Int(Self.sharedLockWait)) s (a host that stopped keeps it until the backing filesystem ends its session): EIO")
                throw Errno.EIO
            }
            usleep(pause)
            pause = min(pause * 2, 10_000)
        }
    }

    func read(_ handle: FileHandle, into buffer: UnsafeMutableRawPointer, count: Int, offset: Int) throws -> Int {
        if !shared && offset >= handle.file.size { return 0 }
        let s = try secrets(of: handle)
        let n = try withIO(handle, exclusive: false) { c in
            offset >= handle.file.size ? 0 : try c.read(s, into: buffer, count: count, offset: offset)
        }
        MountCounters.bytesRead.add(n, ordering: .relaxed)
        return n
    }

    func write(_ handle: FileHandle, from buffer: UnsafeRawPointer, count: Int, offset: Int, append: Bool = false) throws -> Int {
        guard handle.writable else { throw Errno.EBADF }
        let s = try secrets(of: handle)
        try withIO(handle, exclusive: true) { c in
            try checkWritable()
            // Shared mode: an append goes where the file ends now, under the lock, whatever the kernel thought.
            try c.write(s, from: buffer, count: count, offset: shared && (handle.append || append) ? handle.file.size : offset)
        }
        MountCounters.bytesWritten.add(count, ordering: .relaxed)
        return count
    }

    /// Changes the plaintext size, through `handle` when the change came through an open file. Truncation to
    /// zero needs no key.
    func truncate(_ inode: Inode, _ size: Int, _ handle: FileHandle?) throws {
        guard size >= 0 else { throw Errno.EINVAL }
        try checkWritable()
        let h: FileHandle
        if let given = handle, given.writable {
            h = given
        } else {
            h = try open(inode, flags: O_WRONLY)
        }
        defer { if h !== handle { releaseFile(h) } }
        if size == 0 {
            try withIO(h, exclusive: true) { try $0.truncateToZero() }
            return
        }
        let s = try secrets(of: h)
        try withIO(h, exclusive: true) { try $0.truncate(s, to: size) }
    }

    func fallocate(_ handle: FileHandle, mode: Int32, offset: Int, length: Int) throws {
        try checkWritable()
        guard handle.writable else { throw Errno.EBADF }
        // Shared mode: the key is loaded before the cross-host lock is taken (a KMS call must not hold it).
        let preloaded = shared ? try secrets(of: handle) : nil
        try withIO(handle, exclusive: true) { c in
            try c.allocate({ try preloaded ?? secrets(of: handle) }, mode: mode, offset: offset, length: length)
        }
    }

    func fsync(_ handle: FileHandle, datasync: Bool) throws {
        try syscall { datasync ? fdatasync(handle.fd) : Glibc.fsync(handle.fd) }
    }

    /// Closes a handle; the last handle of a file wipes its key.
    func releaseFile(_ handle: FileHandle) {
        // (The kept read lock holds descriptors of its own: it ends with the file's last handle.)
        if table.release(handle.file, fd: handle.fd, closeDescriptor: { close($0) }) && shared {
            handle.file.io.withWriteLock { handle.file.endHeldRead() }
        }
    }

    private func backingFlags(_ flags: Int32) -> Int32 {
        let writable = flags & O_ACCMODE != O_RDONLY
        // Writers also read (partial chunks are read back); appends and truncation are done by kmsfs itself.
        return (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | (flags & (O_SYNC | O_DSYNC))
    }

    /// Gives a new file to the user whose request created it (when kmsfs runs as root, e.g. with allow_other).
    private func giveToCaller(fd: Int32, _ caller: Caller) {
        guard chownToCaller, caller.uid != 0 || caller.gid != 0 else { return }
        _ = fchown(fd, caller.uid, caller.gid)
    }
}
