import Testing

@testable import FerryCore

/// A clock the test moves by hand.
private struct FakeClock {
    var nanos: Int64 = 1_000_000_000
    var now: Instant { Instant(monotonicNanos: nanos, wallSeconds: 1_700_000_000 + nanos / 1_000_000_000) }
    mutating func advance(_ amount: Duration) { nanos += amount.nanoseconds }
}

private let smallID = SiteID(bytes: [UInt8](repeating: 0x11, count: 32))!
private let largeID = SiteID(bytes: [UInt8](repeating: 0xEE, count: 32))!
private let strangerID = SiteID(bytes: [UInt8](repeating: 0x77, count: 32))!

// MARK: - One connection

@Suite("Peer connection machine")
struct PeerConnectionMachineTests {
    /// A connection at site "east" (the small ID) to peer "west" (the large ID).
    static func machine(
        _ direction: LinkDirection, versions: ClosedRange<UInt16> = 1...2, identified: Bool = true
    ) -> PeerConnectionMachine {
        let config = PeerConnectionMachine.Config(
            localName: "east", localID: smallID, versions: versions, direction: direction,
            heartbeat: .seconds(1), deadAfter: .seconds(5), remoteAddress: "10.0.0.2:7800")
        return PeerConnectionMachine(config: config, peer: identified ? .init(name: "west", siteID: largeID) : nil)
    }

    /// A machine whose hello exchange is done at version 2.
    fileprivate static func live(_ direction: LinkDirection, clock: FakeClock) -> PeerConnectionMachine {
        var m = machine(direction)
        _ = m.start(now: clock.now)
        _ = m.received(.hello(versions: 1...3, siteID: largeID), now: clock.now)
        if direction == .outbound { _ = m.received(.helloAck(version: 2), now: clock.now) }
        return m
    }

