/// Per granule of a volume (a run of 4 MiB activity-log extents, at most 4,096 granules; the
/// geometry of ``PrimaryVolume/Metadata/lastWrites``): the sequence of the last write whose bytes
/// the image holds there, or ``unknown``.
///
/// A secondary keeps one as it applies what its primary streams. When it is promoted, the new
/// primary starts its `lastWrites` from it, so a third site that holds an older state of the same
/// line (sequence M, at or below the branch) is caught up with the granules written after M, not
/// with a full copy of the volume (docs/operations.md, "Roles, epochs and generations").
///
/// The one rule every change keeps: a granule's figure is at least the sequence of every write
/// whose bytes are in the image there. So the granules that differ between the image and the
/// line's state at any M are among those whose figure is above M. Blocks whose sequence is not
/// known (a catch-up's regions, a roll-back's rewritten blocks, anything from before a crash)
/// make their granules ``unknown`` until a barrier says everything the stream sent before it is
/// at or below the barrier's sequence (``settle(at:)``).
public struct WriteMap: Sendable, Equatable {
    public static let unknown = UInt64.max

    public let volumeSize: UInt64
    /// The activity-log extent the granules are made of.
    public let extentSize: UInt64
    /// Bytes per granule.
    public let granuleSize: UInt64
    public private(set) var last: [UInt64]
    /// How many granules are ``unknown`` (``settle(at:)`` runs at every barrier: nothing to do is the rule).
    private var unknownCount: Int

    /// All granules ``unknown``.
    public init(volumeSize: UInt64, extentSize: UInt64 = 4 << 20) {
        let granuleSize = Self.granuleSize(volumeSize: volumeSize, extentSize: extentSize)
        self.volumeSize = volumeSize
        self.extentSize = extentSize
        self.granuleSize = granuleSize
        let count = volumeSize == 0 ? 0 : Int((volumeSize + granuleSize - 1) / granuleSize)
        self.last = Array(repeating: Self.unknown, count: count)
        self.unknownCount = count
    }

    /// A map as stored (``last``), or nil when `figures` does not fit the volume's geometry.
    public init?(volumeSize: UInt64, extentSize: UInt64, figures: [UInt64]) {
        self.init(volumeSize: volumeSize, extentSize: extentSize)
        guard figures.count == last.count else { return nil }
        last = figures
        unknownCount = figures.lazy.filter { $0 == Self.unknown }.count
    }

    /// The granule size for a volume: whole extents, at most 4,096 granules (what a primary's
    /// metadata stores per granule).
    public static func granuleSize(volumeSize: UInt64, extentSize: UInt64) -> UInt64 {
        let extent = max(1, extentSize)
        let extents = (volumeSize + extent - 1) / extent
        return max(1, (extents + 4095) / 4096) * extent
    }

    /// The granules `range` touches.
    func granules(of range: BlockRange) -> ClosedRange<Int>? {
        guard range.length > 0, range.offset < volumeSize, !last.isEmpty else { return nil }
        return Int(range.offset / granuleSize)...Int((min(range.end, volumeSize) - 1) / granuleSize)
    }

    /// A write of sequence `seq` landed in `range`.
    public mutating func record(_ range: BlockRange, seq: UInt64) {
        guard let granules = granules(of: range) else { return }
        for g in granules where last[g] < seq { last[g] = seq }
    }

    /// Blocks of no known sequence landed in `range`.
    public mutating func markUnknown(_ range: BlockRange) {
        guard let granules = granules(of: range) else { return }
        for g in granules where last[g] != Self.unknown {
            last[g] = Self.unknown
            unknownCount += 1
        }
    }

    /// Every granule unknown (the image moved to another line, whose sequences are not these).
    public mutating func forgetAll() {
        for g in last.indices { last[g] = Self.unknown }
        unknownCount = last.count
    }

    /// Everything in the image that the stream brought before a barrier of sequence `seq` (and
    /// anything from before the stream, on the same line) is at or below it: unknown granules
    /// take it.
    public mutating func settle(at seq: UInt64) {
        guard unknownCount > 0 else { return }
        for g in last.indices where last[g] == Self.unknown { last[g] = seq }
        unknownCount = seq == Self.unknown ? last.count : 0
    }

    public var hasUnknown: Bool { unknownCount > 0 }

    /// The granules whose figure is above `seq`, as byte ranges (adjacent granules joined).
    public func ranges(after seq: UInt64) -> [BlockRange] {
        Self.ranges(of: last, granuleSize: granuleSize, volumeSize: volumeSize, after: seq)
    }

    /// The granules of `figures` (one per granule of `granuleSize`) above `seq`, as byte ranges.
    public static func ranges(of figures: [UInt64], granuleSize: UInt64, volumeSize: UInt64, after seq: UInt64) -> [BlockRange] {
        var out: [BlockRange] = []
        for (g, figure) in figures.enumerated() where figure > seq {
            let start = UInt64(g) * granuleSize
            guard start < volumeSize else { break }
            let length = min(granuleSize, volumeSize - start)
            if let lastRange = out.last, lastRange.end == start {
                out[out.count - 1] = BlockRange(offset: lastRange.offset, length: lastRange.length + length)
            } else {
                out.append(BlockRange(offset: start, length: length))
            }
        }
        return out
    }
}
