import CFuseBridge
import Glibc
import KmsfsFormat
import KmsfsKeys
import KmsfsSystem

/// Mounts an `EncryptedFilesystem` through the libfuse3 bridge and serves it on the multithreaded loop.
public enum FuseServer {
    public enum Outcome: Equatable {
        case unmounted
        case badOptions
        case mountFailed
        case failed
    }

    /// Mounts `filesystem` on `mountpoint` with the given `-o` options and serves requests until it is
    /// unmounted or the process gets SIGINT/SIGTERM/SIGHUP. `onReady` runs once the mount is live.
    public static func run(_ filesystem: EncryptedFilesystem, mountpoint: String, options: [String],
                           maxThreads: UInt32 = 16, onReady: @escaping () -> Void) -> Outcome {
        kmsfs_fuse_set_log { level, message in
            guard let message else { return }
            let text = String(cString: message)
            Log.shared.log(level <= 3 ? .error : (level == 4 ? .warning : .debug), "fuse: " + text)
        }
        var args = ["kmsfs"]
        if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
        var cArgs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) }
        defer { for a in cArgs { free(a) } }

        let ready = ReadyBox {
            filesystem.startInodeSweeper { parent, name in
                _ = withCName(name) { kmsfs_fuse_notify_inval_entry(parent, $0, name.count) }
            }
            // The kernel sets the readahead when it takes the INIT reply, which follows: raised right after it.
            if let path = readaheadPath(mountpoint: mountpoint) { kmsfs_fuse_set_readahead(path, Int32(FuseServer.readaheadKiB)) }
            onReady()
        }
        var ops = operations()
        let fs = Unmanaged.passRetained(filesystem)
        defer { fs.release() }
        let result: Int32 = mountpoint.withCString { mp in
            cArgs.withUnsafeMutableBufferPointer { argv in
                var mount = kmsfs_fuse_mount(
                    mountpoint: mp, argc: Int32(args.count), argv: argv.baseAddress,
                    max_threads: maxThreads, max_idle_threads: maxThreads,
                    ready: { ctx in Unmanaged<ReadyBox>.fromOpaque(ctx!).takeUnretainedValue().body() },
                    ready_context: Unmanaged.passUnretained(ready).toOpaque(),
                    killpriv_v2: 1)
                return kmsfs_fuse_run(&mount, &ops, fs.toOpaque())
            }
        }
        filesystem.shutdown()
        switch UInt32(result) {
        case KMSFS_FUSE_OK.rawValue: return .unmounted
        case KMSFS_FUSE_BAD_OPTIONS.rawValue: return .badOptions
        case KMSFS_FUSE_MOUNT_FAILED.rawValue: return .mountFailed
        default: return .failed
        }
    }

    /// Sequential reads ask for up to this much at once (the kernel's default for FUSE is 128 KiB): larger
    /// requests mean fewer round trips and chunks opened on every CPU; 1 MiB matches the largest request.
    static let readaheadKiB = 1024

    /// The file that sets the mount's readahead: /sys/class/bdi/MAJOR:MINOR/read_ahead_kb of its device, which
    /// root may write (for others the kernel's default stays).
    private static func readaheadPath(mountpoint: String) -> String? {
        guard let info = try? FileIO.readFile("/proc/self/mountinfo") else { return nil }
        for line in String(decoding: info, as: UTF8.self).split(separator: "\n") {
            let fields = line.split(separator: " ")
            if fields.count > 4, MountTable.unescape(fields[4]) == mountpoint { return "/sys/class/bdi/\(fields[2])/read_ahead_kb" }
        }
        return nil
    }

    private final class ReadyBox {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }
}

// MARK: - dispatch

/// Runs a handler for request `req`. The handler replies itself on success; whatever it throws becomes the
/// error reply (so a handler must not throw after replying).
private func serve(_ req: fuse_req_t?, _ body: (EncryptedFilesystem) throws -> Void) {
    let fs = Unmanaged<EncryptedFilesystem>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    do {
        try body(fs)
    } catch let e as Errno {
        fuse_reply_err(req, e.code)
    } catch let e as KeyError {
        fuse_reply_err(req, e.kind == .accessDenied ? EACCES : EIO)
    } catch {
        Log.error("internal error: \(error)")
        fuse_reply_err(req, EIO)
    }
}

/// Runs `body` as the request asks: without CAP_FSETID when it must clear set-user-ID and set-group-ID bits and
/// file capabilities (FUSE_HANDLE_KILLPRIV_V2: a write or truncation by a process that lacks CAP_FSETID), so the
/// backing filesystem clears them as it would for that process.
private func killingPrivileges<R>(_ body: () throws -> R) rethrows -> R {
    guard kmsfs_fuse_request_kills_suidgid() != 0, kmsfs_drop_fsetid() == 1 else { return try body() }
    defer { kmsfs_restore_fsetid() }
    return try body()
}

