import NIOCore

/// One unit on the wire: a type, per-type flags and an opaque payload.
///
/// # Ferry wire frames (frame format version 1)
///
/// Every byte two sites exchange, inside the mutual-TLS 1.3 stream, is part of a frame. All integers
/// are big-endian (network order).
///
///     offset  size  field
///     0       4     magic            u32  0x46525931 ("FRY1")
///     4       1     version          u8   1 (the frame format version; see below for the link protocol)
///     5       1     type             u8   FrameType; see the table below
///     6       2     flags            u16  per-type bits; 0 for the link-control types
///     8       4     payload length   u32  0 ... 67_108_864 (64 MiB)
///     12      N     payload          N bytes, layout per type
///     12+N    8     checksum         u64  XXH3-64 (seed 0) of bytes 0 ..< 12+N, i.e. header and payload
///
/// A receiver checks, in this order, as soon as the bytes are there: magic, version, payload length
/// (before buffering the payload), then the checksum once the whole frame has arrived. Any failure
/// is fatal for the connection: it is closed and nothing in the bad frame is acted on. A frame that
/// passes all checks but has a type the receiver does not know is ignored if the type is optional
/// (type >= 0x80), and is fatal otherwise (type < 0x80). So a later release may add optional frames
/// old sites skip; anything an old site must not miss needs a new link protocol version instead.
/// A frame of a known type with a flag bit its type does not define is fatal too: link-control
/// frames must have flags 0, and each data-plane type defines its own bits (`dataFrameTypes`).
///
/// Strings are UTF-8 preceded by their byte length as u16. A payload must be exactly as long as its
/// fields; extra or missing bytes are a fatal error.
///
/// ## Link-control frames
///
///     type  name      payload
///     0x01  hello     min version u16, max version u16, site ID 32 bytes (SHA-256 of the sender's
///                     certificate DER), site name string
///     0x02  helloAck  chosen version u16
///     0x03  ping      nonce u64, sentAt u64 (sender's monotonic clock, nanoseconds)
///     0x04  pong      nonce u64, sentAt u64 (both copied from the ping)
///     0x05  goodbye   reason string (at most 1024 bytes; for the other site's log)
///
/// Types 0x06 to 0x7F are for data-plane frames (non-optional); 0x80 to 0xFF are optional frames.
///
/// ## Data-plane frames
///
///     type  name         flags                        payload
///     0x10  replication  0x0001 data zstd-compressed  one VolumeFrame; layout in ReplicationFrames.swift
///
/// ## Link protocol (version 1)
///
/// 1. The dialer opens TCP and TLS 1.3 with mutual authentication. Each side accepts only a leaf
///    certificate whose SHA-256 is the pinned site ID of a configured peer (the acceptor: any
///    configured peer; the dialer: the peer it dialed). No CA, no host name check.
/// 2. As soon as its TLS handshake completes, each side sends `hello` with the range of link
///    protocol versions it speaks. The site ID in `hello` must equal the fingerprint of the
///    certificate the sender presented; otherwise the receiver closes the connection.
/// 3. The acceptor, on the dialer's `hello`, picks the highest version both ranges contain and
///    sends `helloAck`. If there is none, it sends `goodbye` naming both ranges and closes. The
///    dialer, on the acceptor's `hello`, does the same check (closing with `goodbye` if there is no
///    common version) and then waits for `helloAck`, which must carry the version it computed.
///    Before this exchange is complete, any other frame is a protocol error.
/// 4. The link is then up. Each side sends `ping` every heartbeat interval (1 s by default) and
///    answers every `ping` with a `pong` carrying the same nonce and sentAt. The pinger matches the
///    pong's nonce against its last 8 unanswered pings and measures the round-trip time from its
///    own record of when that ping left, not from the echoed sentAt; a pong that matches none is
///    ignored. A side that has received no frame at all for the dead-after interval (5 s by
///    default) closes the connection and reconnects.
/// 5. Both sites dial each other, and a site does not dial a peer it has a link with. If both
///    dials succeed, both sites keep the link dialed by the site whose site ID is smaller
///    (comparing the 32 bytes as unsigned, lexicographically). That site closes the other link,
///    with `goodbye`, once its own link is up and the peer has been heard on it since the other
///    link came up (`helloAck` if the own link came up second, else the peer's next `ping` or
///    `pong` on it); the other site keeps both until then and uses the preferred one. So both
///    sites keep the same connection and neither is left without a link in between. Until the
///    peer is heard on it, an own link older than the peer's is not trusted: the peer dials only
///    when it has no link, so it may have restarted and lost this one; the newer link is used
///    meanwhile, and the stale one is left to dead-link detection. Two links dialed by the same
///    site mean it restarted: the receiver closes the older one.
/// 6. `goodbye` is sent before a deliberate close; the receiver logs the reason and closes.
public struct Frame: Sendable, Equatable {
    /// The magic number at the start of every frame: "FRY1".
    public static let magic: UInt32 = 0x4652_5931
    /// The frame format version this code reads and writes.
    public static let formatVersion: UInt8 = 1
    /// Bytes before the payload: magic, version, type, flags, length.
    public static let headerSize = 12
    /// Bytes after the payload: the XXH3-64 checksum.
    public static let trailerSize = 8
    /// The largest payload a frame may carry: 64 MiB.
    public static let maxPayloadSize = 64 * 1024 * 1024

