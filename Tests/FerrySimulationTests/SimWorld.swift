@testable import FerryCore

/// A site of the simulated volume: its disk, its catalog (role, epoch, history: what survives a
/// crash), the state machine it runs (a primary's or a replica's; none while it is down), the
/// files of each role, and the client (the VM) it serves while it is a primary.
final class SimSite {
    let name: String
    var disk: SimDisk
    /// Bumped at every crash and role change: events of an earlier life are dropped.
    var incarnation = 0
    var running = false

    // The catalog.
    /// The primary's configuration while this site's role is primary.
    var config: PrimaryVolume.Config?
    var epoch: UInt64 = 1
    var generation: UInt64 = 1
    var history: [GenerationRecord] = []

    // Primary
    var primary: PrimaryVolume?
    var meta = PrimaryVolume.Metadata()
    var metaToken: UInt64 = 0
    var journal: [(entry: JournalEntry, stamps: [UInt64], durable: Bool)] = []
    var preserved: [String: [UInt64: [UInt64]]] = [:]
    var pendingFlushes: Set<UInt64> = []
    /// What a demotion left of the primary's state on disk (its metadata and journal), used if
    /// this site is promoted again with its image where it stepped down.
    var formerPrimary: RoleChange.FormerPrimary?

    // Replica
    var replica: ReplicaVolume?
    var store = ReplicaStore()

    // The client this site serves (while primary and attached).
    var clientAttached = false
    var client: SimClient

    // What the checkers know.
    /// A catch-up began here and has not completed: the image is out of order.
    var midCatchUp = false
    var catchUpEndIndex: UInt64?
    /// The replica's undo log, as ``UndoLog`` keeps it for a catch-up (P3): the position the
    /// catch-up started from and, per sector written since, what it held before (durable
    /// before the write: the log is write-ahead). Survives crashes; gone once a consistent
    /// position is recorded. `mode`: that of the stream the state came from (a sync replica's
    /// image may hold writes past its last barrier, which a roll-back to it keeps).
    var undoBase: (position: ReplicaPosition, saved: [Int: UInt64], mode: ReplicationMode?)?
    /// The catch-up under way began on a consistent replica (P3: its state must be kept).
    var catchUpFromConsistent = false
    /// The mode of each stream opened here, and of the one that last moved the position (P2
    /// holds for async and scheduled).
    var modeByLink: [LinkID: ReplicationMode] = [:]
    var positionMode: ReplicationMode?
    /// Every (sector, contents) a demotion of this site kept aside.
    var keptAside: [Int: Set<UInt64>] = [:]

    init(name: String, sectors: Int) {
        self.name = name
        disk = SimDisk(sectors: sectors)
        client = SimClient(sectors: sectors)
    }

    var isFenced: Bool { primary?.isFenced ?? false }
    /// A primary that takes writes from its client.
    var serving: Bool { primary != nil && !isFenced && clientAttached }
}

/// The client of one primary: its requests in flight and what its answers promised.
struct SimClient {
    var outstanding: [UInt64: SimWorld.ClientOp] = [:]
    var payloads: [UInt64: [UInt64]] = [:]
    var latestCompleted: [UInt64]
    /// Per peer and sector: the write a replica must hold (or a newer one) if this primary dies now.
    var requiredApplied: [String: [UInt64]] = [:]
    var requiredDurable: [String: [UInt64]] = [:]

    init(sectors: Int) { latestCompleted = Array(repeating: 0, count: sectors) }

    /// After a crash (or a role change) the old promises have been judged; a new life starts anew.
    mutating func reset() {
        outstanding.removeAll()
        latestCompleted = Array(repeating: 0, count: latestCompleted.count)
        requiredApplied.removeAll()
        requiredDurable.removeAll()
    }
}

