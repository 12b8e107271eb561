/// The link-control messages of protocol.md §3, as the peer-link state machines see them: no
/// bytes, no frames. FerryWire's `LinkMessage` maps to and from this.
public enum LinkControlMessage: Sendable, Equatable {
    /// Opens a link: the sender's versions and site ID (its site name is informational and left
    /// to the wire layer).
    case hello(versions: ClosedRange<UInt16>, siteID: SiteID)
    /// The acceptor's chosen version.
    case helloAck(version: UInt16)
    /// Heartbeat; `sentAt` is the pinger's monotonic clock in nanoseconds (informational).
    case ping(nonce: UInt64, sentAt: UInt64)
    /// Heartbeat answer, echoing the ping's fields.
    case pong(nonce: UInt64, sentAt: UInt64)
    /// Sent before a deliberate close.
    case goodbye(reason: String)

    /// The message's name on the wire, for error text.
    public var name: String {
        switch self {
        case .hello: return "hello"
        case .helloAck: return "helloAck"
        case .ping: return "ping"
        case .pong: return "pong"
        case .goodbye: return "goodbye"
        }
    }
}

/// Which site opened a link's TCP connection.
public enum LinkDirection: String, Sendable, Codable {
    /// The peer dialed this site.
    case inbound
    /// This site dialed the peer.
    case outbound
}

/// One TLS connection to a peer, from the moment it is active until it closes (protocol.md §4.1–
/// §4.6): the hello exchange and version negotiation, heartbeats with matched pong nonces and RTT,
/// dead-link detection, `goodbye`, and protocol errors. A pure state machine: events in, actions
/// out, the time passed in (DESIGN §4). FerryWire's `PeerConnectionHandler` executes it on the
/// connection's event loop; the simulation drives it directly.
///
/// Certificate pinning happens before this machine sees the peer: the dialer knows the peer from
/// the start, the acceptor learns it from the certificate (``identified(_:)``).
public struct PeerConnectionMachine: Sendable {
    /// The peer as configured: the name for messages and the pinned site ID a `hello` must carry.
    public struct Peer: Sendable, Equatable {
        public var name: String
        public var siteID: SiteID
        public init(name: String, siteID: SiteID) {
            self.name = name
            self.siteID = siteID
        }
    }

    public struct Config: Sendable {
        /// This site's name and ID, sent in `hello` and used in error text.
        public var localName: String
        public var localID: SiteID
        /// The link protocol versions this site speaks.
        public var versions: ClosedRange<UInt16>
        public var direction: LinkDirection
        /// How often ``tick(now:)`` is expected: a `ping` goes out at each tick while live.
        public var heartbeat: Duration
        /// How long the connection may stay silent (no frame at all) before it is closed as dead.
        public var deadAfter: Duration
        /// The remote `host:port`, to name the peer before it is identified.
        public var remoteAddress: String

        public init(
            localName: String, localID: SiteID, versions: ClosedRange<UInt16>, direction: LinkDirection,
            heartbeat: Duration, deadAfter: Duration, remoteAddress: String
        ) {
            self.localName = localName
            self.localID = localID
            self.versions = versions
            self.direction = direction
            self.heartbeat = heartbeat
            self.deadAfter = deadAfter
            self.remoteAddress = remoteAddress
        }
    }

    public enum Action: Sendable, Equatable {
        /// Send this message on the connection.
        case send(LinkControlMessage)
        /// The hello exchange is done at this version: the link is up (protocol.md §4.1).
        case becameLive(version: UInt16)
        /// A `ping` or matched `pong` arrived: the peer still holds this link (protocol.md §4.8).
        case heardFromPeer
        /// A matched `pong`: the round trip of its ping, by this site's own clock (§4.4).
        case rtt(Duration)
        /// A `pong` whose nonce is not outstanding was ignored (for a debug line).
        case ignoredPong(nonce: UInt64)
        /// Hand the data-plane frame just received to the data plane (§6.1).
        case deliver
        /// Close the connection without `goodbye` (dead link, `goodbye` received, failure).
        case close(reason: String)
        /// Send `goodbye(reason)` and close once it is written (protocol error, or a close decided
        /// elsewhere).
        case sendGoodbyeAndClose(reason: String)
    }

    private enum Phase: Sendable {
        /// Not active yet: nothing sent, no timer.
        case idle
        /// Our `hello` sent; waiting for the peer's.
        case awaitingHello
        /// Dialer only: got the acceptor's `hello`, waiting for `helloAck` with this version.
        case awaitingAck(version: UInt16)
        /// Up at `version`; pings numbered from 1 (protocol.md §3), the unanswered ones remembered.
        case live(version: UInt16, nextNonce: UInt64, pings: OutstandingPings)
        /// Closing or closed: nothing more that arrives is acted on (protocol.md §4.2).
        case closed
    }