    /// What the payload is; decides its layout.
    public var type: FrameType
    /// Per-type bits: 0 for the link-control types; each data-plane type defines its own, and a
    /// receiver refuses bits it does not know (``FrameError/unknownFlags(_:_:)``).
    public var flags: UInt16
    /// The payload, or its first part when ``payloadTail`` is set. On decode, a slice of the
    /// receive buffer (the whole payload).
    public var payload: ByteBuffer
    /// More payload, sent right after ``payload``: lets a sender put a large buffer it already
    /// holds (a block of a volume) behind a few header fields without copying it into one buffer.
    /// On the wire the two are one payload; a decoded frame never has a tail.
    public var payloadTail: ByteBuffer?

    /// A frame of `type` with `flags` and `payload` (followed by `payloadTail`, if any).
    public init(type: FrameType, flags: UInt16 = 0, payload: ByteBuffer = ByteBuffer(), payloadTail: ByteBuffer? = nil) {
        self.type = type
        self.flags = flags
        self.payload = payload
        self.payloadTail = payloadTail
    }

    /// The payload's length on the wire: ``payload`` and ``payloadTail`` together.
    public var payloadLength: Int { payload.readableBytes + (payloadTail?.readableBytes ?? 0) }

    /// This frame with its payload in one buffer (a copy when there is a tail).
    public func flattened(allocator: ByteBufferAllocator = ByteBufferAllocator()) -> Frame {
        guard let tail = payloadTail else { return self }
        var whole = allocator.buffer(capacity: payloadLength)
        whole.writeImmutableBuffer(payload)
        whole.writeImmutableBuffer(tail)
        return Frame(type: type, flags: flags, payload: whole)
    }

    /// Frames are equal when they put the same bytes on the wire, however the payload is split.
    public static func == (a: Frame, b: Frame) -> Bool {
        guard a.type == b.type, a.flags == b.flags, a.payloadLength == b.payloadLength else { return false }
        if a.payloadTail == nil, b.payloadTail == nil { return a.payload == b.payload }
        // Tests and tools only: copies.
        return a.flattened().payload == b.flattened().payload
    }
}

