/// The secondary's end of one volume's replication: a pure state machine (events in, actions
/// out; DESIGN §4). The runtime (or the simulation) performs the actions and reports back.
///
/// Two ways to apply what arrives, decided by the link's mode:
/// - **direct** (sync, semi-sync, and every catch-up): each item is written to the image as it
///   arrives, in stream order; `received` is acked on arrival, `written` once applied, `durable`
///   at each barrier after the image is flushed.
/// - **logged** (async, scheduled): items go to the receive log (acked `received` on arrival); at a
///   barrier the log is made durable (acked `written`: from here the group is applied even after a
///   crash), then the items up to the barrier are applied to the image, the image flushed and the
///   position recorded (acked `durable`). After a crash the
///   runtime hands ``recover(log:)`` what is durable in the log, and every complete barrier group
///   is applied again, so the image is always at a barrier state (P2), and a scheduled point is
///   applied all or nothing.
///
/// Refused (with a reason, the link reset, nothing applied): an `open` with an older epoch, any
/// item whose epoch is not the session's, a gap in the stream indexes, a client write whose
/// sequence goes backwards, a region outside a catch-up or point.
public struct ReplicaVolume: Sendable {
    public enum Action: Sendable, Equatable {
        /// Send to the primary over `link`.
        case send(LinkID, ReplicationMessage)
        /// Write the item's payload (or zeros) to the image now, before any later action.
        case apply(LinkID, ReplicationItem)
        /// Append the item (header and payload) to the receive log.
        case appendLog(LinkID, ReplicationItem)
        /// Append the barrier to the receive log and make the log durable; report ``logSynced(link:index:)``.
        case syncLog(LinkID, ReplicationBarrier)
        /// Apply the receive log's items up to the barrier `index` to the image, flush the image,
        /// record `position` durably, then drop those log entries; report ``logApplied(link:index:)``.
        /// After a crash midway, ``recover(log:)`` asks for it again.
        case applyLog(LinkID?, throughIndex: UInt64, position: ReplicaPosition)
        /// Drop every log entry not yet handed to ``applyLog`` (groups from a dead link, or
        /// superseded by a catch-up); their barriers will not be acked.
        case discardLogTail
        /// After a restart: drop the log's first `groups` barrier groups without applying them,
        /// durably. The image holds them already (``recover(log:)`` says why).
        case skipLog(groups: Int)
        /// Flush the image; report ``flushed(link:index:)``.
        case flush(LinkID, index: UInt64)
        /// Record the position durably (after the data it describes is durable).
        case persistPosition(ReplicaPosition)
        /// Send `refuse` and close the link.
        case refuse(LinkID, reason: String)
        /// The primary on `link` stepped down and handed the volume over: promote this site.
        case takeOver(LinkID, VolumeHandoff)
        /// A handoff this replica cannot take (it does not hold everything the sender wrote):
        /// say why to the sender, and stay a secondary.
        case declineHandoff(LinkID, reason: String)
        /// Copy `ranges` of the image aside durably (the site's `diverged` directory, as a
        /// demoted primary's), then report ``keptAside(link:)``, or ``keepAsideFailed(link:reason:)``.
        /// The image holds writes past the branch of the primary opening on `link`, which its
        /// catch-up will overwrite (P6): nothing is overwritten unkept.
        case keepAside(LinkID, [BlockRange], reason: String)
    }

