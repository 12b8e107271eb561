/// What the two ends of a volume link say to each other, as headers (DESIGN §5.1). A `write` or
/// `region` that carries data has its payload beside it on the wire; the state machines never
/// hold payload bytes, the runtime keeps them by stream index or sequence.
///
/// Every message from the primary carries the volume's epoch, and the replica refuses any whose
/// epoch is not the session's (P4); stream indexes start at 1 on each new link and have no gaps.
public enum ReplicationMessage: Sendable, Equatable {
    // primary → replica
    /// Opens a session on a new link; the replica answers with ``position(_:)`` or ``refuse(reason:)``.
    case open(VolumeOpen)
    /// A client write (or zeroing) in sequence order.
    case write(ReplicationItem)
    /// A block sent by a catch-up (initial sync, bitmap resync) or as part of a scheduled point.
    case region(ReplicationItem)
    /// Everything before it on the stream must be made durable and acked at `durable`.
    case barrier(ReplicationBarrier)
    /// Planned switchover (`ferry switchover`): the sender has stepped down, and this replica,
    /// holding every write through `seq`, is to take over as the primary. Sent after the
    /// sender's `refuse` ended its stream, outside any session.
    case handoff(VolumeHandoff)
    /// Online verify (`ferry verify`): hash your image's blocks of `blockSize` over the range and
    /// answer with ``hashes(id:_:)``. Outside any session; the image is only read.
    case verify(VerifyRequest)
    /// The answer to ``verify(_:)`` number `id`: XXH3-64 of each block in order, or none when
    /// the image could not be read.
    case hashes(id: UInt64, [UInt64])

    // replica → primary
    /// The replica's persisted position, answering `open`.
    case position(ReplicaPosition)
    /// Cumulative: every item up to `index` of this session reached `level`.
    case ack(level: AckLevel, index: UInt64)
    /// The replica will not take this stream; the link is reset.
    case refuse(reason: String)
}

/// The start of a volume session.
public struct VolumeOpen: Sendable, Equatable {
    public var volume: String
    public var epoch: UInt64
    public var generation: UInt64
    public var volumeSize: UInt64
    public var mode: ReplicationMode
    /// The sender's line of history, oldest first, ending with `generation` (at most
    /// ``maxHistory``), and how far into it the sender's image is: a site that is itself a
    /// primary of the volume decides from them which of the two gives way (``HistoryDecision``).
    public var history: [GenerationRecord]
    public var appliedSeq: UInt64
    /// Non-zero: the operator resolved a split brain here in favour of the sender, discarding the
    /// receiver's generation with this ID (`ferry resolve --keep` naming the sender).
    public var discards: UInt64

    /// The most generations an open carries (24 bytes each on the wire).
    public static let maxHistory = 4096

    public init(volume: String, epoch: UInt64, generation: UInt64, volumeSize: UInt64, mode: ReplicationMode,
                history: [GenerationRecord] = [], appliedSeq: UInt64 = 0, discards: UInt64 = 0) {
        self.volume = volume
        self.epoch = epoch
        self.generation = generation
        self.volumeSize = volumeSize
        self.mode = mode
        self.history = history
        self.appliedSeq = appliedSeq
        self.discards = discards
    }
}

/// A request to hash a range of a peer's image, block by block (online verify).
public struct VerifyRequest: Sendable, Equatable {
    public var id: UInt64
    public var offset: UInt64
    public var length: UInt64
    /// A power of two from 4 KiB to 64 MiB; the range holds at most ``maxBlocks`` of them.
    public var blockSize: UInt32

    public static let maxBlocks = 8192

    public init(id: UInt64, offset: UInt64, length: UInt64, blockSize: UInt32) {
        self.id = id
        self.offset = offset
        self.length = length
        self.blockSize = blockSize
    }

    /// Why the request is malformed, or nil.
    public var problem: String? {
        if blockSize < 4096 || blockSize > 64 << 20 || blockSize & (blockSize - 1) != 0 {
            return "block size \(blockSize) is not a power of two from 4096 to 67108864"
        }
        if length == 0 || offset.addingReportingOverflow(length).overflow { return "range at \(offset) of \(length) bytes is invalid" }
        if (length + UInt64(blockSize) - 1) / UInt64(blockSize) > UInt64(Self.maxBlocks) {
            return "range of \(length) bytes holds more than \(Self.maxBlocks) blocks of \(blockSize)"
        }
        return nil
    }
}

