/// Sizes as people write them in configuration: `512M`, `20G`, `1T`, `4096` (bytes), binary units.
public enum ByteSize {
    /// Parses `N`, `NK`, `NM`, `NG`, `NT`, `NP` (optionally followed by `iB` or `B`, any case),
    /// powers of 1024. Returns nil for anything else, including overflow.
    public static func parse(_ text: String) -> UInt64? {
        var s = text.trimmingSpaces().uppercased()
        if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
        guard !s.isEmpty else { return nil }
        var shift: UInt64 = 0
        switch s.last! {
        case "K": shift = 10
        case "M": shift = 20
        case "G": shift = 30
        case "T": shift = 40
        case "P": shift = 50
        default: break
        }
        if shift != 0 { s.removeLast() }
        guard !s.isEmpty, s.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt64(s) else { return nil }
        let (v, o) = n.multipliedReportingOverflow(by: UInt64(1) << shift)
        return o ? nil : v
    }

    /// The largest exact unit: 1073741824 → "1G", 1536 → "1536" … or "1.5K"-style when not exact.
    public static func format(_ bytes: UInt64) -> String {
        let units: [(UInt64, String)] = [(1 << 50, "P"), (1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")]
        for (size, name) in units where bytes >= size {
            if bytes % size == 0 { return "\(bytes / size)\(name)" }
            let v = Double(bytes) / Double(size)
            return "\((v * 10).rounded() / 10)\(name)"
        }
        return "\(bytes)"
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s.removeFirst() }
        while let l = s.last, l == " " || l == "\t" { s.removeLast() }
        return String(s)
    }
}
