import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Tree replication between two real daemons over pinned TLS (issue 11): continuous delivery,
/// kill -9 of either side mid-run, status.
@Suite(.serialized) struct TreeDaemonTests {
    final class Pair {
        let dir = TempDir()
        let east: TestSite
        let west: TestSite
        var source: String { dir.path + "/src" }
        var target: String { dir.path + "/dst" }

        init(mode: String) throws {
            east = try TestSite(name: "east", root: dir.path)
            west = try TestSite(name: "west", root: dir.path)
            try FileManager.default.createDirectory(atPath: dir.path + "/src", withIntermediateDirectories: true)
            let trees = """
                trees:
                  docs:
                    primary: east
                    source: \(dir.path)/src
                    replicas:
                      west: { target: \(dir.path)/dst }
                    \(mode)

                """
            try east.writeConfig(peers: [("west", west.replicationPort, west.siteID)], extra: trees)
            try west.writeConfig(peers: [("east", east.replicationPort, east.siteID)], extra: trees)
        }

        func tree(_ site: TestSite) -> SiteStatus.Tree? { (try? site.status())?.trees.first { $0.name == "docs" } }

        /// rsync's dry run from source to target: nothing to do means the trees agree.
        func rsyncDifferences() throws -> [String] {
            let r = try run("/usr/bin/rsync", ["-anciH", "--delete", source + "/", target + "/"])
            return r.stdout.split(separator: "\n").map(String.init)
        }

        func write(_ name: String, _ bytes: [UInt8]) {
            FileManager.default.createFile(atPath: source + "/" + name, contents: Data(bytes))
        }
    }

    static func random(_ count: Int, seed: UInt64) -> [UInt8] {
        var x = seed | 1
        return (0..<count).map { _ in
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            return UInt8(truncatingIfNeeded: x)
        }
    }

