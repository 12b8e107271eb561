import CXXHash
import NIOCore

/// Splits a byte stream into ``Frame``s, checking every frame before it goes further.
///
/// Checks run as soon as their bytes are there (see ``Frame`` for the layout and order), so a
/// stream that is not Ferry, or a length over 64 MiB, is refused without buffering the payload.
/// Any failure throws a ``FrameError``; the channel pipeline then closes the connection, and
/// nothing from the bad frame reaches a handler. A well-formed frame of an optional type not in
/// `knownFlags` is dropped; of a non-optional unknown type, it throws ``FrameError/unknownType(_:)``.
/// A frame of a known type with a flag bit outside its type's mask throws
/// ``FrameError/unknownFlags(_:_:)``.
public struct FrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = Frame

    /// The frame types the layer above understands, each with the flag bits it defines.
    public let knownFlags: [FrameType: UInt16]

    /// The frame types the layer above understands.
    public var knownTypes: Set<FrameType> { Set(knownFlags.keys) }

    /// - Parameter knownTypes: the types to deliver, none of which defines a flag; by default the
    ///   link-control types.
    public init(knownTypes: Set<FrameType> = FrameType.linkControl) {
        self.knownFlags = Dictionary(uniqueKeysWithValues: knownTypes.map { ($0, 0) })
    }

    /// - Parameter knownFlags: the types to deliver, each with the mask of flag bits it may carry
    ///   (0 for the link-control types).
    public init(knownFlags: [FrameType: UInt16]) {
        self.knownFlags = knownFlags
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try nextFrame(from: &buffer) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool
    ) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        // A partial frame at the end of the stream is dropped: it was never checksummed.
        return .needMoreData
    }

    /// Takes the next known frame off the front of `buffer`, skipping unknown optional frames.
    ///
    /// Returns nil, consuming nothing of the incomplete frame, when more bytes are needed. The
    /// channel-free core of the decoder, for tools and tests.
    public func nextFrame(from buffer: inout ByteBuffer) throws -> Frame? {
        while true {
            guard let frame = try Self.decodeOne(from: &buffer) else { return nil }
            if let mask = knownFlags[frame.type] {
                // proto: a flag the receiver does not know is fatal, like an unknown type.
                guard frame.flags & ~mask == 0 else { throw FrameError.unknownFlags(frame.type, frame.flags) }
                return frame
            }
            if !frame.type.isOptional { throw FrameError.unknownType(frame.type) }
            // proto: an unknown optional frame is skipped; it was checked like any other.
        }
    }

    /// Decodes one frame of any type, or returns nil when the buffer holds only part of one.
    static func decodeOne(from buffer: inout ByteBuffer) throws -> Frame? {
        let start = buffer.readerIndex
        guard let magic = buffer.getInteger(at: start, as: UInt32.self) else { return nil }
        guard magic == Frame.magic else { throw FrameError.badMagic(magic) }
        guard let version = buffer.getInteger(at: start + 4, as: UInt8.self) else { return nil }
        guard version == Frame.formatVersion else { throw FrameError.unsupportedVersion(version) }
        guard let length = buffer.getInteger(at: start + 8, as: UInt32.self) else { return nil }
        guard length <= Frame.maxPayloadSize else { throw FrameError.payloadTooLarge(length: length) }
        let covered = Frame.headerSize + Int(length)
        guard buffer.readableBytes >= covered + Frame.trailerSize else { return nil }

        let expected = buffer.getInteger(at: start + covered, as: UInt64.self)!
        let computed = buffer.withUnsafeReadableBytes { bytes in
            XXH3_64bits(bytes.baseAddress, covered)
        }
        guard expected == computed else {
            throw FrameError.checksumMismatch(expected: expected, computed: computed)
        }
        let type = FrameType(rawValue: buffer.getInteger(at: start + 5, as: UInt8.self)!)
        let flags = buffer.getInteger(at: start + 6, as: UInt16.self)!
        buffer.moveReaderIndex(forwardBy: Frame.headerSize)
        let payload = buffer.readSlice(length: Int(length))!
        buffer.moveReaderIndex(forwardBy: Frame.trailerSize)
        return Frame(type: type, flags: flags, payload: payload)
    }
}

