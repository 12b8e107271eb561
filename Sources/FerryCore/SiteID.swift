/// A site's identity as peers pin it: the SHA-256 fingerprint of the site's certificate (DER).
///
/// Shown as 16 groups of 4 lowercase hex digits (`3f2a-9c1d-…`) so that two people can read it to
/// each other and compare it by eye. Parsing also accepts the plain 64-digit form and the
/// colon-separated form `openssl x509 -fingerprint -sha256` prints, in either case.
public struct SiteID: Hashable, Sendable, CustomStringConvertible, Codable {
    /// The 32 bytes of the fingerprint.
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 32 else { return nil }
        self.bytes = bytes
    }

    /// Parses any of the accepted textual forms; nil when it is not 32 bytes of hex.
    public init?(_ text: String) {
        var digits: [UInt8] = []
        digits.reserveCapacity(64)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "0"..."9": digits.append(UInt8(scalar.value - 48))
            case "a"..."f": digits.append(UInt8(scalar.value - 97 + 10))
            case "A"..."F": digits.append(UInt8(scalar.value - 65 + 10))
            case "-", ":", " ": continue
            default: return nil
            }
        }
        guard digits.count == 64 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(32)
        for i in stride(from: 0, to: 64, by: 2) { out.append(digits[i] << 4 | digits[i + 1]) }
        self.bytes = out
    }

    /// 64 lowercase hex digits, no separators.
    public var hex: String {
        let table = Array("0123456789abcdef".utf8)
        var chars: [UInt8] = []
        chars.reserveCapacity(64)
        for b in bytes {
            chars.append(table[Int(b >> 4)])
            chars.append(table[Int(b & 0xf)])
        }
        return String(decoding: chars, as: UTF8.self)
    }

    /// The grouped form: `3f2a-9c1d-…` (16 groups of 4).
    public var description: String {
        let h = Array(hex)
        var groups: [String] = []
        for i in stride(from: 0, to: 64, by: 4) { groups.append(String(h[i..<i + 4])) }
        return groups.joined(separator: "-")
    }

    /// The first two groups, for log lines where the full ID is too long.
    public var short: String { String(description.prefix(9)) }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let id = SiteID(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath,
                debugDescription: "\"\(text)\" is not a site ID (64 hex digits)"))
        }
        self = id
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(description)
    }
}
