import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// An NBD server (fixed newstyle, NOTLS) exporting the devices in an `NBDExportTable` on any
/// number of TCP and Unix-socket listeners.
public final class NBDServer: Sendable {
    public let exports: NBDExportTable
    private let group: any EventLoopGroup
    private let connectionLoop: (any EventLoop)?
    private let recordsMetrics: Bool
    private let logger: Logger

    private struct State {
        var listeners: [any Channel] = []
        var connections: [ObjectIdentifier: (channel: any Channel, handler: NIOLoopBound<NBDConnectionHandler>)] = [:]
        var nextID = 1
        var socketPaths: [String] = []
    }
    private let state = NIOLockedValueBox(State())

    /// - Parameter connectionLoop: if given, every client connection runs on this loop of `group`
    ///   (listeners stay on `group`); by default connections are spread over `group`.
    /// - Parameter recordsMetrics: record requests, bytes, latency and errors through swift-metrics
    ///   (`ferry_nbd_*`); off, a request records nothing.
    public init(exports: NBDExportTable, group: any EventLoopGroup, connectionLoop: (any EventLoop)? = nil,
                recordsMetrics: Bool = false, logger: Logger) {
        self.exports = exports
        self.recordsMetrics = recordsMetrics
        self.group = group
        self.connectionLoop = connectionLoop
        self.logger = logger
    }

    /// Listens on a TCP address; port 0 picks a free port. Returns the address bound.
    @discardableResult
    public func listen(host: String, port: Int) async throws -> SocketAddress {
        let channel = try await bootstrap().bind(host: host, port: port).get()
        state.withLockedValue { $0.listeners.append(channel) }
        logger.info("NBD listening", metadata: ["address": "\(channel.localAddress!)"])
        return channel.localAddress!
    }

    /// Listens on a Unix socket, replacing a stale socket file left by an earlier run.
    public func listen(unixSocket path: String) async throws {
        var st = stat()
        if lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
        let channel = try await bootstrap().bind(unixDomainSocketPath: path).get()
        state.withLockedValue {
            $0.listeners.append(channel)
            $0.socketPaths.append(path)
        }
        logger.info("NBD listening", metadata: ["socket": "\(path)"])
    }

    /// Number of open client connections (in any phase).
    public var connectionCount: Int { state.withLockedValue { $0.connections.count } }

    private func bootstrap() -> ServerBootstrap {
        ServerBootstrap(group: group, childGroup: connectionLoop ?? group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            // Large reads let a 1 MiB WRITE arrive in few reads; 16 messages per read bound latency.
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 20))
            .childChannelOption(.maxMessagesPerRead, value: 16)
            // Replies queue up to 2 MiB before a connection stops being parsed (backpressure):
            // room for a full QD32 burst of 4 KiB reads, not for a flood of 32 MiB ones.
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 512 * 1024, high: 2 * 1024 * 1024))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let id = state.withLockedValue { s -> Int in defer { s.nextID += 1 }; return s.nextID }
                    let handler = NBDConnectionHandler(exports: exports, logger: logger, connectionID: "nbd-\(id)",
                                                       recordsMetrics: recordsMetrics)
                    try channel.pipeline.syncOperations.addHandler(handler)
                    let key = ObjectIdentifier(channel)
                    state.withLockedValue {
                        $0.connections[key] = (channel, NIOLoopBound(handler, eventLoop: channel.eventLoop))
                    }
                    channel.closeFuture.whenComplete { [self] _ in
                        _ = state.withLockedValue { $0.connections.removeValue(forKey: key) }
                    }
                }
            }
    }

    /// Stops accepting, lets every connection answer the requests it has in flight (new ones get
    /// ESHUTDOWN), and waits for them to close, at most `timeout`; stragglers are closed.
    public func shutdown(timeout: Duration = .seconds(10)) async {
        let (listeners, connections, paths) = state.withLockedValue { s in
            (s.listeners, Array(s.connections.values), s.socketPaths)
        }
        for l in listeners { try? await l.close() }
        for path in paths { unlink(path) }
        for (channel, handler) in connections {
            channel.eventLoop.execute { handler.value.beginShutdown() }
        }
        let deadline = ContinuousClock.now + timeout
        while connectionCount > 0 && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        let left = state.withLockedValue { Array($0.connections.values) }
        for (channel, _) in left { try? await channel.close() }
        if !left.isEmpty {
            logger.warning("NBD connections closed at shutdown with requests in flight", metadata: ["count": "\(left.count)"])
        }
    }
}
