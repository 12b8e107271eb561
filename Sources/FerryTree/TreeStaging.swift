import CFerrySys
import Foundation
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// What a run writes on the replica ahead of its commit, as the directories' blobs arrive, in
/// `<mirror>/.ferry-staged/`; the commit renames it into place instead of writing it then:
/// - on a tree's first run into an empty mirror, whole directories (`<blob ID>`), so a first run
///   of 200,000 small files creates them while the data is still arriving rather than after;
/// - on a later run, each file that holds data new in this run (`<entry key>`, ``fileKey(_:)``),
///   so a run that changes files spread through a tree writes them while the source still
///   scans. Blobs arrive as the source's batches are answered, not only at the end.
///
/// Only a directory build the commit could not do differently is staged: one whose files are not
/// hard links and whose subdirectories are staged (the directory's own name and metadata are in
/// its parent and are set when the commit takes it). Staging is for a first snapshot into an
/// empty mirror only: there every directory is new. Whatever the commit does not take is removed
/// with the staging directory at the end of the commit, whether it succeeded or not; a staging
/// directory left by a crash is removed when the next run begins. A failure to stage (a missing
/// chunk, a full disk) stops staging for the run and is otherwise ignored: the commit builds
/// what is not staged, and reports what fails then.
///
/// Builds run on two threads (``workers``): on a machine of two cores the other one is idle once
/// the source's scan ends, and a directory's build is mostly the kernel creating its files. A
/// directory with subdirectories waits for their builds scheduled before it (blobs arrive
/// children first); it never waits for one scheduled after it, so two builds never wait for each
/// other.
final class TreeStaging: @unchecked Sendable {
    static let name: [UInt8] = Array(".ferry-staged".utf8)
    static let workers = 2
    enum Mode { case directories, files }
    let mode: Mode
    let mirror: String
    /// Guards everything below.
    private let condition = NSCondition()
    /// The staging directory: made at once for directories, on first use for files (-1 before).
    private var directoryFD: Int32 = -1
    private var built: Set<ChunkID> = []
    /// Files written ahead (by key), and the keys a worker is writing.
    private var builtFiles: Set<ChunkID> = []
    private var claimedFiles: Set<ChunkID> = []
    /// Whether a chunk arrived in this run (files mode: only a file holding one is written ahead).
    private var isNew: @Sendable (ChunkID) -> Bool = { _ in false }
    /// Builds scheduled and not yet ended: blob → the order in which each was scheduled.
    private var inFlight: [ChunkID: [Int]] = [:]
    private var scheduled = 0
    private var writers: [(queue: DispatchQueue, writer: TreeMirror)] = []
    private var failed = false
    private var filesStaged = 0
    /// Files written ahead when the filesystem was last synced in the background.
    private var filesAtSync = 0
    private let presyncQueue = DispatchQueue(label: "ferry-tree-presync")

    /// A staging area in `mirror`; for directories its directory is made at once (one a crash
    /// left behind is removed first). For files it is made when a file is first written ahead,
    /// so a run that writes nothing does not touch the mirror.
    init?(mirror: String, mode: Mode) {
        self.mirror = mirror
        self.mode = mode
        if mode == .directories && fd < 0 { return nil }
    }

    deinit { if directoryFD >= 0 { close(directoryFD) } }

    /// The staging directory's descriptor, made (after removing a leftover) when first needed;
    /// -1 when it cannot be made.
    var fd: Int32 {
        condition.withLock {
            guard directoryFD < 0 else { return directoryFD }
            guard let remover = try? TreeMirror(source: NoChunks(), into: mirror, full: false) else { return -1 }
            try? remover.removeTree(remover.rootFD, Self.name, path: Self.name, keepingAside: false)
            guard PosixFS.withCName(Self.name, { mkdirat(remover.rootFD, $0, 0o700) }) == 0 else { return -1 }
            directoryFD = PosixFS.openDirectory(at: remover.rootFD, Self.name)
            return directoryFD
        }
    }

    /// Gives the staging its writers, one per worker thread (each must write into `mirror`);
    /// `isNew` says whether a chunk arrived in this run.
    func start(isNew: @escaping @Sendable (ChunkID) -> Bool, _ makeWriter: () throws -> TreeMirror) throws {
        let made = try (0..<Self.workers).map { n in
            let writer = try makeWriter()
            writer.staging = self
            return (queue: DispatchQueue(label: "ferry-tree-staging-\(n)"), writer: writer)
        }
        condition.withLock {
            writers = made
            self.isNew = isNew
        }
    }

    /// A directory's blob arrived: it is built on one of the worker threads, if it can be.
    func arrived(_ id: ChunkID) {
        let job: (order: Int, queue: DispatchQueue)? = condition.withLock {
            guard !failed, !writers.isEmpty else { return nil }
            scheduled += 1
            inFlight[id, default: []].append(scheduled)
            return (scheduled, writers[scheduled % writers.count].queue)
        }
        guard let (order, queue) = job else { return }
        queue.async { [self] in
            // Each worker's writer is used on its own queue only.
            guard let writer = condition.withLock({ writers.isEmpty || failed ? nil : writers[order % writers.count].writer }) else {
                return ended(id, order, ok: true, written: 0)
            }
            let before = writer.stats.filesWritten
            var ok = true
            do {
                switch mode {
                case .directories: try writer.stage(id, order: order)
                case .files: try writer.stageFiles(id, isNew: condition.withLock { isNew })
                }
            } catch {
                ok = false
            }
            ended(id, order, ok: ok, written: writer.stats.filesWritten - before)
        }
    }

