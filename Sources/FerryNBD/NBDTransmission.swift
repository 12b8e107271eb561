import NIOCore

/// The transmission phase (proto.md "Transmission"): parse requests, check them, hand them to
/// the device, reply when the device's future completes.
extension NBDConnectionHandler {
    /// A WRITE whose payload is being written piece by piece as it arrives. A class: the
    /// pieces' completions, which may come after the last byte arrived, update it.
    final class StreamingWrite {
        let request: Request
        /// Its entry in `inFlightRequests`.
        let serial: UInt64
        var received = 0
        var outstanding = 0
        var finished = false
        var error: (any Error)?
        init(request: Request, serial: UInt64) {
            self.request = request
            self.serial = serial
        }
    }

    struct Request {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var offset: UInt64
        var length: UInt32
        /// When it was parsed (monotonic ns), for the latency metric; 0 when not recorded.
        var started: UInt64 = 0
    }

    func parseRequest(_ buffer: inout ByteBuffer) -> Bool {
        if streamingWrite != nil { return continueStreamingWrite(&buffer) }
        guard buffer.readableBytes >= 28 else { return false }
        let start = buffer.readerIndex
        guard buffer.getInteger(at: start, as: UInt32.self)! == NBD.requestMagic else {
            protocolViolation("bad request magic")
            return false
        }
        let request = Request(
            flags: buffer.getInteger(at: start + 4, as: UInt16.self)!,
            type: buffer.getInteger(at: start + 6, as: UInt16.self)!,
            cookie: buffer.getInteger(at: start + 8, as: UInt64.self)!,
            offset: buffer.getInteger(at: start + 16, as: UInt64.self)!,
            length: buffer.getInteger(at: start + 24, as: UInt32.self)!,
            started: metrics == nil ? 0 : NBDRequestMetrics.now())
        var payload: ByteBuffer?
        if request.type == NBD.Command.write {
            guard Int(request.length) <= NBD.maxPayload else {
                protocolViolation("WRITE payload of \(request.length) bytes exceeds \(NBD.maxPayload)")
                return false
            }
            guard buffer.readableBytes >= 28 + Int(request.length) else {
                return startStreamingWrite(request, &buffer)
            }
            buffer.moveReaderIndex(forwardBy: 28)
            payload = buffer.readSlice(length: Int(request.length))
        } else {
            buffer.moveReaderIndex(forwardBy: 28)
        }
        handle(request, payload: payload)
        return true
    }

    /// Begins writing a large WRITE's payload as it arrives (see `StreamingWriteDevice`), when
    /// the device can and the request is valid; otherwise the payload is gathered first.
    private func startStreamingWrite(_ request: Request, _ buffer: inout ByteBuffer) -> Bool {
        guard request.length >= NBD.streamingWriteThreshold, !draining, let export,
              export.device is any StreamingWriteDevice, check(request, export: export) == nil else { return false }
        buffer.moveReaderIndex(forwardBy: 28)
        streamingWrite = StreamingWrite(request: request, serial: beginRequest(request))
        _ = continueStreamingWrite(&buffer)
        return true
    }

    private func continueStreamingWrite(_ buffer: inout ByteBuffer) -> Bool {
        guard let write = streamingWrite else { return false }
        let count = min(Int(write.request.length) - write.received, buffer.readableBytes)
        guard count > 0 else { return false }
        let part = buffer.readSlice(length: count)!
        let offset = write.request.offset + UInt64(write.received)
        write.received += count
        if write.error == nil, let withdrawn = gate?.withdrawal { write.error = withdrawn }
        // After a failed piece the rest of the payload is still consumed, then the error replied.
        if write.error == nil, let device = export?.device as? any StreamingWriteDevice {
            write.outstanding += 1
            let eventLoop = context.eventLoop
            device.writePart(offset: offset, data: part, on: eventLoop).hop(to: eventLoop).assumeIsolated().whenComplete { result in
                write.outstanding -= 1
                if case .failure(let error) = result, write.error == nil { write.error = error }
                self.finishStreamingWriteIfDone(write)
            }
        }
        if write.received == Int(write.request.length) {
            streamingWrite = nil
            finishStreamingWriteIfDone(write)
        }
        return true
    }

    /// Replies to a streamed WRITE once all of it has arrived and every piece is written.
    private func finishStreamingWriteIfDone(_ write: StreamingWrite) {
        guard write.received == Int(write.request.length), write.outstanding == 0, !write.finished else { return }
        write.finished = true
        guard endRequest(write.serial) else { return }  // answered when the export was withdrawn
        let eventLoop = context.eventLoop
        if let error = write.error {
            track(write.request, eventLoop.makeFailedFuture(error) as EventLoopFuture<Void>)
        } else if write.request.flags & NBD.CommandFlag.fua != 0, let device = export?.device {
            track(write.request, device.flush(on: eventLoop))
        } else {
            reply(write.request, error: 0)
            closeIfDrained()
        }
    }

