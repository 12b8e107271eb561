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
    /// Frame types delivered to the frame handler (besides link control, which is handled here).
    let dataFrameTypes: Set<FrameType>

    private let state: Mutex<State>

    private struct Live {
        var channel: any Channel
        var direction: LinkDirection
    }

    private struct PeerRecord {
        var state: LinkState = .disconnected
        var since: Date
        var rttMilliseconds: Double?
        var lastError: String?
        var live: Live?
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

    /// What a connection handler must do after its link passed the hello exchange.
    enum LinkUpDecision {
        /// Keep this link; close the listed older link to the same peer (with the reason).
        case keep(closing: (any Channel)?, reason: String)
        /// Close this link: another one to the same peer wins.
        case closeThis(reason: String)
    }

    init(identity: SiteIdentity, peers: [PeerEndpoint], dataFrameTypes: Set<FrameType>, logger: Logger) {
        self.localName = identity.siteName
        self.localID = identity.siteID
        self.logger = logger
        self.dataFrameTypes = dataFrameTypes
        var byName: [String: PeerEndpoint] = [:]
        for peer in peers { byName[peer.name] = peer }
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

    /// A link passed the hello exchange; decides which link to keep if there are two.
    ///
    /// proto: keep the link dialed by the site with the smaller site ID; both sites compute the
    /// same answer, so they keep the same connection. Two links in the same direction mean the
    /// peer restarted and the older one is stale, so the newer is kept.
    func linkUp(_ peerName: String, channel: any Channel, direction: LinkDirection) -> LinkUpDecision {
        guard let endpoint = peers[peerName] else { return .closeThis(reason: "unknown peer") }
        let dialer = Self.preferredDirection(local: localID, peer: endpoint.siteID) == .outbound
            ? "this site (\(localName))" : peerName
        var decision = LinkUpDecision.keep(closing: nil, reason: "")
        update(peerName) { record, stopped in
            if direction == .outbound { record.dialing = false }
            if stopped {
                decision = .closeThis(reason: "site \(self.localName) is stopping")
                return
            }
            if let live = record.live, ObjectIdentifier(live.channel) != ObjectIdentifier(channel) {
                let reason = live.direction == direction
                    ? "replaced by a newer link in the same direction"
                    : "duplicate link; keeping the one dialed by \(dialer), which has the smaller site ID"
                guard Self.keepsNewLink(existing: live.direction, new: direction, local: self.localID, peer: endpoint.siteID) else {
                    decision = .closeThis(reason: reason)
                    return
                }
                decision = .keep(closing: live.channel, reason: reason)
            }
            record.live = Live(channel: channel, direction: direction)
            record.rttMilliseconds = nil
        }
        return decision
    }

    /// The direction of the link both sites keep when there are two: the one dialed by the site
    /// with the smaller site ID (bytes compared as unsigned, lexicographically).
    static func preferredDirection(local: SiteID, peer: SiteID) -> LinkDirection {
        local.bytes.lexicographicallyPrecedes(peer.bytes) ? .outbound : .inbound
    }

    /// Whether a link that just came up in direction `new` replaces a live one in `existing`.
    /// Same direction: yes, the older one is stale (the peer restarted).
    static func keepsNewLink(existing: LinkDirection, new: LinkDirection, local: SiteID, peer: SiteID) -> Bool {
        existing == new || new == preferredDirection(local: local, peer: peer)
    }

    /// A channel closed. If it carried the peer's link, the peer is no longer connected.
    func channelClosed(_ channel: any Channel, peer: String?, error: String?) {
        let id = ObjectIdentifier(channel)
        state.withLock { _ = $0.channels.removeValue(forKey: id) }
        guard let peer else { return }
        update(peer) { record, _ in
            guard let live = record.live, ObjectIdentifier(live.channel) == id else { return }
            record.live = nil
            record.rttMilliseconds = nil
            record.lastError = error ?? "link closed"
        }
    }

    func recordRTT(_ peer: String, channel: any Channel, milliseconds: Double) {
        let id = ObjectIdentifier(channel)
        state.withLock { state in
            guard let live = state.peers[peer]?.live, ObjectIdentifier(live.channel) == id else { return }
            state.peers[peer]?.rttMilliseconds = milliseconds
        }
    }

    /// The channel of the peer's current link, if any.
    func liveChannel(_ peer: String) -> (any Channel)? {
        state.withLock { $0.peers[peer]?.live?.channel }
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
                    lastError: record.lastError, direction: record.live?.direction)
            }
        }
    }

    /// Applies `change` to a peer's record, recomputes its state and logs a state change.
    private func update(_ peer: String, _ change: (inout PeerRecord, _ stopped: Bool) -> Void) {
        let logLine: (Logger.Level, String)? = state.withLock { state in
            guard var record = state.peers[peer] else { return nil }
            change(&record, state.stopped)
            let newState: LinkState = record.live != nil ? .connected : record.dialing ? .connecting : .disconnected
            var line: (Logger.Level, String)?
            if newState != record.state {
                let old = record.state
                record.state = newState
                record.since = Date()
                var text = "peer link \(peer): \(old.rawValue) -> \(newState.rawValue)"
                if let live = record.live { text += " (\(live.direction.rawValue))" }
                if newState != .connected, let error = record.lastError { text += ": \(error)" }
                // A peer that stays down cycles connecting/disconnected on every retry; only the
                // first time an error is seen is worth an info line.
                let repeatRetry = old != .connected && newState != .connected && record.lastError == record.loggedError
                line = (repeatRetry ? .debug : .info, text)
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
