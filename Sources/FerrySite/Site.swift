import FerryCore
import FerryNBD
import FerryStore
import FerryTree
import FerryVolume
import FerryWire
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServiceLifecycle

/// One running site: identity, catalog, volumes, NBD exports, peer links and the admin API.
///
/// `run()` is a swift-service-lifecycle `Service`: it starts everything, waits for graceful
/// shutdown (SIGTERM/SIGINT through the `ServiceGroup`), then stops in the order that loses
/// nothing: stop taking NBD requests and answer those in flight, fdatasync every image, close peer
/// links, close the admin socket.
public final class Site: Service, Sendable {
    public let config: SiteConfig
    let logger: Logger
    let group: MultiThreadedEventLoopGroup
    let linkLoop: any EventLoop
    let threadPool: NIOThreadPool
    private let startedAt = Date()

    struct Volume: Sendable {
        var config: VolumeConfig
        var record: VolumeRecord?
        var image: VolumeImage?
        var primary: PrimaryVolumeRuntime?
        var replica: ReplicaVolumeRuntime?
        var isPrimary: Bool
        var isReplica: Bool
    }

    struct State: Sendable {
        var identity: SiteIdentity?
        var catalog: Catalog?
        var volumes: [Volume] = []
        var replicationAddress: String?
        var nbdAddresses: [String] = []
        var nbdURIBases: [String] = []
        var peers: PeerLinks?
        var engine: VolumeEngine?
        var trees: TreeEngine?
        /// The last line logged per volume and kind, to keep repeats out of the log.
        var lastErrors: [String: String] = [:]
        /// How each volume's last `on-promote` hook ended (or that it is running).
        var hookResults: [String: String] = [:]
        /// DR drills running, by volume.
        var drills: [String: DrillState] = [:]
        /// The metrics listener's URL, once it serves.
        var metricsURL: String?
    }
    let state = NIOLockedValueBox(State())
    let exports = NBDExportTable()
    /// How volume runtimes reach their peers (attached to the peer links at start).
    let volumeLinks = PeerVolumeLinks()
    private let nbd: NBDServer
    private let admin: AdminServer
    private let dataLock = NIOLockedValueBox<Int32>(-1)
    private let ownsGroup: Bool
    private let monitor: (any SiteMonitor)?
    /// A monitor is attached: NBD requests and volume acks are recorded through swift-metrics.
    var recordsMetrics: Bool { monitor != nil }

    /// - Parameter monitor: the metrics listener and status page, started once the site serves.
    /// - Parameter eventLoopGroup: the loops to run on; by default the site makes its own (one
    ///   per core) and shuts them down when it stops. An injected group is left running.
    public init(config: SiteConfig, logger: Logger, monitor: (any SiteMonitor)? = nil,
                eventLoopGroup: MultiThreadedEventLoopGroup? = nil) {
        self.config = config
        self.monitor = monitor
        self.logger = logger
        self.group = eventLoopGroup ?? MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        self.ownsGroup = eventLoopGroup == nil
        self.threadPool = NIOThreadPool(numberOfThreads: max(4, System.coreCount * 2))
        // Peer links live on one loop. On a machine of two cores or fewer the NBD connections
        // live there too: a sync write's frame and its ack then need no hop between threads,
        // each of which (an eventfd write and a wake-up) cost a tenth of a QD1 sync write there
        // (BENCHMARKS.md, sync). With more cores, connections spread over every loop.
        self.linkLoop = group.next()
        let loops = Array(group.makeIterator()).count
        self.nbd = NBDServer(exports: exports, group: group, connectionLoop: loops <= 2 ? linkLoop : nil,
                             recordsMetrics: monitor != nil, logger: logger)
        self.admin = AdminServer(group: group, logger: logger)
    }

    public func run() async throws {
        threadPool.start()
        do {
            try await start()
        } catch {
            await stop()
            throw error
        }
        logger.info("site running", metadata: ["site": "\(config.site.name)", "pid": "\(getpid())"])
        // systemd (Type=notify): ready only now, with NBD, peer, admin and metrics listeners up.
        SystemdNotify.send("READY=1\nSTATUS=serving \(config.site.name)\nMAINPID=\(getpid())")
        try? await gracefulShutdown()
        SystemdNotify.send("STOPPING=1\nSTATUS=stopping: finishing NBD requests, flushing images")
        logger.info("shutting down")
        await stop()
        logger.info("stopped cleanly")
    }

