import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import Testing
@testable import FerryNBD

/// A device in memory, for protocol tests without files.
final class MemoryDevice: StreamingWriteDevice {
    let size: UInt64
    let isReadOnly: Bool
    let canMultiConn: Bool
    private let bytes: NIOLockedValueBox<[UInt8]>
    let flushes = NIOLockedValueBox(0)
    /// Parts written through the streaming path, and an offset at which writing fails.
    let parts = NIOLockedValueBox(0)
    let failAt = NIOLockedValueBox<UInt64?>(nil)

    init(size: Int, readOnly: Bool = false, multiConn: Bool = true) {
        self.size = UInt64(size)
        self.isReadOnly = readOnly
        self.canMultiConn = multiConn
        self.bytes = NIOLockedValueBox([UInt8](repeating: 0, count: size))
    }

    func read(offset: UInt64, length: Int, on eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer> {
        let slice = bytes.withLockedValue { Array($0[Int(offset)..<Int(offset) + length]) }
        return eventLoop.makeSucceededFuture(ByteBuffer(bytes: slice))
    }

    func write(offset: UInt64, data: ByteBuffer, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        bytes.withLockedValue { $0.replaceSubrange(Int(offset)..<Int(offset) + data.readableBytes, with: data.readableBytesView) }
        return eventLoop.makeSucceededVoidFuture()
    }

    func writePart(offset: UInt64, data: ByteBuffer, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        parts.withLockedValue { $0 += 1 }
        if let f = failAt.withLockedValue({ $0 }), offset + UInt64(data.readableBytes) > f {
            return eventLoop.makeFailedFuture(BlockDeviceError.io(errno: 5))
        }
        return write(offset: offset, data: data, fua: false, on: eventLoop)
    }

    func flush(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        flushes.withLockedValue { $0 += 1 }
        return eventLoop.makeSucceededVoidFuture()
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        eventLoop.makeSucceededVoidFuture()
    }

    func writeZeroes(offset: UInt64, length: UInt64, mayPunchHole: Bool, fastOnly: Bool, fua: Bool,
                     on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        if fastOnly { return eventLoop.makeFailedFuture(BlockDeviceError.notSupported) }
        bytes.withLockedValue { $0.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length))) }
        return eventLoop.makeSucceededVoidFuture()
    }

    func blockStatus(offset: UInt64, length: UInt64, on eventLoop: any EventLoop) -> EventLoopFuture<[BlockExtent]> {
        eventLoop.makeSucceededFuture([BlockExtent(length: length, isHole: false, readsAsZero: false)])
    }

    func byte(at i: Int) -> UInt8 { bytes.withLockedValue { $0[i] } }
}

/// Drives one NBDConnectionHandler through an EmbeddedChannel, speaking the client side by hand.
final class NBDTestClient {
    let channel = EmbeddedChannel()
    let anyDevice: any StreamingWriteDevice
    var device: MemoryDevice { anyDevice as! MemoryDevice }
    let exports: NBDExportTable

    /// A client of its own table with `device` as "vm1", or of `table` as it is.
    init(device: any StreamingWriteDevice = MemoryDevice(size: 1 << 20), sharing table: NBDExportTable? = nil) throws {
        self.anyDevice = device
        if let table {
            exports = table
        } else {
            exports = NBDExportTable()
            exports.add(NBDExport(name: "vm1", description: "test volume", device: device))
        }
        try channel.pipeline.syncOperations.addHandler(
            NBDConnectionHandler(exports: exports, logger: Logger(label: "test"), connectionID: "t"))
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
    }

    func send(_ bytes: [UInt8]) throws {
        try channel.writeInbound(ByteBuffer(bytes: bytes))
    }

