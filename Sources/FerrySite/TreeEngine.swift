import FerryStore
import FerryTree
import FerryWire
import Foundation
import Logging
import NIOConcurrencyHelpers

/// The site's trees (issue 11): a ``TreeSource`` for each tree this site is primary of, a
/// ``TreeReceiver`` for each it keeps a replica of; frames routed between them and the peer links.
///
/// Roles follow the configuration until a promotion: then the catalog's `role` and `epoch` of the
/// tree decide. A primary that hears a hello of a newer epoch (another site was promoted) becomes
/// a replica of it there and then, keeping aside what changed here after the last snapshot it sent
/// that site (P6).
final class TreeEngine: TreePort, @unchecked Sendable {
    enum Runtime {
        case source(TreeSource)
        case receiver(TreeReceiver)
    }

    private let runtimes = NIOLockedValueBox<[String: Runtime]>([:])
    private let links = NIOLockedValueBox<PeerLinks?>(nil)
    private let config: SiteConfig
    private let catalog: Catalog
    private let logger: Logger
    private let port = PortBox()
    /// Trees this site is turning from primary into replica (a second newer hello waits for it).
    private let demoting = NIOLockedValueBox<Set<String>>([])

    init(config: SiteConfig, catalog: Catalog, logger: Logger) throws {
        self.config = config
        self.catalog = catalog
        self.logger = logger
        port.engine = self
        let site = config.site.name
        var runtimes: [String: Runtime] = [:]
        for tree in config.trees {
            guard Self.directory(tree, on: site) != nil else { continue }
            let state = try catalog.treeState(tree.name)
            let epoch = state["epoch"].flatMap(UInt64.init) ?? 1
            let primary = state["role"].map { $0 == "primary" } ?? (tree.primary == site)
            runtimes[tree.name] = primary ? .source(makeSource(tree, epoch: epoch)) : .receiver(try makeReceiver(tree, epoch: epoch))
        }
        self.runtimes.withLockedValue { $0 = runtimes }
    }

    /// Where this site keeps the tree: the source on the configured primary, the target elsewhere.
    static func directory(_ tree: TreeConfig, on site: String) -> String? {
        tree.primary == site ? tree.source : tree.replicas[site]
    }

    private func makeSource(_ tree: TreeConfig, epoch: UInt64) -> TreeSource {
        let site = config.site.name
        let peers = Set([tree.primary] + tree.replicas.keys).subtracting([site]).sorted()
        let settings = TreeSource.Settings(
            name: tree.name, source: Self.directory(tree, on: site)!, peers: peers, continuous: tree.mode == .continuous,
            schedule: tree.schedule, exclude: tree.exclude, compress: tree.compression == .zstd,
            bytesPerSecond: tree.bandwidthLimit, epoch: epoch)
        return TreeSource(settings: settings, catalog: catalog, port: port, logger: logger)
    }

    private func makeReceiver(_ tree: TreeConfig, epoch: UInt64) throws -> TreeReceiver {
        let receiver = try TreeReceiver(name: tree.name, target: Self.directory(tree, on: config.site.name)!,
                                        directory: config.site.dataDirectory + "/trees/" + tree.name,
                                        retention: tree.keep, port: port, logger: logger)
        receiver.follow(epoch: epoch)
        let catalog = self.catalog, logger = self.logger
        receiver.onEpoch = { epoch, peer in
            do {
                try catalog.updateTree(tree.name, upsert: [], delete: [], state: ["epoch": "\(epoch)", "role": "replica"])
            } catch {
                logger.error("tree epoch not recorded", metadata: ["tree": "\(tree.name)", "error": "\(error)"])
            }
            logger.info("tree: following \(peer) at epoch \(epoch)", metadata: ["tree": "\(tree.name)"])
        }
        return receiver
    }

    var sources: [String: TreeSource] {
        runtimes.withLockedValue { $0.compactMapValues { if case .source(let s) = $0 { s } else { nil } } }
    }

