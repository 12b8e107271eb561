import Foundation
import Testing
@testable import FerryCore

/// The deterministic simulation (DESIGN §7): the FerryCore replication state machines, driven by
/// seeded schedules of a client, a network, disks and crashes. Every schedule checks P1 (sync:
/// nothing acknowledged is missing when the primary dies), P2 (async and scheduled: a consistent
/// replica is at a state the primary passed through at a barrier or point) and convergence (after
/// the faults stop, every replica holds the primary's bytes).
///
/// `FERRY_SIM_SCHEDULES=N` runs N schedules (default 200, from `FERRY_SIM_BASE`, default 1);
/// `FERRY_SIM_SEED=S` replays one with its trace; `make simulate` runs 20,000.
struct SimulationTests {
    static let environment = ProcessInfo.processInfo.environment

    static func replayCommand(_ seed: UInt64, bug: PlantedBug? = nil) -> String {
        "FERRY_SIM_SEED=\(seed)\(bug.map { " FERRY_SIM_BUG=\($0.rawValue)" } ?? "") swift test --filter FerrySimulationTests"
    }

    /// Runs one schedule; on failure returns the report with the trace's tail and the replay command.
    static func run(seed: UInt64, bug: PlantedBug? = nil) -> String? {
        guard SimWorld(Scenario(seed: seed, bug: bug)).run() != nil else { return nil }
        let world = SimWorld(Scenario(seed: seed, bug: bug))
        world.tracing = true
        let failure = world.run() ?? "failed once, passed when replayed with tracing: the schedule is not deterministic"
        return """
            \(world.scenario)
            \(failure)
            last events:
            \(world.trace.suffix(40).joined(separator: "\n"))
            replay: \(replayCommand(seed, bug: bug))
            """
    }

    @Test func everyPromiseHoldsOnEverySchedule() throws {
        if let text = Self.environment["FERRY_SIM_SEED"], let seed = UInt64(text) {
            let bug = Self.environment["FERRY_SIM_BUG"].flatMap(PlantedBug.init(rawValue:))
            let world = SimWorld(Scenario(seed: seed, bug: bug))
            world.tracing = true
            let failure = world.run()
            print(world.scenario)
            print(world.trace.joined(separator: "\n"))
            #expect(failure == nil, "\(failure ?? "")")
            return
        }
        let count = Self.environment["FERRY_SIM_SCHEDULES"].flatMap(Int.init) ?? 200
        let base = Self.environment["FERRY_SIM_BASE"].flatMap(UInt64.init) ?? 1
        var failures: [String] = []
        var checks = 0, ops = 0
        var modes: [ReplicationMode: Int] = [:]
        for seed in base..<base + UInt64(count) {
            let world = SimWorld(Scenario(seed: seed))
            if world.run() != nil, let report = Self.run(seed: seed) {
                failures.append(report)
                if failures.count >= 3 { break }
            }
            checks += world.checks
            ops += world.opsCompleted
            for p in world.scenario.peers { modes[p.policy.mode, default: 0] += 1 }
        }
        print("simulation: \(count) schedules from seed \(base), \(ops) client requests answered, \(checks) promise checks, modes \(modes.map { "\($0.key.rawValue) \($0.value)" }.sorted().joined(separator: ", "))")
        #expect(failures.isEmpty, "\(failures.count) schedule(s) failed:\n\(failures.joined(separator: "\n\n"))")
    }

    /// Each planted bug must be caught by some schedule: the checkers bite.
    @Test(arguments: PlantedBug.allCases)
    func plantedBugIsCaught(_ bug: PlantedBug) {
        var caught: (UInt64, String)?
        for seed in UInt64(1)...3000 {
            if let report = Self.run(seed: seed, bug: bug) {
                caught = (seed, report)
                break
            }
        }
        #expect(caught != nil, "no schedule caught the planted bug \(bug.rawValue)")
        if let (seed, report) = caught {
            print("planted bug \(bug.rawValue) caught by seed \(seed): \(report.split(separator: "\n").dropFirst().first ?? "")")
        }
    }
}
