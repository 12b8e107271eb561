@testable import FerryCore

/// One simulated schedule: a primary and its replicas running the real FerryCore state machines,
/// with a simulated client, network, disks, clocks and crashes, all drawn from one seed.
final class SimWorld {
    enum Event {
        case clientIssue
        case tick
        case localDone(incarnation: Int, seq: UInt64)
        case persistDone(incarnation: Int, token: UInt64, PrimaryVolume.Metadata)
        case deliverToReplica(String, LinkID, ReplicationMessage, [UInt64])
        case deliverToPrimary(String, LinkID, ReplicationMessage)
        case primaryNoticesDown(String, LinkID)
        case replicaNoticesDown(String, incarnation: Int, LinkID)
        case connect(String)
        case cutLink
        case crashPrimary
        case restartPrimary
        case crashReplica
        case restartReplica(String)
        case checkpoint
        case replicaFlushed(String, incarnation: Int, LinkID, index: UInt64)
        case replicaLogSynced(String, incarnation: Int, LinkID, ReplicationBarrier)
        case replicaLogApplied(String, incarnation: Int, LinkID?, index: UInt64, ReplicaPosition, version: UInt64)
    }

    struct ClientOp {
        var kind: PrimaryVolume.Request
        var stamps: [UInt64]
        var submittedAt: Int64
        /// Flush only: per sector, the latest write answered before it was submitted.
        var coveredSnapshot: [UInt64]?
    }

    let scenario: Scenario
    var rng: SimRandom
    var now: Int64 = 0
    var queue = EventQueue<Event>()
    /// The last few hundred events. Formatting them is most of a schedule's cost, so a bulk run
    /// keeps none, and a failing seed is run again (it replays exactly) with `tracing` on.
    var trace: [String] = []
    var tracing = false
    var failure: String?
    let config: PrimaryVolume.Config

    // Primary
    var primary: PrimaryVolume?
    var primaryIncarnation = 0
    var primaryDisk: SimDisk
    var primaryMeta = PrimaryVolume.Metadata()
    var primaryMetaToken: UInt64 = 0
    var journal: [(entry: JournalEntry, stamps: [UInt64], durable: Bool)] = []
    var payloads: [UInt64: [UInt64]] = [:]
    var preserved: [String: [UInt64: [UInt64]]] = [:]
    var snapshotSeqs: [UInt64] = []
    var snapshots: [UInt64: [UInt64]] = [:]
    var pendingFlushes: Set<UInt64> = []

    // Replicas and links
    var replicas: [String: ReplicaNode] = [:]
    var links: [String: LinkInfo] = [:]
    var nextLink: UInt64 = 1
    var partitionedUntil: [String: Int64] = [:]

    // Client
    var outstanding: [UInt64: ClientOp] = [:]
    var nextWriteID: UInt64 = 1
    var latestCompleted: [UInt64]
    /// Per sector: (seq, stamp) of every write the primary executed, in order.
    var history: [[(seq: UInt64, stamp: UInt64)]]
    /// Per peer and sector: the write a replica must hold (or a newer one) if the primary dies now.
    var requiredApplied: [String: [UInt64]] = [:]
    var requiredDurable: [String: [UInt64]] = [:]
    var workloadOver = false
    var opsCompleted = 0
    var checks = 0
    var refusals: [String] = []

    var sectors: Int { scenario.sectors }
    var sectorSize: UInt64 { scenario.sectorSize }
    var wall: Int64 { 1_800_000_000 + now / 50_000_000 }   // the wall clock runs 20× for schedules
    var instant: Instant { Instant(monotonicNanos: now, wallSeconds: wall) }

    init(_ scenario: Scenario) {
        self.scenario = scenario
        rng = SimRandom(seed: scenario.seed)
        var peers: [String: ReplicaPolicy] = [:]
        for p in scenario.peers { peers[p.name] = p.policy }
        var config = PrimaryVolume.Config(volume: "vm1", volumeSize: UInt64(scenario.sectors) * scenario.sectorSize,
                                          epoch: 1, generation: 1, peers: peers)
        config.regionSize = 4096
        // Runs of one region up to the whole volume (a function of the seed, not a draw, so the
        // other draws of a seed stay as they were).
        config.runBytes = [4096, 8192, 16384, 1 << 20][Int(scenario.seed % 4)]
        config.extentSize = 16384
        config.activityLogCapacity = 2
        config.windowItems = 16
        config.windowBytes = 32 << 10
        config.cutBytes = 16 << 10
        config.cutIntervalNanos = 20_000_000
        // Sync and semi-sync cuts: often, seldom, or never within a schedule (seed-derived too).
        config.directCutBytes = [16 << 10, 64 << 10, 1 << 30][Int(scenario.seed % 3)]
        config.directCutIntervalNanos = [20_000_000, 100_000_000, 1_000_000_000][Int(scenario.seed / 3 % 3)]
        config.sequenceReservation = 50
        config.plantedBug = scenario.bug
        self.config = config
        primaryDisk = SimDisk(sectors: scenario.sectors)
        latestCompleted = Array(repeating: 0, count: scenario.sectors)
        history = Array(repeating: [(0, 0)], count: scenario.sectors)
        for p in scenario.peers {
            replicas[p.name] = ReplicaNode(name: p.name, sectors: scenario.sectors)
            requiredApplied[p.name] = latestCompleted
            requiredDurable[p.name] = latestCompleted
        }
    }

