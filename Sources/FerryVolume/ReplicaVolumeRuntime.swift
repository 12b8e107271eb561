import FerryCore
import FerryNBD
import FerryStore
import FerryWire
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A volume on a secondary: the replica image, its receive log and persisted position, running
/// FerryCore's ``ReplicaVolume`` machine (DESIGN §5.1).
///
/// Frames are handled under one lock in arrival order. What must follow the stream's order is done
/// under it: writes to the image (direct items, and a logged group when its barrier is durable in
/// the log), log appends, the position when it must be durable before the next write (a catch-up
/// begins). fdatasync of the image and of the log run on the thread pool and report back; the
/// position recorded after a logged group is stored with a version, so a slower, older store
/// never overwrites a newer one.
public final class ReplicaVolumeRuntime: Sendable {
    public let name: String
    public let image: VolumeImage
    let stateDirectory: String
    let threadPool: NIOThreadPool
    let links: any VolumeLinks
    let logger: Logger
    let onEvent: @Sendable (VolumeEvent) -> Void
    let receiveLog: ReceiveLog
    let logLock = NIOLock()
    let positionFile: MetadataFile<ReplicaPosition>
    /// The point a roll-back under way goes to (0: none), so a crash midway goes back to it.
    let rollbackTarget: MetadataFile<UInt64>
    /// The primary that last opened a stream here, and its generation: which site a promotion
    /// here follows, also after this daemon restarted (else failback is a full copy to it).
    let followedFile: MetadataFile<FollowedPrimary>

    /// The replica's ``WriteMap``, stored by a clean stop for the position it was stopped at and
    /// spent at the next start (a crash later must not find it again).
    let writeMapFile: MetadataFile<StoredWriteMap>

    struct StoredWriteMap: Codable, Equatable {
        var generation: UInt64
        var appliedSeq: UInt64
        var volumeSize: UInt64
        var extentSize: UInt64
        var count: Int
        var runs: String
        static let spent = StoredWriteMap(generation: 0, appliedSeq: .max, volumeSize: 0, extentSize: 0, count: 0, runs: "")
    }

    struct FollowedPrimary: Codable, Equatable {
        var peer: String
        var generation: UInt64
    }
    let positionStore = NIOLockedValueBox<UInt64>(0)   // the version last stored
    /// Flush barriers share their image flush and position store (group commit).
    let flushGroup = GroupCommit<(link: LinkID, index: UInt64)>()
    let core: NIOLockedValueBox<Core>
    /// Before-images and recovery points (``UndoLog``): history for `points`/`promote --at`, the
    /// state a catch-up started from (P3), a drill's base.
    public let undo: UndoLog
    /// The volume's `history:` window; nil keeps no history.
    public let history: HistoryLimit?
    let points: NIOLockedValueBox<PointState>

    /// What the undo log is kept for, besides history. Lock order: `core`, then this, then the log's own.
    struct PointState: Sendable {
        /// The point a running catch-up started from (what a promotion rolls back to), and the
        /// version of the position store that began it: only a newer consistent store ends it.
        var catchUpBase: UInt64?
        var catchUpBaseVersion: UInt64 = 0
        /// The point a running drill reads.
        var drillBase: UInt64?
        var lastMarkTime: Double = 0
        /// The generation and sequence of the last point marked: a barrier of an idle volume
        /// (a periodic cut) marks no second point of the same state.
        var lastMarked: (generation: UInt64, seq: UInt64)?
    }

