/// Which tree snapshots to keep: a grid of intervals (zrepl's grammar, `24x1h | 30x1d | 12x30d`)
/// plus the last N.
///
/// The grid lays its intervals back to back into the past from now: `24x1h` is 24 one-hour
/// buckets covering the last day, then `30x1d` 30 one-day buckets before that, and so on. The
/// newest snapshot in each bucket is kept; snapshots older than the whole grid are not. `last`
/// keeps the newest N whatever their age. The newest snapshot of all is always kept: it is the
/// base of the next run.
public struct Retention: Sendable, Equatable, CustomStringConvertible {
    public struct Interval: Sendable, Equatable {
        public var count: Int
        public var seconds: Int64

        public init(count: Int, seconds: Int64) {
            self.count = count
            self.seconds = seconds
        }
    }

    public var grid: [Interval]
    public var last: Int?

    public init(grid: [Interval], last: Int?) {
        self.grid = grid
        self.last = last
    }

    /// Parses `24x1h | 30x1d | 12x30d` (spaces optional); nil when any part is not `NxDURATION`
    /// with N ≥ 1 and a duration of 1 s or more.
    public static func parseGrid(_ text: String) -> [Interval]? {
        var out: [Interval] = []
        for part in text.split(separator: "|", omittingEmptySubsequences: false) {
            let trimmed = String(part).trimmingSpaces()
            let pieces = trimmed.split(separator: "x", maxSplits: 1)
            guard pieces.count == 2, let count = Int(pieces[0]), count >= 1, count <= 100_000,
                  let seconds = DurationText.parseSeconds(String(pieces[1])), seconds >= 1 else { return nil }
            out.append(Interval(count: count, seconds: seconds))
        }
        return out.isEmpty ? nil : out
    }

    public var description: String {
        var parts: [String] = []
        if !grid.isEmpty {
            parts.append(grid.map { "\($0.count)x\(DurationText.format(seconds: $0.seconds))" }.joined(separator: " | "))
        }
        if let last { parts.append("last \(last)") }
        return parts.joined(separator: ", ")
    }

    /// Of snapshots taken at `times` (seconds, any order), the indices to keep at `now`.
    public func kept(times: [Double], now: Double) -> Set<Int> {
        guard !times.isEmpty else { return [] }
        let order = times.indices.sorted { times[$0] > times[$1] }   // newest first
        var keep: Set<Int> = [order[0]]
        if let last { keep.formUnion(order.prefix(last)) }
        if grid.isEmpty && last == nil { return Set(times.indices) }
        var bucketEnd = now
        var buckets: [(start: Double, end: Double)] = []
        for interval in grid {
            for _ in 0..<interval.count {
                let start = bucketEnd - Double(interval.seconds)
                buckets.append((start, bucketEnd))
                bucketEnd = start
            }
        }
        // Newest in each bucket; a snapshot newer than now (clock skew) counts in the first.
        var b = 0
        for i in order {
            let t = min(times[i], now)
            while b < buckets.count && t < buckets[b].start { b += 1 }
            guard b < buckets.count else { break }
            if t <= buckets[b].end {
                keep.insert(i)
                b += 1
            }
        }
        return keep
    }
}
