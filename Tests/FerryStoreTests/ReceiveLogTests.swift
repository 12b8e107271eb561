import FerryCore
import Foundation
import NIOCore
import Testing
@testable import FerryStore

struct ReceiveLogTests {
    static func item(_ index: UInt64, seq: UInt64, zero: Bool = false) -> (ReplicationItem, ByteBuffer?) {
        let item = ReplicationItem(epoch: 2, index: index, seq: seq, range: BlockRange(offset: index * 8192, length: 4096), isZero: zero)
        return (item, zero ? nil : ByteBuffer(repeating: UInt8(truncatingIfNeeded: index), count: 4096))
    }

    static func barrier(_ index: UInt64, seq: UInt64, kind: BarrierKind = .cut) -> ReplicationBarrier {
        ReplicationBarrier(epoch: 2, index: index, seq: seq, kind: kind)
    }

    /// Appends items at `indexes` and then a barrier at the next index, then syncs (what
    /// `appendLog` … `syncLog` do).
    @discardableResult
    static func group(_ log: ReceiveLog, _ indexes: ClosedRange<UInt64>, zero: Set<UInt64> = []) throws -> ReplicationBarrier {
        for i in indexes {
            let (item, payload) = item(i, seq: i * 10, zero: zero.contains(i))
            try log.append(item, payload: payload)
        }
        let b = barrier(indexes.upperBound + 1, seq: indexes.upperBound * 10)
        try log.appendBarrier(b)
        try log.sync()
        return b
    }

    static func expectGroup(_ group: [(ReplicationItem, ByteBuffer?)], _ indexes: ClosedRange<UInt64>, zero: Set<UInt64> = []) {
        #expect(group.map(\.0) == indexes.map { item($0, seq: $0 * 10, zero: zero.contains($0)).0 })
        #expect(group.map(\.1) == indexes.map { item($0, seq: $0 * 10, zero: zero.contains($0)).1 })
    }

