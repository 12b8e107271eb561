import FerryCore
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import FerryWire

/// Real links: TLS 1.3 over TCP on 127.0.0.1, two `PeerLinks` in this process.
@Suite("Peer links", .serialized, .timeLimit(.minutes(2)))
struct PeerLinksTests {
    /// Two sites that pin each other correctly; B's port is reserved first so A can dial it.
    struct Pair {
        let group: MultiThreadedEventLoopGroup
        let log = LogCapture()
        let west: SiteIdentity
        let east: SiteIdentity
        let eastPort: Int

        init() async throws {
            group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
            west = try SiteIdentity.generate(siteName: "west")
            east = try SiteIdentity.generate(siteName: "east")
            eastPort = try await reservePort(group: group)
        }

        func makeWest(eastPinnedTo eastID: SiteID? = nil) -> PeerLinks {
            PeerLinks(
                identity: west, listen: (host: "127.0.0.1", port: 0),
                peers: [PeerEndpoint(name: "east", host: "127.0.0.1", port: eastPort, siteID: eastID ?? east.siteID)],
                group: group, logger: log.logger("west"),
                heartbeatInterval: .milliseconds(200), deadAfter: .seconds(2),
                dataFrameTypes: [FrameType(rawValue: 0x10): 0x7])
        }

        func makeEast(westPort: Int) -> PeerLinks {
            PeerLinks(
                identity: east, listen: (host: "127.0.0.1", port: eastPort),
                peers: [PeerEndpoint(name: "west", host: "127.0.0.1", port: westPort, siteID: west.siteID)],
                group: group, logger: log.logger("east"),
                heartbeatInterval: .milliseconds(200), deadAfter: .seconds(2),
                dataFrameTypes: [FrameType(rawValue: 0x10): 0x7])
        }

        func shutdown() async {
            try? await group.shutdownGracefully()
        }
    }

    private static func isUp(_ links: PeerLinks) -> Bool {
        links.status().allSatisfy { $0.state == .connected && $0.rttMilliseconds != nil }
    }

    @Test("two sites connect, measure RTT, and carry a data frame")
    func connect() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()
        try await west.start()
        let westPort = try #require(west.boundPort)
        #expect(westPort > 0)
        let east = pair.makeEast(westPort: westPort)
        let received = Mutex<[PeerFrame]>([])
        east.onFrame = { frame in received.withLock { $0.append(frame) } }
        try await east.start()

        // Up, and both ends on the same connection: one dialed it, the other accepted it.
        let up = await eventually(.seconds(10)) {
            Self.isUp(west) && Self.isUp(east)
                && west.status().first?.direction != nil
                && west.status().first?.direction != east.status().first?.direction
        }
        let westStatus = west.status(), eastStatus = east.status()
        #expect(up, "west: \(westStatus), east: \(eastStatus)")
        #expect(westStatus.map(\.name) == ["east"])
        #expect(westStatus.first?.siteID == pair.east.siteID.description)
        #expect(westStatus.first?.address == "127.0.0.1:\(pair.eastPort)")
        #expect(pair.log.contains("west info", "peer link east", "-> connected"))
        #expect(pair.log.contains("east info", "peer link west", "-> connected"))

        // Heartbeats keep an idle link up well past deadAfter (2 s), without a flap.
        let clock = ContinuousClock()
        let watchEnd = clock.now + .seconds(3)
        var stayedUp = true
        while clock.now < watchEnd {
            if west.status().first?.state != .connected || east.status().first?.state != .connected { stayedUp = false }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(stayedUp)
        #expect(west.status().first?.since == westStatus.first?.since)

        let payload = ByteBuffer(string: "replicate me")
        try await west.send(Frame(type: FrameType(rawValue: 0x10), flags: 7, payload: payload), to: "east")
        let delivered = await eventually(.seconds(10)) { !received.withLock { $0.isEmpty } }
        #expect(delivered)
        let frame = received.withLock { $0.first }
        #expect(frame?.peer == "west")
        #expect(frame?.frame.flags == 7)
        #expect(frame?.frame.payload == payload)

        let json = try JSONEncoder().encode(westStatus)
        #expect(try JSONDecoder().decode([PeerLinkStatus].self, from: json) == westStatus)

        await east.stop()
        await west.stop()
        #expect(west.boundPort == nil)
        await pair.shutdown()
    }

