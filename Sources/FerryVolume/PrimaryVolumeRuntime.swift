import FerryCore
import FerryNBD
import FerryStore
import FerryWire
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A replicated volume on its primary: the `BlockDevice` FerryNBD serves, running FerryCore's
/// ``PrimaryVolume`` machine and executing its actions (DESIGN §4, §5.1).
///
/// Every entry point — a client request, a frame from a peer, a link event, a timer, a finished
/// disk operation — takes the runtime's lock, hands the event to the machine, and turns the
/// actions into work in two parts:
/// - under the lock, what must happen in the machine's order: frames queued on their links
///   (stream order is the machine's order), journal appends, catch-up reads (a region is read
///   when the machine admits it, so it holds every earlier write and no later one);
/// - after the lock, what is slow or calls out: local writes (inline on the caller's thread, on the
///   page cache; after the link's send when they went to a peer on a link sharing that thread's
///   loop, ``writeAfterSending(_:on:)``), zeroing and fdatasync on the thread pool, metadata
///   persists (one at a time, in token order), answering clients.
/// A local write done outside the lock is safe: the machine admits an overlapping request, or a
/// region read, only after the write reported done.
public final class PrimaryVolumeRuntime: BlockDevice, Sendable {
    public let name: String
    public let image: VolumeImage
    let threadPool: NIOThreadPool
    let links: any VolumeLinks
    let clock: VolumeClock
    let metadataFile: MetadataFile<PrimaryVolume.Metadata>
    let journal: JournalStore?
    let journalLock = NIOLock()
    /// Client flushes share their fdatasyncs (group commit): by the flush request's sequence.
    let flushGroup = GroupCommit<UInt64>()
    let logger: Logger
    let onEvent: @Sendable (VolumeEvent) -> Void
    /// `ferry_volume_ack_duration_seconds`, when the machine records ack latency.
    let ackTimers: AckTimers?
    let core: NIOLockedValueBox<Core>
    let ticker: NIOLockedValueBox<RepeatedTask?> = NIOLockedValueBox(nil)
    let localQueue = NIOLockedValueBox(LocalWriteQueue())

    struct Core: Sendable {
        var machine: PrimaryVolume
        var pending: [UInt64: PendingIO] = [:]
        var preserved: [String: [UInt64: ByteBuffer]] = [:]
        var persistRunning = false
        var persistQueued: (token: UInt64, metadata: PrimaryVolume.Metadata)?
        var encoders: [String: ReplicationFrameEncoder] = [:]
        var lastError: String?
        var lastErrorLogged: Int64 = 0
        var fenced = false
        /// Data bytes put on each peer's links since start (holes and zeros cost none).
        var bytesSent: [String: UInt64] = [:]
    }

    public var size: UInt64 { image.size }
    public var isReadOnly: Bool { false }

    /// Opens the volume's replication state (metadata, journal) next to its image and starts the
    /// machine. `cleanShutdown`: the previous run stopped cleanly (else the activity log's extents
    /// are resynced to every peer).
    public init(name: String, image: VolumeImage, config: PrimaryVolume.Config, stateDirectory: String,
                cleanShutdown: Bool, threadPool: NIOThreadPool, links: any VolumeLinks, clock: VolumeClock = .system,
                logger: Logger, onEvent: @escaping @Sendable (VolumeEvent) -> Void) throws {
        self.name = name
        self.image = image
        self.threadPool = threadPool
        self.links = links
        self.clock = clock
        self.logger = logger
        self.onEvent = onEvent
        self.ackTimers = config.recordsAckLatency ? AckTimers(volume: name, peers: Array(config.peers.keys)) : nil
        self.metadataFile = try MetadataFile(path: stateDirectory + "/primary.meta")
        let metadata = try metadataFile.load() ?? PrimaryVolume.Metadata()
        var entries: [JournalEntry] = []
        if config.peers.values.contains(where: { $0.mode == .async }) {
            let (store, recovered) = try JournalStore.open(directory: stateDirectory + "/journal")
            self.journal = store
            entries = recovered
        } else {
            self.journal = nil
        }
        var machine = PrimaryVolume(config: config, metadata: metadata, cleanShutdown: cleanShutdown,
                                    journal: entries, now: clock.now())
        let startActions = machine.start()
        var encoders: [String: ReplicationFrameEncoder] = [:]
        for (peer, policy) in config.peers { encoders[peer] = ReplicationFrameEncoder(compress: policy.compression == .zstd) }
        self.core = NIOLockedValueBox(Core(machine: machine, encoders: encoders))
        handle { _ in startActions }
    }