    /// Everything the server has written so far, as one buffer.
    func received() throws -> ByteBuffer {
        var all = ByteBuffer()
        while var b = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&b) }
        return all
    }

    var isOpen: Bool { channel.isActive }

    func option(_ code: UInt32, _ data: [UInt8] = []) throws {
        try send(be(UInt64(0x4948_4156_454F_5054)) + be(code) + be(UInt32(data.count)) + data)
    }

    /// Reads option replies until one with the given type (or an error) arrives.
    func optionReplies(_ buffer: inout ByteBuffer) -> [(type: UInt32, data: ByteBuffer)] {
        var out: [(UInt32, ByteBuffer)] = []
        while buffer.readableBytes >= 20 {
            _ = buffer.readInteger(as: UInt64.self)
            _ = buffer.readInteger(as: UInt32.self)
            let type = buffer.readInteger(as: UInt32.self)!
            let len = Int(buffer.readInteger(as: UInt32.self)!)
            out.append((type, buffer.readSlice(length: len)!))
        }
        return out
    }

    /// Fixed newstyle, structured replies, base:allocation, GO for vm1.
    func handshake(structured: Bool = true, greeted: Bool = false) throws {
        if !greeted {
            _ = try received()  // greeting
            try send(be(UInt32(3)))
        }
        if structured {
            try option(8)
            let q = Array("base:allocation".utf8)
            try option(10, be(UInt32(3)) + Array("vm1".utf8) + be(UInt32(1)) + be(UInt32(q.count)) + q)
        }
        try option(7, be(UInt32(3)) + Array("vm1".utf8) + be(UInt16(1)) + be(UInt16(3)))
        var replies = try received()
        let types = optionReplies(&replies).map(\.type)
        #expect(types.last == 1, "GO must end with ACK, got \(types)")
    }

    func request(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 7, offset: UInt64, length: UInt32, payload: [UInt8] = []) throws {
        try send(be(UInt32(0x2560_9513)) + be(flags) + be(type) + be(cookie) + be(offset) + be(length) + payload)
    }

    /// (cookie, error) of every simple reply in `buffer`.
    func simpleReplies(_ buffer: inout ByteBuffer) -> [(cookie: UInt64, error: UInt32)] {
        var out: [(UInt64, UInt32)] = []
        while buffer.readableBytes >= 16 {
            #expect(buffer.readInteger(as: UInt32.self) == 0x6744_6698, "expected a simple reply")
            let error = buffer.readInteger(as: UInt32.self)!
            out.append((buffer.readInteger(as: UInt64.self)!, error))
        }
        return out
    }

    /// The error code of a simple reply or of a structured (error) chunk.
    func replyError() throws -> UInt32? {
        var b = try received()
        guard let magic = b.readInteger(as: UInt32.self) else { return nil }
        if magic == 0x6744_6698 { return b.readInteger(as: UInt32.self) }
        _ = b.readInteger(as: UInt16.self)
        let type = b.readInteger(as: UInt16.self)!
        _ = b.readInteger(as: UInt64.self)
        _ = b.readInteger(as: UInt32.self)
        return type & 0x8000 != 0 ? b.readInteger(as: UInt32.self) : 0
    }
}

func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

@Suite struct NBDProtocolTests {
    @Test func greetingIsFixedNewstyleWithNoZeroes() throws {
        let c = try NBDTestClient()
        var g = try c.received()
        #expect(g.readInteger(as: UInt64.self) == 0x4e42_444d_4147_4943)
        #expect(g.readInteger(as: UInt64.self) == 0x4948_4156_454F_5054)
        #expect(g.readInteger(as: UInt16.self) == 3)
    }