    private func start() async throws {
        let data = config.site.dataDirectory
        try lockDataDirectory(data)
        let identity: SiteIdentity
        do {
            identity = try SiteIdentity.load(from: data)
        } catch {
            throw SiteError("\(error)")
        }
        // Peers know this site by the name in its certificate: a config naming it otherwise would
        // have it take another site's role (its volumes' primary, its trees' replicas).
        guard identity.siteName == config.site.name else {
            throw SiteError("the data directory \(data) belongs to site \(identity.siteName) (made by `ferry init --site "
                            + "\(identity.siteName)`), but \(config.path) names this site \(config.site.name) (site.name); "
                            + "set site.name: \(identity.siteName), or point site.data at the data directory of \(config.site.name)")
        }
        state.withLockedValue { $0.identity = identity }
        logger.info("site identity", metadata: ["site": "\(identity.siteName)", "id": "\(identity.siteID)"])

        let catalog = try Catalog(path: data + "/catalog.sqlite")
        state.withLockedValue { $0.catalog = catalog }
        let links = volumeLinks
        let volumes = try openVolumes(catalog: catalog, links: links)
        let engine = makeEngine(volumes, links: links)
        let trees = try TreeEngine(config: config, catalog: catalog, logger: logger)
        state.withLockedValue {
            $0.volumes = volumes
            $0.engine = engine
            $0.trees = trees
        }

        var nbdAddresses: [String] = []
        var uriBases: [String] = []
        if let tcp = config.listen.nbd {
            let bound = try await nbd.listen(host: tcp.host, port: tcp.port)
            let port = bound.port ?? tcp.port
            let shown = HostPort(host: tcp.isWildcard ? "127.0.0.1" : tcp.host, port: port)
            nbdAddresses.append(HostPort(host: tcp.host, port: port).description)
            uriBases.append("nbd://\(shown)/")
        }
        if let path = config.listen.nbdSocket {
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try await nbd.listen(unixSocket: path)
            nbdAddresses.append(path)
            uriBases.append("nbd+unix:///?socket=\(path)")
        }
        state.withLockedValue {
            $0.nbdAddresses = nbdAddresses
            $0.nbdURIBases = uriBases
        }

        let peers = PeerLinks(
            identity: identity,
            listen: (host: config.listen.replication.host, port: config.listen.replication.port),
            peers: config.peers.map { PeerEndpoint(name: $0.name, host: $0.address.host, port: $0.address.port, siteID: $0.siteID) },
            group: group, linkLoop: linkLoop, logger: logger,
            dataFrameTypes: VolumeFrame.frameTypes.merging(TreeMessage.frameTypes) { a, _ in a })
        links.attach(peers)
        trees.attach(peers)
        connect(engine, trees: trees, to: peers)
        try trees.start()
        engine.start(on: group.next())
        watchLinks(engine, peers: peers, on: group.next())
        try await peers.start()
        let replicationPort = peers.boundPort ?? config.listen.replication.port
        state.withLockedValue {
            $0.peers = peers
            $0.replicationAddress = HostPort(host: config.listen.replication.host, port: replicationPort).description
        }

        try await admin.start(socketPath: config.listen.adminSocket, status: { [self] in status() },
                              action: { [self] path in adminAction(path) })
        if let monitor {
            let url = try await monitor.start(site: self)
            state.withLockedValue { $0.metricsURL = url }
            logger.info("metrics and status page", metadata: ["url": "\(url)"])
        }
    }

    private func stop() async {
        await monitor?.stop()
        await nbd.shutdown()
        let (volumes, engine, trees) = state.withLockedValue { ($0.volumes, $0.engine, $0.trees) }
        trees?.stop()
        if let peers = state.withLockedValue({ $0.peers }) { await peers.stop() }
        engine?.stop()
        for v in volumes {
            guard let image = v.image else { continue }
            do {
                try image.flush()
                markCleanShutdown(v.config.name)
            } catch {
                logger.error("flushing volume at shutdown failed", metadata: ["volume": "\(v.config.name)", "error": "\(error)"])
            }
        }
        await admin.stop(socketPath: config.listen.adminSocket)
        try? await threadPool.shutdownGracefully()
        if ownsGroup { try? await group.shutdownGracefully() }
        unlockDataDirectory()
    }

    /// The loops the site runs on, for listeners that plug in (the metrics listener).
    public var eventLoops: MultiThreadedEventLoopGroup { group }

    /// The site's status as the admin API serves it.
    public func status() -> SiteStatus {
        let s = state.withLockedValue { $0 }
        let site = SiteStatus.Site(
            name: config.site.name, siteID: s.identity?.siteID.description ?? "", pid: getpid(),
            startedAt: startedAt, configPath: config.path, dataDirectory: config.site.dataDirectory,
            replicationAddress: s.replicationAddress, nbdAddresses: s.nbdAddresses, adminSocket: config.listen.adminSocket,
            metrics: s.metricsURL)
        // A volume configured between other sites is not held here: no role, nothing to show
        // (a walk-through found one listed as a secondary that `promote` said this site lacked).
        let volumes = s.volumes.filter { $0.isPrimary || $0.isReplica }.map { volumeStatus($0, uriBases: s.nbdURIBases) }
        var status = SiteStatus(site: site, peers: s.peers?.status() ?? [], volumes: volumes)
        status.trees = treeStatuses(s.trees)
        return status
    }

    static func uri(base: String, export: String) -> String {
        if base.hasPrefix("nbd+unix:///") {
            return base.replacingOccurrences(of: "nbd+unix:///", with: "nbd+unix:///\(export)")
        }
        return base + export
    }

    /// One daemon per data directory: a second `ferry serve` on the same data would corrupt it.
    private func lockDataDirectory(_ data: String) throws {
        try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
        let fd = open(data + "/lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SiteError("cannot open \(data)/lock: \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw SiteError("another ferry daemon is using \(data) (it holds \(data)/lock); stop it first")
        }
        dataLock.withLockedValue { $0 = fd }
    }

    private func unlockDataDirectory() {
        dataLock.withLockedValue { fd in
            if fd >= 0 { close(fd); fd = -1 }
        }
    }
}
