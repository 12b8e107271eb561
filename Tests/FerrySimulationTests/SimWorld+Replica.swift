@testable import FerryCore

/// A replica's files: its persisted position and its receive log.
extension SimWorld {
    /// Records a replica's position (a newer version wins); a consistent one ends a catch-up's
    /// undo base, as ``ReplicaVolumeRuntime`` does.
    func storePosition(_ s: SimSite, _ position: ReplicaPosition, version: UInt64) {
        guard version > s.store.positionVersion else { return }
        s.store.persist(storedAndRead(position), version: version)
        if position.consistent {
            s.undoBase = nil
            s.catchUpFromConsistent = false
        }
    }
}

struct ReplicaStore {
    enum LogRecord {
        case item(ReplicationItem, [UInt64])
        case barrier(ReplicationBarrier)
    }

    var position = ReplicaPosition.empty
    var positionVersion: UInt64 = 0
    var nextVersion: UInt64 = 1
    var log: [LogRecord] = []
    var durableLogCount = 0
    /// Log records handed to applyLog (kept until the apply completes).
    var applyIssuedCount = 0
    var appliedPending: [Int] = []
    /// Direct items held by a planted bug, by index (their payload).
    var heldPayloads: [UInt64: [UInt64]] = [:]
    var lastSyncAt: Int64 = 0

    mutating func persist(_ p: ReplicaPosition, version: UInt64) {
        if version > positionVersion {
            position = p
            positionVersion = version
        }
    }

    mutating func markLogDurable() { durableLogCount = log.count }

    /// The applied group is durable: drop its records.
    mutating func dropAppliedLog() {
        guard let count = appliedPending.first else { return }
        appliedPending.removeFirst()
        log.removeFirst(count)
        durableLogCount = max(0, durableLogCount - count)
        applyIssuedCount -= count
    }

    /// Records up to the last untaken barrier with `index` (after a restart the log may hold
    /// groups of several links, whose indexes repeat; recovery applies through the last).
    func groupEnd(through index: UInt64) -> Int? {
        for i in (applyIssuedCount..<log.count).reversed() {
            if case .barrier(let b) = log[i], b.index == index { return i + 1 }
        }
        return nil
    }
}

/// The connection between two sites (whichever roles they have).
struct LinkInfo {
    var id: LinkID
    var up: Bool
    /// Per receiving site: when the last message to it arrives (TCP keeps order).
    var lastDelivery: [String: Int64] = [:]
}

extension SimWorld {
    // MARK: - Network

    func key(_ a: String, _ b: String) -> String { a < b ? "\(a)|\(b)" : "\(b)|\(a)" }

    func pairs() -> [(String, String)] {
        var out: [(String, String)] = []
        for (i, a) in siteNames.enumerated() { for b in siteNames[(i + 1)...] { out.append((a, b)) } }
        return out
    }

    /// The other end of `link` from `name`.
    func peer(of name: String, on link: LinkID) -> String? {
        guard let (a, b) = linkEnds[link] else { return nil }
        return a == name ? b : a
    }

    func connect(_ a: String, _ b: String) {
        guard site(a).running, site(b).running else { return }
        let k = key(a, b)
        if let link = links[k], link.up { return }
        if let until = partitionedUntil[k], now < until {
            after(until - now + rng.nanos(1_000_000...100_000_000), .connect(a, b))
            return
        }
        let id = LinkID(nextLink)
        nextLink += 1
        links[k] = LinkInfo(id: id, up: true)
        linkEnds[id] = (a, b)
        log("\(id) \(a)–\(b) up")
        linkUp(a, to: b, id)
        linkUp(b, to: a, id)
    }

    /// A primary opens a stream on a new link to one of its peers.
    func linkUp(_ name: String, to peer: String, _ link: LinkID) {
        let s = site(name)
        guard var machine = s.primary, s.config?.peers[peer] != nil else { return }
        let actions = machine.linkUp(peer: peer, link: link, now: instant)
        s.primary = machine
        runPrimary(name, actions)
    }

    /// The link breaks now; each side notices after its own delay; the sites redial.
    func cut(_ a: String, _ b: String, reason: String) {
        let k = key(a, b)
        guard var link = links[k], link.up else { return }
        link.up = false
        links[k] = link
        log("\(link.id) \(a)–\(b) cut: \(reason)")
        for (name, other) in [(a, b), (b, a)] {
            after(rng.nanos(1_000_000...300_000_000), .noticesDown(name, incarnation: site(name).incarnation, peer: other, link.id))
        }
        after(rng.nanos(100_000_000...800_000_000), .connect(a, b))
    }