    @Test func unknownClientFlagsCloseTheConnection() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(0x80)))
        #expect(!c.isOpen)
    }

    @Test func unknownOptionsGetErrUnsupAndHagglingGoesOn() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(1)))
        try c.option(4242, [1, 2, 3])
        try c.option(3)  // LIST
        var b = try c.received()
        let replies = c.optionReplies(&b)
        #expect(replies.first?.type == 0x8000_0001)
        #expect(replies.dropFirst().first?.type == 2)   // SERVER vm1
        #expect(replies.last?.type == 1)
        #expect(c.isOpen)
    }

    @Test func infoReportsSizeFlagsAndBlockSizes() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(3)))
        try c.option(6, be(UInt32(3)) + Array("vm1".utf8) + be(UInt16(2)) + be(UInt16(3)) + be(UInt16(1)))
        var b = try c.received()
        let replies = c.optionReplies(&b)
        var export = replies[0].data
        #expect(export.readInteger(as: UInt16.self) == 0)
        #expect(export.readInteger(as: UInt64.self) == 1 << 20)
        let flags = export.readInteger(as: UInt16.self)!
        #expect(flags & 0x100 != 0, "CAN_MULTI_CONN")
        #expect(flags & 0x4 != 0 && flags & 0x8 != 0, "FLUSH and FUA")
        var sizes = replies.first { $0.data.getInteger(at: $0.data.readerIndex, as: UInt16.self) == 3 }!.data
        _ = sizes.readInteger(as: UInt16.self)
        #expect(sizes.readInteger(as: UInt32.self) == 512)
        #expect(sizes.readInteger(as: UInt32.self) == 4096)
        #expect(sizes.readInteger(as: UInt32.self) == 32 << 20)
        #expect(replies.last?.type == 1)
    }

    @Test func goForAnUnknownExportIsErrUnknownAndTheConnectionStays() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(3)))
        try c.option(7, be(UInt32(4)) + Array("nope".utf8) + be(UInt16(0)))
        var b = try c.received()
        #expect(c.optionReplies(&b).first?.type == 0x8000_0006)
        #expect(c.isOpen)
    }

    @Test func setMetaContextNeedsStructuredReplies() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(3)))
        let q = Array("base:allocation".utf8)
        try c.option(10, be(UInt32(3)) + Array("vm1".utf8) + be(UInt32(1)) + be(UInt32(q.count)) + q)
        var b = try c.received()
        #expect(c.optionReplies(&b).first?.type == 0x8000_0003)
    }

    @Test func writeReadRoundTripWithStructuredReplies() throws {
        let c = try NBDTestClient()
        try c.handshake()
        try c.request(1, cookie: 1, offset: 4096, length: 512, payload: [UInt8](repeating: 0xab, count: 512))
        #expect(try c.replyError() == 0)
        #expect(c.device.byte(at: 4096) == 0xab)
        try c.request(0, cookie: 2, offset: 4096, length: 512)
        var b = try c.received()
        #expect(b.readInteger(as: UInt32.self) == 0x668e_33ef)
        #expect(b.readInteger(as: UInt16.self) == 1)     // DONE
        #expect(b.readInteger(as: UInt16.self) == 1)     // OFFSET_DATA
        #expect(b.readInteger(as: UInt64.self) == 2)
        let chunkLength = b.readInteger(as: UInt32.self)
        #expect(chunkLength == UInt32(8 + 512))
        #expect(b.readInteger(as: UInt64.self) == 4096)
        #expect(b.readBytes(length: 512) == [UInt8](repeating: 0xab, count: 512))
    }

    @Test func writeSplitAcrossManyReadsIsReassembled() throws {
        let c = try NBDTestClient()
        try c.handshake()
        let payload = (0..<65536).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let bytes = be(UInt32(0x2560_9513)) + be(UInt16(0)) + be(UInt16(1)) + be(UInt64(9)) + be(UInt64(65536)) + be(UInt32(65536)) + payload
        for chunk in stride(from: 0, to: bytes.count, by: 1000) {
            try c.send(Array(bytes[chunk..<min(chunk + 1000, bytes.count)]))
        }
        #expect(try c.replyError() == 0)
        #expect(c.device.byte(at: 65536 + 65535) == payload[65535])
    }

    /// A stream of writes (of several sizes) and flushes, cut into reads of each of these sizes
    /// so that every request is split somewhere (in its header or its payload), comes whole, or
    /// comes with the beginning of the next: every one is answered, in order, and written.
    @Test(arguments: [1, 5, 27, 28, 29, 511, 4097, 9001, 70000])
    func requestsSplitAnywhereAreAllAnsweredInOrder(readSize: Int) throws {
        let c = try NBDTestClient()
        try c.handshake(structured: false)
        var stream: [UInt8] = []
        var expected: [(cookie: UInt64, offset: Int, payload: [UInt8])] = []
        let sizes = [512, 4096, 1536, 8192, 2560]
        for i in 0..<24 {
            let cookie = UInt64(100 + i)
            if i % 5 == 4 {
                stream += be(UInt32(0x2560_9513)) + be(UInt16(0)) + be(UInt16(3)) + be(cookie) + be(UInt64(0)) + be(UInt32(0))
                expected.append((cookie, 0, []))
                continue
            }
            let offset = i * 16384
            let payload = (0..<sizes[i % sizes.count]).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
            stream += be(UInt32(0x2560_9513)) + be(UInt16(0)) + be(UInt16(1)) + be(cookie) + be(UInt64(offset))
                + be(UInt32(payload.count)) + payload
            expected.append((cookie, offset, payload))
        }
        var replies = ByteBuffer()
        for start in stride(from: 0, to: stream.count, by: readSize) {
            try c.send(Array(stream[start..<min(start + readSize, stream.count)]))
            var more = try c.received()
            replies.writeBuffer(&more)
        }
        let answered = c.simpleReplies(&replies)
        #expect(answered.map(\.cookie) == expected.map(\.cookie))
        #expect(answered.allSatisfy { $0.error == 0 })
        for write in expected where !write.payload.isEmpty {
            #expect(c.device.byte(at: write.offset) == write.payload.first)
            #expect(c.device.byte(at: write.offset + write.payload.count - 1) == write.payload.last)
            #expect(c.device.byte(at: write.offset + write.payload.count / 2) == write.payload[write.payload.count / 2])
        }
        #expect(c.isOpen)
    }

    @Test(arguments: [false, true])
    func largeWritesAreWrittenAsTheyArrive(failing: Bool) throws {
        let c = try NBDTestClient()
        try c.handshake()
        if failing { c.device.failAt.withLockedValue { $0 = 300_000 } }
        let length = 512 * 1024
        let payload = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        // The WRITE with FUA, immediately followed by a READ in the same stream.
        let bytes = be(UInt32(0x2560_9513)) + be(UInt16(1)) + be(UInt16(1)) + be(UInt64(9)) + be(UInt64(4096)) + be(UInt32(length)) + payload
            + be(UInt32(0x2560_9513)) + be(UInt16(0)) + be(UInt16(0)) + be(UInt64(10)) + be(UInt64(4096)) + be(UInt32(512))
        for chunk in stride(from: 0, to: bytes.count, by: 100_000) {
            try c.send(Array(bytes[chunk..<min(chunk + 100_000, bytes.count)]))
        }
        #expect(c.device.parts.withLockedValue { $0 } >= 3, "the payload should have been handed over in the pieces it arrived in")
        var b = try c.received()
        // First the WRITE's reply (simple), then the READ's (structured).
        #expect(b.readInteger(as: UInt32.self) == 0x6744_6698)
        #expect(b.readInteger(as: UInt32.self) == (failing ? 5 : 0))
        #expect(b.readInteger(as: UInt64.self) == 9)
        #expect(b.readInteger(as: UInt32.self) == 0x668e_33ef)
        #expect(c.isOpen)
        if !failing {
            #expect(c.device.flushes.withLockedValue { $0 } == 1, "FUA must flush")
            #expect(c.device.byte(at: 4096 + length - 1) == payload[length - 1])
            #expect(c.device.byte(at: 4096 + 200_000) == payload[200_000])
        }
    }

    @Test(arguments: [
        // (command, flags, offset, length, expected errno)
        (UInt16(0), UInt16(0), UInt64(1 << 20), UInt32(512), UInt32(22)),     // READ past the end: EINVAL
        (UInt16(1), UInt16(0), UInt64(1 << 20), UInt32(512), UInt32(28)),     // WRITE past the end: ENOSPC
        (UInt16(6), UInt16(0), UInt64(1 << 20) - 512, UInt32(1024), UInt32(28)), // WRITE_ZEROES past the end: ENOSPC
        (UInt16(4), UInt16(0), UInt64(1 << 20), UInt32(512), UInt32(22)),     // TRIM past the end: EINVAL
        (UInt16(0), UInt16(0), UInt64(1), UInt32(512), UInt32(22)),           // misaligned READ
        (UInt16(0), UInt16(0), UInt64(0), UInt32(100), UInt32(22)),           // misaligned length
        (UInt16(0), UInt16(0x10), UInt64(0), UInt32(512), UInt32(22)),        // FAST_ZERO on READ
        (UInt16(42), UInt16(0), UInt64(0), UInt32(0), UInt32(22)),            // unknown command
        (UInt16(6), UInt16(0x10), UInt64(0), UInt32(4096), UInt32(95)),       // FAST_ZERO the device can't: ENOTSUP
        (UInt16(0), UInt16(0), UInt64.max - 100, UInt32(512), UInt32(22)),    // offset overflow
        (UInt16(0), UInt16(0), UInt64(0), UInt32(33 << 20), UInt32(22)),      // READ over the max payload
    ])
    func badRequestsGetTheErrorTheSpecNames(command: UInt16, flags: UInt16, offset: UInt64, length: UInt32, errno: UInt32) throws {
        let c = try NBDTestClient()
        try c.handshake()
        let payload = command == 1 ? [UInt8](repeating: 1, count: Int(length)) : []
        try c.request(command, flags: flags, offset: offset, length: length, payload: payload)
        #expect(try c.replyError() == errno)
        #expect(c.isOpen)
        // The connection stays in sync: the next request works.
        try c.request(1, offset: 0, length: 512, payload: [UInt8](repeating: 5, count: 512))
        #expect(try c.replyError() == 0)
    }

    @Test func writesToAReadOnlyExportGetEPERM() throws {
        let c = try NBDTestClient(device: MemoryDevice(size: 1 << 20, readOnly: true))
        try c.handshake()
        try c.request(1, offset: 0, length: 512, payload: [UInt8](repeating: 1, count: 512))
        #expect(try c.replyError() == 1)
    }

    @Test func oversizedWritePayloadClosesOnlyThisConnection() throws {
        let c = try NBDTestClient()
        try c.handshake()
        try c.request(1, offset: 0, length: 64 << 20)
        #expect(!c.isOpen)
    }

    @Test func badRequestMagicCloses() throws {
        let c = try NBDTestClient()
        try c.handshake()
        try c.send([UInt8](repeating: 0x41, count: 28))
        #expect(!c.isOpen)
    }

    @Test func blockStatusNeedsTheMetaContext() throws {
        let c = try NBDTestClient()
        try c.handshake(structured: false)
        try c.request(7, offset: 0, length: 4096)
        #expect(try c.replyError() == 22)
    }

    @Test func blockStatusReportsOneExtentWithReqOne() throws {
        let c = try NBDTestClient()
        try c.handshake()
        try c.request(7, flags: 0x8, offset: 0, length: 8192)
        var b = try c.received()
        #expect(b.readInteger(as: UInt32.self) == 0x668e_33ef)
        _ = b.readInteger(as: UInt16.self)
        #expect(b.readInteger(as: UInt16.self) == 5)
        _ = b.readInteger(as: UInt64.self)
        #expect(b.readInteger(as: UInt32.self) == 12)
        #expect(b.readInteger(as: UInt32.self) == 1)   // context id
        #expect(b.readInteger(as: UInt32.self) == 8192)
    }

    @Test func flushReachesTheDeviceAndDisconnectCloses() throws {
        let c = try NBDTestClient()
        try c.handshake()
        try c.request(3, offset: 0, length: 0)
        #expect(try c.replyError() == 0)
        #expect(c.device.flushes.withLockedValue { $0 } == 1)
        try c.request(2, offset: 0, length: 0)
        #expect(!c.isOpen)
    }

    @Test func exportNameWithoutZeroesEndsTheHandshake() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(3)))
        try c.option(1, Array("vm1".utf8))
        var b = try c.received()
        #expect(b.readableBytes == 10)
        #expect(b.readInteger(as: UInt64.self) == 1 << 20)
        try c.request(0, offset: 0, length: 512)
        var r = try c.received()
        #expect(r.readInteger(as: UInt32.self) == 0x6744_6698)   // simple reply: no structured replies
    }

    @Test func exportNameForAnUnknownExportCloses() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(1)))
        try c.option(1, Array("nope".utf8))
        #expect(!c.isOpen)
    }

    @Test func abortIsAnsweredWithAckThenClosed() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(3)))
        try c.option(2)
        var b = try c.received()
        #expect(c.optionReplies(&b).map(\.type) == [1])
        #expect(!c.isOpen)
    }

    @Test func clientCountGoesBackToZeroAfterDisconnect() throws {
        let c = try NBDTestClient()
        try c.handshake()
        #expect(c.exports.clientCount("vm1") == 1)
        try c.request(2, offset: 0, length: 0)
        #expect(!c.isOpen)
        #expect(c.exports.clientCount("vm1") == 0)
    }

    @Test func alignmentIsOnlyEnforcedWhenTheClientAgreedToBlockSizes() throws {
        let c = try NBDTestClient()
        _ = try c.received()
        try c.send(be(UInt32(3)))
        try c.option(7, be(UInt32(3)) + Array("vm1".utf8) + be(UInt16(0)))   // GO, no info requests
        _ = try c.received()
        try c.request(1, offset: 1, length: 3, payload: [9, 9, 9])
        #expect(try c.replyError() == 0)
        #expect(c.device.byte(at: 3) == 9)
    }

    @Test(arguments: [true, false])
    func multiConnIsAdvertisedOnlyWhenTheDeviceAllowsIt(multiConn: Bool) throws {
        let c = try NBDTestClient(device: MemoryDevice(size: 1 << 20, multiConn: multiConn))
        _ = try c.received()
        try c.send(be(UInt32(3)))
        try c.option(1, Array("vm1".utf8))   // EXPORT_NAME: size, then transmission flags
        var b = try c.received()
        _ = b.readInteger(as: UInt64.self)
        let flags = b.readInteger(as: UInt16.self) ?? 0
        #expect((flags & 0x100 != 0) == multiConn, "CAN_MULTI_CONN in 0x\(String(flags, radix: 16))")
        #expect(flags & 0x4 != 0, "FLUSH is still offered")
    }

    @Test func devicesAllowMultipleConnectionsByDefault() {
        #expect(StallingDevice().canMultiConn)
    }

    @Test func removingAnExportAnswersRequestsInFlightAndDisconnects() throws {
        let device = StallingDevice()
        let c = try NBDTestClient(device: device)
        try c.handshake()
        try c.request(3, cookie: 41, offset: 0, length: 0)   // FLUSH, held by the device
        #expect(device.pending.withLockedValue { $0.count } == 1)

        #expect(c.exports.remove("vm1") == 1)
        #expect(c.exports.lookup("vm1") == nil)
        // Before the connection's loop has run the withdrawal, a new request is already refused
        // and does not reach the device.
        try c.request(1, cookie: 42, offset: 0, length: 512, payload: [UInt8](repeating: 7, count: 512))
        c.channel.embeddedEventLoop.run()
        var b = try c.received()
        let replies = c.simpleReplies(&b)
        #expect(replies.map(\.cookie) == [42, 41])
        #expect(replies.map(\.error) == [108, 108], "ESHUTDOWN")
        #expect(device.memory.byte(at: 0) == 0)
        #expect(!c.isOpen)
        #expect(c.exports.clientCount("vm1") == 0)

        // The device completing the flush later sends nothing more.
        device.completeAll()
        c.channel.embeddedEventLoop.run()
        #expect(try c.received().readableBytes == 0)
    }

    @Test func fencingFailsEveryLaterRequestAndDisconnectsEveryClient() throws {
        let device = StallingDevice()
        let table = NBDExportTable()
        table.add(NBDExport(name: "vm1", device: device))
        let a = try NBDTestClient(device: device, sharing: table)
        let b = try NBDTestClient(device: device, sharing: table)
        try a.handshake()
        try b.handshake(structured: false)
        #expect(table.clientCount("vm1") == 2)
        try a.request(3, cookie: 1, offset: 0, length: 0)   // FLUSH, held by the device

        let reason = "vm1 was promoted at west (epoch 8)"
        #expect(table.fence("vm1", reason: reason) == 2)
        // The device finishing the flush before the connection heard of the fence does not
        // make it a success, and b's next request is refused without reaching the device.
        device.completeAll()
        try b.request(1, cookie: 2, offset: 0, length: 512, payload: [UInt8](repeating: 9, count: 512))
        var rb = try b.received()
        #expect(b.simpleReplies(&rb).map(\.error) == [108])
        #expect(device.memory.byte(at: 0) == 0)
        #expect(a.isOpen && b.isOpen, "still open until each loop runs the withdrawal")

        // A reply to a request the device completed goes out on the loop's next turn (replies
        // completed together leave in one write), before the withdrawal closes the connection.
        a.channel.embeddedEventLoop.run()
        b.channel.embeddedEventLoop.run()
        var ra = try a.received()
        #expect(a.simpleReplies(&ra).map(\.error) == [108])
        #expect(!a.isOpen && !b.isOpen)
        #expect(table.clientCount("vm1") == 0)

        // A fenced export is offered to no one, and says why.
        #expect(table.fenceReason("vm1") == reason)
        #expect(table.lookup("vm1") == nil && table.all.isEmpty)
        let c = try NBDTestClient(device: device, sharing: table)
        _ = try c.received()
        try c.send(be(UInt32(3)))
        try c.option(7, be(UInt32(3)) + Array("vm1".utf8) + be(UInt16(0)))
        var rc = try c.received()
        let refusal = c.optionReplies(&rc)
        #expect(refusal.map(\.type) == [0x8000_0006])
        #expect(refusal.first.map { String(buffer: $0.data) }?.contains(reason) == true)
        #expect(table.clientCount("vm1") == 0)

        // Adding it again lifts the fence for new clients.
        table.add(NBDExport(name: "vm1", device: device))
        #expect(table.fenceReason("vm1") == nil)
        try c.handshake(greeted: true)
        try c.request(1, cookie: 3, offset: 0, length: 512, payload: [UInt8](repeating: 9, count: 512))
        #expect(try c.replyError() == 0)
    }

    @Test func tooManyRequestsInFlightPauseParsingUntilSomeComplete() throws {
        let device = StallingDevice()
        let c = try NBDTestClient(device: device)
        try c.handshake()
        var burst: [UInt8] = []
        for i in 0..<300 { burst += be(UInt32(0x2560_9513)) + be(UInt16(0)) + be(UInt16(3)) + be(UInt64(i)) + be(UInt64(0)) + be(UInt32(0)) }
        try c.send(burst)
        #expect(device.pending.withLockedValue { $0.count } == 256, "parsing must stop at the in-flight cap")
        device.completeAll()
        c.channel.embeddedEventLoop.run()
        #expect(device.pending.withLockedValue { $0.count } == 44, "the rest is parsed once requests complete")
        device.completeAll()
        c.channel.embeddedEventLoop.run()
        var replies = try c.received()
        var cookies: [UInt64] = []
        while replies.readableBytes >= 16 {
            _ = replies.readInteger(as: UInt32.self)
            #expect(replies.readInteger(as: UInt32.self) == 0)
            cookies.append(replies.readInteger(as: UInt64.self)!)
        }
        #expect(cookies == Array(0..<300))
    }
}

