/// The primary's side of one volume's replication to all its peers (fan-out): a pure state
/// machine in the postgres-nio style — events in, actions out, no I/O, time passed in (DESIGN §4).
/// The runtime (FerryVolume) and the simulation (FerrySimulationTests) execute its actions.
///
/// ## The write path (DESIGN §5.1)
/// 1. ``submit(_:now:)`` gives the request the next sequence number. A write to an extent not in
///    the activity log waits until the log is persisted with it (``Action/persist(token:_:)``).
/// 2. Requests pass the ``IntervalLock`` in sequence order. On admission a write is executed
///    locally (``Action/executeLocal(seq:)``), appended to the journal when the volume has async
///    peers, and sent at once to every sync and semi-sync peer with a session; for peers without
///    one it is marked in their dirty bitmaps.
/// 3. The client's reply (``Action/complete(seq:error:)``) waits for the local write and, per peer:
///    sync — ack `written` (`durable` for FUA and FLUSH); semi-sync — ack `received`; a lost peer
///    with `on-peer-loss: degrade` — its bitmap persisted with the write's regions; `block` — the
///    peer back and caught up past the write; async with `on-lag: throttle` over its bound — the
///    lag back under it.
///
/// Acks are counted only from the link they were sent on: a link that went down takes its
/// unacknowledged items with it (they become dirty regions), and anything still arriving for it
/// is ignored.
public struct PrimaryVolume: Sendable {
    public struct Config: Sendable {
        /// The dirty-bitmap region size for a volume of `size` bytes: 4 KiB (a point or a catch-up
        /// sends no more than the blocks that changed) for volumes up to 1 GiB; past that, as small
        /// as keeps a volume at 2^18 regions (a 32 KiB bitmap per peer, persisted with the
        /// metadata), up to 1 MiB (a 4 TiB volume has 2^22). Adjacent dirty regions go as one item
        /// (``runBytes``), so small regions cost no more per byte sent.
        public static func regionSize(forVolumeSize size: UInt64) -> UInt64 {
            var region: UInt64 = 4096
            while region < (1 << 20), size / region > (1 << 18) { region <<= 1 }
            return region
        }

        public var volume: String
        public var volumeSize: UInt64
        public var epoch: UInt64
        public var generation: UInt64
        public var peers: [String: ReplicaPolicy]
        /// The generations this volume's image descends from, oldest first, ending with the
        /// current one: recorded at each promotion. Empty for a volume never promoted, whose one
        /// generation is `generation` (``lineage`` supplies it).
        public var history: [GenerationRecord] = []
        /// ``history`` ending with the current generation: what the handshake compares (P6).
        public var lineage: [GenerationRecord] {
            history.last?.id == generation ? history : history + [GenerationRecord(id: generation, epoch: epoch, branchSeq: 0)]
        }
        /// The generations this one descends from: a peer whose image is on one of them holds a
        /// shared past, and gets only what differs (failback).
        public var ancestors: Set<UInt64> { Set(lineage.map(\.id)).subtracting([generation]) }
        /// This site's place among the volume's sites sorted by name, and their number: the
        /// epochs it may take (``RoleChange/nextEpoch(after:siteIndex:siteCount:)``).
        public var siteIndex = 0
        public var siteCount = 1
        /// Keep an ``AckSample`` per ack for ``takeAckSamples()`` (the metrics listener is on).
        public var recordsAckLatency = false
        /// Dirty-bitmap granularity.
        public var regionSize: UInt64 = 64 << 10
        /// Adjacent dirty regions are read and sent as one item of up to this many bytes.
        public var runBytes: UInt64 = 1 << 20
        /// Activity-log granularity.
        public var extentSize: UInt64 = 4 << 20
        /// Extents the activity log may hold before the primary checkpoints on its own.
        public var activityLogCapacity: Int = 256
        /// Bulk items (journal entries, catch-up and point regions) in flight per link before
        /// more wait. Client writes to sync and semi-sync peers are never held by the window:
        /// the client's queue depth bounds them.
        public var windowItems: Int = 512
        /// Bulk bytes in flight per link. All volumes to a peer share one TLS connection, so this
        /// bounds how long a sync write of another volume (or a heartbeat) can queue behind bulk
        /// traffic: 8 MiB is 8 ms at 1 GB/s, 0.7 s at 100 Mbit/s (BENCHMARKS.md, "links under load").
        public var windowBytes: UInt64 = 8 << 20
        /// A barrier is cut after this many bytes on a stream, so acks become durable and the
        /// primary can forget what it sent.
        public var cutBytes: UInt64 = 4 << 20
        /// ... or when the stream has been idle-ish this long with something uncut.
        public var cutIntervalNanos: Int64 = 50_000_000
        /// The cut for sync and semi-sync peers, whose writes the replica applies as they arrive:
        /// a cut there costs an fdatasync of the replica's image, so it comes only after this many
        /// bytes or this long (the kernel's own writeback runs every 5 s). What a cut bounds is
        /// what the primary resends after the replica loses power: at most this much. Every 4 MiB,
        /// the replica's flushes took a third of its CPU at 4 KiB writes (BENCHMARKS.md, sync).
        public var directCutBytes: UInt64 = 256 << 20
        public var directCutIntervalNanos: Int64 = 1_000_000_000
        /// Sequence numbers reserved at a time: the reservation is persisted before a number in
        /// it is used, so after a crash the primary continues above every number it ever gave out.
        public var sequenceReservation: UInt64 = 1 << 20
        /// A session whose peer has not answered `open` within this long, or that has items in
        /// flight and no ack for this long, is reset (the link closed and redialed): a frame lost
        /// in a link switch-over must not stall replication for good.
        public var sessionTimeoutNanos: Int64 = 15_000_000_000
        /// A volume that took no write for this long checkpoints on its own, so its activity log
        /// empties: after a crash (or when it rejoins a promoted peer) an idle volume resyncs and
        /// keeps aside nothing, even if its client never flushed.
        public var idleCheckpointNanos: Int64 = 2_000_000_000
        /// Test-only: a deliberate bug, to show the simulation's checkers catch it.
        var plantedBug: PlantedBug?

