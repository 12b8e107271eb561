import Testing
@testable import FerryCore

@Suite struct RetentionTests {
    @Test func gridParsesAndRejectsWhatIsNotAGrid() {
        #expect(Retention.parseGrid("24x1h | 30x1d | 12x30d")?.map(\.count) == [24, 30, 12])
        #expect(Retention.parseGrid("1x15m")?.first?.seconds == 900)
        for bad in ["", "24", "x1h", "0x1h", "24x", "24x1H", "24x1h |", "24 hours", "-1x1h"] {
            #expect(Retention.parseGrid(bad) == nil, "\(bad)")
        }
    }

    @Test func theNewestPerBucketIsKeptAndNothingOlderThanTheGrid() {
        let now = 100_000.0
        // One snapshot a minute for 3 hours.
        let times = (0..<180).map { now - Double($0) * 60 }
        let r = Retention(grid: Retention.parseGrid("2x1h")!, last: nil)
        let kept = r.kept(times: times, now: now)
        // The newest (now), the newest of the second hour (60 min ago), nothing beyond 2 h.
        #expect(kept.map { times[$0] }.sorted() == [now - 3600, now])
        #expect(kept.allSatisfy { times[$0] >= now - 7200 })
    }

    @Test func lastNAndTheNewestAreAlwaysKept() {
        let now = 1_000.0
        let times = [now - 10, now - 20, now - 30, now - 10_000_000]
        #expect(Retention(grid: Retention.parseGrid("1x1s")!, last: 2).kept(times: times, now: now) == [0, 1])
        #expect(Retention(grid: [], last: 1).kept(times: times, now: now) == [0])
        // The newest snapshot is kept even when it is older than the whole grid.
        #expect(Retention(grid: Retention.parseGrid("1x1s")!, last: nil).kept(times: [now - 500], now: now) == [0])
    }

    @Test func aGridKeepsOnePerBucketAcrossLevels() {
        let now = 10 * 86_400.0
        let times = (0..<(10 * 24)).map { now - Double($0) * 3600 }   // hourly for 10 days
        let kept = Retention(grid: Retention.parseGrid("24x1h | 7x1d")!, last: nil).kept(times: times, now: now)
        // 24 hourly buckets hold one each; then one per day for 7 days.
        #expect(kept.count == 24 + 7)
    }
}
