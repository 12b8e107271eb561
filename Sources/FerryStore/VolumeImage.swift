import CFerrySys
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// A volume's data as a sparse raw image file.
///
/// All methods are synchronous system calls on one shared file descriptor (pread/pwrite are
/// position-independent, so any number of threads may call them at once). Because every connection
/// to a volume shares this descriptor, `flush()` (fdatasync) makes durable every write that any
/// caller has completed before it — which is what NBD's CAN_MULTI_CONN promises.
///
/// `read`/`write` on the page cache take microseconds and are meant to run inline on an event loop;
/// `flush` can take milliseconds and is meant for a thread pool.
public final class VolumeImage: Sendable {
    public let path: String
    public let size: UInt64
    private let fd: Int32

    private init(path: String, size: UInt64, fd: Int32) {
        self.path = path
        self.size = size
        self.fd = fd
    }

    deinit { _ = Glibc.close(fd) }

    /// Opens the image at `path`, creating it sparse at `size` bytes when it does not exist.
    /// An existing image of another size is an error: Ferry never truncates a volume's data.
    public static func openOrCreate(path: String, size: UInt64) throws -> VolumeImage {
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw StoreError("open image", path: path, errno: Glibc.errno) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = Glibc.errno; _ = Glibc.close(fd)
            throw StoreError("stat image", path: path, errno: e)
        }
        if st.st_size == 0 && size > 0 {
            guard ftruncate(fd, off_t(size)) == 0 else {
                let e = Glibc.errno; _ = Glibc.close(fd)
                throw StoreError("size image", path: path, errno: e)
            }
        } else if UInt64(st.st_size) != size {
            _ = Glibc.close(fd)
            throw StoreError("open image", path: path, detail:
                "the image holds \(st.st_size) bytes but the volume is configured as \(size); "
                + "Ferry does not resize volumes — restore the configured size or move the image aside")
        }
        return VolumeImage(path: path, size: size, fd: fd)
    }

    /// XXH3-64 of each block of `blockSize` bytes in the range (the last one may be shorter), in
    /// order: what online verify compares between sites.
    public func blockHashes(offset: UInt64, length: UInt64, blockSize: UInt64) throws -> [UInt64] {
        var hashes: [UInt64] = []
        var at = offset
        let end = min(offset + length, size)
        let allocator = ByteBufferAllocator()
        while at < end {
            let n = Int(min(blockSize, end - at))
            let block = try read(offset: at, length: n, allocator: allocator)
            hashes.append(RecordChecksum.of(block))
            at += UInt64(n)
        }
        return hashes
    }

    /// Tells the kernel that what was just read up to `offset + length` will not be read again
    /// soon (`POSIX_FADV_DONTNEED`): clean pages leave the page cache. For bulk reads (a peer's
    /// initial sync or catch-up), which otherwise leave the volume cached in the large folios
    /// readahead builds, where a 4 KiB client write costs ext4 about twice a write into a page of
    /// its own. The kernel drops a folio only when the range covers all of it, so the range is
    /// the whole 2 MiB blocks from the one holding `offset` up to the one holding the end, which
    /// stays (with the readahead beyond it) for the next read. Only advice: errors are ignored.
    public func dropCached(offset: UInt64, length: UInt64) {
        let block: UInt64 = 2 << 20
        let start = offset / block * block
        let end = (offset + length) / block * block
        guard end > start else { return }
        _ = posix_fadvise(fd, off_t(start), off_t(end - start), POSIX_FADV_DONTNEED)
    }

    /// Reads `length` bytes at `offset` into a new buffer. Reads past the end are the caller's bug
    /// (NBD checks ranges first); a short read at EOF is filled with zeros.
    public func read(offset: UInt64, length: Int, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        var buffer = allocator.buffer(capacity: length)
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { raw in
            var done = 0
            while done < length {
                let n = pread(fd, raw.baseAddress! + done, length - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if Glibc.errno == EINTR { continue }
                    throw StoreError("read", path: path, errno: Glibc.errno)
                }
                if n == 0 {  // EOF: the rest reads as zeros
                    (raw.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: length - done)
                    break
                }
                done += n
            }
            return length
        }
        return buffer
    }

    /// Writes all of `data` at `offset`.
    public func write(offset: UInt64, data: ByteBuffer) throws {
        try data.withUnsafeReadableBytes { raw in
            var done = 0
            let length = raw.count
            while done < length {
                let n = pwrite(fd, raw.baseAddress! + done, length - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if Glibc.errno == EINTR { continue }
                    throw StoreError("write", path: path, errno: Glibc.errno)
                }
                done += n
            }
        }
    }

    /// Makes every completed write durable (fdatasync).
    public func flush() throws {
        while fdatasync(fd) != 0 {
            if Glibc.errno == EINTR { continue }
            throw StoreError("flush", path: path, errno: Glibc.errno)
        }
    }

    /// Deallocates the range; it reads as zeros afterwards. Returns false when the filesystem
    /// cannot punch holes (the caller then writes zeros if it needs them).
    @discardableResult
    public func punchHole(offset: UInt64, length: UInt64) throws -> Bool {
        if ferry_punch_hole(fd, Int64(offset), Int64(length)) == 0 { return true }
        let e = Glibc.errno
        if e == EOPNOTSUPP || e == ENOSYS { return false }
        throw StoreError("punch hole in", path: path, errno: e)
    }

    /// Zeroes the range without deallocating it (FALLOC_FL_ZERO_RANGE). Returns false when the
    /// filesystem cannot do that quickly.
    public func zeroRangeFast(offset: UInt64, length: UInt64) throws -> Bool {
        if ferry_zero_range(fd, Int64(offset), Int64(length)) == 0 { return true }
        let e = Glibc.errno
        if e == EOPNOTSUPP || e == ENOSYS { return false }
        throw StoreError("zero range in", path: path, errno: e)
    }

    /// Makes the range read as zeros the cheapest way the filesystem allows: a hole, a zeroed
    /// range, or zero bytes written.
    public func zero(offset: UInt64, length: UInt64) throws {
        if try !punchHole(offset: offset, length: length), try !zeroRangeFast(offset: offset, length: length) {
            try writeZeroBytes(offset: offset, length: length)
        }
    }

    /// Zeroes the range by writing zero bytes (the slow path, always available).
    public func writeZeroBytes(offset: UInt64, length: UInt64) throws {
        let chunk = 1 << 20
        var zeros = ByteBufferAllocator().buffer(capacity: chunk)
        zeros.writeRepeatingByte(0, count: chunk)
        var at = offset
        let end = offset + length
        while at < end {
            let n = Int(min(UInt64(chunk), end - at))
            try write(offset: at, data: zeros.getSlice(at: zeros.readerIndex, length: n)!)
            at += UInt64(n)
        }
    }

    /// One run of the image that is all data or all hole.
    public struct Extent: Equatable, Sendable {
        public var length: UInt64
        public var isHole: Bool
        public init(length: UInt64, isHole: Bool) { self.length = length; self.isHole = isHole }
    }

    /// The data/hole runs covering [offset, offset+length), found with SEEK_DATA/SEEK_HOLE, at most
    /// `maxExtents` of them (the last one may end before offset+length). Where the filesystem cannot
    /// tell, everything is reported as data, which is always safe.
    public func extents(offset: UInt64, length: UInt64, maxExtents: Int = 1 << 16) -> [Extent] {
        var result: [Extent] = []
        let end = min(offset + length, size)
        var at = offset
        var races = 0
        while at < end && result.count < maxExtents {
            let data = ferry_seek_data(fd, Int64(at))
            if data < 0 {
                // ENXIO: no data at or after `at` — the rest is a hole. Anything else: say data.
                result.append(Extent(length: end - at, isHole: Glibc.errno == ENXIO))
                break
            }
            if UInt64(data) > at {
                let holeEnd = min(UInt64(data), end)
                result.append(Extent(length: holeEnd - at, isHole: true))
                at = holeEnd
                continue
            }
            let hole = ferry_seek_hole(fd, Int64(at))
            if hole >= 0 && UInt64(hole) <= at {
                // The data at `at` was punched out between the two seeks (a TRIM on another
                // thread): look again; after a few tries call the rest data, which is always safe.
                races += 1
                if races > 3 {
                    result.append(Extent(length: end - at, isHole: false))
                    break
                }
                continue
            }
            let dataEnd = hole < 0 ? end : min(UInt64(hole), end)
            result.append(Extent(length: dataEnd - at, isHole: false))
            at = dataEnd
        }
        return result
    }
}