        public init(volume: String, volumeSize: UInt64, epoch: UInt64, generation: UInt64, peers: [String: ReplicaPolicy]) {
            self.volume = volume
            self.volumeSize = volumeSize
            self.epoch = epoch
            self.generation = generation
            self.peers = peers
        }
    }

    /// What the primary persisted about a volume's replication (the runtime stores it).
    public struct Metadata: Sendable, Equatable, Codable {
        public struct Peer: Sendable, Equatable, Codable {
            /// The dirty bitmap's words (regions the peer may be missing, a point in progress included).
            public var dirtyWords: [UInt64]
            /// The peer's first full copy has started and not finished: resume it, don't restart it.
            public var initialSyncPending: Bool
            public var lastPoint: PointRecord?
            /// async: the peer was being streamed from the journal (what it lacks is in the
            /// journal after its position, not in the bitmap).
            public var journaled: Bool
            /// async: the journal sequence the peer had acknowledged (durable in its receive log)
            /// when this was stored; after a restart what follows it is what the peer may lack.
            public var ackedSeq: UInt64?
            /// The epoch the peer was a rival primary at (a split brain), while this site has not
            /// yet taken an epoch above it: when the peer gives way (`ferry resolve` there), this
            /// site still knows, after a restart too, that the sites which followed it refuse
            /// older epochs (found by the failover simulation, seed 700020).
            public var rivalEpoch: UInt64?
            /// Since when (wall-clock seconds) the peer's bitmap has held something: its lag in
            /// seconds goes on from there after a restart, rather than from the restart.
            public var dirtySince: Double?
            public init(dirtyWords: [UInt64], initialSyncPending: Bool, lastPoint: PointRecord?, journaled: Bool = false,
                        ackedSeq: UInt64? = nil, rivalEpoch: UInt64? = nil, dirtySince: Double? = nil) {
                self.dirtySince = dirtySince
                self.dirtyWords = dirtyWords
                self.initialSyncPending = initialSyncPending
                self.lastPoint = lastPoint
                self.journaled = journaled
                self.ackedSeq = ackedSeq
                self.rivalEpoch = rivalEpoch
            }
        }
        /// Extents that may have writes not yet on every peer (DESIGN §2 "activity log").
        public var activityLog: [Int]
        public var peers: [String: Peer]
        public var lastSeq: UInt64
        /// No sequence above this has been given out.
        public var sequenceCeiling: UInt64
        /// The bitmaps' region size (a bitmap of another granularity is not trusted).
        public var regionSize: UInt64
        /// Per granule of the volume (a run of activity-log extents, at most 4096 granules): the
        /// sequence of the last write this primary took there (`UInt64.max` after a crash, for
        /// extents that were in the activity log). What a site that gives way keeps aside
        /// beyond its peers' bitmaps: every granule it wrote after the other line branched off.
        /// Nil in metadata written before it existed. One figure alone stands for every granule
        /// (a promotion's first metadata: its branch sequence).
        public var lastWrites: [UInt64]?
        /// `lastWrites` also cover the line before this site's promotion: they started from what
        /// the replica here saw (``WriteMap``), not from one figure. A peer holding an older state
        /// of the line is then sent the granules written after it instead of a full copy.
        public var lastWritesCoverLine: Bool
        public init(activityLog: [Int] = [], peers: [String: Peer] = [:], lastSeq: UInt64 = 0, sequenceCeiling: UInt64 = 0,
                    regionSize: UInt64 = 0, lastWrites: [UInt64]? = nil, lastWritesCoverLine: Bool = false) {
            self.lastWrites = lastWrites
            self.lastWritesCoverLine = lastWritesCoverLine
            self.activityLog = activityLog
            self.peers = peers
            self.lastSeq = lastSeq
            self.sequenceCeiling = sequenceCeiling
            self.regionSize = regionSize
        }
    }