    @Test func continuousModeDeliversEachFileAndStatusCarriesTheContractFields() throws {
        let pair = try Pair(mode: "mode: continuous")
        try FileManager.default.createDirectory(atPath: pair.source + "/sub dir/deeper", withIntermediateDirectories: true)
        pair.write("sub dir/deeper/a file", Array("hello\n".utf8))
        _ = symlink("nowhere", pair.source + "/dangling")
        // A name that is not UTF-8 (Latin-1 "badéname").
        let latin1 = Array((pair.source + "/bad").utf8) + [0xE9] + Array("name".utf8) + [0]
        let fd = latin1.withUnsafeBytes { open($0.baseAddress!.assumingMemoryBound(to: CChar.self), O_CREAT | O_WRONLY, 0o644) }
        #expect(fd >= 0 && write(fd, "latin1\n", 7) == 7)
        close(fd)
        try pair.east.start()
        try pair.west.start()
        defer { pair.east.stop(); pair.west.stop() }
        let first = eventually(.seconds(60)) { pair.tree(pair.west)?.lastSnapshot != nil }
        #expect(first, "no snapshot; east log:\n\(pair.east.log(tail: 30))\nwest log:\n\(pair.west.log(tail: 30))")
        #expect(try pair.rsyncDifferences().isEmpty)

        // `tree restore --path` names that file by its bytes (through a shell: a Process takes
        // only UTF-8 arguments); a path the snapshot lacks fails and leaves no --to behind.
        let snapshot = try #require(pair.tree(pair.west)?.lastSnapshot?.id)
        let into = pair.dir.path + "/restored", nowhere = pair.dir.path + "/not-restored"
        let restore = "exec \"$0\" tree restore docs --at \(snapshot) --path \"$(printf 'bad\\351name')\" --to \"$1\" --config \"$2\""
        let restored = try run("/bin/sh", ["-c", restore, try ferryBinary(), into, pair.west.configPath])
        #expect(restored.stdout.contains("restored snapshot") && restored.stdout.contains("\\xe9"), "\(restored.stdout)")
        #expect(try run("/bin/sh", ["-c", "cat \"$0\"/*", into]).stdout == "latin1\n")
        let missing = try run(try ferryBinary(), ["tree", "restore", "docs", "--at", "\(snapshot)", "--path", "no such",
                                                  "--to", nowhere, "--config", pair.west.configPath], expect: 1)
        #expect(missing.stderr.contains("no such") && !FileManager.default.fileExists(atPath: nowhere), "\(missing.stderr)")

        // The status contract: name, source (primary) or target (replica), mode, state,
        // lastSnapshot, lagSeconds — as raw JSON, as scripts read it.
        for (site, key, path) in [(pair.east, "source", pair.source), (pair.west, "target", pair.target)] {
            let json = try run(try ferryBinary(), ["status", "--json", "--config", site.configPath]).stdout
            let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
            let tree = (object["trees"] as! [[String: Any]]).first!
            #expect(tree["name"] as? String == "docs")
            #expect(tree[key] as? String == path)
            #expect(tree["mode"] as? String == "continuous")
            #expect(tree["state"] is String)
            #expect((tree["lastSnapshot"] as? [String: Any])?["id"] != nil)
            #expect(tree["lagSeconds"] is Double || tree["lagSeconds"] is Int)
        }

        // 1000 small files written one at a time; a watcher thread notes when each is on the peer
        // at full size.
        let count = 1000
        let timeline = Timeline(count: count)
        let target = pair.target
        let watcher = Thread {
            var pending = Set(0..<count)
            while !pending.isEmpty && !timeline.isDone {
                for i in pending.sorted() where timeline.wasWritten(i) {
                    var st = stat()
                    if stat(target + "/burst/f\(i)", &st) == 0 && st.st_size == 1000 {
                        timeline.arrive(i)
                        pending.remove(i)
                    }
                }
                usleep(2000)
            }
        }
        try FileManager.default.createDirectory(atPath: pair.source + "/burst", withIntermediateDirectories: true)
        watcher.start()
        defer { timeline.finish() }
        for i in 0..<count {
            let tmp = pair.source + "/burst/.f\(i).part"
            FileManager.default.createFile(atPath: tmp, contents: Data(Self.random(1000, seed: UInt64(i + 1))))
            timeline.write(i)
            rename(tmp, pair.source + "/burst/f\(i)")
            usleep(10_000)
        }
        let all = eventually(.seconds(120)) { timeline.latencies().count == count }
        timeline.finish()
        #expect(all, "\(count - timeline.latencies().count) files never arrived")
        let latencies = timeline.latencies()
        if !latencies.isEmpty {
            let p50 = latencies[latencies.count / 2], p99 = latencies[min(latencies.count - 1, latencies.count * 99 / 100)]
            print("tree continuous delivery: \(latencies.count) files, p50 \(String(format: "%.3f", p50)) s, p99 \(String(format: "%.3f", p99)) s, max \(String(format: "%.3f", latencies.last!)) s")
        }
        let settled = eventually(.seconds(60)) { (try? pair.rsyncDifferences().isEmpty) == true && pair.tree(pair.east)?.lagSeconds == 0 }
        #expect(settled, "\((try? pair.rsyncDifferences().prefix(5)) ?? [])")
    }