    struct Core: Sendable {
        var machine: ReplicaVolume
        var nextVersion: UInt64 = 1
        /// Logged groups applied to the image whose flush and position store are queued or running, in order.
        var completions: [(link: LinkID?, index: UInt64, position: ReplicaPosition, version: UInt64)] = []
        var completionRunning = false
        var lastError: String?
        var decoder = ReplicationFrameEncoder(compress: false)
        var bytesReceived: UInt64 = 0
        /// Which peer each link belongs to (learned from the frames).
        var linkPeers: [LinkID: String] = [:]
        /// The last peer that opened a stream, and on which link (kept after the link is gone).
        var lastOpener: (link: LinkID, peer: String)?
        /// As `followed.primary` holds it (read once at start, written when it changes).
        var followed: FollowedPrimary?
        /// Acks not yet sent, by link and level (acks are cumulative: the highest is enough), and
        /// the links with a send of them scheduled: one ack per level per read burst.
        var pendingAcks: [LinkID: [AckLevel: UInt64]] = [:]
        var ackSendScheduled: Set<LinkID> = []
        /// Direct items held back while the undo log records (group commit): applied together
        /// at the end of the link's read burst, or before any later action but a send, so one
        /// fdatasync of the undo log covers the burst's before-images.
        var deferred: [(link: LinkID, item: ReplicationItem, payload: ByteBuffer?)] = []
        var drainScheduled = false
    }

    public init(name: String, image: VolumeImage, stateDirectory: String, threadPool: NIOThreadPool,
                links: any VolumeLinks, logger: Logger, history: HistoryLimit? = nil,
                onEvent: @escaping @Sendable (VolumeEvent) -> Void) throws {
        self.name = name
        self.image = image
        self.stateDirectory = stateDirectory
        self.threadPool = threadPool
        self.links = links
        self.logger = logger
        self.onEvent = onEvent
        self.positionFile = try MetadataFile(path: stateDirectory + "/replica.position")
        let position = try positionFile.load() ?? .empty
        self.history = history
        let undo = try UndoLog.open(path: stateDirectory + "/undo.log", position: position)
        self.undo = undo
        self.rollbackTarget = try MetadataFile(path: stateDirectory + "/rollback.target")
        self.followedFile = try MetadataFile(path: stateDirectory + "/followed.primary")
        // Mid catch-up (or mid roll-back) after a restart: the point to go back to is the one a
        // roll-back was headed for, else the newest (the state the catch-up started from).
        let target = try rollbackTarget.load().flatMap { undo.point($0)?.id }
        self.points = NIOLockedValueBox(PointState(catchUpBase: position.consistent ? nil : target ?? undo.points.last?.id))
        if history == nil && position.consistent && !undo.isEmpty { try undo.reset() }
        let (log, barriers) = try ReceiveLog.open(path: stateDirectory + "/receive.log")
        self.receiveLog = log
        var machine = ReplicaVolume(volume: name, position: position)
        machine.volumeSize = image.size
        self.writeMapFile = try MetadataFile(path: stateDirectory + "/writes.map")
        if let stored = try? writeMapFile.load(), stored != .spent {
            if stored.generation == position.generation, stored.appliedSeq == position.appliedSeq, stored.volumeSize == image.size,
               let figures = try? WordRuns.decode(stored.runs, count: stored.count),
               let map = WriteMap(volumeSize: stored.volumeSize, extentSize: stored.extentSize, figures: figures) {
                machine.restore(writes: map)
            }
            try writeMapFile.store(.spent)
        }
        let actions = machine.recover(log: barriers)
        var initial = Core(machine: machine)
        initial.followed = try? followedFile.load()
        self.core = NIOLockedValueBox(initial)
        if !barriers.isEmpty {
            logger.info("volume \(name): applying \(barriers.count) barrier group(s) left in the receive log after a restart")
        }
        handle(payload: nil) { _ in actions }
    }

    /// The persisted position (what the primary is told when a link opens).
    public var position: ReplicaPosition { core.withLockedValue { $0.machine.position } }
    /// What sequence wrote each granule, as far as this replica saw it (``ReplicaVolume/writes``).
    public var writes: WriteMap? { core.withLockedValue { $0.machine.writes } }
    public var lastError: String? { core.withLockedValue { $0.lastError } }
    /// The peer whose stream this replica follows right now, if a primary has one open.
    public var streamingPeer: String? {
        core.withLockedValue { core in core.machine.sessionLink.flatMap { core.linkPeers[$0] } }
    }
    public var bytesReceived: UInt64 { core.withLockedValue { $0.bytesReceived } }
    /// The primary whose generation this replica's image is on (``ReplicaVolume/followedLink``).
    public var followedPeer: String? {
        core.withLockedValue { core in
            if let link = core.machine.followedLink, let opener = core.lastOpener, opener.link == link { return opener.peer }
            // Since a restart: the primary recorded when it opened its stream, if the image is still
            // on its generation (as ``ReplicaVolume/followedLink`` asks of a live one).
            let position = core.machine.position
            guard position.initialized, let recorded = core.followed, recorded.generation == position.generation else { return nil }
            return recorded.peer
        }
    }

