import Foundation
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// How a run reaches the peer that keeps the tree: in-process (tests, `LocalTreeTransport`) or over
/// a peer link. Calls are made from the run's thread, one at a time, and may block.
public protocol TreeTransport: AnyObject {
    /// The root blob of the peer's newest snapshot (nil: none yet).
    func latestRoot() throws -> ChunkID?
    /// Of `ids`, those the peer lacks.
    func lacking(_ ids: [ChunkID]) throws -> [ChunkID]
    /// Sends one chunk or blob.
    func put(_ id: ChunkID, _ data: ByteBuffer) throws
    /// Asks the peer to commit the snapshot whose root blob is `root`.
    func commit(root: ChunkID, summary: RunSummary) throws -> TreeSnapshot
}

/// A transport whose queries can be in flight several at once: ``ask(_:)`` sends one, and
/// ``answer(_:)`` waits for its answer. Answers come in the order the queries were asked.
public protocol PipelinedTreeTransport: TreeTransport {
    func ask(_ ids: [ChunkID]) throws -> UInt64
    func answer(_ ticket: UInt64) throws -> [ChunkID]
}

/// The peer's store in this process: for tests and for restoring locally.
public final class LocalTreeTransport: TreeTransport {
    public let repository: TreeRepository
    public let mirror: String?
    public private(set) var bytesPut: UInt64 = 0
    public private(set) var chunksPut = 0
    /// What the last commit did to the mirror.
    public private(set) var lastStats: TreeMirror.Stats?

    public init(repository: TreeRepository, mirror: String?) {
        self.repository = repository
        self.mirror = mirror
    }

    public func latestRoot() throws -> ChunkID? {
        repository.beginRun(mirror: mirror)
        return try repository.advertisedRoot()?.root
    }
    public func lacking(_ ids: [ChunkID]) throws -> [ChunkID] { try repository.lacking(ids) }
    public func put(_ id: ChunkID, _ data: ByteBuffer) throws {
        try repository.put(id, data)
        bytesPut += UInt64(data.readableBytes)
        chunksPut += 1
    }
    public func commit(root: ChunkID, summary: RunSummary) throws -> TreeSnapshot {
        let (snapshot, stats) = try repository.commit(root: root, summary: summary, mirror: mirror)
        lastStats = stats
        return snapshot
    }
}

/// One replication run of a tree to one peer: scan the source (reading only what the files cache
/// does not vouch for), offer every new chunk and directory blob in batches, send the ones the
/// peer lacks, then commit.
///
/// Files the cache vouches for are not read; their chunks are asked about only when the peer's
/// newest snapshot is not the scan the cache came from (a new peer, or a run that was cut short):
/// then the peer names what it lacks and only that is read again and sent, so a resumed run sends
/// only what had not arrived.
public final class TreeRun: ScanSink {
    public struct Report: Sendable {
        public var snapshot: TreeSnapshot
        public var scan: TreeScanner.Result
        /// Chunks and blobs sent, and their bytes (before the transport compresses them).
        public var chunksSent: Int
        public var bytesSent: UInt64
        /// Chunks offered that the peer already had.
        public var chunksSkipped: Int
        /// Seconds the run waited for the peer: for its answers to queries (the peer busy with
        /// what came before) and for the link to take more data.
        public var waitedForAnswers = 0.0
        public var waitedForLink = 0.0
    }

    let transport: any TreeTransport
    let sourceRoot: String
    /// Flush a batch of offers at this many bytes of held data or this many IDs. Small enough
    /// that a run changing a few files spread through a tree sends them while it scans.
    let batchBytes: Int
    let batchCount: Int
    private var held: [(ChunkID, ByteBuffer)] = []
    /// Batches asked about whose answers are not in yet (pipelined transports).
    private var inFlight: [(ticket: UInt64, batch: [(ChunkID, ByteBuffer)])] = []
    /// Batches asked about at once: with the default batch size, 48 MiB held for the answers.
    let maxInFlight = 12
    private var heldBytes = 0
    private var offered = Set<ChunkID>()
    /// Unread files whose chunks must be asked about (the peer may not have them).
    private var checkUnread = false
    private var unread: [(path: [UInt8], entry: TreeEntry)] = []
    private var unreadIDs = 0
    private var chunksSent = 0
    private var bytesSent: UInt64 = 0
    private var chunksSkipped = 0

