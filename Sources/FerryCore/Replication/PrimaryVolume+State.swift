/// One entry of the async journal: a write, a zeroing, or a flush barrier, in sequence order.
public struct JournalEntry: Sendable, Equatable, Codable {
    public var seq: UInt64
    public var range: BlockRange
    public var isZero: Bool
    public var isBarrier: Bool
    /// When it was written (monotonic), for the lag in seconds.
    public var atNanos: Int64

    public init(seq: UInt64, range: BlockRange, isZero: Bool, isBarrier: Bool, atNanos: Int64) {
        self.seq = seq
        self.range = range
        self.isZero = isZero
        self.isBarrier = isBarrier
        self.atNanos = atNanos
    }

    /// Payload bytes it carries.
    public var bytes: UInt64 { isZero || isBarrier ? 0 : range.length }
}



/// The journal's entries as the primary tracks them (the bytes are in the runtime's segment files).
///
/// Positions are absolute (they count every entry ever appended), so a sender's cursor stays
/// valid when trimmed entries are dropped from memory.
struct Journal: Sendable {
    private var entries: [JournalEntry] = []
    /// Bytes appended up to and including each entry.
    private var cumulative: [UInt64] = []
    /// Absolute position of `entries[0]`.
    private var base = 0
    /// Absolute position of the first live entry.
    private(set) var head = 0
    /// Every entry up to this sequence has been trimmed.
    var trimmedThrough: UInt64 = 0

    mutating func append(_ entry: JournalEntry) {
        entries.append(entry)
        cumulative.append((cumulative.last ?? 0) + entry.bytes)
    }

    var endPosition: Int { base + entries.count }
    var isEmpty: Bool { head == endPosition }
    var lastSeq: UInt64? { entries.last?.seq }

    func entry(at position: Int) -> JournalEntry { entries[position - base] }

    /// The absolute position of the first live entry with a sequence above `seq`.
    func position(after seq: UInt64) -> Int {
        var low = head - base, high = entries.count
        while low < high {
            let mid = (low + high) / 2
            if entries[mid].seq <= seq { low = mid + 1 } else { high = mid }
        }
        return base + low
    }

    /// Bytes of live entries with a sequence above `seq`.
    func bytes(after seq: UInt64) -> UInt64 {
        let p = position(after: seq) - base
        guard p < entries.count else { return 0 }
        // `cumulative` counts from the first entry ever appended, also after trimmed entries are
        // dropped from memory: what came before entries[p] is cumulative[p] less its own bytes.
        let before = cumulative[p] - entries[p].bytes
        return (cumulative.last ?? 0) - before
    }

    func oldestNanos(after seq: UInt64) -> Int64? {
        let p = position(after: seq) - base
        return p < entries.count ? entries[p].atNanos : nil
    }

    /// Whether a replica at `seq` can be brought forward from here alone.
    func covers(_ seq: UInt64) -> Bool { seq >= trimmedThrough }

    func live(after seq: UInt64) -> ArraySlice<JournalEntry> { entries[(position(after: seq) - base)...] }

    mutating func trim(through seq: UInt64) {
        head = position(after: seq)
        trimmedThrough = max(trimmedThrough, seq)
        let dead = head - base
        if dead > 4096, dead * 2 > entries.count {
            entries.removeFirst(dead)
            cumulative.removeFirst(dead)
            base = head
        }
    }
}

/// A sent item the peer has not yet acked `durable`.
struct SentItem: Sendable {
    enum Kind: Sendable, Equatable {
        case write(seq: UInt64)
        case regions(Range<Int>, forPoint: Bool)
        case barrier(BarrierKind, seq: UInt64)
    }
    var index: UInt64
    var kind: Kind
    var range: BlockRange?
    var bytes: UInt64
    /// When it was sent (monotonic ns), for the ack latency metric.
    var sentAt: Int64 = 0
}