    /// A frame for this volume from `peer` on `link`.
    public func received(_ message: ReplicationMessage, payload: ByteBuffer?, from peer: String, link: LinkID) {
        handle(payload: payload) { core in
            core.linkPeers[link] = peer
            if case .open = message { core.lastOpener = (link, peer) }
            if let payload { core.bytesReceived += UInt64(payload.readableBytes) }
            let actions = core.machine.received(message, on: link)
            if case .open(let open) = message, core.machine.sessionLink == link {
                let record = FollowedPrimary(peer: peer, generation: open.generation)
                if core.followed != record {
                    core.followed = record
                    do { try followedFile.store(record) } catch {
                        logger.warning("volume \(name): recording which site streams here failed: \(error)")
                    }
                }
            }
            return actions
        }
    }

    /// Online verify: hashes the requested blocks of the image off the event loop and answers
    /// `peer` (no hashes when the image cannot be read).
    public func answerVerify(_ request: VerifyRequest, to peer: String, link: LinkID) {
        threadPool.submit { [self] _ in
            var hashes: [UInt64] = []
            do {
                hashes = try image.blockHashes(offset: request.offset, length: request.length, blockSize: UInt64(request.blockSize))
            } catch {
                logger.error("volume \(name): hashing the image for a verify from \(peer) failed: \(error)")
            }
            links.send([VolumeFrame(volume: name, message: .hashes(id: request.id, hashes), payload: nil)], to: peer, link: link)
        }
    }

    public func linkDown(link: LinkID) {
        handle(payload: nil) { core in
            defer {
                core.linkPeers[link] = nil
                core.pendingAcks[link] = nil
                core.ackSendScheduled.remove(link)
            }
            return core.machine.linkDown(link)
        }
    }

    /// Stores `writes` as what the image at `position` holds, for the next start of a replica
    /// runtime in `stateDirectory` (a clean stop's, or a primary's that steps down: what it wrote
    /// where, so that a third site need not get a full copy when this site is promoted again).
    public static func storeWriteMap(_ writes: WriteMap, for position: ReplicaPosition, stateDirectory: String) throws {
        try storeWriteMap(writes, for: position, in: MetadataFile(path: stateDirectory + "/writes.map"))
    }

    static func storeWriteMap(_ writes: WriteMap, for position: ReplicaPosition, in file: MetadataFile<StoredWriteMap>) throws {
        try file.store(StoredWriteMap(generation: position.generation, appliedSeq: position.appliedSeq,
                                      volumeSize: writes.volumeSize, extentSize: writes.extentSize,
                                      count: writes.last.count, runs: WordRuns.encode(writes.last)))
    }

    /// Stops cleanly: the image and the log are made durable.
    public func stop() {
        do {
            try image.flush()
            try logLock.withLock { try receiveLog.sync() }
            // What sequence wrote where, for the image as it is now: after a clean restart a new
            // primary of the line can still send this site only what changed.
            let (position, writes) = core.withLockedValue { ($0.machine.position, $0.machine.writes) }
            if let writes { try Self.storeWriteMap(writes, for: position, in: writeMapFile) }
        } catch {
            logger.error("volume \(name): flushing the replica at shutdown failed: \(error)")
        }
    }

    // MARK: - Actions

