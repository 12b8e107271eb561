/// A peer link's state as `status()` reports it.
public enum LinkState: String, Sendable, Codable {
    /// A dial is in progress: TCP connect, TLS or the hello exchange.
    case connecting
    /// A link is up and passed the hello exchange.
    case connected
    /// No link and no dial in progress (waiting to retry, or stopped).
    case disconnected
}

/// Every peer's established links, which of them is current, and the peer's link state
/// (protocol.md §4.8, §4.9). A pure state machine: events in, actions out, the time passed in
/// (DESIGN §4). FerryWire's `LinkRegistry` runs it under its lock and executes the actions; the
/// simulation drives it directly.
///
/// Connections are named by the ``LinkID`` they got when they came up (``newLinkID()``). Of a
/// peer's links, one at a time is *current*: the one the data plane uses. A connection that
/// becomes current again after it was replaced is current under a fresh ID, so an ID that was
/// reported down is never up again (protocol.md §6.1).
///
/// ## The duplicate rule (protocol.md §4.8)
/// Of two links to the same peer, both sites keep the one dialed by the site with the smaller
/// site ID. Only that site closes the other one, and only once its own link is up and the peer
/// has been heard on it since the other link came up. Its link coming up second is enough (it
/// received `helloAck`, so the peer's end of it is up already), so neither site is ever left
/// without a link. The other site keeps both until the `goodbye` arrives, and meanwhile prefers
/// the right one. Two links in the same direction mean the dialer restarted; the older one is
/// stale and is closed.
///
/// The peer's link coming up second is not enough: the peer dials only when it has no link, so it
/// may have restarted (crashed without closing its connections) and the own link be a stale one
/// that dead-link detection has not caught yet. Closing the fresh link then would bounce the
/// restarted peer for seconds. So the own link waits for a `ping` or `pong` on it
/// (``heardFrom(peer:link:now:)``), which the peer sends on every link within a heartbeat, and the
/// fresh link is used meanwhile.
public struct PeerLinkTable: Sendable {
    public struct Config: Sendable {
        public var localName: String
        public var localID: SiteID
        /// The configured peers' pinned site IDs, by name.
        public var peers: [String: SiteID]

        public init(localName: String, localID: SiteID, peers: [String: SiteID]) {
            self.localName = localName
            self.localID = localID
            self.peers = peers
        }
    }

    /// One established connection to a peer.
    public struct Link: Sendable, Equatable {
        /// The ID the connection got when it came up.
        public let id: LinkID
        public let direction: LinkDirection
        /// False for a link this site dialed once the peer has dialed a newer one and until the
        /// peer is heard on this one again (only the smaller-ID site tracks this; see the type).
        public var heardSinceNewerLink = true
        var hasBeenCurrent = false
    }

    /// The connection that is a peer's current link, and the ID it is current under.
    public struct CurrentLink: Sendable, Equatable {
        /// The connection, by the ID it got when it came up.
        public var link: LinkID
        /// Its own ID the first time it is current, a fresh one each time after.
        public var id: LinkID

        public init(link: LinkID, id: LinkID) {
            self.link = link
            self.id = id
        }
    }

    /// One peer's links and state.
    public struct Peer: Sendable, Equatable {
        public var state: LinkState = .disconnected
        /// When the peer last became connected, or stopped being connected.
        public var since: Instant
        /// The last RTT measured on the current link.
        public var rttMilliseconds: Double?
        /// Why the last link or dial failed.
        public var lastError: String?
        /// Established links, oldest first. Usually one; two while a duplicate is being closed or
        /// an own link is in doubt.
        public var links: [Link] = []
        public var current: CurrentLink?
        public var dialing = false
        /// The error last written to the log at info, to keep a peer that stays down from logging
        /// every retry.
        var loggedError: String?

        /// Who dialed the current link.
        public var currentDirection: LinkDirection? {
            current.flatMap { current in links.first { $0.id == current.link }?.direction }
        }
    }

