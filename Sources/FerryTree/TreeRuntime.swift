import FerryCore
import FerryStore
import FerryWire
import Foundation
import Logging
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How tree runtimes reach peers: the site's peer links.
public protocol TreePort: AnyObject, Sendable {
    /// Sends frames on the peer's current link; false when it has none.
    func send(_ frames: [Frame], to peer: String) -> Bool
    /// Whether the peer's link takes more data now.
    func isWritable(_ peer: String) -> Bool
    /// Whether the peer has a link up.
    func isConnected(_ peer: String) -> Bool
}

/// A ``TreeTransport`` over a peer link: requests carry IDs, the replies arrive through
/// ``deliver(_:)``; a lost link fails every call waiting on it.
public final class RemoteTreeTransport: PipelinedTreeTransport, @unchecked Sendable {
    public let tree: String
    public let peer: String
    let port: any TreePort
    let compress: Bool
    /// One zstd context for every put this transport sends.
    let compressor: ZstdCompressor?
    let bytesPerSecond: UInt64?
    let timeout: Double
    private let condition = NSCondition()
    private var nextRequest: UInt64 = 1
    private var replies: [UInt64: TreeMessage] = [:]
    private var failure: String?
    /// Epoch and the oldest change not yet sent, told to the peer in each hello.
    public var epoch: UInt64 = 1
    public var pendingSince: Date?
    /// Seconds `put` waited for the link to take more data (since ``reset()``).
    public private(set) var linkWait = 0.0
    private var sendStart = Date()
    private var sentSinceStart: UInt64 = 0
    private let wireCounter = Atomic<UInt64>(0)
    private let dataCounter = Atomic<UInt64>(0)
    /// All bytes sent on the wire for this tree since the daemon started.
    public var wireBytes: UInt64 { wireCounter.load(ordering: .relaxed) }
    /// Chunk and blob bytes sent (before compression) since the daemon started.
    public var dataBytes: UInt64 { dataCounter.load(ordering: .relaxed) }

    public init(tree: String, peer: String, port: any TreePort, compress: Bool, bytesPerSecond: UInt64?, timeout: Double = 600) {
        self.tree = tree
        self.peer = peer
        self.port = port
        self.compress = compress
        self.compressor = compress ? ZstdCompressor(level: 1) : nil
        self.bytesPerSecond = bytesPerSecond
        self.timeout = timeout
    }

    public struct Failed: Error, CustomStringConvertible {
        public var description: String
    }

    /// A reply from the peer (on a link's event loop).
    public func deliver(_ message: TreeMessage) {
        let request: UInt64
        switch message {
        case .latest(let r, _, _), .lacking(let r, _), .committed(let r, _, _), .failed(let r, _): request = r
        default: return
        }
        condition.lock()
        replies[request] = message
        condition.broadcast()
        condition.unlock()
    }

    /// The link went down: every waiting call fails.
    public func linkDown(_ reason: String) {
        condition.lock()
        failure = "the link to \(peer) went down (\(reason))"
        condition.broadcast()
        condition.unlock()
    }

    /// The link can take data again.
    public func writable() {
        condition.lock()
        condition.broadcast()
        condition.unlock()
    }

    /// Starts a run afresh (a new link may be up since the last).
    public func reset() {
        condition.lock()
        failure = nil
        replies.removeAll()
        condition.unlock()
        sendStart = Date()
        sentSinceStart = 0
        linkWait = 0
    }

    private func send(_ message: TreeMessage) throws {
        let frame = message.frame(tree: tree, compressor: compressor)
        wireCounter.add(UInt64(frame.payloadLength + Frame.headerSize + Frame.trailerSize), ordering: .relaxed)
        guard port.send([frame], to: peer) else { throw Failed(description: "\(peer) is not connected") }
    }

    private func request(_ make: (UInt64) -> TreeMessage, within seconds: Double? = nil) throws -> TreeMessage {
        try wait(for: try start(make), within: seconds)
    }

    /// How long a hello and a query may go unanswered: the peer answers them at once (a query
    /// after the puts before it). An answer can be lost without the link going down (sent on a
    /// connection the other side was just closing as a duplicate), and then only this ends the
    /// wait: the run fails and is retried. A commit may take long (a large apply): it waits
    /// `timeout`.
    static let helloTimeout = 10.0, queryTimeout = 120.0

