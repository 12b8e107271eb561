import CFerrySys
import FerryStore
import Foundation
import GRDB
import NIOCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A committed snapshot of a tree on the peer that keeps it.
public struct TreeSnapshot: Codable, Equatable, Sendable {
    /// Increasing per tree on this peer.
    public var id: Int64
    /// The manifest's root blob (hex).
    public var root: String
    /// When the peer committed it (its clock).
    public var committedAt: Date
    /// When the source's scan for it began (the source's clock): "the tree as it was then".
    public var sourceTime: Date
    public var epoch: Int64
    public var files: Int64
    public var directories: Int64
    public var bytes: Int64

    public var rootID: ChunkID { ChunkID(bytes: Self.bytes(hex: root)) ?? ChunkID(a: 0, b: 0, c: 0, d: 0) }

    static func bytes(hex: String) -> [UInt8] {
        var out: [UInt8] = []
        var chars = Array(hex.utf8)[...]
        while chars.count >= 2 {
            guard let byte = UInt8(String(decoding: chars.prefix(2), as: UTF8.self), radix: 16) else { return [] }
            out.append(byte)
            chars = chars.dropFirst(2)
        }
        return out
    }
}

/// What the source says about the run it commits.
public struct RunSummary: Sendable, Equatable {
    public var sourceTime: Date
    public var epoch: Int64
    public var files: Int64
    public var directories: Int64
    public var bytes: Int64

    public init(sourceTime: Date, epoch: Int64, files: Int64, directories: Int64, bytes: Int64) {
        self.sourceTime = sourceTime
        self.epoch = epoch
        self.files = files
        self.directories = directories
        self.bytes = bytes
    }
}

/// A tree's store on a peer: its chunks (``ChunkStore``), its snapshots, and its live mirror.
///
/// A snapshot is committed only when the whole run is there and applied (P7): the chunks are made
/// durable (pack fdatasync, index commit), the manifest is applied to the mirror and the mirror's
/// filesystem synced, and only then is the snapshot's row inserted. A crash anywhere before leaves
/// the previous snapshot as the newest; the chunks that arrived stay, so the resumed run does not
/// send them again; and the next apply walks the whole mirror, since the cut-short one may have
/// changed any part of it.
public final class TreeRepository: ChunkSource, @unchecked Sendable {
    public let directory: String
    public let chunks: ChunkStore
    private let db: DatabaseQueue

    public init(directory: String, packLimit: UInt64 = 64 << 20) throws {
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        chunks = try ChunkStore(directory: directory + "/chunks", packLimit: packLimit)
        var config = Configuration()
        config.prepareDatabase { db in try db.execute(sql: "PRAGMA synchronous = FULL") }
        do {
            db = try DatabaseQueue(path: directory + "/snapshots.sqlite", configuration: config)
            try db.writeWithoutTransaction { try $0.execute(sql: "PRAGMA journal_mode = WAL") }
            try db.write { db in
                try db.execute(sql: """
                    CREATE TABLE IF NOT EXISTS snapshot (
                        id INTEGER PRIMARY KEY AUTOINCREMENT, root TEXT NOT NULL, committedAt DOUBLE NOT NULL,
                        sourceTime DOUBLE NOT NULL, epoch INTEGER NOT NULL, files INTEGER NOT NULL,
                        directories INTEGER NOT NULL, bytes INTEGER NOT NULL);
                    CREATE TABLE IF NOT EXISTS link_group (grp INTEGER PRIMARY KEY NOT NULL, path BLOB NOT NULL);
                    CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
                    """)
            }
        } catch let error as DatabaseError {
            throw StoreError("open snapshot list", path: directory + "/snapshots.sqlite", detail: error.message ?? "\(error)")
        }
    }

    // MARK: chunks