/// What a primary that stepped down for a switchover hands to the replica that takes over.
public struct VolumeHandoff: Sendable, Equatable {
    /// The epoch and generation the sender was the primary of.
    public var epoch: UInt64
    public var generation: UInt64
    /// Its last write: the replica takes over only if its image holds everything through it.
    public var seq: UInt64

    public init(epoch: UInt64, generation: UInt64, seq: UInt64) {
        self.epoch = epoch
        self.generation = generation
        self.seq = seq
    }
}

/// A write, zeroing, or catch-up block in the stream.
public struct ReplicationItem: Sendable, Equatable {
    public var epoch: UInt64
    /// Position in this session's stream (1, 2, 3, …).
    public var index: UInt64
    /// The primary's sequence number for a client write; 0 for a region.
    public var seq: UInt64
    public var range: BlockRange
    /// The range reads as zeros afterwards; no payload.
    public var isZero: Bool

    public init(epoch: UInt64, index: UInt64, seq: UInt64, range: BlockRange, isZero: Bool) {
        self.epoch = epoch
        self.index = index
        self.seq = seq
        self.range = range
        self.isZero = isZero
    }
}

public enum BarrierKind: UInt8, Sendable, Equatable, CustomStringConvertible {
    /// A client FLUSH or FUA write.
    case flush = 1
    /// Cut by the sender to make progress durable (and, for a logged replica, applicable).
    case cut = 2
    /// A catch-up starts: the replica is inconsistent until `catchUpEnd`.
    case catchUpBegin = 3
    /// A catch-up is complete: the replica holds the primary's state as of `seq`.
    case catchUpEnd = 4
    /// A scheduled point is complete: its regions are applied as one step.
    case point = 5

    public var description: String {
        switch self {
        case .flush: return "flush"
        case .cut: return "cut"
        case .catchUpBegin: return "catch-up begin"
        case .catchUpEnd: return "catch-up end"
        case .point: return "point"
        }
    }
}

public struct ReplicationBarrier: Sendable, Equatable {
    public var epoch: UInt64
    public var index: UInt64
    /// Every client write with a sequence number up to `seq` is before this barrier in the stream
    /// (or, for a point, in the point's regions).
    public var seq: UInt64
    public var kind: BarrierKind

    public init(epoch: UInt64, index: UInt64, seq: UInt64, kind: BarrierKind) {
        self.epoch = epoch
        self.index = index
        self.seq = seq
        self.kind = kind
    }
}

/// Where a replica is, persisted durably on its side (volume UUID and name are the runtime's).
public struct ReplicaPosition: Sendable, Equatable, Codable {
    public var epoch: UInt64
    public var generation: UInt64
    /// The last sequence whose state the image is at (valid when `consistent`).
    public var appliedSeq: UInt64
    /// The image equals a state of the primary (false during initial sync and catch-up).
    public var consistent: Bool
    /// The image has ever been consistent: an initial sync completed.
    public var initialized: Bool
    /// A demoted primary: the ranges it wrote that its new primary may lack, which that primary
    /// must send again (with what it wrote itself since it branched) to make the two equal. Nil
    /// once a catch-up completed.
    public var needs: [BlockRange]?
    /// Sent by a replica (not stored) to a primary of another generation whose line holds the
    /// replica's: `needs` names every block the image holds past P, the lower of `appliedSeq` and
    /// where that line leaves the replica's generation (from its ``WriteMap``, which has no
    /// unknown granule), so the image equals the line's state at P once those are overwritten.
    /// The primary may then send only what changed since P (a third site after a move).
    public var needsComplete: Bool?
    /// The line of history the image's generation belongs to, oldest first, ending with
    /// `generation`, as the primary that streamed it sent it in its `open`: a promotion here
    /// branches from it (the site's own recorded history may end elsewhere, after it followed
    /// a primary of another line). Persisted with the position; not sent on the wire.
    public var lineage: [GenerationRecord]?

    /// The most ranges a position carries (1 MiB on the wire); a demoted primary with more asks
    /// for a full copy instead.
    public static let maxNeeds = 65_536

    public init(epoch: UInt64 = 0, generation: UInt64 = 0, appliedSeq: UInt64 = 0, consistent: Bool = false, initialized: Bool = false,
                needs: [BlockRange]? = nil, lineage: [GenerationRecord]? = nil, needsComplete: Bool? = nil) {
        self.lineage = lineage
        self.needsComplete = needsComplete
        self.epoch = epoch
        self.generation = generation
        self.appliedSeq = appliedSeq
        self.consistent = consistent
        self.initialized = initialized
        self.needs = needs
    }

    /// A replica that has never received anything.
    public static let empty = ReplicaPosition()
}