/// The type byte of a frame.
///
/// A struct rather than an enum so that a decoder can carry types it does not know yet; values
/// 0x80 and above are *optional*: a receiver that does not know one ignores the frame.
public struct FrameType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The byte on the wire.
    public let rawValue: UInt8

    /// Any byte is a frame type; whether it is known is up to the receiver.
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// Opens a link: the sender's protocol versions, site ID and name.
    public static let hello = FrameType(rawValue: 0x01)
    /// Answers `hello` from the accepting side with the chosen protocol version.
    public static let helloAck = FrameType(rawValue: 0x02)
    /// Heartbeat request.
    public static let ping = FrameType(rawValue: 0x03)
    /// Heartbeat answer, echoing the ping.
    public static let pong = FrameType(rawValue: 0x04)
    /// Sent before a deliberate close, with a reason for the other side's log.
    public static let goodbye = FrameType(rawValue: 0x05)

    /// The frame types `PeerLinks` handles itself.
    public static let linkControl: Set<FrameType> = [.hello, .helloAck, .ping, .pong, .goodbye]

    /// Volume replication: one ``VolumeFrame`` (a ``ReplicationMessage`` of one volume, with its
    /// data). Flag 0x0001: the data is zstd-compressed.
    public static let replication = FrameType(rawValue: 0x10)

    /// The data-plane types this build defines, each with the flag bits it defines: what a
    /// `PeerLinks` delivers to `onFrame` unless it is given other types.
    public static let dataPlane: [FrameType: UInt16] = VolumeFrame.frameTypes

    /// Whether a receiver that does not know this type may skip the frame (type >= 0x80).
    public var isOptional: Bool { rawValue >= 0x80 }

    public var description: String {
        switch self {
        case .hello: return "hello"
        case .helloAck: return "helloAck"
        case .ping: return "ping"
        case .pong: return "pong"
        case .goodbye: return "goodbye"
        case .replication: return "replication"
        default: return "0x" + String(rawValue, radix: 16)
        }
    }
}

/// Why bytes from the network were not accepted as a frame or message. Any of these closes the
/// connection.
public enum FrameError: Error, Equatable, CustomStringConvertible {
    /// The first four bytes were not "FRY1": not a Ferry peer, or the stream lost its framing.
    case badMagic(UInt32)
    /// A frame format version this site does not read.
    case unsupportedVersion(UInt8)
    /// The announced payload is larger than ``Frame/maxPayloadSize``.
    case payloadTooLarge(length: UInt32)
    /// The XXH3-64 over header and payload did not match the trailer.
    case checksumMismatch(expected: UInt64, computed: UInt64)
    /// A non-optional frame type this site does not know.
    case unknownType(FrameType)
    /// A frame of a known type with flag bits its type does not define (all the frame's flags).
    case unknownFlags(FrameType, UInt16)
    /// The payload does not have the layout its type requires.
    case malformedPayload(FrameType, String)
    /// Frame too large to send (an encoder-side check).
    case payloadTooLargeToSend(length: Int)

    public var description: String {
        switch self {
        case .badMagic(let magic):
            return "bad frame magic 0x\(String(magic, radix: 16)) (want 0x46525931 \"FRY1\"): "
                + "the other end is not a Ferry site, or the stream is corrupt"
        case .unsupportedVersion(let version):
            return "frame format version \(version) is not supported (this site reads version \(Frame.formatVersion)); "
                + "upgrade this site"
        case .payloadTooLarge(let length):
            return "frame payload of \(length) bytes exceeds the \(Frame.maxPayloadSize)-byte limit"
        case .checksumMismatch(let expected, let computed):
            return "frame checksum mismatch (frame says \(String(expected, radix: 16)), "
                + "bytes hash to \(String(computed, radix: 16))): data was corrupted in transit"
        case .unknownType(let type):
            return "unknown frame type \(type) (not optional): the other site speaks a newer protocol; upgrade this site"
        case .unknownFlags(let type, let flags):
            return "\(type) frame with flags 0x\(String(flags, radix: 16)), which sets bits this site does not know: "
                + "the other site speaks a newer protocol, or has a bug; upgrade this site"
        case .malformedPayload(let type, let why):
            return "malformed \(type) frame: \(why)"
        case .payloadTooLargeToSend(let length):
            return "refusing to send a \(length)-byte frame payload; the limit is \(Frame.maxPayloadSize) bytes"
        }
    }
}
