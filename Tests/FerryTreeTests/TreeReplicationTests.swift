import Foundation
import NIOCore
import Testing
@testable import FerryTree
#if canImport(Glibc)
import Glibc
#endif

/// The tree pipeline in one process: scan → offer/lack/put → commit on the peer's repository →
/// live mirror, checked by a comparator and by `rsync -anciH --delete`.
@Suite(.serialized) struct TreeReplicationTests {
    final class Side {
        let base = OddTree.temporaryDirectory("run")
        var source: String { base + "/source" }
        var mirror: String { base + "/mirror" }
        var repositoryPath: String { base + "/peer" }
        var cache = FilesCache()
        var cacheRoot: ChunkID?
        let repository: TreeRepository
        let transport: LocalTreeTransport

        init(packLimit: UInt64 = 64 << 20) throws {
            try FileManager.default.createDirectory(atPath: base + "/source", withIntermediateDirectories: true)
            repository = try TreeRepository(directory: base + "/peer", packLimit: packLimit)
            transport = LocalTreeTransport(repository: repository, mirror: base + "/mirror")
        }

        deinit { OddTree.remove(base) }

        @discardableResult
        func run(transport: (any TreeTransport)? = nil, configure: (TreeScanner) -> Void = { _ in }) throws -> TreeRun.Report {
            let scanner = TreeScanner(source: source, cache: cache)
            configure(scanner)
            let report = try TreeRun(transport: transport ?? self.transport, sourceRoot: source).run(scanner, cacheRoot: cacheRoot, epoch: 1)
            cache = report.scan.cache
            cacheRoot = report.snapshot.rootID
            return report
        }
    }

