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
    /// The export's gate (see `NBDExportTable`); closed when the export is removed or fenced.
    var gate: NBDExportGate?
    var transmissionFlags: UInt16 = 0
    /// Requests handed to the device (or, for a streamed WRITE, being received) and not answered
    /// yet, by a serial of this connection: counted for backpressure, and answered with an error
    /// if the export is withdrawn before the device completes them.
    var inFlightRequests: [UInt64: Request] = [:]
    var nextSerial: UInt64 = 0
    var inFlight: Int { inFlightRequests.count }
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
    var flushScheduled = false
    /// DISC received or server shutting down: no new work; close when `inFlight` reaches 0.
    var draining = false
    var shuttingDown = false

    /// Set at attach when the server records metrics (`NBDServer(recordsMetrics:)`).
    let recordsMetrics: Bool
    var metrics: NBDRequestMetrics?

    init(exports: NBDExportTable, logger: Logger, connectionID: String, recordsMetrics: Bool = false) {
        self.exports = exports
        self.logger = logger
        self.connectionID = connectionID
        self.recordsMetrics = recordsMetrics
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
            exports.detach(export.name, id: ObjectIdentifier(self))
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
        var buffer = incoming
        if var pending = cumulation {
            cumulation = nil
            if let lacking = bytesCompleting(pending, from: incoming), lacking < incoming.readableBytes {
                // Only what the partial request lacks is copied; the rest is parsed where it lies
                // (copying all of `incoming` behind it was one copy of every byte of 1 MiB writes).
                var head = incoming.readSlice(length: lacking)!
                pending.writeBuffer(&head)
                parse(&pending)
                if pending.readableBytes > 0 {  // it paused first: keep both, in order
                    pending.writeBuffer(&incoming)
                    buffer = pending
                } else {
                    buffer = incoming
                }
            } else {
                pending.writeBuffer(&incoming)
                buffer = pending
            }
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

    /// How many bytes of `incoming` complete the request whose beginning `pending` holds, when
    /// its header can be read from the two (nil otherwise, or outside transmission).
    private func bytesCompleting(_ pending: ByteBuffer, from incoming: ByteBuffer) -> Int? {
        guard phase == .transmission, streamingWrite == nil else { return nil }
        let have = pending.readableBytes
        guard have < 28 + NBD.maxPayload, have + incoming.readableBytes >= 28 else { return nil }
        func header(_ i: Int) -> UInt64 {
            let byte = i < have ? pending.getInteger(at: pending.readerIndex + i, as: UInt8.self)!
                                : incoming.getInteger(at: incoming.readerIndex + i - have, as: UInt8.self)!
            return UInt64(byte)
        }
        func field(_ at: Int, _ size: Int) -> UInt64 { (at..<at + size).reduce(0) { $0 << 8 | header($1) } }
        let isWrite = field(6, 2) == UInt64(NBD.Command.write)
        let length = field(24, 4)
        guard !isWrite || length <= UInt64(NBD.maxPayload) else { return nil }  // parse reports it
        let total = 28 + (isWrite ? Int(length) : 0)
        return total > have ? total - have : nil
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

    /// Writes a reply. Flushes at the end of a read burst when one is in progress; otherwise on
    /// the next turn of the event loop, so that replies to requests a device completes together
    /// (a replicated volume answers a batch of writes when one ack arrives) leave in one write.
    func send(_ buffer: ByteBuffer) {
        context.write(wrapOutboundOut(buffer), promise: nil)
        needsFlush = true
        if !inReadBurst, !flushScheduled {
            flushScheduled = true
            context.eventLoop.assumeIsolated().execute {
                self.flushScheduled = false
                if self.needsFlush, self.phase != .closed {
                    self.needsFlush = false
                    self.context.flush()
                }
            }
        }
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

    /// Counts `request` as in flight; returns its serial for `endRequest`.
    func beginRequest(_ request: Request) -> UInt64 {
        let serial = nextSerial
        nextSerial &+= 1
        inFlightRequests[serial] = request
        return serial
    }

    /// Stops counting a request; false when it was answered already (the export was withdrawn),
    /// so its completion must not reply again.
    func endRequest(_ serial: UInt64) -> Bool {
        inFlightRequests.removeValue(forKey: serial) != nil
    }

    /// Looks up an export for GO or EXPORT_NAME and counts this connection as its client, in one
    /// step with the table, so a concurrent `remove` or `fence` either hides the export or
    /// reaches this connection.
    func attach(_ name: String) -> NBDExport? {
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let eventLoop = context.eventLoop
        let client = AttachedClient { error, reason in
            // Always a later turn of the loop: `remove` may be called from inside a device
            // callback on this very loop, in the middle of parsing.
            eventLoop.execute { handler.value.withdraw(error, reason: reason) }
        }
        guard let (export, gate) = exports.attach(name, id: ObjectIdentifier(self), client: client) else { return nil }
        self.gate = gate
        attached = true
        if recordsMetrics { metrics = NBDRequestMetrics(volume: export.name) }
        return export
    }

    /// Why `name` cannot be opened, for an option reply.
    func unavailable(_ name: String) -> String {
        if let reason = exports.fenceReason(name) { return "export \"\(name)\" is fenced: \(reason)" }
        return "no export named \"\(name)\""
    }

    /// The export was removed or fenced: answers every request in flight with `error`, then
    /// closes once the replies are written. proto.md ("Terminating the transmission phase"): on
    /// a shutdown the server "MAY speed this process up by issuing error replies", which should
    /// be ESHUTDOWN; a request the device completes later gets no second reply.
    func withdraw(_ error: BlockDeviceError, reason: String) {
        guard phase == .transmission else { return }
        logger.notice("NBD export withdrawn, closing the connection", metadata: [
            "conn": "\(connectionID)", "export": "\(export?.name ?? "")",
            "why": "\(error == .fenced ? "fenced" : "removed")", "reason": "\(reason)",
            "inFlight": "\(inFlight)",
        ])
        let code = error.nbdError
        for serial in inFlightRequests.keys.sorted() {
            reply(inFlightRequests[serial]!, error: code)
        }
        inFlightRequests.removeAll()
        streamingWrite = nil
        flushAndClose()
    }

    func closeIfDrained() {
        if draining, inFlight == 0, streamingWrite == nil, phase != .closed {
            flushAndClose()
        }
    }
}