    public enum Request: Sendable, Equatable {
        case write(BlockRange, fua: Bool)
        case zero(BlockRange, fua: Bool)
        case flush
    }

    public enum Action: Sendable, Equatable {
        /// Write (or zero) request `seq`'s range on the local image; report ``localDone(seq:error:)``.
        case executeLocal(seq: UInt64)
        /// fdatasync the image (and the journal); report ``localDone(seq:error:)`` for flush `seq`.
        case flushLocal(seq: UInt64)
        /// Append to the async journal (its payload is request `seq`'s).
        case appendJournal(JournalEntry)
        /// Drop journal entries up to and including `seq`.
        case trimJournal(throughSeq: UInt64)
        /// Persist the metadata durably, in token order; report ``persisted(token:)``.
        case persist(token: UInt64, Metadata)
        /// Send a message on the link. A `write` item's payload is request `item.seq`'s (from the
        /// request, or from the journal once the request is answered).
        case send(peer: String, LinkID, ReplicationMessage)
        /// Read `item.range` from the image now (or, `preserved`, the copy kept for the point) and
        /// send it as a `region`. A range that reads as zeros may go as `isZero`.
        case sendRegion(peer: String, LinkID, ReplicationItem, preserved: Bool)
        /// Copy the range's current bytes aside for the peer's point before it is overwritten.
        case preserve(peer: String, BlockRange)
        /// The point is done or abandoned: drop its preserved copies.
        case dropPreserved(peer: String)
        /// Answer the client.
        case complete(seq: UInt64, error: String?)
        /// Close the link (with `reason` for the other side).
        case closeLink(peer: String, LinkID, reason: String)
        /// A peer has a newer epoch: this site must stop accepting writes for the volume (P4).
        case fence(reason: String)
        /// The handshake with another primary of the volume decided this site's line of history
        /// gives way (a former primary back after a promotion elsewhere, or the loser of a split
        /// brain the operator resolved): after the fence, keep aside what the peer lacks and
        /// become its secondary (P6).
        case rejoin(Rejoin)
        /// This primary took a new epoch (``Config/epoch``; same generation): a rival with a
        /// newer one gave way to it, and the sites that followed that rival refuse anything
        /// older. Record it; every session was reset so the peers hear the new one.
        case epochChanged(UInt64, reason: String)
        /// A link changed state; for the log and status.
        case stateChanged(peer: String, ReplicaLinkState, reason: String)
    }

    // MARK: - State

    struct Pending: Sendable {
        enum Kind: Sendable { case write, zero, flush, internalFlush }
        enum Wait: Sendable, Equatable {
            case ack(peer: String, LinkID, index: UInt64, level: AckLevel)
            case persist(UInt64)
            case peerClear(String)
            case throttle(String)
        }
        var kind: Kind
        var range: BlockRange?
        var fua: Bool
        var admitted = false
        var localDone = false
        var localIssued = false
        var error: String?
        var waits: [Wait] = []
        /// Checkpoint (flush) only: waits for durability everywhere before the activity log is trimmed.
        var checkpointWaits: [Wait] = []
        var clientAnswered = false
        /// Its place in the lock while it holds one.
        var ticket: IntervalLock.Ticket?
    }

    var config: Config
    var lastSeq: UInt64
    var sequenceCeiling: UInt64
    /// Highest sequence admitted by the lock: every request up to it is admitted (a prefix).
    var lastAdmitted: UInt64
    var requests = RequestTable<Pending>()
    /// Flushes admitted and not yet issued locally (``issueFlushes`` has work only then).
    var flushesWaiting = 0
    var lock = IntervalLock()
    var nextTicket: IntervalLock.Ticket = 1
    var tickets: [IntervalLock.Ticket: TicketOwner] = [:]
    var admissionQueue: [IntervalLock.Ticket] = []
    var admitting = false
    /// Requests waiting for the activity log before they may enter the lock, in order.
    var gate: [(seq: UInt64, token: UInt64?)] = []
    var peers: [String: PeerState] = [:]
    var peerOrder: [String]

