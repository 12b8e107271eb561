import FerryStore
import FerryTree
import FerryWire
import Foundation
import Logging
import NIOConcurrencyHelpers

/// The site's trees (issue 11): a ``TreeSource`` for each tree this site is primary of, a
/// ``TreeReceiver`` for each it keeps a replica of; frames routed between them and the peer links.
final class TreeEngine: TreePort, @unchecked Sendable {
    let sources: [String: TreeSource]
    let receivers: [String: TreeReceiver]
    private let links = NIOLockedValueBox<PeerLinks?>(nil)
    private let logger: Logger

    init(config: SiteConfig, catalog: Catalog, logger: Logger) throws {
        self.logger = logger
        var sources: [String: TreeSource] = [:]
        var receivers: [String: TreeReceiver] = [:]
        let site = config.site.name
        // Late-bound: the engine is the port its runtimes send through.
        let port = PortBox()
        for tree in config.trees {
            if tree.primary == site {
                let settings = TreeSource.Settings(
                    name: tree.name, source: tree.source, peers: tree.replicas.keys.sorted(), continuous: tree.mode == .continuous,
                    schedule: tree.schedule, exclude: tree.exclude, compress: tree.compression == .zstd,
                    bytesPerSecond: tree.bandwidthLimit)
                sources[tree.name] = TreeSource(settings: settings, catalog: catalog, port: port, logger: logger)
            } else if let target = tree.replicas[site] {
                receivers[tree.name] = try TreeReceiver(name: tree.name, target: target,
                                                        directory: config.site.dataDirectory + "/trees/" + tree.name,
                                                        retention: tree.keep, port: port, logger: logger)
            }
        }
        self.sources = sources
        self.receivers = receivers
        port.engine = self
    }

    var isEmpty: Bool { sources.isEmpty && receivers.isEmpty }

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
        switch message {
        case .hello(let request, _, _), .query(let request, _), .commit(let request, _, _):
            guard let receiver = receivers[tree] else {
                _ = send([TreeMessage.failed(request: request, message: "site does not keep a replica of tree \"\(tree)\"; "
                                             + "add it under trees.\(tree).replicas there").frame(tree: tree)], to: peer)
                return
            }
            receiver.received(message, from: peer)
        case .put:
            receivers[tree]?.received(message, from: peer)
        case .latest, .lacking, .committed, .failed:
            sources[tree]?.deliver(message, from: peer)
        }
    }

    func linkUp(_ peer: String) { for s in sources.values { s.linkUp(peer) } }
    func linkDown(_ peer: String, reason: String) { for s in sources.values { s.linkDown(peer, reason: reason) } }
    func writable(_ peer: String) { for s in sources.values { s.writable(peer) } }

    /// Forwards to the engine once it exists (the runtimes are made before it is).
    final class PortBox: TreePort, @unchecked Sendable {
        weak var engine: TreeEngine?
        func send(_ frames: [Frame], to peer: String) -> Bool { engine?.send(frames, to: peer) ?? false }
        func isWritable(_ peer: String) -> Bool { engine?.isWritable(peer) ?? true }
        func isConnected(_ peer: String) -> Bool { engine?.isConnected(peer) ?? false }
    }
}
