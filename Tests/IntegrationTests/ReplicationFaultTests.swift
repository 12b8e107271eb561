import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// east (primary of vm1) and west (its replica) as real daemons, each reaching the other only
/// through a ``FaultProxy``: east dials west's proxy and west dials east's, so whichever side's
/// dial wins, the link runs through a proxy and every fault applies to it.
final class ProxiedPair {
    let dir = TempDir()
    let east: TestSite
    let west: TestSite
    let link: ProxiedLink

    init(replica policy: String, size: String = "64M") throws {
        east = try TestSite(name: "east", root: dir.path)
        west = try TestSite(name: "west", root: dir.path)
        link = try ProxiedLink(eastPort: east.replicationPort, westPort: west.replicationPort)
        let volume = TestSite.Volume(name: "vm1", size: size, primary: "east", replicas: ["west": policy])
        try east.writeConfig(peers: [("west", link.toWest.port, west.siteID)], volumes: [volume])
        try west.writeConfig(peers: [("east", link.toEast.port, east.siteID)], volumes: [volume])
    }

    func start() throws {
        try east.start()
        try west.start()
    }

    /// Stops both daemons (by PID), then the proxies.
    func stop() {
        if east.isRunning { east.stop() }
        if west.isRunning { west.stop() }
        link.stop()
    }

    /// vm1's entry for west in east's status.
    var replica: SiteStatus.Replica? {
        (try? east.status())?.volumes.first { $0.name == "vm1" }?.replicas.first { $0.peer == "west" }
    }

    var diagnostics: String {
        func links(_ site: TestSite) -> String {
            (try? site.status())?.peers.map { "\($0.name) \($0.state.rawValue) \($0.direction.map { "\($0)" } ?? "")" }.joined(separator: ", ") ?? "no status"
        }
        return "west as east sees it: \(replica.map { "\($0)" } ?? "no status")\n"
            + "peer links: east → \(links(east)); west → \(links(west))\n"
            + "proxies: \(link.bytesForwarded) bytes forwarded, \(link.bytesHeld) held, \(link.liveConnections) connections\n"
            + "east log:\n\(logTail(east))\nwest log:\n\(logTail(west))"
    }

    /// The last log lines, with the repeated "dropped replication frame" lines counted, not shown.
    func logTail(_ site: TestSite) -> String {
        let lines = site.log().split(separator: "\n")
        let drops = lines.filter { $0.contains("dropped replication frame") }
        var tail = lines.filter { !$0.contains("dropped replication frame") }.suffix(25).joined(separator: "\n")
        if let first = drops.first { tail += "\n(\(drops.count) lines like: \(first))" }
        return tail
    }

    /// Waits until west is connected, consistent, in sync and not behind.
    func waitInSync(_ timeout: Duration = .seconds(60), sourceLocation: SourceLocation = #_sourceLocation) {
        let ok = eventually(timeout) {
            guard let r = replica else { return false }
            return r.connected && r.consistent && r.state == "in-sync" && r.lagBytes == 0 && r.dirtyBytes == 0
        }
        #expect(ok, "west did not reach in-sync:\n\(diagnostics)", sourceLocation: sourceLocation)
    }

    /// The qemu-io arguments that run `commands` against east's vm1 over its Unix socket.
    func qemuIOArguments(_ commands: [String]) -> [String] {
        ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [east.unixURI("vm1")]
    }

