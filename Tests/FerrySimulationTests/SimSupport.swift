import Foundation
@testable import FerryCore

/// FerryCore's ``SeededRandom`` (SplitMix64, so a seed replays exactly) with the draws a
/// schedule makes.
/// What a value is after the daemon stores and reads it back (JSON, as ``MetadataFile`` does):
/// the simulation keeps its "on disk" state through this, so a field the encoding forgets is
/// lost here too (the rival epoch once was, in the daemon only).
func storedAndRead<T: Codable>(_ value: T) -> T {
    try! JSONDecoder().decode(T.self, from: JSONEncoder().encode(value))
}

struct SimRandom: RandomNumberGenerator {
    private var base: SeededRandom
    init(seed: UInt64) { base = SeededRandom(seed: seed) }
    mutating func next() -> UInt64 { base.next() }
    mutating func chance(_ p: Double) -> Bool { Double(next() >> 11) / Double(1 << 53) < p }
    mutating func int(_ range: ClosedRange<Int>) -> Int { Int.random(in: range, using: &self) }
    mutating func nanos(_ range: ClosedRange<Int64>) -> Int64 { Int64.random(in: range, using: &self) }
    mutating func pick<T>(_ items: [T]) -> T { items[int(0...items.count - 1)] }
}

/// A min-heap of timed events; ties keep insertion order, so a schedule is deterministic.
struct EventQueue<Event> {
    private var heap: [(time: Int64, order: UInt64, event: Event)] = []
    private var counter: UInt64 = 0

    var isEmpty: Bool { heap.isEmpty }
    var count: Int { heap.count }

    mutating func push(_ time: Int64, _ event: Event) {
        counter += 1
        heap.append((time, counter, event))
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            guard less(i, parent) else { break }
            heap.swapAt(i, parent)
            i = parent
        }
    }

    mutating func pop() -> (time: Int64, event: Event)? {
        guard !heap.isEmpty else { return nil }
        heap.swapAt(0, heap.count - 1)
        let top = heap.removeLast()
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count, less(l, m) { m = l }
            if r < heap.count, less(r, m) { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
        return (top.time, top.event)
    }

    private func less(_ a: Int, _ b: Int) -> Bool {
        heap[a].time < heap[b].time || (heap[a].time == heap[b].time && heap[a].order < heap[b].order)
    }
}

/// A disk as a crash sees it: what was flushed survives; on power loss each sector written since
/// the last flush independently keeps its new or its old contents (writes torn at sector
/// granularity); a process crash (kill -9) keeps the page cache.
///
/// Contents are one stamp per sector (0 = zeros): a write's stamps are unique to it, so "which
/// write does this sector hold" is a lookup.
struct SimDisk {
    var cache: [UInt64]
    var durable: [UInt64]
    var unflushed: Set<Int> = []

    init(sectors: Int) {
        cache = Array(repeating: 0, count: sectors)
        durable = cache
    }

    mutating func write(_ first: Int, _ stamps: [UInt64]) {
        for (i, s) in stamps.enumerated() {
            cache[first + i] = s
            unflushed.insert(first + i)
        }
    }

    func read(_ first: Int, _ count: Int) -> [UInt64] { Array(cache[first..<first + count]) }

    mutating func flush() {
        for s in unflushed { durable[s] = cache[s] }
        unflushed.removeAll()
    }

    mutating func crash(powerLoss: Bool, _ rng: inout SimRandom) {
        if powerLoss {
            for s in unflushed.sorted() where rng.chance(0.5) { durable[s] = cache[s] }
        } else {
            for s in unflushed { durable[s] = cache[s] }
        }
        unflushed.removeAll()
        cache = durable
    }
}