/// One simulated schedule: sites running the real FerryCore state machines, with simulated
/// clients, network, disks, clocks, crashes and (failover schedules) an operator who promotes,
/// switches over and resolves split brains, all drawn from one seed.
final class SimWorld {
    enum Event {
        case clientIssue(String)
        case tick
        case localDone(String, incarnation: Int, seq: UInt64)
        case persistDone(String, incarnation: Int, token: UInt64, PrimaryVolume.Metadata)
        case deliver(to: String, from: String, LinkID, ReplicationMessage, [UInt64])
        case noticesDown(String, incarnation: Int, peer: String, LinkID)
        case connect(String, String)
        case cutLink
        case crashPrimary
        case crashReplica
        case restart(String)
        case checkpoint
        case replicaFlushed(String, incarnation: Int, LinkID, index: UInt64)
        case replicaLogSynced(String, incarnation: Int, LinkID, ReplicationBarrier)
        case replicaLogApplied(String, incarnation: Int, LinkID?, index: UInt64, ReplicaPosition, version: UInt64)
        // The operator (failover schedules).
        case failover
        /// The primary dies while `name` is catching up, and `name` is promoted (P3's case).
        case failoverDuringCatchUp(String)
        case promote(String, force: Bool)
        case undoDemote
        case promoteAgain(String)
        case splitFailover
        case switchover
        case switchoverStep(from: String, to: String, deadline: Int64)
        case resolve(String, peer: String)
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
    /// A replayed seed keeps its whole trace.
    var traceLimit = 600
    var failure: String?
    /// The first primary's configuration; promotions start from it.
    let config: PrimaryVolume.Config
    let configuredReplicas: [String: ReplicaPolicy]

    var sites: [String: SimSite] = [:]
    var siteNames: [String] = []
    var links: [String: LinkInfo] = [:]
    var linkEnds: [LinkID: (String, String)] = [:]
    var nextLink: UInt64 = 1
    var partitionedUntil: [String: Int64] = [:]

    var nextWriteID: UInt64 = 1
    var workloadOver = false
    var opsCompleted = 0
    var checks = 0
    var refusals: [String] = []
    var promotions = 0, switchovers = 0, resolutions = 0, rejoins = 0
    /// Promotions mid catch-up that rolled the image back (the undo log).
    var rollbacks = 0
    /// Promotions of a demoted site whose peers started from what it knew they lacked.
    var resumedPromotions = 0
    /// Peers a new primary caught up with what changed since the older state of its line they
    /// held, instead of a full copy (a third site after a move).
    var catchUpsFromLine = 0
    var resolving = false
    /// The site the operator kept when it last resolved a split brain between two sites.
    var resolvedKeep: [String: String] = [:]
    var lastDemoted: String?

    // What the checkers know of every generation.
    /// Per generation and sector: (seq, stamp) of every write its primary executed, in order.
    var history: [UInt64: [[(seq: UInt64, stamp: UInt64)]]] = [:]
    /// Per generation: its primary's image once every request up to a sequence was admitted.
    var snapshots: [UInt64: (seqs: [UInt64], images: [UInt64: [UInt64]])] = [:]
    /// The promoted site's image when each generation began.
    var branchImages: [UInt64: [UInt64]] = [:]
    /// The site that took writes in each epoch (never two).
    var epochWriter: [UInt64: String] = [:]
    /// The site that wrote each (non-zero) stamp.
    var stampWriter: [UInt64: String] = [:]

    var sectors: Int { scenario.sectors }
    var sectorSize: UInt64 { scenario.sectorSize }
    var wall: Int64 { 1_800_000_000 + now / 50_000_000 }   // the wall clock runs 20× for schedules
    var instant: Instant { Instant(monotonicNanos: now, wallSeconds: wall) }

    init(_ scenario: Scenario) {
        self.scenario = scenario
        rng = SimRandom(seed: scenario.seed)
        var peers: [String: ReplicaPolicy] = [:]
        for p in scenario.peers { peers[p.name] = p.policy }
        configuredReplicas = peers
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
        config.idleCheckpointNanos = 300_000_000
        config.plantedBug = scenario.bug
        siteNames = [Scenario.firstPrimary] + scenario.peers.map(\.name)
        config.siteIndex = siteNames.sorted().firstIndex(of: Scenario.firstPrimary)!
        config.siteCount = siteNames.count
        self.config = config
        for name in siteNames { sites[name] = SimSite(name: name, sectors: scenario.sectors) }
        sites[Scenario.firstPrimary]!.config = config
        history[1] = Array(repeating: [(0, 0)], count: scenario.sectors)
        snapshots[1] = ([], [:])
    }

    func site(_ name: String) -> SimSite { sites[name]! }

    // MARK: - Running

    func log(_ line: @autoclosure () -> String) {
        guard tracing else { return }
        trace.append("\(now / 1000)µs \(line())")
        if trace.count > traceLimit { trace.removeFirst(traceLimit / 3) }
    }

    func fail(_ why: String) {
        if failure == nil { failure = "\(why) (at \(now / 1000) µs)" }
    }

    func after(_ delay: Int64, _ event: Event) { queue.push(now + max(0, delay), event) }