/// One live session of a volume with a peer, on one link.
struct Session: Sendable {
    var link: LinkID
    /// The peer answered `open` with its position: streaming.
    var open = false
    var nextIndex: UInt64 = 1
    var ackedReceived: UInt64 = 0
    var ackedWritten: UInt64 = 0
    var ackedDurable: UInt64 = 0
    /// The highest sequence the peer holds durably: the `seq` of the last barrier (other than a
    /// catch-up's begin) it acked `durable` in this session.
    var durableSeq: UInt64 = 0
    var unacked: [SentItem] = []
    var unackedHead = 0
    var unackedBytes: UInt64 = 0
    /// Sent and not yet acked `received`: what the window limits.
    var notReceived: [(index: UInt64, bytes: UInt64)] = []
    var notReceivedHead = 0
    var notReceivedBytes: UInt64 = 0
    /// async: the journal position to send next.
    var journalCursor: Int?
    var bytesSinceCut: UInt64 = 0
    var lastCutAt: Int64 = 0
    var lastSentSeq: UInt64 = 0
    var lastWasBarrier = true
    var catchUp: CatchUp?
    /// Catch-up regions sent and not yet durable, by region → stream index.
    var regionsInFlight: [Int: UInt64] = [:]
    /// Regions waiting in the lock to be read, and how many reads (runs of regions) that is.
    var readsQueued: Set<Int> = []
    var readRuns = 0
    /// Barriers sent, index → sequence, until acked `received` (for the journal position).
    var barrierSeqs: [(index: UInt64, seq: UInt64)] = []

    /// When the session began, and when the peer last acked anything (for the session watchdogs).
    var startedAt: Int64
    var lastProgressAt: Int64

    init(link: LinkID, now: Int64) {
        self.link = link
        self.lastCutAt = now
        self.startedAt = now
        self.lastProgressAt = now
    }

    func acked(_ level: AckLevel) -> UInt64 {
        switch level {
        case .received: return max(ackedReceived, ackedWritten, ackedDurable)
        case .written: return max(ackedWritten, ackedDurable)
        case .durable: return ackedDurable
        }
    }

    var unackedCount: Int { unacked.count - unackedHead }

    mutating func take() -> UInt64 {
        defer { nextIndex += 1 }
        return nextIndex
    }

    var inFlightCount: Int { notReceived.count - notReceivedHead }

    mutating func record(at now: Int64, _ item: SentItem) {
        var item = item
        item.sentAt = now
        // The stall watchdog counts from when something is first in flight (set at the next tick).
        if inFlightCount == 0 { lastProgressAt = -1 }
        unacked.append(item)
        unackedBytes += item.bytes
        notReceived.append((item.index, item.bytes))
        notReceivedBytes += item.bytes
        if case .barrier = item.kind {
            lastWasBarrier = true
            bytesSinceCut = 0
        } else {
            lastWasBarrier = false
            bytesSinceCut += item.bytes
        }
    }

    mutating func popReceived(through index: UInt64) {
        while notReceivedHead < notReceived.count, notReceived[notReceivedHead].index <= index {
            notReceivedBytes -= notReceived[notReceivedHead].bytes
            notReceivedHead += 1
        }
        if notReceivedHead > 1024, notReceivedHead * 2 > notReceived.count {
            notReceived.removeFirst(notReceivedHead)
            notReceivedHead = 0
        }
    }

    /// Removes and returns items acked durable up to `index`.
    mutating func popDurable(through index: UInt64) -> [SentItem] {
        var popped: [SentItem] = []
        while unackedHead < unacked.count, unacked[unackedHead].index <= index {
            popped.append(unacked[unackedHead])
            unackedBytes -= unacked[unackedHead].bytes
            unackedHead += 1
        }
        if unackedHead > 1024, unackedHead * 2 > unacked.count {
            unacked.removeFirst(unackedHead)
            unackedHead = 0
        }
        return popped
    }

    var pendingItems: ArraySlice<SentItem> { unacked[unackedHead...] }

    /// When the item with stream index `index` was sent, while it waits for its durable ack.
    func sentAt(index: UInt64) -> Int64? {
        var low = unackedHead, high = unacked.count
        while low < high {
            let mid = (low + high) / 2
            if unacked[mid].index < index { low = mid + 1 } else { high = mid }
        }
        return low < unacked.count && unacked[low].index == index ? unacked[low].sentAt : nil
    }
}

struct CatchUp: Sendable {
    var cursor = 0
    var initial: Bool
    /// The stream index of the catch-up's end barrier, once sent.
    var endIndex: UInt64?
    var totalBytes: UInt64
    /// When it began (monotonic nanoseconds): the rate so far gives status its ETA.
    var startedAt: Int64 = 0
}

/// A scheduled point being sent: the regions dirty at the cut, read as they were at the cut.
struct Point: Sendable {
    var seq: UInt64
    var cutAt: Int64
    var regions: DirtyBitmap
    var cursor = 0
    var sent: Set<Int> = []
    var readsQueued: Set<Int> = []
    var readRuns = 0
    /// Regions copied aside before a later write changed them.
    var preserved: Set<Int> = []
    var bytes: UInt64 = 0
    var barrierIndex: UInt64?
}

