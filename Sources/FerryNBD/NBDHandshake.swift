import NIOCore

/// Option haggling (proto.md "Option types"): every option gets a reply and parsing goes on,
/// except EXPORT_NAME and a successful GO, which end the handshake.
extension NBDConnectionHandler {
    func parseOption(_ buffer: inout ByteBuffer) -> Bool {
        guard buffer.readableBytes >= 16 else { return false }
        let start = buffer.readerIndex
        let magic = buffer.getInteger(at: start, as: UInt64.self)!
        let option = buffer.getInteger(at: start + 8, as: UInt32.self)!
        let length = Int(buffer.getInteger(at: start + 12, as: UInt32.self)!)
        guard magic == NBD.ihaveopt else {
            protocolViolation("bad option magic 0x\(String(magic, radix: 16))")
            return false
        }
        guard length <= NBD.maxOptionLength else {
            protocolViolation("option \(option) with \(length) bytes of data")
            return false
        }
        guard buffer.readableBytes >= 16 + length else { return false }
        buffer.moveReaderIndex(forwardBy: 16)
        let data = buffer.readSlice(length: length)!
        handleOption(option, data: data)
        return true
    }

    private func handleOption(_ option: UInt32, data: ByteBuffer) {
        if shuttingDown && option == NBD.Option.exportName {
            // EXPORT_NAME has no error reply; an option reply would be read as size and flags.
            flushAndClose()
            return
        }
        if shuttingDown && option != NBD.Option.abort {
            optionReply(option, NBD.Reply.errShutdown, message: "server is shutting down")
            return
        }
        switch option {
        case NBD.Option.exportName:
            handleExportName(data)
        case NBD.Option.abort:
            optionReply(option, NBD.Reply.ack)
            flushAndClose()
        case NBD.Option.list:
            guard data.readableBytes == 0 else {
                return optionReply(option, NBD.Reply.errInvalid, message: "LIST takes no data")
            }
            for export in exports.all {
                var payload = context.channel.allocator.buffer(capacity: 4 + export.name.utf8.count)
                payload.writeInteger(UInt32(export.name.utf8.count))
                payload.writeString(export.name)
                payload.writeString(export.description)
                optionReply(option, NBD.Reply.server, payload: payload)
            }
            optionReply(option, NBD.Reply.ack)
        case NBD.Option.info, NBD.Option.go:
            handleInfoOrGo(option, data: data)
        case NBD.Option.structuredReply:
            guard data.readableBytes == 0 else {
                return optionReply(option, NBD.Reply.errInvalid, message: "STRUCTURED_REPLY takes no data")
            }
            structuredReplies = true
            optionReply(option, NBD.Reply.ack)
        case NBD.Option.listMetaContext, NBD.Option.setMetaContext:
            handleMetaContext(option, data: data)
        case NBD.Option.startTLS:
            // Ferry's NBD listener is for loopback or a trusted network; TLS is on peer links.
            optionReply(option, NBD.Reply.errPolicy, message: "TLS is not offered on this NBD listener")
        default:
            optionReply(option, NBD.Reply.errUnsup, message: "option \(option) is not supported")
        }
    }

    /// Sends an option reply (magic, option, type, length, data).
    func optionReply(_ option: UInt32, _ type: UInt32, payload: ByteBuffer? = nil, message: String? = nil) {
        var body = payload
        if body == nil, let message {
            body = context.channel.allocator.buffer(string: message)
        }
        let length = body?.readableBytes ?? 0
        var out = context.channel.allocator.buffer(capacity: 20 + length)
        out.writeInteger(NBD.optionReplyMagic)
        out.writeInteger(option)
        out.writeInteger(type)
        out.writeInteger(UInt32(length))
        if var body { out.writeBuffer(&body) }
        send(out)
    }

    private func handleExportName(_ data: ByteBuffer) {
        let name = String(buffer: data)
        guard let export = attach(name) else {
            // proto.md: EXPORT_NAME cannot return an error; the server must close.
            protocolViolation("EXPORT_NAME: \(unavailable(name))")
            return
        }
        var out = context.channel.allocator.buffer(capacity: 134)
        let flags = transmissionFlags(for: export)
        out.writeInteger(export.device.size)
        out.writeInteger(flags)
        if !noZeroes { out.writeRepeatingByte(0, count: 124) }
        send(out)
        enterTransmission(export, flags: flags)
    }