    /// Runs `event` on the machine under the lock and carries out its actions.
    /// `storeAfterUnlock`: the position this event persists is stored after the lock is released,
    /// and the acks it sends are sent only once that store is done. For a flush barrier's
    /// completion only: the image is durable already and the position only moves forward, so the
    /// link's loop need not wait for a metadata fdatasync (one per client flush) to read on.
    func handle(payload: ByteBuffer?, storeAfterUnlock: Bool = false, _ event: (inout Core) -> [ReplicaVolume.Action]) {
        var offloads: [@Sendable () -> Void] = []
        var closes: [(LinkID, String)] = []
        var peersOfCloses: [String] = []
        var ackSends: [LinkID] = []
        var drains: [LinkID] = []
        var heldStore: (position: ReplicaPosition, version: UInt64, flushFirst: Bool)?
        var heldAcks: [(LinkID, AckLevel, UInt64)] = []
        core.withLockedValue { core in
            let before = core.machine.position
            var queue = event(&core)
            var frames: [LinkID: [VolumeFrame]] = [:]
            var order: [LinkID] = []
            var i = 0
            while i < queue.count {
                let action = queue[i]
                i += 1
                switch action {
                case .send, .apply: break
                default:
                    // Whatever follows held-back writes sees them applied first (a flush covers
                    // them, a point or a catch-up base is marked after their before-images).
                    if !core.deferred.isEmpty { queue.append(contentsOf: drain(&core)) }
                }
                switch action {
                case .send(let link, let message):
                    if case .ack(let level, let index) = message, storeAfterUnlock {
                        heldAcks.append((link, level, index))
                    } else if case .ack(let level, let index) = message {
                        queueAck(&core, link, level, index, &ackSends)
                    } else {
                        if frames[link] == nil { order.append(link) }
                        frames[link, default: []].append(VolumeFrame(volume: name, message: message, payload: nil))
                    }
                case .apply(let link, let item) where !core.deferred.isEmpty || undo.isRecording:
                    core.deferred.append((link, item, payload))
                    if !core.drainScheduled {
                        core.drainScheduled = true
                        drains.append(link)
                    }
                case .apply(let link, let item):
                    do {
                        try undo.protect([(item.range.offset, item.range.length)], image: image) { try write(item, payload: payload) }
                        queue.append(contentsOf: core.machine.applied(link: link, index: item.index))
                    } catch {
                        fail(&core, "applying \(item.range) failed: \(error)")
                        closes.append((link, "replica \(name) cannot write its image: \(error)"))
                    }
                case .appendLog(let link, let item):
                    do {
                        try logLock.withLock { try receiveLog.append(item, payload: item.isZero ? nil : payload) }
                    } catch {
                        fail(&core, "appending to the receive log failed: \(error)")
                        closes.append((link, "replica \(name) cannot write its receive log: \(error)"))
                    }
                case .syncLog(let link, let barrier):
                    do {
                        try logLock.withLock { try receiveLog.appendBarrier(barrier) }
                    } catch {
                        fail(&core, "appending to the receive log failed: \(error)")
                        closes.append((link, "replica \(name) cannot write its receive log: \(error)"))
                        continue
                    }
                    offloads.append { [self] in
                        do {
                            // Not under the log's lock: the link's loop goes on appending meanwhile.
                            try receiveLog.sync()
                        } catch {
                            logger.error("volume \(name): syncing the receive log failed: \(error)")
                            return
                        }
                        handle(payload: nil) { $0.machine.logSynced(link: link, barrier: barrier) }
                    }
                case .applyLog(let link, let through, let position):
                    do {
                        // In stream order, under the lock: nothing later may reach the image first.
                        let group = try logLock.withLock { try receiveLog.takeGroup(throughBarrierIndex: through) }
                        try undo.protect(group.map { ($0.0.range.offset, $0.0.range.length) }, image: image) {
                            for (item, data) in group { try write(item, payload: data) }
                        }
                        markPoint(position)
                    } catch {
                        fail(&core, "applying the receive log failed: \(error)")
                        if let link { closes.append((link, "replica \(name) cannot apply its receive log: \(error)")) }
                        continue
                    }
                    let version = core.nextVersion
                    core.nextVersion += 1
                    core.completions.append((link, through, position, version))
                    if !core.completionRunning {
                        core.completionRunning = true
                        offloads.append { [self] in completeGroups() }
                    }
                case .skipLog(let groups):
                    do {
                        try logLock.withLock { try receiveLog.skipGroups(groups) }
                    } catch {
                        fail(&core, "dropping \(groups) receive-log group(s) the image holds failed: \(error)")
                    }
                case .discardLogTail:
                    do {
                        try logLock.withLock { try receiveLog.discardUntaken() }
                    } catch {
                        fail(&core, "trimming the receive log failed: \(error)")
                    }
                case .flush(let link, let index):
                    if history != nil, let point = core.machine.position(afterBarrier: index) { markPoint(point) }
                    offloads.append { [self] in
                        if flushGroup.join((link, index)) { flushGroup.drain { flushBarriers($0) } }
                    }
                case .persistPosition(let position) where storeAfterUnlock && position.consistent:
                    // Log groups applied after the barrier's flush began are in this position too.
                    heldStore = (position, core.nextVersion, !core.completions.isEmpty)
                    core.nextVersion += 1
                case .persistPosition(let position):
                    let version = core.nextVersion
                    core.nextVersion += 1
                    if !position.consistent && before.consistent { keepCatchUpBase(before, version: version) }
                    do {
                        // Log groups applied to the image and not yet flushed are in this position:
                        // it is recorded only once they are durable (``ReplicaVolume/recover(log:)``
                        // skips what a recorded position holds).
                        if !core.completions.isEmpty { try image.flush() }
                        try store(position, version: version)
                    } catch {
                        fail(&core, "recording the replica position failed: \(error)")
                    }
                case .keepAside(let link, let ranges, let reason):
                    let position = core.machine.position
                    offloads.append { [self] in keepAside(ranges, link: link, position: position, reason: reason) }
                case .takeOver(let link, let handoff):
                    let peer = core.linkPeers[link] ?? ""
                    logger.notice("volume \(name): \(peer) stepped down and hands the volume over at sequence \(handoff.seq): taking over")
                    onEvent(VolumeEvent(volume: name, kind: .takeOver(peer: peer), message: "volume \(name): \(peer) handed it over"))
                case .declineHandoff(let link, let reason):
                    logger.error("volume \(name): declining a handoff from \(core.linkPeers[link] ?? "?"): \(reason)")
                    if frames[link] == nil { order.append(link) }
                    frames[link, default: []].append(VolumeFrame(volume: name, message: .refuse(reason: reason), payload: nil))
                case .refuse(let link, let reason):
                    logger.warning("volume \(name): refusing the stream on \(link): \(reason)")
                    onEvent(VolumeEvent(volume: name, kind: .refused(peer: ""), message: "volume \(name): refused the stream: \(reason)"))
                    if frames[link] == nil { order.append(link) }
                    frames[link, default: []].append(VolumeFrame(volume: name, message: .refuse(reason: reason), payload: nil))
                    closes.append((link, "volume \(name): \(reason)"))
                }
            }
            for link in order {
                links.send(frames[link] ?? [], to: core.linkPeers[link] ?? "", link: link)
            }
            peersOfCloses = closes.map { core.linkPeers[$0.0] ?? "" }
        }
        if let heldStore {
            do {
                if heldStore.flushFirst { try image.flush() }
                try store(heldStore.position, version: heldStore.version)
            } catch {
                core.withLockedValue { fail(&$0, "recording the replica position failed: \(error)") }
            }
        }
        if !heldAcks.isEmpty {
            // As the acks above, now that what they say is recorded.
            core.withLockedValue { core in
                for (link, level, index) in heldAcks { queueAck(&core, link, level, index, &ackSends) }
            }
        }
        for (i, (link, reason)) in closes.enumerated() { links.close(peer: peersOfCloses[i], link: link, reason: reason) }
        for link in drains where !links.afterCurrentTurn(of: link, { [self] in drainNow() }) { drainNow() }
        for link in ackSends where !links.afterCurrentTurn(of: link, { [self] in sendAcks(link) }) { sendAcks(link) }
        for work in offloads { threadPool.submit { _ in work() } }
    }

