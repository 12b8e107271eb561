import FerryCore
import Testing
@testable import FerryTree

struct FastCDCTests {
    /// Small sizes, so that a few MiB make hundreds of chunks.
    static let small = FastCDC(minSize: 2 << 10, averageSize: 8 << 10, maxSize: 64 << 10)

    static func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
        var random = SeededRandom(seed: seed)
        var out = [UInt8](repeating: 0, count: count)
        var i = 0
        while i < count {
            var word = random.next()
            for _ in 0..<8 where i < count {
                out[i] = UInt8(truncatingIfNeeded: word)
                word >>= 8
                i += 1
            }
        }
        return out
    }

    @Test func chunksTileTheDataWithinTheBounds() {
        let data = Self.randomBytes(4 << 20, seed: 1)
        let chunks = Self.small.chunks(of: data)
        #expect(chunks.first?.lowerBound == 0 && chunks.last?.upperBound == data.count)
        for (a, b) in zip(chunks, chunks.dropFirst()) { #expect(a.upperBound == b.lowerBound) }
        for c in chunks.dropLast() { #expect(c.count >= 2 << 10 && c.count <= 64 << 10, "\(c.count)") }
        // Normalized chunking keeps the mean near min + average on random data.
        let mean = Double(data.count) / Double(chunks.count)
        #expect(mean > 6_000 && mean < 14_000, "mean chunk \(mean)")
    }

    @Test func anEditMovesOnlyTheCutsNearIt() {
        let data = Self.randomBytes(4 << 20, seed: 2)
        var edited = data
        edited.insert(contentsOf: [UInt8](repeating: 0x42, count: 100), at: 1_000_000)
        edited.removeSubrange(3_000_000..<3_000_037)
        func contents(_ bytes: [UInt8]) -> Set<[UInt8]> {
            Set(Self.small.chunks(of: bytes).map { Array(bytes[$0]) })
        }
        let before = contents(data), after = contents(edited)
        let changed = after.subtracting(before).count
        print("FastCDC: two edits of a 4 MiB stream changed \(changed) of \(after.count) chunks")
        #expect(changed >= 2 && changed <= 6, "\(changed) of \(after.count) chunks changed for two edits")
    }

    @Test func shortAndEmptyStreams() {
        #expect(Self.small.chunks(of: [UInt8]()).isEmpty)
        #expect(Self.small.chunks(of: [UInt8](repeating: 7, count: 100)) == [0..<100])
        // Zeros: the hash never reaches a cut, so every chunk is as long as allowed.
        let zeros = Self.small.chunks(of: [UInt8](repeating: 0, count: 200 << 10))
        #expect(zeros.dropLast().allSatisfy { $0.count == 64 << 10 }, "\(zeros.map(\.count))")
    }

    /// The gear table and masks are the chunk format: these cut points must never change.
    @Test func cutPointsAreStable() {
        let data = Self.randomBytes(256 << 10, seed: 42)
        let cuts = Self.small.chunks(of: data).map(\.upperBound)
        #expect(Array(cuts.prefix(8)) == Self.pinnedCuts, "cut points changed: \(Array(cuts.prefix(8)))")
        var seeded = SeededRandom(seed: 0x4665_7272_7943_4443)
        #expect(FastCDC.gear.count == 256 && FastCDC.gear[0] == seeded.next())
    }

    static let pinnedCuts = [10038, 19741, 28780, 38761, 47580, 58357, 67243, 75626]
}
