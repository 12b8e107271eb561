import FerryCore
import FerryWire
import Foundation
import NIOCore

/// What a volume runtime needs from the peer links: ordered, non-blocking sends on one link, and
/// closing a link. FerrySite adapts `PeerLinks` to it; tests can plug in their own.
public protocol VolumeLinks: Sendable {
    /// Queues `frames` on `link` in call order and flushes once. False (nothing sent) when `link`
    /// is no longer the peer's current link.
    @discardableResult
    func send(_ frames: [VolumeFrame], to peer: String, link: LinkID) -> Bool
    /// Closes `link` with `reason` (sent to the other side).
    func close(peer: String, link: LinkID, reason: String)
    /// Schedules `work` on `link`'s event loop, to run once what it is doing now is done (after
    /// the frames it is reading). False, and nothing scheduled, when `link` is not a current link:
    /// the caller does the work itself. The default schedules nothing.
    func afterCurrentTurn(of link: LinkID, _ work: @escaping @Sendable () -> Void) -> Bool
    /// Schedules `work` on `link`'s event loop to run after the frames queued on `link` so far
    /// are written, when called on that loop. False, and nothing scheduled, elsewhere: the caller
    /// does the work itself. The default schedules nothing.
    func afterQueuedFrames(on link: LinkID, _ work: @escaping @Sendable () -> Void) -> Bool
    /// Whether `link` has more queued than its socket takes (the link, not the sender, is the
    /// bottleneck): then compressing data is worth its CPU. The default says no.
    func isBacklogged(link: LinkID) -> Bool
}

extension VolumeLinks {
    public func afterCurrentTurn(of link: LinkID, _ work: @escaping @Sendable () -> Void) -> Bool { false }
    public func afterQueuedFrames(on link: LinkID, _ work: @escaping @Sendable () -> Void) -> Bool { false }
    public func isBacklogged(link: LinkID) -> Bool { false }
}

/// The clocks a runtime reads: monotonic for lags and timers, wall for schedules and records.
public struct VolumeClock: Sendable {
    public var now: @Sendable () -> Instant

    public init(now: @escaping @Sendable () -> Instant) { self.now = now }

    /// The real clocks.
    public static let system = VolumeClock {
        Instant(monotonicNanos: Int64(DispatchTime.now().uptimeNanoseconds),
                wallSeconds: Int64(Date().timeIntervalSince1970))
    }
}

/// Something a runtime reports for the log and status: a link's state change, an I/O error.
public struct VolumeEvent: Sendable {
    public enum Kind: Sendable {
        case linkState(peer: String, state: ReplicaLinkState)
        case ioError
        case fenced
        case refused(peer: String)
        /// The handshake decided this primary gives way to a peer: the site makes it a secondary.
        case rejoin(Rejoin)
        /// The primary (`peer`) stepped down for a switchover and handed the volume to this replica.
        case takeOver(peer: String)
        /// This primary took a new epoch (``PrimaryVolume/Action/epochChanged(_:reason:)``): the site records it.
        case epochChanged(UInt64)
    }
    public var volume: String
    public var kind: Kind
    public var message: String
}
