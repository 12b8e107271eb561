import Logging
import NIOCore

/// One NBD client connection: the fixed-newstyle handshake, then transmission.
///
/// A single inbound handler parses both phases from its own cumulation buffer, so the switch from
/// options to requests happens exactly at the byte where the client starts sending requests.
/// Requests are dispatched as soon as they are parsed and replied to as their futures complete
/// (out of order when a later one finishes first); replies produced while a read burst is being
/// processed are flushed once at `channelReadComplete` (research/swift-platform.md §3).
///
/// Anything the protocol calls a violation — bad magic, unknown client flags, an oversized
/// option or payload — closes this connection only.
final class NBDConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase {
        case clientFlags
        case options
        case transmission
        case closed
    }

    let exports: NBDExportTable
    let logger: Logger
    let connectionID: String

    var phase: Phase = .clientFlags
    var cumulation: ByteBuffer?
    var context: ChannelHandlerContext!

    // Negotiated state.
    var noZeroes = false
    var structuredReplies = false
    /// The export SET_META_CONTEXT was for and whether base:allocation was selected.
    var metaContextExport: String?
    var baseAllocationSelected = false

    // Transmission state.
    var export: NBDExport?
    var transmissionFlags: UInt16 = 0
    var inFlight = 0
    var streamingWrite: StreamingWrite?
    /// Counted in the export table's clients; detached exactly once, however the connection ends.
    var attached = false
    /// The client asked for NBD_INFO_BLOCK_SIZE in GO, so it promised to honour the minimum
    /// block size (proto.md): only then are misaligned requests refused.
    var blockSizesAgreed = false
    /// Parsing stopped for backpressure (see `shouldPause`); the rest waits in `cumulation`.
    var paused = false
    var resumeScheduled = false
    var inReadBurst = false
    var needsFlush = false
    /// DISC received or server shutting down: no new work; close when `inFlight` reaches 0.
    var draining = false
    var shuttingDown = false

    init(exports: NBDExportTable, logger: Logger, connectionID: String) {
        self.exports = exports
        self.logger = logger
        self.connectionID = connectionID
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        greeting.writeInteger(NBD.nbdMagic)
        greeting.writeInteger(NBD.ihaveopt)
        greeting.writeInteger(NBD.HandshakeFlag.fixedNewstyle | NBD.HandshakeFlag.noZeroes)
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if attached, let export {
            attached = false
            exports.clientDetached(export.name)
            logger.info("NBD client disconnected", metadata: ["conn": "\(connectionID)", "export": "\(export.name)"])
        }
        phase = .closed
        cumulation = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("NBD connection error", metadata: ["conn": "\(connectionID)", "error": "\(error)"])
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if paused {
            // A read that was under way when parsing paused: keep it for later.
            if cumulation == nil { cumulation = incoming } else { cumulation!.writeBuffer(&incoming) }
            return
        }
        inReadBurst = true
        // Parse from a local buffer: handling a message may close the connection, which clears
        // `cumulation`, so the property must not be borrowed while parsing.
        var buffer: ByteBuffer
        if var pending = cumulation {
            cumulation = nil
            pending.writeBuffer(&incoming)
            buffer = pending
        } else {
            buffer = incoming
        }
        parse(&buffer)
        if buffer.readableBytes > 0, phase != .closed {
            reserveForPending(&buffer)
            cumulation = buffer
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        inReadBurst = false
        if needsFlush {
            needsFlush = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { scheduleResume() }
        context.fireChannelWritabilityChanged()
    }

    /// Backpressure: a client that does not read its replies, or has too many requests in
    /// flight, is not parsed (and not read) further until that changes. Without it one burst of
    /// 28-byte READs of 32 MiB each would queue terabytes of replies.
    func shouldPause() -> Bool {
        phase == .transmission && (inFlight >= NBD.maxInFlight || !context.channel.isWritable)
    }

    func pause() {
        guard !paused else { return }
        paused = true
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenFailure { _ in }
        if needsFlush { needsFlush = false; context.flush() }
    }

    /// Resumes parsing on a later turn of the event loop, after the current read (which may still
    /// be storing its leftover bytes) has finished.
    func scheduleResume() {
        guard paused, !resumeScheduled else { return }
        resumeScheduled = true
        context.eventLoop.assumeIsolated().execute { self.resume() }
    }

    private func resume() {
        resumeScheduled = false
        guard paused, phase != .closed, !shouldPause() else { return }
        paused = false
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenFailure { _ in }
        guard var buffer = cumulation else { return }
        cumulation = nil
        inReadBurst = true
        parse(&buffer)
        inReadBurst = false
        if buffer.readableBytes > 0, phase != .closed {
            if cumulation != nil { buffer.writeBuffer(&cumulation!) }  // arrived while re-parsing
            cumulation = buffer
        }
        if needsFlush { needsFlush = false; context.flush() }
    }

    /// Parses and handles every complete message in `buffer`, leaving a partial one unread.
    private func parse(_ buffer: inout ByteBuffer) {
        while phase != .closed {
            if shouldPause() {
                pause()
                return
            }
            let before = buffer.readerIndex
            let progressed: Bool
            switch phase {
            case .clientFlags: progressed = parseClientFlags(&buffer)
            case .options: progressed = parseOption(&buffer)
            case .transmission: progressed = parseRequest(&buffer)
            case .closed: progressed = false
            }
            if !progressed || buffer.readerIndex == before { return }
        }
    }

    /// When a large WRITE payload is arriving in pieces, grow the buffer once to its full size
    /// instead of reallocating on every read.
    private func reserveForPending(_ buffer: inout ByteBuffer) {
        guard phase == .transmission, streamingWrite == nil, buffer.readableBytes >= 28,
              buffer.getInteger(at: buffer.readerIndex + 6, as: UInt16.self) == NBD.Command.write,
              let length = buffer.getInteger(at: buffer.readerIndex + 24, as: UInt32.self),
              Int(length) <= NBD.maxPayload else { return }
        let needed = 28 + Int(length)
        if buffer.capacity - buffer.readerIndex < needed {
            buffer.discardReadBytes()
            buffer.reserveCapacity(needed)
        }
    }

    private func parseClientFlags(_ buffer: inout ByteBuffer) -> Bool {
        guard let flags = buffer.readInteger(as: UInt32.self) else { return false }
        // proto.md: "the server MUST drop the TCP connection" on unknown client flags.
        if flags & ~NBD.ClientFlag.known != 0 {
            protocolViolation("unknown client flags 0x\(String(flags, radix: 16))")
            return false
        }
        noZeroes = flags & NBD.ClientFlag.noZeroes != 0
        phase = .options
        return true
    }

    /// Closes the connection on a protocol violation; the server and other connections go on.
    func protocolViolation(_ what: String) {
        logger.notice("NBD protocol violation, closing connection", metadata: ["conn": "\(connectionID)", "reason": "\(what)"])
        phase = .closed
        cumulation = nil
        context.close(promise: nil)
    }

    /// Closes after every reply written so far has been sent: NIO's close fails queued writes,
    /// so a plain close would cut off replies the client is owed (proto.md: on DISC the server
    /// finishes outstanding requests; ABORT is answered with ACK).
    func flushAndClose() {
        phase = .closed
        cumulation = nil
        needsFlush = false
        let context = self.context!
        let sent = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(capacity: 0)), promise: sent)
        sent.futureResult.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    /// Writes a reply; flushes now unless a read burst is in progress (then at readComplete).
    func send(_ buffer: ByteBuffer) {
        context.write(wrapOutboundOut(buffer), promise: nil)
        if inReadBurst { needsFlush = true } else { context.flush() }
    }

    /// Begins a graceful stop: no new requests are accepted (they get ESHUTDOWN); the connection
    /// closes once every request in flight has been answered.
    func beginShutdown() {
        shuttingDown = true
        switch phase {
        case .transmission:
            draining = true
            closeIfDrained()
        case .clientFlags, .options:
            flushAndClose()
        case .closed:
            break
        }
    }

    func closeIfDrained() {
        if draining, inFlight == 0, streamingWrite == nil, phase != .closed {
            flushAndClose()
        }
    }
}