    /// Sends a request; its answer is waited for with ``wait(for:)``.
    private func start(_ make: (UInt64) -> TreeMessage) throws -> UInt64 {
        condition.lock()
        if let failure {
            condition.unlock()
            throw Failed(description: failure)
        }
        let id = nextRequest
        nextRequest += 1
        condition.unlock()
        try send(make(id))
        return id
    }

    private func wait(for id: UInt64, within seconds: Double? = nil) throws -> TreeMessage {
        condition.lock()
        defer { condition.unlock() }
        let limit = min(timeout, seconds ?? timeout)
        let deadline = Date().addingTimeInterval(limit)
        while replies[id] == nil && failure == nil {
            guard condition.wait(until: deadline) else {
                throw Failed(description: "\(peer) did not answer within \(Int(limit)) s")
            }
        }
        if let reply = replies.removeValue(forKey: id) {
            if case .failed(_, let message) = reply { throw Failed(description: "\(peer): \(message)") }
            return reply
        }
        throw Failed(description: failure ?? "no answer")
    }

    public func latestRoot() throws -> ChunkID? {
        let since = pendingSince.map { UInt64(max(0, $0.timeIntervalSince1970 * 1000)) } ?? 0
        guard case .latest(_, let root, _) = try request({ .hello(request: $0, epoch: epoch, pendingSinceMs: since) },
                                                          within: Self.helloTimeout) else {
            throw Failed(description: "\(peer) answered hello out of turn")
        }
        return root
    }

    public func lacking(_ ids: [ChunkID]) throws -> [ChunkID] {
        var out: [ChunkID] = []
        var start = 0
        while start < ids.count {
            let part = Array(ids[start..<min(ids.count, start + TreeMessage.maxIDs)])
            guard case .lacking(_, let lacking) = try request({ .query(request: $0, ids: part) }, within: Self.queryTimeout) else {
                throw Failed(description: "\(peer) answered a query out of turn")
            }
            out += lacking
            start += part.count
        }
        return out
    }

    public func ask(_ ids: [ChunkID]) throws -> UInt64 {
        precondition(ids.count <= TreeMessage.maxIDs)
        return try start { .query(request: $0, ids: ids) }
    }

    public func answer(_ ticket: UInt64) throws -> [ChunkID] {
        guard case .lacking(_, let lacking) = try wait(for: ticket, within: Self.queryTimeout) else {
            throw Failed(description: "\(peer) answered a query out of turn")
        }
        return lacking
    }

    public func put(_ id: ChunkID, _ data: ByteBuffer) throws {
        // Backpressure: wait while the link's buffer is full.
        condition.lock()
        let waitStarted = ContinuousClock.now
        defer { linkWait += TreeRun.seconds(ContinuousClock.now - waitStarted) }
        let deadline = Date().addingTimeInterval(timeout)
        while !port.isWritable(peer) && failure == nil {
            if !condition.wait(until: min(deadline, Date().addingTimeInterval(0.05))) && Date() >= deadline {
                condition.unlock()
                throw Failed(description: "\(peer) took no data for \(Int(timeout)) s")
            }
        }
        if let failure {
            condition.unlock()
            throw Failed(description: failure)
        }
        condition.unlock()
        if let limit = bytesPerSecond, limit > 0 {
            sentSinceStart += UInt64(data.readableBytes)
            let due = Double(sentSinceStart) / Double(limit) - Date().timeIntervalSince(sendStart)
            if due > 0 { usleep(UInt32(min(due, 10) * 1_000_000)) }
        }
        try send(.put(id: id, data: data))
        dataCounter.add(UInt64(data.readableBytes), ordering: .relaxed)
    }

    public func commit(root: ChunkID, summary: RunSummary) throws -> TreeSnapshot {
        guard case .committed(_, let id, let at) = try request({ .commit(request: $0, root: root, summary: summary) }) else {
            throw Failed(description: "\(peer) answered a commit out of turn")
        }
        return TreeSnapshot(id: id, root: root.hex, committedAt: at, sourceTime: summary.sourceTime, epoch: summary.epoch,
                            files: summary.files, directories: summary.directories, bytes: summary.bytes)
    }
}