    @Test func appendSyncTakeReleaseCycles() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        let (log, barriers) = try ReceiveLog.open(path: path)
        #expect(barriers.isEmpty)
        #expect(log.bytes == 0)
        try Self.group(log, 1...3, zero: [2])     // barrier 4
        try Self.group(log, 5...6)                // barrier 7
        let g1 = try log.takeGroup(throughBarrierIndex: 4)
        Self.expectGroup(g1, 1...3, zero: [2])
        try Self.group(log, 8...8)                // barrier 9, appended while g1 is applied
        let g2 = try log.takeGroup(throughBarrierIndex: 7)
        Self.expectGroup(g2, 5...6)
        try log.releaseGroup()                    // g1
        #expect(log.recordCount == 3 + 2)
        try log.releaseGroup()                    // g2
        #expect(log.recordCount == 2)
        #expect(log.bytes == Damage.size(path))
        Self.expectGroup(try log.takeGroup(throughBarrierIndex: 9), 8...8)
        try log.releaseGroup()
        // Nothing left: the file is cut to nothing.
        #expect(log.recordCount == 0)
        #expect(log.bytes == 0)
        #expect(Damage.size(path) == 0)
        #expect(throws: StoreError.self) { try log.releaseGroup() }
        // And it starts again.
        try Self.group(log, 10...11)
        Self.expectGroup(try log.takeGroup(throughBarrierIndex: 12), 10...11)
    }

    @Test func releasedGroupsDoNotComeBackAfterARestart() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        let (log, _) = try ReceiveLog.open(path: path)
        try Self.group(log, 1...2)                // barrier 3
        try Self.group(log, 4...5)                // barrier 6
        _ = try log.takeGroup(throughBarrierIndex: 3)
        _ = try log.takeGroup(throughBarrierIndex: 6)
        try log.releaseGroup()                    // group 1 is gone for good; group 2 is taken, not released
        let (reopened, barriers) = try ReceiveLog.open(path: path)
        #expect(barriers == [.init(index: 6, seq: 50, kind: .cut)])
        // After a restart, taking through the last recovered barrier takes everything up to it.
        Self.expectGroup(try reopened.takeGroup(throughBarrierIndex: 6), 4...5)
        try reopened.discardUntaken()
        try reopened.releaseGroup()
        #expect(Damage.size(path) == 0)
    }

    /// After a restart, groups the image already holds are dropped without being handed out
    /// (`skipLog`), durably; the ones after them are applied as before.
    @Test func skippedGroupsAreDroppedDurablyAndTheRestStillApplies() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        let (log, _) = try ReceiveLog.open(path: path)
        try Self.group(log, 1...2)                // barrier 3
        try Self.group(log, 4...5)                // barrier 6
        try Self.group(log, 7...7)                // barrier 8
        let (restarted, barriers) = try ReceiveLog.open(path: path)
        #expect(barriers.map(\.index) == [3, 6, 8])
        #expect(throws: StoreError.self) { try restarted.skipGroups(4) }
        try restarted.skipGroups(2)
        #expect(restarted.recordCount == 2)
        let (again, left) = try ReceiveLog.open(path: path)
        #expect(left == [.init(index: 8, seq: 70, kind: .cut)])
        Self.expectGroup(try again.takeGroup(throughBarrierIndex: 8), 7...7)
        #expect(throws: StoreError.self) { try again.skipGroups(1) }   // only before anything is taken
        try again.releaseGroup()
        #expect(Damage.size(path) == 0)
    }

    @Test func discardDropsOnlyWhatIsNotTaken() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        let (log, _) = try ReceiveLog.open(path: path)
        try Self.group(log, 1...2)                // barrier 3
        _ = try log.takeGroup(throughBarrierIndex: 3)
        let takenEnd = log.bytes
        try Self.group(log, 4...5)                // barrier 6: durable but not taken
        try log.append(Self.item(7, seq: 70).0, payload: Self.item(7, seq: 70).1)  // an unfinished group
        try log.discardUntaken()
        #expect(log.recordCount == 3)
        #expect(log.bytes == takenEnd)
        #expect(Damage.size(path) == takenEnd)
        #expect(throws: StoreError.self) { try log.takeGroup(throughBarrierIndex: 6) }
        // A crash now: only the taken group is there to be applied again.
        let (_, barriers) = try ReceiveLog.open(path: path)
        #expect(barriers == [.init(index: 3, seq: 20, kind: .cut)])

        // With nothing taken, a discard empties the file.
        try log.releaseGroup()
        try Self.group(log, 1...2)
        try log.discardUntaken()
        #expect(log.bytes == 0)
        #expect(Damage.size(path) == 0)
    }

    @Test func aTornTailIsCutAtOpenAndTheBarriersBeforeItRecovered() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        let (log, _) = try ReceiveLog.open(path: path)
        try Self.group(log, 1...2)                                       // barrier 3
        try log.appendBarrier(Self.barrier(4, seq: 25, kind: .flush))    // barrier 4, alone
        try log.sync()
        let intact = log.bytes
        try log.append(Self.item(5, seq: 50).0, payload: Self.item(5, seq: 50).1)
        try log.appendBarrier(Self.barrier(6, seq: 50))
        try log.sync()
        // Power loss: the last barrier's record is torn.
        Damage.cut(path, to: log.bytes - 5)
        let (reopened, barriers) = try ReceiveLog.open(path: path)
        #expect(barriers == [.init(index: 3, seq: 20, kind: .cut), .init(index: 4, seq: 25, kind: .flush)])
        #expect(reopened.bytes == Damage.size(path))
        #expect(reopened.bytes == intact + UInt64(52 + 4096 + 8))
        // ReplicaVolume.recover: apply through the last barrier, drop the rest.
        Self.expectGroup(try reopened.takeGroup(throughBarrierIndex: 4), 1...2)
        try reopened.discardUntaken()
        #expect(reopened.bytes == intact)
        try reopened.releaseGroup()
        #expect(Damage.size(path) == 0)
    }

    @Test func aCorruptRecordEndsTheLogThere() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        let (log, _) = try ReceiveLog.open(path: path)
        try Self.group(log, 1...1)                // barrier 2
        let firstGroupEnd = log.bytes
        try Self.group(log, 3...3)                // barrier 4
        try Self.group(log, 5...5)                // barrier 6
        Damage.flip(path, at: firstGroupEnd + 100) // in item 3's payload
        let (reopened, barriers) = try ReceiveLog.open(path: path)
        #expect(barriers.map(\.index) == [2])
        #expect(reopened.bytes == firstGroupEnd)
    }

    @Test func takingScansOnlyUntakenRecords() throws {
        let dir = TemporaryDirectory()
        let (log, _) = try ReceiveLog.open(path: dir.file("receive.log"))
        try Self.group(log, 1...1)                // barrier 2 (first link)
        _ = try log.takeGroup(throughBarrierIndex: 2)
        // A new link numbers its stream from 1 again.
        try log.append(Self.item(1, seq: 30).0, payload: Self.item(1, seq: 30).1)
        try log.appendBarrier(Self.barrier(2, seq: 30))
        let group = try log.takeGroup(throughBarrierIndex: 2)
        #expect(group.map(\.0) == [Self.item(1, seq: 30).0])
        let error = #expect(throws: StoreError.self) { try log.takeGroup(throughBarrierIndex: 2) }
        #expect(error?.description.contains("no barrier with stream index 2") == true)
    }

    @Test func aDamagedHeaderCopyFallsBackToTheOtherOne() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("receive.log")
        let (log, _) = try ReceiveLog.open(path: path)
        try Self.group(log, 1...1)                // barrier 2
        try Self.group(log, 3...3)                // barrier 4
        try Self.group(log, 5...5)                // barrier 6
        _ = try log.takeGroup(throughBarrierIndex: 2)
        try log.releaseGroup()                    // header generation 1 (copy at 512): start at group 2
        _ = try log.takeGroup(throughBarrierIndex: 4)
        try log.releaseGroup()                    // header generation 2 (copy at 0): start at group 3
        #expect(try ReceiveLog.open(path: path).1.map(\.index) == [6])
        // The newer copy torn: the older start holds, one released group comes back.
        Damage.flip(path, at: 10)
        #expect(try ReceiveLog.open(path: path).1.map(\.index) == [4, 6])
        // Both damaged: where the log starts is unknown — an error, not a guess.
        Damage.flip(path, at: 512 + 10)
        let error = #expect(throws: StoreError.self) { try ReceiveLog.open(path: path) }
        #expect(error?.description.contains(path) == true)
    }

    @Test func payloadsOfTheWrongSizeAreRefused() throws {
        let dir = TemporaryDirectory()
        let (log, _) = try ReceiveLog.open(path: dir.file("receive.log"))
        let (item, _) = Self.item(1, seq: 10)
        #expect(throws: StoreError.self) { try log.append(item, payload: ByteBuffer(repeating: 0, count: 100)) }
        #expect(throws: StoreError.self) { try log.append(item, payload: nil) }
        #expect(log.bytes == 0)
    }
}