/// A device whose FLUSHes wait until the test completes them.
final class StallingDevice: StreamingWriteDevice {
    let size: UInt64 = 1 << 20
    let isReadOnly = false
    let pending = NIOLockedValueBox<[EventLoopPromise<Void>]>([])
    let memory = MemoryDevice(size: 1 << 20)

    func completeAll() {
        for p in pending.withLockedValue({ p in defer { p = [] }; return p }) { p.succeed() }
    }
    func flush(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        let p = eventLoop.makePromise(of: Void.self)
        pending.withLockedValue { $0.append(p) }
        return p.futureResult
    }
    func read(offset: UInt64, length: Int, on eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer> { memory.read(offset: offset, length: length, on: eventLoop) }
    func write(offset: UInt64, data: ByteBuffer, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> { memory.write(offset: offset, data: data, fua: fua, on: eventLoop) }
    func writePart(offset: UInt64, data: ByteBuffer, on eventLoop: any EventLoop) -> EventLoopFuture<Void> { memory.writePart(offset: offset, data: data, on: eventLoop) }
    func trim(offset: UInt64, length: UInt64, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> { eventLoop.makeSucceededVoidFuture() }
    func writeZeroes(offset: UInt64, length: UInt64, mayPunchHole: Bool, fastOnly: Bool, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> { eventLoop.makeSucceededVoidFuture() }
    func blockStatus(offset: UInt64, length: UInt64, on eventLoop: any EventLoop) -> EventLoopFuture<[BlockExtent]> { memory.blockStatus(offset: offset, length: length, on: eventLoop) }
}
