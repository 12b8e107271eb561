import FerrySite
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Failover between real daemons (issue 10): promote after `kill -9` of the primary, fencing of
/// the old primary when it returns, demote and the copy back.
@Suite(.serialized)
struct FailoverTests {
    func vm1(_ site: TestSite) -> SiteStatus.Volume? {
        (try? site.status())?.volumes.first { $0.name == "vm1" }
    }

    /// Waits until the promoted west has east, demoted, connected, consistent and caught up.
    func waitEastInSyncFromWest(_ sites: ReplicationSites, sourceLocation: SourceLocation = #_sourceLocation) {
        let back = eventually(.seconds(120)) {
            guard let r = vm1(sites.west)?.replicas.first(where: { $0.peer == "east" }) else { return false }
            return r.connected && r.consistent && r.state == "in-sync" && r.lagBytes == 0
        }
        let detail = "east did not catch up from west: \(String(describing: vm1(sites.west)?.replicas))\nwest:\n"
            + "\(sites.west.log(tail: 20))\neast:\n\(sites.east.log(tail: 20))"
        #expect(back, "\(detail)", sourceLocation: sourceLocation)
    }

    /// Waits until `primary` streams to `peer` in sync, nothing left to send; `peer`'s entry there.
    func waitFollowing(_ peer: String, _ primary: TestSite, sourceLocation: SourceLocation = #_sourceLocation) -> SiteStatus.Replica? {
        var entry: SiteStatus.Replica?
        let ok = eventually(.seconds(120)) {
            entry = vm1(primary)?.replicas.first { $0.peer == peer }
            return entry.map { $0.connected && $0.consistent && $0.state == "in-sync" && $0.lagBytes == 0 } ?? false
        }
        #expect(ok, "\(peer) did not follow \(primary.name): \(String(describing: entry))\n\(primary.log(tail: 20))", sourceLocation: sourceLocation)
        return entry
    }

    /// Whether two sites' images of vm1 are byte for byte the same (`cmp`).
    func sameImages(_ a: TestSite, _ b: TestSite) throws -> Bool {
        try run("/usr/bin/cmp", [a.imagePath("vm1"), b.imagePath("vm1")], expect: nil).status == 0
    }

