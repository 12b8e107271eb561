import FerrySite
import Foundation
import Hummingbird
import Logging
import NIOConcurrencyHelpers
import NIOCore
import Prometheus
import ServiceLifecycle

/// The metrics listener (`listen.metrics`): `/metrics` for Prometheus, `/` the status page,
/// `/fragment` its live part, `/status.json` the sampled status. Read-only: GET only, nothing
/// here changes the site. With `listen.metrics-token-file` every request needs
/// `Authorization: Bearer TOKEN` (or `?token=TOKEN`, for a browser); anything else gets 401 and
/// a log line.
public final class MonitorServer: SiteMonitor {
    let logger: Logger
    let sampler: StatusSampler
    private let address: (host: String, port: Int)
    private let tokenFile: String?
    private struct Running {
        var group: ServiceGroup?
        var task: Task<Void, any Error>?
        var sampling: Task<Void, Never>?
    }
    private let running = NIOLockedValueBox(Running())

    public init(config: SiteConfig, logger: Logger) {
        let listen = config.listen.metrics!
        self.address = (listen.host, listen.port)
        self.tokenFile = config.listen.metricsTokenFile
        self.logger = logger
        self.sampler = StatusSampler(registry: MetricsBackend.registry, config: config)
    }

    public func start(site: Site) async throws -> String {
        let token = try tokenFile.map(Self.readToken)
        sampler.sample(site.status())
        let router = Router(context: MonitorRequestContext.self)
        let auth = BearerCheck(token: token, logger: logger)
        let sampler = self.sampler
        let registry = sampler.registry
        // Every path answers GET only, and only with the token when one is configured.
        func serve(_ path: String, type: String, _ body: @escaping @Sendable () -> String) {
            router.get(RouterPath(path)) { request, context in
                if let refused = auth.refusal(request, context) { return refused }
                return Self.response(body(), type: type)
            }
        }
        let html = "text/html; charset=utf-8"
        serve("/metrics", type: "text/plain; version=0.0.4; charset=utf-8") { registry.emitToString() }
        serve("/", type: html) { StatusPage.page(sampler.latest, history: sampler.history, now: Date()) }
        serve("/fragment", type: html) { StatusPage.fragment(sampler.latest, history: sampler.history, now: Date()) }
        serve("/status.json", type: "application/json") {
            String(decoding: (try? SiteStatus.encoder().encode(sampler.latest)) ?? Data("null".utf8), as: UTF8.self)
        }

        let bound = NIOLockedValueBox<CheckedContinuation<Int, any Error>?>(nil)
        var quiet = logger
        quiet.logLevel = .warning
        let app = Application(
            router: router,
            configuration: .init(address: .hostname(address.host, port: address.port), serverName: "ferry"),
            onServerRunning: { channel in
                let port = channel.localAddress?.port ?? 0
                bound.withLockedValue { $0?.resume(returning: port); $0 = nil }
            },
            eventLoopGroupProvider: .shared(site.eventLoops),
            logger: quiet)
        let group = ServiceGroup(configuration: .init(services: [app], gracefulShutdownSignals: [], logger: quiet))
        let port: Int = try await withCheckedThrowingContinuation { continuation in
            bound.withLockedValue { $0 = continuation }
            let task = Task {
                do {
                    try await group.run()
                    bound.withLockedValue {
                        $0?.resume(throwing: SiteError("the metrics listener on \(self.shown(self.address.port)) stopped before it served"))
                        $0 = nil
                    }
                } catch {
                    bound.withLockedValue {
                        $0?.resume(throwing: SiteError("cannot serve metrics on listen.metrics \(self.shown(self.address.port)): \(error); "
                                                        + "check that no other process uses the port"))
                        $0 = nil
                    }
                    throw error
                }
            }
            running.withLockedValue { $0.group = group; $0.task = task }
        }
        let sampling = Task { [sampler] in
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                if Task.isCancelled { break }
                sampler.sample(site.status())
            }
        }
        running.withLockedValue { $0.sampling = sampling }
        return "http://\(shown(port))/"
    }

    public func stop() async {
        let r = running.withLockedValue { r -> Running in defer { r = Running() }; return r }
        r.sampling?.cancel()
        await r.group?.triggerGracefulShutdown()
        _ = try? await r.task?.value
    }

    private func shown(_ port: Int) -> String {
        let host = address.host == "0.0.0.0" ? "127.0.0.1" : address.host == "::" ? "::1" : address.host
        return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    static func readToken(_ path: String) throws -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SiteError("cannot read listen.metrics-token-file \(path); create it with `openssl rand -hex 32 > \(path)` "
                            + "and make it readable by the daemon only")
        }
        let token = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard token.utf8.count >= 16 else {
            throw SiteError("listen.metrics-token-file \(path) holds \(token.utf8.count) characters; a token needs at least 16 "
                            + "(`openssl rand -hex 32 > \(path)`)")
        }
        return token
    }

    static func response(_ text: String, type: String) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = type
        headers[.cacheControl] = "no-store"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
    }
}

/// The request context: Hummingbird's basic one, plus the client's address for the log line of
/// a refused request.
struct MonitorRequestContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let remoteAddress: SocketAddress?

    init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.remoteAddress = source.channel.remoteAddress
    }
}

/// The bearer-token check: the token compared in constant time.
struct BearerCheck: Sendable {
    let token: String?
    let logger: Logger

    func refusal(_ request: Request, _ context: MonitorRequestContext) -> Response? {
        guard let token else { return nil }
        var given: String?
        if let header = request.headers[.authorization], header.lowercased().hasPrefix("bearer ") {
            given = String(header.dropFirst("bearer ".count)).trimmingCharacters(in: .whitespaces)
        } else if let query = request.uri.queryParameters.get("token") {
            given = query
        }
        if let given, Self.equal(given, token) { return nil }
        logger.warning("metrics listener refused a request without a valid bearer token", metadata: [
            "path": "\(request.uri.path)", "client": "\(context.remoteAddress?.description ?? "unknown")",
            "why": "\(given == nil ? "no token" : "wrong token")",
        ])
        var headers = HTTPFields()
        headers[.wwwAuthenticate] = "Bearer realm=\"ferry\""
        headers[.contentType] = "text/plain; charset=utf-8"
        return Response(status: .unauthorized, headers: headers,
                        body: .init(byteBuffer: ByteBuffer(string: "401: this listener needs Authorization: Bearer TOKEN "
                                                           + "(the token in listen.metrics-token-file)\n")))
    }

    /// Constant time in the contents: every byte of the longer is looked at, whatever differs.
    static func equal(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        var diff = UInt8(x.count == y.count ? 0 : 1)
        for i in 0..<max(x.count, y.count) {
            diff |= (i < x.count ? x[i] : 0) ^ (i < y.count ? y[i] : 0)
        }
        return diff == 0
    }
}