    @Test("acceptor: hello out on start, helloAck with the highest common version, then live")
    func acceptorHappyPath() {
        let clock = FakeClock()
        var m = Self.machine(.inbound)
        #expect(m.start(now: clock.now) == [.send(.hello(versions: 1...2, siteID: smallID))])
        #expect(m.start(now: clock.now).isEmpty, "started once")
        #expect(!m.isLive)
        #expect(m.received(.hello(versions: 2...5, siteID: largeID), now: clock.now)
                == [.send(.helloAck(version: 2)), .becameLive(version: 2)])
        #expect(m.isLive && m.version == 2 && m.wasLive)
    }

    @Test("dialer: computes the version on the acceptor's hello, live on the matching helloAck")
    func dialerHappyPath() {
        let clock = FakeClock()
        var m = Self.machine(.outbound)
        _ = m.start(now: clock.now)
        #expect(m.received(.hello(versions: 1...1, siteID: largeID), now: clock.now).isEmpty)
        #expect(!m.isLive)
        #expect(m.received(.helloAck(version: 1), now: clock.now) == [.becameLive(version: 1)])
        #expect(m.isLive && m.version == 1)
    }

    @Test("an acceptor learns its peer from the certificate before the hello")
    func acceptorIdentifies() {
        let clock = FakeClock()
        var m = Self.machine(.inbound, identified: false)
        _ = m.start(now: clock.now)
        #expect(m.peerName == "10.0.0.2:7800")
        m.identified(.init(name: "west", siteID: largeID))
        #expect(m.peerName == "west")
        #expect(m.received(.hello(versions: 1...1, siteID: largeID), now: clock.now).last == .becameLive(version: 1))
    }

    /// Each refusal of protocol.md §4.2 and §4.3: a protocol error, goodbye with the reason, closed.
    struct Refusal: CustomTestStringConvertible, Sendable {
        var name: String
        var direction: LinkDirection
        /// Messages before the offending one (after start).
        var before: [LinkControlMessage]
        var offending: LinkControlMessage
        var reason: String
        var testDescription: String { name }
    }

    static let refusals: [Refusal] = [
        Refusal(name: "hello with another site ID", direction: .inbound, before: [],
                offending: .hello(versions: 1...1, siteID: strangerID),
                reason: "hello names site ID \(strangerID), but the certificate is \(largeID)"),
        Refusal(name: "no common version (acceptor)", direction: .inbound, before: [],
                offending: .hello(versions: 3...4, siteID: largeID),
                reason: "no common link protocol version: east speaks 1...2, west speaks 3...4; upgrade the older site"),
        Refusal(name: "no common version (dialer)", direction: .outbound, before: [],
                offending: .hello(versions: 3...4, siteID: largeID),
                reason: "no common link protocol version: east speaks 1...2, west speaks 3...4; upgrade the older site"),
        Refusal(name: "helloAck with another version", direction: .outbound,
                before: [.hello(versions: 1...2, siteID: largeID)], offending: .helloAck(version: 1),
                reason: "helloAck chose version 1, expected 2"),
        Refusal(name: "helloAck before hello", direction: .outbound, before: [], offending: .helloAck(version: 2),
                reason: "unexpected helloAck frame at this point of the link"),
        Refusal(name: "helloAck to the acceptor", direction: .inbound,
                before: [.hello(versions: 1...2, siteID: largeID)], offending: .helloAck(version: 2),
                reason: "unexpected helloAck frame at this point of the link"),
        Refusal(name: "second hello", direction: .inbound,
                before: [.hello(versions: 1...2, siteID: largeID)], offending: .hello(versions: 1...2, siteID: largeID),
                reason: "unexpected hello frame at this point of the link"),
        Refusal(name: "hello while awaiting helloAck", direction: .outbound,
                before: [.hello(versions: 1...2, siteID: largeID)], offending: .hello(versions: 1...2, siteID: largeID),
                reason: "unexpected hello frame at this point of the link"),
        Refusal(name: "ping before the link is up", direction: .inbound, before: [],
                offending: .ping(nonce: 1, sentAt: 0), reason: "unexpected ping frame at this point of the link"),
        Refusal(name: "pong while awaiting helloAck", direction: .outbound,
                before: [.hello(versions: 1...2, siteID: largeID)], offending: .pong(nonce: 1, sentAt: 0),
                reason: "unexpected pong frame at this point of the link"),
    ]

    @Test("every refusal is a protocol error: goodbye with the reason, then nothing is acted on", arguments: refusals)
    func refusal(_ refusal: Refusal) {
        let clock = FakeClock()
        var m = Self.machine(refusal.direction)
        _ = m.start(now: clock.now)
        for message in refusal.before {
            #expect(!m.received(message, now: clock.now).contains { if case .sendGoodbyeAndClose = $0 { true } else { false } })
        }
        #expect(m.received(refusal.offending, now: clock.now) == [.sendGoodbyeAndClose(reason: refusal.reason)])
        #expect(m.isClosed)
        #expect(m.received(.ping(nonce: 1, sentAt: 0), now: clock.now).isEmpty)
        #expect(m.received(.goodbye(reason: "late"), now: clock.now).isEmpty)
        #expect(m.tick(now: clock.now).isEmpty)
    }

    @Test("a data-plane frame before the hello exchange finished is a protocol error; once live it is delivered")
    func dataFrames() {
        let clock = FakeClock()
        var m = Self.machine(.outbound)
        _ = m.start(now: clock.now)
        #expect(m.receivedData(typeName: "write", now: clock.now)
                == [.sendGoodbyeAndClose(reason: "write frame before the hello exchange finished")])
        var live = Self.live(.outbound, clock: clock)
        #expect(live.receivedData(typeName: "write", now: clock.now) == [.deliver])
    }

    @Test("a malformed control frame and a frame before the peer is identified are protocol errors")
    func malformedAndUnidentified() {
        let clock = FakeClock()
        var m = Self.machine(.inbound)
        _ = m.start(now: clock.now)
        #expect(m.receivedMalformed("ping payload is too short", now: clock.now)
                == [.sendGoodbyeAndClose(reason: "ping payload is too short")])
        var anonymous = Self.machine(.inbound, identified: false)
        _ = anonymous.start(now: clock.now)
        #expect(anonymous.received(.hello(versions: 1...1, siteID: largeID), now: clock.now)
                == [.sendGoodbyeAndClose(reason: "frame before the peer was identified")])
    }

    @Test("goodbye closes without a reply in every phase", arguments: [0, 1, 2])
    func goodbye(phase: Int) {
        let clock = FakeClock()
        var m = phase == 2 ? Self.live(.outbound, clock: clock) : Self.machine(.outbound)
        if phase < 2 { _ = m.start(now: clock.now) }
        if phase == 1 { _ = m.received(.hello(versions: 1...2, siteID: largeID), now: clock.now) }
        #expect(m.received(.goodbye(reason: "site west is stopping"), now: clock.now)
                == [.close(reason: "west said goodbye: site west is stopping")])
        #expect(m.isClosed)
    }

    @Test("pings every tick with nonces from 1; RTT from the own send time of a matched pong")
    func pingsAndRTT() {
        var clock = FakeClock()
        var m = Self.live(.outbound, clock: clock)
        clock.advance(.seconds(1))
        let first = UInt64(clock.nanos)
        #expect(m.tick(now: clock.now) == [.send(.ping(nonce: 1, sentAt: first))])
        clock.advance(.seconds(1))
        #expect(m.tick(now: clock.now) == [.send(.ping(nonce: 2, sentAt: UInt64(clock.nanos)))])
        clock.advance(.milliseconds(30))
        // The echoed sentAt is not trusted: a peer cannot make the RTT up.
        #expect(m.received(.pong(nonce: 2, sentAt: 0), now: clock.now) == [.rtt(.milliseconds(30)), .heardFromPeer])
        #expect(m.received(.pong(nonce: 1, sentAt: first), now: clock.now) == [.rtt(.milliseconds(1030)), .heardFromPeer])
    }

    @Test("a pong whose nonce is not outstanding is ignored, and the link stays up")
    func pongMismatch() {
        var clock = FakeClock()
        var m = Self.live(.inbound, clock: clock)
        clock.advance(.seconds(1))
        _ = m.tick(now: clock.now)
        #expect(m.received(.pong(nonce: 7, sentAt: 0), now: clock.now) == [.ignoredPong(nonce: 7)])
        #expect(m.received(.pong(nonce: 1, sentAt: 0), now: clock.now) == [.rtt(.zero), .heardFromPeer])
        #expect(m.received(.pong(nonce: 1, sentAt: 0), now: clock.now) == [.ignoredPong(nonce: 1)], "answered already")
        #expect(m.isLive)
    }

    @Test("a ping is answered with the same nonce and sentAt")
    func answersPing() {
        let clock = FakeClock()
        var m = Self.live(.inbound, clock: clock)
        #expect(m.received(.ping(nonce: 9, sentAt: 1234), now: clock.now)
                == [.send(.pong(nonce: 9, sentAt: 1234)), .heardFromPeer])
    }

    @Test("dead after: closed without goodbye once nothing arrived for 5 s; any frame resets the clock")
    func deadLink() {
        var clock = FakeClock()
        var m = Self.live(.outbound, clock: clock)
        for _ in 0..<4 {
            clock.advance(.seconds(1))
            #expect(m.tick(now: clock.now).count == 1, "a ping")
        }
        _ = m.receivedData(typeName: "ack", now: clock.now)
        for _ in 0..<4 {
            clock.advance(.seconds(1))
            #expect(m.tick(now: clock.now).count == 1, "still alive: the frame reset the clock")
        }
        clock.advance(.milliseconds(1300))
        #expect(m.tick(now: clock.now) == [.close(reason: "no frame from west for 5.3 s; closed the link as dead")])
        #expect(m.isClosed)
        #expect(m.tick(now: clock.now).isEmpty)
    }

    @Test("a tick that comes late (this site's own loop stalled) does not judge the silence; the next one does")
    func stalledLoop() {
        var clock = FakeClock()
        var m = Self.live(.outbound, clock: clock)
        clock.advance(.seconds(1))
        #expect(m.tick(now: clock.now).count == 1, "a ping")
        clock.advance(.seconds(7))
        #expect(m.tick(now: clock.now).count == 1, "late by 6 s: frames may be waiting behind this tick; a ping, no verdict")
        _ = m.receivedData(typeName: "region", now: clock.now)
        clock.advance(.seconds(1))
        #expect(m.tick(now: clock.now).count == 1, "the peer was heard: alive")
        clock.advance(.seconds(7))
        #expect(m.tick(now: clock.now).count == 1, "late again")
        clock.advance(.seconds(1))
        #expect(m.tick(now: clock.now) == [.close(reason: "no frame from west for 9.0 s; closed the link as dead")],
                "on time, and nothing came: dead")
    }

    @Test("the dead-after clock starts when the connection is active: it bounds the handshake too")
    func deadDuringHandshake() {
        var clock = FakeClock()
        var m = Self.machine(.inbound, identified: false)
        #expect(m.tick(now: clock.now).isEmpty, "not started")
        _ = m.start(now: clock.now)
        clock.advance(.seconds(4))
        #expect(m.tick(now: clock.now).isEmpty, "no ping before the link is up")
        clock.advance(.seconds(1))
        #expect(m.tick(now: clock.now) == [.close(reason: "no frame from 10.0.0.2:7800 for 5.0 s; closed the link as dead")])
    }

    @Test("a decoder error says goodbye only on a link that is up; a close decided elsewhere says goodbye")
    func failures() {
        let clock = FakeClock()
        var live = Self.live(.inbound, clock: clock)
        #expect(live.failed("unknown frame type 0x42", isFrameError: true)
                == [.sendGoodbyeAndClose(reason: "east closed the link: unknown frame type 0x42")])
        var handshaking = Self.machine(.inbound)
        _ = handshaking.start(now: clock.now)
        #expect(handshaking.failed("unknown frame type 0x42", isFrameError: true) == [.close(reason: "unknown frame type 0x42")])
        var tls = Self.live(.outbound, clock: clock)
        #expect(tls.failed("TLS with west failed", isFrameError: false) == [.close(reason: "TLS with west failed")])
        var duplicate = Self.live(.outbound, clock: clock)
        #expect(duplicate.closeRequested(reason: "duplicate link") == [.sendGoodbyeAndClose(reason: "duplicate link")])
        #expect(duplicate.received(.ping(nonce: 1, sentAt: 0), now: clock.now).isEmpty)
    }

    @Test("version negotiation picks the highest version both ranges contain")
    func negotiate() {
        #expect(PeerConnectionMachine.negotiate(1...3, 2...5) == 3)
        #expect(PeerConnectionMachine.negotiate(1...1, 1...1) == 1)
        #expect(PeerConnectionMachine.negotiate(1...2, 3...4) == nil)
    }
}