    /// Of `ids`, the ones this store lacks. Chunks the seed has (the files of a former primary)
    /// are copied in from them first, so they need not travel.
    public func lacking(_ ids: [ChunkID]) throws -> [ChunkID] {
        var missing = Set(try chunks.missing(ids.map(\.bytes)).compactMap { ChunkID(bytes: $0) })
        if let seed = seed.withLock({ $0 }), !missing.isEmpty {
            for id in missing {
                guard let at = seed.chunks[id], let data = Self.read(seed.root, at), ChunkID.of(data) == id else { continue }
                try chunks.put(data, id: id.bytes)
                received.withLock { _ = $0.insert(id) }
                missing.remove(id)
                seedCopied.add(UInt64(data.readableBytes), ordering: .relaxed)
            }
        }
        return ids.filter { missing.contains($0) }
    }

    /// Where a former primary's files hold chunks: chunk → (path, offset, length) under `root`.
    public struct Seed: Sendable {
        public var root: String
        public var chunks: [ChunkID: (path: [UInt8], offset: UInt64, length: UInt32)]

        /// From a source's files cache: every chunk of every file, where it is.
        public init(root: String, cache: FilesCache) throws {
            self.root = root
            var chunks: [ChunkID: (path: [UInt8], offset: UInt64, length: UInt32)] = [:]
            try cache.forEachFile { path, entry, _ in
                for segment in entry.segments {
                    var offset = segment.offset
                    for chunk in segment.chunks {
                        chunks[chunk.id] = (path, offset, chunk.length)
                        offset += UInt64(chunk.length)
                    }
                }
            }
            self.chunks = chunks
        }
    }

    private let seed = Mutex<Seed?>(nil)
    /// The mirror was synced after its last change by this process (false at start: a change
    /// before a restart may not be on disk).
    private let mirrorSynced = Atomic<Bool>(false)
    private let mirrorSyncs = Atomic<Int>(0)
    /// How often a commit synced the mirror's filesystem (tests).
    public var mirrorSyncCount: Int { mirrorSyncs.load(ordering: .relaxed) }
    private let seedCopied = Atomic<UInt64>(0)
    /// Bytes copied from the seed instead of received.
    public var bytesFromSeed: UInt64 { seedCopied.load(ordering: .relaxed) }

    public func setSeed(_ value: Seed?) { seed.withLock { $0 = value } }

