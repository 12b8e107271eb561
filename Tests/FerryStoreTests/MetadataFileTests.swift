import FerryCore
import Foundation
import Testing
@testable import FerryStore

struct MetadataFileTests {
    struct Sample: Codable, Equatable {
        var name: String
        var words: [UInt64]
    }

    @Test func aMissingFileLoadsAsNothingThenRoundTrips() throws {
        let dir = TemporaryDirectory()
        let file = try MetadataFile<Sample>(path: dir.file("m.meta"))
        #expect(try file.load() == nil)
        try file.store(Sample(name: "one", words: [1]))
        #expect(try file.load() == Sample(name: "one", words: [1]))
        try file.store(Sample(name: "two", words: [2, 3]))
        #expect(try file.load() == Sample(name: "two", words: [2, 3]))
        // A new instance (a restart) reads the same.
        let again = try MetadataFile<Sample>(path: dir.file("m.meta"))
        #expect(try again.load() == Sample(name: "two", words: [2, 3]))
        try again.store(Sample(name: "three", words: []))
        #expect(try MetadataFile<Sample>(path: dir.file("m.meta")).load() == Sample(name: "three", words: []))
    }

    @Test func aTornWriteOfTheNewerSlotFallsBackToTheOlder() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("m.meta")
        let file = try MetadataFile<Sample>(path: path)
        try file.store(Sample(name: "older", words: [1]))   // slot A
        try file.store(Sample(name: "newer", words: [2]))   // slot B, at half the file
        let slotB = Damage.size(path) / 2
        Damage.flip(path, at: slotB + 40)                   // inside slot B's body
        #expect(try MetadataFile<Sample>(path: path).load() == Sample(name: "older", words: [1]))

        // The next store goes to the damaged slot, never over the intact one.
        let reopened = try MetadataFile<Sample>(path: path)
        #expect(try reopened.load() == Sample(name: "older", words: [1]))
        try reopened.store(Sample(name: "third", words: [3]))
        #expect(try MetadataFile<Sample>(path: path).load() == Sample(name: "third", words: [3]))
        Damage.flip(path, at: slotB + 40)
        #expect(try MetadataFile<Sample>(path: path).load() == Sample(name: "older", words: [1]))
    }

    @Test func bothSlotsCorruptIsAnErrorNamingTheFile() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("m.meta")
        let file = try MetadataFile<Sample>(path: path)
        try file.store(Sample(name: "a", words: [1]))
        try file.store(Sample(name: "b", words: [2]))
        Damage.flip(path, at: 40)
        Damage.flip(path, at: Damage.size(path) / 2 + 40)
        let error = #expect(throws: StoreError.self) { try MetadataFile<Sample>(path: path).load() }
        #expect(error?.path == path)
        #expect(error?.description.contains(path) == true)
        #expect(error?.description.contains("no intact copy") == true)
    }

    @Test func largeValuesGrowTheFileAndKeepTheFallback() throws {
        let dir = TemporaryDirectory()
        let path = dir.file("m.meta")
        let file = try MetadataFile<Sample>(path: path)
        let small1 = Sample(name: "small1", words: [1])
        let small2 = Sample(name: "small2", words: [2])
        // Far more than a 64 KiB slot as JSON.
        let big = Sample(name: "big", words: (0..<40_000).map { UInt64($0) &* 0x9E37_79B9_7F4A_7C15 })
        try file.store(small1)   // A
        try file.store(small2)   // B: the newest is in B when the file must grow
        try file.store(big)
        #expect(Damage.size(path) > 2 * (64 << 10))
        #expect(try MetadataFile<Sample>(path: path).load() == big)
        // The newest is in the new slot B; damaging it falls back to the value before it.
        Damage.flip(path, at: Damage.size(path) / 2 + 40)
        #expect(try MetadataFile<Sample>(path: path).load() == small2)

        let again = try MetadataFile<Sample>(path: path)
        try again.store(big)
        try again.store(small1)
        try again.store(big)
        #expect(try MetadataFile<Sample>(path: path).load() == big)
    }

    @Test func replicationStateRoundTrips() throws {
        let dir = TemporaryDirectory()
        let position = ReplicaPosition(epoch: 3, generation: 7, appliedSeq: 123_456, consistent: true, initialized: true)
        let positions = try MetadataFile<ReplicaPosition>(path: dir.file("position.meta"))
        try positions.store(position)
        #expect(try MetadataFile<ReplicaPosition>(path: dir.file("position.meta")).load() == position)

        // A 1 TiB volume at 64 KiB regions: 2^24 regions, 2^18 words per peer.
        var words = [UInt64](repeating: 0, count: 1 << 18)
        words[0] = .max
        words[12_345] = 0x8000_0000_0000_0001
        words[(1 << 18) - 1] = 42
        let metadata = PrimaryVolume.Metadata(
            activityLog: [0, 5, 9000],
            peers: [
                "b": .init(dirtyWords: words, initialSyncPending: false,
                           lastPoint: PointRecord(seq: 99, cutAtSeconds: 1_700_000_000, completedAtSeconds: 1_700_000_060, bytes: 1 << 30, regions: 16384),
                           journaled: true),
                "c": .init(dirtyWords: [], initialSyncPending: true, lastPoint: nil),
                // Every field, the optional ones too (rivalEpoch was once kept only in memory).
                "d": .init(dirtyWords: [1], initialSyncPending: false, lastPoint: nil, journaled: true, ackedSeq: 77,
                           rivalEpoch: 6, dirtySince: 1_700_000_123.5),
            ],
            lastSeq: 1_000_000, sequenceCeiling: 2_048_576)
        let primary = try MetadataFile<PrimaryVolume.Metadata>(path: dir.file("primary.meta"))
        try primary.store(metadata)
        #expect(try MetadataFile<PrimaryVolume.Metadata>(path: dir.file("primary.meta")).load() == metadata)
    }
}
