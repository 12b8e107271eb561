import FerryCore
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import FerryWire

@Suite("Frames")
struct FrameCodecTests {
    private func payload(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }

    private func encoded(_ frame: Frame) throws -> ByteBuffer { try FrameEncoder.encode(frame) }

    @Test("a frame survives encode and decode, also when it arrives a byte at a time")
    func roundTrip() throws {
        let frames = [
            Frame(type: .ping, flags: 0, payload: payload([1, 2, 3])),
            Frame(type: FrameType(rawValue: 0x10), flags: 0xBEEF, payload: payload([])),
            Frame(type: FrameType(rawValue: 0x11), flags: 1, payload: payload((0..<100_000).map { UInt8($0 & 0xff) })),
        ]
        var stream = ByteBuffer()
        for frame in frames { try FrameEncoder.encode(frame, into: &stream) }
        #expect(stream.readableBytes == frames.reduce(0) { $0 + 20 + $1.payload.readableBytes })

        let decoder = FrameDecoder(knownFlags: [.ping: 0, FrameType(rawValue: 0x10): 0xFFFF, FrameType(rawValue: 0x11): 1])
        var whole = stream
        var decoded: [Frame] = []
        while let frame = try decoder.nextFrame(from: &whole) { decoded.append(frame) }
        #expect(decoded == frames)
        #expect(whole.readableBytes == 0)

        var trickle = ByteBuffer()
        var trickled: [Frame] = []
        for byte in stream.readableBytesView {
            trickle.writeInteger(byte)
            while let frame = try decoder.nextFrame(from: &trickle) { trickled.append(frame) }
        }
        #expect(trickled == frames)
    }

    @Test("the header is magic, version, type, flags, length, big-endian, then XXH3 of header and payload")
    func layout() throws {
        let bytes = Array(try encoded(Frame(type: .goodbye, flags: 0x0102, payload: payload([0xAA]))).readableBytesView)
        #expect(Array(bytes[0..<12]) == [0x46, 0x52, 0x59, 0x31, 1, 0x05, 0x01, 0x02, 0, 0, 0, 1])
        #expect(bytes[12] == 0xAA)
        #expect(bytes.count == 21)
    }

    @Test("bad magic is rejected as soon as four bytes are there")
    func badMagic() throws {
        var buffer = try encoded(Frame(type: .ping, payload: payload([1])))
        buffer.setInteger(UInt8(ascii: "X"), at: 0)
        var first4 = buffer.getSlice(at: 0, length: 4)!
        #expect(throws: FrameError.badMagic(0x5852_5931)) { try FrameDecoder().nextFrame(from: &first4) }
        #expect(throws: FrameError.badMagic(0x5852_5931)) { try FrameDecoder().nextFrame(from: &buffer) }
    }

    @Test("an unknown frame format version is rejected")
    func badVersion() throws {
        var buffer = try encoded(Frame(type: .ping, payload: payload([1])))
        buffer.setInteger(UInt8(2), at: 4)
        #expect(throws: FrameError.unsupportedVersion(2)) { try FrameDecoder().nextFrame(from: &buffer) }
    }