    /// Starts the machine's timers on `eventLoop`.
    public func start(on eventLoop: any EventLoop, tick: TimeAmount = .milliseconds(20)) {
        let task = eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { [weak self] _ in
            guard let self else { return }
            let now = self.clock.now()
            self.handle { $0.machine.tick(now: now) }
        }
        ticker.withLockedValue { $0 = task }
    }

    /// Stops the timers and flushes the image and metadata (a clean shutdown).
    public func stop() {
        ticker.withLockedValue { $0?.cancel(); $0 = nil }
        // Writes still waiting for their frames to go out (``writeAfterSending(_:on:)``) reach the
        // image before it is flushed.
        let waiting = localQueue.withLockedValue { queue in
            defer { queue.writes = [] }
            return queue.writes
        }
        if !waiting.isEmpty { writeLocally(waiting) }
        do {
            try image.flush()
            try journalLock.withLock { try journal?.sync() }
            let metadata = core.withLockedValue { $0.machine.metadataForShutdown() }
            try metadataFile.store(metadata)
        } catch {
            logger.error("volume \(name): flushing replication state at shutdown failed: \(error)")
        }
    }

    // MARK: - BlockDevice

    public func read(offset: UInt64, length: Int, on eventLoop: any EventLoop) -> EventLoopFuture<ByteBuffer> {
        do {
            return eventLoop.makeSucceededFuture(try image.read(offset: offset, length: length, allocator: ByteBufferAllocator()))
        } catch {
            return eventLoop.makeFailedFuture(reportIOError(error, doing: "read"))
        }
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        let range = BlockRange(offset: offset, length: UInt64(data.readableBytes))
        return submit(.write(range, fua: fua), io: PendingIO(kind: .write(data), range: range), on: eventLoop)
    }

    public func flush(on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        submit(.flush, io: PendingIO(kind: .flush, range: nil), on: eventLoop)
    }

    /// Replicated as zeroing, so that every replica reads the same bytes as the primary.
    public func trim(offset: UInt64, length: UInt64, fua: Bool, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        let range = BlockRange(offset: offset, length: length)
        return submit(.zero(range, fua: fua), io: PendingIO(kind: .zero(mayPunchHole: true), range: range), on: eventLoop)
    }

    public func writeZeroes(offset: UInt64, length: UInt64, mayPunchHole: Bool, fastOnly: Bool, fua: Bool,
                            on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        let range = BlockRange(offset: offset, length: length)
        return submit(.zero(range, fua: fua), io: PendingIO(kind: .zero(mayPunchHole: mayPunchHole), range: range), on: eventLoop)
    }

    public func blockStatus(offset: UInt64, length: UInt64, on eventLoop: any EventLoop) -> EventLoopFuture<[BlockExtent]> {
        let extents = image.extents(offset: offset, length: length).map {
            BlockExtent(length: $0.length, isHole: $0.isHole, readsAsZero: $0.isHole)
        }
        return eventLoop.makeSucceededFuture(extents)
    }

