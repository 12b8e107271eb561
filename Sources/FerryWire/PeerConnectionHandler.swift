import FerryCore
import Logging
import NIOCore
import NIOSSL

/// Why a dialed connection did not become a link; carries a message for `status().lastError`.
struct LinkFailure: Error, CustomStringConvertible {
    var description: String
}

/// Runs one TLS connection to a peer: certificate pinning, the hello exchange, heartbeats and
/// dead-link detection. Sits at the end of the pipeline, after the TLS handler and frame codec.
///
/// Lives on its channel's event loop; everything shared goes through the `LinkRegistry`.
final class PeerConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private enum Phase {
        /// TLS and our `hello` sent; waiting for the peer's `hello`.
        case awaitingHello
        /// Dialer only: got the acceptor's `hello`, waiting for `helloAck` with this version.
        case awaitingAck(UInt16)
        case live
        /// Closing or closed: nothing more that arrives is acted on.
        case closed
    }

    private let registry: LinkRegistry
    private let direction: LinkDirection
    /// The remote `host:port`, for log lines before the peer is known.
    private let remoteAddress: String
    private let heartbeat: TimeAmount
    private let deadAfter: TimeAmount
    /// Dialer only: succeeded when the link comes up, failed with the reason when it cannot.
    private let outcome: EventLoopPromise<Void>?

    /// The peer: known from the start when dialing; set by certificate verification when accepting.
    private var peer: PeerEndpoint?
    private var phase = Phase.awaitingHello
    private var context: ChannelHandlerContext?
    private var activated = false
    private var everLive = false
    private var tornDown = false
    private var lastReceived = NIODeadline.now()
    private var tick: Scheduled<Void>?
    private var nextNonce: UInt64 = 1
    private var pings = OutstandingPings()
    /// The first explanation of why this connection is going away, for the log and status.
    private var closeReason: String?
    /// Set once the hello exchange is done: the connection as the data plane sees it.
    private var link: EstablishedLink?

    init(
        registry: LinkRegistry, direction: LinkDirection, peer: PeerEndpoint?, remoteAddress: String,
        heartbeat: TimeAmount, deadAfter: TimeAmount, outcome: EventLoopPromise<Void>?
    ) {
        self.registry = registry
        self.direction = direction
        self.peer = peer
        self.remoteAddress = remoteAddress
        self.heartbeat = heartbeat
        self.deadAfter = deadAfter
        self.outcome = outcome
    }

    private var peerName: String { peer?.name ?? remoteAddress }

    // MARK: - Certificate pinning (called by NIOSSL on this channel's event loop)

    /// Dialer: accept only the dialed peer's pinned certificate.
    func verifyOutbound(_ chain: [NIOSSLCertificate], _ promise: EventLoopPromise<NIOSSLVerificationResult>) {
        guard let peer, let presented = Self.fingerprint(of: chain) else {
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
            peer = known
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
        guard !activated else { return }
        activated = true
        lastReceived = .now()
        // proto: each side sends hello as soon as TLS is up. NIOSSL holds the write until the
        // handshake is done, so it can be queued now.
        let hello = LinkMessage.Hello(
            versions: LinkVersion.supported, siteName: registry.localName, siteID: registry.localID)
        send(.hello(hello), context: context)
        scheduleTick(context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .closed = phase { return }
        let frame = unwrapInboundIn(data)
        lastReceived = .now()
        guard let peer else {
            // Unreachable: NIOSSL delivers no data before verification named the peer.
            failProtocol("frame before the peer was identified", context: context)
            return
        }
        guard FrameType.linkControl.contains(frame.type) else {
            guard case .live = phase, let link else {
                failProtocol("\(frame.type) frame before the hello exchange finished", context: context)
                return
            }
            // protocol.md §6.1: only while the connection is the peer's current link.
            if !link.deliver(frame) {
                registry.logger.debug(
                    "dropped \(frame.type) frame from \(peer.name) on \(link.id): not the current link, or no frame handler is set")
            }
            return
        }
        let message: LinkMessage
        do {
            message = try LinkMessage(frame: frame)
        } catch {
            failProtocol("\(error)", context: context)
            return
        }
        handle(message, from: peer, context: context)
    }

    private func handle(_ message: LinkMessage, from peer: PeerEndpoint, context: ChannelHandlerContext) {
        switch (message, phase) {
        case (.goodbye(let reason), _):
            // debug: when this ends the peer's link, the state change is logged with the reason.
            registry.logger.debug("peer \(peer.name) closed a link: \(reason)", metadata: ["peer": "\(peer.name)"])
            closeReason = closeReason ?? "\(peer.name) said goodbye: \(reason)"
            phase = .closed
            context.close(promise: nil)
        case (.hello(let hello), .awaitingHello):
            guard hello.siteID == peer.siteID else {
                failProtocol("hello names site ID \(hello.siteID), but the certificate is \(peer.siteID)", context: context)
                return
            }
            guard let version = LinkVersion.negotiate(LinkVersion.supported, hello.versions) else {
                failProtocol(
                    "no common link protocol version: \(registry.localName) speaks "
                        + "\(LinkVersion.supported.lowerBound)...\(LinkVersion.supported.upperBound), "
                        + "\(peer.name) speaks \(hello.versions.lowerBound)...\(hello.versions.upperBound); "
                        + "upgrade the older site",
                    context: context)
                return
            }
            switch direction {
            case .inbound:
                // proto: the acceptor picks the version.
                send(.helloAck(version: version), context: context)
                becomeLive(version: version, context: context)
            case .outbound:
                phase = .awaitingAck(version)
            }
        case (.helloAck(let version), .awaitingAck(let expected)):
            guard version == expected else {
                failProtocol("helloAck chose version \(version), expected \(expected)", context: context)
                return
            }
            becomeLive(version: version, context: context)
        case (.ping(let nonce, let sentAt), .live):
            send(.pong(nonce: nonce, sentAt: sentAt), context: context)
            heardFromPeer(peer, context: context)
        case (.pong(let nonce, _), .live):
            // proto: RTT from our own send time of the ping this answers; the echoed sentAt is
            // not trusted, and a pong that answers no outstanding ping is ignored.
            guard let rtt = pings.answered(nonce: nonce, at: .now()) else {
                registry.logger.debug(
                    "ignored a pong from \(peer.name) with nonce \(nonce): no ping with that nonce is outstanding (never sent, answered already, or older than the last \(OutstandingPings.limit))",
                    metadata: ["peer": "\(peer.name)"])
                return
            }
            registry.recordRTT(peer.name, channel: context.channel, milliseconds: Double(rtt.nanoseconds) / 1_000_000)
            heardFromPeer(peer, context: context)
        default:
            failProtocol("unexpected \(message.frameTypeName) frame at this point of the link", context: context)
        }
    }

    /// The peer sent a heartbeat on this link, so it still holds it; the registry may now close a
    /// duplicate it was keeping while this link was in doubt (protocol.md §4.8).
    private func heardFromPeer(_ peer: PeerEndpoint, context: ChannelHandlerContext) {
        closeLinks(registry.heardFrom(peer.name, channel: context.channel), context: context)
        link?.fireEvents()
    }

    /// Says goodbye on and closes each of `links`, this connection included if it is one of them.
    private func closeLinks(_ links: [LinkRegistry.LinkToClose], context: ChannelHandlerContext) {
        let ownID = ObjectIdentifier(context.channel)
        for link in links {
            if ObjectIdentifier(link.channel) == ownID {
                closeReason = link.reason
                sayGoodbyeAndClose(link.reason, context: context)
            } else {
                Self.sayGoodbyeAndClose(link.channel, reason: link.reason)
            }
        }
    }

    private func becomeLive(version: UInt16, context: ChannelHandlerContext) {
        guard let peer else { return }
        phase = .live
        everLive = true
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
        if error is FrameError, case .live = phase {
            // TLS is intact, only a frame was bad: tell the peer why (an unknown required type
            // usually means one site runs a newer Ferry), so its operator sees it too.
            sayGoodbyeAndClose("\(registry.localName) closed the link: \(error)", context: context)
            return
        }
        phase = .closed
        context.close(promise: nil)
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
        phase = .closed
        tick?.cancel()
        tick = nil
        let reason = closeReason
            ?? (registry.isStopped ? "site \(registry.localName) stopped"
                : everLive ? "link closed by \(peerName)" : "\(peerName) closed the connection during the handshake")
        registry.channelClosed(context.channel, peer: peer?.name, error: reason)
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
        guard let context else { return }
        if case .closed = phase { return }
        let silent = NIODeadline.now() - lastReceived
        if silent >= deadAfter {
            // proto: no frame at all for dead-after → close and reconnect.
            closeReason = closeReason ?? "no frame from \(peerName) for \(Self.seconds(silent)); closed the link as dead"
            phase = .closed
            context.close(promise: nil)
            return
        }
        if case .live = phase {
            let nonce = nextNonce
            nextNonce &+= 1
            let now = NIODeadline.now()
            pings.sent(nonce: nonce, at: now)
            send(.ping(nonce: nonce, sentAt: now.uptimeNanoseconds), context: context)
        }
        scheduleTick(context: context)
    }

    private static func seconds(_ amount: TimeAmount) -> String {
        let tenths = amount.nanoseconds / 100_000_000
        return "\(tenths / 10).\(tenths % 10) s"
    }

    // MARK: - Sending and closing

    private func send(_ message: LinkMessage, context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(message.frame(allocator: context.channel.allocator)), promise: nil)
    }

    private func failProtocol(_ reason: String, context: ChannelHandlerContext) {
        registry.logger.warning("closing link to \(peerName): \(reason)", metadata: ["peer": "\(peerName)"])
        closeReason = closeReason ?? reason
        sayGoodbyeAndClose(reason, context: context)
    }

    private func sayGoodbyeAndClose(_ reason: String, context: ChannelHandlerContext) {
        phase = .closed
        Self.sayGoodbyeAndClose(context.channel, reason: reason)
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

extension LinkMessage {
    var frameTypeName: String {
        switch self {
        case .hello: return "hello"
        case .helloAck: return "helloAck"
        case .ping: return "ping"
        case .pong: return "pong"
        case .goodbye: return "goodbye"
        }
    }
}