    /// Runs the schedule: workload with faults, then healing, then the convergence check.
    func run() -> String? {
        for name in siteNames { start(name, fresh: true) }
        for (a, b) in pairs() { after(rng.nanos(0...1_000_000), .connect(a, b)) }
        attachClient(Scenario.firstPrimary)
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
            if let healedAt, now - healedAt > 1_000_000_000, sites.values.allSatisfy({ $0.client.outstanding.isEmpty }), converged() { break }
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
        every(scenario.failoversPerSecond, .failover)
        every(scenario.splitsPerSecond, .splitFailover)
        every(scenario.switchoversPerSecond, .switchover)
        if scenario.undoDemotesPerSecond > 0 {
            var own = SimRandom(seed: scenario.seed ^ 0x0DD_D0DE)
            var t: Int64 = 0
            while true {
                t += own.nanos(1...Int64(2_000_000_000 / scenario.undoDemotesPerSecond))
                if t >= scenario.workloadNanos { break }
                queue.push(t, .undoDemote)
            }
        }
    }

    func heal() {
        workloadOver = true
        partitionedUntil = [:]
        log("heal: faults stop")
        for name in siteNames where !site(name).running { restart(name) }
        for (a, b) in pairs() { after(1_000_000, .connect(a, b)) }
        after(2_000_000, .checkpoint)
        // A final flush, so every replica is asked to make everything durable.
        for name in siteNames where site(name).serving { submit(name, .flush) }
    }

    func handle(_ event: Event) {
        switch event {
        case .clientIssue(let name):
            let s = site(name)
            guard s.clientAttached else { return }
            issueClientOps(name)
            if !workloadOver { after(rng.nanos(10_000...2_000_000), .clientIssue(name)) }
        case .tick:
            for name in siteNames {
                guard var machine = site(name).primary else { continue }
                let actions = machine.tick(now: instant)
                site(name).primary = machine
                runPrimary(name, actions)
            }
            if scenario.roles { operatorLooks() }
            if workloadOver, rng.chance(0.05) { after(0, .checkpoint) }
            after(10_000_000, .tick)
        case .localDone(let name, let incarnation, let seq):
            let s = site(name)
            guard incarnation == s.incarnation, var machine = s.primary else { return }
            if s.pendingFlushes.remove(seq) != nil { s.disk.flush(); s.markJournalDurable() }
            let actions = machine.localDone(seq: seq, error: nil, now: instant)
            s.primary = machine
            runPrimary(name, actions)
        case .persistDone(let name, let incarnation, let token, let meta):
            let s = site(name)
            guard incarnation == s.incarnation, var machine = s.primary else { return }
            if token > s.metaToken { s.meta = storedAndRead(meta); s.metaToken = token }
            let actions = machine.persisted(token: token, now: instant)
            s.primary = machine
            runPrimary(name, actions)
        case .deliver(let to, let from, let link, let message, let stamps):
            guard let info = links[key(to, from)], info.id == link, info.up, site(to).running else { return }
            deliver(to: to, from: from, link, message, stamps)
        case .noticesDown(let name, let incarnation, let peer, let link):
            let s = site(name)
            guard s.incarnation == incarnation else { return }
            if var machine = s.primary {
                log("\(name) notices \(link) to \(peer) is down")
                let actions = machine.linkDown(peer: peer, link: link, now: instant)
                s.primary = machine
                runPrimary(name, actions)
            } else if var machine = s.replica {
                let actions = machine.linkDown(link)
                s.replica = machine
                runReplica(name, actions, stamps: [])
            }
        case .connect(let a, let b):
            connect(a, b)
        case .cutLink:
            let candidates = pairs().filter { site($0.0).primary != nil || site($0.1).primary != nil }
            guard !candidates.isEmpty else { return }
            let (a, b) = rng.pick(candidates)
            cut(a, b, reason: "fault: link cut")
            if rng.chance(0.3) { partitionedUntil[key(a, b)] = now + rng.nanos(100_000_000...1_500_000_000) }
        case .crashPrimary:
            let running = siteNames.filter { site($0).primary != nil }
            guard !running.isEmpty else { return }
            crash(rng.pick(running))
        case .crashReplica:
            let running = siteNames.filter { site($0).replica != nil }
            guard !running.isEmpty else { return }
            crash(rng.pick(running))
        case .restart(let name):
            if !site(name).running { restart(name) }
        case .checkpoint:
            for name in siteNames {
                guard var machine = site(name).primary else { continue }
                let actions = machine.checkpointNow(now: instant)
                site(name).primary = machine
                runPrimary(name, actions)
            }
        case .replicaFlushed(let name, let incarnation, let link, let index):
            let s = site(name)
            guard s.incarnation == incarnation else { return }
            s.disk.flush()
            if let end = s.catchUpEndIndex, index >= end { s.midCatchUp = false; s.catchUpEndIndex = nil }
            guard var machine = s.replica else { return }
            let before = machine.position
            let actions = machine.flushed(link: link, index: index)
            if machine.position != before { s.positionMode = s.modeByLink[link] }
            s.replica = machine
            log("\(name) flushed for #\(index): position \(machine.position)")
            runReplica(name, actions, stamps: [])
            checkConsistentReplica(name)
        case .replicaLogSynced(let name, let incarnation, let link, let barrier):
            let s = site(name)
            guard s.incarnation == incarnation else { return }
            s.store.markLogDurable()
            guard var machine = s.replica else { return }
            let actions = machine.logSynced(link: link, barrier: barrier)
            s.replica = machine
            runReplica(name, actions, stamps: [])
        case .replicaLogApplied(let name, let incarnation, let link, let index, let position, let version):
            let s = site(name)
            guard s.incarnation == incarnation else { return }
            s.disk.flush()
            storePosition(s, position, version: version)
            s.store.dropAppliedLog()
            guard var machine = s.replica else { return }
            let actions = machine.logApplied(link: link, index: index)
            s.replica = machine
            runReplica(name, actions, stamps: [])
        case .failover:
            failover()
        case .promote(let name, let force):
            // A forced promotion follows the operator's demote of the primary
            // (failoverDuringCatchUp): refused while the demoted site's stream is still up here,
            // or while this site is down, the operator tries again rather than leave the volume
            // without a primary (seed 700670).
            if !promote(name, force: force, why: "failover"), force, servingSite == nil {
                after(rng.nanos(10_000_000...100_000_000), .promote(name, force: true))
            }
        case .failoverDuringCatchUp(let name):
            failoverDuringCatchUp(name)
        case .splitFailover:
            splitFailover()
        case .switchover:
            beginSwitchover()
        case .undoDemote:
            undoDemote()
        case .promoteAgain(let name):
            // A site that crashed meanwhile is promoted once it is back (the operator retries).
            // Refused otherwise only when the demotion was not of an idle volume (its position is
            // then not consistent): the operator forces it, as `--force-inconsistent` would.
            guard site(name).running else {
                after(rng.nanos(10_000_000...100_000_000), .promoteAgain(name))
                return
            }
            if !promote(name, force: false, why: "demote undone") {
                promote(name, force: true, why: "demote undone")
            }
        case .switchoverStep(let from, let to, let deadline):
            switchoverStep(from: from, to: to, deadline: deadline)
        case .resolve(let name, let peer):
            resolve(name, peer: peer)
        }
    }