/// A tree on a replica site: keeps its repository and live mirror, answers the primary.
///
/// Work runs on the tree's own serial queue, in the order the frames arrived, so a put is stored
/// before a later query is answered and the link's event loop never waits on the disk.
public final class TreeReceiver: @unchecked Sendable {
    public let name: String
    public let target: String
    public let repository: TreeRepository
    let port: any TreePort
    let logger: Logger
    let retention: Retention?
    private let queue: DispatchQueue
    private let state = Mutex(State())
    /// Garbage collection runs after a pruning, at most this often (seconds).
    let collectionInterval: Double
    private var lastCollection = Date.distantPast
    private var droppedSinceCollection = 0

    public struct State: Sendable {
        public var phase = "idle"
        public var source: String?
        public var pendingSince: Date?
        public var lastError: String?
        public var lastSnapshot: TreeSnapshot?
        public var received: UInt64 = 0
        /// The epoch of the primary this replica follows.
        public var epoch: UInt64 = 1
        /// Files this replica kept aside instead of overwriting (they changed here after the last
        /// snapshot this site sent when it was the primary), as `path → where it is now`.
        public var keptAside: [String] = []
    }

    /// Called (on the tree's queue) when a primary of a newer epoch says hello: persist it.
    public var onEpoch: ((UInt64, String) -> Void)?

    /// Sets the epoch followed (from the catalog, at start).
    public func follow(epoch: UInt64) { state.withLock { $0.epoch = epoch } }

    public init(name: String, target: String, directory: String, retention: Retention?, port: any TreePort, logger: Logger,
                collectionInterval: Double = 300) throws {
        self.collectionInterval = collectionInterval
        self.name = name
        self.target = target
        self.repository = try TreeRepository(directory: directory)
        self.port = port
        self.logger = logger
        self.retention = retention
        self.queue = DispatchQueue(label: "ferry-tree-\(name)")
        let latest = try repository.latest()
        state.withLock { $0.lastSnapshot = latest }
    }

    public var status: State { state.withLock { $0 } }

    /// A message from the tree's primary (on a link's event loop).
    public func received(_ message: TreeMessage, from peer: String) {
        // A chunk's SHA-256 is checked here, on the link's thread, so the tree's queue (which
        // stores chunks and builds directories ahead) does less per chunk.
        if case .put(let id, let data) = message {
            let intact = ChunkID.of(data) == id
            queue.async { [self] in store(id, data, intact: intact) }
            return
        }
        queue.async { [self] in handle(message, from: peer) }
    }

    private func store(_ id: ChunkID, _ data: ByteBuffer, intact: Bool) {
        do {
            guard intact else { throw TreeMirror.Incomplete(description: TreeRepository.damaged(id)) }
            try repository.put(id, data, verified: true)
            state.withLock { $0.received += UInt64(data.readableBytes) }
        } catch {
            logger.error("tree chunk not stored", metadata: ["tree": "\(name)", "error": "\(error)"])
            state.withLock { $0.lastError = "\(error)" }
        }
    }

    /// Runs `body` on the tree's queue (restore, verify), after what is queued.
    public func sync<R>(_ body: () throws -> R) rethrows -> R { try queue.sync { try body() } }

    private func reply(_ message: TreeMessage, to peer: String) {
        _ = port.send([message.frame(tree: name)], to: peer)
    }

