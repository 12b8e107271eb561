@testable import FerryCore

/// A replica site: its state machine, image, receive log and persisted position.
struct ReplicaNode {
    enum LogRecord {
        case item(ReplicationItem, [UInt64])
        case barrier(ReplicationBarrier)
    }

    var name: String
    var machine: ReplicaVolume?
    var incarnation = 0
    var disk: SimDisk
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

    init(name: String, sectors: Int) {
        self.name = name
        disk = SimDisk(sectors: sectors)
    }

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
        for i in appliedPending.indices { appliedPending[i] -= 0 }
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

struct LinkInfo {
    var id: LinkID
    var up: Bool
    var lastToReplica: Int64 = 0
    var lastToPrimary: Int64 = 0
}

extension SimWorld {
    // MARK: - Network

    func connect(_ peer: String) {
        guard primary != nil, replicas[peer]?.machine != nil else { return }
        if let link = links[peer], link.up { return }
        if let until = partitionedUntil[peer], now < until {
            after(until - now + rng.nanos(1_000_000...100_000_000), .connect(peer))
            return
        }
        let id = LinkID(nextLink)
        nextLink += 1
        links[peer] = LinkInfo(id: id, up: true)
        log("\(id) to \(peer) up")
        var machine = primary!
        let actions = machine.linkUp(peer: peer, link: id, now: instant)
        primary = machine
        runPrimary(actions)
    }

    /// The link breaks now; each side notices after its own delay; the primary redials.
    func cut(_ peer: String, reason: String) {
        guard var link = links[peer], link.up else { return }
        link.up = false
        links[peer] = link
        log("\(link.id) to \(peer) cut: \(reason)")
        after(rng.nanos(1_000_000...300_000_000), .primaryNoticesDown(peer, link.id))
        if let incarnation = replicas[peer]?.incarnation {
            after(rng.nanos(1_000_000...300_000_000), .replicaNoticesDown(peer, incarnation: incarnation, link.id))
        }
        after(rng.nanos(100_000_000...800_000_000), .connect(peer))
    }

    /// TCP: in order within a connection; nothing crosses connections.
    func sendToReplica(_ peer: String, _ link: LinkID, _ message: ReplicationMessage, _ stamps: [UInt64]) {
        guard var info = links[peer], info.id == link, info.up else { return }
        let at = max(now + rng.nanos(scenario.netDelay), info.lastToReplica)
        info.lastToReplica = at
        links[peer] = info
        queue.push(at, .deliverToReplica(peer, link, message, stamps))
    }

    func sendToPrimary(_ peer: String, _ link: LinkID, _ message: ReplicationMessage) {
        guard var info = links[peer], info.id == link, info.up else { return }
        let at = max(now + rng.nanos(scenario.netDelay), info.lastToPrimary)
        info.lastToPrimary = at
        links[peer] = info
        queue.push(at, .deliverToPrimary(peer, link, message))
    }

    // MARK: - Replica executor

    func startReplica(_ name: String) {
        replicas[name]!.incarnation += 1
        var machine = ReplicaVolume(volume: "vm1", position: replicas[name]!.position)
        if scenario.bug == .applyOutOfOrder { machine.plantedBug = .applyOutOfOrder }
        var barriers: [ReplicaVolume.LoggedBarrier] = []
        for record in replicas[name]!.log {
            if case .barrier(let b) = record { barriers.append(.init(index: b.index, seq: b.seq, kind: b.kind)) }
        }
        let actions = machine.recover(log: barriers)
        replicas[name]!.machine = machine
        runReplica(name, actions, stamps: [])
    }

    func replicaReceive(_ peer: String, _ link: LinkID, _ message: ReplicationMessage, _ stamps: [UInt64]) {
        guard var machine = replicas[peer]?.machine else { return }
        switch message {
        case .write(let item): log("\(peer) ← write #\(item.index) seq \(item.seq) \(item.range)\(item.isZero ? " zero" : "")")
        case .region(let item): log("\(peer) ← region #\(item.index) \(item.range)")
        default: log("\(peer) ← \(message)")
        }
        let actions = machine.received(message, on: link)
        replicas[peer]!.machine = machine
        runReplica(peer, actions, stamps: stamps)
    }