    /// The end of a read burst: the writes held back are applied together.
    func drainNow() {
        handle(payload: nil) { core in
            core.drainScheduled = false
            return drain(&core)
        }
    }

    /// Applies the held-back writes: their before-images saved and made durable once, then the
    /// image written; returns what the machine says to each (acks `written`).
    func drain(_ core: inout Core) -> [ReplicaVolume.Action] {
        let batch = core.deferred
        core.deferred = []
        guard !batch.isEmpty else { return [] }
        do {
            try undo.protect(batch.map { ($0.item.range.offset, $0.item.range.length) }, image: image) {
                for held in batch { try write(held.item, payload: held.payload) }
            }
        } catch {
            fail(&core, "applying \(batch.count) item(s) failed: \(error)")
            return Array(Set(batch.map(\.link))).map { .refuse($0, reason: "replica \(name) cannot write its image: \(error)") }
        }
        return batch.flatMap { core.machine.applied(link: $0.link, index: $0.item.index) }
    }

    /// Acks are cumulative: sent once the link's loop is done with what it is reading, one per
    /// level, however many frames that was. `ackSends` gets `link` when a send must be scheduled.
    func queueAck(_ core: inout Core, _ link: LinkID, _ level: AckLevel, _ index: UInt64, _ ackSends: inout [LinkID]) {
        core.pendingAcks[link, default: [:]][level] = max(core.pendingAcks[link]?[level] ?? 0, index)
        if core.ackSendScheduled.insert(link).inserted { ackSends.append(link) }
    }