@Suite("Pong matching")
struct OutstandingPingsTests {
    private static func at(_ milliseconds: Int64) -> Instant {
        Instant(monotonicNanos: 1_000_000_000 + milliseconds * 1_000_000, wallSeconds: 0)
    }

    @Test("a pong is timed from when its own ping was sent, once")
    func matched() {
        var pings = OutstandingPings()
        pings.sent(nonce: 1, at: Self.at(0))
        pings.sent(nonce: 2, at: Self.at(1000))
        #expect(pings.answered(nonce: 2, at: Self.at(1030)) == .milliseconds(30))
        #expect(pings.answered(nonce: 1, at: Self.at(1040)) == .milliseconds(1040), "answers may come out of order")
        #expect(pings.answered(nonce: 2, at: Self.at(1050)) == nil, "already answered")
        #expect(pings.count == 0)
    }

    @Test("a pong for a ping never sent gives no RTT")
    func unknown() {
        var pings = OutstandingPings()
        pings.sent(nonce: 5, at: Self.at(0))
        #expect(pings.answered(nonce: 6, at: Self.at(1)) == nil)
        #expect(pings.answered(nonce: 0, at: Self.at(1)) == nil)
        #expect(pings.count == 1)
    }

    @Test("only the last 8 unanswered pings are remembered")
    func bounded() {
        var pings = OutstandingPings()
        for nonce in UInt64(1)...20 { pings.sent(nonce: nonce, at: Self.at(Int64(nonce) * 1000)) }
        #expect(pings.count == OutstandingPings.limit)
        #expect(pings.answered(nonce: 12, at: Self.at(30_000)) == nil, "pushed out by newer pings")
        #expect(pings.answered(nonce: 13, at: Self.at(30_000)) == .seconds(17))
        #expect(pings.answered(nonce: 20, at: Self.at(30_000)) == .seconds(10))
    }
}

