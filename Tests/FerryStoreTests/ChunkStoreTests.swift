import Foundation
import NIOCore
import Testing
@testable import FerryStore

struct ChunkStoreTests {
    /// A 32-byte ID from the content (four FNV-1a hashes with different seeds): stands in for
    /// SHA-256, which FerryStore does not link.
    static func id(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        for seed in 0..<4 as Range<UInt64> {
            var h: UInt64 = 0xcbf2_9ce4_8422_2325 ^ seed
            for b in data { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
            for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: h >> (8 * UInt64(i)))) }
        }
        return out
    }

    static func chunk(_ n: Int, size: Int = 3000) -> [UInt8] { (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ n &* 7 &+ n >> 8) } }

    static func directory() -> String {
        let dir = NSTemporaryDirectory() + "ferry-chunks-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func putGetDeduplicateAndPersist() throws {
        let dir = Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let store = try ChunkStore(directory: dir)
            for n in 0..<50 { #expect(try store.put(ByteBuffer(bytes: Self.chunk(n)), id: Self.id(Self.chunk(n)))) }
            #expect(try store.put(ByteBuffer(bytes: Self.chunk(7)), id: Self.id(Self.chunk(7))) == false, "a second put stores nothing")
            #expect(try store.get(Self.id(Self.chunk(3))) == ByteBuffer(bytes: Self.chunk(3)), "readable before commit")
            try store.commit()
            #expect(try store.count() == 50)
        }
        let store = try ChunkStore(directory: dir)
        #expect(try store.count() == 50)
        for n in [0, 25, 49] { #expect(try store.get(Self.id(Self.chunk(n))) == ByteBuffer(bytes: Self.chunk(n))) }
        let asked = (45..<55).map { Self.id(Self.chunk($0)) }
        #expect(try store.missing(asked) == (50..<55).map { Self.id(Self.chunk($0)) })
        #expect(try store.verify { Self.id(Array($0.readableBytesView)) }.isEmpty)
    }

    @Test func recordsWrittenButNotIndexedAreFoundAndATornTailIsCut() throws {
        let dir = Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let store = try ChunkStore(directory: dir)
            for n in 0..<10 { try store.put(ByteBuffer(bytes: Self.chunk(n)), id: Self.id(Self.chunk(n))) }
            try store.commit()
            for n in 10..<20 { try store.put(ByteBuffer(bytes: Self.chunk(n)), id: Self.id(Self.chunk(n))) }
            // "Crash": no commit; the last record is torn.
        }
        let pack = ChunkStore.packPath(dir, 1)
        let size = try FileManager.default.attributesOfItem(atPath: pack)[.size] as! Int
        let handle = FileHandle(forWritingAtPath: pack)!
        try handle.truncate(atOffset: UInt64(size - 100))
        try handle.close()

        let store = try ChunkStore(directory: dir)
        #expect(try store.count() == 19, "the 9 whole unindexed records are indexed, the torn one is not")
        #expect(try store.contains(Self.id(Self.chunk(18))))
        #expect(try !store.contains(Self.id(Self.chunk(19))))
        let cut = try FileManager.default.attributesOfItem(atPath: pack)[.size] as! Int
        #expect(cut == 19 * (ChunkStore.headerLength + 3000))
        #expect(try store.put(ByteBuffer(bytes: Self.chunk(19)), id: Self.id(Self.chunk(19))))
        try store.commit()
        #expect(try store.get(Self.id(Self.chunk(19))) == ByteBuffer(bytes: Self.chunk(19)))
    }

    @Test func damageIsNamedAndPacksRollOver() throws {
        let dir = Self.directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try ChunkStore(directory: dir, packLimit: 10_000)
        for n in 0..<12 { try store.put(ByteBuffer(bytes: Self.chunk(n)), id: Self.id(Self.chunk(n))) }
        try store.commit()
        let packs = try FileManager.default.contentsOfDirectory(atPath: dir + "/packs").filter { $0.hasSuffix(".pack") }
        // A pack takes records until it holds 10,000 bytes: 4 records of 3,048 bytes each.
        #expect(packs.count == 3, "\(packs)")
        // Flip a byte of chunk 4's data (the first record of pack 2).
        let pack = ChunkStore.packPath(dir, 2)
        let handle = FileHandle(forUpdatingAtPath: pack)!
        try handle.seek(toOffset: UInt64(ChunkStore.headerLength + 10))
        try handle.write(contentsOf: [0xFF])
        try handle.close()
        #expect(throws: StoreError.self) { try store.get(Self.id(Self.chunk(4))) }
        #expect(try store.verify { Self.id(Array($0.readableBytesView)) } == [Self.id(Self.chunk(4))])
        let reopened = try ChunkStore(directory: dir, packLimit: 10_000)
        #expect(try reopened.count() == 12)
        #expect(try reopened.get(Self.id(Self.chunk(11))) == ByteBuffer(bytes: Self.chunk(11)))
    }
}
