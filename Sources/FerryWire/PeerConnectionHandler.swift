import FerryCore
import Logging
import NIOCore
import NIOSSL

/// Why a dialed connection did not become a link; carries a message for `status().lastError`.
struct LinkFailure: Error, CustomStringConvertible {
    var description: String
}

/// Runs one TLS connection to a peer: certificate pinning here, and the executor of the
/// connection's ``PeerConnectionMachine`` (hello exchange, heartbeats, dead-link detection,
/// `goodbye`, protocol errors), which decides everything else. Sits at the end of the pipeline,
/// after the TLS handler and frame codec.
///
/// Lives on its channel's event loop; everything shared goes through the `LinkRegistry`.
final class PeerConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private let registry: LinkRegistry
    private let heartbeat: TimeAmount
    /// Dialer only: succeeded when the link comes up, failed with the reason when it cannot.
    private let outcome: EventLoopPromise<Void>?

    private var machine: PeerConnectionMachine
    private var context: ChannelHandlerContext?
    private var tornDown = false
    private var tick: Scheduled<Void>?
    /// The first explanation of why this connection is going away, for the log and status.
    private var closeReason: String?
    /// Set once the hello exchange is done: the connection as the data plane sees it.
    private var link: EstablishedLink?

    init(
        registry: LinkRegistry, direction: LinkDirection, peer: PeerEndpoint?, remoteAddress: String,
        heartbeat: TimeAmount, deadAfter: TimeAmount, outcome: EventLoopPromise<Void>?
    ) {
        self.registry = registry
        self.heartbeat = heartbeat
        self.outcome = outcome
        let config = PeerConnectionMachine.Config(
            localName: registry.localName, localID: registry.localID, versions: LinkVersion.supported,
            direction: direction, heartbeat: .nanoseconds(heartbeat.nanoseconds),
            deadAfter: .nanoseconds(deadAfter.nanoseconds), remoteAddress: remoteAddress)
        self.machine = PeerConnectionMachine(config: config, peer: peer.map(Self.machinePeer))
    }

    private static func machinePeer(_ peer: PeerEndpoint) -> PeerConnectionMachine.Peer {
        PeerConnectionMachine.Peer(name: peer.name, siteID: peer.siteID)
    }

    private var peerName: String { machine.peerName }
    private var remoteAddress: String { machine.config.remoteAddress }
    private var direction: LinkDirection { machine.config.direction }

    // MARK: - Certificate pinning (called by NIOSSL on this channel's event loop)

    /// Dialer: accept only the dialed peer's pinned certificate.
    func verifyOutbound(_ chain: [NIOSSLCertificate], _ promise: EventLoopPromise<NIOSSLVerificationResult>) {
        guard let peer = machine.peer, let presented = Self.fingerprint(of: chain) else {
            refuse("refused peer link: \(remoteAddress) (peer \"\(peerName)\") presented no usable certificate", key: "none", promise)
            return
        }
        if LinkRegistry.constantTimeEqual(presented.bytes, peer.siteID.bytes) {
            promise.succeed(.certificateVerified)
            return
        }
        refuse(
            "refused peer link: \(remoteAddress) presented site ID \(presented) but peer \"\(peer.name)\" is pinned to "
                + "\(peer.siteID); if \(peer.name) was re-initialised, update peers.\(peer.name).site-id",
            key: "out/\(peer.name)/\(presented.hex)", promise)
    }

    /// Acceptor: accept any configured peer's pinned certificate, and learn which peer it is.
    func verifyInbound(_ chain: [NIOSSLCertificate], _ promise: EventLoopPromise<NIOSSLVerificationResult>) {
        guard let presented = Self.fingerprint(of: chain) else {
            refuse("refused peer link: \(remoteAddress) presented no usable certificate", key: "none", promise)
            return
        }
        if let known = registry.peer(withFingerprint: presented.bytes) {
            machine.identified(Self.machinePeer(known))
            promise.succeed(.certificateVerified)
            return
        }
        let configured = registry.peers.values.sorted { $0.name < $1.name }
            .map { "\($0.name) \($0.siteID.short)…" }.joined(separator: ", ")
        refuse(
            "refused peer link: \(remoteAddress) presented site ID \(presented), which no configured peer has "
                + "(configured: \(configured.isEmpty ? "none" : configured)); if that site is a new or re-initialised "
                + "peer, add or update its peers.NAME.site-id",
            key: "in/\(presented.hex)", promise)
    }

    private func refuse(_ line: String, key: String, _ promise: EventLoopPromise<NIOSSLVerificationResult>) {
        registry.logRefusal(line, key: key)
        closeReason = closeReason ?? line
        promise.succeed(.failed)
    }

    private static func fingerprint(of chain: [NIOSSLCertificate]) -> SiteID? {
        guard let leaf = chain.first, let der = try? leaf.toDERBytes() else { return nil }
        return SiteIdentity.fingerprint(ofDER: der)
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { activate(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        activate(context: context)
        context.fireChannelActive()
    }

    private func activate(context: ChannelHandlerContext) {
        let actions = machine.start(now: .now())
        guard !actions.isEmpty else { return }
        execute(actions, context: context)
        scheduleTick(context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if machine.isClosed { return }
        let frame = unwrapInboundIn(data)
        let now = Instant.now()
        guard FrameType.linkControl.contains(frame.type) else {
            execute(machine.receivedData(typeName: "\(frame.type)", now: now), context: context, frame: frame)
            return
        }
        let message: LinkMessage
        do {
            message = try LinkMessage(frame: frame)
        } catch {
            execute(machine.receivedMalformed("\(error)", now: now), context: context)
            return
        }
        if case .goodbye(let reason) = message, let peer = machine.peer {
            // debug: when this ends the peer's link, the state change is logged with the reason.
            registry.logger.debug("peer \(peer.name) closed a link: \(reason)", metadata: ["peer": "\(peer.name)"])
        }
        execute(machine.received(message.control, now: now), context: context)
    }

    /// Performs the machine's actions. `frame` is the data-plane frame being received, if any.
    /// A `goodbye`-and-close is a protocol error (logged at warning) unless `protocolError` is false
    /// (a close decided elsewhere, or a failure below the machine).
    private func execute(
        _ actions: [PeerConnectionMachine.Action], context: ChannelHandlerContext, frame: Frame? = nil,
        protocolError: Bool = true
    ) {
        for action in actions {
            switch action {
            case .send(let message):
                send(LinkMessage(message, siteName: registry.localName), context: context)
            case .becameLive(let version):
                becomeLive(version: version, context: context)
            case .heardFromPeer:
                heardFromPeer(context: context)
            case .rtt(let rtt):
                guard let peer = machine.peer else { break }
                registry.recordRTT(peer.name, channel: context.channel, milliseconds: rtt.milliseconds)
            case .ignoredPong(let nonce):
                registry.logger.debug(
                    "ignored a pong from \(peerName) with nonce \(nonce): no ping with that nonce is outstanding (never sent, answered already, or older than the last \(OutstandingPings.limit))",
                    metadata: ["peer": "\(peerName)"])
            case .deliver:
                // protocol.md §6.1: only while the connection is the peer's current link.
                guard let frame, let link else { break }
                if !link.deliver(frame) {
                    // A data frame on a link this site holds in doubt (§4.8) says the peer uses
                    // it, as a heartbeat would: settle the duplicate now, so that the link becomes
                    // current and the frame is delivered (held until its up), not lost unnoticed
                    // by a peer that already sends on it.
                    heardFromPeer(context: context)
                    if link.deliver(frame) { break }
                    registry.logger.debug(
                        "dropped \(frame.type) frame from \(peerName) on \(link.id): not the current link, or no frame handler is set")
                }
            case .close(let reason):
                closeReason = closeReason ?? reason
                context.close(promise: nil)
            case .sendGoodbyeAndClose(let reason):
                if protocolError {
                    registry.logger.warning("closing link to \(peerName): \(reason)", metadata: ["peer": "\(peerName)"])
                }
                closeReason = closeReason ?? reason
                Self.sayGoodbyeAndClose(context.channel, reason: reason)
            }
        }
    }

    /// The peer sent a heartbeat on this link, so it still holds it; the registry may now close a
    /// duplicate it was keeping while this link was in doubt (protocol.md §4.8).
    private func heardFromPeer(context: ChannelHandlerContext) {
        guard let peer = machine.peer else { return }
        closeLinks(registry.heardFrom(peer.name, channel: context.channel), context: context)
        link?.fireEvents()
    }

    /// Says goodbye on and closes each of `links`, this connection included if it is one of them.
    private func closeLinks(_ links: [LinkRegistry.LinkToClose], context: ChannelHandlerContext) {
        let ownID = ObjectIdentifier(context.channel)
        for link in links {
            if ObjectIdentifier(link.channel) == ownID {
                closeReason = link.reason
                execute(machine.closeRequested(reason: link.reason), context: context, protocolError: false)
            } else {
                Self.sayGoodbyeAndClose(link.channel, reason: link.reason)
            }
        }
    }

    private func becomeLive(version: UInt16, context: ChannelHandlerContext) {
        guard let peer = machine.peer else { return }
        let link = registry.makeLink(peer: peer.name, channel: context.channel, direction: direction)
        self.link = link
        registry.logger.debug(
            "link to \(peer.name) up (\(direction.rawValue), \(link.id), protocol version \(version))",
            metadata: ["peer": "\(peer.name)"])
        closeLinks(registry.linkUp(peer.name, link: link), context: context)
        // Before anything the peer sends next is read: its link-up comes first.
        link.fireEvents()
        // After linkUp: the dial loop, woken by this, must find the link registered.
        outcome?.succeed(())
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if closeReason == nil { closeReason = describe(error) }
        registry.logger.debug("link to \(peerName) failed: \(error)", metadata: ["peer": "\(peerName)"])
        execute(machine.failed("\(error)", isFrameError: error is FrameError), context: context, protocolError: false)
    }

    func channelInactive(context: ChannelHandlerContext) {
        tearDown(context: context)
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        link?.writabilityChanged()
        context.fireChannelWritabilityChanged()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        tearDown(context: context)
        self.context = nil
    }

    private func tearDown(context: ChannelHandlerContext) {
        guard !tornDown else { return }
        tornDown = true
        machine.closed()
        tick?.cancel()
        tick = nil
        let reason = closeReason
            ?? (registry.isStopped ? "site \(registry.localName) stopped"
                : machine.wasLive ? "link closed by \(peerName)" : "\(peerName) closed the connection during the handshake")
        registry.channelClosed(context.channel, peer: machine.peer?.name, error: reason)
        link?.fireEvents()
        outcome?.fail(LinkFailure(description: reason))
    }

    // MARK: - Heartbeats

    private func scheduleTick(context: ChannelHandlerContext) {
        tick = context.eventLoop.assumeIsolated().scheduleTask(in: heartbeat) { [self] in
            onTick()
        }
    }

    private func onTick() {
        guard let context, !machine.isClosed else { return }
        execute(machine.tick(now: .now()), context: context)
        if !machine.isClosed { scheduleTick(context: context) }
    }

    // MARK: - Sending and closing

    private func send(_ message: LinkMessage, context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(message.frame(allocator: context.channel.allocator)), promise: nil)
    }

    /// Sends `goodbye` on another link (any event loop) and closes it.
    static func sayGoodbyeAndClose(_ channel: any Channel, reason: String) {
        let goodbye = LinkMessage.goodbye(reason: reason).frame(allocator: channel.allocator)
        channel.writeAndFlush(goodbye).whenComplete { _ in channel.close(promise: nil) }
    }

    // MARK: - Error text

    /// An error from the pipeline as a line a person can act on.
    private func describe(_ error: any Error) -> String {
        let text = String(describing: error)
        switch error {
        case let error as FrameError:
            return "protocol error on the link to \(peerName): \(error)"
        case is NIOSSLError, is BoringSSLError:
            if text.contains("ALERT"), text.contains("CERTIFICATE") || text.contains("UNKNOWN_CA") {
                return "\(peerName) refused this site's certificate: it does not pin site ID \(registry.localID) "
                    + "for this site; on \(peerName), check that this site is configured as a peer with that site-id"
            }
            return "TLS with \(peerName) failed: \(text)"
        default:
            return "link to \(peerName) failed: \(text)"
        }
    }
}
