import FerryCore
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import FerryWire

/// The data plane of `PeerLinks` over real TLS links: link IDs and their up/down events, writes
/// tied to a link, order across threads, and replication frames end to end.
@Suite("Peer links: data plane", .serialized, .timeLimit(.minutes(2)))
struct DataPlaneTests {
    typealias Pair = PeerLinksTests.Pair

    enum Event: Equatable, CustomStringConvertible {
        case up(String, LinkID)
        case down(String, LinkID, String)

        var link: LinkID {
            switch self {
            case .up(_, let id), .down(_, let id, _): return id
            }
        }

        var description: String {
            switch self {
            case .up(let peer, let id): return "up(\(peer), \(id))"
            case .down(let peer, let id, let reason): return "down(\(peer), \(id): \(reason))"
            }
        }
    }

    /// Records `links`' events; also checks that each is called on its link's event loop.
    static func record(_ links: PeerLinks) -> (Collected<Event>, Collected<String>) {
        let events = Collected<Event>(), problems = Collected<String>()
        links.onLinkUp = { [weak links] peer, link in
            events.append(.up(peer, link))
            // A link replaced before its up event ran (both sites dialed at once) is no longer
            // current, so its loop cannot be looked up: it must still run on an event loop.
            if let loop = links?.eventLoop(of: link) {
                if !loop.inEventLoop { problems.append("up(\(link)) not on its link's loop") }
            } else if MultiThreadedEventLoopGroup.currentEventLoop == nil {
                problems.append("up(\(link)) not on an event loop")
            }
        }
        links.onLinkDown = { peer, link, reason in
            events.append(.down(peer, link, reason))
            if MultiThreadedEventLoopGroup.currentEventLoop == nil { problems.append("down(\(link)) not on an event loop") }
        }
        return (events, problems)
    }

    /// Each ID is up once, then down at most once; a peer has at most one link up at a time.
    static func checkLifecycle(_ events: [Event]) -> [String] {
        var problems: [String] = []
        var state: [LinkID: String] = [:]
        var upNow: [String: LinkID] = [:]
        for event in events {
            switch event {
            case .up(let peer, let id):
                if state[id] != nil { problems.append("\(id) reported up again after \(state[id]!)") }
                if let other = upNow[peer] { problems.append("\(id) up while \(other) is still up") }
                state[id] = "up"
                upNow[peer] = id
            case .down(let peer, let id, _):
                if state[id] != "up" { problems.append("\(id) down without being up") }
                state[id] = "down"
                if upNow[peer] == id { upNow[peer] = nil }
            }
        }
        return problems
    }

    static func upLink(_ events: Collected<Event>) -> LinkID? {
        var up: LinkID?
        for event in events.all {
            switch event {
            case .up(_, let id): up = id
            case .down(_, let id, _): if up == id { up = nil }
            }
        }
        return up
    }

    @Test("link IDs: up after hello, down when lost, a new ID after a reconnect, an old one never again")
    func upDownAcrossReconnect() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()
        let (events, problems) = Self.record(west)
        let received = Collected<PeerFrame>()
        try await west.start()
        let westPort = try #require(west.boundPort)
        let east = pair.makeEast(westPort: westPort)
        east.onFrame = { received.append($0) }
        let (eastEvents, _) = Self.record(east)
        try await east.start()

