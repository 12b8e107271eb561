import FerryCore
import Foundation
import Logging
import NIOCore
import Synchronization

/// The shared, lock-protected state of one `PeerLinks`: every open channel, and the
/// ``PeerLinkTable`` that holds each peer's links and state, applies the duplicate rule and picks
/// each peer's current link (what the data plane is told: see ``EstablishedLink``). This class
/// only executes the table's actions: it maps the table's `LinkID`s to connections, closes links,
/// moves the data plane's current link and logs state changes.
///
/// Connection handlers run on their channels' event loops and the dial loops run as tasks, so all
/// of them go through here. Nothing is logged while the lock is held: methods collect the lines
/// and emit them after unlocking.
final class LinkRegistry: Sendable {
    let localName: String
    let localID: SiteID
    let logger: Logger
    /// Configured peers by name; fixed for the registry's life.
    let peers: [String: PeerEndpoint]

    /// The layer above's callbacks.
    let handlers = LinkHandlers()

    private let state: Mutex<State>

    private struct State {
        var table: PeerLinkTable
        var channels: [ObjectIdentifier: any Channel] = [:]
        /// Refusals already logged at warning level; repeats go to debug.
        var loggedRefusals: Set<String> = []
        /// Connections that came up and have not closed, by the ID they got when they came up.
        var links: [LinkID: EstablishedLink] = [:]
        /// The same, by channel.
        var linkOfChannel: [ObjectIdentifier: LinkID] = [:]
        /// Each peer's current link, by the ID it is current under.
        var currentLinks: [LinkID: EstablishedLink] = [:]
    }

    /// A link the caller must close, after sending `goodbye` with the reason. May be the link
    /// that just came up.
    struct LinkToClose {
        var channel: any Channel
        var reason: String
    }

    init(identity: SiteIdentity, peers: [PeerEndpoint], logger: Logger) {
        self.localName = identity.siteName
        self.localID = identity.siteID
        self.logger = logger
        var byName: [String: PeerEndpoint] = [:]
        for peer in peers {
            // The configuration layer rejects these; if one slips through, say which entry wins.
            if byName[peer.name] != nil {
                logger.warning("peer \"\(peer.name)\" is configured twice; using the last entry (\(peer.address))")
            }
            if let other = byName.values.first(where: { $0.siteID == peer.siteID && $0.name != peer.name }) {
                logger.warning("peers \"\(other.name)\" and \"\(peer.name)\" pin the same site ID \(peer.siteID); inbound links from it count as \"\(other.name)\" or \"\(peer.name)\" arbitrarily")
            }
            byName[peer.name] = peer
        }
        self.peers = byName
        let config = PeerLinkTable.Config(
            localName: identity.siteName, localID: identity.siteID, peers: byName.mapValues(\.siteID))
        self.state = Mutex(State(table: PeerLinkTable(config: config, now: .now())))
    }

    // MARK: - Peers by certificate

    /// The configured peer whose pinned ID equals `fingerprint`, compared in constant time.
    func peer(withFingerprint fingerprint: [UInt8]) -> PeerEndpoint? {
        var found: PeerEndpoint?
        for peer in peers.values where Self.constantTimeEqual(peer.siteID.bytes, fingerprint) {
            found = peer
        }
        return found
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for (x, y) in zip(a, b) { diff |= x ^ y }
        return diff == 0
    }

    /// Logs a refused certificate at warning level the first time `key` is seen, at debug after.
    func logRefusal(_ line: String, key: String) {
        let first = state.withLock { state in
            // Bounded: a stream of strangers with fresh certificates must not grow it forever.
            if state.loggedRefusals.count >= 1024 { state.loggedRefusals.removeAll() }
            return state.loggedRefusals.insert(key).inserted
        }
        if first {
            logger.warning("\(line)")
        } else {
            logger.debug("\(line)")
        }
    }

    // MARK: - Channels

    /// Records an open channel so `closeAll` can reach it. False once stopped: close it instead.
    func register(_ channel: any Channel) -> Bool {
        state.withLock { state in
            guard !state.table.stopped else { return false }
            state.channels[ObjectIdentifier(channel)] = channel
            return true
        }
    }

    /// Marks the registry stopped and returns every open channel, for closing.
    func stopAndTakeChannels() -> [any Channel] {
        state.withLock { state in
            state.table.stop()
            return Array(state.channels.values)
        }
    }

    var isStopped: Bool { state.withLock { $0.table.stopped } }

    // MARK: - Link events

    func dialStarted(_ peer: String) {
        _ = apply { state, now in state.table.dialStarted(peer: peer, now: now) }
    }

    /// A dial ended: nil `error` when its link came up (or lost a duplicate race), else why not.
    func dialFinished(_ peer: String, error: String?) {
        _ = apply { state, now in state.table.dialFinished(peer: peer, error: error, now: now) }
    }

    /// A new established connection to `peer`, with a new `LinkID`; not recorded until ``linkUp(_:link:)``.
    func makeLink(peer: String, channel: any Channel, direction: LinkDirection) -> EstablishedLink {
        let id = state.withLock { $0.table.newLinkID() }
        return EstablishedLink(peer: peer, channel: channel, direction: direction, id: id, handlers: handlers)
    }

    /// ``linkUp(_:link:)`` for a connection made here (tests).
    func linkUp(_ peerName: String, channel: any Channel, direction: LinkDirection) -> [LinkToClose] {
        linkUp(peerName, link: makeLink(peer: peerName, channel: channel, direction: direction))
    }