    public let config: Config
    /// The peer: known from the start when dialing; from the certificate when accepting.
    public private(set) var peer: Peer?
    private var phase = Phase.idle
    private var lastReceived = Instant(monotonicNanos: 0, wallSeconds: 0)
    /// When ``tick(now:)`` last ran on a started connection.
    private var lastTick: Instant?
    /// Whether the hello exchange ever finished on this connection.
    public private(set) var wasLive = false

    public init(config: Config, peer: Peer?) {
        self.config = config
        self.peer = peer
    }

    /// The peer's name once known, else the remote address.
    public var peerName: String { peer?.name ?? config.remoteAddress }

    public var isLive: Bool {
        if case .live = phase { return true }
        return false
    }

    public var isClosed: Bool {
        if case .closed = phase { return true }
        return false
    }

    /// The version the link is up at, if it is.
    public var version: UInt16? {
        if case .live(let version, _, _) = phase { return version }
        return nil
    }

    // MARK: - Events

    /// The connection became active. proto: each side sends `hello` as soon as the connection is
    /// up (the TLS layer holds it until its handshake is done); the dead-link clock starts now, so
    /// it also bounds the handshake. A second call does nothing.
    public mutating func start(now: Instant) -> [Action] {
        guard case .idle = phase else { return [] }
        phase = .awaitingHello
        lastReceived = now
        return [.send(.hello(versions: config.versions, siteID: config.localID))]
    }

    /// The acceptor's certificate check named the peer.
    public mutating func identified(_ peer: Peer) {
        self.peer = peer
    }

    /// A link-control message arrived (protocol.md §4.2).
    public mutating func received(_ message: LinkControlMessage, now: Instant) -> [Action] {
        guard let peer = heard(now) else { return unidentified() }
        switch (message, phase) {
        case (_, .closed):
            return []
        case (.goodbye(let reason), _):
            return close("\(peer.name) said goodbye: \(reason)")
        case (.hello(let versions, let siteID), .awaitingHello):
            guard siteID == peer.siteID else {
                return protocolError("hello names site ID \(siteID), but the certificate is \(peer.siteID)")
            }
            guard let version = Self.negotiate(config.versions, versions) else {
                return protocolError(
                    "no common link protocol version: \(config.localName) speaks "
                        + "\(config.versions.lowerBound)...\(config.versions.upperBound), "
                        + "\(peer.name) speaks \(versions.lowerBound)...\(versions.upperBound); upgrade the older site")
            }
            switch config.direction {
            case .inbound:
                // proto: the acceptor picks the version.
                return [.send(.helloAck(version: version))] + becomeLive(version)
            case .outbound:
                phase = .awaitingAck(version: version)
                return []
            }
        case (.helloAck(let version), .awaitingAck(let expected)):
            guard version == expected else {
                return protocolError("helloAck chose version \(version), expected \(expected)")
            }
            return becomeLive(version)
        case (.ping(let nonce, let sentAt), .live):
            return [.send(.pong(nonce: nonce, sentAt: sentAt)), .heardFromPeer]
        case (.pong(let nonce, _), .live(let version, let nextNonce, var pings)):
            // proto: RTT from our own send time of the ping this answers; the echoed sentAt is
            // not trusted, and a pong that answers no outstanding ping is ignored.
            guard let rtt = pings.answered(nonce: nonce, at: now) else { return [.ignoredPong(nonce: nonce)] }
            phase = .live(version: version, nextNonce: nextNonce, pings: pings)
            return [.rtt(rtt), .heardFromPeer]
        default:
            return protocolError("unexpected \(message.name) frame at this point of the link")
        }
    }

    /// A frame of a data-plane type arrived (`typeName` for error text): delivered only once the
    /// link is up.
    public mutating func receivedData(typeName: String, now: Instant) -> [Action] {
        guard heard(now) != nil else { return unidentified() }
        switch phase {
        case .closed: return []
        case .live: return [.deliver]
        default: return protocolError("\(typeName) frame before the hello exchange finished")
        }
    }

    /// A link-control frame arrived whose payload does not parse (protocol.md §2.6).
    public mutating func receivedMalformed(_ error: String, now: Instant) -> [Action] {
        guard heard(now) != nil else { return unidentified() }
        if case .closed = phase { return [] }
        return protocolError(error)
    }

    /// The pipeline failed below this machine (TLS, TCP, or the frame decoder). A decoder error
    /// on a link that is up gets a `goodbye` (TLS is intact, and an unknown required type usually
    /// means one site runs a newer Ferry, which the peer's operator should see too); anything
    /// else just closes.
    public mutating func failed(_ error: String, isFrameError: Bool) -> [Action] {
        if isFrameError, case .live = phase {
            phase = .closed
            return [.sendGoodbyeAndClose(reason: "\(config.localName) closed the link: \(error)")]
        }
        phase = .closed
        return [.close(reason: error)]
    }

