/// The one rule for site names, used by the configuration (`site.name`, peer names, a volume's
/// `primary` and `replicas`) and by `ferry init --site`.
///
/// `[a-z0-9][a-z0-9-]{0,62}`: a site name is also a DNS label (the certificate's SAN), part of
/// file names and a metric label, so it keeps to what all three accept.
public enum SiteName {
    /// The rule in words, to follow "use" in a message: `"East" is not a valid site name; use \(rule)`.
    public static let rule = "1 to 63 lowercase letters, digits and dashes, starting with a letter or digit"

    /// Whether `name` follows ``rule``.
    public static func isValid(_ name: String) -> Bool {
        let chars = Array(name.utf8)
        guard (1...63).contains(chars.count), chars[0] != UInt8(ascii: "-") else { return false }
        return chars.allSatisfy { c in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c)
                || c == UInt8(ascii: "-")
        }
    }
}
