import FerryCore
import Yams

/// `volumes.<name>.replicas`: which sites keep a replica of a volume, and how each replicates.
///
/// Which option applies to which mode is ``ReplicaOption/modes``; an option given for a mode it
/// does not apply to is a mistake (not ignored), so that nobody believes a `max-lag` bounds a sync
/// replica. When the mode itself is wrong, the options are still checked on their own.
extension ConfigReader {
    /// The longest `every:` taken (52 weeks): a point less often than that is a typo.
    static let longestEvery: Int64 = 52 * 7 * 86_400

    static let replicaKeys = ["mode"] + ReplicaOption.allCases.map(\.rawValue)
    static let maxLagKeys = ["bytes", "time"]
    /// The smallest `journal-size`: a few segments' worth.
    static let minimumJournalBytes: UInt64 = 1 << 20

    /// The replicas of the volume whose fields are `volume`; nil when any of them has a problem.
    /// `primary` is nil when the volume's primary is missing or was reported.
    mutating func readReplicas(_ volume: ConfigFields, siteName: String?, peerNames: [String]?,
                               primary: String?) -> [String: ReplicaPolicy]? {
        let path = volume.path("replicas")
        let before = problems.count
        guard let mapping = map(volume["replicas"], at: path, line: volume.line(of: "replicas"),
                                expected: "a map from site name to how it replicates",
                                hint: "; write each replica as `west: { mode: sync }`")
        else { return nil }
        var replicas: [String: ReplicaPolicy] = [:]
        for (name, value, keyLine) in entries(of: mapping, at: path) {
            let replicaPath = "\(path).\(name)"
            checkReplicaSite(name, at: replicaPath, line: keyLine, siteName: siteName, peerNames: peerNames, primary: primary, of: "volume")
            var hint = "; write it as `\(name): { mode: sync }`"
            if case .scalar(let scalar) = value, let mode = ReplicationMode(rawValue: scalar.string.lowercased()) {
                hint = "; write it as `\(name): { mode: \(mode.rawValue) }`"
            }
            guard let entry = map(value, at: replicaPath, line: keyLine, expected: "a map with mode and its options", hint: hint)
            else { continue }
            let fields = fields(of: entry, at: replicaPath, known: Self.replicaKeys, line: keyLine)
            if let policy = readReplica(fields) { replicas[name] = policy }
        }
        return problems.count == before ? replicas : nil
    }

    /// One replica's map; nil when it has a problem.
    private mutating func readReplica(_ fields: ConfigFields) -> ReplicaPolicy? {
        let before = problems.count
        if !fields.has("mode") {
            report(fields.path("mode"), "missing; required: one of \(Self.list(ReplicationMode.self)), e.g. mode: sync",
                   line: fields.line)
        }
        let mode: ReplicationMode? = fields.has("mode") ? choice(fields, "mode", what: "replication mode") : nil
        var policy = ReplicaPolicy(mode: mode ?? .sync)
        if given(fields, mode, .onPeerLoss), let value: PeerLossPolicy = choice(fields, "on-peer-loss", what: "on-peer-loss policy") {
            policy.onPeerLoss = value
        }
        var lagGiven = false
        if given(fields, mode, .maxLag) {
            lagGiven = true
            let (bytes, seconds) = readLimit(fields, key: "max-lag", sizeExample: "64M", timeExample: "30s", timeExamples: "30s or 5m")
            policy.maxLagBytes = bytes
            policy.maxLagSeconds = seconds
        }
        if given(fields, mode, .onLag), let value: LagPolicy = choice(fields, "on-lag", what: "on-lag policy") {
            policy.onLag = value
        }
        var journalRead = true
        if given(fields, mode, .journalSize) {
            let bytes = readJournalSize(fields)
            journalRead = bytes != nil
            policy.journalSizeBytes = bytes ?? policy.journalSizeBytes
        }
        if given(fields, mode, .compression), let value: ReplicationCompression = choice(fields, "compression", what: "compression method") {
            policy.compression = value
        }
        if given(fields, mode, .resyncRate) {
            policy.resyncRateBytesPerSecond = readResyncRate(fields)
        }
        let every = given(fields, mode, .every)
        let at = given(fields, mode, .at)
        let on = given(fields, mode, .on)
        if every || at || on || mode == .scheduled {
            policy.schedule = readSchedule(fields, every: every, at: at, on: on, scheduled: mode == .scheduled)
        }
        if mode == .async, journalRead, let lag = policy.maxLagBytes, lag > policy.journalSizeBytes {
            let journal = fields.has("journal-size") ? "journal-size \(ConfigRendering.size(policy.journalSizeBytes))"
                : "the default journal-size of \(ConfigRendering.size(policy.journalSizeBytes))"
            report(fields.path("max-lag"), "\(ConfigRendering.size(lag)) of lag cannot fit in \(journal), which holds "
                   + "what the replica has not received; lower max-lag or set journal-size: \(ConfigRendering.size(lag)) or more",
                   line: fields.line(of: "max-lag"))
        }
        guard let mode, problems.count == before else { return nil }
        // Built again so that the init's default lag bound applies when max-lag was not given.
        return ReplicaPolicy(mode: mode, onPeerLoss: policy.onPeerLoss,
                             maxLagBytes: lagGiven ? policy.maxLagBytes : nil, maxLagSeconds: policy.maxLagSeconds,
                             onLag: policy.onLag, journalSizeBytes: policy.journalSizeBytes,
                             compression: policy.compression, resyncRateBytesPerSecond: policy.resyncRateBytesPerSecond,
                             schedule: policy.schedule)
    }