    @Test func oddTreeOfTwentyThousandFilesMirrorsExactlyAndEverySnapshotRestores() throws {
        let side = try Side()
        OddTree.make(side.source, bulk: 20_000)
        var references: [(TreeSnapshot, [String: String])] = []
        var clock = ContinuousClock.now
        func lap(_ what: String) {
            print("tree test: \(what) \(ContinuousClock.now - clock)")
            clock = .now
        }
        func check(_ label: String, _ report: TreeRun.Report) throws {
            lap("\(label) run")
            #expect(report.scan.problems.isEmpty, "\(label): \(report.scan.problems)")
            let diff = OddTree.differences(side.source, side.mirror)
            #expect(diff.isEmpty, "\(label): \(diff.prefix(10))")
            lap("\(label) compare")
            let rsync = try OddTree.rsyncDifferences(side.source, side.mirror)
            lap("\(label) rsync")
            #expect(rsync.isEmpty, "\(label): rsync -anciH --delete found \(rsync.prefix(10))")
            references.append((report.snapshot, OddTree.describe(side.source)))
            lap("\(label) describe")
        }

        let first = try side.run()
        #expect(first.scan.files > 20_000)
        #expect(first.snapshot.id == 1)
        try check("initial", first)
        // The first run's directories were built as their blobs arrived (all but those holding
        // hard links), then renamed into place; the comparisons above find no staging left.
        let initial = try #require(side.transport.lastStats)
        #expect(initial.filesStaged > 19_000 && initial.filesWritten < 2_000, "\(initial)")
        // Dedup: the copy of big.bin and the 2,000 identical small files sent once.
        #expect(first.bytesSent < first.scan.bytes - (12 << 20), "initial run sent \(first.bytesSent) of \(first.scan.bytes)")

        // Nothing changed: nothing read, no file data sent, and the mirror (synced by the last
        // commit, untouched since) not synced again.
        let syncs = side.repository.mirrorSyncCount
        #expect(syncs == 1)
        let idle = try side.run()
        #expect(idle.scan.filesRead == 0)
        #expect(side.repository.mirrorSyncCount == syncs)
        #expect(idle.bytesSent < 4096, "a run without changes sent \(idle.bytesSent) bytes")
        try check("no change", idle)

        // Changes of every kind.
        let s = side.source
        OddTree.write(s, "with space.txt", Array("changed content\n".utf8))
        _ = unlink(s + "/empty")
        OddTree.remove(s + "/nested")
        #expect(rename(s + "/bulk/d5", s + "/moved-d5") == 0)
        OddTree.write(s, "new-file", Array("new\n".utf8))
        _ = chmod(s + "/setuid", 0o700)
        _ = unlink(s + "/hard/three")
        _ = link(s + "/hard/a/one", s + "/bulk/d7/another-link")
        _ = unlink(s + "/dangling")
        _ = symlink("elsewhere", s + "/dangling")
        _ = unlink(s + "/link-to-dir")
        OddTree.mkdirs(s, Array("link-to-dir".utf8))          // symlink → directory
        _ = unlink(s + "/big-copy.bin")
        OddTree.mkdirs(s, Array("big-copy.bin".utf8))         // file → directory
        // Same size, same mtime, new content: only ctime (and the chunk list) tell.
        var st = stat()
        lstat(s + "/bulk/d9/file 901.txt", &st)
        var bytes = Array(repeating: UInt8(0x41), count: Int(st.st_size))
        OddTree.write(s, "bulk/d9/file 901.txt", bytes)
        OddTree.setTime(s, Array("bulk/d9/file 901.txt".utf8), seconds: st.st_mtim.tv_sec, nanos: st.st_mtim.tv_nsec)
        let changed = try side.run()
        #expect(side.repository.mirrorSyncCount == syncs + 1)
        try check("changes", changed)
        // A moved directory of 100 files costs no file data.
        #expect(changed.bytesSent < 256 << 10, "the incremental run sent \(changed.bytesSent) bytes")
        #expect(changed.scan.filesRead < 10, "read \(changed.scan.filesRead) files")
        print("tree runs: initial \(first.scan.files) files, \(first.scan.bytes) bytes, sent \(first.bytesSent); no change sent \(idle.bytesSent); changes sent \(changed.bytesSent) (read \(changed.scan.filesRead) files)")

        // File → symlink, directory → file, and back the other way.
        OddTree.remove(s + "/link-to-dir")
        _ = symlink("deep", s + "/link-to-dir")
        OddTree.remove(s + "/big-copy.bin")
        var seed: UInt64 = 42
        bytes = OddTree.random(100, seed: &seed)
        OddTree.write(s, "big-copy.bin", bytes)
        try check("kinds swapped", try side.run())

        // Renamed within their directory: the mirror renames them too, nothing is written again.
        #expect(rename(s + "/bulk/d6", s + "/bulk/d6 renamed") == 0)
        #expect(rename(s + "/bulk/d7/file 701.txt", s + "/bulk/d7/file 701 renamed.txt") == 0)
        try check("renamed", try side.run())
        let renamed = try #require(side.transport.lastStats)
        #expect(renamed.renamed == 2 && renamed.filesWritten == 0, "\(renamed)")

        // Every snapshot restores to the tree as it was.
        let snapshots = try side.repository.snapshots()
        #expect(snapshots.count == references.count)
        for (snapshot, reference) in references {
            // On tmpfs: creating 20k files on this machine's disk costs more than the check needs.
            let target = "/dev/shm/ferry-restore-\(getpid())-\(snapshot.id)"
            try side.repository.restore(snapshot, path: [], to: target)
            let diff = OddTree.differences(reference, OddTree.describe(target))
            #expect(diff.isEmpty, "snapshot \(snapshot.id): \(diff.prefix(10))")
            OddTree.remove(target)
            lap("restore \(snapshot.id)")
        }
        // A subpath alone.
        let part = side.base + "/restore-part"
        try side.repository.restore(references[0].0, path: Array("hard".utf8), to: part)
        let hard = references[0].1.filter { $0.key.hasPrefix("hard/") }
        let restoredHard = OddTree.describe(part)
        #expect(restoredHard.count == 5)
        for (key, value) in restoredHard {
            #expect(hard["hard/" + key]?.replacingOccurrences(of: "hard/", with: "") == value, "\(key)")
        }
        // By time: the last snapshot at or before it.
        let between = references[1].0.sourceTime.timeIntervalSince1970 / 2 + references[2].0.sourceTime.timeIntervalSince1970 / 2
        #expect(try side.repository.snapshot(atOrBefore: Date(timeIntervalSince1970: between))?.id == references[1].0.id)
    }

    @Test func aFileChangingWhileReadIsReadAgainAndOneThatKeepsChangingKeepsItsPreviousVersion() throws {
        let side = try Side()
        OddTree.write(side.source, "steady", Array("steady\n".utf8))
        OddTree.write(side.source, "busy", Array(repeating: 1, count: 100_000))
        OddTree.write(side.source, "restless", Array("version 1\n".utf8))
        try side.run()

        OddTree.write(side.source, "busy", Array(repeating: 2, count: 100_000))
        OddTree.write(side.source, "restless", Array("version 2\n".utf8))
        var n: UInt8 = 3
        let report = try side.run { scanner in
            scanner.onAfterRead { path, attempt in
                if path == Array("busy".utf8) && attempt == 1 {
                    OddTree.write(side.source, "busy", Array(repeating: 3, count: 100_000))
                }
                if path == Array("restless".utf8) {
                    n += 1
                    OddTree.write(side.source, "restless", Array("version \(n)\n".utf8))
                }
            }
        }
        // busy: re-read once, the final content recorded, never a torn mix.
        let busy = try Data(contentsOf: URL(fileURLWithPath: side.mirror + "/busy"))
        #expect(busy == Data(repeating: 3, count: 100_000))
        // restless: reported; the previous version kept on the peer.
        #expect(report.scan.problems.map(\.description) == ["restless: changed while being read 3 times; the previous version is kept"])
        #expect(try String(contentsOfFile: side.mirror + "/restless", encoding: .utf8) == "version 1\n")
        // The next quiet run takes it.
        try side.run()
        #expect(OddTree.differences(side.source, side.mirror).isEmpty)
    }

