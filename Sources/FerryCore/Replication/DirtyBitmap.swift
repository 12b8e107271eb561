/// The regions of a volume a peer may be missing (DESIGN §2 "dirty bitmap"), in memory.
///
/// One bit per region of `regionSize` bytes (64 KiB by default). The runtime persists it (the
/// primary's ``PrimaryVolume`` says when); this type only holds and edits the bits.
public struct DirtyBitmap: Sendable, Equatable {
    public let regionSize: UInt64
    public let volumeSize: UInt64
    public private(set) var words: [UInt64]
    public private(set) var count: Int = 0

    public init(volumeSize: UInt64, regionSize: UInt64) {
        precondition(regionSize > 0)
        self.volumeSize = volumeSize
        self.regionSize = regionSize
        let regions = Int((volumeSize + regionSize - 1) / regionSize)
        self.words = Array(repeating: 0, count: (regions + 63) / 64)
    }

    /// Rebuilds a bitmap from persisted words (extra bits past the last region are ignored).
    public init(volumeSize: UInt64, regionSize: UInt64, words: [UInt64]) {
        self.init(volumeSize: volumeSize, regionSize: regionSize)
        for (i, w) in words.prefix(self.words.count).enumerated() { self.words[i] = w }
        let regions = regionCount
        if regions % 64 != 0, !self.words.isEmpty {
            self.words[self.words.count - 1] &= (UInt64(1) << UInt64(regions % 64)) - 1
        }
        count = self.words.reduce(0) { $0 + $1.nonzeroBitCount }
    }

    public var regionCount: Int { Int((volumeSize + regionSize - 1) / regionSize) }
    public var isEmpty: Bool { count == 0 }
    public var dirtyBytes: UInt64 { UInt64(count) * regionSize }

    public func regions(covering range: BlockRange) -> ClosedRange<Int>? {
        guard range.length > 0, range.offset < volumeSize else { return nil }
        let first = Int(range.offset / regionSize)
        let last = Int((min(range.end, volumeSize) - 1) / regionSize)
        return first...last
    }

    public func range(ofRegion region: Int) -> BlockRange {
        let start = UInt64(region) * regionSize
        return BlockRange(offset: start, length: min(regionSize, volumeSize - start))
    }

    public func contains(_ region: Int) -> Bool {
        words[region >> 6] & (UInt64(1) << UInt64(region & 63)) != 0
    }

    /// Sets the regions under `range`; returns how many were newly set.
    @discardableResult
    public mutating func set(_ range: BlockRange) -> Int {
        guard let regions = regions(covering: range) else { return 0 }
        var added = 0
        for r in regions where setRegion(r) { added += 1 }
        return added
    }

    @discardableResult
    public mutating func setRegion(_ region: Int) -> Bool {
        let mask = UInt64(1) << UInt64(region & 63)
        guard words[region >> 6] & mask == 0 else { return false }
        words[region >> 6] |= mask
        count += 1
        return true
    }

    @discardableResult
    public mutating func clearRegion(_ region: Int) -> Bool {
        let mask = UInt64(1) << UInt64(region & 63)
        guard words[region >> 6] & mask != 0 else { return false }
        words[region >> 6] &= ~mask
        count -= 1
        return true
    }

    public mutating func setAll() {
        for r in 0..<regionCount { setRegion(r) }
    }

    public mutating func clearAll() {
        for i in words.indices { words[i] = 0 }
        count = 0
    }

    public mutating func formUnion(_ other: DirtyBitmap) {
        precondition(other.words.count == words.count)
        for i in words.indices { words[i] |= other.words[i] }
        count = words.reduce(0) { $0 + $1.nonzeroBitCount }
    }

    /// The regions after `start` in `start`'s run of set regions, at most `limit` of them with
    /// `start` (0 when `start` is not set), stopping at the first region `stop` accepts.
    public func run(from start: Int, limit: Int, stop: (Int) -> Bool = { _ in false }) -> Range<Int> {
        var end = start
        let count = regionCount
        while end < count, end - start < limit, contains(end), !stop(end) { end += 1 }
        return start..<end
    }

    /// The byte range of regions `regions` (the last one may be short).
    public func range(ofRegions regions: Range<Int>) -> BlockRange {
        let first = range(ofRegion: regions.lowerBound)
        let last = range(ofRegion: regions.upperBound - 1)
        return BlockRange(offset: first.offset, length: last.end - first.offset)
    }

    /// The first set region at or after `start`, if any.
    public func firstSet(from start: Int) -> Int? {
        var wordIndex = start >> 6
        guard wordIndex < words.count else { return nil }
        var word = words[wordIndex] & (~UInt64(0) << UInt64(start & 63))
        while true {
            if word != 0 { return wordIndex << 6 + word.trailingZeroBitCount }
            wordIndex += 1
            guard wordIndex < words.count else { return nil }
            word = words[wordIndex]
        }
    }
}
