/// How a volume's writes reach one replica (DESIGN.md §5.1), and so what the replica promises
/// when the primary is lost.
public enum ReplicationMode: String, Sendable, CaseIterable, Hashable {
    /// P1: a write is answered only once every connected sync peer has written it (a flush, once
    /// it is durable there): RPO 0 for connected peers.
    case sync
    /// P1: a write is answered once every semi-sync peer has *received* it: it survives the loss of
    /// the primary alone, not of both sites at once.
    case semiSync = "semi-sync"
    /// P2, P5: writes are journaled and streamed behind the client; lag is bounded by `max-lag`,
    /// and the replica is always at a state the primary passed through at a barrier.
    case async
    /// A point every interval (or at a time of day), sent as the regions changed since the last
    /// point and applied atomically: the replica is always at the last completed point.
    case scheduled
}

/// What a sync or semi-sync link does when its peer is lost (DESIGN.md §5.1, write path step 6).
public enum PeerLossPolicy: String, Sendable, CaseIterable {
    /// Keep answering writes; what the peer misses goes into its dirty bitmap (durably, before the
    /// client is answered) and status says RPO is no longer zero.
    case degrade
    /// Hold replies until the peer returns or is removed from the configuration.
    case block
}

/// What an async link does when it reaches its `max-lag` (P5).
public enum LagPolicy: String, Sendable, CaseIterable {
    /// Slow the writers down so that the lag stays within the bound.
    case throttle
    /// Stop journaling for the peer and track what it misses in its dirty bitmap; it catches up by
    /// a resync, and says so in status and logs.
    case pullAhead = "pull-ahead"
}

/// Whether replication frames are compressed.
public enum ReplicationCompression: String, Sendable, CaseIterable {
    /// zstd, where it makes a batch smaller.
    case zstd
    case none
}

/// How one volume replicates to one site: its mode and the options of that mode.
///
/// Options that do not apply to ``mode`` keep their defaults and are ignored (``ReplicaOption``
/// says which apply where; the configuration refuses them). An async policy always has a lag
/// bound: when neither ``maxLagBytes`` nor ``maxLagSeconds`` is given, ``maxLagBytes`` is
/// ``defaultMaxLagBytes``.
public struct ReplicaPolicy: Sendable, Equatable {
    public var mode: ReplicationMode
    /// sync and semi-sync: what to do when the peer is lost.
    public var onPeerLoss: PeerLossPolicy
    /// async: the most bytes of journal the peer may be behind.
    public var maxLagBytes: UInt64?
    /// async: the longest the peer may be behind, in seconds.
    public var maxLagSeconds: Int64?
    /// async: what to do at the lag bound.
    public var onLag: LagPolicy
    /// async: the largest the journal for this peer may grow on the primary.
    public var journalSizeBytes: UInt64
    public var compression: ReplicationCompression
    /// The most bytes per second an initial sync or resync sends; nil is unlimited.
    public var resyncRateBytesPerSecond: UInt64?
    /// scheduled (where it is required): when the points are taken.
    public var schedule: Schedule?

    /// The lag bound of an async replica that gives none.
    public static let defaultMaxLagBytes: UInt64 = 64 << 20
    /// The journal size of an async replica that gives none.
    public static let defaultJournalSizeBytes: UInt64 = 1 << 30

    public init(mode: ReplicationMode, onPeerLoss: PeerLossPolicy = .degrade, maxLagBytes: UInt64? = nil,
                maxLagSeconds: Int64? = nil, onLag: LagPolicy = .throttle,
                journalSizeBytes: UInt64 = ReplicaPolicy.defaultJournalSizeBytes,
                compression: ReplicationCompression = .zstd, resyncRateBytesPerSecond: UInt64? = nil,
                schedule: Schedule? = nil) {
        self.mode = mode
        self.onPeerLoss = onPeerLoss
        self.maxLagBytes = mode == .async && maxLagBytes == nil && maxLagSeconds == nil ? Self.defaultMaxLagBytes : maxLagBytes
        self.maxLagSeconds = maxLagSeconds
        self.onLag = onLag
        self.journalSizeBytes = journalSizeBytes
        self.compression = compression
        self.resyncRateBytesPerSecond = resyncRateBytesPerSecond
        self.schedule = schedule
    }
}

/// The options of a replica as the configuration names them, with the modes each applies to:
/// the one place that says which option goes with which mode.
public enum ReplicaOption: String, Sendable, CaseIterable {
    case onPeerLoss = "on-peer-loss"
    case maxLag = "max-lag"
    case onLag = "on-lag"
    case journalSize = "journal-size"
    case compression
    case resyncRate = "resync-rate"
    case every
    case at
    case on

    /// The modes this option applies to, in ``ReplicationMode/allCases`` order.
    public var modes: [ReplicationMode] {
        switch self {
        case .onPeerLoss: [.sync, .semiSync]
        case .maxLag, .onLag, .journalSize: [.async]
        case .compression, .resyncRate: ReplicationMode.allCases
        case .every, .at, .on: [.scheduled]
        }
    }

    public func applies(to mode: ReplicationMode) -> Bool { modes.contains(mode) }
}

/// A volume's `history:` window: points older than `seconds` go, and the oldest go while the
/// undo log is larger than `bytes` (the newest point always stays).
public struct HistoryLimit: Sendable, Equatable {
    public var seconds: Int64?
    public var bytes: UInt64?
    public init(seconds: Int64?, bytes: UInt64?) {
        self.seconds = seconds
        self.bytes = bytes
    }
}
