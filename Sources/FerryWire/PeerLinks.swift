import FerryCore
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// This site's mesh of links to its peer sites: mutual TLS 1.3 with pinned site IDs, a hello
/// exchange, heartbeats, and reconnection.
///
/// Every site listens and also dials every configured peer, so a link comes up whichever side
/// starts first; when both dials succeed, both sides keep the link dialed by the site with the
/// smaller site ID (see the protocol in ``Frame``). A certificate is accepted only if its SHA-256
/// is a configured peer's pinned site ID: on accept, any configured peer; on dial, the dialed one.
/// No CA and no host name are involved. A refused certificate is logged once, at warning level,
/// with both fingerprints and what to change.
///
/// A link that receives no frame for `deadAfter` is closed; a peer without a link is redialed
/// with capped exponential backoff (200 ms doubling to 5 s, jittered). `status()` reports each
/// peer's state; state changes are logged at info with the peer's name.
///
/// ## The data plane (protocol.md §6.1)
/// `PeerLinks` handles the link-control frames (``FrameType/linkControl``) itself. Frames of the
/// types passed as `dataFrameTypes` (by default ``FrameType/dataPlane``: volume replication) go
/// to the layer above; a frame of an optional type that is in neither set is dropped, and one of a
/// non-optional type in neither set closes the link (``FrameError/unknownType(_:)``). So does a
/// frame with a flag bit its type does not define (``FrameError/unknownFlags(_:_:)``): none for
/// link control, the mask given in `dataFrameTypes` for the others.
///
/// Each established connection gets a `LinkID`. Of a peer's connections, one at a time is its
/// *current link* (the duplicate rule of protocol.md §4.8 picks it); the layer above is told with
/// ``onLinkUp`` when a link becomes current and with ``onLinkDown`` when it stops being current or
/// closes. For each link, on that link's event loop and in this order: up, the frames that arrive
/// on it (``onFrame``) and writability changes, down. Frames that arrive on a connection while it
/// is not up are dropped. A link that went down is never up again: a connection that becomes
/// current again gets a new ID. Send with ``write(_:to:link:)``, which refuses any link that is not
/// the peer's current one.
public final class PeerLinks: Sendable {
    /// This site's identity, presented to every peer.
    public let identity: SiteIdentity
    /// The configured peers.
    public let peers: [PeerEndpoint]

    private let listenHost: String
    private let listenPort: Int
    let group: any EventLoopGroup
    /// Where connections live: one loop when the site asks for it (``init``'s `linkLoop`).
    let connectionGroup: any EventLoopGroup
    private let logger: Logger
    let heartbeat: TimeAmount
    let deadAfter: TimeAmount
    /// Every type this site understands with the flag bits it defines: link control (none) and
    /// `dataFrameTypes`.
    let knownFrameFlags: [FrameType: UInt16]
    let registry: LinkRegistry
    private let runtime = Mutex(Runtime())

    private struct Runtime {
        var phase = Phase.idle
        var serverChannel: (any Channel)?
        var boundPort: Int?
        var dialers: [Task<Void, Never>] = []
    }

    private enum Phase { case idle, started, stopped }

    /// Makes the links; nothing happens until ``start()``.
    ///
    /// - Parameters:
    ///   - identity: this site's key and certificate.
    ///   - listen: where to accept peers; port 0 picks a free port (see ``boundPort``).
    ///   - peers: the peer sites to dial and to accept, each with its pinned site ID.
    ///   - group: the event loops for all connections.
    ///   - linkLoop: if given, every link lives on this loop of `group` (the site puts its NBD
    ///     connections there too, so a sync write and its ack need no hop between threads).
    ///   - heartbeatInterval: how often to ping each linked peer.
    ///   - deadAfter: how long a link may stay silent (no frame at all) before it is closed.
    ///   - dataFrameTypes: frame types delivered to ``onFrame``, each with the mask of the flag bits
    ///     it defines (`[type: 0]` for a type without flags); must not include link-control types.
    ///     By default the replication frames.
    public init(
        identity: SiteIdentity,
        listen: (host: String, port: Int),
        peers: [PeerEndpoint],
        group: any EventLoopGroup,
        linkLoop: (any EventLoop)? = nil,
        logger: Logger,
        heartbeatInterval: Duration = .seconds(1),
        deadAfter: Duration = .seconds(5),
        dataFrameTypes: [FrameType: UInt16] = FrameType.dataPlane
    ) {
        precondition(FrameType.linkControl.isDisjoint(with: dataFrameTypes.keys),
                     "dataFrameTypes must not include link-control frame types")
        self.identity = identity
        self.peers = peers
        self.listenHost = listen.host
        self.listenPort = listen.port
        self.group = group
        self.connectionGroup = linkLoop ?? group
        self.logger = logger
        self.heartbeat = .nanoseconds(max(1_000_000, heartbeatInterval.nanoseconds))
        self.deadAfter = .nanoseconds(max(1_000_000, deadAfter.nanoseconds))
        self.knownFrameFlags = dataFrameTypes.merging(FrameType.linkControl.map { ($0, 0) }) { data, _ in data }
        self.registry = LinkRegistry(identity: identity, peers: peers, logger: logger)
    }