    // MARK: - Sites

    /// Starts `name` in the role its catalog records.
    func start(_ name: String, fresh: Bool) {
        let s = site(name)
        s.running = true
        if s.config != nil { startPrimary(name, fresh: fresh) } else { startReplica(name) }
    }

    func crash(_ name: String) {
        let s = site(name)
        guard s.running else { return }
        let powerLoss = rng.chance(scenario.powerLoss)
        log("\(name) crashes (\(powerLoss ? "power loss" : "kill -9"))")
        if s.primary != nil { checkNothingAcknowledgedIsMissing(name) }
        for peer in siteNames where peer != name { cut(name, peer, reason: "\(name) crashed") }
        s.running = false
        s.incarnation += 1
        s.disk.crash(powerLoss: powerLoss, &rng)
        if s.primary != nil {
            s.primary = nil
            if powerLoss {
                // The journal is an append-only file: a crash keeps its durable part and some prefix of the rest.
                let durable = s.journal.prefix { $0.durable }.count
                s.journal = Array(s.journal.prefix(durable + rng.int(0...(s.journal.count - durable))))
            }
            s.pendingFlushes.removeAll()
            s.preserved = [:]
            s.client.reset()
        } else if s.replica != nil {
            s.replica = nil
            if powerLoss {
                // Writes it had only written (acked, not flushed) are gone: a double failure, which P1
                // does not cover. From now on only what a flush made durable is still required of it,
                // until the primary's catch-up brings it back.
                for other in sites.values { other.client.requiredApplied[name] = other.client.requiredDurable[name] }
                let keep = s.store.durableLogCount + rng.int(0...(s.store.log.count - s.store.durableLogCount))
                s.store.log.removeLast(s.store.log.count - keep)
            }
            s.store.durableLogCount = s.store.log.count
            s.store.applyIssuedCount = 0
            s.store.appliedPending = []
            s.store.heldPayloads = [:]
        }
        if !workloadOver { after(rng.nanos(50_000_000...600_000_000), .restart(name)) }
    }