    private struct Session: Sendable {
        var link: LinkID
        var epoch: UInt64
        var generation: UInt64
        /// The primary's line of history (its `open`).
        var history: [GenerationRecord]
        var logged: Bool
        var nextIndex: UInt64 = 1
        var lastSeq: UInt64 = 0
        /// Inside catchUpBegin ... catchUpEnd: regions and writes are applied directly.
        var catchingUp = false
        /// Highest index applied to the image (direct mode).
        var appliedIndex: UInt64 = 0
        /// Barriers waiting for their flush, by index.
        var barriers: [UInt64: ReplicationBarrier] = [:]
        /// Planted bug `applyOutOfOrder`: an item held back to be applied after the next one.
        var heldBack: ReplicationItem?
        /// Logged: the highest barrier index handed to applyLog.
        var applyIssuedIndex: UInt64 = 0
        /// The index of the last catch-up begin: earlier barriers no longer describe the image.
        var lastCatchUpBegin: UInt64 = 0
        /// Logged regions and zeroings (a scheduled point's) of the group not yet closed by its
        /// barrier: in the receive log, not in the image. The barrier dates them; a stream that
        /// ends first drops them with the log's tail, and the image never held them.
        var groupRegions: [BlockRange] = []
    }

    public let volume: String
    /// The size of this site's copy: a stream for another size is refused (0: not checked). Two
    /// sites configured with different sizes would otherwise take writes past the smaller end.
    public var volumeSize: UInt64 = 0
    public private(set) var position: ReplicaPosition
    /// The size of the granules of ``writes`` is derived from this (the primary's activity-log extent).
    public var extentSize: UInt64 = 4 << 20
    /// What sequence wrote each granule of the image, as far as this replica saw it (``WriteMap``):
    /// a promotion here starts its primary's `lastWrites` from it. Kept in memory (the runtime
    /// stores it at a clean stop, ``restore(writes:)``): after a crash every granule is unknown
    /// until the stream's first barrier on the same line.
    public private(set) var writes: WriteMap?
    private var session: Session?
    /// The link and generation of the last stream opened here.
    private var lastOpened: (link: LinkID, generation: UInt64)?
    /// A position not yet told to the primary on `link`: what it would overwrite is being kept aside.
    private var awaitingKeepAside: (link: LinkID, told: ReplicaPosition, kept: (generation: UInt64, seq: UInt64, line: UInt64))?
    /// What was last kept aside (the image's generation and sequence, and the line it was kept
    /// from), so that the same state is not kept again when the link reopens before the catch-up.
    private var lastKeptAside: (generation: UInt64, seq: UInt64, line: UInt64)?
    /// Test-only: a deliberate bug, to show the simulation's checkers catch it.
    var plantedBug: PlantedBug?

    /// `position`: as persisted. Call ``recover(log:)`` before the first link if the receive log
    /// may hold complete barrier groups.
    public init(volume: String, position: ReplicaPosition) {
        self.volume = volume
        self.position = position
    }

    /// A logged barrier group found durable in the receive log after a restart.
    public struct LoggedBarrier: Sendable, Equatable {
        public var index: UInt64
        public var seq: UInt64
        public var kind: BarrierKind
        public init(index: UInt64, seq: UInt64, kind: BarrierKind) {
            self.index = index
            self.seq = seq
            self.kind = kind
        }
    }

    /// Applies what the receive log holds up to its last durable barrier (P2 after a crash), and
    /// drops anything after it.
    ///
    /// Groups at or below the recorded position are skipped: a position is recorded only once the
    /// image holding it is durable (the runtime flushes the image before recording one while log
    /// groups are still being applied), and a catch-up may have overwritten their blocks since
    /// with newer ones, which applying them again would undo (found by the failover simulation,
    /// seed 700311: a log group still being applied when a pull-ahead catch-up began was applied
    /// again after a power loss, and the image, mid catch-up, was taken as consistent).
    /// A replica recorded mid catch-up stays inconsistent: the groups after its position are
    /// newer than the catch-up's blocks, but blocks the catch-up sent may not have reached the
    /// disk; the primary's next catch-up ends it.
    public mutating func recover(log barriers: [LoggedBarrier]) -> [Action] {
        var actions: [Action] = []
        let held = barriers.prefix { $0.seq <= position.appliedSeq }.count
        if held > 0 { actions.append(.skipLog(groups: held)) }
        if held < barriers.count, let last = barriers.last {
            var next = position
            next.appliedSeq = max(next.appliedSeq, last.seq)
            position = next
            actions.append(.applyLog(nil, throughIndex: last.index, position: next))
        }
        actions.append(.discardLogTail)
        return actions
    }

