import FerryCore
import Foundation
import Logging
import NIOCore
import Synchronization

/// The shared, lock-protected state of one `PeerLinks`: every open channel, each peer's link
/// state, the rule that picks one link when two exist, and which link is each peer's current one
/// (what the data plane is told: see ``EstablishedLink``).
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

    private struct Live {
        var link: EstablishedLink
        var channel: any Channel { link.channel }
        var direction: LinkDirection { link.direction }
        /// False for a link this site dialed once the peer has dialed a newer one and until the
        /// peer is heard on this one again: the peer dials only when it has no link, so it may have
        /// restarted and lost this one (only the smaller-ID site tracks this; see `linkUp`).
        var heardSinceNewerLink = true
    }

    private struct PeerRecord {
        var state: LinkState = .disconnected
        var since: Date
        var rttMilliseconds: Double?
        var lastError: String?
        /// Established links, oldest first. Usually one; two while a duplicate is being closed or
        /// an own link is in doubt (see `linkUp`).
        var links: [Live] = []
        /// The link to use: the newest in the preferred direction if it is up and not in doubt,
        /// else the newest.
        var current: Live?
        var dialing = false
        /// The error last written to the log, to keep a peer that stays down from logging every retry.
        var loggedError: String?
        /// Why links removed by the change being applied went away, by channel; for the link-down
        /// event when one of them was current. Emptied after each change.
        var removalReasons: [ObjectIdentifier: String] = [:]
    }

    private struct State {
        var peers: [String: PeerRecord]
        var channels: [ObjectIdentifier: any Channel] = [:]
        var stopped = false
        /// Refusals already logged at warning level; repeats go to debug.
        var loggedRefusals: Set<String> = []
        /// The next `LinkID` to give out; IDs are never reused.
        var nextLinkID: UInt64 = 1
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
        let now = Date()
        self.state = Mutex(State(peers: byName.mapValues { _ in PeerRecord(since: now) }))
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
            guard !state.stopped else { return false }
            state.channels[ObjectIdentifier(channel)] = channel
            return true
        }
    }

    /// Marks the registry stopped and returns every open channel, for closing.
    func stopAndTakeChannels() -> [any Channel] {
        state.withLock { state in
            state.stopped = true
            return Array(state.channels.values)
        }
    }

    var isStopped: Bool { state.withLock { $0.stopped } }

    // MARK: - Link events

    func dialStarted(_ peer: String) {
        update(peer) { record, _ in record.dialing = true }
    }

    /// A dial ended: nil `error` when its link came up (or lost a duplicate race), else why not.
    func dialFinished(_ peer: String, error: String?) {
        update(peer) { record, _ in
            record.dialing = false
            if let error { record.lastError = error }
        }
    }

    /// A new established connection to `peer`, with a new `LinkID`; not recorded until ``linkUp(_:link:)``.
    func makeLink(peer: String, channel: any Channel, direction: LinkDirection) -> EstablishedLink {
        let id = state.withLock { state in
            defer { state.nextLinkID += 1 }
            return LinkID(state.nextLinkID)
        }
        return EstablishedLink(peer: peer, channel: channel, direction: direction, id: id, handlers: handlers)
    }

    /// ``linkUp(_:link:)`` for a connection made here (tests).
    func linkUp(_ peerName: String, channel: any Channel, direction: LinkDirection) -> [LinkToClose] {
        linkUp(peerName, link: makeLink(peer: peerName, channel: channel, direction: direction))
    }

    /// A link passed the hello exchange: records it and says which links to close.
    ///
    /// proto: of two links to the same peer, both sites keep the one dialed by the site with the
    /// smaller site ID. Only that site closes the other one, and only once its own link is up and
    /// the peer has been heard on it since the other link came up. Its link coming up second is
    /// enough (it received `helloAck`, so the peer's end of it is up already), so neither site is
    /// ever left without a link. The other site keeps both until the `goodbye` arrives, and
    /// meanwhile prefers the right one. Two links in the same direction mean the dialer
    /// restarted; the older one is stale and is closed.
    ///
    /// The peer's link coming up second is not enough: the peer dials only when it has no link,
    /// so it may have restarted (crashed without closing its connections) and the own link be a
    /// stale one that dead-link detection has not caught yet. Closing the fresh link then would
    /// bounce the restarted peer for seconds. So the own link waits for a `ping` or `pong` on it
    /// (`heardFrom`), which the peer sends on every link within a heartbeat, and the fresh link
    /// is used meanwhile.
    func linkUp(_ peerName: String, link: EstablishedLink) -> [LinkToClose] {
        let channel = link.channel, direction = link.direction
        guard let endpoint = peers[peerName] else { return [LinkToClose(channel: channel, reason: "unknown peer")] }
        let preferred = Self.preferredDirection(local: localID, peer: endpoint.siteID)
        var toClose: [LinkToClose] = []
        update(peerName) { record, stopped in
            if direction == .outbound { record.dialing = false }
            if stopped {
                toClose = [LinkToClose(channel: channel, reason: "site \(self.localName) is stopping")]
                return
            }
            for old in record.links where old.direction == direction {
                toClose.append(LinkToClose(channel: old.channel, reason: "replaced by a newer link from the same site"))
            }
            record.links.removeAll { $0.direction == direction }
            if preferred == .outbound, direction == .inbound {
                for i in record.links.indices where record.links[i].direction == .outbound {
                    record.links[i].heardSinceNewerLink = false
                }
            }
            record.links.append(Live(link: link))
            toClose += self.closeDuplicates(&record, preferred: preferred)
            for link in toClose { record.removalReasons[ObjectIdentifier(link.channel)] = link.reason }
        }
        return toClose
    }

    /// A `ping` or `pong` arrived on `channel`, so the peer still holds that link: if it was in
    /// doubt (see `linkUp`), it is trusted again and the duplicate rule runs. Returns the links to
    /// close.
    func heardFrom(_ peerName: String, channel: any Channel) -> [LinkToClose] {
        guard let endpoint = peers[peerName] else { return [] }
        let preferred = Self.preferredDirection(local: localID, peer: endpoint.siteID)
        let id = ObjectIdentifier(channel)
        var toClose: [LinkToClose] = []
        update(peerName) { record, stopped in
            guard !stopped, let i = record.links.firstIndex(where: { ObjectIdentifier($0.channel) == id }),
                  !record.links[i].heardSinceNewerLink else { return }
            record.links[i].heardSinceNewerLink = true
            toClose = self.closeDuplicates(&record, preferred: preferred)
            for link in toClose { record.removalReasons[ObjectIdentifier(link.channel)] = link.reason }
        }
        return toClose
    }

    /// The duplicate rule at the smaller-ID site: with an own link up and trusted, every link the
    /// peer dialed is closed. Also picks the current link.
    private func closeDuplicates(_ record: inout PeerRecord, preferred: LinkDirection) -> [LinkToClose] {
        var toClose: [LinkToClose] = []
        if preferred == .outbound, record.links.contains(where: { $0.direction == .outbound && $0.heardSinceNewerLink }) {
            let reason = "duplicate link; keeping the one dialed by \(localName), which has the smaller site ID"
            for other in record.links where other.direction == .inbound {
                toClose.append(LinkToClose(channel: other.channel, reason: reason))
            }
            record.links.removeAll { $0.direction == .inbound }
        }
        Self.chooseCurrent(&record, preferred: preferred)
        return toClose
    }

    private static func chooseCurrent(_ record: inout PeerRecord, preferred: LinkDirection) {
        record.current = record.links.last { $0.direction == preferred && $0.heardSinceNewerLink } ?? record.links.last
    }

    /// The direction of the link both sites keep when there are two: the one dialed by the site
    /// with the smaller site ID (bytes compared as unsigned, lexicographically).
    static func preferredDirection(local: SiteID, peer: SiteID) -> LinkDirection {
        local.bytes.lexicographicallyPrecedes(peer.bytes) ? .outbound : .inbound
    }

    /// A channel closed. If it carried the peer's link, the peer is no longer connected.
    func channelClosed(_ channel: any Channel, peer: String?, error: String?) {
        let id = ObjectIdentifier(channel)
        state.withLock { _ = $0.channels.removeValue(forKey: id) }
        guard let peer, let endpoint = peers[peer] else { return }
        update(peer) { record, _ in
            guard record.links.contains(where: { ObjectIdentifier($0.channel) == id }) else { return }
            record.links.removeAll { ObjectIdentifier($0.channel) == id }
            record.removalReasons[id] = error ?? "link closed"
            Self.chooseCurrent(&record, preferred: Self.preferredDirection(local: self.localID, peer: endpoint.siteID))
            if record.links.isEmpty { record.lastError = error ?? "link closed" }
        }
    }

    func recordRTT(_ peer: String, channel: any Channel, milliseconds: Double) {
        let id = ObjectIdentifier(channel)
        state.withLock { state in
            guard let current = state.peers[peer]?.current, ObjectIdentifier(current.channel) == id else { return }
            state.peers[peer]?.rttMilliseconds = milliseconds
        }
    }

    /// The channel of the peer's current link, if any.
    func liveChannel(_ peer: String) -> (any Channel)? {
        state.withLock { $0.peers[peer]?.current?.channel }
    }

    // MARK: - The data plane

    /// The connection that is a peer's current link under `id`, if one is.
    func currentLink(_ id: LinkID) -> EstablishedLink? {
        state.withLock { $0.currentLinks[id] }
    }

    /// The ID of the peer's current link, if it has one.
    func currentLinkID(of peer: String) -> LinkID? {
        state.withLock { $0.peers[peer]?.current?.link.currentID }
    }

    // MARK: - Status

    func status() -> [PeerLinkStatus] {
        state.withLock { state in
            state.peers.keys.sorted().compactMap { name in
                guard let record = state.peers[name], let endpoint = peers[name] else { return nil }
                return PeerLinkStatus(
                    name: name, siteID: endpoint.siteID.description, address: endpoint.address,
                    state: record.state, since: record.since, rttMilliseconds: record.rttMilliseconds,
                    lastError: record.lastError, direction: record.current?.direction)
            }
        }
    }

    /// Applies `change` to a peer's record, recomputes its state, moves the current link (queuing
    /// the link-down and link-up events) and logs a state change.
    private func update(_ peer: String, _ change: (inout PeerRecord, _ stopped: Bool) -> Void) {
        var touched: [EstablishedLink] = []
        let logLine: (Logger.Level, String)? = state.withLock { state in
            guard var record = state.peers[peer] else { return nil }
            let previous = record.current?.link
            change(&record, state.stopped)
            var replaced: (link: EstablishedLink, id: LinkID)?
            if let previous, record.current?.link !== previous {
                record.rttMilliseconds = nil
                let channelID = ObjectIdentifier(previous.channel)
                let reason = record.removalReasons[channelID]
                    ?? "no longer the current link to \(peer): \(record.current.map { "a newer \($0.direction.rawValue) link is used" } ?? "none is left")"
                if let id = previous.demote(reason: reason) {
                    state.currentLinks[id] = nil
                    replaced = (previous, id)
                }
                touched.append(previous)
            }
            if let next = record.current?.link, next !== previous {
                let id = next.promote(after: replaced) {
                    defer { state.nextLinkID += 1 }
                    return LinkID(state.nextLinkID)
                }
                state.currentLinks[id] = next
                touched.append(next)
            }
            record.removalReasons = [:]
            let newState: LinkState = record.current != nil ? .connected : record.dialing ? .connecting : .disconnected
            var line: (Logger.Level, String)?
            if newState != record.state {
                let old = record.state
                record.state = newState
                // A peer that stays down flips connecting/disconnected on every retry; `since`
                // keeps when it went down, which is what an operator asks.
                if (old == .connected) != (newState == .connected) { record.since = Date() }
                var text = "peer link \(peer): \(old.rawValue) -> \(newState.rawValue)"
                if let current = record.current {
                    text += " (\(current.direction.rawValue), \(current.link.currentID.map(String.init(describing:)) ?? "?"))"
                }
                if newState != .connected, let error = record.lastError { text += ": \(error)" }
                // A peer that stays down cycles connecting/disconnected on every retry; only the
                // first time an error is seen is worth an info line.
                let repeatRetry = old != .connected && newState != .connected && record.lastError == record.loggedError
                // After stop() the teardown of every link is expected, not news.
                line = (repeatRetry || state.stopped ? .debug : .info, text)
                if !repeatRetry { record.loggedError = newState == .connected ? nil : record.lastError }
            }
            state.peers[peer] = record
            return line
        }
        // Their events are queued; each is fired on its own loop.
        for link in touched { link.scheduleEvents() }
        if let (level, text) = logLine {
            logger.log(level: level, "\(text)", metadata: ["peer": "\(peer)"])
        }
    }
}