    @discardableResult
    func qemuIO(_ commands: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> RunResult {
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        let result = try run(qemuIO, qemuIOArguments(commands), timeout: .seconds(60), sourceLocation: sourceLocation)
        #expect(!result.output.contains("failed"), "qemu-io: \(result.output)", sourceLocation: sourceLocation)
        return result
    }

    func imagesIdentical() -> Bool {
        (try? run("/usr/bin/cmp", ["-s", east.imagePath("vm1"), west.imagePath("vm1")], expect: nil))?.status == 0
    }

    /// Waits until west holds exactly east's bytes (async applies at barriers, after the lag is 0).
    func waitIdentical(_ timeout: Duration = .seconds(60), sourceLocation: SourceLocation = #_sourceLocation) {
        let ok = eventually(timeout) { imagesIdentical() }
        let cmp = (try? run("/usr/bin/cmp", [east.imagePath("vm1"), west.imagePath("vm1")], expect: nil))?.output ?? ""
        #expect(ok, "images differ: \(cmp)\n\(diagnostics)", sourceLocation: sourceLocation)
    }
}

/// Replication through a faulty network (issue 9): a fault-injecting proxy stalls, slows and cuts
/// the link between two real daemons while qemu-io writes to the primary; status shows what
/// happens (lag, pull-ahead, degraded, blocked), and afterwards the replica is byte-identical.
@Suite(.serialized, .timeLimit(.minutes(5)))
struct ReplicationFaultTests {
    /// P5: an async replica's lag is visible while the link is stalled, then slowed, and drains
    /// to 0 once the link is well again, leaving identical images.
    @Test func asyncLagGrowsWhileTheLinkIsStalledOrSlowAndDrainsAfter() throws {
        // Uncompressed, so that the bytes through the proxies can be counted against the writes.
        let pair = try ProxiedPair(replica: "{ mode: async, compression: none }")
        defer { pair.stop() }
        try pair.start()
        pair.waitInSync()

        // Stalled (kept short of the links' 5 s dead-peer timeout): the writes complete at once, and
        // every byte of them is lag, since nothing reaches west.
        pair.link.stall()
        try pair.qemuIO(["write -P 0xa1 0 4M", "flush"])
        var peak: UInt64 = 0
        let lagged = eventually(.seconds(3)) {
            peak = max(peak, pair.replica?.lagBytes ?? 0)
            return peak >= 4 << 20
        }
        let stalled = pair.replica
        pair.link.resume()
        #expect(lagged, "lag while stalled peaked at \(peak) bytes, expected at least 4 MiB\n\(pair.diagnostics)")
        #expect(stalled?.connected == true, "the stall was long enough to drop the link")
        #expect((stalled?.lagSeconds ?? 0) > 0)
        let drained = eventually(.seconds(30)) { pair.replica.map { $0.lagBytes == 0 && $0.state == "in-sync" } ?? false }
        #expect(drained, "lag did not drain after the stall\n\(pair.diagnostics)")
        pair.waitIdentical()

        // Slow (300 ms each way): lag shows while acks are on their way, and drains.
        let forwardedBefore = pair.link.bytesForwarded
        pair.link.delay(milliseconds: 300)
        try pair.qemuIO(["write -P 0xa2 8M 2M", "flush"])
        peak = 0
        let slowLag = eventually(.seconds(5)) {
            peak = max(peak, pair.replica?.lagBytes ?? 0)
            return peak > 0
        }
        #expect(slowLag, "no lag seen on a link with 600 ms round trips\n\(pair.diagnostics)")
        pair.link.delay(milliseconds: 0)
        let drainedAgain = eventually(.seconds(30)) { pair.replica.map { $0.lagBytes == 0 && $0.state == "in-sync" } ?? false }
        #expect(drainedAgain, "lag did not drain after the delay\n\(pair.diagnostics)")
        pair.waitIdentical()
        #expect(pair.link.bytesForwarded >= forwardedBefore + (2 << 20), "the writes did not go through the proxies")
        #expect(pair.west.isRunning && pair.east.isRunning)
    }

    /// P5, `on-lag: pull-ahead`: past a 1 MiB bound while stalled, east stops journaling for west,
    /// says so in status and its log, and catches west up from the bitmap once the link moves.
    @Test func asyncPullAheadPastMaxLagThenCatchesUp() throws {
        let pair = try ProxiedPair(replica: "{ mode: async, max-lag: 1M, on-lag: pull-ahead }")
        defer { pair.stop() }
        try pair.start()
        pair.waitInSync()

        pair.link.stall()
        try pair.qemuIO(["write -P 0xb1 0 1M", "write -P 0xb2 1M 1M", "write -P 0xb3 2M 1M", "write -P 0xb4 6M 64k", "flush"])
        var seen: SiteStatus.Replica?
        let pulledAhead = eventually(.seconds(3)) {
            seen = pair.replica
            return seen?.state == "pull-ahead"
        }
        pair.link.resume()
        #expect(pulledAhead, "west is not in pull-ahead after 3 MiB past a 1 MiB bound\n\(pair.diagnostics)")
        if let seen {
            #expect(seen.reason.contains("pull-ahead"), "reason: \(seen.reason)")
            #expect(seen.lagBytes > 1 << 20, "lag \(seen.lagBytes) is not past the bound")
        }
        #expect(pair.east.log().contains("pull-ahead"), "no log line mentions pull-ahead:\n\(pair.east.log(tail: 20))")

        let caughtUp = eventually(.seconds(60)) {
            guard let r = pair.replica else { return false }
            return r.state == "in-sync" && r.consistent && r.lagBytes == 0 && r.dirtyBytes == 0
        }
        #expect(caughtUp, "west did not catch up after pull-ahead\n\(pair.diagnostics)")
        pair.waitIdentical()
    }