    @Test func unreadableFilesAreReportedAndTheRestGoesOn() throws {
        let side = try Side()
        OddTree.write(side.source, "public", Array("anyone\n".utf8), mode: 0o644)
        OddTree.write(side.source, "secret", Array("root only\n".utf8), mode: 0o600)
        OddTree.mkdirs(side.source, Array("closed".utf8), mode: 0o700)
        OddTree.write(side.source, "closed/inside", Array("x\n".utf8))
        _ = chmod(side.source, 0o755)
        _ = chmod(side.base, 0o755)
        // Scan as an unprivileged user (setfsuid is per thread and drops the file capabilities);
        // the peer's side writes as root.
        _ = OddTree.setfsuid(65534)
        let report: TreeRun.Report
        do {
            defer { _ = OddTree.setfsuid(0) }
            let scanner = TreeScanner(source: side.source)
            report = try TreeRun(transport: AsRoot(side.transport), sourceRoot: side.source).run(scanner, cacheRoot: nil, epoch: 1)
        }
        #expect(Set(report.scan.problems.map { TreePath.display($0.path) }) == ["secret", "closed"])
        #expect(report.scan.problems.allSatisfy { $0.message.contains("Permission denied") })
        #expect(FileManager.default.fileExists(atPath: side.mirror + "/public"))
        #expect(!FileManager.default.fileExists(atPath: side.mirror + "/secret"))
    }

    /// Calls the peer's side with root's file access.
    final class AsRoot: TreeTransport {
        let inner: any TreeTransport
        init(_ inner: any TreeTransport) { self.inner = inner }
        func root<R>(_ body: () throws -> R) rethrows -> R {
            let before = OddTree.setfsuid(0)
            defer { _ = OddTree.setfsuid(UInt32(before)) }
            return try body()
        }
        func latestRoot() throws -> ChunkID? { try root { try inner.latestRoot() } }
        func lacking(_ ids: [ChunkID]) throws -> [ChunkID] { try root { try inner.lacking(ids) } }
        func put(_ id: ChunkID, _ data: ByteBuffer) throws { try root { try inner.put(id, data) } }
        func commit(root r: ChunkID, summary: RunSummary) throws -> TreeSnapshot { try root { try inner.commit(root: r, summary: summary) } }
    }

    /// Stops sending after a number of chunks, as a lost link would.
    final class CutTransport: TreeTransport {
        let inner: LocalTreeTransport
        var remaining: Int
        var bytes: UInt64 = 0
        init(_ inner: LocalTreeTransport, after: Int) { self.inner = inner; remaining = after }
        struct Cut: Error {}
        func latestRoot() throws -> ChunkID? { try inner.latestRoot() }
        func lacking(_ ids: [ChunkID]) throws -> [ChunkID] { try inner.lacking(ids) }
        func put(_ id: ChunkID, _ data: ByteBuffer) throws {
            guard remaining > 0 else {
                try inner.repository.chunks.commit()   // what had arrived was made durable
                throw Cut()
            }
            remaining -= 1
            bytes += UInt64(data.readableBytes)
            try inner.put(id, data)
        }
        func commit(root: ChunkID, summary: RunSummary) throws -> TreeSnapshot { try inner.commit(root: root, summary: summary) }
    }