    public enum Action: Sendable, Equatable {
        /// Send `goodbye(reason)` on the connection and close it. May be the link that just came up.
        case closeLink(peer: String, LinkID, reason: String)
        /// The peer's current link changed: `old` (if any) is down for `reason`, then `new` (if
        /// any) is up.
        case currentChanged(peer: String, old: CurrentLink?, new: CurrentLink?, reason: String)
        /// The peer's state changed; `line` is for the log, at debug when `quiet` (a repeat of
        /// the same error while the peer stays down, or after stop), else at info.
        case stateChanged(peer: String, from: LinkState, to: LinkState, line: String, quiet: Bool)
    }

    public let config: Config
    public private(set) var peers: [String: Peer]
    /// Once stopped, a link that comes up is closed at once.
    public private(set) var stopped = false
    private var nextLinkID: UInt64 = 1

    public init(config: Config, now: Instant) {
        self.config = config
        self.peers = config.peers.mapValues { _ in Peer(since: now) }
    }

    /// A new `LinkID`; IDs are never reused.
    public mutating func newLinkID() -> LinkID {
        defer { nextLinkID += 1 }
        return LinkID(nextLinkID)
    }

    /// The direction of the link both sites keep when there are two: the one dialed by the site
    /// with the smaller site ID (bytes compared as unsigned, lexicographically).
    public static func preferredDirection(local: SiteID, peer: SiteID) -> LinkDirection {
        local.bytes.lexicographicallyPrecedes(peer.bytes) ? .outbound : .inbound
    }

    // MARK: - Events

    public mutating func stop() {
        stopped = true
    }

    public mutating func dialStarted(peer: String, now: Instant) -> [Action] {
        update(peer, now: now) { record, _ in
            record.dialing = true
            return []
        }
    }

    /// A dial ended: nil `error` when its link came up (or lost a duplicate race), else why not.
    public mutating func dialFinished(peer: String, error: String?, now: Instant) -> [Action] {
        update(peer, now: now) { record, _ in
            record.dialing = false
            if let error { record.lastError = error }
            return []
        }
    }

    /// A connection passed the hello exchange: records it and applies the duplicate rule.
    public mutating func linkUp(peer: String, link id: LinkID, direction: LinkDirection, now: Instant) -> [Action] {
        guard config.peers[peer] != nil else { return [.closeLink(peer: peer, id, reason: "unknown peer")] }
        let localName = config.localName
        let preferred = preferredDirection(peer)
        return update(peer, now: now) { record, stopped in
            if direction == .outbound { record.dialing = false }
            if stopped { return [Removal(link: id, reason: "site \(localName) is stopping", close: true)] }
            var removals = record.links.filter { $0.direction == direction }.map {
                Removal(link: $0.id, reason: "replaced by a newer link from the same site", close: true)
            }
            record.links.removeAll { $0.direction == direction }
            if preferred == .outbound, direction == .inbound {
                for i in record.links.indices where record.links[i].direction == .outbound {
                    record.links[i].heardSinceNewerLink = false
                }
            }
            record.links.append(Link(id: id, direction: direction))
            removals += Self.closeDuplicates(&record, preferred: preferred, localName: localName)
            return removals
        }
    }

    /// A `ping` or matched `pong` arrived on `link`, so the peer still holds it: if it was in
    /// doubt, it is trusted again and the duplicate rule runs.
    public mutating func heardFrom(peer: String, link id: LinkID, now: Instant) -> [Action] {
        guard config.peers[peer] != nil else { return [] }
        let localName = config.localName
        let preferred = preferredDirection(peer)
        return update(peer, now: now) { record, stopped in
            guard !stopped, let i = record.links.firstIndex(where: { $0.id == id }),
                  !record.links[i].heardSinceNewerLink else { return [] }
            record.links[i].heardSinceNewerLink = true
            return Self.closeDuplicates(&record, preferred: preferred, localName: localName)
        }
    }

    /// A connection closed, for `reason` (nil: no reason known). If it was the peer's last link,
    /// the peer is no longer connected.
    public mutating func linkDown(peer: String, link id: LinkID, reason: String?, now: Instant) -> [Action] {
        guard config.peers[peer] != nil else { return [] }
        return update(peer, now: now) { record, _ in
            guard record.links.contains(where: { $0.id == id }) else { return [] }
            record.links.removeAll { $0.id == id }
            if record.links.isEmpty { record.lastError = reason ?? "link closed" }
            return [Removal(link: id, reason: reason ?? "link closed", close: false)]
        }
    }