    @Test("a flipped payload bit fails the checksum and yields no frame", arguments: [12, 15, 12 + 999])
    func flippedBit(offset: Int) throws {
        var buffer = try encoded(Frame(type: .ping, payload: payload([UInt8](repeating: 7, count: 1000))))
        let byte = buffer.getInteger(at: offset, as: UInt8.self)!
        buffer.setInteger(byte ^ 0x10, at: offset)
        #expect {
            try FrameDecoder().nextFrame(from: &buffer)
        } throws: { error in
            if case FrameError.checksumMismatch = error { return true }
            return false
        }
    }

    @Test("a flipped header bit (flags) also fails the checksum")
    func flippedHeaderBit() throws {
        var buffer = try encoded(Frame(type: .ping, payload: payload([1, 2])))
        buffer.setInteger(UInt16(0x0001), at: 6)
        #expect {
            try FrameDecoder().nextFrame(from: &buffer)
        } throws: { error in
            if case FrameError.checksumMismatch = error { return true }
            return false
        }
    }

    @Test("an oversize length is rejected from the header alone, before any payload arrives")
    func oversize() throws {
        var header = ByteBuffer()
        header.writeInteger(Frame.magic)
        header.writeInteger(Frame.formatVersion)
        header.writeInteger(FrameType.ping.rawValue)
        header.writeInteger(UInt16(0))
        header.writeInteger(UInt32(Frame.maxPayloadSize + 1))
        #expect(throws: FrameError.payloadTooLarge(length: UInt32(Frame.maxPayloadSize + 1))) {
            try FrameDecoder().nextFrame(from: &header)
        }
        let tooBig = Frame(type: FrameType(rawValue: 0x10), payload: ByteBuffer(repeating: 0, count: Frame.maxPayloadSize + 1))
        #expect(throws: FrameError.payloadTooLargeToSend(length: Frame.maxPayloadSize + 1)) { try encoded(tooBig) }
    }

    @Test("an unknown non-optional type is an error; an unknown optional type is skipped")
    func unknownTypes() throws {
        var unknown = try encoded(Frame(type: FrameType(rawValue: 0x42), payload: payload([1])))
        #expect(throws: FrameError.unknownType(FrameType(rawValue: 0x42))) { try FrameDecoder().nextFrame(from: &unknown) }

        var stream = try encoded(Frame(type: FrameType(rawValue: 0x90), payload: payload([9, 9])))
        stream.writeImmutableBuffer(try encoded(Frame(type: .ping, payload: payload([1]))))
        let next = try FrameDecoder().nextFrame(from: &stream)
        #expect(next?.type == .ping)
        #expect(stream.readableBytes == 0)
        #expect(FrameType(rawValue: 0x80).isOptional)
        #expect(!FrameType(rawValue: 0x7F).isOptional)
    }

    @Test("a flag bit the type does not define is an error: any on link control, outside the mask on data", arguments: [
        // (type, flags, accepted)
        (FrameType.ping, UInt16(0), true),
        (FrameType.ping, UInt16(1), false),
        (FrameType.goodbye, UInt16(0x8000), false),
        (FrameType(rawValue: 0x10), UInt16(0x5), true),
        (FrameType(rawValue: 0x10), UInt16(0x1), true),
        (FrameType(rawValue: 0x10), UInt16(0x2), false),
        (FrameType(rawValue: 0x10), UInt16(0x8005), false),
        (FrameType(rawValue: 0x11), UInt16(0x1), false),
    ])
    func unknownFlags(type: FrameType, flags: UInt16, accepted: Bool) throws {
        let decoder = FrameDecoder(knownFlags: [.ping: 0, .goodbye: 0, FrameType(rawValue: 0x10): 0x5, FrameType(rawValue: 0x11): 0])
        var wire = try encoded(Frame(type: type, flags: flags, payload: payload([1])))
        if accepted {
            #expect(try decoder.nextFrame(from: &wire)?.flags == flags)
        } else {
            #expect(throws: FrameError.unknownFlags(type, flags)) { try decoder.nextFrame(from: &wire) }
        }
    }

    @Test("the default decoder knows the link-control types with no flags; unknown optional frames are skipped whatever their flags")
    func defaultDecoderFlags() throws {
        #expect(FrameDecoder().knownFlags == Dictionary(uniqueKeysWithValues: FrameType.linkControl.map { ($0, UInt16(0)) }))
        var stream = try encoded(Frame(type: FrameType(rawValue: 0x90), flags: 0xFFFF, payload: payload([9])))
        stream.writeImmutableBuffer(try encoded(Frame(type: .pong, flags: 0x10, payload: payload([1]))))
        #expect(throws: FrameError.unknownFlags(.pong, 0x10)) { try FrameDecoder().nextFrame(from: &stream) }
        #expect(FrameError.unknownFlags(.pong, 0x10).description.contains("pong frame with flags 0x10"))
    }

    @Test("send refuses a flag the frame's type does not define, before looking for a link")
    func sendRefusesUnknownFlags() async throws {
        let west = try SiteIdentity.generate(siteName: "west"), east = try SiteIdentity.generate(siteName: "east")
        let links = PeerLinks(
            identity: west, listen: (host: "127.0.0.1", port: 0),
            peers: [PeerEndpoint(name: "east", host: "127.0.0.1", port: 1, siteID: east.siteID)],
            group: NIOSingletons.posixEventLoopGroup, logger: Logger(label: "test"),
            dataFrameTypes: [FrameType(rawValue: 0x10): 0x1])
        let data = FrameType(rawValue: 0x10)
        await #expect(throws: FrameError.unknownFlags(data, 0x3)) {
            try await links.send(Frame(type: data, flags: 0x3), to: "east")
        }
        await #expect(throws: FrameError.unknownFlags(.ping, 0x1)) {
            try await links.send(Frame(type: .ping, flags: 0x1), to: "east")
        }
        let error = await #expect(throws: PeerLinksError.self) {
            try await links.send(Frame(type: data, flags: 0x1), to: "east")
        }
        #expect(error?.description == PeerLinksError.notConnected("east").description, "known flags pass the check")
    }

    @Test("link messages round-trip through frames")
    func messages() throws {
        let id = SiteID(bytes: (0..<32).map { UInt8($0) })!
        let messages: [LinkMessage] = [
            .hello(.init(versions: 1...3, siteName: "west-é", siteID: id)),
            .helloAck(version: 2),
            .ping(nonce: 42, sentAt: 123_456_789),
            .pong(nonce: .max, sentAt: 0),
            .goodbye(reason: "stopping"),
        ]
        for message in messages {
            var wire = try encoded(message.frame())
            let frame = try #require(try FrameDecoder().nextFrame(from: &wire))
            #expect(try LinkMessage(frame: frame) == message)
        }
    }

    @Test("a link message with extra or missing payload bytes is rejected")
    func malformedMessages() throws {
        var long = LinkMessage.helloAck(version: 1).frame()
        long.payload.writeInteger(UInt8(0))
        #expect(throws: FrameError.self) { try LinkMessage(frame: long) }
        var short = LinkMessage.ping(nonce: 1, sentAt: 2).frame()
        short.payload.moveWriterIndex(to: 12)
        #expect(throws: FrameError.self) { try LinkMessage(frame: short) }
        var badRange = ByteBuffer()
        badRange.writeInteger(UInt16(3))
        badRange.writeInteger(UInt16(1))
        #expect(throws: FrameError.self) { try LinkMessage(frame: Frame(type: .hello, payload: badRange)) }
    }

    @Test("version negotiation picks the highest common version, or none")
    func negotiation() {
        #expect(LinkVersion.negotiate(1...3, 2...5) == 3)
        #expect(LinkVersion.negotiate(1...1, 1...1) == 1)
        #expect(LinkVersion.negotiate(1...2, 3...4) == nil)
    }

    @Test("of two links, both sites prefer the one dialed by the smaller site ID")
    func duplicateRule() {
        let small = SiteID(bytes: [UInt8](repeating: 1, count: 32))!
        let large = SiteID(bytes: [0x02] + [UInt8](repeating: 0, count: 31))!
        // The small site keeps its outbound link; the large site keeps its inbound link: the same TCP connection.
        #expect(LinkRegistry.preferredDirection(local: small, peer: large) == .outbound)
        #expect(LinkRegistry.preferredDirection(local: large, peer: small) == .inbound)
    }
}