    var activityLog: Set<Int>
    var extentLastSeq: [Int: UInt64] = [:]
    /// ``Metadata/lastWrites``, and how many extents one granule spans.
    var lastWrites: [UInt64]
    /// ``Metadata/lastWritesCoverLine``.
    var lastWritesCoverLine = false
    /// How many peers were caught up with what changed since the older state of this line they
    /// held (``changedSince(_:)``), not with a full copy (for the simulation's report).
    public internal(set) var catchUpsFromLine = 0
    let extentsPerGranule: Int
    var journal = Journal()
    var journalEnabled: Bool
    /// Ack latencies since the last ``takeAckSamples()`` (``Config/recordsAckLatency``).
    var ackSamples: [AckSample] = []

    /// The sequence the image is exactly at when no request is in flight (every write taken is
    /// done; a catch-up's reads change nothing): what `ferry demote` may record as a consistent
    /// state. Nil while a request is under way.
    public var idleSequence: UInt64? {
        requests.isEmpty && gate.isEmpty && lastAdmitted == lastSeq ? lastAdmitted : nil
    }

    /// What sequence last wrote each granule of the image, as a replica's ``WriteMap`` (a figure
    /// is an upper bound, `.max` unknown): what a site that steps down knows of its image.
    public func writeMap() -> WriteMap? {
        WriteMap(volumeSize: config.volumeSize, extentSize: config.extentSize, figures: lastWrites)
    }

    /// The ack latencies recorded since the last call.
    public mutating func takeAckSamples() -> [AckSample] {
        defer { ackSamples.removeAll(keepingCapacity: true) }
        return ackSamples
    }

    var nextToken: UInt64 = 1
    var persistedToken: UInt64 = 0
    var persistNeeded = false
    var internalCheckpointRunning = false
    /// The sequence of the last checkpoint the primary started on its own.
    var lastCheckpointSeq: UInt64 = 0
    /// When the last request was admitted (for the idle checkpoint).
    var lastSubmitAt: Int64 = 0
    var fenced = false
    var now = Instant(monotonicNanos: 0, wallSeconds: 0)

    enum TicketOwner: Sendable {
        case request(UInt64)
        case regionRead(peer: String, LinkID, regions: Range<Int>, forPoint: Bool)
    }

    /// Starts from what was persisted. `cleanShutdown` false (a crash): every extent in the
    /// activity log becomes dirty for every peer, since writes there may not have reached them.
    /// `journal`: the durable journal entries, oldest first.
    public init(config: Config, metadata: Metadata, cleanShutdown: Bool, journal: [JournalEntry], now: Instant) {
        self.config = config
        // After a crash, numbers up to the ceiling may have reached peers: continue above them.
        self.lastSeq = max(cleanShutdown ? metadata.lastSeq : metadata.sequenceCeiling, metadata.lastSeq, journal.last?.seq ?? 0)
        self.sequenceCeiling = max(metadata.sequenceCeiling, lastSeq)
        self.lastAdmitted = lastSeq
        self.activityLog = Set(metadata.activityLog)
        let extentCount = Int((config.volumeSize + config.extentSize - 1) / max(1, config.extentSize))
        self.extentsPerGranule = max(1, (extentCount + 4095) / 4096)
        let granules = (extentCount + extentsPerGranule - 1) / extentsPerGranule
        if let saved = metadata.lastWrites, saved.count == granules {
            self.lastWrites = saved
            self.lastWritesCoverLine = metadata.lastWritesCoverLine
        } else if let saved = metadata.lastWrites, saved.count == 1 {
            // One figure for every granule: a promotion's (the image is its generation's base,
            // which every line branching from it holds; nothing is written here above it yet).
            self.lastWrites = Array(repeating: saved[0], count: granules)
        } else {
            // Unknown (older metadata of a volume that took writes): any granule may have been written at any time.
            self.lastWrites = Array(repeating: metadata.lastSeq == 0 ? 0 : .max, count: granules)
        }
        if !cleanShutdown {
            for extent in activityLog where extent / extentsPerGranule < lastWrites.count { lastWrites[extent / extentsPerGranule] = .max }
        }
        self.journalEnabled = config.peers.values.contains { $0.mode == .async }
        self.peerOrder = config.peers.keys.sorted()
        self.now = now
        for entry in journal { self.journal.append(entry) }
        self.journal.trimmedThrough = journal.first.map { $0.seq - 1 } ?? metadata.lastSeq
        for name in peerOrder {
            let policy = config.peers[name]!
            let saved = metadata.peers[name]
            var dirty = DirtyBitmap(volumeSize: config.volumeSize, regionSize: config.regionSize, words: saved?.dirtyWords ?? [])
            let initialPending = saved?.initialSyncPending ?? true
            if saved == nil || (metadata.regionSize != 0 && metadata.regionSize != config.regionSize) { dirty.setAll() }
            if !cleanShutdown {
                for extent in activityLog { dirty.set(extentRange(extent)) }
            }
            var peer = PeerState(name: name, policy: policy, dirty: dirty, initialSyncPending: initialPending)
            peer.lastPoint = saved?.lastPoint
            peer.journaled = policy.mode == .async && (saved?.journaled ?? false)
            // What it acknowledged before the restart stays acknowledged (the stored figure may lag
            // the real one, never lead it: it is stored after the ack arrived).
            peer.ackedSeq = max(self.journal.trimmedThrough, peer.journaled ? saved?.ackedSeq ?? 0 : 0)
            if let schedule = policy.schedule {
                peer.nextPointAt = schedule.nextPoint(afterSeconds: peer.lastPoint?.cutAtSeconds ?? now.wallSeconds)
            }
            peer.formerRivalEpoch = saved?.rivalEpoch
            if peer.dirtySince == nil, !dirty.isEmpty {
                // Carried over a restart by the wall clock (never later than now).
                let ago = saved?.dirtySince.map { max(0, Double(now.wallSeconds) - $0) } ?? 0
                peer.dirtySince = now.monotonicNanos - Int64(min(ago, 1e9) * 1e9)
            }
            peers[name] = peer
        }
        if !cleanShutdown { persistNeeded = true }
    }

