import FerryCore
import Foundation
import NIOCore
import Synchronization
import Testing
@testable import FerryStore

struct JournalStoreTests {
    final class Finished: Sendable {
        private let items = Mutex<[Int]>([])
        func append(_ item: Int) { items.withLock { $0.append(item) } }
        var all: [Int] { items.withLock { $0 } }
    }

    /// Writes of 1000 bytes, a zeroing every 5th sequence and a barrier every 7th.
    static func entry(_ seq: UInt64) -> (JournalEntry, ByteBuffer?) {
        if seq % 7 == 0 {
            return (JournalEntry(seq: seq, range: BlockRange(offset: 0, length: 0), isZero: false, isBarrier: true, atNanos: Int64(seq) * 10), nil)
        }
        if seq % 5 == 0 {
            return (JournalEntry(seq: seq, range: BlockRange(offset: seq * 4096, length: 65536), isZero: true, isBarrier: false, atNanos: Int64(seq) * 10), nil)
        }
        let entry = JournalEntry(seq: seq, range: BlockRange(offset: seq * 4096, length: 1000), isZero: false, isBarrier: false, atNanos: Int64(seq) * 10)
        return (entry, ByteBuffer(repeating: UInt8(truncatingIfNeeded: seq), count: 1000))
    }

    static func fill(_ journal: JournalStore, _ seqs: ClosedRange<UInt64>) throws {
        for seq in seqs {
            let (entry, payload) = entry(seq)
            try journal.append(entry, payload: payload)
        }
    }

    /// A sync taken under the caller's lock runs outside it; one taken later with nothing new to
    /// flush must still not return before the earlier one, which holds its entries, is done
    /// (two client flushes on two threads: the second reply must not come first).
    @Test func aLaterSyncWaitsForAnEarlierOneThatHoldsItsEntries() async throws {
        let dir = TemporaryDirectory()
        let (journal, _) = try JournalStore.open(directory: dir.file("journal"), segmentSize: 4096)
        try Self.fill(journal, 1...20)                  // several segments: closed ones are taken too
        let first = try journal.takeSync()
        let second = try journal.takeSync()             // nothing new appended: no file to sync
        try Self.fill(journal, 21...22)
        let third = try journal.takeSync()
        let finished = Finished()
        let runner = Thread {
            try? second.run()
            finished.append(2)
        }
        runner.start()
        let thirdRunner = Thread {
            try? third.run()
            finished.append(3)
        }
        thirdRunner.start()
        try await Task.sleep(for: .milliseconds(300))
        #expect(finished.all.isEmpty, "a later sync returned before the earlier one ran: \(finished.all)")
        try first.run()
        finished.append(1)
        let deadline = ContinuousClock.now + .seconds(30)
        while finished.all.count < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        // (Their order against this thread's 1 is a race: they may wake before it appends.)
        #expect(finished.all.count == 3 && Set(finished.all) == [1, 2, 3], "\(finished.all)")
        try journal.sync()                              // and the journal goes on as before
    }

    @Test func appendReadSyncTrimAndReopen() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("journal")
        let (journal, initial) = try JournalStore.open(directory: path, segmentSize: 4096)
        #expect(initial.isEmpty)
        try Self.fill(journal, 1...20)
        try journal.sync()
        #expect(journal.segmentNames.count > 3)
        #expect(journal.segmentNames.first == "journal-000001.seg")
        for seq: UInt64 in 1...20 {
            #expect(try journal.payload(seq: seq) == Self.entry(seq).1)
        }
        let sizes = try FileManager.default.contentsOfDirectory(atPath: path)
            .map { Damage.size(path + "/" + $0) }.reduce(0, +)
        #expect(journal.bytes == sizes)

        let before = journal.bytes
        let segmentsBefore = journal.segmentNames.count
        try journal.trim(through: 10)
        #expect(journal.bytes < before)
        #expect(journal.segmentNames.count < segmentsBefore)
        #expect(throws: StoreError.self) { try journal.payload(seq: 10) }
        #expect(try journal.payload(seq: 11) == Self.entry(11).1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: path).sorted() == journal.segmentNames)

