import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Recovery points on real daemons (issue 10 §4, §6, §7): `promote --at` restores exactly the
/// bytes of a point, a promotion in the middle of a catch-up rolls back to the state before it
/// (also after the replica was killed mid catch-up), and a drill clone takes writes while the
/// replica stays byte-identical to the primary.
@Suite(.serialized)
struct RecoveryPointTests {
    func vm1(_ site: TestSite) -> SiteStatus.Volume? {
        (try? site.status())?.volumes.first { $0.name == "vm1" }
    }

    func ferry(_ args: [String], _ site: TestSite) throws -> RunResult {
        try run(try ferryBinary(), args + ["--config", site.configPath], expect: nil)
    }

    /// Waits until west keeps a recovery point made after `time`; returns it.
    /// The newest point of `site` marked after `time`. A replica marks at most one point a
    /// second, so a barrier that comes within a second of the last point marks none: while none
    /// has come, the client flushes again now and then (`sites`), as a guest's next fsync would.
    func pointAfter(_ time: Date, _ site: TestSite, flushing sites: ReplicationSites? = nil,
                    sourceLocation: SourceLocation = #_sourceLocation) -> SiteStatus.PointRef? {
        var found: SiteStatus.PointRef?
        var flushed = Date()
        let ok = eventually(.seconds(30)) {
            guard let newest = vm1(site)?.recoveryPoints?.newest, newest.time > time else {
                if let sites, Date().timeIntervalSince(flushed) > 1.5 {
                    _ = try? sites.qemuIO(["flush"], expect: nil)
                    flushed = Date()
                }
                return false
            }
            found = newest
            return true
        }
        #expect(ok, "no recovery point after \(time): \(String(describing: vm1(site)?.recoveryPoints))\n\(site.log(tail: 20))",
                sourceLocation: sourceLocation)
        return found
    }

    /// A sync pair keeping an hour of history, in sync, with 4 MiB of 0x11 written on east and
    /// west's recovery point of that state (the next point can come a second later).
    func sitesWithPointA() throws -> (ReplicationSites, SiteStatus.PointRef?) {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M", history: "1h")
        var beforeA = Date()
        do {
            try sites.startAll()
            sites.waitInSync()
            // qemu-io flushes when it is done: that barrier is a point (sync links: at most one a second).
            beforeA = Date()
            try sites.qemuIO(["write -P 0x11 0 4M"])
        } catch {
            sites.stopAll()
            throw error
        }
        let pointA = pointAfter(beforeA, sites.west, flushing: sites)
        _ = eventually(.seconds(5)) { Date().timeIntervalSince(pointA?.time ?? .distantPast) > 1.2 }
        return (sites, pointA)
    }

    @Test func promoteAtAPointRestoresExactlyItsBytesAndTheOldPrimaryRejoins() throws {
        let (sites, pointA) = try sitesWithPointA()
        defer { sites.stopAll() }
        let beforeB = Date()
        try sites.qemuIO(["write -P 0x22 2M 4M"])
        _ = pointAfter(beforeB, sites.west, flushing: sites)

        let listed = try ferry(["points", "vm1"], sites.west)
        #expect(listed.status == 0 && listed.stdout.contains("#\(pointA?.id ?? 0) ") && listed.stdout.contains("history: 1h"),
                "\(listed.stdout)\(listed.stderr)")
        // Columns as docs/operations.md shows them.
        #expect(listed.stdout.contains("  ID     TIME (UTC)                  SEQUENCE   TO UNDO    KIND"), "\(listed.stdout)")
        let onPrimary = try ferry(["points", "vm1"], sites.east)
        #expect(onPrimary.status == 1 && onPrimary.stderr.contains("kept on its secondaries"), "\(onPrimary.stderr)")

        // Bad --at: a clear message, non-zero, nothing changed.
        for (at, says) in [("9999", "no recovery point #9999"), ("2000-01-01T00:00:00Z", "at or before 2000-01-01"),
                           ("yesterday", "neither a point ID")] {
            let bad = try ferry(["promote", "vm1", "--at", at], sites.west)
            #expect(bad.status == 1 && bad.stderr.contains(says) && bad.stderr.contains("othing changed"), "--at \(at): \(bad.stderr)")
        }
        let contradiction = try ferry(["promote", "vm1", "--at", "1", "--force-inconsistent"], sites.west)
        #expect(contradiction.status == 1 && contradiction.stderr.contains("contradict"), "\(contradiction.stderr)")
        #expect(vm1(sites.west)?.role == "secondary" && vm1(sites.west)?.epoch == 1, "a refused promote changed something")

        sites.east.kill9()
        // The newest point at or before the time B started is A's state: B's writes are undone.
        let iso = ISO8601DateFormatter()
        iso.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        var promoted: RunResult?
        let done = eventually(.seconds(30)) {
            promoted = try? ferry(["promote", "vm1", "--at", iso.string(from: beforeB)], sites.west)
            return promoted?.status == 0
        }
        #expect(done && promoted?.stdout.contains("rolled the image back to point #\(pointA?.id ?? 0)") == true
                && promoted?.stdout.contains("east, once demoted, gets only what differs") == true,
                "\(promoted?.stdout ?? "")\(promoted?.stderr ?? "")\n\(sites.west.log(tail: 20))")
        let west = sites.west.unixURI("vm1")
        let read = try sites.qemuIO(["read -P 0x11 0 4M", "read -P 0 4M 60M"], uri: west, readOnly: true, expect: nil)
        #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"), "west is not at point A: \(read.stdout)\(read.stderr)")

        // East returns, gives way, keeps aside what it wrote after the point, and converges.
        try sites.qemuIO(["write -P 0x33 10M 1M"], uri: west)
        try sites.east.start()
        let rejoined = eventually(.seconds(60)) { vm1(sites.east)?.role == "secondary" }
        #expect(rejoined, "east did not rejoin: \(String(describing: vm1(sites.east)))\n\(sites.east.log(tail: 30))")
        let synced = eventually(.seconds(120)) {
            guard let r = vm1(sites.west)?.replicas.first(where: { $0.peer == "east" }) else { return false }
            return r.connected && r.consistent && r.state == "in-sync" && r.lagBytes == 0
        }
        #expect(synced, "east did not catch up: \(String(describing: vm1(sites.west)?.replicas))")
        #expect(try sites.imagesIdentical(), "east differs from west after the failback")
        let diverged = try ferry(["diverged", "vm1"], sites.east)
        #expect(diverged.status == 0 && diverged.stdout.contains("range") && !diverged.stdout.contains("nothing of vm1"),
                "east kept nothing aside of what it wrote after the point: \(diverged.stdout)\(diverged.stderr)")
    }

    /// The old primary demoted (not dead) before `promote --at`: it follows the promoted site and
    /// ends byte-identical, although its needs never named what the roll-back put back.
    @Test func promoteAtAPointAfterADemoteConverges() throws {
        let (sites, pointA) = try sitesWithPointA()
        defer { sites.stopAll() }
        try sites.qemuIO(["write -P 0x22 2M 4M"])
        sites.waitInSync()
        let demoted = try ferry(["demote", "vm1"], sites.east)
        #expect(demoted.status == 0, "\(demoted.stdout)\(demoted.stderr)")
        var promoted: RunResult?
        let done = eventually(.seconds(30)) {
            promoted = try? ferry(["promote", "vm1", "--at", "\(pointA?.id ?? 0)"], sites.west)
            return promoted?.status == 0
        }
        #expect(done, "\(promoted?.stdout ?? "")\(promoted?.stderr ?? "")")
        let synced = eventually(.seconds(120)) {
            guard let r = vm1(sites.west)?.replicas.first(where: { $0.peer == "east" }) else { return false }
            return r.connected && r.consistent && r.state == "in-sync" && r.lagBytes == 0
        }
        #expect(synced, "east did not catch up: \(String(describing: vm1(sites.west)?.replicas))")
        #expect(try sites.imagesIdentical(), "east kept bytes the roll-back on west undid")
        let read = try sites.qemuIO(["read -P 0x11 0 4M", "read -P 0 4M 60M"], uri: sites.west.unixURI("vm1"), readOnly: true, expect: nil)
        #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"), "\(read.stdout)")
    }

    /// A catch-up overwrites the replica out of order; killed mid-way (the replica, then the
    /// primary), a promotion rolls back to the consistent state the catch-up started from (P3).
    @Test func promoteMidCatchUpRollsBackToTheStateBeforeIt() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync, resync-rate: 1M }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x11 0 8M"])
        sites.waitInSync()
        #expect(sites.west.stop() == 0)
        try sites.qemuIO(["write -P 0x22 0 16M"])
        func catchingUp(_ minimum: UInt64) -> Bool {
            eventually(.seconds(60)) {
                guard let r = vm1(sites.west)?.replicaState else { return false }
                return !r.consistent && r.initialized && r.bytesReceived > minimum
            }
        }
        try sites.west.start()
        #expect(catchingUp(2 << 20), "west did not start catching up: \(String(describing: vm1(sites.west)))")
        #expect(vm1(sites.west)?.recoveryPoints?.rollbackPoint != nil, "status names no point to roll back to: \(String(describing: vm1(sites.west)))")
        // East's status gives the catch-up an ETA from its rate so far.
        let eta = eventually(.seconds(20)) { (sites.replica("west")?.syncETASeconds ?? 0) > 0 }
        #expect(eta, "no ETA for the catch-up: \(String(describing: sites.replica("west")))")
        // Killed mid catch-up, restarted: the catch-up goes on, the way back is still there.
        sites.west.kill9()
        try sites.west.start()
        #expect(catchingUp(1 << 20), "west did not resume catching up: \(String(describing: vm1(sites.west)))")
        sites.east.kill9()
        var promoted: RunResult?
        let done = eventually(.seconds(30)) {
            promoted = try? ferry(["promote", "vm1"], sites.west)
            return promoted?.status == 0
        }
        #expect(done && promoted?.stdout.contains("the consistent state before the unfinished catch-up") == true,
                "\(promoted?.stdout ?? "")\(promoted?.stderr ?? "")\n\(sites.west.log(tail: 20))")
        let read = try sites.qemuIO(["read -P 0x11 0 8M", "read -P 0 8M 56M"], uri: sites.west.unixURI("vm1"), readOnly: true, expect: nil)
        #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"),
                "west is not at the state before the catch-up: \(read.stdout)\(read.stderr)")
        #expect(vm1(sites.west)?.role == "primary")
    }

    @Test func drillCloneTakesWritesWhileTheReplicaStaysIdentical() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x11 0 4M"])
        sites.waitInSync()

        let onPrimary = try ferry(["drill", "vm1"], sites.east)
        #expect(onPrimary.status == 1 && onPrimary.stderr.contains("run the drill on a secondary"), "\(onPrimary.stderr)")
        let noHistory = try ferry(["drill", "vm1", "--at", "3"], sites.west)
        #expect(noHistory.status == 1 && noHistory.stderr.contains("keeps none"), "\(noHistory.stderr)")
        let notRunning = try ferry(["drill", "vm1", "--end"], sites.west)
        #expect(notRunning.status == 1 && notRunning.stderr.contains("no drill"), "\(notRunning.stderr)")

        let started = try ferry(["drill", "vm1"], sites.west)
        #expect(started.status == 0 && started.stdout.contains("vm1-drill"), "\(started.stdout)\(started.stderr)")
        let again = try ferry(["drill", "vm1"], sites.west)
        #expect(again.status == 1 && again.stderr.contains("already running"), "\(again.stderr)")
        let clone = sites.west.unixURI("vm1-drill")
        // The drill writes (unaligned, across granules); production writes on underneath.
        try sites.qemuIO(["write -P 0x77 1000 1M"], uri: clone)
        try sites.qemuIO(["write -P 0x22 0 4M", "write -P 0x44 8M 1M"])
        sites.waitInSync()
        let read = try sites.qemuIO(["read -P 0x11 0 1000", "read -P 0x77 1000 1M", "read -P 0x11 1049576 3144728", "read -P 0 4M 60M"],
                                    uri: clone, readOnly: true, expect: nil)
        #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"), "the clone is not the point plus its writes: \(read.stdout)\(read.stderr)")
        #expect(try sites.imagesIdentical(), "the replica differs from the primary while a drill runs")
        #expect(vm1(sites.west)?.drill?.export == "vm1-drill" && (vm1(sites.west)?.drill?.bytesWritten ?? 0) >= 1 << 20,
                "\(String(describing: vm1(sites.west)?.drill))")

        let ended = try ferry(["drill", "vm1", "--end"], sites.west)
        #expect(ended.status == 0 && ended.stdout.contains("ended"), "\(ended.stdout)\(ended.stderr)")
        #expect(vm1(sites.west)?.drill == nil)
        let gone = try sites.qemuIO(["read 0 4k"], uri: clone, readOnly: true, expect: nil)
        #expect(gone.status != 0, "the drill export still answers after --end")
        try sites.qemuIO(["write -P 0x55 0 1M"])
        sites.waitInSync()
        #expect(try sites.imagesIdentical())
    }
}