    /// Whether `option` is given and may be read; reports it when it does not apply to `mode`.
    private mutating func given(_ fields: ConfigFields, _ mode: ReplicationMode?, _ option: ReplicaOption) -> Bool {
        guard fields.has(option.rawValue) else { return false }
        guard let mode, !option.applies(to: mode) else { return true }
        report(fields.path(option.rawValue), Self.inapplicable(option, mode: mode), line: fields.line(of: option.rawValue))
        return false
    }

    /// `on-peer-loss applies only to sync and semi-sync replicas, not async; …`.
    static func inapplicable(_ option: ReplicaOption, mode: ReplicationMode) -> String {
        let modes = option.modes.map(\.rawValue)
        let names = modes.count == 1 ? modes[0] : modes.dropLast().joined(separator: ", ") + " and " + modes.last!
        let fix = modes.count == 1 ? "set mode: \(modes[0])" : "change the mode"
        return "\(option.rawValue) applies only to \(names) replicas, not \(mode.rawValue); remove it, or \(fix)"
    }

    /// The values of an enum, comma-separated, for messages.
    static func list<T: RawRepresentable & CaseIterable>(_: T.Type) -> String where T.RawValue == String {
        T.allCases.map(\.rawValue).joined(separator: ", ")
    }

    /// A field whose value is one of `T`'s raw values, in any case.
    mutating func choice<T: RawRepresentable & CaseIterable>(_ fields: ConfigFields, _ key: String,
                                                                     what: String) -> T? where T.RawValue == String {
        let values = T.allCases.map(\.rawValue)
        guard let text = text(fields, key, required: false, example: values[0]) else { return nil }
        if let value = T(rawValue: text.lowercased()) { return value }
        var message = "\"\(text)\" is not a\("aeiou".contains(what.first!) ? "n" : "") \(what); "
        if let guess = Self.closest(to: text.lowercased(), among: values) { message += "did you mean \"\(guess)\"? " }
        message += "use one of \(values.joined(separator: ", "))"
        report(fields.path(key), message, line: fields.line(of: key))
        return nil
    }

    // MARK: async

    /// `max-lag` and `history`: a size (`64M`), a duration (`30s`, `5m`), or a map with either or
    /// both (`{bytes: 64M, time: 30s}`).
    mutating func readLimit(_ fields: ConfigFields, key: String, sizeExample: String, timeExample: String,
                            timeExamples: String) -> (bytes: UInt64?, seconds: Int64?) {
        let path = fields.path(key)
        let line = fields.line(of: key)
        let forms = "a size such as \(sizeExample), a duration such as \(timeExamples), or both as {bytes: \(sizeExample), time: \(timeExample)}"
        switch fields[key] {
        case .scalar(let scalar)?:
            let text = scalar.string
            if let seconds = DurationText.parseSeconds(text) { return (nil, seconds) }
            if let bytes = ByteSize.parse(text), bytes > 0 { return (bytes, nil) }
            report(path, "\"\(text)\" is neither a size nor a duration; use \(forms) (M is mebibytes, m minutes)", line: line)
            return (nil, nil)
        case .mapping(let mapping)?:
            let lag = self.fields(of: mapping, at: path, known: Self.maxLagKeys, line: line)
            var bytes: UInt64?
            var seconds: Int64?
            if let text = text(lag, "bytes", required: false, example: sizeExample) {
                bytes = ByteSize.parse(text).flatMap { $0 > 0 ? $0 : nil }
                if bytes == nil {
                    report(lag.path("bytes"), "\"\(text)\" is not a size of more than 0; use 16M, 64M, 1G", line: lag.line(of: "bytes"))
                }
            }
            if let text = text(lag, "time", required: false, example: timeExample) {
                seconds = DurationText.parseSeconds(text)
                if seconds == nil {
                    report(lag.path("time"), "\"\(text)\" is not a duration; use a number followed by s, m, h or d, e.g. \(timeExamples.replacingOccurrences(of: " or ", with: ", "))",
                           line: lag.line(of: "time"))
                }
            }
            if !lag.has("bytes") && !lag.has("time") {
                report(path, "give bytes, time or both, e.g. {bytes: \(sizeExample), time: \(timeExample)}", line: line)
            }
            return (bytes, seconds)
        case let node?:
            report(path, "expected \(forms), found \(Self.kind(node))", line: line)
            return (nil, nil)
        case nil:
            return (nil, nil)
        }
    }