    public init(transport: any TreeTransport, sourceRoot: String, batchBytes: Int = 4 << 20, batchCount: Int = 2048) {
        self.transport = transport
        self.sourceRoot = sourceRoot
        self.batchBytes = batchBytes
        self.batchCount = batchCount
    }

    /// Runs a scan and sends it. `cacheRoot` is the root of the scan that produced the scanner's
    /// files cache (nil when it is empty).
    public func run(_ scanner: TreeScanner, cacheRoot: ChunkID?, epoch: Int64, sourceTime: Date = Date()) throws -> Report {
        try begin(cacheRoot: cacheRoot)
        let scan = try scanner.scan(into: self)
        return try finish(scan, epoch: epoch, sourceTime: sourceTime)
    }

    /// Asks the peer for its newest snapshot, before the scan.
    public func begin(cacheRoot: ChunkID?) throws {
        let peerRoot = try transport.latestRoot()
        checkUnread = cacheRoot == nil || peerRoot != cacheRoot
    }

    /// After the scan: sends the root blob and what is still held, then commits.
    public func finish(_ scan: TreeScanner.Result, epoch: Int64, sourceTime: Date) throws -> Report {
        let (root, rootBlob) = Self.rootBlob(scan, sourceRoot: sourceRoot)
        try offer(root, rootBlob)
        try flush()
        try settleAll()
        try flushUnread()
        let summary = RunSummary(sourceTime: sourceTime, epoch: epoch, files: Int64(scan.files),
                                 directories: Int64(scan.directories), bytes: Int64(scan.bytes))
        let snapshot = try transport.commit(root: root, summary: summary)
        return Report(snapshot: snapshot, scan: scan, chunksSent: chunksSent, bytesSent: bytesSent, chunksSkipped: chunksSkipped,
                      waitedForAnswers: answerWait, waitedForLink: (transport as? RemoteTreeTransport)?.linkWait ?? 0)
    }

    /// The root blob names the top directory with its own metadata.
    static func rootBlob(_ scan: TreeScanner.Result, sourceRoot: String) -> (ChunkID, ByteBuffer) {
        var st = stat()
        _ = PosixFS.withCPath(sourceRoot) { lstat($0, &st) }
        let top = TreeEntry(name: [], kind: .directory, mode: UInt32(st.st_mode) & 0o7777, uid: st.st_uid, gid: st.st_gid,
                            mtime: PosixFS.time(st.st_mtim), subtree: scan.root)
        let blob = DirectoryBlob.encode([top])
        return (ChunkID.of(blob), blob)
    }

    /// Progress of the run so far.
    public var sent: (chunks: Int, bytes: UInt64) { (chunksSent, bytesSent) }

    public func chunk(_ id: ChunkID, _ data: ByteBuffer) throws { try offer(id, data) }

    public var wantsUnreadFiles: Bool { checkUnread }

    public func file(_ path: [UInt8], _ entry: TreeEntry, read: Bool) throws {
        guard !read, checkUnread, !entry.segments.isEmpty else { return }
        unread.append((path, entry))
        unreadIDs += entry.segments.reduce(0) { $0 + $1.chunks.count }
        if unreadIDs >= batchCount { try flushUnread() }
    }

    public func directory(_ path: [UInt8], _ id: ChunkID, _ blob: ByteBuffer) throws { try offer(id, blob) }

    private func offer(_ id: ChunkID, _ data: ByteBuffer) throws {
        guard offered.insert(id).inserted else { return }
        held.append((id, data))
        heldBytes += data.readableBytes
        if heldBytes >= batchBytes || held.count >= batchCount { try flush() }
    }

    /// Offers what is held. Over a link the query is not waited for: up to ``maxInFlight``
    /// batches are asked about at once, so the scan, the network and the replica's disk overlap;
    /// the oldest batch's lacking chunks are sent when its answer is in.
    private func flush() throws {
        guard !held.isEmpty else { return }
        let batch = held
        held.removeAll(keepingCapacity: true)
        heldBytes = 0
        if let pipelined = transport as? any PipelinedTreeTransport {
            let ticket = try pipelined.ask(batch.map(\.0))
            inFlight.append((ticket, batch))
            while inFlight.count > maxInFlight { try settleOldest(pipelined) }
            return
        }
        try send(batch, lacking: Set(try transport.lacking(batch.map(\.0))))
    }