    private func handle(_ request: Request, payload: ByteBuffer?) {
        if request.type == NBD.Command.disconnect {
            // proto.md: no reply; finish outstanding requests, then close.
            draining = true
            closeIfDrained()
            return
        }
        if draining {
            if shuttingDown { reply(request, error: NBD.Errno.eshutdown) }
            return
        }
        // The export was removed or fenced; this connection is about to be told and closed.
        if let withdrawn = gate?.withdrawal {
            reply(request, error: withdrawn.nbdError)
            return
        }
        guard let export else { return }
        let device = export.device
        if let error = check(request, export: export) {
            reply(request, error: error)
            return
        }
        let eventLoop = context.eventLoop
        let fua = request.flags & NBD.CommandFlag.fua != 0
        switch request.type {
        case NBD.Command.read:
            if request.length == 0 { return reply(request, error: 0) }
            track(request, device.read(offset: request.offset, length: Int(request.length), on: eventLoop))
        case NBD.Command.write:
            track(request, device.write(offset: request.offset, data: payload!, fua: fua, on: eventLoop))
        case NBD.Command.flush:
            track(request, device.flush(on: eventLoop))
        case NBD.Command.trim where request.length == 0, NBD.Command.writeZeroes where request.length == 0:
            reply(request, error: 0)  // nothing to do; fallocate would refuse a zero length
        case NBD.Command.trim:
            track(request, device.trim(offset: request.offset, length: UInt64(request.length), fua: fua, on: eventLoop))
        case NBD.Command.writeZeroes:
            track(request, device.writeZeroes(
                offset: request.offset, length: UInt64(request.length),
                mayPunchHole: request.flags & NBD.CommandFlag.noHole == 0,
                fastOnly: request.flags & NBD.CommandFlag.fastZero != 0, fua: fua, on: eventLoop))
        case NBD.Command.cache:
            reply(request, error: 0)  // a prefetch hint; the page cache does this for us
        case NBD.Command.blockStatus:
            track(request, device.blockStatus(offset: request.offset, length: UInt64(request.length), on: eventLoop))
        default:
            reply(request, error: NBD.Errno.einval)
        }
    }

    /// The error the spec names for a request that cannot be served as sent, or nil.
    private func check(_ r: Request, export: NBDExport) -> UInt32? {
        let size = export.device.size
        let (end, overflow) = r.offset.addingReportingOverflow(UInt64(r.length))
        let inRange = !overflow && end <= size
        // proto.md: the client promises alignment only if it asked for block sizes in GO.
        let min = blockSizesAgreed ? UInt64(max(1, export.minimumBlockSize)) : 1
        let aligned = r.offset % min == 0 && UInt64(r.length) % min == 0
        let isWriteLike = r.type == NBD.Command.write || r.type == NBD.Command.trim || r.type == NBD.Command.writeZeroes

        var allowedFlags = NBD.CommandFlag.fua
        switch r.type {
        case NBD.Command.read where structuredReplies: allowedFlags |= NBD.CommandFlag.df
        case NBD.Command.writeZeroes: allowedFlags |= NBD.CommandFlag.noHole | NBD.CommandFlag.fastZero
        case NBD.Command.blockStatus: allowedFlags |= NBD.CommandFlag.reqOne
        default: break
        }
        if r.flags & ~allowedFlags != 0 { return NBD.Errno.einval }

        switch r.type {
        case NBD.Command.read, NBD.Command.write, NBD.Command.trim, NBD.Command.writeZeroes, NBD.Command.cache:
            if isWriteLike && export.device.isReadOnly { return NBD.Errno.eperm }
            // proto.md: writes past the end get ENOSPC; everything else out of range EINVAL.
            if !inRange { return r.type == NBD.Command.write || r.type == NBD.Command.writeZeroes ? NBD.Errno.enospc : NBD.Errno.einval }
            if !aligned { return NBD.Errno.einval }
            if r.type == NBD.Command.read && Int(r.length) > NBD.maxPayload { return NBD.Errno.einval }
            return nil
        case NBD.Command.flush:
            return nil
        case NBD.Command.blockStatus:
            if !baseAllocationSelected || !structuredReplies { return NBD.Errno.einval }
            if r.length == 0 || !inRange || !aligned { return NBD.Errno.einval }
            return nil
        default:
            return NBD.Errno.einval
        }
    }