    private func handle(_ message: TreeMessage, from peer: String) {
        switch message {
        case .hello(let request, let epoch, let since):
            let mine = state.withLock { $0.epoch }
            guard epoch >= mine else {
                reply(.failed(request: request, message: "stale epoch: this site follows tree \(name) at epoch \(mine), "
                              + "\(peer) sent epoch \(epoch); another site was promoted since"), to: peer)
                return
            }
            state.withLock {
                $0.phase = "receiving"
                $0.source = peer
                $0.pendingSince = since == 0 ? nil : Date(timeIntervalSince1970: Double(since) / 1000)
                $0.epoch = epoch
            }
            if epoch > mine { onEpoch?(epoch, peer) }
            repository.beginRun(mirror: target)
            do {
                let latest = try repository.advertisedRoot()
                reply(.latest(request: request, root: latest?.root, snapshot: latest?.id ?? 0), to: peer)
            } catch {
                reply(.failed(request: request, message: "\(error)"), to: peer)
            }
        case .query(let request, let ids):
            do {
                reply(.lacking(request: request, ids: try repository.lacking(ids)), to: peer)
            } catch {
                reply(.failed(request: request, message: "\(error)"), to: peer)
            }
        case .put:
            break  // stored by received(_:from:), which checks its hash on the link's thread
        case .commit(let request, let root, let summary):
            let followed = state.withLock { $0.epoch }
            guard UInt64(max(0, summary.epoch)) >= followed else {
                reply(.failed(request: request, message: "stale epoch: this site follows tree \(name) at epoch \(followed), the run is of epoch \(summary.epoch)"), to: peer)
                return
            }
            state.withLock { $0.phase = "applying" }
            do {
                let (snapshot, stats) = try repository.commit(root: root, summary: summary, mirror: target)
                if !stats.keptAside.isEmpty {
                    state.withLock { $0.keptAside += stats.keptAside }
                    logger.warning("tree: \(stats.keptAside.count) files changed here after the last snapshot this site sent were kept aside, not overwritten",
                                   metadata: ["tree": "\(name)", "directory": "\(target).ferry-kept-aside/",
                                              "files": "\(stats.keptAside.prefix(20).joined(separator: ", "))"])
                }
                state.withLock {
                    $0.phase = "idle"
                    $0.lastSnapshot = snapshot
                    $0.lastError = nil
                    $0.pendingSince = nil
                }
                logger.info("tree snapshot committed", metadata: [
                    "tree": "\(name)", "snapshot": "\(snapshot.id)", "files": "\(snapshot.files)",
                    "written": "\(stats.filesWritten)", "staged": "\(stats.filesStaged)", "removed": "\(stats.removed)", "renamed": "\(stats.renamed)",
                    "apply": "\(stats.applySeconds)s", "sync": "\(stats.syncSeconds)s", "chunks": "\(stats.chunksSeconds)s"])
                reply(.committed(request: request, snapshot: snapshot.id, at: snapshot.committedAt), to: peer)
                prune()
            } catch {
                state.withLock {
                    $0.phase = "idle"
                    $0.lastError = "\(error)"
                }
                logger.error("tree snapshot not committed", metadata: ["tree": "\(name)", "error": "\(error)"])
                reply(.failed(request: request, message: "snapshot not committed: \(error)"), to: peer)
            }
        case .latest, .lacking, .committed, .failed:
            break
        }
    }

    static func stamp() -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        return f.string(from: Date()).replacingOccurrences(of: ":", with: "")
    }

    /// Drops the snapshots the retention policy does not keep (never the newest).
    private func prune() {
        guard let retention else { return }
        do {
            let all = try repository.snapshots()
            let kept = retention.kept(times: all.map { $0.sourceTime.timeIntervalSince1970 }, now: Date().timeIntervalSince1970)
            let drop = all.indices.filter { !kept.contains($0) }.map { all[$0].id }
            if !drop.isEmpty {
                try repository.forget(drop)
                logger.info("tree snapshots pruned", metadata: ["tree": "\(name)", "snapshots": "\(drop.map(String.init).joined(separator: ","))"])
                droppedSinceCollection += drop.count
            }
            // Garbage collection after pruning, at most every `collectionInterval`.
            if droppedSinceCollection > 0 && Date().timeIntervalSince(lastCollection) >= collectionInterval {
                let started = Date()
                let result = try repository.collectGarbage()
                lastCollection = Date()
                droppedSinceCollection = 0
                logger.info("tree garbage collected", metadata: [
                    "tree": "\(name)", "chunks": "\(result.chunksRemoved)", "freed": "\(result.bytesFreed)",
                    "copied": "\(result.bytesCopied)", "seconds": "\(String(format: "%.2f", Date().timeIntervalSince(started)))"])
            }
        } catch {
            logger.warning("tree snapshot pruning failed", metadata: ["tree": "\(name)", "error": "\(error)"])
        }
    }
}