        #expect(await eventually(.seconds(10)) { Self.upLink(events) != nil && Self.upLink(eastEvents) != nil })
        // Let a dial race settle: both sites end on one connection.
        #expect(await eventually(.seconds(10)) {
            west.status().first?.direction != nil && west.status().first?.direction != east.status().first?.direction
                && Self.upLink(events) == west.currentLink(of: "east")
        })
        let first = try #require(Self.upLink(events))
        #expect(west.currentLink(of: "east") == first)
        #expect(west.eventLoop(of: first) != nil)
        #expect(west.isWritable(link: first))

        await east.stop()
        #expect(await eventually(.seconds(10)) { Self.upLink(events) == nil })
        let down = events.all.last { if case .down(_, first, _) = $0 { true } else { false } }
        #expect(down != nil)
        #expect(west.currentLink(of: "east") == nil)
        #expect(west.eventLoop(of: first) == nil)
        #expect(!west.isWritable(link: first))

        // A write on the lost link is refused and sends nothing.
        #expect(!west.write([Frame(type: FrameType(rawValue: 0x10), payload: ByteBuffer(string: "lost"))], to: "east", link: first))

        let eastAgain = pair.makeEast(westPort: westPort)
        eastAgain.onFrame = { received.append($0) }
        try await eastAgain.start()
        #expect(await eventually(.seconds(10)) { Self.upLink(events) != nil && west.currentLink(of: "east") == Self.upLink(events) })
        let second = try #require(Self.upLink(events))
        #expect(second != first)
        #expect(second.rawValue > first.rawValue)

        // The stale ID stays refused while the new link carries frames.
        #expect(!west.write([Frame(type: FrameType(rawValue: 0x10), payload: ByteBuffer(string: "stale"))], to: "east", link: first))
        #expect(west.write([Frame(type: FrameType(rawValue: 0x10), payload: ByteBuffer(string: "fresh"))], to: "east", link: second))
        #expect(!west.write([Frame(type: FrameType(rawValue: 0x10))], to: "west", link: second), "the link is east's, not west's")
        #expect(await eventually(.seconds(10)) { !received.all.isEmpty })
        try await Task.sleep(for: .milliseconds(300))
        #expect(received.all.map { String(buffer: $0.frame.payload) } == ["fresh"])
        #expect(received.all.first?.peer == "west")
        #expect(received.all.first?.link == eastAgain.currentLink(of: "west"))

        await eastAgain.stop()
        await west.stop()
        #expect(Self.upLink(events) == nil)
        #expect(Self.checkLifecycle(events.all) == [], "\(events.all)")
        #expect(Self.checkLifecycle(eastEvents.all) == [], "\(eastEvents.all)")
        #expect(problems.all == [])
        #expect(pair.log.contains("west info", "peer link east:", "-> connected", "link#"))
        await pair.shutdown()
    }

    @Test("frames written to one link from two threads arrive in the order of the calls")
    func orderAcrossThreads() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()
        let (events, _) = Self.record(west)
        try await west.start()
        let east = pair.makeEast(westPort: try #require(west.boundPort))
        let received = Collected<UInt64>()
        let links = Collected<LinkID>()
        east.onFrame = { frame in
            let payload = frame.frame.payload
            if let value = payload.getInteger(at: payload.readerIndex, as: UInt64.self) { received.append(value) }
            links.append(frame.link)
        }
        try await east.start()
        #expect(await eventually(.seconds(10)) {
            west.status().first?.direction != nil && west.status().first?.direction != east.status().first?.direction
                && Self.upLink(events) != nil && Self.upLink(events) == west.currentLink(of: "east")
        })
        let link = try #require(Self.upLink(events))
        let loop = try #require(west.eventLoop(of: link))

        // Calls are numbered under a lock, so the order of calls is defined; each call writes
        // three frames. One writer runs on the link's own event loop, the other on a thread.
        let callsPerWriter = 400
        let order = Mutex<UInt64>(0)
        let refused = Collected<UInt64>()
        @Sendable func call() {
            order.withLock { next in
                let base = next * 3
                next += 1
                let frames = (0..<UInt64(3)).map { i in
                    var payload = ByteBuffer()
                    payload.writeInteger(base + i)
                    // Some frames carry enough to take the encoder's no-copy path.
                    let tail = (base + i) % 7 == 0 ? ByteBuffer(repeating: 0xEE, count: 2000) : nil
                    return Frame(type: FrameType(rawValue: 0x10), payload: payload, payloadTail: tail)
                }
                if !west.write(frames, to: "east", link: link) { refused.append(base) }
            }
        }
        let onLoop = loop.submit {
            for _ in 0..<callsPerWriter { call() }
        }
        let onThread = Task.detached {
            for _ in 0..<callsPerWriter { call(); if Bool.random() { await Task.yield() } }
        }
        try await onLoop.get()
        await onThread.value
        #expect(refused.all == [])
        let total = callsPerWriter * 2 * 3
        #expect(await eventually(.seconds(20)) { received.all.count >= total })
        let values = received.all
        #expect(values.count == total)
        let firstOutOfOrder = values.indices.first { values[$0] != UInt64($0) }
        #expect(firstOutOfOrder == nil, "frame \(firstOutOfOrder ?? 0) carries \(firstOutOfOrder.map { values[$0] } ?? 0)")
        #expect(Set(links.all).count == 1)

        await east.stop()
        await west.stop()
        await pair.shutdown()
    }

    @Test("replication frames cross a real link compressed and not, and decode to what was sent")
    func replicationEndToEnd() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()
        let (events, _) = Self.record(west)
        try await west.start()
        let east = PeerLinks(
            identity: pair.east, listen: (host: "127.0.0.1", port: pair.eastPort),
            peers: [PeerEndpoint(name: "west", host: "127.0.0.1", port: try #require(west.boundPort), siteID: pair.west.siteID)],
            group: pair.group, logger: pair.log.logger("east"),
            heartbeatInterval: .milliseconds(200), deadAfter: .seconds(2))  // the default data-plane types
        let decoded = Collected<VolumeFrame>()
        let failures = Collected<String>()
        east.onFrame = { frame in
            do { decoded.append(try VolumeFrame(frame: frame.frame)) } catch { failures.append("\(error)") }
        }
        try await east.start()
        #expect(await eventually(.seconds(10)) {
            west.status().first?.direction != nil && west.status().first?.direction != east.status().first?.direction
                && Self.upLink(events) != nil && Self.upLink(events) == west.currentLink(of: "east")
        })
        let link = try #require(Self.upLink(events))

        let sent = ReplicationFrameTests.messages
        var compressing = ReplicationFrameEncoder(compress: true)
        var plain = ReplicationFrameEncoder(compress: false)
        let frames = sent.map { compressing.frame(for: $0) } + sent.map { plain.frame(for: $0) }
        #expect(frames.contains { $0.flags == VolumeFrame.compressedFlag })
        #expect(west.write(frames, to: "east", link: link))
        #expect(await eventually(.seconds(20)) { decoded.all.count + failures.all.count >= frames.count })
        #expect(failures.all == [])
        #expect(decoded.all == sent + sent)

        await east.stop()
        await west.stop()
        await pair.shutdown()
    }

    @Test("close(peer:link:) closes the current link with goodbye; a stale ID closes nothing")
    func closeLink() async throws {
        let pair = try await Pair()
        let west = pair.makeWest()
        let (events, _) = Self.record(west)
        try await west.start()
        let east = pair.makeEast(westPort: try #require(west.boundPort))
        try await east.start()
        #expect(await eventually(.seconds(10)) {
            west.status().first?.direction != nil && west.status().first?.direction != east.status().first?.direction
                && Self.upLink(events) != nil && Self.upLink(events) == west.currentLink(of: "east")
        })
        let link = try #require(Self.upLink(events))
        #expect(!west.close(peer: "east", link: LinkID(link.rawValue + 1000), reason: "no such link"))
        #expect(west.close(peer: "east", link: link, reason: "bad replication frame"))
        #expect(await eventually(.seconds(10)) {
            events.all.contains { if case .down(_, link, _) = $0 { true } else { false } }
        })
        #expect(pair.log.contains("east debug", "closed a link", "bad replication frame"))
        // The peers reconnect, on a new ID.
        #expect(await eventually(.seconds(10)) { Self.upLink(events).map { $0 != link } == true })
        await east.stop()
        await west.stop()
        await pair.shutdown()
    }
}
