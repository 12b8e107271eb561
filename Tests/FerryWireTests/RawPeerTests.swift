import FerryCore
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Testing

@testable import FerryWire

/// A hand-driven peer: real TLS with a configured peer's identity, but the frames are written by
/// the test, so it can misbehave in ways a `PeerLinks` never would.
@Suite("Link protocol against a hand-driven peer", .serialized, .timeLimit(.minutes(2)))
struct RawPeerTests {
    struct Setup {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let log = LogCapture()
        let west: SiteIdentity
        let east: SiteIdentity
        let links: PeerLinks
        let delivered = Collected<PeerFrame>()

        init() async throws {
            west = try SiteIdentity.generate(siteName: "west")
            east = try SiteIdentity.generate(siteName: "east")
            // East is configured but nothing listens on its port: only the raw client speaks for it.
            let unusedPort = try await reservePort(group: group)
            links = PeerLinks(
                identity: west, listen: (host: "127.0.0.1", port: 0),
                peers: [PeerEndpoint(name: "east", host: "127.0.0.1", port: unusedPort, siteID: east.siteID)],
                group: group, logger: log.logger("west"),
                heartbeatInterval: .milliseconds(200), deadAfter: .seconds(2),
                dataFrameTypes: [FrameType(rawValue: 0x10): 0x1])
            let delivered = self.delivered
            links.onFrame = { frame in delivered.append(frame) }
            try await links.start()
        }

        /// Connects to west as east. Frames come in decoded; bytes go out raw.
        func connect() async throws -> NIOAsyncChannel<Frame, ByteBuffer> {
            let material = try east.tlsMaterial()
            var configuration = TLSConfiguration.makeClientConfiguration()
            configuration.certificateChain = [.certificate(material.certificate)]
            configuration.privateKey = .privateKey(material.key)
            configuration.minimumTLSVersion = .tlsv13
            configuration.certificateVerification = .noHostnameVerification
            configuration.trustRoots = .certificates([])
            let context = try NIOSSLContext(configuration: configuration)
            return try await ClientBootstrap(group: group).connect(host: "127.0.0.1", port: links.boundPort!) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let tls = try NIOSSLClientHandler(
                        context: context, serverHostname: nil,
                        customVerificationCallback: { _, promise in promise.succeed(.certificateVerified) })
                    try channel.pipeline.syncOperations.addHandler(tls)
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(FrameDecoder(knownTypes: FrameType.linkControl)))
                    return try NIOAsyncChannel<Frame, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
        }

        func hello(_ versions: ClosedRange<UInt16>) throws -> ByteBuffer {
            try FrameEncoder.encode(LinkMessage.hello(.init(versions: versions, siteName: "east", siteID: east.siteID)).frame())
        }

        var eastStatus: PeerLinkStatus? { links.status().first }