    private func submit(_ request: PrimaryVolume.Request, io: PendingIO, on eventLoop: any EventLoop) -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        var pendingIO = io
        pendingIO.promise = promise
        let now = clock.now()
        handle { core in
            let (seq, actions) = core.machine.submit(request, now: now)
            core.pending[seq] = pendingIO
            return actions
        }
        return promise.futureResult
    }

    // MARK: - Links

    public func linkUp(peer: String, link: LinkID) {
        let now = clock.now()
        handle { $0.machine.linkUp(peer: peer, link: link, now: now) }
    }

    public func linkDown(peer: String, link: LinkID) {
        let now = clock.now()
        handle { $0.machine.linkDown(peer: peer, link: link, now: now) }
    }

    /// A frame for this volume from `peer` on `link`.
    public func received(_ message: ReplicationMessage, from peer: String, link: LinkID) {
        let now = clock.now()
        handle { $0.machine.received(message, peer: peer, link: link, now: now) }
    }

    /// The epoch this primary writes in.
    public var epoch: UInt64 { core.withLockedValue { $0.machine.epoch } }
    public var isFenced: Bool { core.withLockedValue { $0.fenced } }

    /// What this site sets aside before it steps down (``PrimaryVolume/rangesToKeepAside(plan:keepAsideFor:)``).
    public func rangesToKeepAside(plan: Rejoin?, keepAsideFor: String?) -> [BlockRange] {
        core.withLockedValue { $0.machine.rangesToKeepAside(plan: plan, keepAsideFor: keepAsideFor) }
    }

    /// ``PrimaryVolume/idleSequence``.
    public var idleSequence: UInt64? { core.withLockedValue { $0.machine.idleSequence } }

    /// ``PrimaryVolume/writeMap()``.
    public var writeMap: WriteMap? { core.withLockedValue { $0.machine.writeMap() } }

    /// `ferry verify --repair`: sends `ranges` to `peer` again; false when it cannot now (no open
    /// session, or a catch-up or point running).
    public func resync(_ ranges: [BlockRange], peer: String) -> Bool {
        let now = clock.now()
        var started = false
        handle { core in
            guard let actions = core.machine.resync(ranges, peer: peer, now: now) else { return [] }
            started = true
            return actions
        }
        return started
    }

    /// Whether `peer` durably holds every write admitted here, with none running (switchover).
    public func peerHoldsEverything(_ peer: String) -> Bool { core.withLockedValue { $0.machine.holdsEverything(peer) } }
    /// The last write admitted here.
    public var lastAdmittedSeq: UInt64 { core.withLockedValue { $0.machine.lastAdmittedSeq } }
    /// This primary's generation (its ID on the wire).
    public var generation: UInt64 { core.withLockedValue { $0.machine.generation } }
    /// The line of history recorded with the volume (``PrimaryVolume/Config/history``).
    public var history: [GenerationRecord] { core.withLockedValue { $0.machine.history } }

    /// The peers this primary is in a split brain (or an unrelated history) with.
    public var rivals: [String: Rival] { core.withLockedValue { $0.machine.rivals } }

    /// `ferry resolve --keep` naming this site against `peer`; false when they are not in a split brain.
    public func resolveKeepingLocal(against peer: String) -> Bool {
        let now = clock.now()
        var resolved = false
        handle { machine in
            guard let actions = machine.machine.resolveKeepingLocal(against: peer, now: now) else { return [] }
            resolved = true
            return actions
        }
        return resolved
    }

    /// How this site gives way to `peer` in a split brain (`ferry resolve --keep PEER`).
    public func rejoinPlan(keeping peer: String) -> Rejoin? { core.withLockedValue { $0.machine.rejoinPlan(keeping: peer) } }

    /// Stops taking writes: another site holds a newer epoch (P4).
    public func fence(reason: String) {
        handle { $0.machine.fence(reason: reason) }
    }

    /// `ferry checkpoint`: a point now for every scheduled peer.
    public func checkpoint() {
        let now = clock.now()
        handle { $0.machine.checkpointNow(now: now) }
    }

    /// Each peer's link, for status.
    public func status() -> [ReplicaLinkStatus] {
        let now = clock.now()
        return core.withLockedValue { core in
            core.machine.status(now: now).map { status in
                var s = status
                s.bytesSent = core.bytesSent[status.peer] ?? 0
                return s
            }
        }
    }

    public var lastError: String? { core.withLockedValue { $0.lastError } }
}