    /// Waits until a returning former primary has given way on its own: a secondary, following
    /// the promoted site (no `ferry demote` needed).
    func waitRejoined(_ site: TestSite, sourceLocation: SourceLocation = #_sourceLocation) {
        let rejoined = eventually(.seconds(60)) { vm1(site)?.role == "secondary" }
        #expect(rejoined, "the former primary did not rejoin as a secondary: \(String(describing: vm1(site)))\n\(site.log(tail: 30))",
                sourceLocation: sourceLocation)
        #expect(site.log().contains("gives way to"), "no log line says why it gave way", sourceLocation: sourceLocation)
    }

    /// `ferry` with the site's config; returns the result without failing on a non-zero exit.
    func ferry(_ args: [String], _ site: TestSite) throws -> RunResult {
        try run(try ferryBinary(), args + ["--config", site.configPath], expect: nil)
    }

    @Test func promoteAfterKill9OfTheSyncPrimaryServesEveryAcknowledgedWriteAndFencesTheOldPrimary() throws {
        let fio = try requireTool("fio", package: "fio")
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()

        // Bad input first: nothing may change.
        let unknown = try ferry(["promote", "nosuch"], sites.west)
        #expect(unknown.status == 1 && unknown.stderr.contains("no volume \"nosuch\""), "\(unknown.stderr)")
        let whilePrimaryUp = try ferry(["promote", "vm1"], sites.west)
        #expect(whilePrimaryUp.status == 1 && whilePrimaryUp.stderr.contains("east is reachable"), "\(whilePrimaryUp.stderr)")
        let alreadyPrimary = try ferry(["promote", "vm1"], sites.east)
        #expect(alreadyPrimary.status == 1 && alreadyPrimary.stderr.contains("already the primary"), "\(alreadyPrimary.stderr)")
        let demoteWithoutReplica = try ferry(["demote", "vm1"], sites.west)
        #expect(demoteWithoutReplica.status == 1 && demoteWithoutReplica.stderr.contains("already a secondary"), "\(demoteWithoutReplica.stderr)")
        #expect(vm1(sites.west)?.role == "secondary" && vm1(sites.west)?.epoch == 1)

        // Verified writes through east; east dies mid-run.
        let dir = sites.dir.path
        let writer = try startVerifiedWriter(fio, uri: sites.east.uri("vm1"), dir: dir)
        defer { if writer.isRunning { kill(writer.processIdentifier, SIGKILL); writer.waitUntilExit() } }
        let busy = eventually(.seconds(60)) { (sites.replica("west")?.bytesSent ?? 0) > 16 << 20 }
        #expect(busy, "fio did not get going: \(String(describing: sites.replica("west")))")
        sites.east.kill9()
        writer.waitUntilExit()
        #expect(FileManager.default.fileExists(atPath: dir + "/local-crash-0-verify.state"), "fio saved no verify state")

        // Promote west once it has noticed east is gone; time it until the export answers a write.
        var promoted: RunResult?
        var started = ContinuousClock.now
        let done = eventually(.seconds(30)) {
            started = ContinuousClock.now
            let r = try? ferry(["promote", "vm1"], sites.west)
            promoted = r
            return r?.status == 0
        }
        #expect(done, "promote failed: \(promoted?.stderr ?? "")\nwest log:\n\(sites.west.log(tail: 20))")
        try sites.qemuIO(["write -P 0x33 62M 4k"], uri: sites.west.uri("vm1"))
        let rto = ContinuousClock.now - started
        print("failover: `ferry promote` to the promoted export answering a write: \(rto)")
        // Epochs of a two-site volume: east's even, west's odd (never shared, P4).
        #expect(promoted?.stdout.contains("promoted vm1 on west: epoch 3") == true, "\(promoted?.stdout ?? "")")
        #expect(vm1(sites.west)?.role == "primary" && vm1(sites.west)?.epoch == 3, "\(String(describing: vm1(sites.west)))")
        #expect(vm1(sites.west)?.history?.map(\.epoch) == [1, 3], "west's history: \(String(describing: vm1(sites.west)?.history))")
        #expect(vm1(sites.west)?.roleNote?.contains("make west its primary") == true)

        // Every write fio was told about is served by west's export, read over NBD.
        let verify = try run("/bin/sh", ["-c", "cd '\(dir)' && exec '\(fio)' --name=crash --ioengine=nbd "
            + "--uri='\(sites.west.uri("vm1"))' --rw=randwrite --bs=4k --size=48m --verify=crc32c "
            + "--verify_only=1 --verify_state_load=1 --verify_fatal=1 --output=fio-verify.log"], expect: nil)
        let report = (try? String(contentsOfFile: "\(dir)/fio-verify.log", encoding: .utf8)) ?? ""
        #expect(verify.status == 0 && !report.contains("verify: bad"),
                "an acknowledged write is missing on the promoted west:\n\(report.suffix(2000))\n\(verify.output.suffix(1000))")
        // West takes writes now, and keeps its role across a restart.
        try sites.qemuIO(["write -P 0x5a 60M 64k"], uri: sites.west.unixURI("vm1"))
        sites.west.stop()
        try sites.west.start()
        #expect(vm1(sites.west)?.role == "primary" && vm1(sites.west)?.epoch == 3, "the promotion did not survive a restart")

        // Demote refuses while a client is connected (qemu-io holds the export for a while).
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: try requireTool("qemu-io", package: "qemu-utils"))
        holder.arguments = ["-f", "raw", "-r", "-c", "sleep 20000", sites.west.uri("vm1")]
        holder.standardOutput = FileHandle.nullDevice
        holder.standardError = FileHandle.nullDevice
        try holder.run()
        defer { if holder.isRunning { kill(holder.processIdentifier, SIGKILL); holder.waitUntilExit() } }
        #expect(eventually(.seconds(10)) { vm1(sites.west)?.clientsConnected == 1 }, "the holding client did not connect")
        let busyDemote = try ferry(["demote", "vm1"], sites.west)
        #expect(busyDemote.status == 1 && busyDemote.stderr.contains("1 NBD client is connected"), "\(busyDemote.stderr)")
        #expect(vm1(sites.west)?.role == "primary")
        kill(holder.processIdentifier, SIGKILL)
        holder.waitUntilExit()

        // The old primary comes back: the handshake finds its line of history replaced by west's;
        // it is fenced, takes no writes (P4), and rejoins as west's secondary on its own.
        try sites.east.start()
        let fenced = eventually(.seconds(60)) { sites.east.log().contains("vm1 fenced") }
        #expect(fenced, "east was not fenced:\n\(sites.east.log(tail: 30))")
        let write = try sites.qemuIO(["write -P 0x77 0 4k"], uri: sites.east.unixURI("vm1"), expect: nil)
        #expect(write.status != 0, "the fenced old primary took a write: \(write.output)")
        waitRejoined(sites.east)

        // It takes a copy from west and ends byte-identical to it.
        waitEastInSyncFromWest(sites)
        sites.west.stop()
        sites.east.stop()
        #expect(try sites.imagesIdentical(), "east's image differs from the promoted west's after failback")
    }

    /// P6: what the old primary wrote that its async replica never got is kept aside when it is
    /// demoted, byte for byte, before the promoted site's copy overwrites it; the listing names it.
    @Test func demotedPrimaryKeepsAsideWhatItsReplicaNeverGot() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: async }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x41 0 1M"])
        sites.waitInSync()
        // West goes away; east writes what west will never get, then dies.
        sites.west.stop()
        try sites.qemuIO(["write -P 0x42 8M 256k"])
        sites.east.kill9()

        try sites.west.start()
        let promoted = try ferry(["promote", "vm1"], sites.west)
        #expect(promoted.status == 0, "promote failed: \(promoted.stderr)\n\(sites.west.log(tail: 20))")
        try sites.qemuIO(["write -P 0x43 16M 64k"], uri: sites.west.unixURI("vm1"))

        try sites.east.start()
        waitRejoined(sites.east)
        #expect(sites.east.log().contains("kept aside"), "\(sites.east.log(tail: 20))")
        let listing = try ferry(["diverged", "vm1"], sites.east)
        #expect(listing.status == 0 && listing.stdout.contains(".img:"), "\(listing.stdout)\(listing.stderr)")

        // The kept-aside image holds east's 0x42 blocks at their own offsets.
        let dir = sites.east.dataDirectory + "/volumes/vm1.state/diverged"
        let json = try #require(try FileManager.default.contentsOfDirectory(atPath: dir).first { $0.hasSuffix(".json") })
        let meta = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/\(json)"))) as? [String: Any])
        let ranges = (meta["ranges"] as? [[String: Any]]) ?? []
        let covered = ranges.contains { r in
            let offset = (r["offset"] as? Int) ?? -1, length = (r["length"] as? Int) ?? 0
            return offset <= 8 << 20 && offset + length >= (8 << 20) + (256 << 10)
        }
        #expect(covered, "the kept-aside ranges do not cover east's unreplicated write: \(ranges)")
        let keptImage = try #require(meta["image"] as? String)
        let check = try run(try requireTool("qemu-io", package: "qemu-utils"),
                            ["-f", "raw", "-r", "-c", "read -P 0x42 8M 256k", keptImage], expect: nil)
        #expect(check.status == 0 && !check.output.contains("Pattern verification failed"), "kept-aside bytes differ: \(check.output)")

        // Then east takes west's copy: byte-identical to west (which never had 0x42).
        waitEastInSyncFromWest(sites)
        sites.west.stop()
        sites.east.stop()
        #expect(try sites.imagesIdentical(), "east differs from west after the copy back")
    }

    /// Failback (P6): the returning primary gets only what differs — what the promoted site wrote
    /// since the branch, and what it had itself written past it — not a full copy.
    @Test func failbackSendsOnlyWhatChanged() throws {
        // The hook records what it was given; `exit 3` makes it fail after that, which must be reported.
        let hookOut = TempDir()
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M",
                                         onPromote: "echo \"$FERRY_SITE $FERRY_VOLUME $FERRY_EPOCH $FERRY_NBD_URI\" > \(hookOut.path)/env; echo booting; exit 3")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        // 48 MiB both sites hold; the flush empties east's activity log. The second write is
        // flushed too: without a barrier after it, whether west counts it as possibly missing on
        // east depends on whether a periodic cut (every second) came before the kill, so the
        // failback would send one region more in some runs than in others.
        try sites.qemuIO(["write -P 0x61 0 48M", "flush"])
        try sites.qemuIO(["write -P 0x62 60M 64k", "flush"])
        sites.waitInSync()
        sites.east.kill9()
        var promoted: RunResult?
        #expect(eventually(.seconds(30)) { promoted = try? ferry(["promote", "vm1"], sites.west); return promoted?.status == 0 },
                "promote failed: \(promoted?.stderr ?? "")")
        #expect(promoted?.stdout.contains("on-promote hook started") == true, "\(promoted?.stdout ?? "")")
        let hookDone = eventually(.seconds(30)) { vm1(sites.west)?.onPromote?.hasPrefix("FAILED (exit 3)") == true }
        #expect(hookDone, "the failing hook was not reported: \(String(describing: vm1(sites.west)?.onPromote))")
        let env = (try? String(contentsOfFile: hookOut.path + "/env", encoding: .utf8)) ?? ""
        #expect(env.hasPrefix("west vm1 3 nbd"), "the hook's environment: \(env)")
        #expect(sites.west.log().contains("on-promote vm1: booting"), "the hook's output is not in the log")
        try sites.qemuIO(["write -P 0x63 40M 64k"], uri: sites.west.unixURI("vm1"))
        let sentBefore = vm1(sites.west)?.replicas.first { $0.peer == "east" }?.bytesSent ?? 0

        try sites.east.start()
        waitRejoined(sites.east)
        waitEastInSyncFromWest(sites)
        let sent = (vm1(sites.west)?.replicas.first { $0.peer == "east" }?.bytesSent ?? 0) - sentBefore
        let dir = sites.east.dataDirectory + "/volumes/vm1.state/diverged"
        // (Nothing is kept aside when east's last writes were all flushed to west before it died.)
        let json = (try? FileManager.default.contentsOfDirectory(atPath: dir))?.first { $0.hasSuffix(".json") }
        let meta = try json.flatMap { try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/\($0)"))) as? [String: Any] }
        let kept = UInt64((meta?["bytes"] as? Int) ?? 0)
        let changed = kept + (64 << 10)
        print("failback: \(sent) bytes sent to the returning east for \(kept) bytes it kept aside + 65536 written on west "
              + "(\(String(format: "%.3f", Double(sent) / Double(changed)))x); a full copy would send 48 MiB or more")
        #expect(sent > 0 && Double(sent) <= 1.1 * Double(changed), "failback sent \(sent) bytes for \(changed) changed")
        #expect(sent < 16 << 20, "failback sent \(sent) bytes: a full copy, not the changed regions")
        sites.west.stop()
        sites.east.stop()
        #expect(try sites.imagesIdentical(), "east differs from west after failback")
    }

    /// The disaster took the replica's daemon down too (a reboot) before it was promoted: which
    /// primary it followed is on disk (`followed.primary`), so the failback is no full copy.
    @Test func failbackAfterTheReplicaRestartedIsNoFullCopy() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x61 0 48M", "flush"])
        sites.waitInSync()
        sites.east.kill9()
        sites.west.stop()
        try sites.west.start()
        #expect(vm1(sites.west)?.primarySite == "east")
        var promoted: RunResult?
        #expect(eventually(.seconds(30)) { promoted = try? ferry(["promote", "vm1"], sites.west); return promoted?.status == 0 },
                "promote failed: \(promoted?.stderr ?? "")")
        #expect(promoted?.stdout.contains("east, once demoted, gets only what differs") == true, "\(promoted?.stdout ?? "")")
        try sites.qemuIO(["write -P 0x63 40M 64k"], uri: sites.west.unixURI("vm1"))
        try sites.east.start()
        waitRejoined(sites.east)
        waitEastInSyncFromWest(sites)
        let sent = vm1(sites.west)?.replicas.first { $0.peer == "east" }?.bytesSent ?? 0
        #expect(sent > 0 && sent < 16 << 20, "failback after a restart sent \(sent) bytes: a full copy would send 48 MiB or more")
    }

    /// A planned move with both sites up: demote east, promote west (not refused: east no longer
    /// streams), east catches up by regions; then back the same way. Nothing written is lost.
    @Test func plannedMoveThereAndBackLosesNothing() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x71 0 8M"])
        sites.waitInSync()

        let down = try ferry(["demote", "vm1"], sites.east)
        #expect(down.status == 0, "\(down.stderr)")
        var up: RunResult?
        #expect(eventually(.seconds(30)) { up = try? ferry(["promote", "vm1"], sites.west); return up?.status == 0 },
                "west was not promoted after east's demote: \(up?.stderr ?? "")")
        try sites.qemuIO(["write -P 0x72 8M 1M"], uri: sites.west.unixURI("vm1"))
        waitEastInSyncFromWest(sites)
        let sent = vm1(sites.west)?.replicas.first { $0.peer == "east" }?.bytesSent ?? 0
        #expect(sent <= 2 << 20, "the move sent \(sent) bytes to east, more than what changed (1 MiB)")

        // And back: east is consistent and west no longer streams once demoted.
        let down2 = try ferry(["demote", "vm1"], sites.west)
        #expect(down2.status == 0, "\(down2.stderr)")
        var up2: RunResult?
        #expect(eventually(.seconds(30)) { up2 = try? ferry(["promote", "vm1"], sites.east); return up2?.status == 0 },
                "east was not promoted back: \(up2?.stderr ?? "")")
        #expect(vm1(sites.east)?.role == "primary" && vm1(sites.east)?.epoch == 4, "\(String(describing: vm1(sites.east)))")
        let read = try sites.qemuIO(["read -P 0x71 0 8M", "read -P 0x72 8M 1M"], expect: nil)
        #expect(read.status == 0 && !read.output.contains("Pattern verification failed"), "a write was lost in the moves: \(read.output)")
        let back = eventually(.seconds(120)) {
            guard let r = vm1(sites.east)?.replicas.first(where: { $0.peer == "west" }) else { return false }
            return r.connected && r.consistent && r.state == "in-sync"
        }
        #expect(back, "west did not catch up from east: \(String(describing: vm1(sites.east)?.replicas))")
        sites.west.stop()
        sites.east.stop()
        #expect(try sites.imagesIdentical())
    }

    /// `ferry demote` undone: the same site is promoted again, without --force (the demote of an
    /// idle volume leaves its image consistent), and its replicas are sent only what changed,
    /// not a full copy.
    @Test func aDemoteIsUndoneByPromotingTheSameSiteAgain() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }", "far": "{ mode: async }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        // The client's flush empties the activity log once both replicas hold the writes.
        try sites.qemuIO(["write -P 0x81 0 16M", "flush"])
        sites.waitInSync()

        let down = try ferry(["demote", "vm1"], sites.east)
        #expect(down.status == 0 && down.stdout.contains("to undo: `ferry promote vm1` here, while no other site has been promoted"),
                "\(down.stdout)\(down.stderr)")
        // East, the configured primary, does not name itself (or a guess) as its primary.
        let text = try ferry(["status"], sites.east).stdout
        #expect(text.contains("secondary  no primary known yet") && !text.contains("primary is east"), "\(text)")
        let status = vm1(sites.east)
        #expect(status?.role == "secondary" && status?.replicaState?.consistent == true, "\(String(describing: status))")
        let up = try ferry(["promote", "vm1"], sites.east)
        #expect(up.status == 0 && up.stdout.contains("far and west get only what they lacked when this site was demoted"),
                "\(up.stdout)\(up.stderr)")
        try sites.qemuIO(["write -P 0x82 16M 1M"])
        sites.waitInSync()
        for peer in ["west", "far"] {
            let sent = vm1(sites.east)?.replicas.first { $0.peer == peer }?.bytesSent ?? 0
            #expect(sent >= 1 << 20 && sent <= 2 << 20, "\(peer) was sent \(sent) bytes after the demote was undone: 1 MiB changed, a full copy is 17 MiB")
        }
        let read = try sites.qemuIO(["read -P 0x81 0 16M", "read -P 0x82 16M 1M"], expect: nil)
        #expect(read.status == 0 && !read.output.contains("Pattern verification failed"), "\(read.output)")
        let far = eventually(.seconds(60)) { (try? sites.imagesIdentical("far")) == true }
        let west = try sites.imagesIdentical("west")
        #expect(far && west, "a replica differs from east")
    }

    /// A third site after a move: far (async) followed east; after the switchover to west it is
    /// sent what changed since the state it holds (here: what west wrote since), not a full copy.
    @Test func aSwitchoverSendsTheThirdSiteOnlyWhatChanged() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }", "far": "{ mode: async }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x91 0 16M", "flush"])
        sites.waitInSync()
        let moved = try ferry(["switchover", "vm1", "--to", "west"], sites.east)
        #expect(moved.status == 0, "switchover failed: \(moved.stdout)\(moved.stderr)")
        #expect(sites.west.log().contains("far gets what changed since the state it holds"), "\(sites.west.log(tail: 10))")
        try sites.qemuIO(["write -P 0x92 16M 1M", "flush"], uri: sites.west.unixURI("vm1"))
        let far = waitFollowing("far", sites.west)
        let sent = far?.bytesSent ?? 0
        print("third site after a switchover: \(sent) bytes sent to far for 1 MiB written on west; a full copy is 17 MiB or more")
        #expect(sent >= 1 << 20 && sent < 4 << 20, "far was sent \(sent) bytes: 1 MiB changed, a full copy is 17 MiB or more")
        #expect(try sameImages(sites.west, sites.sites["far"]!), "far differs from west")
    }

    /// A switchover while a scheduled point is on its way to the third site (walk-through of
    /// 2026-12-07: far got a full copy, 176 MiB instead of ~69). Far is frozen while east sends
    /// its second point, east hands over to west, far runs again: the unfinished point never
    /// reached far's image, which is still at the first point, and west sends what changed since.
    @Test func aSwitchoverMidPointSendsTheScheduledSiteOnlyWhatChanged() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }", "far": "{ mode: scheduled, every: 1d }"], size: "64M")
        try sites.startAll()
        defer {
            sites.sites["far"]?.resume()
            sites.stopAll()
        }
        sites.waitInSync()
        let farSite = sites.sites["far"]!
        try sites.qemuIO(["write -P 0xd1 0 16M", "flush"])
        _ = try ferry(["checkpoint", "vm1"], sites.east)
        let first = eventually(.seconds(60)) { sites.replica("far")?.lastPoint != nil && sites.replica("far")?.state == "waiting" }
        #expect(first, "the first point did not complete: \(String(describing: sites.replica("far")))")
        try sites.qemuIO(["write -P 0xd2 16M 16M", "flush"])
        farSite.pause()
        _ = try ferry(["checkpoint", "vm1"], sites.east)
        let sending = eventually(.seconds(30)) { (sites.replica("far")?.inFlightBytes ?? 0) > 0 }
        #expect(sending, "the second point is not on its way: \(String(describing: sites.replica("far")))")
        let moved = try ferry(["switchover", "vm1", "--to", "west"], sites.east)
        #expect(moved.status == 0, "switchover failed: \(moved.stdout)\(moved.stderr)")
        farSite.resume()
        try sites.qemuIO(["write -P 0xd3 40M 1M", "flush"], uri: sites.west.unixURI("vm1"))
        // West holds what far lacks for its next point; a checkpoint there sends it now.
        var entry: SiteStatus.Replica?
        let marked = eventually(.seconds(60)) {
            entry = vm1(sites.west)?.replicas.first { $0.peer == "far" }
            return entry.map { $0.connected && $0.state == "waiting" && $0.dirtyBytes > 0 } ?? false
        }
        #expect(marked, "west does not hold far's changes for its next point: \(String(describing: entry))")
        let rawSeconds = (entry?.reason ?? "").split(whereSeparator: { !$0.isNumber }).contains { $0.count >= 10 }
        #expect(!rawSeconds, "times in status reasons are ISO 8601, not raw seconds: \(entry?.reason ?? "")")
        let pointed = try ferry(["checkpoint", "vm1"], sites.west)
        #expect(pointed.status == 0, "checkpoint on west failed: \(pointed.stdout)\(pointed.stderr)")
        let done = eventually(.seconds(120)) {
            entry = vm1(sites.west)?.replicas.first { $0.peer == "far" }
            return entry.map { $0.connected && $0.state == "waiting" && $0.lastPoint != nil && $0.dirtyBytes == 0 } ?? false
        }
        #expect(done, "far did not get west's point: \(String(describing: entry))\n\(sites.west.log(tail: 20))")
        let sent = entry?.bytesSent ?? 0
        print("scheduled third site after a switchover mid-point: \(sent) bytes sent to far for 17 MiB changed since its point; a full copy is 33 MiB")
        #expect(sent >= 17 << 20 && sent < 26 << 20, "far was sent \(sent) bytes: 17 MiB changed since its point, a full copy is 33 MiB")
        #expect(!farSite.log().contains("does not accept"), "\(farSite.log(tail: 20))")
        #expect(!sites.east.log().contains("does not accept"), "\(sites.east.log(tail: 20))")
        #expect(try sameImages(sites.west, farSite), "far differs from west")
    }

    /// Moves back and forth (walk-through of 2026-12-08): a site that stepped down and is
    /// promoted again in the same process still knows what it wrote where, and the scheduled
    /// far, which took a point from the other site meanwhile, can date it: far gets what changed
    /// at each move, never a full copy.
    @Test func movesBackAndForthSendTheScheduledSiteOnlyWhatChanged() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }", "far": "{ mode: scheduled, every: 1d }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        func pointOnFar(from primary: TestSite, sourceLocation: SourceLocation = #_sourceLocation) -> SiteStatus.Replica? {
            var entry: SiteStatus.Replica?
            let before = vm1(primary)?.replicas.first { $0.peer == "far" }?.lastPoint?.sequence
            let pointed = try? ferry(["checkpoint", "vm1"], primary)
            #expect(pointed?.status == 0, "checkpoint on \(primary.name): \(pointed?.stdout ?? "")\(pointed?.stderr ?? "")",
                    sourceLocation: sourceLocation)
            let done = eventually(.seconds(120)) {
                entry = vm1(primary)?.replicas.first { $0.peer == "far" }
                return entry.map { $0.connected && $0.state == "waiting" && $0.lastPoint?.sequence != before && $0.dirtyBytes == 0 } ?? false
            }
            #expect(done, "far did not get \(primary.name)'s point: \(String(describing: entry))\n\(primary.log(tail: 20))",
                    sourceLocation: sourceLocation)
            return entry
        }
        try sites.qemuIO(["write -P 0xe1 0 16M", "flush"])
        _ = pointOnFar(from: sites.east)
        // There and straight back, nothing written on west: east stepped down and is promoted
        // again with no barrier from west between (it knows its image from when it stepped down).
        for (from, to) in [(sites.east, sites.west), (sites.west, sites.east)] {
            // As an operator would: again if the site taking over is not reported in sync yet.
            var moved: RunResult?
            let ok = eventually(.seconds(30)) { moved = try? ferry(["switchover", "vm1", "--to", to.name], from); return moved?.status == 0 }
            #expect(ok, "switchover to \(to.name) failed: \(moved?.stdout ?? "")\(moved?.stderr ?? "")")
        }
        try sites.qemuIO(["write -P 0xe3 44M 1M", "flush"])
        let back = pointOnFar(from: sites.east)?.lastPoint?.bytes ?? 0
        #expect(back >= 1 << 20 && back <= 4 << 20, "far's point after moving there and back was \(back) bytes: 1 MiB changed")
        for (from, to, offset) in [(sites.east, sites.west, 20), (sites.west, sites.east, 28), (sites.east, sites.west, 36)] {
            let moved = try ferry(["switchover", "vm1", "--to", to.name], from)
            #expect(moved.status == 0, "switchover to \(to.name) failed: \(moved.stdout)\(moved.stderr)")
            try sites.qemuIO(["write -P 0xe2 \(offset)M 1M", "flush"], uri: to.unixURI("vm1"))
            let entry = pointOnFar(from: to)
            let bytes = entry?.lastPoint?.bytes ?? 0
            print("scheduled third site, point from \(to.name) after a switchover: \(bytes) bytes for 1 MiB written; a full copy is 17 MiB or more")
            #expect(bytes >= 1 << 20 && bytes <= 4 << 20, "far's point from \(to.name) was \(bytes) bytes: 1 MiB changed (one 4 MiB granule at most)")
        }
        #expect(try sameImages(sites.west, sites.sites["far"]!), "far differs from west")
    }

    /// A third site after a failover: east is killed, the async far is promoted, and west (the
    /// sync replica, which held at least as much as far) is sent what differs, not a full copy.
    @Test func aFailoverToTheAsyncSiteSendsTheSyncSiteOnlyWhatChanged() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }", "far": "{ mode: async }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0xa1 0 16M", "flush"])
        sites.waitInSync()
        sites.east.kill9()
        let farSite = sites.sites["far"]!
        var promoted: RunResult?
        #expect(eventually(.seconds(30)) { promoted = try? ferry(["promote", "vm1"], farSite); return promoted?.status == 0 },
                "promote failed: \(promoted?.stderr ?? "")")
        #expect(promoted?.stdout.contains("west gets what changed since the state it holds") == true, "\(promoted?.stdout ?? "")")
        try sites.qemuIO(["write -P 0xa2 20M 1M", "flush"], uri: farSite.unixURI("vm1"))
        let west = waitFollowing("west", farSite)
        let sent = west?.bytesSent ?? 0
        print("third site after a failover: \(sent) bytes sent to west for 1 MiB written on far; a full copy is 17 MiB or more")
        #expect(sent >= 1 << 20 && sent < 4 << 20, "west was sent \(sent) bytes: 1 MiB changed, a full copy is 17 MiB or more")
        #expect(try sameImages(farSite, sites.west), "west differs from far")
    }

    /// A third site that was restarted cleanly (its daemon stopped and started while the primary
    /// was away) still knows what it holds: after the failover it gets what changed, not a full copy.
    @Test func aThirdSiteRestartedCleanlyStillGetsOnlyWhatChanged() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }", "far": "{ mode: async }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0xc1 0 16M", "flush"])
        sites.waitInSync()
        let farSite = sites.sites["far"]!
        _ = farSite.stop()
        try sites.qemuIO(["write -P 0xc2 20M 4M", "flush"])   // west has it, far does not
        sites.east.kill9()
        try farSite.start()   // no barrier reaches it from here on: east is gone
        var promoted: RunResult?
        #expect(eventually(.seconds(30)) { promoted = try? ferry(["promote", "vm1"], sites.west); return promoted?.status == 0 },
                "promote failed: \(promoted?.stderr ?? "")")
        try sites.qemuIO(["write -P 0xc3 24M 4M", "flush"], uri: sites.west.unixURI("vm1"))
        let far = waitFollowing("far", sites.west)
        let sent = far?.bytesSent ?? 0
        print("third site restarted cleanly, after a failover: \(sent) bytes sent to far for 8 MiB changed; a full copy is 24 MiB")
        #expect(sent >= 8 << 20 && sent < 12 << 20, "far was sent \(sent) bytes: 8 MiB changed, a full copy is 24 MiB")
        #expect(try sameImages(sites.west, farSite), "far differs from west")
    }

    /// Promoting a site that is behind: west (async) was stopped while far (sync) acknowledged
    /// newer writes; east dies; west is promoted. Far keeps those writes aside (P6) before west's
    /// catch-up overwrites them, then follows west.
    @Test func aThirdSiteAheadOfThePromotedSiteKeepsItsNewerWritesAside() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: async }", "far": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0xb1 0 16M", "flush"])
        sites.waitInSync()
        _ = sites.west.stop()
        try sites.qemuIO(["write -P 0xb2 8M 4M", "flush"])   // far acknowledges it; west never gets it
        sites.east.kill9()
        try sites.west.start()
        var promoted: RunResult?
        #expect(eventually(.seconds(30)) { promoted = try? ferry(["promote", "vm1"], sites.west); return promoted?.status == 0 },
                "promote failed: \(promoted?.stderr ?? "")")
        let farSite = sites.sites["far"]!
        _ = waitFollowing("far", sites.west)
        #expect(farSite.log().contains("before a catch-up overwrites them"), "\(farSite.log(tail: 20))")
        let listed = try ferry(["diverged", "vm1"], farSite)
        let image = listed.stdout.split(separator: "\n").first { $0.contains(".img:") }.map { String($0.prefix { $0 != ":" }) }
        #expect(image != nil, "ferry diverged lists nothing on far: \(listed.stdout)\(listed.stderr)")
        if let image {
            let kept = try sites.qemuIO(["read -P 0xb2 8M 4M"], uri: image, readOnly: true, expect: nil)
            #expect(kept.status == 0 && !kept.output.contains("Pattern verification failed"), "far's newer writes are not in \(image): \(kept.output)")
        }
        #expect(try sameImages(sites.west, farSite), "far differs from west")
    }

    /// Planned switchover under a running fio verify workload, there and back: every write fio
    /// was told about is on the new primary's export; each step is printed; bad input changes nothing.
    @Test func switchoverThereAndBackUnderAWorkloadLosesNothing() throws {
        let fio = try requireTool("fio", package: "fio")
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()

        let onSecondary = try ferry(["switchover", "vm1", "--to", "east"], sites.west)
        #expect(onSecondary.status == 1 && onSecondary.stderr.contains("not the primary"), "\(onSecondary.stderr)")
        let nobody = try ferry(["switchover", "vm1", "--to", "nosuch"], sites.east)
        #expect(nobody.status == 1 && nobody.stderr.contains("not a replica of vm1"), "\(nobody.stderr)")
        #expect(vm1(sites.east)?.role == "primary" && vm1(sites.west)?.role == "secondary")

        /// fio writes through `from`'s export while `from` hands the volume to `to`; then fio
        /// verifies every write it was told about on `to`'s export.
        func move(from: TestSite, to: TestSite, toName: String, epoch: Int64, leg: String) throws {
            let dir = sites.dir.path + "/" + leg
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let writer = try startVerifiedWriter(fio, uri: from.uri("vm1"), dir: dir)
            defer { if writer.isRunning { kill(writer.processIdentifier, SIGKILL); writer.waitUntilExit() } }
            #expect(eventually(.seconds(30)) { vm1(from)?.clientsConnected == 1 }, "fio did not connect")
            let before = vm1(from)?.replicas.first?.bytesSent ?? 0
            #expect(eventually(.seconds(60)) { (vm1(from)?.replicas.first?.bytesSent ?? 0) > before + (8 << 20) }, "fio did not get going")
            let moved = try ferry(["switchover", "vm1", "--to", toName], from)
            #expect(moved.status == 0, "switchover failed: \(moved.stdout)\(moved.stderr)\n\(from.log(tail: 20))\n\(to.log(tail: 20))")
            for step in ["drained vm1", "holds every write through sequence", "demoted vm1", "is the primary of vm1 at epoch \(epoch)", "no write lost"] {
                #expect(moved.stdout.contains(step), "step not shown: \(step)\n\(moved.stdout)")
            }
            print("switchover \(leg):\n\(moved.stdout)")
            writer.waitUntilExit()
            #expect(vm1(to)?.role == "primary" && vm1(to)?.epoch == epoch, "\(String(describing: vm1(to)))")
            #expect(vm1(from)?.role == "secondary")
            let verify = try run("/bin/sh", ["-c", "cd '\(dir)' && exec '\(fio)' --name=crash --ioengine=nbd "
                + "--uri='\(to.uri("vm1"))' --rw=randwrite --bs=4k --size=48m --verify=crc32c "
                + "--verify_only=1 --verify_state_load=1 --verify_fatal=1 --output=fio-verify.log"], expect: nil)
            let report = (try? String(contentsOfFile: "\(dir)/fio-verify.log", encoding: .utf8)) ?? ""
            #expect(verify.status == 0 && !report.contains("verify: bad"),
                    "a write fio was told about is missing after the switchover:\n\(report.suffix(2000))\n\(verify.output.suffix(1000))")
            // Nothing was kept aside: the new primary had everything.
            #expect(!from.log().contains("kept aside"), "the switchover kept blocks aside: \(from.log(tail: 20))")
        }
        try move(from: sites.east, to: sites.west, toName: "west", epoch: 3, leg: "there")
        try move(from: sites.west, to: sites.east, toName: "east", epoch: 4, leg: "back")
        let back = eventually(.seconds(120)) {
            guard let r = vm1(sites.east)?.replicas.first(where: { $0.peer == "west" }) else { return false }
            return r.connected && r.consistent && r.state == "in-sync"
        }
        #expect(back, "west did not follow east again: \(String(describing: vm1(sites.east)?.replicas))")
        sites.west.stop()
        sites.east.stop()
        #expect(try sites.imagesIdentical(), "the sites differ after switching over there and back")
    }

    /// Online verify: identical copies say so; blocks changed behind Ferry's back on the replica
    /// are reported exactly (to 4 KiB), `--repair` sends them again, and then the copies match.
    @Test func verifyFindsExactlyWhatDiffersAndRepairsIt() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x21 0 16M", "write -P 0x22 40M 1M", "flush"])
        sites.waitInSync()
        let same = try ferry(["verify", "vm1", "--peer", "west"], sites.east)
        #expect(same.status == 0 && same.stdout.contains("identical"), "\(same.stdout)\(same.stderr)")
        print(same.stdout)

        let onSecondary = try ferry(["verify", "vm1", "--peer", "east"], sites.west)
        #expect(onSecondary.status == 1 && onSecondary.stderr.contains("not the primary"), "\(onSecondary.stderr)")
        let nobody = try ferry(["verify", "vm1", "--peer", "nosuch"], sites.east)
        #expect(nobody.status == 1 && nobody.stderr.contains("not a replica of vm1"), "\(nobody.stderr)")

        // Damage west's copy while it is stopped: 4 KiB inside the written data, 8 KiB in a hole.
        sites.west.stop()
        let file = try FileHandle(forWritingTo: URL(fileURLWithPath: sites.west.dataDirectory + "/volumes/vm1.img"))
        try file.seek(toOffset: (5 << 20) + (12 << 10))
        try file.write(contentsOf: Data(repeating: 0xEE, count: 4096))
        try file.seek(toOffset: 50 << 20)
        try file.write(contentsOf: Data(repeating: 0xEF, count: 8192))
        try file.close()
        try sites.west.start()
        sites.waitInSync()

        let found = try ferry(["verify", "vm1", "--peer", "west"], sites.east)
        #expect(found.status == 0 && found.stdout.contains("2 ranges differ (12K)"), "\(found.stdout)\(found.stderr)")
        #expect(found.stdout.contains("offset \((5 << 20) + (12 << 10)) length 4096") && found.stdout.contains("offset \(50 << 20) length 8192"),
                "the ranges are not exact: \(found.stdout)")
        let repaired = try ferry(["verify", "vm1", "--peer", "west", "--repair"], sites.east)
        #expect(repaired.status == 0 && repaired.stdout.contains("repairing"), "\(repaired.stdout)\(repaired.stderr)")
        sites.waitInSync()
        var again: RunResult?
        let fixed = eventually(.seconds(60)) {
            again = try? ferry(["verify", "vm1", "--peer", "west"], sites.east)
            return again?.stdout.contains("identical") == true
        }
        #expect(fixed, "still different after the repair: \(again?.stdout ?? "")\(again?.stderr ?? "")")
        sites.west.stop()
        sites.east.stop()
        #expect(try sites.imagesIdentical())
    }

    /// A split brain made on purpose (P6): east, back alone after west was promoted, is demoted
    /// and promoted itself; both take writes. When they meet, both say split brain and nothing
    /// moves; a wrong `--keep` changes nothing; `ferry resolve --keep west` on west makes east
    /// give way when next connected, keeping aside what it wrote (listed, readable), and east
    /// ends byte-identical to west.
    @Test func splitBrainIsDetectedAndWaitsForResolve() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: sync }"], size: "64M")
        try sites.startAll()
        defer { sites.stopAll() }
        sites.waitInSync()
        try sites.qemuIO(["write -P 0x50 0 4M", "flush"])
        sites.waitInSync()
        sites.east.kill9()
        var promoted: RunResult?
        #expect(eventually(.seconds(30)) { promoted = try? ferry(["promote", "vm1"], sites.west); return promoted?.status == 0 },
                "promote failed: \(promoted?.stderr ?? "")")
        try sites.qemuIO(["write -P 0x51 4M 64k"], uri: sites.west.unixURI("vm1"))
        sites.west.stop()

        // East, alone, is made a primary again by hand: a second line of history from epoch 1.
        try sites.east.start()
        let down = try ferry(["demote", "vm1"], sites.east)
        #expect(down.status == 0, "\(down.stderr)")
        let up = try ferry(["promote", "vm1", "--force"], sites.east)
        #expect(up.status == 0, "\(up.stderr)")
        try sites.qemuIO(["write -P 0x52 8M 64k"], uri: sites.east.unixURI("vm1"))

        try sites.west.start()
        func state(_ site: TestSite, _ peer: String) -> String? { vm1(site)?.replicas.first { $0.peer == peer }?.state }
        let detected = eventually(.seconds(60)) { state(sites.east, "west") == "split-brain" && state(sites.west, "east") == "split-brain" }
        let why = "split brain not reported: east→west \(state(sites.east, "west") ?? "-"), west→east \(state(sites.west, "east") ?? "-")\n"
            + "east:\n\(sites.east.log(tail: 15))\nwest:\n\(sites.west.log(tail: 15))"
        #expect(detected, "\(why)")
        let reason = vm1(sites.west)?.replicas.first { $0.peer == "east" }?.reason ?? ""
        #expect(reason.contains("ferry resolve vm1 --keep"), "the status does not say what to do: \(reason)")
        #expect(vm1(sites.east)?.role == "primary" && vm1(sites.west)?.role == "primary", "a site gave way on its own")
        let eastSent = vm1(sites.east)?.replicas.first { $0.peer == "west" }?.bytesSent ?? 0
        let westSent = vm1(sites.west)?.replicas.first { $0.peer == "east" }?.bytesSent ?? 0
        #expect(eastSent == 0 && westSent == 0, "data moved during a split brain: east sent \(eastSent), west \(westSent)")

        // Bad input changes nothing.
        let wrongSite = try ferry(["resolve", "vm1", "--keep", "nosuch"], sites.west)
        #expect(wrongSite.status == 1 && wrongSite.stderr.contains("not a site of vm1"), "\(wrongSite.stderr)")
        let unknown = try ferry(["resolve", "nosuch", "--keep", "west"], sites.west)
        #expect(unknown.status == 1 && unknown.stderr.contains("no volume"), "\(unknown.stderr)")
        #expect(state(sites.west, "east") == "split-brain")

        // Keep west: east gives way when next connected, and keeps aside what it wrote.
        let resolved = try ferry(["resolve", "vm1", "--keep", "west"], sites.west)
        #expect(resolved.status == 0 && resolved.stdout.contains("east gives way"), "\(resolved.stdout)\(resolved.stderr)")
        waitRejoined(sites.east)
        let listing = try ferry(["diverged", "vm1"], sites.east)
        #expect(listing.status == 0 && listing.stdout.contains(".img:"), "\(listing.stdout)\(listing.stderr)")
        let dir = sites.east.dataDirectory + "/volumes/vm1.state/diverged"
        let kept = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".img") }.sorted()
        let newest = try #require(kept.last)
        let check = try run(try requireTool("qemu-io", package: "qemu-utils"),
                            ["-f", "raw", "-r", "-c", "read -P 0x52 8M 64k", "\(dir)/\(newest)"], expect: nil)
        #expect(check.status == 0 && !check.output.contains("Pattern verification failed"), "east's split-brain writes were not kept: \(check.output)")
        waitEastInSyncFromWest(sites)
        let read = try sites.qemuIO(["read -P 0x51 4M 64k", "read -P 0x50 0 4M"], uri: sites.west.unixURI("vm1"), expect: nil)
        #expect(read.status == 0 && !read.output.contains("Pattern verification failed"), "west lost a write: \(read.output)")
        sites.west.stop()
        sites.east.stop()
        #expect(try sites.imagesIdentical(), "east differs from west after the split brain was resolved")
    }

    /// A replica in the middle of its initial sync is not promoted (it holds a state no site
    /// ever had), and nothing changes.
    @Test func promoteRefusesAnInconsistentReplica() throws {
        let sites = try ReplicationSites(replicas: ["west": "{ mode: async, resync-rate: 2M }"], size: "64M")
        try sites.east.start()
        defer { sites.stopAll() }
        try sites.qemuIO(["write -P 0x11 0 32M"])
        try sites.west.start()
        let syncing = eventually(.seconds(30)) {
            guard let r = vm1(sites.west)?.replicaState else { return false }
            return r.bytesReceived > 0 && !r.consistent
        }
        #expect(syncing, "west's initial sync did not start: \(String(describing: vm1(sites.west)))")
        #expect(vm1(sites.west)?.replicaState?.streamingFrom == "east")
        sites.east.kill9()
        // With the primary gone, status says no stream is open (and asks why).
        let noStream = eventually(.seconds(30)) { vm1(sites.west)?.replicaState.map { $0.streamingFrom == nil } == true }
        #expect(noStream, "\(String(describing: vm1(sites.west)?.replicaState))")
        let refused = try ferry(["promote", "vm1"], sites.west)
        #expect(refused.status == 1 && refused.stderr.contains("not consistent") && refused.stderr.contains("--force"),
                "\(refused.stdout)\(refused.stderr)")
        #expect(vm1(sites.west)?.role == "secondary" && vm1(sites.west)?.epoch == 1, "a refused promote changed something")
        // --force promotes it as it is, and says so.
        let forced = try ferry(["promote", "vm1", "--force"], sites.west)
        #expect(forced.status == 0 && forced.stdout.contains("forced: the image was not consistent"), "\(forced.stdout)\(forced.stderr)")
        #expect(vm1(sites.west)?.role == "primary" && vm1(sites.west)?.epoch == 3)
    }
}