    /// A link passed the hello exchange: records it and says which links to close (the duplicate
    /// rule of ``PeerLinkTable``, protocol.md §4.8).
    func linkUp(_ peerName: String, link: EstablishedLink) -> [LinkToClose] {
        apply { state, now in
            state.links[link.connection] = link
            state.linkOfChannel[ObjectIdentifier(link.channel)] = link.connection
            return state.table.linkUp(peer: peerName, link: link.connection, direction: link.direction, now: now)
        }
    }

    /// A `ping` or matched `pong` arrived on `channel`, so the peer still holds that link; returns
    /// the links to close.
    func heardFrom(_ peerName: String, channel: any Channel) -> [LinkToClose] {
        apply { state, now in
            guard let id = state.linkOfChannel[ObjectIdentifier(channel)] else { return [] }
            return state.table.heardFrom(peer: peerName, link: id, now: now)
        }
    }

    /// The direction of the link both sites keep when there are two (protocol.md §4.8).
    static func preferredDirection(local: SiteID, peer: SiteID) -> LinkDirection {
        PeerLinkTable.preferredDirection(local: local, peer: peer)
    }

    /// A channel closed. If it carried the peer's link, the peer is no longer connected.
    func channelClosed(_ channel: any Channel, peer: String?, error: String?) {
        let key = ObjectIdentifier(channel)
        var closed: LinkID?
        _ = apply { state, now in
            state.channels[key] = nil
            closed = state.linkOfChannel.removeValue(forKey: key)
            guard let peer, let id = closed else { return [] }
            return state.table.linkDown(peer: peer, link: id, reason: error, now: now)
        }
        // After the table's actions: the link's down event needed it.
        if let closed { state.withLock { _ = $0.links.removeValue(forKey: closed) } }
    }

    func recordRTT(_ peer: String, channel: any Channel, milliseconds: Double) {
        state.withLock { state in
            guard let id = state.linkOfChannel[ObjectIdentifier(channel)] else { return }
            state.table.rttMeasured(peer: peer, link: id, milliseconds: milliseconds)
        }
    }

    /// The peer's current link, by the ID its connection got when it came up, and its channel.
    func liveLink(_ peer: String) -> (id: LinkID, channel: any Channel)? {
        state.withLock { state in
            guard let id = state.table.peers[peer]?.current?.link, let link = state.links[id] else { return nil }
            return (id, link.channel)
        }
    }

    /// The channel of the peer's current link, if any.
    func liveChannel(_ peer: String) -> (any Channel)? {
        liveLink(peer)?.channel
    }

    // MARK: - The data plane

    /// The connection that is a peer's current link under `id`, if one is.
    func currentLink(_ id: LinkID) -> EstablishedLink? {
        state.withLock { $0.currentLinks[id] }
    }

    /// The ID of the peer's current link, if it has one.
    func currentLinkID(of peer: String) -> LinkID? {
        state.withLock { $0.table.peers[peer]?.current?.id }
    }

    // MARK: - Status

    func status() -> [PeerLinkStatus] {
        state.withLock { state in
            state.table.peers.keys.sorted().compactMap { name in
                guard let record = state.table.peers[name], let endpoint = peers[name] else { return nil }
                return PeerLinkStatus(
                    name: name, siteID: endpoint.siteID.description, address: endpoint.address,
                    state: record.state, since: Date(timeIntervalSince1970: TimeInterval(record.since.wallSeconds)),
                    rttMilliseconds: record.rttMilliseconds, lastError: record.lastError,
                    direction: record.currentDirection)
            }
        }
    }

    // MARK: - Executing the table's actions

    /// Runs `event` on the table under the lock and executes its actions: moves the data plane's
    /// current link (queuing the link-down and link-up events, fired after unlocking), collects
    /// the links to close (for the caller) and the state-change lines (logged after unlocking).
    private func apply(_ event: (inout State, Instant) -> [PeerLinkTable.Action]) -> [LinkToClose] {
        let now = Instant.now()
        var touched: [EstablishedLink] = []
        var toClose: [LinkToClose] = []
        var lines: [(peer: String, level: Logger.Level, text: String)] = []
        state.withLock { state in
            for action in event(&state, now) {
                switch action {
                case .closeLink(_, let id, let reason):
                    if let link = state.links[id] { toClose.append(LinkToClose(channel: link.channel, reason: reason)) }
                case .currentChanged(_, let old, let new, let reason):
                    var replaced: (link: EstablishedLink, id: LinkID)?
                    if let old, let link = state.links[old.link] {
                        if let id = link.demote(reason: reason) {
                            state.currentLinks[id] = nil
                            replaced = (link, id)
                        }
                        touched.append(link)
                    }
                    if let new, let link = state.links[new.link] {
                        link.promote(as: new.id, after: replaced)
                        state.currentLinks[new.id] = link
                        touched.append(link)
                    }
                case .stateChanged(let peer, _, _, let line, let quiet):
                    lines.append((peer, quiet ? .debug : .info, line))
                }
            }
        }
        // Their events are queued; each is fired on its own loop.
        for link in touched { link.scheduleEvents() }
        for line in lines {
            logger.log(level: line.level, "\(line.text)", metadata: ["peer": "\(line.peer)"])
        }
        return toClose
    }
}

extension Instant {
    /// The real clocks: NIO's monotonic clock (as `ping`'s `sentAt` on the wire) and the wall clock.
    static func now() -> Instant {
        Instant(monotonicNanos: Int64(clamping: NIODeadline.now().uptimeNanoseconds),
                wallSeconds: Int64(Date().timeIntervalSince1970.rounded(.down)))
    }
}
