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
        var code: HTTPResponseStatus = .ok
        var body: Data
        switch (head.method, head.uri.split(separator: "?").first ?? "") {
        case (.GET, "/v1/status"):
            body = (try? SiteStatus.encoder().encode(status())) ?? Data("{}".utf8)
        case (.POST, let path):
            let result = action(String(path))
            code = HTTPResponseStatus(statusCode: result.code)
            body = result.body
        default:
            code = .notFound
            body = Data("{\"error\": \"no route \(head.method) \(head.uri); try GET /v1/status\"}".utf8)
        }
        body.append(0x0a)
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: code, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("admin connection error", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }
}
