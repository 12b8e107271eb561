import FerryCore
import Foundation
import Logging
import NIOCore
import Synchronization

/// The shared, lock-protected state of one `PeerLinks`: every open channel, each peer's link
/// state, and the rule that picks one link when two exist.
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

    private let state: Mutex<State>

    private struct Live {
        var channel: any Channel
        var direction: LinkDirection
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
    }

    private struct State {
        var peers: [String: PeerRecord]
        var channels: [ObjectIdentifier: any Channel] = [:]
        var stopped = false
        /// Refusals already logged at warning level; repeats go to debug.
        var loggedRefusals: Set<String> = []
        var frameHandler: (@Sendable (PeerFrame) -> Void)?
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
    func linkUp(_ peerName: String, channel: any Channel, direction: LinkDirection) -> [LinkToClose] {
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
            record.links.append(Live(channel: channel, direction: direction))
            toClose += self.closeDuplicates(&record, preferred: preferred)
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
        let previous = record.current.map { ObjectIdentifier($0.channel) }
        record.current = record.links.last { $0.direction == preferred && $0.heardSinceNewerLink } ?? record.links.last
        if record.current.map({ ObjectIdentifier($0.channel) }) != previous { record.rttMilliseconds = nil }
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

    // MARK: - Frames for the layer above

    var frameHandler: (@Sendable (PeerFrame) -> Void)? {
        get { state.withLock { $0.frameHandler } }
        set { state.withLock { $0.frameHandler = newValue } }
    }

    /// Hands a data-plane frame to the frame handler; false when there is none.
    func deliver(_ frame: PeerFrame) -> Bool {
        guard let handler = frameHandler else { return false }
        handler(frame)
        return true
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

    /// Applies `change` to a peer's record, recomputes its state and logs a state change.
    private func update(_ peer: String, _ change: (inout PeerRecord, _ stopped: Bool) -> Void) {
        let logLine: (Logger.Level, String)? = state.withLock { state in
            guard var record = state.peers[peer] else { return nil }
            change(&record, state.stopped)
            let newState: LinkState = record.current != nil ? .connected : record.dialing ? .connecting : .disconnected
            var line: (Logger.Level, String)?
            if newState != record.state {
                let old = record.state
                record.state = newState
                // A peer that stays down flips connecting/disconnected on every retry; `since`
                // keeps when it went down, which is what an operator asks.
                if (old == .connected) != (newState == .connected) { record.since = Date() }
                var text = "peer link \(peer): \(old.rawValue) -> \(newState.rawValue)"
                if let current = record.current { text += " (\(current.direction.rawValue))" }
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
        if let (level, text) = logLine {
            logger.log(level: level, "\(text)", metadata: ["peer": "\(peer)"])
        }
    }
}