    func extentRange(_ extent: Int) -> BlockRange {
        let start = UInt64(extent) * config.extentSize
        return BlockRange(offset: start, length: min(config.extentSize, config.volumeSize - start))
    }

    func extents(of range: BlockRange) -> ClosedRange<Int>? {
        guard range.length > 0, range.offset < config.volumeSize else { return nil }
        return Int(range.offset / config.extentSize)...Int((min(range.end, config.volumeSize) - 1) / config.extentSize)
    }

    /// Actions to take at start-up (a persist after a crash).
    public mutating func start() -> [Action] {
        var out: [Action] = []
        finish(&out)
        return out
    }

    // MARK: - Client requests

    /// Accepts a client request; returns its sequence number and what to do.
    public mutating func submit(_ request: Request, now: Instant) -> (seq: UInt64, actions: [Action]) {
        self.now = now
        lastSubmitAt = now.monotonicNanos
        var out: [Action] = []
        lastSeq += 1
        let seq = lastSeq
        var pending: Pending
        switch request {
        case .write(let range, let fua): pending = Pending(kind: .write, range: range, fua: fua)
        case .zero(let range, let fua): pending = Pending(kind: .zero, range: range, fua: fua)
        case .flush: pending = Pending(kind: .flush, range: nil, fua: false)
        }
        if fenced {
            out.append(.complete(seq: seq, error: "fenced: another site holds a newer epoch of \(config.volume)"))
            return (seq, out)
        }
        var token: UInt64?
        if seq > sequenceCeiling {
            sequenceCeiling = seq - 1 + config.sequenceReservation
            persistNeeded = true
            token = nextToken
        }
        if let range = pending.range, let extents = extents(of: range) {
            for extent in extents {
                extentLastSeq[extent] = seq
                lastWrites[extent / extentsPerGranule] = seq
                if activityLog.insert(extent).inserted { persistNeeded = true; token = nextToken }
            }
        }
        requests[seq] = pending
        gate.append((seq, token))
        drainGate(&out)
        finish(&out)
        return (seq, out)
    }

    mutating func submitInternalFlush(_ out: inout [Action]) {
        lastSeq += 1
        let seq = lastSeq
        var token: UInt64?
        if seq > sequenceCeiling {
            sequenceCeiling = seq - 1 + config.sequenceReservation
            persistNeeded = true
            token = nextToken
        }
        requests[seq] = Pending(kind: .internalFlush, range: nil, fua: false)
        internalCheckpointRunning = true
        gate.append((seq, token))
        drainGate(&out)
    }