    public var isConsistent: Bool { position.consistent }
    /// The link a primary has a stream open on, if any.
    public var sessionLink: LinkID? { session?.link }
    /// The link of the last primary that streamed this replica's generation to it (kept after
    /// that link is gone): the site a promotion here followed, which holds every write of that
    /// generation the image has. Nil when the image is on another generation (or after a restart).
    public var followedLink: LinkID? {
        guard let lastOpened, lastOpened.generation == position.generation, position.initialized else { return nil }
        return lastOpened.link
    }

    // MARK: - Events

    public mutating func linkDown(_ link: LinkID) -> [Action] {
        guard session?.link == link else { return [] }
        let logged = session?.logged ?? false
        session = nil
        // An unfinished logged group will never get its barrier from this link.
        return logged ? [.discardLogTail] : []
    }

    public mutating func received(_ message: ReplicationMessage, on link: LinkID) -> [Action] {
        switch message {
        case .open(let open):
            return opened(open, on: link)
        case .write(let item), .region(let item):
            guard var s = session, s.link == link else { return refuseWithoutSession(link) }
            let isRegion = { if case .region = message { return true } else { return false } }()
            if let why = check(item: item, isRegion: isRegion, session: s) { return refuse(link, why) }
            s.nextIndex += 1
            if !isRegion { s.lastSeq = item.seq }
            let direct = !s.logged || s.catchingUp
            if !(isRegion || item.seq == 0) {
                writes?.record(item.range, seq: item.seq)
            } else if direct {
                writes?.markUnknown(item.range)
            } else {
                s.groupRegions.append(item.range)
            }
            session = s
            if direct {
                session?.appliedIndex = item.index
                if plantedBug == .applyOutOfOrder {
                    guard let held = session?.heldBack else {
                        session?.heldBack = item
                        return [.send(link, .ack(level: .received, index: item.index))]
                    }
                    session?.heldBack = nil
                    return [.apply(link, item), .apply(link, held), .send(link, .ack(level: .received, index: item.index))]
                }
                return [.apply(link, item), .send(link, .ack(level: .received, index: item.index))]
            }
            return [.appendLog(link, item), .send(link, .ack(level: .received, index: item.index))]
        case .barrier(let barrier):
            guard var s = session, s.link == link else { return refuseWithoutSession(link) }
            if let why = check(barrier: barrier, session: s) { return refuse(link, why) }
            s.nextIndex += 1
            s.lastSeq = max(s.lastSeq, barrier.seq)
            var actions: [Action] = []
            if let held = s.heldBack {
                s.heldBack = nil
                actions.append(.apply(link, held))
            }
            switch barrier.kind {
            case .catchUpBegin:
                // Logged items not yet being applied are older than anything the catch-up sends,
                // and the primary counts them as missing (they were not acked `written`).
                if s.logged {
                    actions.append(.discardLogTail)
                    s.applyIssuedIndex = barrier.index
                    s.groupRegions = []
                }
                s.catchingUp = true
                s.lastCatchUpBegin = barrier.index
                // Sequences count along one line: a catch-up from another line makes the
                // figures so far meaningless (its end settles every granule again).
                if !Self.onLine(position, history: s.history) { writes?.forgetAll() }
                position.consistent = false
                Self.follow(s, &position)
                // Before the first out-of-order block lands: a crash now must not look consistent.
                actions.append(.persistPosition(position))
                actions.append(.send(link, .ack(level: .durable, index: barrier.index)))
                session = s
                return actions
            case .catchUpEnd:
                s.catchingUp = false
                // Every block the catch-up sent was read at or before its end's sequence.
                writes?.settle(at: barrier.seq)
                s.barriers[barrier.index] = barrier
                session = s
                return actions + [.flush(link, index: barrier.index)]
            case .flush, .cut, .point:
                let group = s.groupRegions
                s.groupRegions = []
                if !s.catchingUp && position.consistent
                    && (position.generation == s.generation || Self.onLine(position, history: s.history)) {
                    // Whatever the image holds of this line from before this stream (a restart
                    // forgot its sequences) was sent before this barrier: at or below it. So is
                    // what this group's regions hold (a point's are read as of its cut). A state
                    // of an older generation of the stream's line counts on the same sequences
                    // (the first point from a new primary is dated too: walk-through of 2026-12-08).
                    writes?.settle(at: barrier.seq)
                    for range in group where plantedBug != .pointRegionsUndated { writes?.record(range, seq: barrier.seq) }
                } else {
                    for range in group { writes?.markUnknown(range) }
                }
                if !s.logged || s.catchingUp {
                    s.barriers[barrier.index] = barrier
                    session = s
                    return actions + [.flush(link, index: barrier.index)]
                }
                session = s
                return actions + [.syncLog(link, barrier)]
            }
        case .refuse:
            // The primary says it no longer is one (it was demoted): the session ends, nothing is
            // answered; an unfinished logged group will never get its barrier.
            guard session?.link == link else { return [] }
            let logged = session?.logged ?? false
            session = nil
            return logged ? [.discardLogTail] : []
        case .handoff(let handoff):
            let p = position
            if !p.consistent || p.generation != handoff.generation || p.appliedSeq < handoff.seq || p.epoch > handoff.epoch {
                let holds = p.consistent ? "generation \(GenerationRecord.hex(p.generation)) through sequence \(p.appliedSeq) at epoch \(p.epoch)"
                    : "an inconsistent image"
                return [.declineHandoff(link, reason: "the replica of \(volume) holds \(holds), not everything through sequence "
                                        + "\(handoff.seq) of generation \(GenerationRecord.hex(handoff.generation)): it does not take over")]
            }
            return [.takeOver(link, handoff)]
        case .verify, .hashes:
            return []   // answered by the runtime from the image; no state of the stream changes
        case .position, .ack:
            // What a replica answers its primary. On a link with no stream here it is left over
            // from when this site was the primary: a switchover demoted it while the replica's
            // answers were on their way. Nothing to refuse or close.
            guard session?.link == link else { return [] }
            return refuse(link, "a replica does not accept \(message) from its primary")
        }
    }