    /// P1 with `on-peer-loss: degrade`: the link is cut, writes go on, status says degraded with
    /// RPO no longer 0 and the missed regions in the bitmap; healed, west catches up.
    @Test func syncDegradesWhenCutAndCatchesUpWhenHealed() throws {
        let pair = try ProxiedPair(replica: "{ mode: sync, on-peer-loss: degrade }")
        defer { pair.stop() }
        try pair.start()
        pair.waitInSync()
        #expect(pair.replica?.rpoZero == true)

        pair.link.cut()
        let degraded = eventually(.seconds(15)) { pair.replica?.state == "degraded" }
        #expect(degraded, "east did not notice the cut\n\(pair.diagnostics)")
        let started = ContinuousClock.now
        try pair.qemuIO(["write -P 0xc1 0 1M", "write -P 0xc2 4M 64k", "flush"])
        let took = ContinuousClock.now - started
        #expect(took < .seconds(20), "writes took \(took) with the replica cut off")

        let r = pair.replica
        #expect(r?.state == "degraded")
        #expect(r?.connected == false)
        #expect(r?.rpoZero == false, "RPO is still claimed to be 0")
        #expect((r?.dirtyBytes ?? 0) >= (1 << 20) + (64 << 10), "the bitmap holds \(r?.dirtyBytes ?? 0) bytes, less than what west missed")
        #expect(pair.east.log().contains("degraded"))
        #expect(!pair.imagesIdentical(), "west got the writes through a cut link?")

        pair.link.heal()
        let caughtUp = eventually(.seconds(60)) {
            guard let r = pair.replica else { return false }
            return r.state == "in-sync" && r.rpoZero && r.dirtyBytes == 0 && r.connected
        }
        #expect(caughtUp, "west did not catch up after the heal\n\(pair.diagnostics)")
        pair.waitIdentical()
    }

    /// P1 with `on-peer-loss: block`: the link is cut and a write is not answered while west is
    /// away (status: blocked); healed, the write completes and west has it.
    @Test func syncBlocksWhenCutAndTheWriteCompletesWhenHealed() throws {
        let qemuIO = try requireTool("qemu-io", package: "qemu-utils")
        let pair = try ProxiedPair(replica: "{ mode: sync, on-peer-loss: block }")
        defer { pair.stop() }
        try pair.start()
        pair.waitInSync()

        pair.link.cut()
        let blocked = eventually(.seconds(15)) { pair.replica?.state == "blocked" }
        #expect(blocked, "east did not notice the cut\n\(pair.diagnostics)")

        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: qemuIO)
        writer.arguments = pair.qemuIOArguments(["write -P 0xd1 0 64k", "flush"])
        let out = pair.dir.path + "/qemu-io.out"
        _ = FileManager.default.createFile(atPath: out, contents: nil)
        writer.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: out))
        writer.standardError = writer.standardOutput
        writer.standardInput = FileHandle.nullDevice
        try writer.run()
        defer {
            if writer.isRunning { kill(writer.processIdentifier, SIGKILL) }
            writer.waitUntilExit()
        }
        // It waits: for 3 s the write is not answered, and status says why.
        let answeredWhileCut = eventually(.seconds(3)) { !writer.isRunning }
        #expect(!answeredWhileCut, "the write was answered while the sync replica was cut off (on-peer-loss: block): \((try? String(contentsOfFile: out, encoding: .utf8)) ?? "")")
        let r = pair.replica
        #expect(r?.state == "blocked")
        #expect(r?.rpoZero == true, "writes wait for the peer: none answered is missing there")
        #expect(r?.reason.contains("block") == true, "reason: \(r?.reason ?? "none")")

        pair.link.heal()
        let answered = eventually(.seconds(60)) { !writer.isRunning }
        #expect(answered, "the write was not answered after the heal; qemu-io so far: \((try? String(contentsOfFile: out, encoding: .utf8)) ?? "")\n\(pair.diagnostics)")
        if answered {
            let output = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
            #expect(writer.terminationStatus == 0 && output.contains("wrote 65536/65536 bytes"), "qemu-io: \(output)")
        }
        let inSync = eventually(.seconds(60)) { pair.replica.map { $0.state == "in-sync" && $0.rpoZero } ?? false }
        #expect(inSync, "west not back in sync\n\(pair.diagnostics)")
        pair.waitIdentical()
    }
}
