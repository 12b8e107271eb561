import FerryCore
import FerryStore
import Foundation
import NIOCore

/// Blocks set aside before another site's copy overwrites them (P6): a sparse image of the
/// volume's size holding only `ranges` at their own offsets, and a JSON file describing it next
/// to it, in the volume's `diverged` directory (`ferry diverged VOLUME` lists them). Written by a
/// primary that gives way and by a replica that holds writes past a new primary's branch.
public struct KeptAside: Codable, Sendable {
    public var volume: String
    public var epoch: Int64
    public var generation: String
    public var keptAt: Date
    public var image: String
    public var bytes: UInt64
    public var ranges: [Range]
    /// Why they were kept (absent in files of older versions).
    public var reason: String?
    public struct Range: Codable, Sendable { public var offset: UInt64; public var length: UInt64 }

    /// The `diverged` directory of a volume's state directory.
    public static func directory(stateDirectory: String) -> String { stateDirectory + "/diverged" }

    /// Copies `ranges` of `image` into a new kept-aside image in `directory`, durably, and
    /// describes it in a JSON file beside it.
    public static func write(_ ranges: [BlockRange], of volume: String, image: VolumeImage, directory: String,
                             epoch: Int64, generation: String, reason: String? = nil) throws -> KeptAside {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
        var base = "\(directory)/epoch\(epoch)-\(stamp)"
        var n = 2
        while FileManager.default.fileExists(atPath: base + ".img") { base = "\(directory)/epoch\(epoch)-\(stamp)-\(n)"; n += 1 }
        let copy = try VolumeImage.openOrCreate(path: base + ".img", size: image.size)
        var bytes: UInt64 = 0
        for range in ranges {
            var offset = range.offset
            let end = min(range.end, image.size)
            while offset < end {
                let length = Int(min(1 << 20, end - offset))
                try copy.write(offset: offset, data: try image.read(offset: offset, length: length, allocator: ByteBufferAllocator()))
                offset += UInt64(length)
            }
            bytes += end > range.offset ? end - range.offset : 0
        }
        try copy.flush()
        let kept = KeptAside(volume: volume, epoch: epoch, generation: generation, keptAt: Date(), image: base + ".img",
                             bytes: bytes, ranges: ranges.map { Range(offset: $0.offset, length: $0.length) }, reason: reason)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        try encoder.encode(kept).write(to: URL(fileURLWithPath: base + ".json"), options: .atomic)
        return kept
    }
}