    func restart(_ name: String) {
        log("\(name) restarts")
        start(name, fresh: false)
        for peer in siteNames where peer != name { after(rng.nanos(1_000_000...50_000_000), .connect(name, peer)) }
        // The VM comes back with its primary, unless it runs elsewhere now.
        if site(name).primary != nil, !sites.values.contains(where: { $0.clientAttached && $0.name != name }) {
            attachClient(name)
        }
    }

    func attachClient(_ name: String) {
        let s = site(name)
        guard !s.clientAttached else { return }
        s.clientAttached = true
        after(0, .clientIssue(name))
    }

    // MARK: - The client

    func issueClientOps(_ name: String) {
        let s = site(name)
        guard !workloadOver, s.serving else { return }
        while s.client.outstanding.count < scenario.queueDepth, rng.chance(0.7) {
            let roll = rng.int(0...99)
            if roll < 10 {
                submit(name, .flush)
                continue
            }
            let first = rng.int(0...sectors - 1)
            let count = min(rng.pick([1, 1, 2, 8, 16, 40]), sectors - first)
            let range = BlockRange(offset: UInt64(first) * sectorSize, length: UInt64(count) * sectorSize)
            if roll < 20 {
                submit(name, .zero(range, fua: rng.chance(0.2)))
            } else {
                submit(name, .write(range, fua: roll < 30))
            }
        }
    }

    func submit(_ name: String, _ request: PrimaryVolume.Request) {
        let s = site(name)
        guard var machine = s.primary else { return }
        var stamps: [UInt64] = []
        switch request {
        case .write(let range, _):
            let id = nextWriteID
            nextWriteID += 1
            stamps = (0..<Int(range.length / sectorSize)).map { id << 16 | UInt64($0 + 1) }
            for stamp in stamps { stampWriter[stamp] = name }
        case .zero(let range, _):
            stamps = Array(repeating: 0, count: Int(range.length / sectorSize))
        case .flush:
            break
        }
        let (seq, actions) = machine.submit(request, now: instant)
        s.primary = machine
        var op = ClientOp(kind: request, stamps: stamps, submittedAt: now)
        if case .flush = request { op.coveredSnapshot = s.client.latestCompleted }
        s.client.outstanding[seq] = op
        s.client.payloads[seq] = stamps
        log("\(name) client submits \(seq): \(request)")
        runPrimary(name, actions)
    }

    func completed(_ name: String, _ seq: UInt64, error: String?) {
        let s = site(name)
        guard let op = s.client.outstanding.removeValue(forKey: seq) else { return }
        opsCompleted += 1
        if let error {
            // A fenced primary answers with an error: nothing was promised.
            if !s.isFenced { fail("\(name): request \(seq) failed: \(error)") }
            return
        }
        guard let machine = s.primary, let config = s.config else { return }
        let statuses = machine.status(now: instant)
        let inSync = Set(statuses.filter(\.rpoZero).map(\.peer))
        let zeros = Array(repeating: UInt64(0), count: sectors)
        for (peer, policy) in config.peers where inSync.contains(peer) {
            var applied = s.client.requiredApplied[peer] ?? zeros
            var durable = s.client.requiredDurable[peer] ?? zeros
            switch op.kind {
            case .write(let range, let fua), .zero(let range, let fua):
                let first = Int(range.offset / sectorSize)
                for i in 0..<op.stamps.count {
                    applied[first + i] = max(applied[first + i], seq)
                    if fua && policy.mode == .sync { durable[first + i] = max(durable[first + i], seq) }
                }
            case .flush:
                guard policy.mode == .sync else { continue }
                for (i, covered) in (op.coveredSnapshot ?? []).enumerated() {
                    durable[i] = max(durable[i], covered)
                    applied[i] = max(applied[i], covered)
                }
            }
            s.client.requiredApplied[peer] = applied
            s.client.requiredDurable[peer] = durable
        }
        switch op.kind {
        case .write(let range, _), .zero(let range, _):
            let first = Int(range.offset / sectorSize)
            for i in 0..<op.stamps.count { s.client.latestCompleted[first + i] = max(s.client.latestCompleted[first + i], seq) }
        case .flush:
            break
        }
    }
}