// MARK: - A peer's links

@Suite("Peer link table")
struct PeerLinkTableTests {
    /// The two sites' tables: "small" (the smaller site ID) and "large", each with the other as peer.
    fileprivate static func tables(clock: FakeClock) -> (small: PeerLinkTable, large: PeerLinkTable) {
        (PeerLinkTable(config: .init(localName: "small", localID: smallID, peers: ["large": largeID]), now: clock.now),
         PeerLinkTable(config: .init(localName: "large", localID: largeID, peers: ["small": smallID]), now: clock.now))
    }

    static func closes(_ actions: [PeerLinkTable.Action]) -> [LinkID] {
        actions.compactMap { if case .closeLink(_, let id, _) = $0 { id } else { nil } }
    }

    static func currentChanges(_ actions: [PeerLinkTable.Action]) -> [(old: PeerLinkTable.CurrentLink?, new: PeerLinkTable.CurrentLink?, reason: String)] {
        actions.compactMap { if case .currentChanged(_, let old, let new, let reason) = $0 { (old, new, reason) } else { nil } }
    }

    @Test("the smaller ID's dial wins at both sites, in either order of arrival", arguments: [false, true])
    func duplicateRule(preferredFirst: Bool) {
        let clock = FakeClock()
        var (small, large) = Self.tables(clock: clock)
        // c1 is dialed by the small site (outbound there, inbound at the large site); c2 the reverse.
        let (s1, s2) = (small.newLinkID(), small.newLinkID())
        let (l1, l2) = (large.newLinkID(), large.newLinkID())

        // The large site never closes a duplicate itself, and prefers c1 as soon as it is up.
        if preferredFirst {
            #expect(Self.closes(large.linkUp(peer: "small", link: l1, direction: .inbound, now: clock.now)).isEmpty)
            #expect(Self.closes(large.linkUp(peer: "small", link: l2, direction: .outbound, now: clock.now)).isEmpty)
        } else {
            #expect(Self.closes(large.linkUp(peer: "small", link: l2, direction: .outbound, now: clock.now)).isEmpty)
            #expect(Self.closes(large.linkUp(peer: "small", link: l1, direction: .inbound, now: clock.now)).isEmpty)
        }
        #expect(large.peers["small"]?.current?.link == l1)
        #expect(large.peers["small"]?.currentDirection == .inbound)
        #expect(large.peers["small"]?.links.count == 2)

        // The small site closes c2 once c1 is up and the large site was heard on c1 since c2 came up.
        if preferredFirst {
            #expect(Self.closes(small.linkUp(peer: "large", link: s1, direction: .outbound, now: clock.now)).isEmpty)
            #expect(Self.closes(small.linkUp(peer: "large", link: s2, direction: .inbound, now: clock.now)).isEmpty)
            #expect(small.peers["large"]?.current?.link == s2, "c1 is in doubt: the fresh link is used")
            #expect(Self.closes(small.heardFrom(peer: "large", link: s2, now: clock.now)).isEmpty, "c2 is not in doubt")
            let heard = small.heardFrom(peer: "large", link: s1, now: clock.now)
            #expect(heard.contains(.closeLink(
                peer: "large", s2, reason: "duplicate link; keeping the one dialed by small, which has the smaller site ID")))
            #expect(Self.closes(small.heardFrom(peer: "large", link: s1, now: clock.now)).isEmpty, "closed once only")
        } else {
            #expect(Self.closes(small.linkUp(peer: "large", link: s2, direction: .inbound, now: clock.now)).isEmpty)
            #expect(Self.closes(small.linkUp(peer: "large", link: s1, direction: .outbound, now: clock.now)) == [s2])
        }
        #expect(small.peers["large"]?.current?.link == s1)
        #expect(small.peers["large"]?.currentDirection == .outbound)

        // c2 closing (the small site's goodbye) leaves both connected on c1.
        _ = small.linkDown(peer: "large", link: s2, reason: nil, now: clock.now)
        _ = large.linkDown(peer: "small", link: l2, reason: nil, now: clock.now)
        #expect(small.peers["large"]?.state == .connected)
        #expect(large.peers["small"]?.state == .connected)
        #expect(large.peers["small"]?.current?.link == l1)

        // c1 closing leaves both disconnected, with the reason.
        let down = small.linkDown(peer: "large", link: s1, reason: "gone", now: clock.now)
        #expect(small.peers["large"]?.state == .disconnected)
        #expect(small.peers["large"]?.lastError == "gone")
        #expect(Self.currentChanges(down).first?.reason == "gone")
        #expect(Self.currentChanges(down).first?.new == nil)
    }

    @Test("a restarted larger-ID site is not bounced as a duplicate while the stale link times out")
    func restartedPeer() {
        let clock = FakeClock()
        var (small, _) = Self.tables(clock: clock)
        let (c1, c2) = (small.newLinkID(), small.newLinkID())
        _ = small.linkUp(peer: "large", link: c1, direction: .outbound, now: clock.now)
        // The restarted site's link comes up: kept, and used, since c1 may be dead.
        let up = small.linkUp(peer: "large", link: c2, direction: .inbound, now: clock.now)
        #expect(Self.closes(up).isEmpty)
        #expect(small.peers["large"]?.current?.link == c2)
        #expect(Self.closes(small.heardFrom(peer: "large", link: c2, now: clock.now)).isEmpty, "a heartbeat on the fresh link")
        // Dead-link detection closes c1; the peer stays connected on c2 throughout.
        let down = small.linkDown(peer: "large", link: c1, reason: "no frame from large for 5.0 s", now: clock.now)
        #expect(Self.currentChanges(down).isEmpty)
        #expect(small.peers["large"]?.state == .connected)
        #expect(small.peers["large"]?.current?.link == c2)
    }

    @Test("a second link from the same dialer replaces the stale first one")
    func sameDirection() {
        let clock = FakeClock()
        var (_, large) = Self.tables(clock: clock)
        let (c1, c2) = (large.newLinkID(), large.newLinkID())
        _ = large.linkUp(peer: "small", link: c1, direction: .inbound, now: clock.now)
        let up = large.linkUp(peer: "small", link: c2, direction: .inbound, now: clock.now)
        #expect(up.contains(.closeLink(peer: "small", c1, reason: "replaced by a newer link from the same site")))
        let change = Self.currentChanges(up).first
        #expect(change?.old?.link == c1 && change?.new?.link == c2)
        #expect(change?.reason == "replaced by a newer link from the same site")
        _ = large.linkDown(peer: "small", link: c1, reason: "stale", now: clock.now)
        #expect(large.peers["small"]?.state == .connected)
    }

    @Test("a link that becomes current again does so under a new ID")
    func recurrentLinkGetsNewID() {
        let clock = FakeClock()
        var (small, _) = Self.tables(clock: clock)
        let (c1, c2) = (small.newLinkID(), small.newLinkID())
        let first = Self.currentChanges(small.linkUp(peer: "large", link: c1, direction: .outbound, now: clock.now))
        #expect(first.first?.new == .init(link: c1, id: c1))
        let second = Self.currentChanges(small.linkUp(peer: "large", link: c2, direction: .inbound, now: clock.now))
        #expect(second.first?.old == .init(link: c1, id: c1))
        #expect(second.first?.new == .init(link: c2, id: c2))
        #expect(second.first?.reason == "no longer the current link to large: a newer inbound link is used")
        let third = Self.currentChanges(small.heardFrom(peer: "large", link: c1, now: clock.now))
        let again = third.first?.new
        #expect(again?.link == c1)
        #expect(again.map { $0.id != c1 && $0.id != c2 } == true)
        #expect(small.peers["large"]?.current == again)
    }

    @Test("state: connecting while dialing, disconnected with the error; repeats of an error are quiet; since moves only across connected")
    func states() {
        var clock = FakeClock()
        var (small, _) = Self.tables(clock: clock)
        let start = clock.now
        // The first dial is not news (no error yet): debug.
        #expect(small.dialStarted(peer: "large", now: clock.now) == [.stateChanged(
            peer: "large", from: .disconnected, to: .connecting, line: "peer link large: disconnected -> connecting", quiet: true)])
        clock.advance(.seconds(2))
        #expect(small.dialFinished(peer: "large", error: "refused", now: clock.now) == [.stateChanged(
            peer: "large", from: .connecting, to: .disconnected, line: "peer link large: connecting -> disconnected: refused", quiet: false)])
        _ = small.dialStarted(peer: "large", now: clock.now)
        let repeated = small.dialFinished(peer: "large", error: "refused", now: clock.now)
        #expect(repeated.first.map { if case .stateChanged(_, _, _, _, let quiet) = $0 { quiet } else { false } } == true)
        #expect(small.peers["large"]?.since == start, "retries of a peer that stays down do not move since")

        clock.advance(.seconds(10))
        _ = small.dialStarted(peer: "large", now: clock.now)
        let link = small.newLinkID()
        let up = small.linkUp(peer: "large", link: link, direction: .outbound, now: clock.now)
        #expect(up.last == .stateChanged(
            peer: "large", from: .connecting, to: .connected, line: "peer link large: connecting -> connected (outbound, \(link))",
            quiet: false))
        #expect(small.peers["large"]?.since == clock.now)
        #expect(small.peers["large"]?.dialing == false)

        small.rttMeasured(peer: "large", link: link, milliseconds: 0.4)
        small.rttMeasured(peer: "large", link: LinkID(99), milliseconds: 9)
        #expect(small.peers["large"]?.rttMilliseconds == 0.4, "only the current link's RTT counts")
        _ = small.linkDown(peer: "large", link: link, reason: "gone", now: clock.now)
        #expect(small.peers["large"]?.rttMilliseconds == nil)
    }

    @Test("once stopped, a link that comes up is closed at once, and state changes are quiet")
    func stopped() {
        let clock = FakeClock()
        var (small, _) = Self.tables(clock: clock)
        let link = small.newLinkID()
        _ = small.linkUp(peer: "large", link: link, direction: .outbound, now: clock.now)
        small.stop()
        let late = small.newLinkID()
        #expect(small.linkUp(peer: "large", link: late, direction: .inbound, now: clock.now)
                == [.closeLink(peer: "large", late, reason: "site small is stopping")])
        let down = small.linkDown(peer: "large", link: link, reason: "site small stopped", now: clock.now)
        #expect(down.last.map { if case .stateChanged(_, _, _, _, let quiet) = $0 { quiet } else { false } } == true)
        #expect(small.linkUp(peer: "nobody", link: small.newLinkID(), direction: .inbound, now: clock.now).first
                .map { if case .closeLink(_, _, "unknown peer") = $0 { true } else { false } } == true)
    }
}