    /// The port the listener is bound to, once ``start()`` returned; nil before and after.
    public var boundPort: Int? { runtime.withLock { $0.boundPort } }

    /// Called with every frame of a `dataFrameTypes` type that arrives on a link while it is up
    /// (between its ``onLinkUp`` and ``onLinkDown``).
    ///
    /// Runs on the link's event loop, in arrival order for that link: it must not block. Hop to
    /// your own task or executor for anything slow. Set it before ``start()`` so no frame is
    /// missed; frames that arrive while it is nil are dropped (logged at debug).
    public var onFrame: (@Sendable (PeerFrame) -> Void)? {
        get { registry.handlers.callbacks.withLock { $0.frame } }
        set { registry.handlers.callbacks.withLock { $0.frame = newValue } }
    }

    /// Called when a connection becomes `peer`'s current link, under a `LinkID` never used before:
    /// after the hello exchange, or when the current link switches (the duplicate rule,
    /// protocol.md §4.8; the old one's ``onLinkDown`` is decided first). On the link's event loop,
    /// before any of its frames; must not block. Set it before ``start()``.
    public var onLinkUp: (@Sendable (_ peer: String, _ link: LinkID) -> Void)? {
        get { registry.handlers.callbacks.withLock { $0.linkUp } }
        set { registry.handlers.callbacks.withLock { $0.linkUp = newValue } }
    }

    /// Called when a link that was reported up stops being `peer`'s current link or closes, with
    /// the reason. On the link's event loop, after its last frame; must not block. Frames sent on
    /// it and not yet acknowledged by the layer above may be lost (protocol.md §6.1).
    public var onLinkDown: (@Sendable (_ peer: String, _ link: LinkID, _ reason: String) -> Void)? {
        get { registry.handlers.callbacks.withLock { $0.linkDown } }
        set { registry.handlers.callbacks.withLock { $0.linkDown = newValue } }
    }

    /// Called when an up link's channel becomes writable (true) or stops being writable (false:
    /// more is queued than its high-water mark). On the link's event loop; must not block.
    public var onWritabilityChanged: (@Sendable (_ peer: String, _ link: LinkID, _ writable: Bool) -> Void)? {
        get { registry.handlers.callbacks.withLock { $0.writabilityChanged } }
        set { registry.handlers.callbacks.withLock { $0.writabilityChanged = newValue } }
    }

    /// Binds the listener and starts dialing every peer. Returns once the listener is bound.
    ///
    /// Throws ``PeerLinksError/bindFailed(address:reason:)`` if the address cannot be bound, and
    /// ``PeerLinksError/alreadyStarted`` on a second call: a stopped `PeerLinks` is not restarted,
    /// make a new one.
    public func start() async throws {
        let contexts = try makeTLSContexts()
        try runtime.withLock { runtime in
            guard case .idle = runtime.phase else { throw PeerLinksError.alreadyStarted }
            runtime.phase = .started
        }
        let server: any Channel
        do {
            server = try await makeServerBootstrap(context: contexts.server)
                .bind(host: listenHost, port: listenPort).get()
        } catch {
            runtime.withLock { $0.phase = .stopped }
            _ = registry.stopAndTakeChannels()
            throw PeerLinksError.bindFailed(address: "\(listenHost):\(listenPort)", reason: "\(error)")
        }
        let port = server.localAddress?.port
        logger.info("listening for peer links on \(listenHost):\(port.map(String.init) ?? "?") as site \(identity.siteName) (\(identity.siteID))")
        let stoppedMeanwhile = runtime.withLock { runtime in
            // stop() may have run while the listener was being bound.
            guard case .started = runtime.phase else { return true }
            runtime.serverChannel = server
            runtime.boundPort = port
            runtime.dialers = peers.map { peer in
                Task { await self.dialLoop(peer, context: contexts.client) }
            }
            return false
        }
        if stoppedMeanwhile { try? await server.close() }
    }

