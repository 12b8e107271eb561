import FerryCore
import Foundation
import NIOCore

/// A configured peer site: where to dial it and which certificate it must present.
public struct PeerEndpoint: Sendable, Hashable, Codable {
    /// The peer's name in this site's configuration (`peers.NAME`); used in logs and status.
    public var name: String
    /// Host name or IP address to dial.
    public var host: String
    /// TCP port the peer listens on.
    public var port: Int
    /// The pinned site ID: the only certificate accepted from this peer.
    public var siteID: SiteID

    public init(name: String, host: String, port: Int, siteID: SiteID) {
        self.name = name
        self.host = host
        self.port = port
        self.siteID = siteID
    }

    /// `host:port`, with brackets around an IPv6 literal.
    public var address: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}

/// One peer's link as seen from this site, for `ferry status` and the admin API.
public struct PeerLinkStatus: Sendable, Codable, Equatable {
    /// The peer's configured name.
    public var name: String
    /// The pinned site ID, grouped form.
    public var siteID: String
    /// The configured `host:port`.
    public var address: String
    /// Connected, connecting or disconnected.
    public var state: LinkState
    /// When the link last came up (while connected) or went down (otherwise); retries of a peer
    /// that stays down do not move it.
    public var since: Date
    /// The last measured heartbeat round trip, in milliseconds; nil until one was measured on the
    /// current link.
    public var rttMilliseconds: Double?
    /// Why the last link or dial attempt failed, as a person can act on it; nil if none failed yet.
    public var lastError: String?
    /// Who dialed the current link; nil when not connected.
    public var direction: LinkDirection?

    public init(
        name: String, siteID: String, address: String, state: LinkState, since: Date,
        rttMilliseconds: Double?, lastError: String?, direction: LinkDirection?
    ) {
        self.name = name
        self.siteID = siteID
        self.address = address
        self.state = state
        self.since = since
        self.rttMilliseconds = rttMilliseconds
        self.lastError = lastError
        self.direction = direction
    }
}

/// A frame from a peer that `PeerLinks` does not handle itself (not link control).
public struct PeerFrame: Sendable {
    /// The configured name of the peer it came from.
    public var peer: String
    /// The link it came on: up when the frame was delivered.
    public var link: LinkID
    /// The frame, already checked (magic, version, length, checksum, flags).
    public var frame: Frame

    public init(peer: String, link: LinkID, frame: Frame) {
        self.peer = peer
        self.link = link
        self.frame = frame
    }
}

/// Why `PeerLinks` could not do what it was asked.
public enum PeerLinksError: Error, CustomStringConvertible {
    /// `send(_:to:)` named a peer that is not configured.
    case unknownPeer(String)
    /// `send(_:to:)` found no current link to the peer.
    case notConnected(String)
    /// `start()` was called twice, or after `stop()`.
    case alreadyStarted
    /// The listener could not be bound.
    case bindFailed(address: String, reason: String)

    public var description: String {
        switch self {
        case .unknownPeer(let name): return "no peer named \"\(name)\" is configured"
        case .notConnected(let name): return "peer \"\(name)\" is not connected"
        case .alreadyStarted: return "peer links were already started; make a new PeerLinks to start again"
        case .bindFailed(let address, let reason):
            return "cannot listen for peers on \(address): \(reason); "
                + "check that no other process uses the port and that the address belongs to this host"
        }
    }
}