        func shutdown() async {
            await links.stop()
            try? await group.shutdownGracefully()
        }
    }

    /// Reads link messages until the server closes the connection.
    private static func readUntilClosed(_ inbound: NIOAsyncChannelInboundStream<Frame>) async -> [LinkMessage] {
        var messages: [LinkMessage] = []
        do {
            for try await frame in inbound {
                if let message = try? LinkMessage(frame: frame) { messages.append(message) }
            }
        } catch {
            // The server closing mid-TLS shows up as an error here; the messages so far are what count.
        }
        return messages
    }

    @Test("no common protocol version: goodbye naming both ranges, then close; never connected")
    func noCommonVersion() async throws {
        let setup = try await Setup()
        let client = try await setup.connect()
        let messages = try await client.executeThenClose { inbound, outbound in
            try await outbound.write(try setup.hello(7...9))
            return await Self.readUntilClosed(inbound)
        }
        guard case .hello(let hello)? = messages.first else {
            Issue.record("expected west's hello first, got \(messages)")
            await setup.shutdown()
            return
        }
        #expect(hello.siteID == setup.west.siteID)
        #expect(hello.versions == LinkVersion.supported)
        let goodbye = messages.compactMap { if case .goodbye(let reason) = $0 { reason } else { nil } }.first
        #expect(goodbye?.contains("no common link protocol version") == true)
        #expect(goodbye?.contains("7...9") == true)
        #expect(!messages.contains { if case .helloAck = $0 { true } else { false } })
        #expect(setup.eastStatus?.state != .connected)
        #expect(setup.log.contains("west warning", "closing link to east", "no common link protocol version"))
        await setup.shutdown()
    }

    enum Corruption: String, CaseIterable, Sendable {
        case flippedPayloadBit, unknownMandatoryType, badMagic, oversizeLength, unknownDataFlag, flaggedPing
    }

    @Test("a bad frame on an established link closes it, and nothing in it is delivered", arguments: Corruption.allCases)
    func badFrameClosesLink(corruption: Corruption) async throws {
        let setup = try await Setup()
        let client = try await setup.connect()
        try await client.executeThenClose { inbound, outbound in
            try await outbound.write(try setup.hello(1...1))
            var frames = inbound.makeAsyncIterator()
            let first = try await frames.next().map(LinkMessage.init(frame:))
            let second = try await frames.next().map(LinkMessage.init(frame:))
            #expect(first.map { if case .hello = $0 { true } else { false } } == true)
            #expect(second == .helloAck(version: 1))
            #expect(await eventually(.seconds(10)) { setup.eastStatus?.state == .connected })

            // A good data frame (with the one flag its type defines) and an unknown optional one
            // (skipped, whatever its flags), then the bad one.
            let data = FrameType(rawValue: 0x10)
            try await outbound.write(FrameEncoder.encode(Frame(type: data, flags: 0x1, payload: ByteBuffer(string: "good"))))
            try await outbound.write(FrameEncoder.encode(Frame(type: FrameType(rawValue: 0x99), flags: 0xFF, payload: ByteBuffer(string: "?"))))
            var bad = try FrameEncoder.encode(Frame(type: data, payload: ByteBuffer(string: "evil")))
            let expected: String
            switch corruption {
            case .flippedPayloadBit:
                bad.setInteger(bad.getInteger(at: 13, as: UInt8.self)! ^ 0x01, at: 13)
                expected = "checksum mismatch"
            case .unknownMandatoryType:
                bad = try FrameEncoder.encode(Frame(type: FrameType(rawValue: 0x42), payload: ByteBuffer(string: "evil")))
                expected = "unknown frame type 0x42"
            case .badMagic:
                bad.setInteger(UInt32(0xDEAD_BEEF), at: 0)
                expected = "bad frame magic"
            case .oversizeLength:
                bad.setInteger(UInt32(Frame.maxPayloadSize + 1), at: 8)
                expected = "exceeds the"
            case .unknownDataFlag:
                bad = try FrameEncoder.encode(Frame(type: data, flags: 0x3, payload: ByteBuffer(string: "evil")))
                expected = "replication frame with flags 0x3, which sets bits this site does not know"
            case .flaggedPing:
                bad = try FrameEncoder.encode(Frame(type: .ping, flags: 0x1, payload: LinkMessage.ping(nonce: 1, sentAt: 1).frame().payload))
                expected = "ping frame with flags 0x1"
            }
            try await outbound.write(bad)
            // The server says why and closes; drain whatever pings came first.
            var goodbye: String?
            while let frame = try? await frames.next() {
                if case .goodbye(let reason) = try? LinkMessage(frame: frame) { goodbye = reason }
            }
            #expect(goodbye?.contains(expected) == true, "goodbye: \(goodbye ?? "none")")
            #expect(await eventually(.seconds(10)) { setup.eastStatus?.state != .connected })
            // (lastError may already show west's next dial to east's empty port; the log keeps the reason.)
            #expect(setup.log.contains("west info", "peer link east: connected -> disconnected", expected))
        }
        let delivered = setup.delivered.all
        #expect(delivered.count == 1)
        #expect(delivered.first?.peer == "east")
        #expect(delivered.first?.frame.payload == ByteBuffer(string: "good"))
        #expect(delivered.first?.frame.flags == 0x1)
        await setup.shutdown()
    }

    @Test("RTT comes only from a pong that answers an outstanding ping, timed by the pinger's own clock")
    func pongsAreMatchedToPings() async throws {
        let setup = try await Setup()
        let client = try await setup.connect()
        try await client.executeThenClose { inbound, outbound in
            try await outbound.write(try setup.hello(1...1))
            var frames = inbound.makeAsyncIterator()
            var ping: (nonce: UInt64, sentAt: UInt64)?
            while ping == nil, let frame = try await frames.next() {   // hello, helloAck, then a ping
                if case .ping(let nonce, let sentAt) = try LinkMessage(frame: frame) { ping = (nonce, sentAt) }
            }
            let (nonce, sentAt) = try #require(ping)
            func pong(_ nonce: UInt64, _ sentAt: UInt64) async throws {
                try await outbound.write(FrameEncoder.encode(LinkMessage.pong(nonce: nonce, sentAt: sentAt).frame()))
            }

            // A pong for a ping never sent, with a plausible sentAt: ignored, no RTT.
            try await pong(nonce + 1000, sentAt)
            #expect(await eventually(.seconds(5)) { setup.log.contains("west debug", "ignored a pong from east with nonce \(nonce + 1000):") })
            #expect(setup.eastStatus?.rttMilliseconds == nil)

            // The real answer with a forged sentAt of 0: the RTT is from west's own send time,
            // not the time since west's clock started.
            try await pong(nonce, 0)
            #expect(await eventually(.seconds(5)) { setup.eastStatus?.rttMilliseconds != nil })
            let rtt = try #require(setup.eastStatus?.rttMilliseconds)
            #expect(rtt >= 0 && rtt < 2_000, "rtt \(rtt) ms")

            // The same answer again: answered already, ignored.
            try await pong(nonce, sentAt)
            #expect(await eventually(.seconds(5)) { setup.log.contains("west debug", "ignored a pong from east with nonce \(nonce):") })
            #expect(setup.eastStatus?.state == .connected, "an ignored pong does not close the link")
        }
        await setup.shutdown()
    }

    @Test("a peer that goes silent is closed as dead after deadAfter")
    func silentPeerIsDead() async throws {
        let setup = try await Setup()
        let client = try await setup.connect()
        let clock = ContinuousClock()
        let start = clock.now
        let messages = try await client.executeThenClose { inbound, outbound in
            try await outbound.write(try setup.hello(1...1))
            // Never answer a ping, never send anything else.
            return await Self.readUntilClosed(inbound)
        }
        let elapsed = clock.now - start
        #expect(messages.contains { if case .ping = $0 { true } else { false } })
        #expect(elapsed >= .seconds(1.5))
        #expect(await eventually(.seconds(10)) { setup.eastStatus?.state != .connected })
        #expect(setup.log.contains("west info", "peer link east: connected -> disconnected", "no frame from east"))
        await setup.shutdown()
    }
}