private func caller(_ req: fuse_req_t?) -> Caller {
    let c = fuse_req_ctx(req)!.pointee
    return Caller(uid: c.uid, gid: c.gid)
}

/// A name from the kernel, byte for byte (names need not be UTF-8).
private func name(_ p: UnsafePointer<CChar>?) -> [UInt8] { p.map { Array(UnsafeRawBufferPointer(start: $0, count: strlen($0))) } ?? [] }

/// Runs `body` with a NUL-terminated copy of a name.
func withCName<R>(_ name: [UInt8], _ body: (UnsafePointer<CChar>) -> R) -> R {
    (name + [0]).withUnsafeBufferPointer { b in b.withMemoryRebound(to: CChar.self) { body($0.baseAddress!) } }
}

private func handle(_ fi: UnsafeMutablePointer<fuse_file_info>?) -> Handle? {
    guard let fi, fi.pointee.fh != 0 else { return nil }
    return Handle.peek(fi.pointee.fh)
}

private func fileHandle(_ fi: UnsafeMutablePointer<fuse_file_info>?) throws -> FileHandle {
    guard let h = handle(fi) as? FileHandle else { throw Errno.EBADF }
    return h
}

private func dirHandle(_ fi: UnsafeMutablePointer<fuse_file_info>?) throws -> DirHandle {
    guard let h = handle(fi) as? DirHandle else { throw Errno.EBADF }
    return h
}

/// Replies with a new directory entry; the kernel now holds one more lookup of the inode.
private func replyEntry(_ req: fuse_req_t?, _ fs: EncryptedFilesystem, _ inode: Inode, _ st: stat) {
    var e = fuse_entry_param()
    e.ino = fuse_ino_t(inode.nodeId)
    e.attr = st
    e.attr_timeout = fs.cacheTimeout
    e.entry_timeout = fs.cacheTimeout
    if fuse_reply_entry(req, &e) != 0 { fs.forget(inode.nodeId, count: 1) }
}