    @Test func aCutShortRunKeepsThePreviousSnapshotAndTheNextSendsOnlyWhatHadNotArrived() throws {
        let side = try Side()
        OddTree.make(side.source, bulk: 300)
        try side.run()
        let before = try side.repository.snapshots()
        // A second generation of data, cut off after 40 chunks.
        var seed: UInt64 = 99
        for i in 0..<60 { OddTree.write(side.source, "gen2-\(i)", OddTree.random(200_000, seed: &seed)) }
        let cut = CutTransport(side.transport, after: 40)
        let scanner = TreeScanner(source: side.source, cache: side.cache)
        #expect(throws: CutTransport.Cut.self) {
            _ = try TreeRun(transport: cut, sourceRoot: side.source).run(scanner, cacheRoot: side.cacheRoot, epoch: 1)
        }
        #expect(try side.repository.snapshots() == before)
        // The resumed run reads the new files again (the cut scan's cache is not kept) and
        // offers their chunks; the peer names the ones that had not arrived.
        let resumed = try side.run()
        #expect(resumed.scan.filesRead == 60)
        let total = 60 * 200_000
        #expect(cut.bytes + resumed.bytesSent < UInt64(total) + UInt64(total / 10),
                "cut run sent \(cut.bytes), resumed \(resumed.bytesSent), of \(total)")
        #expect(resumed.bytesSent < UInt64(total) - cut.bytes + 64 << 10)
        #expect(OddTree.differences(side.source, side.mirror).isEmpty)
    }

    @Test func aFirstRunBuildsDirectoriesAsTheirBlobsArriveAndTheCommitOnlyRenamesThem() throws {
        let side = try Side()
        var seed: UInt64 = 7
        for d in 0..<20 {
            OddTree.mkdirs(side.source, Array("dir \(d)/sub".utf8), mode: d == 3 ? 0o700 : 0o755)
            for f in 0..<30 { OddTree.write(side.source, "dir \(d)/\(f < 25 ? "" : "sub/")file \(f)", OddTree.random(100 + f * 37, seed: &seed)) }
        }
        _ = symlink("dir 1/file 2", side.source + "/a link")
        OddTree.write(side.source, "top file", Array("top\n".utf8))
        // A run cut short: nothing committed, and nothing of it visible in the mirror but the
        // staging directory.
        let cut = CutTransport(side.transport, after: 300)
        #expect(throws: CutTransport.Cut.self) {
            _ = try TreeRun(transport: cut, sourceRoot: side.source).run(TreeScanner(source: side.source, cache: FilesCache()), cacheRoot: nil, epoch: 1)
        }
        #expect(try side.repository.snapshots().isEmpty)
        #expect(try FileManager.default.contentsOfDirectory(atPath: side.mirror) == [".ferry-staged"])
        // The next run stages every directory up to the top; the commit moves the top's entries
        // into the mirror and writes no file itself.
        try side.run()
        let stats = try #require(side.transport.lastStats)
        #expect(stats.filesStaged == 20 * 30 + 2 && stats.filesWritten == 0, "\(stats)")
        #expect(OddTree.differences(side.source, side.mirror).isEmpty)
        #expect(try OddTree.rsyncDifferences(side.source, side.mirror).isEmpty)
        // A later run stages nothing: the mirror is no longer empty.
        OddTree.mkdirs(side.source, Array("dir 20".utf8))
        OddTree.write(side.source, "dir 20/new", Array("new\n".utf8))
        try side.run()
        #expect(side.transport.lastStats?.filesStaged == 0 && side.transport.lastStats?.filesWritten == 1)
        #expect(try OddTree.rsyncDifferences(side.source, side.mirror).isEmpty)
    }

    @Test func aVanishedOrUnreadableSourceIsReportedNotTakenAsEmpty() throws {
        let side = try Side()
        OddTree.make(side.source, bulk: 50)
        try side.run()
        let kept = OddTree.describe(side.mirror)
        #expect(rename(side.source, side.base + "/away") == 0)
        #expect {
            try side.run()
        } throws: { error in
            "\(error)".contains("cannot open the source directory") && "\(error)".contains("nothing is replicated")
        }
        #expect(OddTree.describe(side.mirror) == kept)
        #expect(try side.repository.snapshots().count == 1)
        #expect(rename(side.base + "/away", side.source) == 0)
        try side.run()
        #expect(try side.repository.snapshots().count == 2)
    }

    @Test func aFullTargetDiskFailsTheRunClearlyCommitsNothingAndTheNextRunSucceeds() throws {
        let side = try Side()
        try FileManager.default.createDirectory(atPath: side.mirror, withIntermediateDirectories: true)
        #expect(mount("tmpfs", side.mirror, "tmpfs", 0, "size=4m") == 0, "mount tmpfs: \(errno)")
        defer { umount2(side.mirror, Int32(MNT_DETACH)) }
        var seed: UInt64 = 5
        // A new directory is built under a temporary name and renamed into place whole: the
        // one that does not fit is not left half-written under its name, nor under another.
        OddTree.mkdirs(side.source, Array("new dir".utf8))
        for i in 0..<8 { OddTree.write(side.source, (i < 5 ? "new dir/" : "") + "part-\(i)", OddTree.random(1 << 20, seed: &seed)) }
        #expect {
            try side.run()
        } throws: { error in
            "\(error)".contains("No space left on device")
        }
        #expect(try side.repository.snapshots().isEmpty)
        let left = try FileManager.default.contentsOfDirectory(atPath: side.mirror)
        #expect(!left.contains("new dir") && !left.contains { $0.hasPrefix(".ferry-") }, "\(left)")
        // Space is freed (the mount grows); the next run commits.
        #expect(mount("tmpfs", side.mirror, "tmpfs", UInt(MS_REMOUNT), "size=64m") == 0)
        try side.run()
        #expect(try side.repository.snapshots().count == 1)
        #expect(OddTree.differences(side.source, side.mirror).isEmpty)
    }

    @Test func pruningAndGarbageCollectionFreeSpaceNeverWhatAKeptSnapshotOrARunInProgressNeeds() throws {
        let side = try Side(packLimit: 2 << 20)
        var seed: UInt64 = 11
        OddTree.write(side.source, "stable", OddTree.random(3 << 20, seed: &seed))
        var described: [Int64: [String: String]] = [:]
        for generation in 0..<5 {
            for i in 0..<4 { OddTree.write(side.source, "changing-\(i)", OddTree.random(1 << 20, seed: &seed)) }
            OddTree.write(side.source, "gen", Array("\(generation)".utf8))
            let report = try side.run()
            described[report.snapshot.id] = OddTree.describe(side.source)
        }
        let before = side.repository.chunks.packBytes()
        try side.repository.forget([1, 2, 3])
        // A run in progress: its chunks arrived, its commit has not.
        for i in 0..<4 { OddTree.write(side.source, "changing-\(i)", OddTree.random(1 << 20, seed: &seed)) }
        let scanner = TreeScanner(source: side.source, cache: side.cache)
        let run = TreeRun(transport: side.transport, sourceRoot: side.source)
        try run.begin(cacheRoot: side.cacheRoot)
        let scan = try scanner.scan(into: run)
        let collected = try side.repository.collectGarbage()
        let after = side.repository.chunks.packBytes()
        print("tree gc: \(collected.chunksRemoved) chunks removed, \(collected.packsRemoved) packs removed, \(collected.packsRewritten) rewritten, \(before) → \(after) bytes")
        #expect(collected.chunksRemoved >= 12)
        #expect(after < before - (8 << 20), "packs \(before) → \(after)")
        // The run in progress commits; the kept snapshots restore exactly; verify finds nothing.
        let report = try run.finish(scan, epoch: 1, sourceTime: Date())
        described[report.snapshot.id] = OddTree.describe(side.source)
        #expect(try side.repository.snapshots().map(\.id) == [4, 5, 6])
        for snapshot in try side.repository.snapshots() {
            let target = side.base + "/gc-restore-\(snapshot.id)"
            try side.repository.restore(snapshot, path: [], to: target)
            #expect(OddTree.differences(described[snapshot.id]!, OddTree.describe(target)).isEmpty, "snapshot \(snapshot.id)")
        }
        let verify = try side.repository.verify()
        #expect(verify.damage.isEmpty, "\(verify.damage)")
    }

    @Test func verifyNamesTheFilesAndSnapshotsADamagedChunkBreaks() throws {
        let side = try Side()
        var seed: UInt64 = 3
        OddTree.write(side.source, "victim.bin", OddTree.random(100_000, seed: &seed))
        OddTree.write(side.source, "fine.txt", Array("fine\n".utf8))
        try side.run()
        #expect(try side.repository.verify().damage.isEmpty)
        // Flip a byte inside the victim's data in the pack.
        let pack = side.repositoryPath + "/chunks/packs/000001.pack"
        var bytes = try Data(contentsOf: URL(fileURLWithPath: pack))
        let needle = try Data(contentsOf: URL(fileURLWithPath: side.source + "/victim.bin")).prefix(64)
        let at = try #require(bytes.range(of: needle)).lowerBound + 10
        bytes[at] ^= 0xFF
        try bytes.write(to: URL(fileURLWithPath: pack))
        let damage = try side.repository.verify().damage
        #expect(damage.count == 2)
        #expect(damage.first?.contains("victim.bin in snapshot 1") == true, "\(damage)")
        #expect(damage.first?.contains("damaged") == true)
        #expect(damage.last?.contains("the next run sends it again") == true)
        // The next run (a new scan: the cache is dropped) is told the chunk is lacking and sends it.
        side.cache = FilesCache()
        side.cacheRoot = nil
        let repaired = try side.run()
        #expect(repaired.chunksSent >= 1)
        #expect(try side.repository.verify().damage.isEmpty)
    }
}
