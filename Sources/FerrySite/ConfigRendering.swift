import Yams

extension SiteConfig {
    /// The configuration as YAML, in the layout `docs/configuration.md` shows; parsing it (with
    /// any file path, since every path in it is absolute) gives a value equal to this one.
    ///
    /// `admin-socket` is left out when it is the default, so that a written file stays short and
    /// follows the data directory if it moves. Names and paths are quoted only when YAML needs it.
    public func yaml() -> String {
        typealias R = ConfigRendering
        var lines = ["# Ferry site configuration; every field is described in docs/configuration.md."]
        lines.append("site:")
        lines.append("  name: \(R.scalar(site.name))")
        lines.append("  data: \(R.scalar(site.dataDirectory))")
        lines.append("listen:")
        lines.append("  replication: \(R.scalar(listen.replication.description))")
        if let nbd = listen.nbd { lines.append("  nbd: \(R.scalar(nbd.description))") }
        if let nbdSocket = listen.nbdSocket { lines.append("  nbd-socket: \(R.scalar(nbdSocket))") }
        if listen.adminSocket != ListenSection.defaultAdminSocket(dataDirectory: site.dataDirectory) {
            lines.append("  admin-socket: \(R.scalar(listen.adminSocket))")
        }
        if peers.isEmpty {
            lines.append("peers: {}")
        } else {
            lines.append("peers:")
            for peer in peers {
                lines.append("  \(R.scalar(peer.name)):")
                lines.append("    address: \(R.scalar(peer.address.description))")
                lines.append("    site-id: \(peer.siteID.description)")
            }
        }
        if volumes.isEmpty {
            lines.append("volumes: {}")
        } else {
            lines.append("volumes:")
            for volume in volumes {
                lines.append("  \(R.scalar(volume.name)):")
                lines.append("    size: \(R.size(volume.sizeBytes))")
                lines.append("    primary: \(R.scalar(volume.primary))")
            }
        }
        lines.append("log-level: \(R.scalar(logLevel))")
        return lines.joined(separator: "\n") + "\n"
    }
}

/// How configuration values are written as YAML text.
enum ConfigRendering {
    /// `bytes` in the largest unit that divides it exactly (`20G`, `1536K`, `4097`), so that the
    /// text parses back to the same number; unlike `ByteSize.format`, never rounds.
    static func size(_ bytes: UInt64) -> String {
        let units: [(shift: UInt64, name: String)] = [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")]
        for unit in units where bytes != 0 && bytes % (1 << unit.shift) == 0 {
            return "\(bytes >> unit.shift)\(unit.name)"
        }
        return "\(bytes)"
    }

    /// `text` as a YAML scalar that reads back as the same string: plain when that is unambiguous,
    /// double-quoted otherwise.
    static func scalar(_ text: String) -> String {
        isPlainSafe(text) ? text : doubleQuoted(text)
    }

    private static func isPlainSafe(_ text: String) -> Bool {
        guard let first = text.unicodeScalars.first, let last = text.unicodeScalars.last else { return false }
        func isWordy(_ c: Unicode.Scalar) -> Bool {
            ("0"..."9").contains(c) || ("a"..."z").contains(c) || ("A"..."Z").contains(c) || c == "/" || c == "." || c == "_"
        }
        guard isWordy(first), last != ":" else { return false }
        guard text.unicodeScalars.allSatisfy({ isWordy($0) || $0 == ":" || $0 == "-" || $0 == "@" || $0 == "+" })
        else { return false }
        // A plain `null`, `~` or `true` would read back as something other than this string.
        return Resolver.default.resolveTag(of: Node(text)) == .str
    }

    private static func doubleQuoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            case "\u{2028}": out += "\\L"
            case "\u{2029}": out += "\\P"
            case "\u{FEFF}": out += "\\uFEFF"
            case _ where scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value):
                // Control characters, and NEL (0x85), which YAML would read as a line break.
                out += "\\x" + (scalar.value < 0x10 ? "0" : "") + String(scalar.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}