    /// A new link's `open` replaces any session on an older link; what that one had in flight is
    /// abandoned (the primary resends what it did not see acked).
    private mutating func opened(_ open: VolumeOpen, on link: LinkID) -> [Action] {
        guard open.volume == volume else {
            return refuse(link, "volume \"\(open.volume)\" is not replicated here as \"\(volume)\"")
        }
        guard volumeSize == 0 || open.volumeSize == volumeSize else {
            return refuse(link, "volume sizes differ: the primary's \(volume) is \(open.volumeSize) bytes, this site's "
                          + "\(volumeSize); set volumes.\(volume).size alike on every site (Ferry does not resize volumes)")
        }
        guard open.epoch >= position.epoch else {
            // The position first: it carries the newer epoch, which fences the sender (P4: a
            // primary that learns of a newer epoch stops taking writes). Found by the failover
            // simulation (seed 1600576): a primary promoted at an epoch below one its replicas
            // had seen went on taking writes no site would ever take from it.
            return [.send(link, .position(position))]
                + refuse(link, "stale epoch \(open.epoch): this replica of \(volume) is at epoch \(position.epoch); "
                         + "the sender is no longer the primary")
        }
        let logged = open.mode == .async || open.mode == .scheduled
        var actions: [Action] = []
        if session?.logged ?? logged { actions.append(.discardLogTail) }
        if let old = session, old.link != link {
            // The primary of the replaced stream is told, or it would go on counting this
            // replica as in sync while it follows another (found by the failover simulation:
            // an idle former primary kept a replica "in-sync" that held a rival's bytes).
            actions.append(.send(old.link, .refuse(reason: "a stream at epoch \(open.epoch) replaced this one; "
                                                  + "this replica of \(volume) follows that primary now")))
        }
        if open.epoch > position.epoch {
            // The newest epoch seen, kept: an older primary is refused from now on, and a
            // promotion here takes an epoch above it (P4).
            position.epoch = open.epoch
            actions.append(.persistPosition(position))
        }
        session = Session(link: link, epoch: open.epoch, generation: open.generation,
                          history: open.history.last?.id == open.generation ? open.history
                              : open.history + [GenerationRecord(id: open.generation, epoch: open.epoch, branchSeq: 0)],
                          logged: logged,
                          lastSeq: position.appliedSeq)
        lastOpened = (link, open.generation)
        if writes?.volumeSize != open.volumeSize { writes = WriteMap(volumeSize: open.volumeSize, extentSize: extentSize) }
        let told = told(toOpen: open)
        awaitingKeepAside = nil
        if let aside = pastTheBranch(of: open), !aside.isEmpty, plantedBug != .thirdSiteOverwrittenUnkept {
            awaitingKeepAside = (link, told, (position.generation, position.appliedSeq, open.generation))
            let why = "this replica of \(volume) holds sequence \(position.appliedSeq) of generation \(GenerationRecord.hex(position.generation)), "
                + "writes past where the line of the primary at epoch \(open.epoch) leaves it; its catch-up overwrites them"
            actions.append(.keepAside(link, aside, reason: why))
            return actions
        }
        actions.append(.send(link, .position(told)))
        return actions
    }