    @Test(arguments: ["west", "east"])
    func killNineMidRunKeepsThePreviousSnapshotAndTheRunResumesSendingOnlyWhatIsMissing(victim: String) throws {
        // The bandwidth limit makes the run below last about 6 s wherever the test runs, so the
        // kill comes while it is under way (the replica writes as the data arrives: unthrottled,
        // the run could end between two looks at its progress).
        let pair = try Pair(mode: "mode: scheduled\n    every: 1w\n    bandwidth-limit: 40M")
        pair.write("first", Array("the first snapshot\n".utf8))
        try pair.east.start()
        try pair.west.start()
        defer { pair.east.stop(); pair.west.stop() }
        #expect(eventually(.seconds(60)) { (pair.tree(pair.west)?.lastSnapshot?.id ?? 0) >= 1 }, "\(pair.east.log(tail: 30))")
        let base = pair.tree(pair.west)?.lastSnapshot?.id ?? 1

        // 64 files of 4 MiB of random data, cut by kill -9 part way.
        let total = 64 * (4 << 20)
        for i in 0..<64 { pair.write("data-\(i)", Self.random(4 << 20, seed: UInt64(i * 7 + 3))) }
        _ = try run(try ferryBinary(), ["tree", "sync", "docs", "--config", pair.east.configPath])
        let partWay = eventually(.seconds(120)) { (pair.tree(pair.west)?.bytesReceived ?? 0) > UInt64(total / 4) }
        #expect(partWay)
        let killed = victim == "west" ? pair.west : pair.east
        killed.kill9()
        // Sent before the kill (east's counter starts again at 0 when east is the one restarted).
        let sentBefore = victim == "west" ? pair.tree(pair.east)?.replicas.first?.bytesSent ?? 0 : 0
        // The previous snapshot is intact and still the newest.
        let snapshotsBefore = try run(try ferryBinary(), ["tree", "snapshots", "docs", "--config", pair.west.configPath], expect: nil)
        if victim == "east" { #expect(snapshotsBefore.stdout.contains("\n\(base) ")); #expect(!snapshotsBefore.stdout.contains("\n\(base + 1) ")) }
        try killed.start()
        // No `tree sync`: the interrupted run resumes by itself (east restarted: the catalog says a
        // run was under way; west restarted: east retries until it is back).
        let resumed = eventually(.seconds(180)) { (pair.tree(pair.west)?.lastSnapshot?.id ?? 0) >= base + 1 }
        #expect(resumed, "east log:\n\(pair.east.log(tail: 40))\nwest log:\n\(pair.west.log(tail: 40))")
        let differences = try pair.rsyncDifferences()
        #expect(differences.isEmpty, "\(differences.prefix(5))\nwest log:\n\(pair.west.log(tail: 20))")
        let sent = (pair.tree(pair.east)?.replicas.first?.bytesSent ?? UInt64.max) - sentBefore
        let arrived = UInt64(total) - min(UInt64(total), sent)
        print("tree kill -9 of \(victim): \(total) bytes of new data; after the restart \(sent) bytes were sent (\(arrived) had arrived before the kill)")
        #expect(sent < UInt64(total) * 9 / 10, "the resumed run sent \(sent) of \(total) bytes")
        let list = try run(try ferryBinary(), ["tree", "snapshots", "docs", "--config", pair.west.configPath]).stdout
        #expect(list.contains("\n\(base) ") && list.contains("\n\(base + 1) "), "\(list)")

        // `tree sync --wait` returns once the run is committed, and says what west holds.
        pair.write("after-\(victim)", Array("one more file\n".utf8))
        let waited = try run(try ferryBinary(), ["tree", "sync", "docs", "--wait", "--config", pair.east.configPath])
        #expect(waited.stdout.contains("west: snapshot ") && waited.stdout.contains(" committed ("), "\(waited.stdout)\(waited.stderr)")
        #expect(FileManager.default.fileExists(atPath: pair.target + "/after-\(victim)"), "\(waited.stdout)")
    }

    @Test func promotingTheReplicaThenTheFormerPrimaryReturnsAsAReplicaKeepingItsLateChangesAside() throws {
        let pair = try Pair(mode: "mode: continuous")
        pair.write("shared.txt", Array("the same on both\n".utf8))
        pair.write("changed-on-east-later.txt", Array("version 1\n".utf8))
        pair.write("big.bin", Self.random(8 << 20, seed: 5))
        // Two names of one file, which only west changes: east's apply replaces the first, which
        // moves the file's ctime, and must not take that for a change of east's to the second.
        pair.write("linked-1.txt", Array("linked, version 1\n".utf8))
        try FileManager.default.linkItem(atPath: pair.source + "/linked-1.txt", toPath: pair.source + "/linked-2.txt")
        try pair.east.start()
        try pair.west.start()
        defer { pair.east.stop(); pair.west.stop() }
        #expect(eventually(.seconds(60)) { pair.tree(pair.west)?.lastSnapshot != nil && (try? pair.rsyncDifferences().isEmpty) == true })

        // East goes away; west is promoted: its copy becomes the source, at epoch 2.
        pair.east.stop()
        let promoted = try run(try ferryBinary(), ["promote", "docs", "--config", pair.west.configPath])
        #expect(promoted.stdout.contains("now the primary of tree docs at epoch 2"), "\(promoted.stdout)\(promoted.stderr)")
        #expect(pair.tree(pair.west)?.role == "primary")
        // Promoting again is refused: it is the primary already.
        let again = try run(try ferryBinary(), ["promote", "docs", "--config", pair.west.configPath], expect: 1)
        #expect(again.stderr.contains("already the primary"))
        FileManager.default.createFile(atPath: pair.target + "/written-on-west.txt", contents: Data("new on west\n".utf8))
        let linked = try #require(FileHandle(forWritingAtPath: pair.target + "/linked-1.txt"))
        try linked.truncate(atOffset: 0)
        try linked.write(contentsOf: Data("linked, version 2, written on west\n".utf8))
        try linked.close()
        // Meanwhile east, cut off, still changed things: they must not be overwritten silently.
        pair.write("changed-on-east-later.txt", Array("version 2, written on east after its last snapshot\n".utf8))
        pair.write("new-on-east.txt", Array("only on east\n".utf8))

        // East returns: it hears west's newer epoch and becomes its replica.
        try pair.east.start()
        let followed = eventually(.seconds(90)) {
            guard let t = pair.tree(pair.east) else { return false }
            return t.role == "replica" && t.epoch == 2 && FileManager.default.fileExists(atPath: pair.source + "/written-on-west.txt")
        }
        #expect(followed, "east log:\n\(pair.east.log(tail: 40))\nwest log:\n\(pair.west.log(tail: 40))")
        // East's tree is now west's, exactly.
        let compare = try run("/usr/bin/rsync", ["-anciH", "--delete", pair.target + "/", pair.source + "/"])
        #expect(compare.stdout.isEmpty, "\(compare.stdout)")
        // Its late changes were kept aside and are listed.
        let east = try #require(pair.tree(pair.east))
        #expect(Set(east.keptAside) == ["changed-on-east-later.txt", "new-on-east.txt"], "\(east.keptAside)")
        let aside = try FileManager.default.contentsOfDirectory(atPath: pair.source + ".ferry-kept-aside")
        let kept = try String(contentsOfFile: pair.source + ".ferry-kept-aside/\(aside.first ?? "")/changed-on-east-later.txt", encoding: .utf8)
        #expect(kept.hasPrefix("version 2"))
        // Only what changed travelled: not big.bin again.
        let sent = pair.tree(pair.west)?.replicas.first?.bytesSent ?? .max
        print("tree failback: west sent \(sent) bytes to bring east back (big.bin is 8 MiB)")
        #expect(sent < 1 << 20, "west sent \(sent) bytes")
    }
}

/// When each file of a burst was written and when it was seen on the peer (monotonic seconds).
final class Timeline: @unchecked Sendable {
    private let lock = NSLock()
    private var written: [Double]
    private var arrived: [Double]
    private var done = false

    init(count: Int) {
        written = Array(repeating: 0, count: count)
        arrived = Array(repeating: 0, count: count)
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    func write(_ i: Int) { lock.withLock { written[i] = Self.now() } }
    func arrive(_ i: Int) { lock.withLock { arrived[i] = Self.now() } }
    func wasWritten(_ i: Int) -> Bool { lock.withLock { written[i] > 0 } }
    func finish() { lock.withLock { done = true } }
    var isDone: Bool { lock.withLock { done } }
    func latencies() -> [Double] {
        lock.withLock { zip(written, arrived).compactMap { $1 > 0 ? $1 - $0 : nil }.sorted() }
    }
}