/// Writes ``Frame``s in the wire layout: header, payload, XXH3-64 of both, copying only small
/// pieces.
///
/// The checksum is computed with XXH3's streaming API over the pieces in place (one hash state per
/// handler, reused). A piece of at most ``copyLimit`` bytes (link control, acks, the fields before
/// the data, a 4 KiB block) is copied into a gathering buffer, which goes down the pipeline once it
/// holds ``gatherLimit`` bytes or at the next flush: frames written together then travel as a few
/// full TLS records instead of three records each (header, data, checksum), and each record costs
/// the layers below (BoringSSL's sealing, NIOSSL's per-write bookkeeping) more than copying 4 KiB.
/// A larger piece (a 1 MiB block) is handed on as it is, never copied. A payload over
/// ``Frame/maxPayloadSize`` fails the write and closes the connection
/// (``FrameError/payloadTooLargeToSend(length:)``).
///
/// Nothing written goes out before a flush, as with any NIO channel; a write's promise completes
/// once the buffer holding the end of its frame is written. Lives on its channel's event loop,
/// like every handler.
public final class FrameEncoder: ChannelOutboundHandler {
    public typealias OutboundIn = Frame
    public typealias OutboundOut = ByteBuffer

    /// Pieces of the payload up to this many bytes are copied into the gathering buffer.
    public static let copyLimit = 16 * 1024
    /// The gathering buffer goes down the pipeline once it holds this many bytes (a TLS record's
    /// worth of plaintext).
    public static let gatherLimit = 16 * 1024

    /// The XXH3 streaming state (`XXH3_state_t *`), reset for each frame.
    private let hashState: OpaquePointer
    /// Copied bytes not handed on yet.
    private var gathered: ByteBuffer?
    /// Promises of frames whose end is in `gathered`.
    private var heldPromises: [EventLoopPromise<Void>] = []

    public init() {
        // Only fails when malloc does; nothing can go on without memory.
        guard let state = XXH3_createState() else { fatalError("XXH3_createState: out of memory") }
        hashState = state
    }