    /// Sends the acks gathered for `link` since the last send.
    func sendAcks(_ link: LinkID) {
        core.withLockedValue { core in
            core.ackSendScheduled.remove(link)
            guard let acks = core.pendingAcks.removeValue(forKey: link), let peer = core.linkPeers[link] else { return }
            let frames = AckLevel.allCases.compactMap { level in
                acks[level].map { VolumeFrame(volume: name, message: .ack(level: level, index: $0), payload: nil) }
            }
            links.send(frames, to: peer, link: link)
        }
    }

    /// One image flush for every flush barrier in `barriers` (``GroupCommit``: each was applied
    /// before it joined), then one position store for them all, then their durable acks.
    /// Keeps aside what a new primary's catch-up would overwrite (P6), off the event loop; the
    /// primary is told the position only once it is durable.
    func keepAside(_ ranges: [BlockRange], link: LinkID, position: ReplicaPosition, reason: String) {
        do {
            try image.flush()
            let kept = try KeptAside.write(ranges, of: name, image: image,
                                           directory: KeptAside.directory(stateDirectory: stateDirectory),
                                           epoch: Int64(position.epoch), generation: GenerationRecord.hex(position.generation), reason: reason)
            let plural = ranges.count == 1 ? "" : "s"
            logger.warning("volume \(name): kept aside \(ByteSize.format(kept.bytes)) in \(ranges.count) range\(plural) before a catch-up overwrites them: \(reason); `ferry diverged \(name)` lists them",
                           metadata: ["file": "\(kept.image)"])
            handle(payload: nil) { $0.machine.keptAside(link: link) }
        } catch {
            logger.error("volume \(name): keeping aside what a catch-up would overwrite failed: \(error)")
            handle(payload: nil) { $0.machine.keepAsideFailed(link: link, reason: "\(error)") }
        }
    }

    func flushBarriers(_ barriers: [(link: LinkID, index: UInt64)]) {
        do {
            try image.flush()
        } catch {
            // Not acked: the primary never counts these barriers durable here; status says why.
            core.withLockedValue { fail(&$0, "flushing the replica image failed: \(error)") }
            return
        }
        handle(payload: nil, storeAfterUnlock: true) { core in
            barriers.flatMap { core.machine.flushed(link: $0.link, index: $0.index) }
        }
    }

