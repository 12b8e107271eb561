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
    /// Whether the server advertises NBD_FLAG_CAN_MULTI_CONN for this device: a `flush` (or a
    /// FUA write) on any connection covers what every connection wrote before it (proto.md: "the
    /// effects of NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA MUST be visible across all connections"), so
    /// a client may spread one disk over several connections. True by default; a device whose
    /// flush covers less says false, and clients then keep to one connection ("SHOULD NOT
    /// multiplex their commands over more than one connection").
    var canMultiConn: Bool { get }

    func read(offset: UInt64, length: Int, on eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer>
    /// `fua`: the data must be durable before the future succeeds.
    func write(offset: UInt64, data: ByteBuffer, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void>
    /// When the future succeeds, every write completed before this call must be durable: those of
    /// every connection if `canMultiConn`, else at least this connection's.
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

extension BlockDevice {
    /// Every flush covers every connection's writes unless the device says otherwise.
    public var canMultiConn: Bool { true }
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
    /// The export was fenced (``NBDExportTable/fence(_:reason:)``): another site may now own the
    /// volume, so nothing more is served here.
    case fenced
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
        // ESHUTDOWN, not EPERM: a fenced export is going away, and proto.md names ESHUTDOWN for
        // exactly that ("On a server shutdown ... The error value issued in respect of these
        // requests and any subsequently received requests SHOULD be ESHUTDOWN"), and on it the
        // client "MUST initiate a soft disconnect" instead of retrying. EPERM would read as a
        // read-only export and fail only writes, while a fenced export serves nothing.
        case .fenced: return NBD.Errno.eshutdown
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