    private func track<T: Sendable>(_ request: Request, _ future: EventLoopFuture<T>) {
        let serial = beginRequest(request)
        // hop: a device that completes on another loop must not trip assumeIsolated's check.
        future.hop(to: context.eventLoop).assumeIsolated().whenComplete { result in
            guard self.endRequest(serial) else { return }  // answered when the export was withdrawn
            if self.paused { self.scheduleResume() }
            // Once the export is removed or fenced no reply reports success, also for a request
            // the device completed before this connection heard of it.
            let result = self.gate?.withdrawal.map { Result<T, any Error>.failure($0) } ?? result
            switch result {
            case .success(let value):
                switch value {
                case let data as ByteBuffer: self.replyRead(request, data: data)
                case let extents as [BlockExtent]: self.replyBlockStatus(request, extents: extents)
                default: self.reply(request, error: 0)
                }
            case .failure(let error):
                let code = (error as? BlockDeviceError)?.nbdError ?? NBD.Errno.eio
                if code == NBD.Errno.eio {
                    self.logger.warning("NBD request failed", metadata: [
                        "conn": "\(self.connectionID)", "command": "\(request.type)",
                        "offset": "\(request.offset)", "length": "\(request.length)", "error": "\(error)"])
                }
                self.reply(request, error: code)
            }
            self.closeIfDrained()
        }
    }

    /// A reply without data: simple, except for READ under structured replies, which must be
    /// structured (proto.md: "the server MUST NOT send a simple reply to a READ").
    func reply(_ r: Request, error: UInt32) {
        guard phase == .transmission else { return }
        metrics?.record(type: r.type, length: r.length, started: r.started, error: error)
        if structuredReplies && (r.type == NBD.Command.read || (error != 0 && r.type == NBD.Command.blockStatus)) {
            if error == 0 {
                send(chunkHeader(r.cookie, type: NBD.ChunkType.none, length: 0))
            } else {
                var chunk = chunkHeader(r.cookie, type: NBD.ChunkType.error, length: 6, extra: 6)
                chunk.writeInteger(error)
                chunk.writeInteger(UInt16(0))
                send(chunk)
            }
            return
        }
        var out = context.channel.allocator.buffer(capacity: 16)
        out.writeInteger(NBD.simpleReplyMagic)
        out.writeInteger(error)
        out.writeInteger(r.cookie)
        send(out)
    }

    private func replyRead(_ r: Request, data: ByteBuffer) {
        guard phase == .transmission else { return }
        metrics?.record(type: r.type, length: r.length, started: r.started, error: 0)
        if structuredReplies {
            var header = chunkHeader(r.cookie, type: NBD.ChunkType.offsetData, length: 8 + data.readableBytes, extra: 8)
            header.writeInteger(r.offset)
            context.write(wrapOutboundOut(header), promise: nil)
        } else {
            var header = context.channel.allocator.buffer(capacity: 16)
            header.writeInteger(NBD.simpleReplyMagic)
            header.writeInteger(UInt32(0))
            header.writeInteger(r.cookie)
            context.write(wrapOutboundOut(header), promise: nil)
        }
        send(data)
    }

    private func replyBlockStatus(_ r: Request, extents: [BlockExtent]) {
        guard phase == .transmission else { return }
        metrics?.record(type: r.type, length: r.length, started: r.started, error: 0)
        // Extents must be non-empty, each of non-zero length below 2^32; with REQ_ONE exactly one,
        // not past the request. Without it, the last may run past the request (proto.md).
        var list = extents.filter { $0.length > 0 }
        if list.isEmpty { list = [BlockExtent(length: UInt64(r.length), isHole: false, readsAsZero: false)] }
        if r.flags & NBD.CommandFlag.reqOne != 0 {
            list = [list[0]]
            list[0].length = min(list[0].length, UInt64(r.length))
        }
        if list.count > 1 << 20 { list.removeLast(list.count - (1 << 20)) }
        // An extent longer than a u32 is cut short and ends the list, so the extents stay
        // contiguous; the client asks again from where the list ends.
        let longest = UInt64(UInt32.max) & ~0xfff
        if let cut = list.firstIndex(where: { $0.length > longest }) {
            list.removeLast(list.count - cut - 1)
            list[cut].length = longest
        }
        var out = chunkHeader(r.cookie, type: NBD.ChunkType.blockStatus, length: 4 + 8 * list.count, extra: 4 + 8 * list.count)
        out.writeInteger(NBD.baseAllocationID)
        for e in list {
            out.writeInteger(UInt32(e.length))
            var flags: UInt32 = 0
            if e.isHole { flags |= NBD.StateFlag.hole }
            if e.readsAsZero { flags |= NBD.StateFlag.zero }
            out.writeInteger(flags)
        }
        send(out)
    }

    /// A structured reply chunk header with the DONE flag (every Ferry reply is one chunk).
    private func chunkHeader(_ cookie: UInt64, type: UInt16, length: Int, extra: Int = 0) -> ByteBuffer {
        var out = context.channel.allocator.buffer(capacity: 20 + extra)
        out.writeInteger(NBD.structuredReplyMagic)
        out.writeInteger(NBD.replyFlagDone)
        out.writeInteger(type)
        out.writeInteger(cookie)
        out.writeInteger(UInt32(length))
        return out
    }
}
