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
            // libfuse 3.14 complains about its own default thread limit on every start; it is noise.
            if text.contains("Ignoring invalid max threads value") { return }
            Log.shared.log(level <= 3 ? .error : (level == 4 ? .warning : .debug), "fuse: " + text)
        }
        var args = ["kmsfs"]
        if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
        var cArgs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) }
        defer { for a in cArgs { free(a) } }

        let ready = ReadyBox(onReady)
        var ops = operations()
        let fs = Unmanaged.passRetained(filesystem)
        defer { fs.release() }
        let result: Int32 = mountpoint.withCString { mp in
            cArgs.withUnsafeMutableBufferPointer { argv in
                var mount = kmsfs_fuse_mount(
                    mountpoint: mp, argc: Int32(args.count), argv: argv.baseAddress,
                    max_threads: maxThreads, max_idle_threads: 4,
                    ready: { ctx in Unmanaged<ReadyBox>.fromOpaque(ctx!).takeUnretainedValue().body() },
                    ready_context: Unmanaged.passUnretained(ready).toOpaque())
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

    private final class ReadyBox {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }
}

// MARK: - dispatch

/// The filesystem serving the current request.
private func current() -> EncryptedFilesystem {
    Unmanaged<EncryptedFilesystem>.fromOpaque(fuse_get_context()!.pointee.private_data!).takeUnretainedValue()
}

/// Runs a handler, turning what it throws into a negative errno for libfuse.
private func reply(_ body: (EncryptedFilesystem) throws -> Int32) -> Int32 {
    do {
        return try body(current())
    } catch let e as Errno {
        return -e.code
    } catch let e as KeyError {
        return e.kind == .accessDenied ? -EACCES : -EIO
    } catch {
        Log.error("internal error: \(error)")
        return -EIO
    }
}

private func string(_ p: UnsafePointer<CChar>?) -> String? { p.map { String(cString: $0) } }

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

private func operations() -> fuse_operations {
    var ops = fuse_operations()

    ops.`init` = { conn, cfg in
        if let cfg {
            cfg.pointee.use_ino = 1          // st_ino of the backing file: stable, shared by hard links
            cfg.pointee.nullpath_ok = 1      // handle-based operations work after unlink
            cfg.pointee.hard_remove = 1      // no .fuse_hidden files: open handles keep their backing fd
            if current().directIO { cfg.pointee.direct_io = 1 }
        }
        if let conn {
            conn.pointee.max_write = 1 << 20
            conn.pointee.max_background = 64
        }
        return fuse_get_context()!.pointee.private_data
    }
    ops.destroy = { data in
        guard let data else { return }
        Unmanaged<EncryptedFilesystem>.fromOpaque(data).takeUnretainedValue().shutdown()
    }

    ops.getattr = { path, st, fi in
        reply { try $0.getattr(string(path), st!, handle(fi)); return 0 }
    }
    ops.readlink = { path, buf, size in
        reply { try $0.readlink(string(path), buf!, size); return 0 }
    }
    ops.mknod = { path, mode, rdev in
        reply { try $0.mknod(string(path), mode, rdev); return 0 }
    }
    ops.mkdir = { path, mode in
        reply { try $0.mkdir(string(path), mode); return 0 }
    }
    ops.unlink = { path in
        reply { try $0.unlink(string(path)); return 0 }
    }
    ops.rmdir = { path in
        reply { try $0.rmdir(string(path)); return 0 }
    }
    ops.symlink = { target, path in
        reply { try $0.symlink(string(target) ?? "", string(path)); return 0 }
    }
    ops.rename = { from, to, flags in
        reply { try $0.rename(string(from), string(to), flags); return 0 }
    }
    ops.link = { from, to in
        reply { try $0.link(string(from), string(to)); return 0 }
    }
    ops.chmod = { path, mode, fi in
        reply { try $0.chmod(string(path), mode, handle(fi)); return 0 }
    }
    ops.chown = { path, uid, gid, fi in
        reply { try $0.chown(string(path), uid, gid, handle(fi)); return 0 }
    }
    ops.truncate = { path, size, fi in
        reply { try $0.truncate(string(path), Int(size), handle(fi)); return 0 }
    }
    ops.utimens = { path, tv, fi in
        reply { try $0.utimens(string(path), tv, handle(fi)); return 0 }
    }
    ops.access = { path, mask in
        reply { try $0.access(string(path), mask); return 0 }
    }
    ops.statfs = { _, st in
        reply { try $0.statfs(st!); return 0 }
    }

    ops.open = { path, fi in
        reply { fs in
            let h = try fs.open(string(path), flags: fi!.pointee.flags)
            fi!.pointee.fh = h.retainedValue()
            return 0
        }
    }
    ops.create = { path, mode, fi in
        reply { fs in
            let p = string(path)
            let rel = try fs.names.backingPath(p ?? "", creating: true)
            let h = try fs.createFile(rel: rel, mountPath: p ?? "", mode: mode & 0o7777, flags: fi!.pointee.flags)
            fi!.pointee.fh = h.retainedValue()
            return 0
        }
    }
    ops.read = { _, buf, size, offset, fi in
        reply { fs in Int32(try fs.read(try fileHandle(fi), into: buf!, count: size, offset: Int(offset))) }
    }
    ops.write = { _, buf, size, offset, fi in
        reply { fs in Int32(try fs.write(try fileHandle(fi), from: buf!, count: size, offset: Int(offset))) }
    }
    ops.flush = { _, _ in 0 }
    ops.release = { _, fi in
        guard let fi, fi.pointee.fh != 0 else { return 0 }
        let h = Handle.take(fi.pointee.fh)
        fi.pointee.fh = 0
        if let f = h as? FileHandle { current().releaseFile(f) }
        return 0
    }
    ops.fsync = { _, datasync, fi in
        reply { try $0.fsync(try fileHandle(fi), datasync: datasync != 0); return 0 }
    }
    ops.fallocate = { _, mode, offset, length, fi in
        reply { try $0.fallocate(try fileHandle(fi), mode: mode, offset: Int(offset), length: Int(length)); return 0 }
    }

    ops.setxattr = { path, name, value, size, flags in
        reply { try $0.setxattr(string(path), name!, value, size, flags); return 0 }
    }
    ops.getxattr = { path, name, value, size in
        reply { try $0.getxattr(string(path), name!, value, size) }
    }
    ops.listxattr = { path, list, size in
        reply { try $0.listxattr(string(path), list, size) }
    }
    ops.removexattr = { path, name in
        reply { try $0.removexattr(string(path), name!); return 0 }
    }

    ops.opendir = { path, fi in
        reply { fs in
            fi!.pointee.fh = try fs.opendir(string(path)).retainedValue()
            return 0
        }
    }
    ops.readdir = { _, buf, filler, offset, fi, _ in
        reply { fs in
            let d = try dirHandle(fi)
            try fs.readdir(d, Int(offset)) { name, st, next in
                var st = st
                return filler!(buf, name, &st, off_t(next), fuse_fill_dir_flags(0)) == 0
            }
            return 0
        }
    }
    ops.releasedir = { _, fi in
        guard let fi, fi.pointee.fh != 0 else { return 0 }
        _ = Handle.take(fi.pointee.fh)
        fi.pointee.fh = 0
        return 0
    }
    ops.fsyncdir = { _, datasync, fi in
        reply { try $0.fsyncdir(try dirHandle(fi), datasync != 0); return 0 }
    }
    return ops
}
