import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// The admin API: HTTP/1.1 + JSON on a Unix socket, readable only by the site's user.
///
/// Routes: `GET /v1/status` → `SiteStatus`. The CLI is its only client today; every future
/// command (promote, resolve, …) becomes a route here, so the CLI never touches site files directly
/// while a daemon runs.
final class AdminServer: Sendable {
    private let group: any EventLoopGroup
    private let logger: Logger
    private let channel = NIOLockedValueBox<(any Channel)?>(nil)

    init(group: any EventLoopGroup, logger: Logger) {
        self.group = group
        self.logger = logger
    }

    func start(socketPath: String, status: @escaping @Sendable () -> SiteStatus,
               action: @escaping @Sendable (_ path: String) -> (code: Int, body: Data)) async throws {
        var st = stat()
        if lstat(socketPath, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw SiteError("admin socket \(socketPath) exists and is not a socket; move it aside or set listen.admin-socket")
            }
            if AdminClient.isAnswering(socketPath: socketPath) {
                throw SiteError("another ferry daemon is answering on \(socketPath); stop it first (`ferry status --config ...` shows it)")
            }
            unlink(socketPath)
        }
        let logger = self.logger
        let ch = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(AdminHTTPHandler(status: status, action: action, logger: logger))
                }
            }
            .bind(unixDomainSocketPath: socketPath).get()
        chmod(socketPath, 0o600)
        channel.withLockedValue { $0 = ch }
        logger.info("admin API listening", metadata: ["socket": "\(socketPath)"])
    }

    func stop(socketPath: String) async {
        if let ch = channel.withLockedValue({ $0 }) {
            try? await ch.close()
            unlink(socketPath)
        }
    }
}

private final class AdminHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let status: @Sendable () -> SiteStatus
    let action: @Sendable (String) -> (code: Int, body: Data)
    let logger: Logger
    var head: HTTPRequestHead?

    init(status: @escaping @Sendable () -> SiteStatus, action: @escaping @Sendable (String) -> (code: Int, body: Data), logger: Logger) {
        self.status = status
        self.action = action
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            respond(context: context, head: h)
        }
    }

    private func respond(context: ChannelHandlerContext, head: HTTPRequestHead) {
        switch (head.method, head.uri.split(separator: "?").first ?? "") {
        case (.GET, "/v1/status"):
            Self.send(context: context, version: head.version, code: .ok,
                 body: (try? SiteStatus.encoder().encode(status())) ?? Data("{}".utf8))
        case (.POST, _):
            // An action (promote, demote, …) writes the catalog, flushes images and may copy
            // blocks aside: off the event loop, which also carries NBD clients and peer links.
            // The whole URI goes to it: the query holds its options (`?force=1`).
            let uri = head.uri, action = self.action, loop = context.eventLoop
            let bound = NIOLoopBound(context, eventLoop: loop)
            DispatchQueue.global().async {
                let result = action(uri)
                loop.execute {
                    Self.send(context: bound.value, version: head.version,
                              code: HTTPResponseStatus(statusCode: result.code), body: result.body)
                }
            }
        default:
            Self.send(context: context, version: head.version, code: .notFound,
                 body: Data("{\"error\": \"no route \(head.method) \(head.uri); try GET /v1/status\"}".utf8))
        }
    }

    private static func send(context: ChannelHandlerContext, version: HTTPVersion, code: HTTPResponseStatus, body: Data) {
        var body = body
        body.append(0x0a)
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        context.write(NIOAny(HTTPServerResponsePart.head(HTTPResponseHead(version: version, status: code, headers: headers))), promise: nil)
        context.write(NIOAny(HTTPServerResponsePart.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        context.writeAndFlush(NIOAny(HTTPServerResponsePart.end(nil))).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("admin connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}