private func operations() -> fuse_lowlevel_ops {
    var ops = fuse_lowlevel_ops()

    ops.`init` = { userdata, conn in
        guard let conn else { return }
        conn.pointee.max_write = 1 << 20
        conn.pointee.max_background = 64
        // The kernel clears set-user-ID bits on write, as for any filesystem.
        conn.pointee.want &= ~UInt32(FUSE_CAP_HANDLE_KILLPRIV)
        let fs = Unmanaged<EncryptedFilesystem>.fromOpaque(userdata!).takeUnretainedValue()
        // Listing with attributes (readdirplus, when the kernel sees it pays off) only where sizes need no
        // header read: a listing must never read file headers.
        if fs.uniformLayout == nil {
            conn.pointee.want &= ~UInt32(FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO)
        }
        // Shared mode caches no attributes (timeout 0), and with automatic invalidation the kernel would ask for
        // them before every read request. Close-to-open consistency needs them at open only, which the lookup of
        // the path gives, and an open drops the file's cached pages (keep_cache is never set).
        if fs.shared { conn.pointee.want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA) }
        if fs.writebackCache && conn.pointee.capable & UInt32(FUSE_CAP_WRITEBACK_CACHE) != 0 {
            conn.pointee.want |= UInt32(FUSE_CAP_WRITEBACK_CACHE)
        }
    }
    ops.destroy = { userdata in
        guard let userdata else { return }
        Unmanaged<EncryptedFilesystem>.fromOpaque(userdata).takeUnretainedValue().shutdown()
    }

    ops.lookup = { req, parent, n in
        serve(req) { fs in
            let (inode, st) = try fs.lookup(fs.inodes.get(parent), name(n))
            replyEntry(req, fs, inode, st)
        }
    }
    ops.forget = { req, ino, count in
        serve(req) { fs in fs.forget(ino, count: count) }
        fuse_reply_none(req)
    }
    ops.forget_multi = { req, count, forgets in
        serve(req) { fs in
            for i in 0..<count { fs.forget(forgets![i].ino, count: forgets![i].nlookup) }
        }
        fuse_reply_none(req)
    }
    ops.getattr = { req, ino, _ in
        serve(req) { fs in
            var st = try fs.getattr(fs.inodes.get(ino))
            fuse_reply_attr(req, &st, fs.cacheTimeout)
        }
    }
    ops.setattr = { req, ino, attr, valid, fi in
        serve(req) { fs in
            var st = try killingPrivileges { try fs.setattr(fs.inodes.get(ino), attr!.pointee, valid, handle(fi), caller(req)) }
            fuse_reply_attr(req, &st, fs.cacheTimeout)
        }
    }
    ops.readlink = { req, ino in
        serve(req) { fs in
            let target = try fs.readlink(fs.inodes.get(ino))
            _ = withCName(target) { fuse_reply_readlink(req, $0) }
        }
    }
    ops.mknod = { req, parent, n, mode, rdev in
        serve(req) { fs in
            let (inode, st) = try fs.mknod(fs.inodes.get(parent), name(n), mode, rdev, caller(req))
            replyEntry(req, fs, inode, st)
        }
    }
    ops.mkdir = { req, parent, n, mode in
        serve(req) { fs in
            let (inode, st) = try fs.mkdir(fs.inodes.get(parent), name(n), mode, caller(req))
            replyEntry(req, fs, inode, st)
        }
    }
    ops.symlink = { req, target, parent, n in
        serve(req) { fs in
            let (inode, st) = try fs.symlink(name(target), fs.inodes.get(parent), name(n), caller(req))
            replyEntry(req, fs, inode, st)
        }
    }
    ops.link = { req, ino, newParent, n in
        serve(req) { fs in
            let (inode, st) = try fs.link(fs.inodes.get(ino), fs.inodes.get(newParent), name(n))
            replyEntry(req, fs, inode, st)
        }
    }
    ops.unlink = { req, parent, n in
        serve(req) { fs in
            try fs.unlink(fs.inodes.get(parent), name(n))
            fuse_reply_err(req, 0)
        }
    }
    ops.rmdir = { req, parent, n in
        serve(req) { fs in
            try fs.rmdir(fs.inodes.get(parent), name(n))
            fuse_reply_err(req, 0)
        }
    }
    ops.rename = { req, parent, n, newParent, newName, flags in
        serve(req) { fs in
            try fs.rename(fs.inodes.get(parent), name(n), fs.inodes.get(newParent), name(newName), flags)
            fuse_reply_err(req, 0)
        }
    }
    ops.access = { req, ino, mask in
        serve(req) { fs in
            try fs.access(fs.inodes.get(ino), mask)
            fuse_reply_err(req, 0)
        }
    }
    ops.statfs = { req, _ in
        serve(req) { fs in
            var st = try fs.statfs()
            fuse_reply_statfs(req, &st)
        }
    }

    ops.open = { req, ino, fi in
        serve(req) { fs in
            let h = try killingPrivileges { try fs.open(fs.inodes.get(ino), flags: fi!.pointee.flags) }
            fi!.pointee.fh = h.retainedValue()
            // (Shared mode: appends bypass the page cache, since kmsfs may place them past where the kernel would.)
            if fs.directIO || (fs.shared && h.append) { fi!.pointee.direct_io = 1 }
            // kmsfs has nothing to do when a descriptor is closed (data reaches the backing file on write, and
            // POSIX locks are kept by the kernel): no FLUSH round trip on every close(2).
            fi!.pointee.noflush = 1
            if fuse_reply_open(req, fi) != 0 { fs.releaseFile(Handle.take(fi!.pointee.fh) as! FileHandle) }
        }
    }
    ops.create = { req, parent, n, mode, fi in
        serve(req) { fs in
            let (inode, st, h) = try killingPrivileges { try fs.create(fs.inodes.get(parent), name(n), mode & 0o7777, fi!.pointee.flags, caller(req)) }
            fi!.pointee.fh = h.retainedValue()
            if fs.directIO || (fs.shared && h.append) { fi!.pointee.direct_io = 1 }
            fi!.pointee.noflush = 1
            var e = fuse_entry_param()
            e.ino = fuse_ino_t(inode.nodeId)
            e.attr = st
            e.attr_timeout = fs.cacheTimeout
            e.entry_timeout = fs.cacheTimeout
            if fuse_reply_create(req, &e, fi) != 0 {
                fs.releaseFile(Handle.take(fi!.pointee.fh) as! FileHandle)
                fs.forget(inode.nodeId, count: 1)
            }
        }
    }
    ops.read = { req, _, size, offset, fi in
        serve(req) { fs in
            let h = try fileHandle(fi)
            // Readahead asks for more than a small file holds: a buffer only as large as the answer.
            let count = max(0, min(size, h.file.size - Int(offset)))
            try BufferPool.shared.withBuffer(count) { buffer in
                let n = try fs.read(h, into: buffer, count: count, offset: Int(offset))
                fuse_reply_buf(req, buffer.assumingMemoryBound(to: CChar.self), n)
            }
        }
    }
    ops.write = { req, _, buf, size, offset, fi in
        serve(req) { fs in
            // (The open file's flags as they are now: O_APPEND may have been set with fcntl since the open.)
            let append = fi.map { $0.pointee.flags & O_APPEND != 0 } ?? false
            let n = try killingPrivileges { try fs.write(try fileHandle(fi), from: buf!, count: size, offset: Int(offset), append: append) }
            fuse_reply_write(req, n)
        }
    }
    ops.flush = { req, _, _ in fuse_reply_err(req, 0) }
    ops.release = { req, _, fi in
        serve(req) { fs in
            if let fi, fi.pointee.fh != 0, let h = Handle.take(fi.pointee.fh) as? FileHandle {
                fi.pointee.fh = 0
                fs.releaseFile(h)
            }
            fuse_reply_err(req, 0)
        }
    }
    ops.fsync = { req, _, datasync, fi in
        serve(req) { fs in
            try fs.fsync(try fileHandle(fi), datasync: datasync != 0)
            fuse_reply_err(req, 0)
        }
    }
    ops.fallocate = { req, _, mode, offset, length, fi in
        serve(req) { fs in
            try fs.fallocate(try fileHandle(fi), mode: mode, offset: Int(offset), length: Int(length))
            fuse_reply_err(req, 0)
        }
    }

    ops.setxattr = { req, ino, n, value, size, flags in
        serve(req) { fs in
            try fs.setxattr(fs.inodes.get(ino), n!, value, size, flags)
            fuse_reply_err(req, 0)
        }
    }
    ops.getxattr = { req, ino, n, size in
        serve(req) { fs in
            let inode = fs.inodes.get(ino)
            if size == 0 {
                fuse_reply_xattr(req, try fs.getxattr(inode, n!, nil, 0))
                return
            }
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
            defer { buffer.deallocate() }
            let count = try fs.getxattr(inode, n!, buffer, size)
            fuse_reply_buf(req, buffer, count)
        }
    }
    ops.listxattr = { req, ino, size in
        serve(req) { fs in
            let inode = fs.inodes.get(ino)
            if size == 0 {
                fuse_reply_xattr(req, try fs.listxattr(inode, nil, 0))
                return
            }
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
            defer { buffer.deallocate() }
            let count = try fs.listxattr(inode, buffer, size)
            fuse_reply_buf(req, buffer, count)
        }
    }
    ops.removexattr = { req, ino, n in
        serve(req) { fs in
            try fs.removexattr(fs.inodes.get(ino), n!)
            fuse_reply_err(req, 0)
        }
    }

    ops.opendir = { req, ino, fi in
        serve(req) { fs in
            fi!.pointee.fh = try fs.opendir(fs.inodes.get(ino)).retainedValue()
            if fuse_reply_open(req, fi) != 0 { _ = Handle.take(fi!.pointee.fh) }
        }
    }
    ops.readdir = { req, _, size, offset, fi in
        serve(req) { fs in
            let d = try dirHandle(fi)
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
            defer { buffer.deallocate() }
            var used = 0
            try fs.readdir(d, Int(offset)) { entryName, st, next in
                var st = st
                let n = withCName(entryName) { fuse_add_direntry(req, buffer + used, size - used, $0, &st, off_t(next)) }
                if n > size - used { return false }
                used += n
                return true
            }
            fuse_reply_buf(req, buffer, used)
        }
    }
    ops.readdirplus = { req, _, size, offset, fi in
        serve(req) { fs in
            let d = try dirHandle(fi)
            let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
            defer { buffer.deallocate() }
            var used = 0
            var added: [Inode] = []
            // Entries already in the buffer hold kernel references: once there are some, an error ends the
            // listing early instead of failing it.
            do {
                try fs.readdirplus(d, Int(offset)) { entryName, inode, st, next in
                var e = fuse_entry_param()
                e.attr = st
                if let inode {
                    e.ino = fuse_ino_t(inode.nodeId)
                    e.attr_timeout = fs.cacheTimeout
                    e.entry_timeout = fs.cacheTimeout
                }
                let n = withCName(entryName) { fuse_add_direntry_plus(req, buffer + used, size - used, $0, &e, off_t(next)) }
                if n > size - used { return false }
                used += n
                if let inode { added.append(inode) }
                return true
                }
            } catch {
                if used == 0 { throw error }
            }
            // A reply the kernel did not take (an interrupted request) takes no references either.
            if fuse_reply_buf(req, buffer, used) != 0 {
                for inode in added { fs.forget(inode.nodeId, count: 1) }
            }
        }
    }
    ops.releasedir = { req, _, fi in
        if let fi, fi.pointee.fh != 0 {
            _ = Handle.take(fi.pointee.fh)
            fi.pointee.fh = 0
        }
        fuse_reply_err(req, 0)
    }
    ops.fsyncdir = { req, _, datasync, fi in
        serve(req) { fs in
            try fs.fsyncdir(try dirHandle(fi), datasync != 0)
            fuse_reply_err(req, 0)
        }
    }
    return ops
}
