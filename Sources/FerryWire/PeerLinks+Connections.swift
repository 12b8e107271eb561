import FerryCore
import Logging
import NIOCore
import NIOPosix
import NIOSSL

/// Setting up connections: TLS contexts, pipelines, and the per-peer dial loop.
extension PeerLinks {
    /// Server and client TLS contexts: TLS 1.3 only, our certificate, and verification handed
    /// entirely to the pinning callbacks (research/swift-platform.md §2).
    func makeTLSContexts() throws -> (server: NIOSSLContext, client: NIOSSLContext) {
        let material = try identity.tlsMaterial()
        var server = TLSConfiguration.makeServerConfiguration(
            certificateChain: [.certificate(material.certificate)], privateKey: .privateKey(material.key))
        var client = TLSConfiguration.makeClientConfiguration()
        client.certificateChain = [.certificate(material.certificate)]
        client.privateKey = .privateKey(material.key)
        Self.pin(&server)
        Self.pin(&client)
        return (try NIOSSLContext(configuration: server), try NIOSSLContext(configuration: client))
    }

    private static func pin(_ configuration: inout TLSConfiguration) {
        configuration.minimumTLSVersion = .tlsv13
        configuration.maximumTLSVersion = .tlsv13
        // Not `.none`: with `.none` the peer certificate is never requested and the custom
        // callback never runs. `.noHostnameVerification` requires a peer certificate and the
        // callback then replaces all chain building, so no CA is needed.
        configuration.certificateVerification = .noHostnameVerification
        configuration.trustRoots = .certificates([])
        // Do not let a peer that ignores close_notify hold up stop().
        configuration.shutdownTimeout = .seconds(1)
    }

    func makeServerBootstrap(context: NIOSSLContext) -> ServerBootstrap {
        let registry = self.registry
        let settings = connectionSettings
        return ServerBootstrap(group: group, childGroup: connectionGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard registry.register(channel) else { throw ChannelError.ioOnClosedChannel }
                    let handler = PeerConnectionHandler(
                        registry: registry, direction: .inbound, peer: nil,
                        remoteAddress: Self.describe(channel.remoteAddress),
                        heartbeat: settings.heartbeat, deadAfter: settings.deadAfter, outcome: nil)
                    let tls = NIOSSLServerHandler(context: context, customVerificationCallback: { chain, promise in
                        handler.verifyInbound(chain, promise)
                    })
                    try Self.addHandlers(tls: tls, handler: handler, to: channel, knownFlags: settings.knownFlags)
                }
            }
    }

    /// Dials `peer` whenever it has no link, until stopped: executes a ``DialSchedule``.
    func dialLoop(_ peer: PeerEndpoint, context: NIOSSLContext) async {
        let registry = self.registry
        var schedule = DialSchedule()
        var rng = SystemRandomNumberGenerator()
        while !Task.isCancelled, !registry.isStopped {
            let live = registry.liveLink(peer.name)
            switch schedule.next(currentLink: live?.id) {
            case .waitForLink(_, let pause):
                // Closed, but the registry has not heard yet: do not spin.
                if let pause { try? await Task.sleep(for: pause) }
                if let live { try? await live.channel.closeFuture.get() }
                schedule.linkClosed()
            case .dial:
                registry.dialStarted(peer.name)
                let cameUp = await dialOnce(peer, context: context)
                if Task.isCancelled || registry.isStopped { return }
                do {
                    try await Task.sleep(for: schedule.dialFinished(linkCameUp: cameUp, using: &rng))
                } catch {
                    return
                }
            }
        }
    }

    /// One dial: connect, TLS, hello; then waits while the link lasts. True if the link came up.
    private func dialOnce(_ peer: PeerEndpoint, context: NIOSSLContext) async -> Bool {
        let registry = self.registry
        let settings = connectionSettings
        let outcome = group.next().makePromise(of: Void.self)
        let bootstrap = ClientBootstrap(group: connectionGroup)
            .connectTimeout(.seconds(5))
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    guard registry.register(channel) else { throw ChannelError.ioOnClosedChannel }
                    let handler = PeerConnectionHandler(
                        registry: registry, direction: .outbound, peer: peer, remoteAddress: peer.address,
                        heartbeat: settings.heartbeat, deadAfter: settings.deadAfter, outcome: outcome)
                    let tls = try NIOSSLClientHandler(
                        context: context, serverHostname: nil,
                        customVerificationCallback: { chain, promise in handler.verifyOutbound(chain, promise) })
                    try Self.addHandlers(tls: tls, handler: handler, to: channel, knownFlags: settings.knownFlags)
                }
            }
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: peer.host, port: peer.port).get()
        } catch {
            let reason = "cannot connect to \(peer.name) at \(peer.address): \(Self.describeConnectError(error))"
            outcome.fail(LinkFailure(description: reason))
            registry.dialFinished(peer.name, error: reason)
            return false
        }
        do {
            try await outcome.futureResult.get()
        } catch {
            registry.dialFinished(peer.name, error: "\(error)")
            return false
        }
        registry.dialFinished(peer.name, error: nil)
        try? await channel.closeFuture.get()
        return true
    }

    private static func addHandlers(
        tls: NIOSSLHandler, handler: PeerConnectionHandler, to channel: any Channel, knownFlags: [FrameType: UInt16]
    ) throws {
        let pipeline = channel.pipeline.syncOperations
        try pipeline.addHandler(tls)
        try pipeline.addHandler(ByteToMessageHandler(FrameDecoder(knownFlags: knownFlags)))
        try pipeline.addHandler(FrameEncoder())
        try pipeline.addHandler(handler)
    }

    /// What a connection's handlers need to know, copied so the initializers do not capture `self`.
    struct ConnectionSettings: Sendable {
        var heartbeat: TimeAmount
        var deadAfter: TimeAmount
        var knownFlags: [FrameType: UInt16]
    }

    var connectionSettings: ConnectionSettings {
        ConnectionSettings(heartbeat: heartbeat, deadAfter: deadAfter, knownFlags: knownFrameFlags)
    }

    static func describe(_ address: SocketAddress?) -> String {
        guard let address else { return "unknown address" }
        guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
        return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }

    private static func describeConnectError(_ error: any Error) -> String {
        if let error = error as? NIOConnectionError {
            if let first = error.connectionErrors.first { return describeConnectError(first.error) }
            if let dns = error.dnsAError ?? error.dnsAAAAError { return "cannot resolve \(error.host): \(dns)" }
        }
        if let error = error as? IOError { return String(cString: strerror(error.errnoCode)).lowercased() }
        if case ChannelError.connectTimeout = error { return "timed out" }
        return "\(error)"
    }
}
