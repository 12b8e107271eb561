/// The state of one volume's link to one peer, as status shows it (issue 9, item 2).
public enum ReplicaLinkState: String, Sendable, Equatable, CaseIterable {
    /// No session with the peer (never connected, or reconnecting).
    case connecting
    /// The peer has never been consistent and is receiving its first full copy.
    case initialSync = "initial-sync"
    /// The peer was away and is receiving what its dirty bitmap names.
    case catchingUp = "catching-up"
    /// Every write reaches the peer as it happens (sync, semi-sync) or the journal streams to it
    /// within its bound (async).
    case inSync = "in-sync"
    /// async: the peer is behind its bound and writers are slowed (`on-lag: throttle`).
    case lagging
    /// sync, semi-sync: the peer is lost; writes go on and what it misses is in its bitmap.
    case degraded
    /// sync, semi-sync with `on-peer-loss: block`: the peer is lost and writes wait for it.
    case blocked
    /// async: the peer is past its bound; it is no longer journaled for and catches up from its
    /// bitmap (`on-lag: pull-ahead`).
    case pullAhead = "pull-ahead"
    /// scheduled: the last point is complete; the next comes at its time.
    case waitingForPoint = "waiting"
    /// scheduled: a point is being sent.
    case sendingPoint = "sending-point"
    /// The peer is a primary of the volume too, and both wrote since their histories parted:
    /// nothing moves either way until `ferry resolve` says which to keep (P6).
    case splitBrain = "split-brain"
    /// The peer holds another volume under this name (no generation in common): refused.
    case unrelated
}

/// A scheduled point, as the primary records it.
public struct PointRecord: Sendable, Equatable, Codable {
    /// The sequence the point was cut at: the replica holds every write up to it.
    public var seq: UInt64
    /// When it was cut (Unix seconds).
    public var cutAtSeconds: Int64
    /// When the replica acknowledged it durably (Unix seconds).
    public var completedAtSeconds: Int64
    /// Data bytes sent for it.
    public var bytes: UInt64
    public var regions: Int

    public init(seq: UInt64, cutAtSeconds: Int64, completedAtSeconds: Int64, bytes: UInt64, regions: Int) {
        self.seq = seq
        self.cutAtSeconds = cutAtSeconds
        self.completedAtSeconds = completedAtSeconds
        self.bytes = bytes
        self.regions = regions
    }
}

/// A time as the state machines see it: a monotonic clock for lags and timers, and the wall
/// clock (Unix seconds) for schedules and records. Both come from the caller (DESIGN §4).
public struct Instant: Sendable, Equatable {
    public var monotonicNanos: Int64
    public var wallSeconds: Int64

    public init(monotonicNanos: Int64, wallSeconds: Int64) {
        self.monotonicNanos = monotonicNanos
        self.wallSeconds = wallSeconds
    }
}