    /// What this image holds past the branch of `open`'s line (which a catch-up from it will
    /// overwrite): the granules dated after where that line leaves the image's generation, or the
    /// whole image when it is past that point and cannot date its granules. Nil when the image
    /// is not on that line, not consistent (a catch-up already overwrites it), or was kept aside
    /// for this very line already.
    private func pastTheBranch(of open: VolumeOpen) -> [BlockRange]? {
        guard open.generation != position.generation, position.consistent, position.initialized, position.needs == nil,
              let reach = VolumeHistory(generations: open.history, appliedSeq: .max).reach(in: position.generation),
              lastKeptAside.map({ $0 != (position.generation, position.appliedSeq, open.generation) }) ?? true
        else { return nil }
        if let writes, !writes.hasUnknown { return writes.ranges(after: reach) }
        return position.appliedSeq > reach ? [BlockRange(offset: 0, length: open.volumeSize)] : nil
    }

    /// The map a clean stop stored for the image as it is now (the runtime checks it belongs to
    /// this position): what the replica knew is not forgotten over a restart.
    public mutating func restore(writes map: WriteMap) {
        guard writes == nil else { return }
        writes = map
    }

    /// The ranges asked for by ``Action/keepAside(_:_:reason:)`` are kept: tell the primary the position.
    public mutating func keptAside(link: LinkID) -> [Action] {
        guard let waiting = awaitingKeepAside, waiting.link == link, session?.link == link else { return [] }
        awaitingKeepAside = nil
        lastKeptAside = waiting.kept
        return [.send(link, .position(waiting.told))]
    }

    /// Keeping aside failed: the stream is refused (nothing is overwritten); the primary retries.
    public mutating func keepAsideFailed(link: LinkID, reason: String) -> [Action] {
        guard let waiting = awaitingKeepAside, waiting.link == link else { return [] }
        awaitingKeepAside = nil
        return refuse(link, "keeping aside what a catch-up would overwrite failed: \(reason)")
    }

