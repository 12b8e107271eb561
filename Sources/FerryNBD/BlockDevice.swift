import NIOCore

/// Something the NBD server can export: a fixed-size array of bytes.
///
/// The server calls every method on the connection's event loop and hands the result future
/// to the client as soon as it completes. Implementations decide where work runs: a local image
/// answers reads and writes inline (microseconds on the page cache, no thread hop) and sends
/// `flush` to a thread pool; a replicated volume completes a write only when its peers have acked.
/// Futures must complete on `eventLoop`.
///
/// Ranges are checked by the server before a call: `offset + length <= size`, aligned to
/// the export's minimum block size when the client agreed to it, READ and WRITE lengths within
/// `NBD.maxPayload` (32 MiB).
public protocol BlockDevice: AnyObject, Sendable {
    var size: UInt64 { get }
    var isReadOnly: Bool { get }

    func read(offset: UInt64, length: Int, on eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer>
    /// `fua`: the data must be durable before the future succeeds.
    func write(offset: UInt64, data: ByteBuffer, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void>
    /// Everything any connection wrote before this call must be durable when the future succeeds
    /// (the server advertises CAN_MULTI_CONN).
    func flush(on eventLoop: any EventLoop) -> EventLoopFuture<Void>
    /// Advisory: the range's contents may be discarded.
    func trim(offset: UInt64, length: UInt64, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void>
    /// The range must read as zeros afterwards. `mayPunchHole`: it may be deallocated.
    /// `fastOnly`: fail with `BlockDeviceError.notSupported` unless zeroing is faster than writing.
    func writeZeroes(offset: UInt64, length: UInt64, mayPunchHole: Bool, fastOnly: Bool, fua: Bool,
                     on eventLoop: any EventLoop) -> EventLoopFuture<Void>
    /// Allocation of the range as consecutive extents starting at `offset`; at least one.
    func blockStatus(offset: UInt64, length: UInt64, on eventLoop: any EventLoop) -> EventLoopFuture<[BlockExtent]>
}

/// A run of a device's bytes with one allocation state (NBD `base:allocation`).
public struct BlockExtent: Equatable, Sendable {
    public var length: UInt64
    /// Unallocated: writes here may need new space.
    public var isHole: Bool
    /// Known to read as zeros.
    public var readsAsZero: Bool

    public init(length: UInt64, isHole: Bool, readsAsZero: Bool) {
        self.length = length
        self.isHole = isHole
        self.readsAsZero = readsAsZero
    }
}

/// Failures a device reports; each maps to the NBD error the spec names.
public enum BlockDeviceError: Error, Sendable, Equatable {
    case io(errno: Int32)
    case noSpace
    case notSupported
    case readOnly
    case shuttingDown
}

extension BlockDeviceError {
    var nbdError: UInt32 {
        switch self {
        case .io(let e):
            switch e {
            case 28, 122, 27: return NBD.Errno.enospc     // ENOSPC, EDQUOT, EFBIG (proto.md: map to ENOSPC)
            case 1, 30: return NBD.Errno.eperm            // EPERM, EROFS
            default: return NBD.Errno.eio
            }
        case .noSpace: return NBD.Errno.enospc
        case .notSupported: return NBD.Errno.enotsup
        case .readOnly: return NBD.Errno.eperm
        case .shuttingDown: return NBD.Errno.eshutdown
        }
    }
}

/// A device that can take a large WRITE's payload in the pieces it arrives in from the socket.
///
/// The server then hands over each received piece as it is (a slice of the receive buffer)
/// instead of first gathering the whole payload into one buffer — a memcpy of the payload less,
/// which was 13% of the event loop's time on 1 MiB sequential writes. The server replies once
/// every piece's future has succeeded. A replicated volume, which must hand whole writes to its
/// peers, does not adopt this.
public protocol StreamingWriteDevice: BlockDevice {
    /// Writes one piece of a WRITE's payload at `offset`. Pieces of one WRITE are handed over in
    /// order but may complete in any.
    func writePart(offset: UInt64, data: ByteBuffer, on eventLoop: any EventLoop) -> EventLoopFuture<Void>
}