    // MARK: - Running

    func log(_ line: @autoclosure () -> String) {
        guard tracing else { return }
        trace.append("\(now / 1000)µs \(line())")
        if trace.count > 600 { trace.removeFirst(200) }
    }

    func fail(_ why: String) {
        if failure == nil { failure = "\(why) (at \(now / 1000) µs)" }
    }

    func after(_ delay: Int64, _ event: Event) { queue.push(now + max(0, delay), event) }

    /// Runs the schedule: workload with faults, then healing, then the convergence check.
    func run() -> String? {
        startPrimary(fresh: true)
        for name in replicas.keys.sorted() { startReplica(name); after(rng.nanos(0...1_000_000), .connect(name)) }
        after(0, .clientIssue)
        after(10_000_000, .tick)
        scheduleFaults()
        let deadline = scenario.workloadNanos + 200_000_000_000
        var healedAt: Int64?
        while failure == nil, let next = queue.pop() {
            now = next.time
            if now > deadline { fail("did not converge within 200 s of simulated time after the workload: \(convergenceReport())"); break }
            if healedAt == nil, now >= scenario.workloadNanos {
                healedAt = now
                heal()
            }
            handle(next.event)
            if let healedAt, now - healedAt > 1_000_000_000, outstanding.isEmpty, converged() { break }
        }
        if failure == nil, !converged() { fail("ran out of events before converging: \(convergenceReport())") }
        return failure
    }

    func scheduleFaults() {
        func every(_ rate: Double, _ event: Event) {
            guard rate > 0 else { return }
            var t: Int64 = 0
            while true {
                t += rng.nanos(1...Int64(2_000_000_000 / rate))
                if t >= scenario.workloadNanos { break }
                queue.push(t, event)
            }
        }
        every(scenario.linkCutsPerSecond, .cutLink)
        every(scenario.primaryCrashesPerSecond, .crashPrimary)
        every(scenario.replicaCrashesPerSecond, .crashReplica)
        every(scenario.checkpointsPerSecond, .checkpoint)
    }

    func heal() {
        workloadOver = true
        partitionedUntil = [:]
        log("heal: faults stop")
        if primary == nil { restartPrimary() }
        for name in replicas.keys.sorted() where replicas[name]!.machine == nil { restartReplica(name) }
        for name in replicas.keys.sorted() { after(1_000_000, .connect(name)) }
        after(2_000_000, .checkpoint)
        // A final flush, so every replica is asked to make everything durable.
        if primary != nil { submit(.flush) }
    }

    func handle(_ event: Event) {
        switch event {
        case .clientIssue:
            issueClientOps()
            if !workloadOver { after(rng.nanos(10_000...2_000_000), .clientIssue) }
        case .tick:
            if let p = primary {
                var machine = p
                let actions = machine.tick(now: instant)
                primary = machine
                runPrimary(actions)
            }
            if workloadOver, rng.chance(0.05) { after(0, .checkpoint) }
            after(10_000_000, .tick)
        case .localDone(let incarnation, let seq):
            guard incarnation == primaryIncarnation, var machine = primary else { return }
            if pendingFlushes.remove(seq) != nil { primaryDisk.flush(); markJournalDurable() }
            let actions = machine.localDone(seq: seq, error: nil, now: instant)
            primary = machine
            runPrimary(actions)
        case .persistDone(let incarnation, let token, let meta):
            guard incarnation == primaryIncarnation, var machine = primary else { return }
            if token > primaryMetaToken { primaryMeta = meta; primaryMetaToken = token }
            let actions = machine.persisted(token: token, now: instant)
            primary = machine
            runPrimary(actions)
        case .deliverToPrimary(let peer, let link, let message):
            guard links[peer]?.id == link, links[peer]?.up == true, var machine = primary else { return }
            log("\(peer) → primary: \(message)")
            let actions = machine.received(message, peer: peer, link: link, now: instant)
            primary = machine
            runPrimary(actions)
        case .deliverToReplica(let peer, let link, let message, let stamps):
            guard links[peer]?.id == link, links[peer]?.up == true, replicas[peer]?.machine != nil else { return }
            replicaReceive(peer, link, message, stamps)
        case .primaryNoticesDown(let peer, let link):
            guard var machine = primary else { return }
            log("primary notices \(link) to \(peer) is down")
            let actions = machine.linkDown(peer: peer, link: link, now: instant)
            primary = machine
            runPrimary(actions)
        case .replicaNoticesDown(let peer, let incarnation, let link):
            guard replicas[peer]?.incarnation == incarnation, var machine = replicas[peer]?.machine else { return }
            let actions = machine.linkDown(link)
            replicas[peer]?.machine = machine
            runReplica(peer, actions, stamps: [])
        case .connect(let peer):
            connect(peer)
        case .cutLink:
            let peer = rng.pick(replicas.keys.sorted())
            cut(peer, reason: "fault: link cut")
            if rng.chance(0.3) { partitionedUntil[peer] = now + rng.nanos(100_000_000...1_500_000_000) }
        case .crashPrimary:
            crashPrimary()
        case .restartPrimary:
            if primary == nil { restartPrimary() }
        case .crashReplica:
            crashReplica(rng.pick(replicas.keys.sorted()))
        case .restartReplica(let peer):
            if replicas[peer]?.machine == nil { restartReplica(peer) }
        case .checkpoint:
            guard var machine = primary else { return }
            let actions = machine.checkpointNow(now: instant)
            primary = machine
            runPrimary(actions)
        case .replicaFlushed(let peer, let incarnation, let link, let index):
            guard replicas[peer]?.incarnation == incarnation else { return }
            replicas[peer]!.disk.flush()
            guard var machine = replicas[peer]?.machine else { return }
            let actions = machine.flushed(link: link, index: index)
            replicas[peer]?.machine = machine
            log("\(peer) flushed for #\(index): position \(machine.position)")
            runReplica(peer, actions, stamps: [])
            checkConsistentReplica(peer)
        case .replicaLogSynced(let peer, let incarnation, let link, let barrier):
            guard replicas[peer]?.incarnation == incarnation else { return }
            replicas[peer]!.markLogDurable()
            guard var machine = replicas[peer]?.machine else { return }
            let actions = machine.logSynced(link: link, barrier: barrier)
            replicas[peer]?.machine = machine
            runReplica(peer, actions, stamps: [])
        case .replicaLogApplied(let peer, let incarnation, let link, let index, let position, let version):
            guard replicas[peer]?.incarnation == incarnation else { return }
            replicas[peer]!.disk.flush()
            replicas[peer]!.persist(position, version: version)
            replicas[peer]!.dropAppliedLog()
            guard var machine = replicas[peer]?.machine else { return }
            let actions = machine.logApplied(link: link, index: index)
            replicas[peer]?.machine = machine
            runReplica(peer, actions, stamps: [])
        }
    }