    /// The position as told to a primary that opens a stream. To a primary of another
    /// generation whose line holds this image's generation, a consistent replica whose map has
    /// no unknown granule also names what its image holds past the point where the two lines
    /// part (its `appliedSeq`, or where the primary's line leaves its generation if that is
    /// lower): its writes applied after its last barrier, and those past the branch. With those
    /// overwritten it is the line's state there, from which a new primary of the line can send
    /// only what changed (``ReplicaPosition/needsComplete``).
    private func told(toOpen open: VolumeOpen) -> ReplicaPosition {
        var told = position
        guard open.generation != position.generation, position.consistent, position.initialized, position.needs == nil,
              let writes, !writes.hasUnknown,
              let reach = VolumeHistory(generations: open.history, appliedSeq: .max).reach(in: position.generation)
        else { return told }
        let beyond = writes.ranges(after: min(position.appliedSeq, reach))
        told.needs = beyond.isEmpty || plantedBug == .replicaHidesLateWrites ? nil : beyond
        told.needsComplete = true
        return told
    }

    /// Whether `position`'s image is on the line `history` (its generation in it, at or below
    /// where the line leaves it): its sequences are that line's.
    static func onLine(_ position: ReplicaPosition, history: [GenerationRecord]) -> Bool {
        guard position.initialized else { return false }
        guard let reach = VolumeHistory(generations: history, appliedSeq: .max).reach(in: position.generation) else { return false }
        return position.appliedSeq <= reach
    }

    /// The runtime applied the item (direct mode): ack `written`.
    public mutating func applied(link: LinkID, index: UInt64) -> [Action] {
        guard session?.link == link else { return [] }
        return [.send(link, .ack(level: .written, index: index))]
    }

    /// The image flush asked for the barrier at `index` is done. One flush covers every earlier
    /// write, so every barrier up to `index` completes with it, in order: the position moves
    /// forward only, and a catch-up end that a newer catch-up has overtaken marks nothing consistent.
    public mutating func flushed(link: LinkID, index: UInt64) -> [Action] {
        guard var s = session, s.link == link else { return [] }
        let done = s.barriers.keys.filter { $0 <= index }.sorted()
        guard let last = done.last else { return [] }
        var next = position
        Self.follow(s, &next)
        for key in done {
            let barrier = s.barriers.removeValue(forKey: key)!
            guard barrier.index > s.lastCatchUpBegin else { continue }
            if barrier.kind == .catchUpEnd {
                next.consistent = true
                next.initialized = true
                next.needs = nil
                next.appliedSeq = max(next.appliedSeq, barrier.seq)
            } else if next.consistent {
                next.appliedSeq = max(next.appliedSeq, barrier.seq)
            }
        }
        session = s
        var actions: [Action] = []
        if next != position {
            position = next
            actions.append(.persistPosition(next))
        }
        actions.append(.send(link, .ack(level: .durable, index: last)))
        return actions
    }

    /// The receive log holds everything up to the barrier durably: ack `received`, then apply.
    public mutating func logSynced(link: LinkID, barrier: ReplicationBarrier) -> [Action] {
        // A later sync covers an earlier one: nothing to do for a barrier already applied.
        guard var s = session, s.link == link, barrier.index > s.applyIssuedIndex else { return [] }
        s.applyIssuedIndex = barrier.index
        session = s
        var next = position
        Self.follow(s, &next)
        next.appliedSeq = max(next.appliedSeq, barrier.seq)
        next.consistent = true
        next.initialized = true
        position = next
        return [.send(link, .ack(level: .written, index: barrier.index)),
                .applyLog(link, throughIndex: barrier.index, position: next)]
    }

    /// The log group through `index` is applied, flushed and recorded.
    public mutating func logApplied(link: LinkID?, index: UInt64) -> [Action] {
        guard let link, session?.link == link else { return [] }
        return [.send(link, .ack(level: .durable, index: index))]
    }

    /// The position the image is at when the barrier at `index` (received, waiting for its
    /// flush) completes, if that is a consistent state: a recovery point. At the barrier's
    /// arrival, in direct mode, the image holds exactly the stream up to it.
    public func position(afterBarrier index: UInt64) -> ReplicaPosition? {
        guard let s = session, let barrier = s.barriers[index], barrier.index > s.lastCatchUpBegin else { return nil }
        var next = position
        Self.follow(s, &next)
        if barrier.kind == .catchUpEnd {
            next.consistent = true
            next.initialized = true
            next.needs = nil
        } else if !next.consistent || s.catchingUp {
            return nil
        }
        next.appliedSeq = max(next.appliedSeq, barrier.seq)
        return next
    }