        // Reopened: everything from the oldest remaining segment on, in order, intact.
        let (reopened, entries) = try JournalStore.open(directory: path, segmentSize: 4096)
        let first = try #require(entries.first?.seq)
        #expect(first <= 11)
        #expect(entries == (first...20).map { Self.entry($0).0 })
        #expect(try reopened.payload(seq: 20) == Self.entry(20).1)
        try Self.fill(reopened, 21...30)
        try reopened.sync()
        #expect(try reopened.payload(seq: 29) == Self.entry(29).1)
        // Trimming everything keeps the segment being written.
        try reopened.trim(through: 30)
        #expect(reopened.segmentNames.count == 1)
        let (_, after) = try JournalStore.open(directory: path, segmentSize: 4096)
        #expect(after.allSatisfy { $0.seq <= 30 })
    }

    @Test func aTornTailIsCutOff() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("journal")
        let (journal, _) = try JournalStore.open(directory: path)
        try Self.fill(journal, 1...6)
        try journal.sync()
        let file = path + "/journal-000001.seg"
        let whole = Damage.size(file)
        // The last record (seq 6, a 1000-byte write) loses its last bytes.
        Damage.cut(file, to: whole - 3)
        let (reopened, entries) = try JournalStore.open(directory: path)
        #expect(entries.map(\.seq) == [1, 2, 3, 4, 5])
        #expect(Damage.size(file) == whole - UInt64(44 + 1000 + 8))
        #expect(reopened.bytes == Damage.size(file))
        #expect(throws: StoreError.self) { try reopened.payload(seq: 6) }
        // Appending continues where the intact records end.
        try Self.fill(reopened, 6...8)
        try reopened.sync()
        let (_, again) = try JournalStore.open(directory: path)
        #expect(again.map(\.seq) == Array(1...8))
    }

    @Test func aCorruptRecordInTheMiddleEndsTheJournalThere() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("journal")
        let (journal, _) = try JournalStore.open(directory: path, segmentSize: 4096)
        try Self.fill(journal, 1...30)
        try journal.sync()
        let names = journal.segmentNames
        #expect(names.count >= 4)
        // Damage the first record of the second segment, in its payload or header.
        let (_, all) = try JournalStore.open(directory: path, segmentSize: 4096)
        #expect(all.count == 30)
        Damage.flip(path + "/" + names[1], at: 20)
        let (reopened, entries) = try JournalStore.open(directory: path, segmentSize: 4096)
        #expect(!entries.isEmpty)
        #expect(entries == (1...UInt64(entries.count)).map { Self.entry($0).0 })
        #expect(entries.count < 30)
        #expect(reopened.segmentNames == Array(names.prefix(2)))
        #expect(Damage.size(path + "/" + names[1]) == 0)
        #expect(try FileManager.default.contentsOfDirectory(atPath: path).sorted() == Array(names.prefix(2)))
        // The journal goes on from there.
        let next = UInt64(entries.count) + 1
        try Self.fill(reopened, next...next + 2)
        try reopened.sync()
        let (_, again) = try JournalStore.open(directory: path, segmentSize: 4096)
        #expect(again.map(\.seq) == Array(1...next + 2))
    }

    @Test func payloadsOfTheWrongSizeAndSequencesOutOfOrderAreRefused() throws {
        let dir = TemporaryDirectory()
        let (journal, _) = try JournalStore.open(directory: dir.file("journal"))
        let write = JournalEntry(seq: 1, range: BlockRange(offset: 0, length: 4096), isZero: false, isBarrier: false, atNanos: 0)
        #expect(throws: StoreError.self) { try journal.append(write, payload: ByteBuffer(repeating: 1, count: 512)) }
        #expect(throws: StoreError.self) { try journal.append(write, payload: nil) }
        try journal.append(write, payload: ByteBuffer(repeating: 1, count: 4096))
        let error = #expect(throws: StoreError.self) { try journal.append(write, payload: ByteBuffer(repeating: 1, count: 4096)) }
        #expect(error?.description.contains("does not follow") == true)
    }
}
