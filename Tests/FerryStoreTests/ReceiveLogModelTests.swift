import FerryCore
import Foundation
import NIOCore
import Testing
@testable import FerryStore

/// Seeded random schedules of appends, syncs, takes, releases, discards and crashes (torn tails
/// included), checked step by step against the simulation's model of the receive log
/// (`ReplicaNode.log`, `durableLogCount`, `applyIssuedCount`, `appliedPending` in
/// Tests/FerrySimulationTests/SimWorld+Replica.swift).
struct ReceiveLogModelTests {
    struct Model {
        enum Record: Equatable {
            case item(ReplicationItem, [UInt8]?)
            case barrier(ReplicationBarrier)

            /// Bytes the record takes in the file.
            var size: UInt64 {
                switch self {
                case .item(_, let payload): return UInt64(52 + (payload?.count ?? 0) + 8)
                case .barrier: return 60
                }
            }
        }
        var log: [Record] = []
        var durableLogCount = 0
        var applyIssuedCount = 0
        var appliedPending: [Int] = []

        func groupEnd(through index: UInt64) -> Int? {
            for i in (applyIssuedCount..<log.count).reversed() {
                if case .barrier(let b) = log[i], b.index == index { return i + 1 }
            }
            return nil
        }

        var barriers: [ReplicaVolume.LoggedBarrier] {
            log.compactMap { if case .barrier(let b) = $0 { return .init(index: b.index, seq: b.seq, kind: b.kind) } else { return nil } }
        }
    }

    @Test(arguments: 1...24 as ClosedRange<UInt64>)
    func scheduleMatchesTheSimulationModel(seed: UInt64) throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        var rng = SeededRandom(seed: seed)
        var model = Model()
        var (log, _) = try ReceiveLog.open(path: path)
        var nextIndex: UInt64 = 1
        var seq: UInt64 = 0
        let replay = "swift test --filter \"ReceiveLogModelTests\" (seed \(seed))"

        for step in 0..<400 {
            let where_ = Comment(rawValue: "seed \(seed), step \(step); replay: \(replay)")
            switch rng.int(0...99) {
            case 0..<40:
                seq += 1
                let zero = rng.int(0...4) == 0
                let payload = zero ? nil : (0..<(512 * rng.int(1...8))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                let item = ReplicationItem(epoch: 1, index: nextIndex, seq: seq, range: BlockRange(offset: UInt64(rng.int(0...1000)) * 512, length: UInt64(payload?.count ?? 4096)), isZero: zero)
                nextIndex += 1
                try log.append(item, payload: payload.map { ByteBuffer(bytes: $0) })
                model.log.append(.item(item, payload))
            case 40..<55:
                // syncLog: append the barrier, make the log durable.
                let barrier = ReplicationBarrier(epoch: 1, index: nextIndex, seq: seq, kind: rng.int(0...3) == 0 ? .flush : .cut)
                nextIndex += 1
                try log.appendBarrier(barrier)
                try log.sync()
                model.log.append(.barrier(barrier))
                model.durableLogCount = model.log.count
            case 55..<70:
                // applyLog through an untaken barrier (a later one covers earlier ones).
                let untaken = model.log[model.applyIssuedCount...].compactMap { if case .barrier(let b) = $0 { return b.index } else { return nil } }
                guard !untaken.isEmpty else { continue }
                let index = untaken[rng.int(0...untaken.count - 1)]
                let end = model.groupEnd(through: index)!
                let expected: [(ReplicationItem, [UInt8]?)] = model.log[model.applyIssuedCount..<end].compactMap {
                    if case .item(let item, let payload) = $0 { return (item, payload) } else { return nil }
                }
                let group = try log.takeGroup(throughBarrierIndex: index)
                #expect(group.map(\.0) == expected.map(\.0), where_)
                #expect(group.map { $0.1.map { Array($0.readableBytesView) } } == expected.map(\.1), where_)
                model.appliedPending.append(end - model.applyIssuedCount)
                model.applyIssuedCount = end
            case 70..<82:
                // logApplied: dropAppliedLog.
                guard let count = model.appliedPending.first else { continue }
                try log.releaseGroup()
                model.appliedPending.removeFirst()
                model.log.removeFirst(count)
                model.durableLogCount = max(0, model.durableLogCount - count)
                model.applyIssuedCount -= count
            case 82..<88:
                // discardLogTail; sometimes a new link, whose stream starts at 1 again.
                try log.discardUntaken()
                model.log.removeLast(model.log.count - model.applyIssuedCount)
                model.durableLogCount = min(model.durableLogCount, model.applyIssuedCount)
                if rng.int(0...1) == 0 { nextIndex = 1 }
            default:
                // A crash: the durable records and some prefix of the rest survive, the next one
                // possibly torn; the restarted replica has nothing taken.
                let keep = rng.int(model.durableLogCount...model.log.count)
                var size = log.bytes - model.log[keep...].reduce(0) { $0 + $1.size }
                if keep < model.log.count { size += UInt64(rng.int(0...Int(model.log[keep].size) - 1)) }
                log = try { () throws -> ReceiveLog in
                    Damage.cut(path, to: size)
                    let (reopened, barriers) = try ReceiveLog.open(path: path)
                    model.log.removeLast(model.log.count - keep)
                    #expect(barriers == model.barriers, where_)
                    return reopened
                }()
                model.durableLogCount = model.log.count
                model.applyIssuedCount = 0
                model.appliedPending = []
                nextIndex = 1
            }
            #expect(log.recordCount == model.log.count, where_)
            #expect(log.bytes == Damage.size(path), where_)
            if model.log.isEmpty { #expect(log.bytes == 0, where_) }
        }
    }
}

private extension SeededRandom {
    /// A number in `range`, by modulo (how these schedules were drawn from the start).
    mutating func int(_ range: ClosedRange<Int>) -> Int { range.lowerBound + Int(next() % UInt64(range.count)) }
}