    /// TCP: in order within a connection; nothing crosses connections.
    func send(from: String, to: String, _ link: LinkID, _ message: ReplicationMessage, _ stamps: [UInt64]) {
        let k = key(from, to)
        guard var info = links[k], info.id == link, info.up else { return }
        let at = max(now + rng.nanos(scenario.netDelay), info.lastDelivery[to] ?? 0)
        info.lastDelivery[to] = at
        links[k] = info
        queue.push(at, .deliver(to: to, from: from, link, message, stamps))
    }

    /// A message arrives at `to`: its primary or its replica takes it, whichever it runs.
    func deliver(to: String, from: String, _ link: LinkID, _ message: ReplicationMessage, _ stamps: [UInt64]) {
        let s = site(to)
        if var machine = s.primary {
            log("\(from) → \(to) (primary): \(message)")
            let before = machine.catchUpsFromLine
            let actions = machine.received(message, peer: from, link: link, now: instant)
            catchUpsFromLine += machine.catchUpsFromLine - before
            s.primary = machine
            runPrimary(to, actions)
        } else if s.replica != nil {
            replicaReceive(to, link, message, stamps)
        }
    }

    // MARK: - Replica executor

    func startReplica(_ name: String) {
        let s = site(name)
        s.incarnation += 1
        var machine = ReplicaVolume(volume: "vm1", position: s.store.position)
        machine.extentSize = config.extentSize
        if let bug = scenario.bug, [.replicaHidesLateWrites, .thirdSiteOverwrittenUnkept, .pointRegionsUndated].contains(bug) { machine.plantedBug = bug }
        if scenario.bug == .applyOutOfOrder { machine.plantedBug = .applyOutOfOrder }
        var barriers: [ReplicaVolume.LoggedBarrier] = []
        for record in s.store.log {
            if case .barrier(let b) = record { barriers.append(.init(index: b.index, seq: b.seq, kind: b.kind)) }
        }
        let actions = machine.recover(log: barriers)
        s.replica = machine
        // A replica that restarts consistent has nothing to go back to.
        if s.store.position.consistent { s.undoBase = nil }
        log("\(name) starts as a replica at \(s.store.position)")
        runReplica(name, actions, stamps: [])
    }

    func replicaReceive(_ name: String, _ link: LinkID, _ message: ReplicationMessage, _ stamps: [UInt64]) {
        let s = site(name)
        guard var machine = s.replica else { return }
        switch message {
        case .write(let item): log("\(name) ← write #\(item.index) seq \(item.seq) \(item.range)\(item.isZero ? " zero" : "")")
        case .region(let item): log("\(name) ← region #\(item.index) \(item.range)")
        default: log("\(name) ← \(message)")
        }
        let before = machine.position
        let actions = machine.received(message, on: link)
        s.replica = machine
        // What the checkers learn from the stream: a catch-up (out of order) begins or ends here.
        let accepted = !actions.contains { if case .refuse = $0 { return true } else { return false } }
        if accepted {
            switch message {
            case .open(let open): s.modeByLink[link] = open.mode
            case .barrier(let b) where b.kind == .catchUpBegin:
                s.midCatchUp = true
                s.catchUpEndIndex = nil
                if before.consistent { s.catchUpFromConsistent = true }
                if scenario.roles && rng.chance(0.1) { after(rng.nanos(2_000_000...40_000_000), .failoverDuringCatchUp(name)) }
            case .barrier(let b) where b.kind == .catchUpEnd: s.catchUpEndIndex = b.index
            default: break
            }
        }
        runReplica(name, actions, stamps: stamps, before: before)
        if accepted, case .open(let open) = message { checkReplicaKeptAside(name, open: open) }
    }

    /// The undo log saves what a write overwrites, once per sector since the base.
    func saveBeforeImages(_ s: SimSite, _ first: Int, _ count: Int) {
        guard var base = s.undoBase else { return }
        for sector in first..<first + count where base.saved[sector] == nil { base.saved[sector] = s.disk.cache[sector] }
        s.undoBase = base
    }