    deinit { XXH3_freeState(hashState) }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let frame = unwrapOutboundIn(data)
        var last: ByteBuffer?
        do {
            try encodeGathering(frame, allocator: context.channel.allocator) { buffer in
                // Hold each buffer back by one, so the promises go with the last.
                if let previous = last { context.write(wrapOutboundOut(previous), promise: nil) }
                last = buffer
            }
        } catch {
            promise?.fail(error)
            context.fireErrorCaught(error)
            return
        }
        if let promise { heldPromises.append(promise) }
        if let last {
            // Promises wait for the buffer with their frame's end; while one is gathered, for it.
            context.write(wrapOutboundOut(last), promise: gathered == nil ? takePromises(context) : nil)
        }
    }

    public func flush(context: ChannelHandlerContext) {
        if let buffer = gathered {
            gathered = nil
            context.write(wrapOutboundOut(buffer), promise: takePromises(context))
        }
        context.flush()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        gathered = nil
        let promises = heldPromises
        heldPromises = []
        for promise in promises { promise.fail(ChannelError.ioOnClosedChannel) }
    }

    /// The held promises as one, or nil.
    private func takePromises(_ context: ChannelHandlerContext) -> EventLoopPromise<Void>? {
        guard !heldPromises.isEmpty else { return nil }
        let promises = heldPromises
        heldPromises = []
        if promises.count == 1 { return promises[0] }
        let all = context.eventLoop.makePromise(of: Void.self)
        all.futureResult.whenComplete { result in
            for promise in promises { promise.completeWith(result) }
        }
        return all
    }

    /// Hands `emit` the buffers that put `frame` on the wire, in order; their bytes, concatenated,
    /// are the frame. Small pieces are copied, large ones handed on as they are. The channel-free
    /// core of the handler, one frame at a time, for tests.
    public func encode(_ frame: Frame, allocator: ByteBufferAllocator, emit: (ByteBuffer) -> Void) throws {
        try encodeGathering(frame, allocator: allocator, emit: emit)
        if let buffer = gathered {
            gathered = nil
            emit(buffer)
        }
    }

    /// As ``encode(_:allocator:emit:)``, leaving the copied bytes after the last large piece in
    /// `gathered` unless they reach ``gatherLimit``.
    private func encodeGathering(_ frame: Frame, allocator: ByteBufferAllocator, emit: (ByteBuffer) -> Void) throws {
        let length = frame.payloadLength
        guard length <= Frame.maxPayloadSize else { throw FrameError.payloadTooLargeToSend(length: length) }
        XXH3_64bits_reset(hashState)
        // Room for a buffer just under the limit plus one more frame of copied pieces.
        let capacity = 2 * Self.gatherLimit + 256
        var current = gathered ?? allocator.buffer(capacity: capacity)
        gathered = nil
        let headerOffset = current.readableBytes
        Self.writeHeader(of: frame, length: length, into: &current)
        current.withUnsafeReadableBytes { bytes in
            _ = XXH3_64bits_update(hashState, bytes.baseAddress! + headerOffset, Frame.headerSize)
        }
        func add(_ piece: ByteBuffer) {
            guard piece.readableBytes > 0 else { return }
            hash(piece)
            if piece.readableBytes <= Self.copyLimit {
                current.writeImmutableBuffer(piece)
            } else {
                if current.readableBytes > 0 { emit(current) }
                emit(piece)
                current = allocator.buffer(capacity: capacity)
            }
        }
        add(frame.payload)
        if let tail = frame.payloadTail { add(tail) }
        current.writeInteger(XXH3_64bits_digest(hashState))
        if current.readableBytes >= Self.gatherLimit {
            emit(current)
        } else {
            gathered = current
        }
    }

    private func hash(_ buffer: ByteBuffer) {
        buffer.withUnsafeReadableBytes { bytes in
            _ = XXH3_64bits_update(hashState, bytes.baseAddress, bytes.count)
        }
    }

    private static func writeHeader(of frame: Frame, length: Int, into out: inout ByteBuffer) {
        out.writeInteger(Frame.magic)
        out.writeInteger(Frame.formatVersion)
        out.writeInteger(frame.type.rawValue)
        out.writeInteger(frame.flags)
        out.writeInteger(UInt32(length))
    }

    /// Appends `frame` to `out` in one piece (copying the payload). Throws
    /// ``FrameError/payloadTooLargeToSend(length:)`` for a payload over ``Frame/maxPayloadSize``.
    /// For tools and tests; the channel pipeline uses the handler.
    public static func encode(_ frame: Frame, into out: inout ByteBuffer) throws {
        let length = frame.payloadLength
        guard length <= Frame.maxPayloadSize else { throw FrameError.payloadTooLargeToSend(length: length) }
        out.reserveCapacity(minimumWritableBytes: Frame.headerSize + length + Frame.trailerSize)
        let start = out.writerIndex
        writeHeader(of: frame, length: length, into: &out)
        out.writeImmutableBuffer(frame.payload)
        if let tail = frame.payloadTail { out.writeImmutableBuffer(tail) }
        let offset = start - out.readerIndex
        let checksum = out.withUnsafeReadableBytes { bytes in
            XXH3_64bits(bytes.baseAddress! + offset, Frame.headerSize + length)
        }
        out.writeInteger(checksum)
    }

    /// `frame` as a new buffer in the wire layout.
    public static func encode(_ frame: Frame, allocator: ByteBufferAllocator = ByteBufferAllocator()) throws -> ByteBuffer {
        var out = allocator.buffer(capacity: Frame.headerSize + frame.payloadLength + Frame.trailerSize)
        try encode(frame, into: &out)
        return out
    }
}

@available(*, unavailable)
extension FrameEncoder: Sendable {}