    // MARK: - The client

    func issueClientOps() {
        guard !workloadOver, primary != nil else { return }
        while outstanding.count < scenario.queueDepth, rng.chance(0.7) {
            let roll = rng.int(0...99)
            if roll < 10 {
                submit(.flush)
                continue
            }
            let first = rng.int(0...sectors - 1)
            let count = min(rng.pick([1, 1, 2, 8, 16, 40]), sectors - first)
            let range = BlockRange(offset: UInt64(first) * sectorSize, length: UInt64(count) * sectorSize)
            if roll < 20 {
                submit(.zero(range, fua: rng.chance(0.2)))
            } else {
                submit(.write(range, fua: roll < 30))
            }
        }
    }

    func submit(_ request: PrimaryVolume.Request) {
        guard var machine = primary else { return }
        var stamps: [UInt64] = []
        switch request {
        case .write(let range, _):
            let id = nextWriteID
            nextWriteID += 1
            stamps = (0..<Int(range.length / sectorSize)).map { id << 16 | UInt64($0 + 1) }
        case .zero(let range, _):
            stamps = Array(repeating: 0, count: Int(range.length / sectorSize))
        case .flush:
            break
        }
        let (seq, actions) = machine.submit(request, now: instant)
        primary = machine
        var op = ClientOp(kind: request, stamps: stamps, submittedAt: now)
        if case .flush = request { op.coveredSnapshot = latestCompleted }
        outstanding[seq] = op
        payloads[seq] = stamps
        log("client submits \(seq): \(request)")
        runPrimary(actions)
    }

    func completed(_ seq: UInt64, error: String?) {
        guard let op = outstanding.removeValue(forKey: seq) else { return }
        opsCompleted += 1
        if let error { fail("request \(seq) failed: \(error)"); return }
        let statuses = primary?.status(now: instant) ?? []
        let inSync = Set(statuses.filter(\.rpoZero).map(\.peer))
        switch op.kind {
        case .write(let range, let fua), .zero(let range, let fua):
            let first = Int(range.offset / sectorSize)
            for i in 0..<op.stamps.count { latestCompleted[first + i] = max(latestCompleted[first + i], seq) }
            for p in scenario.peers where inSync.contains(p.name) {
                for i in 0..<op.stamps.count {
                    requiredApplied[p.name]![first + i] = max(requiredApplied[p.name]![first + i], seq)
                    if fua && p.policy.mode == .sync {
                        requiredDurable[p.name]![first + i] = max(requiredDurable[p.name]![first + i], seq)
                    }
                }
            }
        case .flush:
            for p in scenario.peers where inSync.contains(p.name) && p.policy.mode == .sync {
                for (i, s) in (op.coveredSnapshot ?? []).enumerated() {
                    requiredDurable[p.name]![i] = max(requiredDurable[p.name]![i], s)
                    requiredApplied[p.name]![i] = max(requiredApplied[p.name]![i], s)
                }
            }
        }
    }
}
