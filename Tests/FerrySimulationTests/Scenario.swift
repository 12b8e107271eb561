@testable import FerryCore

/// What one seed draws: the peers and their modes, the workload, the network, and the faults.
struct Scenario: CustomStringConvertible {
    var seed: UInt64
    var peers: [(name: String, policy: ReplicaPolicy)]
    var sectors = 128
    var sectorSize: UInt64 = 512
    var workloadNanos: Int64
    var queueDepth: Int
    var netDelay: ClosedRange<Int64>
    var linkCutsPerSecond: Double
    var primaryCrashesPerSecond: Double
    var replicaCrashesPerSecond: Double
    var powerLoss: Double
    var checkpointsPerSecond: Double
    var bug: PlantedBug?
    /// Failover schedules: roles move (promotions after crashes, promotions behind a partition
    /// that make a split brain, switchovers), and an operator resolves split brains.
    var roles = false
    var failoversPerSecond = 0.0
    var splitsPerSecond = 0.0
    var switchoversPerSecond = 0.0
    /// `ferry demote` of the serving primary, then `ferry promote` of that same site (an undo),
    /// drawn from a stream of its own so that every other draw of a seed stays as it was.
    var undoDemotesPerSecond = 0.0
    /// How often a refused promotion (an inconsistent replica) is forced.
    var forceChance = 0.0

    /// The first primary's name.
    static let firstPrimary = "east"

    init(seed: UInt64, bug: PlantedBug? = nil, modes: [ReplicationMode]? = nil, roles: Bool = false) {
        self.seed = seed
        self.bug = bug
        var rng = SimRandom(seed: seed ^ 0x5EED)
        let count = modes?.count ?? rng.int(1...2)
        var peers: [(String, ReplicaPolicy)] = []
        for i in 0..<count {
            let mode = modes?[i] ?? rng.pick(ReplicationMode.allCases)
            var policy = ReplicaPolicy(mode: mode)
            switch mode {
            case .sync, .semiSync:
                policy.onPeerLoss = rng.chance(0.25) ? .block : .degrade
            case .async:
                policy.onLag = rng.chance(0.5) ? .pullAhead : .throttle
                policy.maxLagBytes = rng.pick([8 << 10, 32 << 10, 64 << 20])
                if rng.chance(0.3) { policy.maxLagSeconds = Int64(rng.int(1...3)) }
            case .scheduled:
                policy.schedule = Schedule.parseEvery(rng.pick(["1m", "2m"]))
            }
            peers.append((["west", "far", "vault"][i], policy))
        }
        // A resync rate on every third seed's first peer (a function of the seed, not a draw, so
        // the other draws stay as they were): catch-ups then wait for the token bucket.
        if seed % 3 == 0, !peers.isEmpty {
            peers[0].1.resyncRateBytesPerSecond = [UInt64(8 << 10), 64 << 10, 1 << 20][Int(seed / 3 % 3)]
        }
        self.peers = peers
        workloadNanos = rng.nanos(1_000_000_000...4_000_000_000)
        queueDepth = rng.int(1...8)
        let base = rng.pick([Int64(20_000), 200_000, 2_000_000])
        netDelay = base...(base * Int64(rng.int(1...4)))
        let faulty = rng.chance(0.85)
        linkCutsPerSecond = faulty ? rng.pick([0, 0.5, 2, 5]) : 0
        primaryCrashesPerSecond = faulty ? rng.pick([0, 0, 0.3, 1]) : 0
        replicaCrashesPerSecond = faulty ? rng.pick([0, 0, 0.3, 1]) : 0
        powerLoss = rng.pick([0, 0.5, 1])
        checkpointsPerSecond = rng.pick([0, 1, 3])
        if roles {
            // Drawn after everything else, so a seed's other draws are those of a plain schedule.
            self.roles = true
            workloadNanos = max(workloadNanos, rng.nanos(2_000_000_000...5_000_000_000))
            failoversPerSecond = rng.pick([0.3, 0.6, 1.2])
            splitsPerSecond = rng.pick([0, 0, 0.3, 0.6])
            switchoversPerSecond = rng.pick([0, 0.4, 1])
            forceChance = rng.pick([0, 0.2, 0.5])
            var own = SimRandom(seed: seed ^ 0xD0_DE_40_7E_5EED)
            undoDemotesPerSecond = own.chance(0.3) ? own.pick([0.3, 1]) : 0
        }
    }

    var description: String {
        let modes = peers.map { p -> String in
            var s = "\(p.name)=\(p.policy.mode.rawValue)"
            switch p.policy.mode {
            case .sync, .semiSync: s += "/\(p.policy.onPeerLoss.rawValue)"
            case .async: s += "/\(p.policy.onLag.rawValue)/\(p.policy.maxLagBytes.map(String.init) ?? "-")B"
            case .scheduled: s += "/\(p.policy.schedule.map(\.description) ?? "-")"
            }
            if let rate = p.policy.resyncRateBytesPerSecond { s += " resync-rate \(rate)B/s" }
            return s
        }.joined(separator: " ")
        return "seed \(seed): \(modes), \(workloadNanos / 1_000_000) ms, QD\(queueDepth), net \(netDelay.lowerBound / 1000)-\(netDelay.upperBound / 1000) µs, "
            + "cuts \(linkCutsPerSecond)/s, primary crashes \(primaryCrashesPerSecond)/s, replica crashes \(replicaCrashesPerSecond)/s, "
            + "power loss \(powerLoss)"
            + (roles ? ", failovers \(failoversPerSecond)/s, split brains \(splitsPerSecond)/s, switchovers \(switchoversPerSecond)/s, "
                + "force \(forceChance)" + (undoDemotesPerSecond > 0 ? ", demotes undone \(undoDemotesPerSecond)/s" : "") : "")
            + "\(bug.map { ", planted bug \($0.rawValue)" } ?? "")"
    }
}