    /// The runtime put the image back to a recovery point at `point` (a promotion at a point,
    /// or out of an unfinished catch-up): the position is that point's, any stream ends (its
    /// primary opens again and is told the new position).
    public mutating func rolledBack(to point: ReplicaPosition) -> [Action] {
        let logged = session?.logged ?? false
        // The primary streaming here is told the stream ended (an idle one would go on
        // counting this replica in sync); it opens again and learns the position.
        let told: [Action] = session.map { [.send($0.link, .refuse(reason: "the replica of \(volume) was rolled back to a recovery point; open the stream again"))] } ?? []
        session = nil
        // The primary followed still holds this point's line (it says what it wrote past it when
        // it rejoins); a point of another generation was not streamed by it.
        if lastOpened?.generation != point.generation { lastOpened = nil }
        var next = point
        next.epoch = max(point.epoch, position.epoch)   // the newest epoch seen stays (P4)
        // The blocks put back hold an older state, of no sequence the map knows.
        for range in point.needs ?? [] { writes?.markUnknown(range) }
        position = next
        return told + (logged ? [.discardLogTail] : []) + [.persistPosition(next)]
    }

    // MARK: - Checks

    private func check(item: ReplicationItem, isRegion: Bool, session s: Session) -> String? {
        if item.epoch != s.epoch { return "item \(item.index) carries epoch \(item.epoch), the session is at epoch \(s.epoch)" }
        if item.index != s.nextIndex { return "sequence gap: expected stream index \(s.nextIndex), got \(item.index)" }
        if volumeSize != 0 && (item.range.offset > volumeSize || item.range.length > volumeSize - item.range.offset) {
            return "item \(item.index) at \(item.range) ends past the volume's \(volumeSize) bytes"
        }
        if isRegion {
            if !s.catchingUp && !s.logged { return "region \(item.range) outside a catch-up" }
        } else if item.seq <= s.lastSeq && item.seq != 0 {
            return "write sequence \(item.seq) does not follow \(s.lastSeq)"
        }
        return nil
    }

    private func check(barrier: ReplicationBarrier, session s: Session) -> String? {
        if barrier.epoch != s.epoch { return "barrier \(barrier.index) carries epoch \(barrier.epoch), the session is at epoch \(s.epoch)" }
        if barrier.index != s.nextIndex { return "sequence gap: expected stream index \(s.nextIndex), got \(barrier.index)" }
        if barrier.kind == .catchUpBegin && s.catchingUp { return "catch-up begins twice" }
        if barrier.kind == .catchUpEnd && !s.catchingUp { return "catch-up ends without beginning" }
        return nil
    }

    /// Stream data on a link with no session (its `open` was lost in a link switch-over, or it
    /// belongs to an older session): refused, so the primary resets the link and opens again.
    private func refuseWithoutSession(_ link: LinkID) -> [Action] {
        [.refuse(link, reason: "no replication session on this link for \(volume); the stream must start with open")]
    }

    /// `position` now describes the image on session `s`'s line: its epoch, generation and
    /// lineage. Sequences count along one line of history, so another generation's start afresh.
    private static func follow(_ s: Session, _ position: inout ReplicaPosition) {
        if position.generation != s.generation { position.appliedSeq = 0 }
        position.epoch = s.epoch
        position.generation = s.generation
        position.lineage = s.history
    }

    /// Refuses `link`. Only a refused session's unfinished logged group is discarded: a stale
    /// primary knocking on another link leaves the current stream's log alone.
    private mutating func refuse(_ link: LinkID, _ reason: String) -> [Action] {
        var actions: [Action] = [.refuse(link, reason: reason)]
        if let s = session, s.link == link {
            session = nil
            if s.logged { actions.append(.discardLogTail) }
        }
        return actions
    }
}