    private func handleInfoOrGo(_ option: UInt32, data: ByteBuffer) {
        var d = data
        guard let nameLength = d.readInteger(as: UInt32.self), Int(nameLength) <= d.readableBytes,
              let name = d.readString(length: Int(nameLength)),
              let count = d.readInteger(as: UInt16.self), d.readableBytes == Int(count) * 2 else {
            return optionReply(option, NBD.Reply.errInvalid, message: "malformed INFO/GO request")
        }
        var requests: [UInt16] = []
        for _ in 0..<count { requests.append(d.readInteger(as: UInt16.self)!) }
        // GO attaches now, so that the export cannot be withdrawn unnoticed between these
        // replies and the transmission phase.
        guard let export = option == NBD.Option.go ? attach(name) : exports.lookup(name) else {
            // proto.md: ERR_UNKNOWN, "The requested export is not available" (also when fenced).
            return optionReply(option, NBD.Reply.errUnknown, message: unavailable(name))
        }
        let flags = transmissionFlags(for: export)
        var info = context.channel.allocator.buffer(capacity: 12)
        info.writeInteger(NBD.Info.export)
        info.writeInteger(export.device.size)
        info.writeInteger(flags)
        optionReply(option, NBD.Reply.info, payload: info)
        for request in Set(requests).sorted() {
            var payload = context.channel.allocator.buffer(capacity: 32)
            switch request {
            case NBD.Info.name:
                payload.writeInteger(NBD.Info.name)
                payload.writeString(export.name)
            case NBD.Info.description where !export.description.isEmpty:
                payload.writeInteger(NBD.Info.description)
                payload.writeString(export.description)
            case NBD.Info.blockSize:
                payload.writeInteger(NBD.Info.blockSize)
                payload.writeInteger(export.minimumBlockSize)
                payload.writeInteger(export.preferredBlockSize)
                payload.writeInteger(UInt32(NBD.maxPayload))
            default:
                continue  // unknown or empty info requests are ignored (proto.md)
            }
            optionReply(option, NBD.Reply.info, payload: payload)
        }
        optionReply(option, NBD.Reply.ack)
        if option == NBD.Option.go {
            blockSizesAgreed = requests.contains(NBD.Info.blockSize)
            enterTransmission(export, flags: flags)
        }
    }

    private func handleMetaContext(_ option: UInt32, data: ByteBuffer) {
        let isSet = option == NBD.Option.setMetaContext
        if isSet && !structuredReplies {
            return optionReply(option, NBD.Reply.errInvalid, message: "SET_META_CONTEXT needs STRUCTURED_REPLY first")
        }
        var d = data
        guard let nameLength = d.readInteger(as: UInt32.self), Int(nameLength) <= d.readableBytes,
              let name = d.readString(length: Int(nameLength)),
              let queryCount = d.readInteger(as: UInt32.self) else {
            return optionReply(option, NBD.Reply.errInvalid, message: "malformed meta context request")
        }
        var queries: [String] = []
        for _ in 0..<queryCount {
            guard let l = d.readInteger(as: UInt32.self), Int(l) <= d.readableBytes,
                  let q = d.readString(length: Int(l)) else {
                return optionReply(option, NBD.Reply.errInvalid, message: "malformed meta context query")
            }
            queries.append(q)
        }
        guard d.readableBytes == 0 else {
            return optionReply(option, NBD.Reply.errInvalid, message: "trailing bytes after meta context queries")
        }
        if isSet {
            // proto.md: SET replaces the active set even when it fails.
            baseAllocationSelected = false
            metaContextExport = nil
        }
        guard exports.lookup(name) != nil else {
            return optionReply(option, NBD.Reply.errUnknown, message: unavailable(name))
        }
        let matches: Bool
        if isSet {
            matches = queries.contains(NBD.baseAllocation)
        } else {
            // LIST: no queries lists everything; "base:" is a wildcard for the namespace.
            matches = queries.isEmpty || queries.contains(NBD.baseAllocation) || queries.contains("base:")
        }
        if matches {
            let id: UInt32 = isSet ? NBD.baseAllocationID : 0
            var payload = context.channel.allocator.buffer(capacity: 4 + NBD.baseAllocation.utf8.count)
            payload.writeInteger(id)
            payload.writeString(NBD.baseAllocation)
            optionReply(option, NBD.Reply.metaContext, payload: payload)
            if isSet {
                baseAllocationSelected = true
                metaContextExport = name
            }
        }
        optionReply(option, NBD.Reply.ack)
    }

    func transmissionFlags(for export: NBDExport) -> UInt16 {
        var flags = NBD.TransmissionFlag.hasFlags | NBD.TransmissionFlag.sendFlush | NBD.TransmissionFlag.sendFUA
            | NBD.TransmissionFlag.sendCache
        if export.device.canMultiConn { flags |= NBD.TransmissionFlag.canMultiConn }
        if export.device.isReadOnly {
            flags |= NBD.TransmissionFlag.readOnly
        } else {
            flags |= NBD.TransmissionFlag.sendTrim | NBD.TransmissionFlag.sendWriteZeroes | NBD.TransmissionFlag.sendFastZero
        }
        if structuredReplies { flags |= NBD.TransmissionFlag.sendDF }
        return flags
    }

    private func enterTransmission(_ export: NBDExport, flags: UInt16) {
        // Meta contexts selected for another export do not apply to this one.
        if let m = metaContextExport, exports.lookup(m)?.name != export.name {
            baseAllocationSelected = false
        }
        self.export = export
        self.transmissionFlags = flags
        phase = .transmission
        inFlightRequests.reserveCapacity(NBD.maxInFlight)
        logger.info("NBD client attached", metadata: [
            "conn": "\(connectionID)", "export": "\(export.name)",
            "structured": "\(structuredReplies)", "remote": "\(context.remoteAddress.map { "\($0)" } ?? "unix")",
        ])
    }
}