    /// Something outside this connection decided to close it (the duplicate rule, stop).
    public mutating func closeRequested(reason: String) -> [Action] {
        phase = .closed
        return [.sendGoodbyeAndClose(reason: reason)]
    }

    /// The connection closed; nothing more is acted on.
    public mutating func closed() {
        phase = .closed
    }

    /// A heartbeat tick. proto: no frame at all for dead-after closes the link (without goodbye);
    /// otherwise a live link pings.
    public mutating func tick(now: Instant) -> [Action] {
        switch phase {
        case .idle, .closed:
            return []
        default:
            break
        }
        // A tick far later than the heartbeat says this site's own loop stalled (a long disk
        // write on it): what the peer sent meanwhile is waiting to be read, after this tick. The
        // silence is judged at the next tick (a walk-through saw a replica drop every link at
        // once, every few seconds, while it applied a full copy on a loaded machine).
        let stalled = lastTick.map { Duration.nanoseconds(now.monotonicNanos - $0.monotonicNanos) > config.heartbeat + config.deadAfter / 2 } ?? false
        lastTick = now
        let silent = Duration.nanoseconds(now.monotonicNanos - lastReceived.monotonicNanos)
        if silent >= config.deadAfter && !stalled {
            return close("no frame from \(peerName) for \(Self.seconds(silent)); closed the link as dead")
        }
        guard case .live(let version, let nonce, var pings) = phase else { return [] }
        pings.sent(nonce: nonce, at: now)
        phase = .live(version: version, nextNonce: nonce &+ 1, pings: pings)
        return [.send(.ping(nonce: nonce, sentAt: UInt64(clamping: now.monotonicNanos)))]
    }

    // MARK: - Rules

    /// proto §4.3: the highest version both ranges contain, or nil when they do not overlap.
    public static func negotiate(_ local: ClosedRange<UInt16>, _ remote: ClosedRange<UInt16>) -> UInt16? {
        let low = Swift.max(local.lowerBound, remote.lowerBound)
        let high = Swift.min(local.upperBound, remote.upperBound)
        return low <= high ? high : nil
    }

    // MARK: - Helpers

    /// Notes that a frame arrived (unless closing); returns the peer, nil if not identified yet.
    private mutating func heard(_ now: Instant) -> Peer? {
        if case .closed = phase { return peer }
        lastReceived = now
        return peer
    }

    /// Unreachable in the daemon: TLS delivers no data before verification named the peer.
    private mutating func unidentified() -> [Action] {
        if case .closed = phase { return [] }
        return protocolError("frame before the peer was identified")
    }

    private mutating func becomeLive(_ version: UInt16) -> [Action] {
        phase = .live(version: version, nextNonce: 1, pings: OutstandingPings())
        wasLive = true
        return [.becameLive(version: version)]
    }

    private mutating func close(_ reason: String) -> [Action] {
        phase = .closed
        return [.close(reason: reason)]
    }

    private mutating func protocolError(_ reason: String) -> [Action] {
        phase = .closed
        return [.sendGoodbyeAndClose(reason: reason)]
    }

    /// `d.d s`, truncated to tenths.
    static func seconds(_ amount: Duration) -> String {
        let tenths = amount.nanoseconds / 100_000_000
        return "\(tenths / 10).\(tenths % 10) s"
    }
}

/// The pings a connection sent and has not had answered, to match pongs against (protocol.md §4.4).
///
/// RTT comes from this site's own record of when the ping left, never from the `sentAt` a pong
/// echoes: that value is the peer's to get wrong. A pong whose nonce is not outstanding (never
/// sent, answered already, or pushed out by newer pings) gives no RTT. Time is passed in.
public struct OutstandingPings: Sendable, Equatable {
    /// How many unanswered pings are remembered; older ones are forgotten.
    public static let limit = 8

    private struct Sent: Sendable, Equatable {
        var nonce: UInt64
        var at: Instant
    }

    /// Oldest first; at most `limit`.
    private var sent: [Sent] = []

    public init() {}

    /// Remembers a ping sent with `nonce` at `time`.
    public mutating func sent(nonce: UInt64, at time: Instant) {
        if sent.count == Self.limit { sent.removeFirst() }
        sent.append(Sent(nonce: nonce, at: time))
    }

    /// The round-trip time of the ping `nonce` answers, or nil when no such ping is outstanding.
    /// The ping is answered from then on.
    public mutating func answered(nonce: UInt64, at time: Instant) -> Duration? {
        guard let index = sent.firstIndex(where: { $0.nonce == nonce }) else { return nil }
        let ping = sent.remove(at: index)
        let elapsed = time.monotonicNanos - ping.at.monotonicNanos
        return .nanoseconds(max(0, elapsed))
    }

    public var count: Int { sent.count }
}