    mutating func drainGate(_ out: inout [Action]) {
        var i = 0
        while i < gate.count {
            if let token = gate[i].token, token > persistedToken { break }
            let seq = gate[i].seq
            let ticket = nextTicket
            nextTicket += 1
            tickets[ticket] = .request(seq)
            if requests[seq]?.range != nil { requests[seq]?.ticket = ticket }
            admitInOrder(lock.enqueue(ticket, range: requests[seq]?.range), &out)
            i += 1
        }
        if i > 0 { gate.removeFirst(i) }
    }

    /// Handles admitted tickets strictly in lock order. Handling one may admit more (a region
    /// read releases its place at once); those queue behind the rest, never ahead of them.
    mutating func admitInOrder(_ tickets: [IntervalLock.Ticket], _ out: inout [Action]) {
        admissionQueue.append(contentsOf: tickets)
        guard !admitting else { return }
        admitting = true
        var i = 0
        while i < admissionQueue.count {
            admit(ticket: admissionQueue[i], &out)
            i += 1
        }
        admissionQueue.removeAll()
        admitting = false
    }

    mutating func admit(ticket: IntervalLock.Ticket, _ out: inout [Action]) {
        guard let owner = tickets[ticket] else { return }
        switch owner {
        case .request(let seq):
            lastAdmitted = max(lastAdmitted, seq)
            admitRequest(seq, &out)
            if requests[seq]?.range == nil { tickets[ticket] = nil }
        case .regionRead(let peer, let link, let regions, let forPoint):
            tickets[ticket] = nil
            regionReadAdmitted(peer: peer, link: link, regions: regions, forPoint: forPoint, &out)
            admitInOrder(lock.release(ticket), &out)
        }
    }

    mutating func admitRequest(_ seq: UInt64, _ out: inout [Action]) {
        guard var request = requests[seq] else { return }
        request.admitted = true
        switch request.kind {
        case .write, .zero:
            let range = request.range!
            let isZero = request.kind == .zero
            for name in peerOrder {
                routeWrite(seq: seq, range: range, isZero: isZero, fua: request.fua, peer: name, request: &request, &out)
            }
            if journalEnabled {
                let entry = JournalEntry(seq: seq, range: range, isZero: isZero, isBarrier: false, atNanos: now.monotonicNanos)
                journal.append(entry)
                out.append(.appendJournal(entry))
            }
            request.localIssued = true
            requests[seq] = request
            out.append(.executeLocal(seq: seq))
        case .flush, .internalFlush:
            for name in peerOrder { routeFlush(seq: seq, peer: name, request: &request, &out) }
            if journalEnabled {
                let entry = JournalEntry(seq: seq, range: BlockRange(offset: 0, length: 0), isZero: false, isBarrier: true, atNanos: now.monotonicNanos)
                journal.append(entry)
                out.append(.appendJournal(entry))
            }
            // Bitmaps and the activity log go to disk with every flush.
            persistNeeded = true
            request.waits.append(.persist(nextToken))
            requests[seq] = request
            flushesWaiting += 1
            issueFlushes(&out)
        }
    }

    /// A flush is issued once every request before it has finished locally: fdatasync covers
    /// only writes that completed.
    mutating func issueFlushes(_ out: inout [Action]) {
        guard flushesWaiting > 0 else { return }
        for seq in requests.sequences {
            guard let kind = requests[seq]?.kind else { continue }
            if (kind == .write || kind == .zero) && requests[seq]?.localDone == false { break }
            guard requests[seq]?.admitted == true, requests[seq]?.localIssued == false, kind == .flush || kind == .internalFlush else { continue }
            requests[seq]?.localIssued = true
            flushesWaiting -= 1
            out.append(.flushLocal(seq: seq))
        }
    }

    /// The local write, zeroing or flush of `seq` finished.
    public mutating func localDone(seq: UInt64, error: String?, now: Instant) -> [Action] {
        self.now = now
        var out: [Action] = []
        guard var request = requests[seq] else { return out }
        request.localDone = true
        if let error {
            request.error = error
            // The local image did not take it but peers may have: resync its regions from here.
            if let range = request.range {
                for name in peerOrder { markDirty(range, peer: name) }
                persistNeeded = true
            }
        }
        let ticket = request.ticket
        request.ticket = nil
        requests[seq] = request
        if let ticket {
            tickets[ticket] = nil
            admitInOrder(lock.release(ticket), &out)
        }
        issueFlushes(&out)
        finish(&out)
        return out
    }

    /// Persists up to and including `token` are durable.
    public mutating func persisted(token: UInt64, now: Instant) -> [Action] {
        self.now = now
        var out: [Action] = []
        persistedToken = max(persistedToken, token)
        drainGate(&out)
        finish(&out)
        return out
    }

