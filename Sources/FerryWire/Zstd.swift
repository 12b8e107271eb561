import CZstd
import NIOCore

/// zstd compression of frame payloads, for the replication streams that come next
/// (DESIGN §5.1: "batched, zstd-compressed when it helps").
///
/// `compress` answers nil when compression does not make the payload smaller (random data, already
/// compressed images), so the sender ships the original bytes and the receiver never pays for
/// a useless decompression. `decompress` never allocates more than the caller's bound: the
/// compressed frame header's content size is checked first, so a hostile frame cannot make a
/// site allocate gigabytes.
public enum Zstd {
    public struct Failure: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    /// The compressed form of `input`, or nil when it would not be smaller.
    public static func compress(_ input: ByteBuffer, level: Int32 = 1) -> ByteBuffer? {
        let bound = ZSTD_compressBound(input.readableBytes)
        var out = ByteBufferAllocator().buffer(capacity: bound)
        guard let cctx = ZSTD_createCCtx() else { return nil }
        defer { ZSTD_freeCCtx(cctx) }
        // A content checksum, so damage is detected even where no frame checksum covers it
        // (journals on disk).
        ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level)
        ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1)
        let written = input.withUnsafeReadableBytes { src in
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: bound) { dst in
                let n = ZSTD_compress2(cctx, dst.baseAddress, dst.count, src.baseAddress, src.count)
                return ZSTD_isError(n) != 0 ? 0 : n
            }
        }
        guard written > 0, written < input.readableBytes else { return nil }
        return out
    }

    /// Decompresses one zstd frame of at most `maxSize` bytes of content.
    public static func decompress(_ input: ByteBuffer, maxSize: Int) throws -> ByteBuffer {
        let size = input.withUnsafeReadableBytes { ZSTD_getFrameContentSize($0.baseAddress, $0.count) }
        // ZSTD_CONTENTSIZE_UNKNOWN / _ERROR are the two largest UInt64 values.
        guard size < UInt64.max - 1 else { throw Failure(description: "not a zstd frame with a known content size") }
        guard size <= UInt64(maxSize) else {
            throw Failure(description: "zstd frame claims \(size) bytes of content; the limit is \(maxSize)")
        }
        // A pooled context: making one per call (ZSTD_decompress) cost more than decompressing
        // a small chunk.
        var failure: String?
        guard let out = ZstdContexts.decompress(input, size: Int(size), failure: &failure) else {
            throw Failure(description: failure ?? "zstd failed")
        }
        return out
    }
}