    func runReplica(_ name: String, _ actions: [ReplicaVolume.Action], stamps: [UInt64], before: ReplicaPosition? = nil) {
        let s = site(name)
        for action in actions {
            guard failure == nil, s.replica != nil else { return }
            let incarnation = s.incarnation
            switch action {
            case .send(let link, let message):
                if let peer = peer(of: name, on: link) { send(from: name, to: peer, link, message, []) }
            case .apply(let link, let item):
                var payload = stamps
                if let held = s.store.heldPayloads.removeValue(forKey: item.index) { payload = held }
                let (first, count) = sectorsOf(item.range)
                saveBeforeImages(s, first, count)
                s.disk.write(first, item.isZero ? Array(repeating: 0, count: count) : payload)
                var machine = s.replica!
                let more = machine.applied(link: link, index: item.index)
                s.replica = machine
                runReplica(name, more, stamps: [])
            case .appendLog(_, let item):
                let (_, count) = sectorsOf(item.range)
                s.store.log.append(.item(item, item.isZero ? Array(repeating: 0, count: count) : stamps))
            case .syncLog(let link, let barrier):
                s.store.log.append(.barrier(barrier))
                // fsyncs of one file complete in the order they were asked for.
                let at = max(now + rng.nanos(50_000...1_000_000), s.store.lastSyncAt)
                s.store.lastSyncAt = at
                queue.push(at, .replicaLogSynced(name, incarnation: incarnation, link, barrier))
            case .applyLog(let link, let through, let position):
                guard let end = s.store.groupEnd(through: through) else {
                    fail("\(name): applyLog through index \(through), but the log has no such barrier"); return
                }
                for record in s.store.log[s.store.applyIssuedCount..<end] {
                    if case .item(let item, let payload) = record {
                        saveBeforeImages(s, sectorsOf(item.range).first, payload.count)
                        s.disk.write(sectorsOf(item.range).first, payload)
                    }
                }
                let count = end - s.store.applyIssuedCount
                s.store.applyIssuedCount = end
                s.store.appliedPending.append(count)
                let version = s.store.nextVersion
                s.store.nextVersion += 1
                // Only logged (async, scheduled) streams have a receive log, also one recovered after a restart.
                s.positionMode = link.flatMap { s.modeByLink[$0] } ?? .async
                checkBarrierState(name, image: s.disk.cache, position: position, when: "after applying its log")
                after(rng.nanos(50_000...2_000_000), .replicaLogApplied(name, incarnation: incarnation, link, index: through, position, version: version))
            case .skipLog(let groups):
                var seen = 0
                guard s.store.applyIssuedCount == 0, let end = s.store.log.firstIndex(where: { record in
                    if case .barrier = record { seen += 1 }
                    return seen == groups
                }) else { fail("\(name): skipLog of \(groups) group(s), but the log holds \(seen)"); return }
                s.store.log.removeFirst(end + 1)
                s.store.durableLogCount = max(0, s.store.durableLogCount - end - 1)
            case .discardLogTail:
                let keep = s.store.applyIssuedCount
                s.store.log.removeLast(s.store.log.count - keep)
                s.store.durableLogCount = min(s.store.durableLogCount, keep)
            case .flush(let link, let index):
                after(rng.nanos(50_000...2_000_000), .replicaFlushed(name, incarnation: incarnation, link, index: index))
            case .persistPosition(let position):
                // As ReplicaVolumeRuntime: a catch-up leaving a consistent state keeps it.
                if let before, !position.consistent, before.consistent, s.undoBase == nil, scenario.bug != .skipUndo {
                    s.undoBase = (before, [:], s.positionMode)
                }
                // As ReplicaVolumeRuntime: log groups still being applied are made durable first.
                if !s.store.appliedPending.isEmpty { s.disk.flush() }
                let version = s.store.nextVersion
                s.store.nextVersion += 1
                storePosition(s, position, version: version)
            case .refuse(let link, let reason):
                log("\(name) refuses \(link): \(reason)")
                refusals.append(reason)
                if let peer = peer(of: name, on: link) {
                    send(from: name, to: peer, link, .refuse(reason: reason), [])
                    if links[key(name, peer)]?.id == link { cut(name, peer, reason: "refused: \(reason)") }
                }
            case .takeOver(let link, let handoff):
                guard scenario.roles else { fail("\(name) was handed the volume, which this simulation never does"); return }
                log("\(name) takes over from \(peer(of: name, on: link) ?? "?") (switchover through sequence \(handoff.seq))")
                if !promote(name, force: false, why: "switchover") {
                    fail("switchover: \(name) was handed the volume holding everything, but its promotion was refused")
                }
                return
            case .keepAside(let link, let ranges, let reason):
                // As the runtime: the image's ranges are copied aside, then the primary is told.
                for range in ranges {
                    let (first, count) = sectorsOf(range)
                    for sector in first..<min(first + count, sectors) { s.keptAside[sector, default: []].insert(s.disk.cache[sector]) }
                }
                log("\(name) keeps aside \(ranges.count) range(s): \(reason)")
                guard var machine = s.replica else { return }
                let more = machine.keptAside(link: link)
                s.replica = machine
                runReplica(name, more, stamps: [])
            case .declineHandoff(let link, let reason):
                // Legitimate when a newer primary opened a stream here between the old primary's
                // last look and the handoff (seed 401): this site refuses the older epoch (P4),
                // and the switchover fails as the daemon's does, for the operator to decide.
                if let from = peer(of: name, on: link), let replica = s.replica, replica.position.epoch > site(from).epoch {
                    log("switchover: \(name) declined the handoff from \(from): it has seen epoch \(replica.position.epoch) since: \(reason)")
                    continue
                }
                fail("switchover: \(name) declined the handoff though its primary saw it hold every write: \(reason)")
            }
        }
    }
}