    @Test("a peer pinned to the wrong site ID is refused both ways and never connects")
    func wrongPin() async throws {
        let pair = try await Pair()
        let wrong = SiteID(bytes: [UInt8](repeating: 0xAB, count: 32))!
        let west = pair.makeWest(eastPinnedTo: wrong)
        try await west.start()
        let east = pair.makeEast(westPort: try #require(west.boundPort))
        try await east.start()

        // Several dial rounds in both directions; no side may ever report a link.
        let clock = ContinuousClock()
        let end = clock.now + .seconds(4)
        var everConnected = false
        while clock.now < end {
            let all = west.status() + east.status()
            if all.contains(where: { $0.state == .connected }) { everConnected = true }
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(!everConnected)

        // West dialing east: east's certificate is not the pinned one.
        #expect(pair.log.contains(
            "west warning", "refused peer link: 127.0.0.1:\(pair.eastPort) presented site ID \(pair.east.siteID)",
            "but peer \"east\" is pinned to \(wrong)", "update peers.east.site-id"))
        // East dialing west: west knows no peer with east's ID.
        #expect(pair.log.contains(
            "west warning", "presented site ID \(pair.east.siteID), which no configured peer has", "east abab-abab"))
        // Each refusal is logged once at warning level, however often the dial is retried.
        #expect(pair.log.all.filter { $0.hasPrefix("west warning") && $0.contains("refused peer link") }.count == 2)

        let westView = try #require(west.status().first)
        #expect(westView.lastError?.contains("pinned to \(wrong)") == true)
        let eastView = try #require(east.status().first)
        #expect(eastView.state != .connected)
        #expect(eastView.lastError != nil)

        await east.stop()
        await west.stop()
        await pair.shutdown()
    }

    @Test("a restarted peer on the same port and identity is reconnected")
    func reconnect() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()
        try await west.start()
        let westPort = try #require(west.boundPort)
        let east = pair.makeEast(westPort: westPort)
        try await east.start()
        #expect(await eventually(.seconds(10)) { Self.isUp(west) && Self.isUp(east) })

        await east.stop()
        let down = await eventually(.seconds(10)) { west.status().first?.state != .connected }
        #expect(down)
        #expect(west.status().first?.lastError != nil)

        let eastAgain = pair.makeEast(westPort: westPort)
        try await eastAgain.start()
        let upAgain = await eventually(.seconds(10)) { Self.isUp(west) && Self.isUp(eastAgain) }
        #expect(upAgain, "west: \(west.status()), east: \(eastAgain.status())")

        await eastAgain.stop()
        await west.stop()
        await pair.shutdown()
    }

    @Test("start twice is refused; a busy port gives an actionable error")
    func startErrors() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()
        try await west.start()
        await #expect(throws: PeerLinksError.self) { try await west.start() }

        let clash = PeerLinks(
            identity: pair.east, listen: (host: "127.0.0.1", port: try #require(west.boundPort)), peers: [],
            group: pair.group, logger: pair.log.logger("clash"))
        let error = await #expect(throws: PeerLinksError.self) { try await clash.start() }
        #expect(error?.description.contains("cannot listen for peers on 127.0.0.1:") == true)
        await clash.stop()
        await west.stop()
        await pair.shutdown()
    }

    @Test("a peer that stays down keeps the time it went down, across retries")
    func sinceSurvivesRetries() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()   // nobody listens on east's port
        try await west.start()
        #expect(await eventually(.seconds(5)) { west.status().first?.lastError != nil })
        let first = try #require(west.status().first)
        // Several dials fail meanwhile (backoff starts at 100-200 ms).
        try await Task.sleep(for: .seconds(2))
        let later = try #require(west.status().first)
        #expect(later.state != .connected)
        #expect(later.since == first.since, "since moved from \(first.since) to \(later.since) while east stayed down")
        await west.stop()
        await pair.shutdown()
    }
}