    /// Runs after every event: answers what can be answered, persists what must be, keeps links busy.
    mutating func finish(_ out: inout [Action]) {
        for name in peerOrder { pump(name, &out) }
        completeReady(&out)
        trimJournalIfPossible(&out)
        if persistNeeded {
            persistNeeded = false
            let token = nextToken
            nextToken += 1
            out.append(.persist(token: token, metadata()))
        }
    }

    func metadata() -> Metadata {
        var peerMeta: [String: Metadata.Peer] = [:]
        for (name, peer) in peers {
            var dirty = peer.dirty
            if let point = peer.point { dirty.formUnion(point.regions) }
            peerMeta[name] = Metadata.Peer(dirtyWords: dirty.words, initialSyncPending: peer.initialSyncPending,
                                           lastPoint: peer.lastPoint, journaled: peer.journaled,
                                           ackedSeq: peer.journaled ? peer.ackedSeq : nil,
                                           rivalEpoch: peer.rival?.epoch ?? peer.formerRivalEpoch,
                                           dirtySince: peer.dirtySince.map { Double(now.wallSeconds) - Double(now.monotonicNanos - $0) / 1e9 })
        }
        return Metadata(activityLog: activityLog.sorted(), peers: peerMeta, lastSeq: lastSeq, sequenceCeiling: sequenceCeiling,
                        regionSize: config.regionSize, lastWrites: lastWrites, lastWritesCoverLine: lastWritesCoverLine)
    }

    /// Each peer's session acks, read once per ``completeReady`` (in place: see
    /// `PeerState.ackMemoEntry`) rather than once per wait.
    struct AckMemo {
        struct Entry {
            var name: String
            var link: LinkID?
            var received: UInt64, written: UInt64, durable: UInt64

            func acked(_ level: AckLevel) -> UInt64 {
                switch level {
                case .received: return received
                case .written: return written
                case .durable: return durable
                }
            }
        }
        var entries: [Entry] = []
    }

    func isSatisfied(_ wait: Pending.Wait, _ memo: AckMemo) -> Bool {
        switch wait {
        case .ack(let name, let link, let index, let level):
            guard let entry = memo.entries.first(where: { $0.name == name }) else { return false }
            return entry.link == link && entry.acked(level) >= index
        case .persist(let token):
            return persistedToken >= token
        case .peerClear(let name):
            guard let peer = peers[name], let session = peer.session else { return false }
            return session.open && session.catchUp == nil && peer.dirty.isEmpty && !peer.initialSyncPending
        case .throttle(let name):
            guard let peer = peers[name] else { return true }
            return !peer.journaled || !isOverBound(peer)
        }
    }

    /// Looks at every request in flight where it lies (no copies: this runs after every event).
    mutating func completeReady(_ out: inout [Action]) {
        var checkpointDone: [UInt64] = []
        var memo = AckMemo()
        for i in peers.indices { memo.entries.append(peers.values[i].ackMemoEntry()) }
        var internalDone = false
        // Out of `self` while it is changed, so the checks below may read the rest of `self`.
        var table = requests
        requests = RequestTable()
        table.update { seq, request in
            guard request.admitted, request.localDone else { return true }
            if !request.clientAnswered {
                let ackEarly = config.plantedBug == .ackBeforePeer && request.kind == .write
                guard ackEarly || request.waits.allSatisfy({ isSatisfied($0, memo) }) else { return true }
                request.clientAnswered = true
                if request.kind != .internalFlush {
                    out.append(.complete(seq: seq, error: request.error))
                }
            }
            if request.kind == .flush || request.kind == .internalFlush {
                guard request.checkpointWaits.allSatisfy({ isSatisfied($0, memo) }) else { return true }
                checkpointDone.append(seq)
            }
            if request.kind == .internalFlush { internalDone = true }
            return false
        }
        requests = table
        if internalDone { internalCheckpointRunning = false }
        for seq in checkpointDone { trimActivityLog(before: seq) }
    }

    /// Every write before `seq` is durable here and on every peer, or in its persisted bitmap,
    /// or in the durable journal: their extents may leave the activity log.
    mutating func trimActivityLog(before seq: UInt64) {
        let inFlight = Set(requests.inFlight.compactMap { $0.range }.flatMap { extents(of: $0).map(Array.init) ?? [] })
        var removed = false
        for extent in activityLog where (extentLastSeq[extent] ?? 0) < seq && !inFlight.contains(extent) {
            activityLog.remove(extent)
            extentLastSeq[extent] = nil
            removed = true
        }
        if removed { persistNeeded = true }
    }

    // MARK: - Time

