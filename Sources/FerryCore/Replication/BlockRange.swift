/// A byte range of a volume: `offset ..< offset + length`.
public struct BlockRange: Hashable, Sendable, Codable, CustomStringConvertible {
    public var offset: UInt64
    public var length: UInt64

    public init(offset: UInt64, length: UInt64) {
        self.offset = offset
        self.length = length
    }

    public var end: UInt64 { offset + length }

    public func overlaps(_ other: BlockRange) -> Bool {
        length > 0 && other.length > 0 && offset < other.end && other.offset < end
    }

    public var description: String { "[\(offset), \(end))" }
}

/// How far a replica has taken a replicated item (DESIGN §5.1 step 4). Acks are cumulative: an
/// ack at one level for stream index `i` covers every item up to `i` at that level and below.
public enum AckLevel: UInt8, Sendable, Comparable, CaseIterable, CustomStringConvertible {
    /// Arrived (for a logged replica: in its receive log, durably).
    case received = 1
    /// Applied to the replica image (page cache).
    case written = 2
    /// Durable on the replica's disk.
    case durable = 3

    public static func < (a: AckLevel, b: AckLevel) -> Bool { a.rawValue < b.rawValue }

    public var description: String {
        switch self {
        case .received: return "received"
        case .written: return "written"
        case .durable: return "durable"
        }
    }
}

/// One connection carrying a volume link, as the runtime numbers them. A new connection gets a
/// new ID, so an ack that arrives from a connection already given up is never counted.
public struct LinkID: Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public var description: String { "link#\(rawValue)" }
}