    /// An RTT measured on `link`: recorded only if it is the peer's current link (protocol.md §4.4).
    public mutating func rttMeasured(peer: String, link id: LinkID, milliseconds: Double) {
        guard peers[peer]?.current?.link == id else { return }
        peers[peer]?.rttMilliseconds = milliseconds
    }

    // MARK: - The rule

    /// A link leaving the peer's record, with why; `close` when this site must close it.
    private struct Removal {
        var link: LinkID
        var reason: String
        var close: Bool
    }

    private func preferredDirection(_ peer: String) -> LinkDirection {
        guard let siteID = config.peers[peer] else { return .outbound }
        return Self.preferredDirection(local: config.localID, peer: siteID)
    }

    /// The duplicate rule at the smaller-ID site: with an own link up and trusted, every link the
    /// peer dialed is closed.
    private static func closeDuplicates(_ record: inout Peer, preferred: LinkDirection, localName: String) -> [Removal] {
        guard preferred == .outbound,
              record.links.contains(where: { $0.direction == .outbound && $0.heardSinceNewerLink }) else { return [] }
        let reason = "duplicate link; keeping the one dialed by \(localName), which has the smaller site ID"
        let removals = record.links.filter { $0.direction == .inbound }.map { Removal(link: $0.id, reason: reason, close: true) }
        record.links.removeAll { $0.direction == .inbound }
        return removals
    }

    /// The current link: the newest in the preferred direction that is not in doubt, else the newest.
    private static func chooseCurrent(_ record: Peer, preferred: LinkDirection) -> Int? {
        record.links.lastIndex { $0.direction == preferred && $0.heardSinceNewerLink }
            ?? (record.links.isEmpty ? nil : record.links.count - 1)
    }

    /// Applies `change` to a peer's record, then moves the current link and recomputes the state.
    private mutating func update(_ name: String, now: Instant, _ change: (inout Peer, _ stopped: Bool) -> [Removal]) -> [Action] {
        guard var record = peers[name] else { return [] }
        let previous = record.current
        let removals = change(&record, stopped)
        var actions = removals.filter(\.close).map { Action.closeLink(peer: name, $0.link, reason: $0.reason) }

        let chosen = Self.chooseCurrent(record, preferred: preferredDirection(name))
        let chosenID = chosen.map { record.links[$0].id }
        if chosenID != previous?.link {
            record.rttMilliseconds = nil
            var next: CurrentLink?
            if let chosen {
                let id = record.links[chosen].hasBeenCurrent ? newLinkID() : record.links[chosen].id
                record.links[chosen].hasBeenCurrent = true
                next = CurrentLink(link: record.links[chosen].id, id: id)
            }
            record.current = next
            var reason = ""
            if let previous {
                reason = removals.last { $0.link == previous.link }?.reason
                    ?? "no longer the current link to \(name): "
                    + (chosen.map { "a newer \(record.links[$0].direction.rawValue) link is used" } ?? "none is left")
            }
            actions.append(.currentChanged(peer: name, old: previous, new: next, reason: reason))
        }

        let newState: LinkState = record.current != nil ? .connected : record.dialing ? .connecting : .disconnected
        if newState != record.state {
            let old = record.state
            record.state = newState
            // A peer that stays down flips connecting/disconnected on every retry; `since` keeps
            // when it went down, which is what an operator asks.
            if (old == .connected) != (newState == .connected) { record.since = now }
            var line = "peer link \(name): \(old.rawValue) -> \(newState.rawValue)"
            if let current = record.current, let direction = record.currentDirection {
                line += " (\(direction.rawValue), \(current.id))"
            }
            if newState != .connected, let error = record.lastError { line += ": \(error)" }
            // Only the first time an error is seen while the peer stays down is worth an info line.
            let repeatRetry = old != .connected && newState != .connected && record.lastError == record.loggedError
            if !repeatRetry { record.loggedError = newState == .connected ? nil : record.lastError }
            actions.append(.stateChanged(peer: name, from: old, to: newState, line: line, quiet: repeatRetry || stopped))
        }
        peers[name] = record
        return actions
    }
}
