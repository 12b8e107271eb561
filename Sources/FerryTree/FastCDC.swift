import FerryCore

/// Content-defined chunking, FastCDC as in Xia et al. (USENIX ATC '16; TPDS 2020): a gear hash
/// (`hash = hash << 1 + GEAR[byte]`) rolled over the data, a cut where the hash's top bits are
/// all zero, with *normalized chunking*: before the target size a stricter mask (more bits, so
/// fewer cuts), after it a looser one, which pulls chunk sizes towards the target; no cut before
/// `minSize` (those bytes are not even hashed) and a forced cut at `maxSize`.
///
/// Because a cut depends only on the bytes just before it, inserting or deleting bytes in a file
/// moves the cuts near the edit only: the chunks after it are the same, so only the edited
/// chunks travel (research/file-replication.md §4).
///
/// The gear table and the masks are part of the chunk format: change them and every file is cut
/// differently, and nothing stored before deduplicates against what comes after.
/// `FastCDCTests.cutPointsAreStable` pins them.
public struct FastCDC: Sendable, Equatable {
    public let minSize: Int
    public let averageSize: Int
    public let maxSize: Int
    /// Used before `averageSize` (bits of the average + 2: level-2 normalization) and after it
    /// (bits − 2).
    let strictMask: UInt64
    let looseMask: UInt64

    /// File data: 512 KiB / 1 MiB / 8 MiB, the restic and borg range (research §5, item 1).
    public static let files = FastCDC(minSize: 512 << 10, averageSize: 1 << 20, maxSize: 8 << 20)

    /// - Precondition: `0 < minSize <= averageSize <= maxSize`, `averageSize` a power of two
    ///   from 256 B to 1 GiB.
    public init(minSize: Int, averageSize: Int, maxSize: Int) {
        precondition(minSize > 0 && minSize <= averageSize && averageSize <= maxSize, "need 0 < min <= average <= max")
        precondition(averageSize.nonzeroBitCount == 1 && averageSize >= 256 && averageSize <= 1 << 30,
                     "the average chunk size must be a power of two from 256 B to 1 GiB")
        self.minSize = minSize
        self.averageSize = averageSize
        self.maxSize = maxSize
        let bits = averageSize.trailingZeroBitCount
        strictMask = Self.topBits(bits + 2)
        looseMask = Self.topBits(bits - 2)
    }

    /// The top `n` bits: with the left-shifting gear hash, bit k depends on the last k + 1
    /// bytes, so the top bits see the widest window (64 bytes).
    static func topBits(_ n: Int) -> UInt64 { n <= 0 ? 0 : ~UInt64(0) << UInt64(64 - min(n, 64)) }

    /// The length of the first chunk of `data`. `data` must hold at least `maxSize` bytes unless
    /// it is the end of the stream (`isEnd`); the last chunk of a stream may be shorter than
    /// `minSize`.
    public func firstChunkLength(_ data: UnsafeRawBufferPointer) -> Int {
        let n = data.count
        if n <= minSize { return n }
        let end = min(n, maxSize)
        let center = min(averageSize, end)
        var hash: UInt64 = 0
        var i = minSize
        return Self.gear.withUnsafeBufferPointer { gear in
            while i < center {
                hash = (hash << 1) &+ gear[Int(data[i])]
                if hash & strictMask == 0 { return i + 1 }
                i += 1
            }
            while i < end {
                hash = (hash << 1) &+ gear[Int(data[i])]
                if hash & looseMask == 0 { return i + 1 }
                i += 1
            }
            return end
        }
    }

    /// Every chunk of `data` (a whole stream), as ranges that tile it.
    public func chunks(of data: UnsafeRawBufferPointer) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var start = 0
        while start < data.count {
            let length = firstChunkLength(UnsafeRawBufferPointer(rebasing: data[start...]))
            out.append(start..<(start + length))
            start += length
        }
        return out
    }

    public func chunks(of bytes: [UInt8]) -> [Range<Int>] {
        bytes.withUnsafeBytes { chunks(of: $0) }
    }

    /// 256 pseudo-random 64-bit values from SplitMix64 seeded with "FerryCDC": fixed forever
    /// (see the type's note).
    static let gear: [UInt64] = {
        var random = SeededRandom(seed: 0x4665_7272_7943_4443)
        return (0..<256).map { _ in random.next() }
    }()
}