// MARK: - Dialing

@Suite("Dial schedule")
struct DialScheduleTests {
    @Test("failed dials back off from 100–200 ms up to 2.5–5 s; a link that came up resets it")
    func backoff() {
        var schedule = DialSchedule()
        var rng = SeededRandom(seed: 42)
        let windows: [ClosedRange<Duration>] = [
            .milliseconds(100) ... .milliseconds(200), .milliseconds(200) ... .milliseconds(400),
            .milliseconds(400) ... .milliseconds(800), .milliseconds(800) ... .milliseconds(1600),
            .milliseconds(1600) ... .milliseconds(3200), .milliseconds(2500) ... .seconds(5),
            .milliseconds(2500) ... .seconds(5),
        ]
        for window in windows {
            #expect(schedule.next(currentLink: nil) == .dial)
            let delay = schedule.dialFinished(linkCameUp: false, using: &rng)
            #expect(window.contains(delay), "\(delay) not in \(window)")
        }
        #expect(schedule.next(currentLink: nil) == .dial)
        let afterLink = schedule.dialFinished(linkCameUp: true, using: &rng)
        #expect((Duration.milliseconds(100) ... .milliseconds(200)).contains(afterLink))
    }

    @Test("with a link, wait for it; after it closes the backoff starts again from the base")
    func waitsForLink() {
        var schedule = DialSchedule()
        var rng = SeededRandom(seed: 7)
        for _ in 0..<5 { _ = schedule.dialFinished(linkCameUp: false, using: &rng) }
        #expect(schedule.backoff.attempt == 5)
        #expect(schedule.next(currentLink: LinkID(3)) == .waitForLink(LinkID(3), pause: nil))
        schedule.linkClosed()
        #expect(schedule.backoff.attempt == 0)
        // The same link still reported after it closed: pause, so the loop does not spin.
        #expect(schedule.next(currentLink: LinkID(3)) == .waitForLink(LinkID(3), pause: DialSchedule.settlePause))
        #expect(schedule.next(currentLink: LinkID(4)) == .waitForLink(LinkID(4), pause: nil))
        #expect(schedule.next(currentLink: nil) == .dial)
        let delay = schedule.dialFinished(linkCameUp: false, using: &rng)
        #expect((Duration.milliseconds(100) ... .milliseconds(200)).contains(delay))
    }

    @Test("the same seed gives the same delays")
    func replays() {
        func delays(seed: UInt64) -> [Duration] {
            var schedule = DialSchedule()
            var rng = SeededRandom(seed: seed)
            return (0..<8).map { _ in schedule.dialFinished(linkCameUp: false, using: &rng) }
        }
        #expect(delays(seed: 5) == delays(seed: 5))
    }
}