    /// Closes the listener and every link (each with a `goodbye`), and waits for the dial loops.
    /// Afterwards no channel or task of this `PeerLinks` is left.
    public func stop() async {
        let (server, dialers) = runtime.withLock { runtime in
            runtime.phase = .stopped
            defer {
                runtime.serverChannel = nil
                runtime.dialers = []
                runtime.boundPort = nil
            }
            return (runtime.serverChannel, runtime.dialers)
        }
        let channels = registry.stopAndTakeChannels()
        for dialer in dialers { dialer.cancel() }
        if let server { try? await server.close() }
        let reason = "site \(identity.siteName) is stopping"
        for channel in channels { PeerConnectionHandler.sayGoodbyeAndClose(channel, reason: reason) }
        for channel in channels { try? await channel.closeFuture.get() }
        for dialer in dialers { await dialer.value }
        logger.info("peer links stopped")
    }

    /// Each configured peer's link state, sorted by peer name.
    public func status() -> [PeerLinkStatus] {
        registry.status()
    }

    // MARK: - The data plane

    /// The ID of `peer`'s current link, if it has one.
    public func currentLink(of peer: String) -> LinkID? {
        registry.currentLinkID(of: peer)
    }

    /// Writes `frames` on `link`, in order, and flushes once; returns false, sending nothing, when
    /// `link` is not (or no longer) `peer`'s current link.
    ///
    /// Callable from any thread, and never blocks: the frames join the link's outbound queue, which
    /// is written on its event loop (at once when called there; otherwise by one task for the
    /// batch). Frames of calls on one link go out in the order the calls were made, whichever
    /// threads made them. True means queued, not delivered: frames still queued or in flight when
    /// the link goes down are lost (protocol.md §6.1).
    ///
    /// Each frame must be of a type this site knows with flags it defines, and at most
    /// ``Frame/maxPayloadSize``: the caller's contract, checked in debug builds. A frame too large
    /// fails in the encoder and closes the link; one with unknown flags makes the peer close it.
    @discardableResult
    public func write(_ frames: [Frame], to peer: String, link: LinkID) -> Bool {
        assert(frames.allSatisfy { validity(of: $0) == nil }, "\(frames.compactMap { validity(of: $0) })")
        guard let established = registry.currentLink(link), established.peer == peer else { return false }
        return established.enqueue(frames, as: link)
    }

    /// The event loop of `link` while it is a current link: where its events and frames arrive.
    public func eventLoop(of link: LinkID) -> (any EventLoop)? {
        registry.currentLink(link)?.channel.eventLoop
    }

    /// Whether `link`'s channel takes more without queuing past its high-water mark; false when
    /// `link` is not a current link.
    public func isWritable(link: LinkID) -> Bool {
        registry.currentLink(link)?.channel.isWritable ?? false
    }

    /// Closes `link` with `goodbye(reason)` if it is still `peer`'s current link; false otherwise.
    /// Its ``onLinkDown`` follows, and the peer is redialed as after any lost link.
    @discardableResult
    public func close(peer: String, link: LinkID, reason: String) -> Bool {
        guard let established = registry.currentLink(link), established.peer == peer else { return false }
        logger.info("closing \(link) to \(peer): \(reason)", metadata: ["peer": "\(peer)"])
        // As a task on the link's loop, so that it goes after the drain of frames written before
        // it (``write(_:to:link:)`` drains in a task too): a `refuse` reaches the peer before goodbye.
        let channel = established.channel, goodbye = "\(identity.siteName) closed the link: \(reason)"
        channel.eventLoop.execute { PeerConnectionHandler.sayGoodbyeAndClose(channel, reason: goodbye) }
        return true
    }

    /// Sends a data-plane frame to a peer over its current link: ``write(_:to:link:)`` for one frame
    /// and whatever link is current. Returns once the frame is queued.
    ///
    /// Throws ``PeerLinksError/unknownPeer(_:)`` for a peer not configured,
    /// ``PeerLinksError/notConnected(_:)`` when there is no link, and the ``FrameError`` when the
    /// frame is too large or has flags its type does not define (checked here, so that the link
    /// is not closed over it).
    public func send(_ frame: Frame, to peer: String) async throws {
        guard registry.peers[peer] != nil else { throw PeerLinksError.unknownPeer(peer) }
        if let error = validity(of: frame) { throw error }
        guard let link = registry.currentLinkID(of: peer), write([frame], to: peer, link: link) else {
            throw PeerLinksError.notConnected(peer)
        }
    }

    /// Why `frame` must not be sent, or nil: too large, or a flag its type does not define (a peer
    /// of this version would close the link over it).
    private func validity(of frame: Frame) -> FrameError? {
        guard frame.payloadLength <= Frame.maxPayloadSize else {
            return FrameError.payloadTooLargeToSend(length: frame.payloadLength)
        }
        if let known = knownFrameFlags[frame.type], frame.flags & ~known != 0 {
            return FrameError.unknownFlags(frame.type, frame.flags)
        }
        return nil
    }
}
