/// A compact text form of an array of 64-bit words that is mostly zeros or long runs of one value
/// (a dirty bitmap, the per-granule last writes): how ``PrimaryVolume/Metadata`` stores them.
///
/// Written as JSON arrays of numbers, a 1 GiB volume's clean bitmap (4,096 zero words) cost
/// ~20 ms of `JSONEncoder` time, and the metadata is stored at every client flush: a client that
/// flushed every 16 writes got 0.08× the unreplicated rate (BENCHMARKS.md, "flushes"). In this
/// form a clean bitmap is an empty string and a fully dirty one a single run.
///
/// Layout: base64 (standard alphabet, padded) of records of 16 bytes, little-endian:
///
///     0  4  start   index of the run's first word
///     4  4  count   words in the run (≥ 1)
///     8  8  value   every word of the run (never 0: zero words are left out)
///
/// Runs are in ascending order and do not overlap; words no run covers are 0.
public enum WordRuns {
    public enum Failure: Error, Equatable, CustomStringConvertible {
        case notBase64
        case badRun(index: Int)

        public var description: String {
            switch self {
            case .notBase64: return "not base64 of whole 16-byte run records"
            case .badRun(let index): return "run \(index) is out of order, empty, zero or past the end"
            }
        }
    }

    /// The text form of `words`.
    public static func encode(_ words: [UInt64]) -> String {
        var bytes: [UInt8] = []
        var i = 0
        while i < words.count {
            let value = words[i]
            guard value != 0 else { i += 1; continue }
            var end = i + 1
            while end < words.count, words[end] == value { end += 1 }
            append(UInt32(i), to: &bytes)
            append(UInt32(end - i), to: &bytes)
            append(value, to: &bytes)
            i = end
        }
        return Base64.encode(bytes)
    }

    /// The `count` words `text` describes; throws when it is malformed or reaches past `count`.
    public static func decode(_ text: String, count: Int) throws -> [UInt64] {
        guard let bytes = Base64.decode(text), bytes.count % 16 == 0 else { throw Failure.notBase64 }
        var words = [UInt64](repeating: 0, count: count)
        var next = 0
        for r in 0..<(bytes.count / 16) {
            let base = r * 16
            let start = Int(read(UInt32.self, bytes, at: base))
            let length = Int(read(UInt32.self, bytes, at: base + 4))
            let value = read(UInt64.self, bytes, at: base + 8)
            guard start >= next, length > 0, value != 0, start + length <= count else { throw Failure.badRun(index: r) }
            for w in start..<(start + length) { words[w] = value }
            next = start + length
        }
        return words
    }

    private static func append<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { bytes.append(contentsOf: $0) }
    }

    private static func read<T: FixedWidthInteger>(_: T.Type, _ bytes: [UInt8], at offset: Int) -> T {
        var value: T = 0
        for i in 0..<(T.bitWidth / 8) { value |= T(bytes[offset + i]) << (8 * i) }
        return value
    }
}

/// Standard base64 with padding (RFC 4648 §4), for FerryCore, which does without Foundation.
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    private static let values: [UInt8] = {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (i, c) in alphabet.enumerated() { table[Int(c)] = UInt8(i) }
        return table
    }()

    static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = UInt32(bytes[i])
            let b1 = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0
            let b2 = i + 2 < bytes.count ? UInt32(bytes[i + 2]) : 0
            let n = b0 << 16 | b1 << 8 | b2
            out.append(alphabet[Int(n >> 18 & 63)])
            out.append(alphabet[Int(n >> 12 & 63)])
            out.append(i + 1 < bytes.count ? alphabet[Int(n >> 6 & 63)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(n & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func decode(_ text: String) -> [UInt8]? {
        let chars = Array(text.utf8)
        guard chars.count % 4 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(chars.count / 4 * 3)
        var i = 0
        while i < chars.count {
            let last = i + 4 == chars.count
            let pad = last ? (chars[i + 3] == UInt8(ascii: "=") ? (chars[i + 2] == UInt8(ascii: "=") ? 2 : 1) : 0) : 0
            var n: UInt32 = 0
            for k in 0..<4 {
                let c = chars[i + k]
                if k >= 4 - pad { n <<= 6; continue }
                let v = values[Int(c)]
                guard v != 0xFF else { return nil }
                n = n << 6 | UInt32(v)
            }
            out.append(UInt8(n >> 16 & 0xFF))
            if pad < 2 { out.append(UInt8(n >> 8 & 0xFF)) }
            if pad < 1 { out.append(UInt8(n & 0xFF)) }
            i += 4
        }
        return out
    }
}
