import FerryCore
import Yams

extension SiteConfig {
    /// The configuration as YAML, in the layout `docs/configuration.md` shows; parsing it (with
    /// any file path, since every path in it is absolute) gives a value equal to this one.
    ///
    /// A replica's options are written when they apply to its mode and differ from their
    /// defaults, but an async replica's `max-lag` always, since it is the bound that replica keeps.
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
        if let metrics = listen.metrics { lines.append("  metrics: \(R.scalar(metrics.description))") }
        if let tokenFile = listen.metricsTokenFile {
            lines.append("  metrics-token-file: \(R.scalar(tokenFile))")
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
                if let hook = volume.onPromote { lines.append("    on-promote: \(R.scalar(hook))") }
                switch (volume.history?.bytes, volume.history?.seconds) {
                case let (bytes?, seconds?): lines.append("    history: {bytes: \(R.size(bytes)), time: \(DurationText.format(seconds: seconds))}")
                case let (bytes?, nil): lines.append("    history: \(R.size(bytes))")
                case let (nil, seconds?): lines.append("    history: \(DurationText.format(seconds: seconds))")
                case (nil, nil): break
                }
                if !volume.replicas.isEmpty {
                    lines.append("    replicas:")
                    for name in volume.replicaNames {
                        lines.append("      \(R.scalar(name)):")
                        lines += R.options(of: volume.replicas[name]!).map { "        \($0.key): \($0.value)" }
                    }
                }
            }
        }
        if !trees.isEmpty {
            lines.append("trees:")
            for tree in trees {
                lines.append("  \(R.scalar(tree.name)):")
                lines.append("    primary: \(R.scalar(tree.primary))")
                lines.append("    source: \(R.scalar(tree.source))")
                lines.append("    replicas:")
                for name in tree.replicas.keys.sorted() {
                    lines.append("      \(R.scalar(name)): { target: \(R.scalar(tree.replicas[name]!)) }")
                }
                lines.append("    mode: \(tree.mode.rawValue)")
                if let schedule = tree.schedule {
                    switch schedule.kind {
                    case .every(let seconds): lines.append("    every: \(DurationText.format(seconds: seconds))")
                    case .daily, .weekly: lines.append("    at: \"\(schedule.timeOfDay ?? "00:00")\"")
                    }
                    if case .weekly(let day, _) = schedule.kind { lines.append("    on: \(day.description)") }
                }
                if !tree.exclude.isEmpty {
                    lines.append("    exclude: [\(tree.exclude.map(R.scalar).joined(separator: ", "))]")
                }
                if let keep = tree.keep {
                    var parts: [String] = []
                    if !keep.grid.isEmpty {
                        parts.append("grid: \(R.scalar(keep.grid.map { "\($0.count)x\(DurationText.format(seconds: $0.seconds))" }.joined(separator: " | ")))")
                    }
                    if let last = keep.last { parts.append("last: \(last)") }
                    lines.append("    keep: {\(parts.joined(separator: ", "))}")
                }
                if tree.compression != .zstd { lines.append("    compression: \(tree.compression.rawValue)") }
                if let limit = tree.bandwidthLimit { lines.append("    bandwidth-limit: \(R.size(limit))") }
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

    /// The fields of one replica, in the order docs/configuration.md lists them, values as YAML.
    static func options(of policy: ReplicaPolicy) -> [(key: String, value: String)] {
        var out: [(key: String, value: String)] = [("mode", policy.mode.rawValue)]
        func add(_ option: ReplicaOption, _ value: String?) {
            if let value, option.applies(to: policy.mode) { out.append((option.rawValue, value)) }
        }
        add(.onPeerLoss, policy.onPeerLoss == .degrade ? nil : policy.onPeerLoss.rawValue)
        switch (policy.maxLagBytes, policy.maxLagSeconds) {
        case let (bytes?, seconds?): add(.maxLag, "{bytes: \(size(bytes)), time: \(DurationText.format(seconds: seconds))}")
        case let (bytes?, nil): add(.maxLag, size(bytes))
        case let (nil, seconds?): add(.maxLag, DurationText.format(seconds: seconds))
        case (nil, nil): break
        }
        add(.onLag, policy.onLag == .throttle ? nil : policy.onLag.rawValue)
        add(.journalSize, policy.journalSizeBytes == ReplicaPolicy.defaultJournalSizeBytes ? nil : size(policy.journalSizeBytes))
        add(.compression, policy.compression == .zstd ? nil : policy.compression.rawValue)
        add(.resyncRate, policy.resyncRateBytesPerSecond.map(size))
        if let schedule = policy.schedule {
            switch schedule.kind {
            case .every(let seconds):
                add(.every, DurationText.format(seconds: seconds))
            case .daily, .weekly:
                add(.at, schedule.timeOfDay.map { "\"\($0)\"" })
            }
            if case .weekly(let day, _) = schedule.kind { add(.on, day.description) }
        }
        return out
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