    /// In order, every group applied so far at once: flush the image, store the newest group's
    /// position, drop their log records. Groups applied while a flush runs wait for the next,
    /// which covers them all: under load one flush serves many groups, not one each.
    func completeGroups() {
        while true {
            let batch = core.withLockedValue { $0.completions }
            guard let last = batch.last else { return }
            do {
                try image.flush()
                try store(last.position, version: last.version)
                // The release is written under the log's lock and made durable outside it.
                try logLock.withLock { try receiveLog.releaseGroups(batch.count, durably: false) }
                try receiveLog.sync()
            } catch {
                core.withLockedValue { fail(&$0, "completing \(batch.count) receive-log group(s) failed: \(error)") }
            }
            // Whether this loop goes on is decided under the lock, with the removal: a group
            // queued meanwhile either sees the loop running or starts a new one, never both.
            var more = false
            handle(payload: nil) { core in
                core.completions.removeFirst(batch.count)
                more = !core.completions.isEmpty
                if !more { core.completionRunning = false }
                return batch.flatMap { core.machine.logApplied(link: $0.link, index: $0.index) }
            }
            if !more { return }
        }
    }

    func store(_ position: ReplicaPosition, version: UInt64) throws {
        try positionStore.withLockedValue { stored in
            guard version > stored else { return }
            try positionFile.store(position)
            stored = version
            guard position.consistent else { return }
            // Points the image has reached durably count; a finished catch-up needs no way back.
            undo.confirm(through: position)
            try points.withLockedValue { p in
                // An older store finishing late (a log group's) does not end a newer catch-up.
                guard p.catchUpBase != nil, version > p.catchUpBaseVersion else { return }
                p.catchUpBase = nil
                if history == nil && p.drillBase == nil { try undo.reset() }
            }
        }
    }

    // MARK: - Recovery points

    /// A catch-up starts overwriting the image out of order from `base`, its last consistent
    /// state: that state is kept (a confirmed point) until the catch-up completes (P3).
    func keepCatchUpBase(_ base: ReplicaPosition, version: UInt64) {
        do {
            try points.withLockedValue { p in
                guard p.catchUpBase == nil else { return }
                p.catchUpBase = try undo.mark(base, time: Self.now(), kind: "catch-up", confirmed: true).id
                p.catchUpBaseVersion = version
            }
        } catch {
            logger.error("volume \(name): recording the state a catch-up starts from failed: \(error); a promotion mid catch-up cannot roll back")
        }
    }

    /// With `history:`, the image is at `position` now (a barrier): a recovery point, at most one a
    /// second, confirmed once the position is recorded; points beyond the window go.
    func markPoint(_ position: ReplicaPosition) {
        guard let history else { return }
        let now = Self.now()
        do {
            try points.withLockedValue { p in
                // Found by RecoveryPointTests (one run in two, 2026-12-07): an idle cut marked the
                // same state again, and the client's next flush came within the second after it,
                // so the state it made durable got no point.
                guard now - p.lastMarkTime >= 1,
                      p.lastMarked.map({ $0 != (position.generation, position.appliedSeq) }) ?? true else { return }
                p.lastMarkTime = now
                p.lastMarked = (position.generation, position.appliedSeq)
                try undo.mark(position, time: now, kind: "history", confirmed: false)
                let pinned = Set([p.catchUpBase, p.drillBase].compactMap { $0 })
                try undo.prune(olderThan: history.seconds.map { now - Double($0) }, maxBytes: history.bytes, pinned: pinned)
            }
        } catch {
            logger.error("volume \(name): recording a recovery point failed: \(error)")
        }
    }

    /// Wall-clock seconds since 1970 (what recovery points are listed and chosen by).
    static func now() -> Double { Date().timeIntervalSince1970 }

