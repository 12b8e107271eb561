import CXXHash
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The system calls the durable files share, retried on EINTR and turned into ``StoreError``s that
/// name the file. Every offset is absolute (pread/pwrite), so no call depends on a file position.
enum FileIO {
    static func open(_ path: String, create: Bool) throws -> Int32 {
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0)
        while true {
            let fd = Glibc.open(path, flags, 0o600)
            if fd >= 0 { return fd }
            if Glibc.errno == EINTR { continue }
            throw StoreError("open", path: path, errno: Glibc.errno)
        }
    }

    static func size(_ fd: Int32, path: String) throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw StoreError("stat", path: path, errno: Glibc.errno) }
        return UInt64(st.st_size)
    }

    /// Reads up to `count` bytes at `offset` into a new buffer; fewer only at the end of the file.
    static func read(_ fd: Int32, offset: UInt64, count: Int, path: String, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        var buffer = allocator.buffer(capacity: count)
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            var done = 0
            while done < count {
                let n = pread(fd, raw.baseAddress! + done, count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if Glibc.errno == EINTR { continue }
                    throw StoreError("read", path: path, errno: Glibc.errno)
                }
                if n == 0 { break }
                done += n
            }
            return done
        }
        return buffer
    }

    /// Writes the parts one after another starting at `offset`, as one pwritev where it can.
    static func write(_ fd: Int32, offset: UInt64, _ parts: [ByteBuffer], path: String) throws {
        var at = offset
        if parts.count == 1 {
            try parts[0].withUnsafeReadableBytes { try writeAll(fd, $0, at: at, path: path) }
            return
        }
        // pwritev of all the parts; a short write (rare: disk full, signals) finishes part by part.
        let total = parts.reduce(0) { $0 + $1.readableBytes }
        let written: Int = try withIOVecs(parts) { iov in
            while true {
                let n = pwritev(fd, iov.baseAddress, Int32(iov.count), off_t(offset))
                if n >= 0 { return n }
                if Glibc.errno == EINTR { continue }
                throw StoreError("write", path: path, errno: Glibc.errno)
            }
        }
        guard written < total else { return }
        var skip = written
        for part in parts {
            let len = part.readableBytes
            if skip >= len { skip -= len; at += UInt64(len); continue }
            try part.withUnsafeReadableBytes { raw in
                try writeAll(fd, UnsafeRawBufferPointer(rebasing: raw[skip...]), at: at + UInt64(skip), path: path)
            }
            at += UInt64(len)
            skip = 0
        }
    }

    private static func withIOVecs<R>(_ parts: [ByteBuffer], _ body: (UnsafeBufferPointer<iovec>) throws -> R) rethrows -> R {
        var iovs: [iovec] = []
        iovs.reserveCapacity(parts.count)
        // The buffers are kept alive (and unmoved) by `parts` for the duration of the call.
        func nest(_ i: Int) throws -> R {
            if i == parts.count { return try iovs.withUnsafeBufferPointer(body) }
            return try parts[i].withUnsafeReadableBytes { raw in
                iovs.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress), iov_len: raw.count))
                return try nest(i + 1)
            }
        }
        return try nest(0)
    }

    static func writeAll(_ fd: Int32, _ raw: UnsafeRawBufferPointer, at offset: UInt64, path: String) throws {
        var done = 0
        while done < raw.count {
            let n = pwrite(fd, raw.baseAddress! + done, raw.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw StoreError("write", path: path, errno: Glibc.errno)
            }
            done += n
        }
    }

    static func datasync(_ fd: Int32, path: String) throws {
        while fdatasync(fd) != 0 {
            if Glibc.errno == EINTR { continue }
            throw StoreError("sync", path: path, errno: Glibc.errno)
        }
    }

    static func truncate(_ fd: Int32, to size: UInt64, path: String) throws {
        while ftruncate(fd, off_t(size)) != 0 {
            if Glibc.errno == EINTR { continue }
            throw StoreError("truncate", path: path, errno: Glibc.errno,
                             detail: "could not cut the file to \(size) bytes")
        }
    }

    /// Makes the directory's entries (files created, renamed or removed in it) durable.
    static func syncDirectory(_ path: String) throws {
        let fd = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw StoreError("open directory", path: path, errno: Glibc.errno) }
        defer { _ = Glibc.close(fd) }
        while fsync(fd) != 0 {
            if Glibc.errno == EINTR { continue }
            throw StoreError("sync directory", path: path, errno: Glibc.errno)
        }
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }
}

/// XXH3-64 (seed 0) over a record's bytes, fed in pieces: the same value as one call over the
/// concatenation, so a record written from separate header and payload buffers is checked with
/// one call over the bytes read back.
struct RecordChecksum {
    static func of(_ parts: ByteBuffer...) -> UInt64 {
        if parts.count == 1 {
            return parts[0].withUnsafeReadableBytes { XXH3_64bits($0.baseAddress, $0.count) }
        }
        let state = XXH3_createState()!
        defer { XXH3_freeState(state) }
        XXH3_64bits_reset(state)
        for part in parts {
            part.withUnsafeReadableBytes { _ = XXH3_64bits_update(state, $0.baseAddress, $0.count) }
        }
        return XXH3_64bits_digest(state)
    }
}