    var receivers: [String: TreeReceiver] {
        runtimes.withLockedValue { $0.compactMapValues { if case .receiver(let r) = $0 { r } else { nil } } }
    }

    func attach(_ peers: PeerLinks) { links.withLockedValue { $0 = peers } }

    func start() throws {
        for source in sources.values { try source.start() }
    }

    func stop() {
        for source in sources.values { source.stop() }
    }

    // MARK: TreePort

    func send(_ frames: [Frame], to peer: String) -> Bool {
        guard let peers = links.withLockedValue({ $0 }), let link = peers.currentLink(of: peer) else { return false }
        return peers.write(frames, to: peer, link: link)
    }

    func isWritable(_ peer: String) -> Bool {
        guard let peers = links.withLockedValue({ $0 }), let link = peers.currentLink(of: peer) else { return true }
        return peers.isWritable(link: link)
    }

    func isConnected(_ peer: String) -> Bool {
        guard let peers = links.withLockedValue({ $0 }) else { return false }
        return peers.currentLink(of: peer) != nil
    }

    // MARK: links

    func received(_ frame: Frame, from peer: String) throws {
        let (tree, message) = try TreeMessage.decode(frame)
        let runtime = runtimes.withLockedValue { $0[tree] }
        switch message {
        case .hello(let request, _, _), .query(let request, _), .commit(let request, _, _):
            switch runtime {
            case .receiver(let receiver):
                receiver.received(message, from: peer)
            case .source(let source):
                let newer = epoch(of: message)
                if newer > source.settings.epoch, demoting.withLockedValue({ $0.insert(tree).inserted }) {
                    // Another site was promoted: become its replica, off the link's loop.
                    DispatchQueue.global().async { [self] in demote(tree, to: peer, epoch: newer, then: message) }
                } else {
                    if newer > source.settings.epoch { return }   // becoming a replica already
                    _ = send([TreeMessage.failed(request: request, message: "\(config.site.name) is the primary of tree \(tree) "
                                                 + "at epoch \(source.settings.epoch) too: promote one site and demote the other").frame(tree: tree)], to: peer)
                }
            case nil:
                _ = send([TreeMessage.failed(request: request, message: "site \(config.site.name) does not keep tree \"\(tree)\"; "
                                             + "add it under trees.\(tree).replicas there").frame(tree: tree)], to: peer)
            }
        case .put:
            if case .receiver(let receiver) = runtime { receiver.received(message, from: peer) }
        case .latest, .lacking, .committed, .failed:
            if case .source(let source) = runtime { source.deliver(message, from: peer) }
        }
    }

    private func epoch(of message: TreeMessage) -> UInt64 {
        if case .hello(_, let epoch, _) = message { return epoch }
        return 0
    }

    func linkUp(_ peer: String) { for s in sources.values { s.linkUp(peer) } }
    func linkDown(_ peer: String, reason: String) { for s in sources.values { s.linkDown(peer, reason: reason) } }
    func writable(_ peer: String) { for s in sources.values { s.writable(peer) } }

    // MARK: role changes

    struct Refused: Error, CustomStringConvertible {
        var description: String
    }