/// Everything the primary keeps about one peer of one volume.
struct PeerState: Sendable {
    var name: String
    var policy: ReplicaPolicy
    var session: Session?
    var dirty: DirtyBitmap
    var initialSyncPending: Bool
    /// async: streaming from the journal (its bitmap is then empty).
    var journaled = false
    /// async: every journal entry up to this sequence is in the peer's receive log.
    var ackedSeq: UInt64 = 0
    var point: Point?
    var lastPoint: PointRecord?
    var nextPointAt: Int64?
    var pointRequested = false
    var dirtySince: Int64?
    /// The persist token that will hold the latest bit set in the bitmap.
    var lastDirtyToken: UInt64 = 0
    var state: ReplicaLinkState = .connecting
    var reason = "not connected yet"
    /// The peer is a primary of the volume too and the handshake could not settle which gives
    /// way (split brain, unrelated): what it said, until it opens as something else.
    var rival: Rival?
    /// The epoch of a rival from before a restart (``PrimaryVolume/Metadata/Peer/rivalEpoch``).
    var formerRivalEpoch: UInt64?
    /// `ferry resolve --keep` named this site against the peer's generation with this ID: the
    /// opens to the peer say so, and it gives way.
    var discarding: UInt64?
    /// The full copy under way replaces an image that holds a state (of another line, or one
    /// this site cannot compare with its own): status says so, not "first full copy".
    var copyReplacesData = false
    var bytesSent: UInt64 = 0
    var lastAckAt: Int64?
    /// `resync-rate`: bytes the catch-up may still read now (a token bucket refilled with time).
    var resyncTokens: Double = 0
    var resyncRefilledAt: Int64?
    /// Catch-up progress changed since the bitmap was last persisted.
    var progressUnpersisted = false
    var lastProgressPersist: Int64 = 0

    init(name: String, policy: ReplicaPolicy, dirty: DirtyBitmap, initialSyncPending: Bool) {
        self.name = name
        self.policy = policy
        self.dirty = dirty
        self.initialSyncPending = initialSyncPending
    }

    var isDirect: Bool { policy.mode == .sync || policy.mode == .semiSync }

    /// Moves the session out (nil left behind), so that while it is changed it alone holds its
    /// arrays (appending copies nothing), and no copy of it is made on the way.
    mutating func takeSession() -> Session? {
        var taken: Session?
        swap(&taken, &session)
        return taken
    }

    /// Whether the session is on `link`. `mutating` though it changes nothing, so that it reads
    /// the peer where it lies in the dictionary (`peers[name]?.hasSession(on:)` goes through
    /// `_modify`): the getter copies the whole state.
    mutating func hasSession(on link: LinkID) -> Bool { session?.link == link }
}

/// What status shows for one peer of a volume.
/// How long one ack took: from sending the item it names to the ack's arrival.
public struct AckSample: Sendable, Equatable {
    public var peer: String
    public var level: AckLevel
    public var nanos: Int64
}

public struct ReplicaLinkStatus: Sendable, Equatable {
    public var peer: String
    public var mode: ReplicationMode
    public var state: ReplicaLinkState
    public var reason: String
    public var connected: Bool
    /// The peer's copy equals a state of the primary (false during initial sync and catch-up).
    public var consistent: Bool
    public var lagBytes: UInt64
    public var lagSeconds: Double
    public var dirtyBytes: UInt64
    public var inFlightBytes: UInt64
    /// Initial sync or catch-up: bytes left and total.
    public var syncRemainingBytes: UInt64?
    public var syncTotalBytes: UInt64?
    /// Seconds left at the rate the sync has gone so far (nil in its first second, or before
    /// anything arrived).
    public var syncETASeconds: Double?
    public var bytesSent: UInt64
    /// async: journal bytes the peer has not acknowledged, and the most it may hold
    /// (`journal-size`); nil for other modes. Not journaled (pull-ahead, catching up): 0.
    public var journalBytes: UInt64? = nil
    public var journalLimitBytes: UInt64? = nil
    public var lastPoint: PointRecord?
    public var nextPointAt: Int64?
    /// RPO is zero: a sync peer with a session and nothing dirty.
    public var rpoZero: Bool
}

extension PrimaryVolume {
    /// `name`'s state, taken out of `peers` for a change: a copy left in the dictionary would
    /// share the state's arrays (its bitmap, its session's sent items), so every change to them
    /// would copy them whole. The caller puts it back (`peers[name] = peer`) on every path.
    mutating func takePeer(_ name: String) -> PeerState? {
        peers.removeValue(forKey: name)
    }
}
