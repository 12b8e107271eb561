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
/// ## Frames for the layer above
/// `PeerLinks` handles the link-control frames (``FrameType/linkControl``) itself. Frames of the
/// types passed as `dataFrameTypes` are handed to ``onFrame``, in order for each link, once the
/// link is up; a frame of an optional type that is in neither set is dropped, and one of a
/// non-optional type in neither set closes the link (``FrameError/unknownType(_:)``). So does a
/// frame with a flag bit its type does not define (``FrameError/unknownFlags(_:_:)``): none for
/// link control, the mask given in `dataFrameTypes` for the others. Send with ``send(_:to:)``.
public final class PeerLinks: Sendable {
    /// This site's identity, presented to every peer.
    public let identity: SiteIdentity
    /// The configured peers.
    public let peers: [PeerEndpoint]

    private let listenHost: String
    private let listenPort: Int
    let group: any EventLoopGroup
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
    ///   - heartbeatInterval: how often to ping each linked peer.
    ///   - deadAfter: how long a link may stay silent (no frame at all) before it is closed.
    ///   - dataFrameTypes: frame types delivered to ``onFrame``, each with the mask of the flag bits
    ///     it defines (`[type: 0]` for a type without flags); must not include link-control types.
    public init(
        identity: SiteIdentity,
        listen: (host: String, port: Int),
        peers: [PeerEndpoint],
        group: any EventLoopGroup,
        logger: Logger,
        heartbeatInterval: Duration = .seconds(1),
        deadAfter: Duration = .seconds(5),
        dataFrameTypes: [FrameType: UInt16] = [:]
    ) {
        precondition(FrameType.linkControl.isDisjoint(with: dataFrameTypes.keys),
                     "dataFrameTypes must not include link-control frame types")
        self.identity = identity
        self.peers = peers
        self.listenHost = listen.host
        self.listenPort = listen.port
        self.group = group
        self.logger = logger
        self.heartbeat = .nanoseconds(max(1_000_000, heartbeatInterval.nanoseconds))
        self.deadAfter = .nanoseconds(max(1_000_000, deadAfter.nanoseconds))
        self.knownFrameFlags = dataFrameTypes.merging(FrameType.linkControl.map { ($0, 0) }) { data, _ in data }
        self.registry = LinkRegistry(identity: identity, peers: peers, logger: logger)
    }

    /// The port the listener is bound to, once ``start()`` returned; nil before and after.
    public var boundPort: Int? { runtime.withLock { $0.boundPort } }

    /// Called with every frame of a `dataFrameTypes` type that arrives on an established link.
    ///
    /// Runs on the link's event loop, in arrival order for that link: it must not block. Hop to
    /// your own task or executor for anything slow. Set it before ``start()`` so no frame is
    /// missed; frames that arrive while it is nil are dropped (logged at debug).
    public var onFrame: (@Sendable (PeerFrame) -> Void)? {
        get { registry.frameHandler }
        set { registry.frameHandler = newValue }
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

    /// Sends a data-plane frame to a peer over its current link.
    ///
    /// Throws ``PeerLinksError/notConnected(_:)`` when there is no link, and the channel's error
    /// if the write fails (the link is then closing).
    public func send(_ frame: Frame, to peer: String) async throws {
        guard registry.peers[peer] != nil else { throw PeerLinksError.unknownPeer(peer) }
        // Checked here, not only in the encoder: an encoder error would close a healthy link.
        guard frame.payload.readableBytes <= Frame.maxPayloadSize else {
            throw FrameError.payloadTooLargeToSend(length: frame.payload.readableBytes)
        }
        // Likewise: a peer of this version would close the link on a flag this site does not know.
        if let known = knownFrameFlags[frame.type], frame.flags & ~known != 0 {
            throw FrameError.unknownFlags(frame.type, frame.flags)
        }
        guard let channel = registry.liveChannel(peer) else { throw PeerLinksError.notConnected(peer) }
        try await channel.writeAndFlush(frame).get()
    }
}