    private func settleOldest(_ pipelined: any PipelinedTreeTransport) throws {
        let (ticket, batch) = inFlight.removeFirst()
        let asked = ContinuousClock.now
        let lacking = Set(try pipelined.answer(ticket))
        answerWait += Self.seconds(ContinuousClock.now - asked)
        try send(batch, lacking: lacking)
    }

    private var answerWait = 0.0

    /// A duration in seconds.
    static func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }

    /// Waits for every batch still asked about and sends what they lack.
    private func settleAll() throws {
        guard let pipelined = transport as? any PipelinedTreeTransport else { return }
        while !inFlight.isEmpty { try settleOldest(pipelined) }
    }

    private func send(_ batch: [(ChunkID, ByteBuffer)], lacking: Set<ChunkID>) throws {
        for (id, data) in batch {
            if lacking.contains(id) {
                try transport.put(id, data)
                chunksSent += 1
                bytesSent += UInt64(data.readableBytes)
            } else {
                chunksSkipped += 1
            }
        }
    }

    /// Asks about the chunks of files not read this scan, and reads and sends what the peer lacks.
    private func flushUnread() throws {
        guard !unread.isEmpty else { return }
        var ids: [ChunkID] = []
        for (_, entry) in unread {
            for id in entry.chunkIDs where !offered.contains(id) { ids.append(id) }
        }
        let lacking = Set(try transport.lacking(ids))
        for (path, entry) in unread {
            var offset: UInt64 = 0
            var fd: Int32 = -1
            defer { if fd >= 0 { close(fd) } }
            for segment in entry.segments {
                offset = segment.offset
                for chunk in segment.chunks {
                    defer { offset += UInt64(chunk.length) }
                    guard lacking.contains(chunk.id), !offered.contains(chunk.id) else { continue }
                    if fd < 0 {
                        fd = PosixFS.withCName(Array(sourceRoot.utf8) + [0x2F] + path) { open($0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) }
                        guard fd >= 0 else { throw TreeFSError("open to send again", path) }
                    }
                    var buffer = ByteBuffer()
                    buffer.reserveCapacity(Int(chunk.length))
                    let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(chunk.length)) { raw in
                        max(0, pread(fd, raw.baseAddress!, Int(chunk.length), off_t(offset)))
                    }
                    guard n == Int(chunk.length), ChunkID.of(buffer) == chunk.id else {
                        throw FileChanged(path: path)
                    }
                    offered.insert(chunk.id)
                    try transport.put(chunk.id, buffer)
                    chunksSent += 1
                    bytesSent += UInt64(chunk.length)
                }
            }
        }
        unread.removeAll(keepingCapacity: true)
        unreadIDs = 0
    }

    /// A file the cache vouched for changed before its data could be sent: the run is retried
    /// (the next scan reads it).
    public struct FileChanged: Error, CustomStringConvertible {
        public var path: [UInt8]
        public var description: String { "\(TreePath.display(path)) changed while the run was sending it; the run is retried" }
    }
}

/// One scan sent to several peers at once: each peer's ``TreeRun`` hears every chunk and blob; a
/// peer that fails (its link went down) is dropped from the rest of the scan, the others go on.
public final class FanOutSink: ScanSink {
    public private(set) var runs: [String: TreeRun]
    public private(set) var failures: [String: any Error] = [:]

    public init(_ runs: [String: TreeRun]) { self.runs = runs }

    private func each(_ body: (TreeRun) throws -> Void) throws {
        for (name, run) in runs {
            do { try body(run) } catch {
                failures[name] = error
                runs[name] = nil
            }
        }
        if runs.isEmpty, let error = failures.values.first { throw error }
    }

    public func chunk(_ id: ChunkID, _ data: ByteBuffer) throws { try each { try $0.chunk(id, data) } }
    public func file(_ path: [UInt8], _ entry: TreeEntry, read: Bool) throws { try each { try $0.file(path, entry, read: read) } }
    public func directory(_ path: [UInt8], _ id: ChunkID, _ blob: ByteBuffer) throws { try each { try $0.directory(path, id, blob) } }
    public var wantsUnreadFiles: Bool { runs.values.contains { $0.wantsUnreadFiles } }
}