    /// Makes this site the tree's primary: its replica becomes the source, at a new epoch.
    func promote(_ name: String, force: Bool) throws -> String {
        guard let tree = config.tree(named: name) else { throw Refused(description: "no tree \(name)") }
        guard case .receiver(let receiver) = runtimes.withLockedValue({ $0[name] }) else {
            throw Refused(description: "site \(config.site.name) is already the primary of tree \(name)")
        }
        let status = receiver.status
        guard let snapshot = status.lastSnapshot else {
            throw Refused(description: "site \(config.site.name) has no snapshot of tree \(name) yet; there is nothing to promote")
        }
        let current = status.source ?? tree.primary
        if !force && isConnected(current) {
            throw Refused(description: "\(current), the primary of tree \(name), is reachable; promoting now would give the tree "
                          + "two primaries. Stop it (or cut it off) first, or give --force for a planned switch (\(current) then "
                          + "becomes a replica of this site and keeps aside what it changed since its last snapshot here)")
        }
        if try receiver.repository.awaitingFirstSnapshot() {
            throw Refused(description: "site \(config.site.name) was the primary of tree \(name) and has not yet received a snapshot "
                          + "from the site that replaced it; its directory holds its own files, not a snapshot. Wait for that "
                          + "snapshot, or promote the other site")
        }
        let epoch = status.epoch + 1
        let source = makeSource(tree, epoch: epoch)
        // From now on frames of the tree go to the new source (a late commit of the former
        // primary is refused); then what was already queued is finished, and a mirror cut short is
        // brought back to the last snapshot, before the source is started.
        runtimes.withLockedValue { $0[name] = .source(source) }
        do {
            try receiver.sync {
                if try receiver.repository.mirrorNeedsRepair() { try receiver.repository.repairMirror(receiver.target) }
            }
            try catalog.updateTree(name, upsert: [], delete: [], state: ["role": "primary", "epoch": "\(epoch)"])
        } catch {
            runtimes.withLockedValue { $0[name] = .receiver(receiver) }
            throw error
        }
        try source.start()
        logger.notice("tree promoted", metadata: ["tree": "\(name)", "epoch": "\(epoch)", "snapshot": "\(snapshot.id)"])
        return "site \(config.site.name) is now the primary of tree \(name) at epoch \(epoch): \(receiver.target) is the source, "
            + "as of snapshot \(snapshot.id) (\(ISO8601DateFormatter().string(from: snapshot.sourceTime))). When \(current) comes back "
            + "it becomes a replica and keeps aside what it changed after the last snapshot it sent here"
    }

    /// This site was the primary; `peer` was promoted at `epoch`: become its replica, keeping
    /// aside what changed here after the last snapshot sent to it.
    private func demote(_ name: String, to peer: String, epoch: UInt64, then message: TreeMessage) {
        defer { demoting.withLockedValue { _ = $0.remove(name) } }
        guard let tree = config.tree(named: name), case .source(let source) = runtimes.withLockedValue({ $0[name] }) else { return }
        source.stop()
        do {
            let state = try catalog.treeState(name)
            try catalog.updateTree(name, upsert: [], delete: [], state: ["role": "replica", "epoch": "\(epoch)"])
            let receiver = try makeReceiver(tree, epoch: epoch)
            receiver.repository.setSeed(try TreeRepository.Seed(root: receiver.target, cache: try FilesCache.load(name, from: catalog)))
            try receiver.repository.distrustMirror()
            try receiver.repository.keepAsideAfter(state["sent.\(peer)"].flatMap(Double.init) ?? 0)
            runtimes.withLockedValue { $0[name] = .receiver(receiver) }
            logger.warning("tree: \(peer) was promoted (epoch \(epoch)); this site is now its replica. Files changed here after the last snapshot sent to \(peer), if any, are kept aside in \(receiver.target).ferry-kept-aside/ when its first run arrives (a log line lists them)",
                           metadata: ["tree": "\(name)"])
            receiver.received(message, from: peer)
        } catch {
            logger.error("tree: becoming a replica failed", metadata: ["tree": "\(name)", "error": "\(error)"])
        }
    }

    /// Forwards to the engine (the runtimes are made before it is complete).
    final class PortBox: TreePort, @unchecked Sendable {
        weak var engine: TreeEngine?
        func send(_ frames: [Frame], to peer: String) -> Bool { engine?.send(frames, to: peer) ?? false }
        func isWritable(_ peer: String) -> Bool { engine?.isWritable(peer) ?? true }
        func isConnected(_ peer: String) -> Bool { engine?.isConnected(peer) ?? false }
    }
}