    /// Timers: cut barriers, scheduled points, lag, the activity log's own checkpoints.
    public mutating func tick(now: Instant) -> [Action] {
        self.now = now
        var out: [Action] = []
        let idle = requests.isEmpty && !activityLog.isEmpty && now.monotonicNanos - lastSubmitAt >= config.idleCheckpointNanos
        if activityLog.count > config.activityLogCapacity || idle, !internalCheckpointRunning, lastAdmitted > lastCheckpointSeq {
            lastCheckpointSeq = lastAdmitted + 1
            submitInternalFlush(&out)
        }
        for name in peerOrder { tickPeer(name, &out) }
        finish(&out)
        return out
    }

    /// `ferry checkpoint`: cut a point now for every scheduled peer with a session.
    public mutating func checkpointNow(now: Instant) -> [Action] {
        self.now = now
        var out: [Action] = []
        for name in peerOrder where peers[name]?.policy.mode == .scheduled {
            peers[name]?.pointRequested = true
            tickPeer(name, &out)
        }
        finish(&out)
        return out
    }
}

/// Test-only deliberate bugs (the simulation shows each is caught).
enum PlantedBug: String, Sendable, CaseIterable {
    /// Answer a write before a sync peer acked it.
    case ackBeforePeer = "ack-before-peer"
    /// On losing a peer, do not mark what it missed in its bitmap.
    case skipBitmapOnDegrade = "skip-bitmap-on-degrade"
    /// The replica applies two consecutive items in swapped order.
    case applyOutOfOrder = "apply-out-of-order"
    /// A scheduled point reads regions as they are now instead of as they were at the cut.
    case skipPointCopy = "skip-point-copy"
    /// Trim the journal when an item is sent rather than when the peer has it.
    case trimJournalOnSend = "trim-journal-on-send"
    /// Failover: `ferry promote` takes a replica mid catch-up without --force.
    case promoteInconsistent = "promote-inconsistent"
    /// Failover: a promotion keeps the epoch it had instead of starting a newer one.
    case promoteWithoutNewEpoch = "promote-without-new-epoch"
    /// Failover: a primary that steps down keeps nothing aside.
    case skipKeepAside = "skip-keep-aside"
    /// Failover: a site that gives way does not say which blocks the new primary must overwrite.
    case rejoinWithoutNeeds = "rejoin-without-needs"

    /// A promotion that rolled its image back does not resend the rolled-back blocks to the
    /// site it followed.
    case rollbackNotResent = "rollback-not-resent"
    /// A replica keeps no way back when a catch-up begins: a promotion mid catch-up serves
    /// the half-written image.
    case skipUndo = "skip-undo"
    /// A demoted site promoted again starts its peers from its old bitmaps only, forgetting the
    /// writes its journal and activity log held for them.
    case demoteUndoneFromBitmapsOnly = "demote-undone-from-bitmaps-only"
    /// A new primary sends a third site that holds an older state of its line only what was
    /// written after the branch, not what the line wrote between the site's state and the branch.
    case thirdSiteFromBranchOnly = "third-site-from-branch-only"
    /// A replica tells a new primary of its line that it names everything its image holds past
    /// where the lines part, and names nothing.
    case replicaHidesLateWrites = "replica-hides-late-writes"
    /// A replica that holds writes past the branch of a new primary's line lets its catch-up
    /// overwrite them without keeping them aside.
    case thirdSiteOverwrittenUnkept = "third-site-overwritten-unkept"
    /// A scheduled replica's map leaves out the regions of the point it applies: a promotion
    /// there dates them too early, and a third site misses them.
    case pointRegionsUndated = "point-regions-undated"
    /// Bugs of role changes, which only the failover schedules exercise.
    var isFailover: Bool {
        switch self {
        case .promoteInconsistent, .promoteWithoutNewEpoch, .skipKeepAside, .rejoinWithoutNeeds, .rollbackNotResent, .skipUndo,
             .demoteUndoneFromBitmapsOnly, .thirdSiteFromBranchOnly, .replicaHidesLateWrites, .thirdSiteOverwrittenUnkept,
             .pointRegionsUndated: true
        default: false
        }
    }
}

extension PeerState {
    /// What ``PrimaryVolume/completeReady(_:)`` needs of this peer's acks. `mutating` though it
    /// changes nothing, so that it reads the peer where it lies in the dictionary (`_modify`):
    /// the getter copies the whole state.
    mutating func ackMemoEntry() -> PrimaryVolume.AckMemo.Entry {
        .init(name: name, link: session?.link, received: session?.acked(.received) ?? 0,
              written: session?.acked(.written) ?? 0, durable: session?.acked(.durable) ?? 0)
    }
}