    private mutating func readJournalSize(_ fields: ConfigFields) -> UInt64? {
        guard let text = text(fields, "journal-size", required: false, example: "1G") else { return nil }
        let path = fields.path("journal-size")
        guard let bytes = ByteSize.parse(text) else {
            report(path, "\"\(text)\" is not a size; use 512M, 1G, 10G", line: fields.line(of: "journal-size"))
            return nil
        }
        guard bytes >= Self.minimumJournalBytes else {
            report(path, "\"\(text)\" is too small for a journal; give at least 1M, e.g. 1G", line: fields.line(of: "journal-size"))
            return nil
        }
        return bytes
    }

    /// A replica's key: a valid site name, this site or a peer, and not the primary of `of` (volume or tree).
    mutating func checkReplicaSite(_ name: String, at replicaPath: String, line keyLine: Int?, siteName: String?,
                                   peerNames: [String]?, primary: String?, of what: String) {
        if !SiteName.isValid(name) {
            report(replicaPath, Self.siteNameAdvice(name) + "; a replica is named by its site's site.name", line: keyLine)
        } else if let message = Self.unknownSite(name, siteName: siteName, peerNames: peerNames) {
            report(replicaPath, message + "; a replica is kept by this site or one of its peers", line: keyLine)
        } else if name == primary {
            report(replicaPath, "\"\(name)\" is the \(what)'s primary; replicas are the other sites that keep a copy, "
                   + "so leave it out here", line: keyLine)
        }
    }

    /// `resync-rate`: a size per second, `100M` or `100M/s`.
    private mutating func readResyncRate(_ fields: ConfigFields) -> UInt64? { readRate(fields, "resync-rate") }

    /// A size per second, `100M` or `100M/s`.
    mutating func readRate(_ fields: ConfigFields, _ key: String) -> UInt64? {
        guard let text = text(fields, key, required: false, example: "100M") else { return nil }
        var size = text
        while size.last == " " { size.removeLast() }
        if size.hasSuffix("/s") { size.removeLast(2) }
        guard let bytes = ByteSize.parse(size), bytes > 0 else {
            report(fields.path(key), "\"\(text)\" is not a rate; give bytes per second as a size, e.g. 100M "
                   + "(or 100M/s), or leave the field out for no limit", line: fields.line(of: key))
            return nil
        }
        return bytes
    }

    // MARK: scheduled

    /// `every`, or `at` with an optional `on`; the fields given are those that apply (the flags say
    /// which). Reports a scheduled replica that has neither or both.
    mutating func readSchedule(_ fields: ConfigFields, every: Bool, at: Bool, on: Bool,
                                       scheduled: Bool) -> Schedule? {
        if scheduled && !every && !at {
            report(fields.path, "a scheduled replica needs every or at: every: 1h, or at: \"02:00\" (daily), "
                   + "with on: sunday (weekly)", line: fields.line)
        }
        if every && at {
            report(fields.path("at"), "give every or at, not both: every: 1h takes a point each hour, "
                   + "at: \"02:00\" one a day", line: fields.line(of: "at"))
        }
        if on && !at && every {
            report(fields.path("on"), "on goes with at (a weekly point at a time of day), not with every; "
                   + "use at: \"02:00\" with on, or leave on out", line: fields.line(of: "on"))
        }
        var schedule: Schedule?
        if every, let text = text(fields, "every", required: false, example: "1h") {
            schedule = Schedule.parseEvery(text)
            if let interval = schedule?.intervalSeconds, interval > Self.longestEvery {
                schedule = nil
                report(fields.path("every"), "\"\(text)\" is longer than 52 weeks; give every: 52w or less (e.g. 1d, 1w)", line: fields.line(of: "every"))
            } else if schedule == nil {
                let seconds = DurationText.parseSeconds(text)
                let message = seconds.map { "\"\(text)\" is \(DurationText.format(seconds: $0)), shorter than a minute; "
                    + "give every: 1m or more (or use mode: async for a replica that follows closely)" }
                    ?? "\"\(text)\" is not an interval; use a number followed by s, m, h, d or w (lowercase), e.g. 15m, 1h, 1d, 1w"
                    + (text.hasSuffix("M") ? " (M is mebibytes in a size; minutes are a lowercase m)" : "")
                report(fields.path("every"), message, line: fields.line(of: "every"))
            }
        }
        var weekday: String?
        if on, let text = text(fields, "on", required: false, example: "sunday") {
            if Schedule.Weekday(parsing: text) == nil {
                let days = Schedule.Weekday.allCases.map(\.description)
                var message = "\"\(text)\" is not a day of the week; "
                if let guess = Self.closest(to: text.lowercased(), among: days) { message += "did you mean \"\(guess)\"? " }
                report(fields.path("on"), message + "use monday … sunday or mon … sun", line: fields.line(of: "on"))
            } else {
                weekday = text
            }
        }
        if at, let text = text(fields, "at", required: false, example: "\"02:00\"") {
            if Schedule.parseAt(text, on: nil) == nil {
                report(fields.path("at"), "\"\(text)\" is not a time of day; use HH:MM from 00:00 to 23:59, "
                       + "in quotes, e.g. at: \"02:00\"", line: fields.line(of: "at"))
            } else if !on || weekday != nil {
                schedule = Schedule.parseAt(text, on: weekday)
            }
        }
        return schedule
    }
}