    func runReplica(_ name: String, _ actions: [ReplicaVolume.Action], stamps: [UInt64]) {
        for action in actions {
            guard failure == nil, replicas[name]?.machine != nil else { return }
            let incarnation = replicas[name]!.incarnation
            switch action {
            case .send(let link, let message):
                sendToPrimary(name, link, message)
            case .apply(let link, let item):
                var payload = stamps
                if let held = replicas[name]!.heldPayloads.removeValue(forKey: item.index) { payload = held }
                let (first, count) = sectorsOf(item.range)
                replicas[name]!.disk.write(first, item.isZero ? Array(repeating: 0, count: count) : payload)
                var machine = replicas[name]!.machine!
                let more = machine.applied(link: link, index: item.index)
                replicas[name]!.machine = machine
                runReplica(name, more, stamps: [])
            case .appendLog(_, let item):
                let (_, count) = sectorsOf(item.range)
                replicas[name]!.log.append(.item(item, item.isZero ? Array(repeating: 0, count: count) : stamps))
            case .syncLog(let link, let barrier):
                replicas[name]!.log.append(.barrier(barrier))
                // fsyncs of one file complete in the order they were asked for.
                let at = max(now + rng.nanos(50_000...1_000_000), replicas[name]!.lastSyncAt)
                replicas[name]!.lastSyncAt = at
                queue.push(at, .replicaLogSynced(name, incarnation: incarnation, link, barrier))
            case .applyLog(let link, let through, let position):
                guard let end = replicas[name]!.groupEnd(through: through) else {
                    fail("\(name): applyLog through index \(through), but the log has no such barrier"); return
                }
                for record in replicas[name]!.log[replicas[name]!.applyIssuedCount..<end] {
                    if case .item(let item, let payload) = record {
                        replicas[name]!.disk.write(sectorsOf(item.range).first, payload)
                    }
                }
                let count = end - replicas[name]!.applyIssuedCount
                replicas[name]!.applyIssuedCount = end
                replicas[name]!.appliedPending.append(count)
                let version = replicas[name]!.nextVersion
                replicas[name]!.nextVersion += 1
                checkBarrierState(name, image: replicas[name]!.disk.cache, position: position, when: "after applying its log")
                after(rng.nanos(50_000...2_000_000), .replicaLogApplied(name, incarnation: incarnation, link, index: through, position, version: version))
            case .discardLogTail:
                let keep = replicas[name]!.applyIssuedCount
                replicas[name]!.log.removeLast(replicas[name]!.log.count - keep)
                replicas[name]!.durableLogCount = min(replicas[name]!.durableLogCount, keep)
            case .flush(let link, let index):
                after(rng.nanos(50_000...2_000_000), .replicaFlushed(name, incarnation: incarnation, link, index: index))
            case .persistPosition(let position):
                let version = replicas[name]!.nextVersion
                replicas[name]!.nextVersion += 1
                replicas[name]!.persist(position, version: version)
            case .refuse(let link, let reason):
                log("\(name) refuses \(link): \(reason)")
                refusals.append(reason)
                sendToPrimary(name, link, .refuse(reason: reason))
                if links[name]?.id == link { cut(name, reason: "refused: \(reason)") }
            case .takeOver, .declineHandoff:
                fail("\(name) was handed the volume, which this simulation never does")
            }
        }
    }

    func crashReplica(_ name: String) {
        guard replicas[name]?.machine != nil else { return }
        let powerLoss = rng.chance(scenario.powerLoss)
        log("\(name) crashes (\(powerLoss ? "power loss" : "kill -9"))")
        cut(name, reason: "\(name) crashed")
        var node = replicas[name]!
        node.machine = nil
        node.incarnation += 1
        node.disk.crash(powerLoss: powerLoss, &rng)
        if powerLoss {
            // Writes it had only written (acked, not flushed) are gone: a double failure, which P1
            // does not cover. From now on only what a flush made durable is still required of it,
            // until the primary's catch-up brings it back.
            requiredApplied[name] = requiredDurable[name]
            let keep = node.durableLogCount + rng.int(0...(node.log.count - node.durableLogCount))
            node.log.removeLast(node.log.count - keep)
        }
        node.durableLogCount = node.log.count
        node.applyIssuedCount = 0
        node.appliedPending = []
        node.heldPayloads = [:]
        replicas[name] = node
        if !workloadOver { after(rng.nanos(50_000_000...600_000_000), .restartReplica(name)) }
    }

    func restartReplica(_ name: String) {
        log("\(name) restarts")
        startReplica(name)
        after(rng.nanos(1_000_000...50_000_000), .connect(name))
    }
}