    /// A drill starts: at point `id`, or (nil) at the image's state now, which must be consistent.
    /// The point is kept, and every write replication makes saves what it overwrites, until
    /// ``endDrill()``.
    public func startDrill(at id: UInt64?) throws -> RecoveryPoint {
        try core.withLockedValue { core in
            try points.withLockedValue { p in
                guard p.drillBase == nil else { throw ReplicaError("a drill of \(name) is already running") }
                if let id {
                    guard let point = undo.point(id) else { throw ReplicaError("no recovery point \(id) of \(name)") }
                    p.drillBase = id
                    return point
                }
                let position = core.machine.position
                guard position.consistent else {
                    throw ReplicaError("the replica is not consistent (initial sync or catch-up running): name a point with --at, or wait until it is in sync")
                }
                // Under the core lock: no write is applied between the image's state and its mark.
                let point = try undo.mark(position, time: Self.now(), kind: "drill", confirmed: true)
                p.drillBase = point.id
                return point
            }
        }
    }

    /// The drill ended: its point is no longer kept for it.
    public func endDrill() {
        points.withLockedValue { p in
            p.drillBase = nil
            if history == nil && p.catchUpBase == nil { try? undo.reset() }
        }
    }

    /// The point a promotion of an inconsistent replica rolls back to: the state its unfinished
    /// catch-up started from.
    public var catchUpBase: RecoveryPoint? {
        guard let id = points.withLockedValue({ $0.catchUpBase }) else { return nil }
        return undo.point(id)
    }

    /// Puts the image back to point `id`, then the position: a crash midway leaves the replica
    /// inconsistent, its catch-up base the point, so the same roll-back runs again. Any stream
    /// ends (its primary is told the new position when it opens again). Returns the ranges written back.
    public func rollBack(to id: UInt64) throws -> (point: RecoveryPoint, ranges: [BlockRange]) {
        var result: (point: RecoveryPoint, ranges: [BlockRange])?
        var failure: (any Error)?
        handle(payload: nil) { core in
            // Writes held back are applied first (their before-images saved): the roll-back
            // undoes them too, and none lands on the image after it.
            var actions = drain(&core)
            // Under the core lock: no point is pruned meanwhile.
            guard let point = undo.point(id) else {
                failure = ReplicaError("no recovery point \(id) for \(name)")
                return actions
            }
            var midway = core.machine.position
            midway.consistent = false
            do {
                let version = core.nextVersion
                core.nextVersion += 1
                try store(midway, version: version)
                // Which point a crash midway must go back to (else the newest would be taken).
                try rollbackTarget.store(id)
                points.withLockedValue { $0.catchUpBase = id }
                let ranges = try undo.rollBack(to: id, image: image)
                // The image is at the point now; a primary of the same line that opens again
                // must overwrite what was put back (it acked those writes once): the position
                // names them, or the whole volume when they are too many to name.
                var target = point.position
                target.needs = ranges.count <= ReplicaPosition.maxNeeds ? (ranges.isEmpty ? nil : ranges)
                    : [BlockRange(offset: 0, length: image.size)]
                points.withLockedValue { $0.catchUpBase = nil }
                try? rollbackTarget.store(0)
                result = (point, ranges)
                return actions + core.machine.rolledBack(to: target)
            } catch {
                failure = error
                fail(&core, "rolling back to point #\(id) failed: \(error); the replica stays inconsistent")
                // Inconsistent, the stream ended: nothing is acked on top of a half roll-back.
                actions += core.machine.rolledBack(to: midway)
                return actions
            }
        }
        if let failure { throw failure }
        guard let result else { throw ReplicaError("rolling back \(name) to point \(id) did not run") }
        return result
    }

    func write(_ item: ReplicationItem, payload: ByteBuffer?) throws {
        if item.isZero {
            try image.zero(offset: item.range.offset, length: item.range.length)
        } else {
            guard let payload, UInt64(payload.readableBytes) == item.range.length else {
                throw ReplicaError("item \(item.index) for \(item.range) arrived without its \(item.range.length) bytes")
            }
            try image.write(offset: item.range.offset, data: payload)
        }
    }

    func fail(_ core: inout Core, _ message: String) {
        core.lastError = message
        logger.error("volume \(name): \(message)")
        onEvent(VolumeEvent(volume: name, kind: .ioError, message: "volume \(name): \(message)"))
    }
}

struct ReplicaError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