    static func read(_ root: String, _ at: (path: [UInt8], offset: UInt64, length: UInt32)) -> ByteBuffer? {
        let fd = PosixFS.withCName(Array(root.utf8) + [0x2F] + at.path) { open($0, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) }
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = ByteBuffer()
        let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(at.length)) { raw in
            max(0, pread(fd, raw.baseAddress!, Int(at.length), off_t(at.offset)))
        }
        return n == Int(at.length) ? buffer : nil
    }

    /// Stores a chunk after checking that its content hashes to its ID: nothing from the wire is
    /// taken on trust. A directory's blob on a first run is staged (``TreeStaging``).
    /// `verified`: the caller has checked it already.
    public func put(_ id: ChunkID, _ data: ByteBuffer, verified: Bool = false) throws {
        guard verified || ChunkID.of(data) == id else { throw TreeMirror.Incomplete(description: Self.damaged(id)) }
        try chunks.put(data, id: id.bytes)
        received.withLock { _ = $0.insert(id) }
        if data.readableBytes >= 8, data.getInteger(at: data.readerIndex, as: UInt32.self) == DirectoryBlob.magic {
            // Built on threads of their own while the next chunks are checked and stored.
            stagingLock.withLock { staging }?.arrived(id)
        }
    }

    static func damaged(_ id: ChunkID) -> String { "chunk \(id) arrived damaged (its SHA-256 does not match)" }

    /// Directories built ahead of the commit (a first run).
    private var staging: TreeStaging?
    private let stagingLock = NSLock()

    /// A run begins (its hello): the first run into an empty mirror builds its directories as
    /// their blobs arrive (``TreeStaging``).
    public func beginRun(mirror: String?) {
        guard let mirror else { return }
        stagingLock.withLock {
            do {
                guard staging == nil, try latest() == nil, try state("keepAsideAfter") == nil, try state("applying") == nil,
                      TreeStaging.isEmpty(mirror) else { return }
                try FileManager.default.createDirectory(atPath: mirror, withIntermediateDirectories: true)
                guard let ahead = TreeStaging(mirror: mirror) else { return }
                try ahead.start { try TreeMirror(source: self, into: mirror, full: false) }
                staging = ahead
            } catch {
                return
            }
        }
    }

    /// Chunks received since the last commit: a run in progress needs them, whatever the
    /// snapshots say, so garbage collection keeps them.
    private let received = Mutex(Set<ChunkID>())

    /// Drops the chunks no kept snapshot needs and that did not arrive since the last commit.
    /// Safe while a run is in progress: its chunks are in the open pack or in `received`.
    @discardableResult
    public func collectGarbage(maxDeadFraction: Double = 0.2) throws -> ChunkStore.Collection {
        var live = received.withLock { $0 }
        var visited = Set<ChunkID>()
        var problems: [String] = []
        for snapshot in try snapshots() {
            live.insert(snapshot.rootID)
            guard visited.insert(snapshot.rootID).inserted else { continue }
            try mark(snapshot.rootID, live: &live, visited: &visited, problems: &problems)
        }
        // A manifest that cannot be read means what it names is unknown: collect nothing.
        if let first = problems.first {
            throw TreeMirror.Incomplete(description: "garbage collection skipped: the manifest \(first)\(problems.count > 1 ? " and \(problems.count - 1) more" : "") could not be read, so what kept snapshots need is not known")
        }
        return try chunks.collect(maxDeadFraction: maxDeadFraction) { bytes in
            guard let id = ChunkID(bytes: bytes) else { return true }
            return live.contains(id)
        }
    }

    private func mark(_ blobID: ChunkID, live: inout Set<ChunkID>, visited: inout Set<ChunkID>, problems: inout [String]) throws {
        guard let blob = try? blob(blobID), let entries = try? DirectoryBlob.decode(blob) else {
            problems.append("\(blobID)")
            return
        }
        for e in entries {
            for id in e.chunkIDs { live.insert(id) }
            if let sub = e.subtree {
                live.insert(sub)
                if visited.insert(sub).inserted { try mark(sub, live: &live, visited: &visited, problems: &problems) }
            }
        }
    }

    /// A chunk or blob by ID. One that is damaged on disk is dropped from the index (and the
    /// error thrown): the next run's query then names it lacking and it is sent again.
    public func blob(_ id: ChunkID) throws -> ByteBuffer? {
        do {
            return try chunks.get(id.bytes)
        } catch {
            if Self.isDamage(error) { try? forgetDamaged([id]) }
            throw error
        }
    }

    /// A checksum or record mismatch (not a passing I/O error such as EMFILE).
    static func isDamage(_ error: any Error) -> Bool {
        let text = "\(error)"
        return text.contains("fails its checksum") || text.contains("is not the chunk the index names")
    }

    /// Takes damaged chunks out of the index and marks the store incomplete: until the next
    /// commit, hello answers "no snapshot", so the primary asks about every chunk and sends them
    /// again, and the next apply compares every file.
    func forgetDamaged(_ ids: [ChunkID]) throws {
        try chunks.forget(ids.map(\.bytes))
        try setState("incomplete", "damaged chunks dropped")
        try setState("applying", "untrusted")
    }

    /// The root the primary is told this replica has: nil while chunks are known to be missing.
    public func advertisedRoot() throws -> (root: ChunkID, id: Int64)? {
        guard try state("incomplete") == nil, let latest = try latest() else { return nil }
        return (latest.rootID, latest.id)
    }

    // MARK: snapshots

    public func snapshots() throws -> [TreeSnapshot] {
        try db.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM snapshot ORDER BY id").map(Self.snapshot)
        }
    }

    public func latest() throws -> TreeSnapshot? {
        try db.read { db in try Row.fetchOne(db, sql: "SELECT * FROM snapshot ORDER BY id DESC LIMIT 1").map(Self.snapshot) }
    }

    static func snapshot(_ row: Row) -> TreeSnapshot {
        TreeSnapshot(id: row["id"], root: row["root"], committedAt: Date(timeIntervalSince1970: row["committedAt"]),
                     sourceTime: Date(timeIntervalSince1970: row["sourceTime"]), epoch: row["epoch"], files: row["files"],
                     directories: row["directories"], bytes: row["bytes"])
    }

    private func state(_ key: String) throws -> String? {
        try db.read { try String.fetchOne($0, sql: "SELECT value FROM state WHERE key = ?", arguments: [key]) }
    }

    private func setState(_ key: String, _ value: String?) throws {
        try db.write { db in
            if let value {
                try db.execute(sql: "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", arguments: [key, value])
            } else {
                try db.execute(sql: "DELETE FROM state WHERE key = ?", arguments: [key])
            }
        }
    }

    /// Commits a run whose root blob is `root`: chunks made durable, the mirror (when there is
    /// one) brought to it, then the snapshot recorded. Throws, recording nothing, when a blob or
    /// chunk the manifest names is missing or the mirror cannot be written (a full disk).
    @discardableResult
    public func commit(root: ChunkID, summary: RunSummary, mirror: String?,
                       keepAside: (after: Double, directory: String)? = nil) throws -> (TreeSnapshot, TreeMirror.Stats) {
        // The mirror is written from the chunks as they are (the store finds those not yet
        // indexed); then the mirror's filesystem is synced and the chunks made durable and indexed
        // (one flush of the disk, not two: on the same filesystem the pack is clean by then); only
        // then is the snapshot recorded.
        var stats = TreeMirror.Stats()
        var groups: [UInt64: [UInt8]] = [:]
        // The lock is not held while the builds end (a hello must not wait for it).
        let staged = stagingLock.withLock {
            defer { staging = nil }
            return staging
        }
        let stagedFiles = staged?.finish() ?? 0
        defer { staged?.discard() }
        if let mirror {
            try FileManager.default.createDirectory(atPath: mirror, withIntermediateDirectories: true)
            let cutShort = try state("applying") != nil
            let known: [UInt64: [UInt8]] = try db.read { db in
                Dictionary(try Row.fetchAll(db, sql: "SELECT grp, path FROM link_group").map { (UInt64(bitPattern: $0["grp"]), Array($0["path"] as Data)) },
                           uniquingKeysWith: { a, _ in a })
            }
            let writer = try TreeMirror(source: self, into: mirror, full: cutShort, knownGroups: known)
            if staged?.mirror == mirror { writer.staging = staged }
            // Recorded before the mirror's first change, not at all when nothing changes.
            writer.beforeFirstChange = { [self] in try setState("applying", root.hex) }
            let keepAside = try keepAside ?? self.state("keepAsideAfter").flatMap(Double.init).map {
                (after: $0, directory: mirror + ".ferry-kept-aside/" + TreeReceiver.stamp())
            }
            if let keepAside {
                writer.keepAside = (FileTime(seconds: Int64(keepAside.after), nanoseconds: UInt32((keepAside.after - keepAside.after.rounded(.down)) * 1e9)),
                                    keepAside.directory)
            }
            // Synced unless this apply changed nothing and nothing was changed since the last
            // sync in this process (an apply that failed, or one before a restart, may have).
            let wasSynced = mirrorSynced.exchange(false, ordering: .acquiringAndReleasing)
            let started = ContinuousClock.now
            try writer.apply(old: try latest()?.rootID, new: root)
            stats = writer.stats
            stats.filesStaged = stagedFiles
            let applied = ContinuousClock.now
            stats.applySeconds = Self.seconds(applied - started)
            if writer.touched || !wasSynced {
                let fd = PosixFS.openDirectory(mirror)
                guard fd >= 0 else { throw TreeFSError("open the mirror to sync it", Array(mirror.utf8)) }
                let rc = ferry_syncfs(fd)
                let saved = errno
                close(fd)
                guard rc == 0 else { throw TreeFSError("sync the mirror's filesystem", Array(mirror.utf8), saved) }
                mirrorSyncs.add(1, ordering: .relaxed)
            }
            mirrorSynced.store(true, ordering: .releasing)
            let synced = ContinuousClock.now
            stats.syncSeconds = Self.seconds(synced - applied)
            try chunks.commit()
            stats.chunksSeconds = Self.seconds(ContinuousClock.now - synced)
            groups = writer.groups
        } else {
            try chunks.commit()
            try checkComplete(root)
        }
        // One transaction (one sync of the list): the hard-link groups written, the snapshot.
        let snapshot: TreeSnapshot = try db.write { db in
            for (group, path) in groups {
                try db.execute(sql: "INSERT OR REPLACE INTO link_group (grp, path) VALUES (?, ?)",
                               arguments: [Int64(bitPattern: group), Data(path)])
            }
            try db.execute(sql: """
                INSERT INTO snapshot (root, committedAt, sourceTime, epoch, files, directories, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)
                """, arguments: [root.hex, Date().timeIntervalSince1970, summary.sourceTime.timeIntervalSince1970, summary.epoch,
                                 summary.files, summary.directories, summary.bytes])
            try db.execute(sql: "DELETE FROM state WHERE key IN ('applying', 'incomplete', 'keepAsideAfter')")
            return Self.snapshot(try Row.fetchOne(db, sql: "SELECT * FROM snapshot WHERE id = last_insert_rowid()")!)
        }
        received.withLock { $0.removeAll() }
        return (snapshot, stats)
    }

    /// Seconds to the millisecond (for the log).
    static func seconds(_ d: Duration) -> Double { (TreeRun.seconds(d) * 1000).rounded() / 1000 }

    /// Forgets snapshots (retention). Their chunks stay until garbage collection.
    public func forget(_ ids: [Int64]) throws {
        guard let newest = try latest()?.id else { return }
        try db.write { db in
            for id in ids where id != newest {
                try db.execute(sql: "DELETE FROM snapshot WHERE id = ?", arguments: [id])
            }
        }
    }

    /// The mirror can no longer be trusted to match the newest snapshot (a former primary's tree,
    /// now a replica): the next apply compares every file.
    public func distrustMirror() throws { try setState("applying", "untrusted") }

    /// Keep aside, at the next commit, what changed in the mirror after `time` (a former primary
    /// turned replica, P6); kept across restarts until that commit.
    public func keepAsideAfter(_ time: Double) throws { try setState("keepAsideAfter", "\(time)") }

    /// Whether this site became a replica and has not yet committed a snapshot of the new primary.
    public func awaitingFirstSnapshot() throws -> Bool { try state("keepAsideAfter") != nil }

    /// Whether an apply was cut short (or the mirror is untrusted).
    public func mirrorNeedsRepair() throws -> Bool { try state("applying") != nil }

    /// Brings the mirror back to the newest snapshot (after an apply that was cut short).
    public func repairMirror(_ mirror: String) throws {
        guard let latest = try latest() else { return }
        let writer = try TreeMirror(source: self, into: mirror, full: true)
        try writer.apply(old: nil, new: latest.rootID)
        try setState("applying", nil)
    }

    /// Throws unless every blob and chunk under `root` is in the store.
    public func checkComplete(_ root: ChunkID) throws {
        var problems: [String] = []
        try walk(root, path: []) { path, entry in
            for id in entry.chunkIDs where try !chunks.contains(id.bytes) {
                problems.append("chunk \(id) of \(TreePath.display(path))")
            }
        } missing: { problems.append($0) }
        if let first = problems.first {
            throw TreeMirror.Incomplete(description: "the snapshot is incomplete: \(first)\(problems.count > 1 ? " and \(problems.count - 1) more" : "")")
        }
    }

    /// Visits every entry under `root` (files with their path); `missing` hears of each directory
    /// blob that cannot be read, and its subtree is skipped.
    public func walk(_ root: ChunkID, path: [UInt8], _ visit: ([UInt8], TreeEntry) throws -> Void,
                     missing: (String) -> Void) throws {
        func entries(_ id: ChunkID, _ path: [UInt8]) -> [TreeEntry]? {
            guard let blob = try? blob(id), ChunkID.of(blob) == id, let list = try? DirectoryBlob.decode(blob) else {
                missing("the manifest of directory \(TreePath.display(path)) (\(id)) is missing or damaged")
                return nil
            }
            return list
        }
        func visitDirectory(_ id: ChunkID, _ path: [UInt8]) throws {
            guard let list = entries(id, path) else { return }
            for e in list {
                let p = TreePath.join(path, e.name)
                try visit(p, e)
                if e.kind == .directory, let sub = e.subtree { try visitDirectory(sub, p) }
            }
        }
        guard let top = entries(root, path) else { return }
        for e in top {
            try visit(path, e)
            if let sub = e.subtree { try visitDirectory(sub, path) }
        }
    }

    /// The snapshot with ID `id`.
    public func snapshot(id: Int64) throws -> TreeSnapshot? { try snapshots().first { $0.id == id } }

    /// The newest snapshot whose scan began at or before `date`.
    public func snapshot(atOrBefore date: Date) throws -> TreeSnapshot? { try snapshots().last { $0.sourceTime <= date } }

    /// Restores a snapshot (or the subtree at `path` of it) into `target`, which must not exist or
    /// be empty.
    public func restore(_ snapshot: TreeSnapshot, path: [UInt8], to target: String) throws -> TreeMirror.Stats {
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
        let writer = try TreeMirror(source: self, into: target, full: true)
        try writer.restore(snapshotRoot: snapshot.rootID, path: path)
        return writer.stats
    }
}

