import Testing
@testable import FerryCore

struct IntervalLockTests {
    @Test func admitsInOrderAndHoldsBackOverlaps() {
        var lock = IntervalLock()
        let a = lock.enqueue(1, range: BlockRange(offset: 0, length: 4096))
        // Disjoint: admitted at once.
        let b = lock.enqueue(2, range: BlockRange(offset: 8192, length: 4096))
        // Overlaps 1: waits, and so does everything after it (admission is in order).
        let c = lock.enqueue(3, range: BlockRange(offset: 2048, length: 4096))
        let d = lock.enqueue(4, range: BlockRange(offset: 65536, length: 4096))
        let e = lock.enqueue(5, range: nil)
        let f = lock.release(2)
        let g = lock.release(1)
        #expect(a == [1] && b == [2] && c == [] && d == [] && e == [] && f == [])
        #expect(g == [3, 4, 5])
        #expect(lock.isHeld(3) && lock.isHeld(4) && !lock.isHeld(5))
    }
}

struct DirtyBitmapTests {
    @Test func setsClearsAndFindsRegions() {
        var bitmap = DirtyBitmap(volumeSize: 1 << 20, regionSize: 65536)
        #expect(bitmap.regionCount == 16)
        let added = bitmap.set(BlockRange(offset: 65535, length: 2))
        #expect(added == 2)
        #expect(bitmap.count == 2 && bitmap.contains(0) && bitmap.contains(1))
        #expect(bitmap.firstSet(from: 1) == 1)
        #expect(bitmap.firstSet(from: 2) == nil)
        let cleared = bitmap.clearRegion(0)
        #expect(cleared)
        #expect(bitmap.dirtyBytes == 65536)
        let copy = DirtyBitmap(volumeSize: 1 << 20, regionSize: 65536, words: bitmap.words)
        #expect(copy == bitmap)
        bitmap.setAll()
        #expect(bitmap.count == 16)
    }

    @Test func journalLagCountsOnlyLiveEntriesAlsoAfterTrimmedOnesAreDropped() {
        var journal = Journal()
        func entry(_ seq: UInt64) -> JournalEntry {
            JournalEntry(seq: seq, range: BlockRange(offset: seq * 4096, length: 4096), isZero: false, isBarrier: false, atNanos: Int64(seq))
        }
        for seq in UInt64(1)...10_000 { journal.append(entry(seq)) }
        #expect(journal.bytes(after: 0) == 10_000 * 4096)
        // Trimming 6,000 of 10,000 drops them from memory (more than 4,096 dead, over half).
        journal.trim(through: 6_000)
        #expect(journal.bytes(after: 6_000) == 4_000 * 4096, "a peer right at the trim point lags by what is live")
        #expect(journal.bytes(after: 8_000) == 2_000 * 4096)
        #expect(journal.bytes(after: 10_000) == 0)
        for seq in UInt64(10_001)...20_000 { journal.append(entry(seq)) }
        journal.trim(through: 16_000)
        #expect(journal.bytes(after: 16_000) == 4_000 * 4096)
        #expect(journal.bytes(after: 19_999) == 4096)
    }

    @Test func runsOfDirtyRegionsStopAtACleanRegionTheLimitOrTheEnd() {
        var bitmap = DirtyBitmap(volumeSize: 10 * 4096 + 100, regionSize: 4096)   // 11 regions, the last short
        for r in [1, 2, 3, 5, 8, 9, 10] { bitmap.setRegion(r) }
        #expect(bitmap.run(from: 1, limit: 100) == 1..<4)
        #expect(bitmap.run(from: 1, limit: 2) == 1..<3)
        #expect(bitmap.run(from: 0, limit: 100).isEmpty)
        #expect(bitmap.run(from: 1, limit: 100, stop: { $0 == 3 }) == 1..<3)
        #expect(bitmap.run(from: 8, limit: 100) == 8..<11)
        #expect(bitmap.range(ofRegions: 8..<11) == BlockRange(offset: 8 * 4096, length: 2 * 4096 + 100))
        #expect(bitmap.range(ofRegions: 5..<6) == bitmap.range(ofRegion: 5))
    }

    @Test(arguments: [(UInt64(256) << 20, UInt64(4096)), (UInt64(1) << 30, UInt64(4096)), (UInt64(20) << 30, UInt64(128) << 10),
                      (UInt64(4) << 40, UInt64(1) << 20)])
    func regionSizeKeepsTheBitmapSmall(_ size: UInt64, _ expected: UInt64) {
        #expect(PrimaryVolume.Config.regionSize(forVolumeSize: size) == expected)
    }
}

struct RequestTableTests {
    /// Random adds (mostly in sequence order, with gaps; now and then an older one), changes in
    /// place and removals, long-lived requests among them, against a dictionary: the same
    /// contents, order, count and oldest.
    @Test func behavesAsAnOrderedDictionary() {
        var rng = SeededRandom(seed: 11)
        var table = RequestTable<Int>()
        var model: [UInt64: Int] = [:]
        var next: UInt64 = 1
        for step in 0..<20_000 {
            switch rng.next() % 10 {
            case 0...3:
                next += rng.next() % 3 == 0 ? 2 : 1
                table[next] = step
                model[next] = step
            case 4...6:
                // Leave about in order: mostly one of the oldest, sometimes any.
                let keys = model.keys.sorted()
                guard !keys.isEmpty else { continue }
                let pick = rng.next() % 4 == 0 ? keys[Int(rng.next() % UInt64(keys.count))] : keys[Int(rng.next() % UInt64(min(3, keys.count)))]
                if pick == keys.first, rng.next() % 50 == 0 { continue }   // the oldest lingers now and then
                table[pick] = nil
                model[pick] = nil
            case 7:
                table.update { seq, value in
                    value += 1
                    model[seq]! += 1
                    return seq % 7 != 0 || { model[seq] = nil; return false }()
                }
            case 8:
                // Older than the newest (the machine never does it; the table stays correct).
                let seq = 1 + rng.next() % next
                guard model[seq] == nil else { continue }
                table[seq] = step
                model[seq] = step
            default:
                if let key = model.keys.randomElement(using: &rng) {
                    table[key]? *= 2
                    model[key]! *= 2
                }
                #expect(table[next + 1] == nil)
            }
            #expect(table.count == model.count)
            #expect(table.oldest == model.keys.min())
            if step % 97 == 0 {
                #expect(table.sequences.filter { table[$0] != nil } == model.keys.sorted())
                #expect(table.inFlight == model.keys.sorted().map { model[$0]! })
            }
        }
    }
}