    private func ended(_ id: ChunkID, _ order: Int, ok: Bool, written: Int) {
        let syncNow: Bool = condition.withLock {
            if let orders = inFlight[id] {
                let rest = orders.filter { $0 != order }
                inFlight[id] = rest.isEmpty ? nil : rest
            }
            if !ok { failed = true }
            filesStaged += written
            condition.broadcast()
            // Every 20,000 files the disk is given what is written so far, in the
            // background, so the commit's sync has less left to do.
            guard filesStaged >= filesAtSync + 20_000 else { return false }
            filesAtSync = filesStaged
            return true
        }
        if syncNow {
            let copy = dup(condition.withLock { directoryFD })
            if copy >= 0 { presyncQueue.async { _ = ferry_syncfs(copy); close(copy) } }
        }
    }

    /// Waits until no build of `ids` scheduled before build number `order` is under way.
    func wait(for ids: [ChunkID], scheduledBefore order: Int) {
        guard !ids.isEmpty else { return }
        condition.withLock {
            while ids.contains(where: { inFlight[$0]?.contains(where: { $0 < order }) == true }) { condition.wait() }
        }
    }

    /// Waits for every build under way and stops the workers; the number of files they wrote.
    func finish() -> Int {
        let stopping = condition.withLock { writers }
        for worker in stopping { worker.queue.sync {} }
        return condition.withLock {
            for worker in writers { worker.writer.staging = nil }
            writers = []
            return filesStaged
        }
    }

    /// Whether `mirror` holds nothing but a staging directory (or does not exist yet).
    static func isEmpty(_ mirror: String) -> Bool {
        let fd = PosixFS.openDirectory(mirror)
        guard fd >= 0 else { return errno == ENOENT }
        defer { close(fd) }
        return (PosixFS.names(in: fd) ?? [[0]]).allSatisfy { $0 == name }
    }

    func has(_ id: ChunkID) -> Bool { condition.withLock { built.contains(id) } }

    func add(_ id: ChunkID) { condition.withLock { _ = built.insert(id) } }

    static func buildName(_ id: ChunkID) -> [UInt8] { Array(id.hex.utf8) }

    /// The name a file's entry is staged under: the SHA-256 of the entry without its name
    /// (data, size, mode, owner, times), so the file taken is the one the entry describes.
    static func fileKey(_ e: TreeEntry) -> ChunkID {
        var nameless = e
        nameless.name = []
        var buffer = ByteBuffer()
        DirectoryBlob.write(nameless, to: &buffer)
        return ChunkID.of(buffer)
    }

    /// Claims `key` for a worker about to write it ahead; false when it is written or being written.
    func claimFile(_ key: ChunkID) -> Bool {
        condition.withLock { !builtFiles.contains(key) && claimedFiles.insert(key).inserted }
    }

    /// The claimed `key` is written (`done`) or given up.
    func releaseFile(_ key: ChunkID, done: Bool) {
        condition.withLock {
            claimedFiles.remove(key)
            if done { builtFiles.insert(key) }
        }
    }

    /// Moves the file written ahead for `e` to `name` in `dir`; false when there is none (or it
    /// cannot be moved there).
    func takeFile(_ e: TreeEntry, into dir: Int32, as name: [UInt8]) -> Bool {
        guard e.linkGroup == 0, condition.withLock({ !builtFiles.isEmpty }) else { return false }
        let key = Self.fileKey(e)
        guard condition.withLock({ builtFiles.remove(key) }) != nil else { return false }
        return PosixFS.withCName(Array(key.hex.utf8)) { from in PosixFS.withCName(name) { renameat(fd, from, dir, $0) } } == 0
    }

    /// Moves the build of `id` to `name` in the directory `dir`; false when there is none.
    func take(_ id: ChunkID, into dir: Int32, as name: [UInt8]) -> Bool {
        guard condition.withLock({ built.remove(id) }) != nil else { return false }
        return PosixFS.withCName(Self.buildName(id)) { from in PosixFS.withCName(name) { renameat(fd, from, dir, $0) } } == 0
    }

    /// The build of `id`, opened (-1 when there is none), to take its entries one by one.
    func openBuild(_ id: ChunkID) -> Int32 {
        guard has(id) else { return -1 }
        return PosixFS.openDirectory(at: fd, Self.buildName(id))
    }

    /// Removes the staging directory and what is left in it (after ``finish()``).
    func discard() {
        condition.withLock {
            built.removeAll()
            builtFiles.removeAll()
        }
        // Also when this run made none: one a crash left behind goes too.
        if let remover = try? TreeMirror(source: NoChunks(), into: mirror, full: false) {
            try? remover.removeTree(remover.rootFD, Self.name, path: Self.name, keepingAside: false)
        }
    }

    private final class NoChunks: ChunkSource {
        func blob(_ id: ChunkID) throws -> ByteBuffer? { nil }
    }
}