extension TreeRepository {
    public struct VerifyReport: Sendable {
        public var chunks: Int
        public var snapshots: Int
        /// One line per problem, naming the chunk and the files (and snapshots) that need it.
        public var damage: [String]
    }

    /// Re-hashes every chunk, then walks every snapshot's manifest: names each damaged or missing
    /// chunk or directory blob with the paths and snapshots that need it.
    public func verify() throws -> VerifyReport {
        try chunks.commit()
        let bad = Set(try chunks.verify { ChunkID.of($0).bytes }.compactMap { ChunkID(bytes: $0) })
        var damage: [String] = []
        let all = try snapshots()
        var users: [ChunkID: [String]] = [:]
        for snapshot in all {
            if bad.contains(snapshot.rootID) || (try? blob(snapshot.rootID)) == nil {
                damage.append("snapshot \(snapshot.id): its root manifest \(snapshot.rootID) is missing or damaged")
                continue
            }
            try walk(snapshot.rootID, path: []) { path, entry in
                for id in entry.chunkIDs where try bad.contains(id) || !chunks.contains(id.bytes) {
                    if users[id, default: []].count < 3 { users[id, default: []].append("\(TreePath.display(path)) in snapshot \(snapshot.id)") }
                }
                if let sub = entry.subtree, bad.contains(sub) {
                    users[sub, default: []].append("directory \(TreePath.display(path)) in snapshot \(snapshot.id)")
                }
            } missing: { damage.append("snapshot \(snapshot.id): \($0)") }
        }
        for (id, paths) in users.sorted(by: { $0.key < $1.key }) {
            damage.append("chunk \(id) is \(bad.contains(id) ? "damaged" : "missing"); it holds data of \(paths.joined(separator: ", "))")
        }
        for id in bad.sorted() where users[id] == nil {
            damage.append("chunk \(id) is damaged (no kept snapshot needs it)")
        }
        if !bad.isEmpty {
            // Out of the index: the next run that needs them is told they are lacking and sends them again.
            try forgetDamaged(Array(bad))
            damage.append("the \(bad.count) damaged chunk\(bad.count == 1 ? " is" : "s are") now out of the index: the next run sends "
                          + "\(bad.count == 1 ? "it" : "them") again if the source still has that data (`ferry tree sync` on the primary)")
        }
        return VerifyReport(chunks: try chunks.count(), snapshots: all.count, damage: damage)
    }
}
