import CFerrySys
import Foundation
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Directories of a tree's first run built ahead of its commit, as their blobs arrive, in
/// `<mirror>/.ferry-staged/<blob ID>`: the commit renames each into place instead of creating
/// its files then, so a first run of 200,000 small files creates them while the data is still
/// arriving rather than after.
///
/// Only a build the commit could not do differently is staged: a directory whose files are not
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
    let mirror: String
    let fd: Int32
    /// Guards everything below.
    private let condition = NSCondition()
    private var built: Set<ChunkID> = []
    /// Builds scheduled and not yet ended: blob → the order in which each was scheduled.
    private var inFlight: [ChunkID: [Int]] = [:]
    private var scheduled = 0
    private var writers: [(queue: DispatchQueue, writer: TreeMirror)] = []
    private var failed = false
    private var filesStaged = 0
    /// Files written ahead when the filesystem was last synced in the background.
    private var filesAtSync = 0
    private let presyncQueue = DispatchQueue(label: "ferry-tree-presync")

    /// Opens a new staging directory in `mirror`, removing one a crash left behind.
    init?(mirror: String) {
        guard let remover = try? TreeMirror(source: NoChunks(), into: mirror, full: false) else { return nil }
        try? remover.removeTree(remover.rootFD, Self.name, path: Self.name, keepingAside: false)
        let root = PosixFS.openDirectory(mirror)
        guard root >= 0 else { return nil }
        defer { close(root) }
        guard PosixFS.withCName(Self.name, { mkdirat(root, $0, 0o700) }) == 0 else { return nil }
        let fd = PosixFS.openDirectory(at: root, Self.name)
        guard fd >= 0 else { return nil }
        self.mirror = mirror
        self.fd = fd
    }

    deinit { close(fd) }

    /// Gives the staging its writers, one per worker thread (each must write into `mirror`).
    func start(_ makeWriter: () throws -> TreeMirror) throws {
        let made = try (0..<Self.workers).map { n in
            let writer = try makeWriter()
            writer.staging = self
            return (queue: DispatchQueue(label: "ferry-tree-staging-\(n)"), writer: writer)
        }
        condition.withLock { writers = made }
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
            do { try writer.stage(id, order: order) } catch { ok = false }
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
            let copy = dup(fd)
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
        condition.withLock { built.removeAll() }
        if let remover = try? TreeMirror(source: NoChunks(), into: mirror, full: false) {
            try? remover.removeTree(remover.rootFD, Self.name, path: Self.name, keepingAside: false)
        }
    }

    private final class NoChunks: ChunkSource {
        func blob(_ id: ChunkID) throws -> ByteBuffer? { nil }
    }
}
