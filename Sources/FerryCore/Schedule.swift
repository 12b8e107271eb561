/// When a `scheduled` replica takes its points: either every fixed interval, or at a time of day,
/// daily or on one weekday.
///
/// Pure: it holds no clock. ``nextPoint(afterSeconds:utcOffsetSeconds:)`` is given the time (Unix
/// seconds) and the local offset from UTC, and says when the next point is.
///
/// **Alignment.** Points do not drift with the moment the daemon started: they are fixed on the
/// calendar. An interval's points are `anchor + k·interval` for every integer `k`, where the anchor
/// is Monday 1970-01-05 00:00 (local time, see below). Because the anchor is a midnight four days
/// after the Unix epoch, an interval that divides four days (`15m`, `1h`, `6h`, `1d`, `2d`) has
/// exactly the points of the multiples of the interval since the epoch: `1h` fires on the hour,
/// `1d` at midnight. A week has its points on Mondays at 00:00 (multiples of a week since the epoch
/// would fall on Thursdays, which nobody expects). Other intervals (`7h`, `5d`, `2w`) count from
/// that Monday.
///
/// **Time zones.** Everything is in UTC when `utcOffsetSeconds` is 0. With an offset (local time =
/// UTC + offset, e.g. 7200 for UTC+2), `at` times and the anchor are local: `at 02:00` is 02:00 on
/// the local clock and `every 1d` fires at local midnight. The offset is taken as constant; across
/// a daylight-saving change, pass the offset in force at `afterSeconds`.
public struct Schedule: Sendable, Equatable, CustomStringConvertible {
    /// The three forms a schedule takes.
    public enum Kind: Sendable, Equatable {
        /// Every `seconds` (at least ``Schedule/minimumIntervalSeconds``).
        case every(seconds: Int64)
        /// Every day at `minuteOfDay` (0 ..< 1440) after midnight.
        case daily(minuteOfDay: Int)
        /// Every week on `weekday` at `minuteOfDay` (0 ..< 1440) after midnight.
        case weekly(Weekday, minuteOfDay: Int)
    }

    /// A day of the week, Monday first (ISO 8601).
    public enum Weekday: Int, Sendable, CaseIterable, CustomStringConvertible {
        case monday, tuesday, wednesday, thursday, friday, saturday, sunday

        /// The full lowercase English name: `monday`.
        public var description: String {
            switch self {
            case .monday: "monday"
            case .tuesday: "tuesday"
            case .wednesday: "wednesday"
            case .thursday: "thursday"
            case .friday: "friday"
            case .saturday: "saturday"
            case .sunday: "sunday"
            }
        }

        /// `monday` … `sunday` or `mon` … `sun`, in any case; nil for anything else.
        public init?(parsing text: String) {
            let word = text.trimmingSpaces().lowercased()
            guard let day = Weekday.allCases.first(where: { $0.description == word || $0.description.prefix(3) == word })
            else { return nil }
            self = day
        }
    }

    /// Which form this schedule is, with its values.
    public let kind: Kind

    /// The shortest interval `every` accepts: a point a minute is already more than a scheduled
    /// replica is for (use `async` for a replica that follows closely).
    public static let minimumIntervalSeconds: Int64 = 60

    static let secondsPerDay: Int64 = 86_400
    static let secondsPerWeek: Int64 = 604_800
    /// Monday 1970-01-05 00:00, the first Monday after the Unix epoch (a Thursday).
    static let mondayAnchor: Int64 = 4 * secondsPerDay

    /// A schedule of the given kind; nil when a value is out of range (an interval under a minute,
    /// a minute of the day outside 0 ..< 1440).
    public init?(kind: Kind) {
        switch kind {
        case .every(let seconds):
            guard seconds >= Self.minimumIntervalSeconds else { return nil }
        case .daily(let minute), .weekly(_, let minute):
            guard (0..<1440).contains(minute) else { return nil }
        }
        self.kind = kind
    }

    /// `N` followed by `s`, `m`, `h`, `d` or `w` (lowercase; `m` is minutes): `15m`, `1h`, `1d`, `1w`,
    /// `90s`. Nil for anything else, for overflow, and for an interval under a minute.
    public static func parseEvery(_ text: String) -> Schedule? {
        guard let seconds = DurationText.parseSeconds(text) else { return nil }
        return Schedule(kind: .every(seconds: seconds))
    }

    /// `HH:MM` (24-hour; the hour may have one digit) daily, or weekly on `weekday` when it is given
    /// (`monday` … `sunday` or `mon` … `sun`, any case). Nil when either does not parse.
    public static func parseAt(_ text: String, on weekday: String?) -> Schedule? {
        guard let minute = parseTimeOfDay(text) else { return nil }
        guard let weekday else { return Schedule(kind: .daily(minuteOfDay: minute)) }
        guard let day = Weekday(parsing: weekday) else { return nil }
        return Schedule(kind: .weekly(day, minuteOfDay: minute))
    }

    /// `H:MM` or `HH:MM`, 00:00 to 23:59, as minutes after midnight.
    static func parseTimeOfDay(_ text: String) -> Int? {
        let parts = text.trimmingSpaces().split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, (1...2).contains(parts[0].count), parts[1].count == 2,
              parts.allSatisfy({ $0.allSatisfy { $0.isASCII && $0.isNumber } }),
              let hour = Int(parts[0]), let minute = Int(parts[1]), hour < 24, minute < 60
        else { return nil }
        return hour * 60 + minute
    }

    /// The nominal period: the interval of `every`, a day for daily, a week for weekly.
    public var intervalSeconds: Int64 {
        switch kind {
        case .every(let seconds): seconds
        case .daily: Self.secondsPerDay
        case .weekly: Self.secondsPerWeek
        }
    }

    /// `HH:MM` for daily and weekly schedules, nil for `every`.
    public var timeOfDay: String? {
        switch kind {
        case .every: nil
        case .daily(let minute), .weekly(_, let minute): Self.formatTimeOfDay(minute)
        }
    }

    static func formatTimeOfDay(_ minute: Int) -> String {
        let (h, m) = minute.quotientAndRemainder(dividingBy: 60)
        return (h < 10 ? "0" : "") + "\(h):" + (m < 10 ? "0" : "") + "\(m)"
    }

    /// `every 1h`, `daily at 02:00`, `weekly on sunday at 02:00`.
    public var description: String {
        switch kind {
        case .every(let seconds): "every \(DurationText.format(seconds: seconds))"
        case .daily(let minute): "daily at \(Self.formatTimeOfDay(minute))"
        case .weekly(let day, let minute): "weekly on \(day) at \(Self.formatTimeOfDay(minute))"
        }
    }

    /// The first scheduled point strictly after `afterSeconds` (Unix seconds), given the local UTC
    /// offset in seconds (local = UTC + offset). Saturates at `Int64.max` rather than overflow.
    public func nextPoint(afterSeconds: Int64, utcOffsetSeconds: Int64 = 0) -> Int64 {
        // The points in local time are `base + k·period`; in UTC, `base - offset + k·period`.
        let base: Int64
        switch kind {
        case .every: base = Self.mondayAnchor
        case .daily(let minute): base = Int64(minute) * 60
        case .weekly(let day, let minute):
            base = Self.mondayAnchor + Int64(day.rawValue) * Self.secondsPerDay + Int64(minute) * 60
        }
        let period = intervalSeconds
        // Everything reduced modulo the period first, so that no step can overflow.
        let origin = Self.floorMod(Self.floorMod(base, period) - Self.floorMod(utcOffsetSeconds, period), period)
        let sincePoint = Self.floorMod(Self.floorMod(afterSeconds, period) - origin, period)
        let (next, overflow) = afterSeconds.addingReportingOverflow(period - sincePoint)
        return overflow ? .max : next
    }

    /// `a` modulo `m` (m > 0) in 0 ..< m, also for negative `a`.
    static func floorMod(_ a: Int64, _ m: Int64) -> Int64 {
        let r = a % m
        return r < 0 ? r + m : r
    }

    /// Unix `seconds` as an ISO 8601 UTC time, `2026-12-09T00:00:00Z` (proleptic Gregorian
    /// calendar; days from the epoch to a civil date as in Howard Hinnant's `civil_from_days`).
    /// Clamped to the years 0000–9999.
    public static func utcTimestamp(seconds unclamped: Int64) -> String {
        let seconds = min(max(unclamped, -62_167_219_200), 253_402_300_799)
        let days = floorDiv(seconds, secondsPerDay)
        let secondOfDay = seconds - days * secondsPerDay
        let z = days + 719_468
        let era = floorDiv(z, 146_097)
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let mp = (5 * dayOfYear + 2) / 153
        let day = dayOfYear - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
        func two(_ n: Int64) -> String { n < 10 ? "0\(n)" : "\(n)" }
        let yyyy = String(repeating: "0", count: max(0, 4 - String(year).count)) + String(year)
        return "\(yyyy)-\(two(month))-\(two(day))T\(two(secondOfDay / 3600)):\(two(secondOfDay / 60 % 60)):\(two(secondOfDay % 60))Z"
    }

    static func floorDiv(_ a: Int64, _ m: Int64) -> Int64 {
        (a - floorMod(a, m)) / m
    }
}

/// Durations as people write them in configuration: `N` followed by `s`, `m`, `h`, `d` or `w`
/// (seconds, minutes, hours, days, weeks; lowercase, so that `m` is never read as mebibytes).
public enum DurationText {
    static let units: [(suffix: Character, seconds: Int64)] = [("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)]

    /// Whole seconds, more than 0; nil for anything else (no unit, a fraction, a sign, overflow).
    public static func parseSeconds(_ text: String) -> Int64? {
        var digits = text.trimmingSpaces()
        guard let suffix = digits.last, let unit = units.first(where: { $0.suffix == suffix }) else { return nil }
        digits.removeLast()
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let n = Int64(digits), n > 0
        else { return nil }
        let (seconds, overflow) = n.multipliedReportingOverflow(by: unit.seconds)
        return overflow ? nil : seconds
    }

    /// `seconds` in the largest unit that divides it exactly (`1h`, `90m`, `1w`, `61s`), so that
    /// ``parseSeconds(_:)`` reads it back as the same number.
    public static func format(seconds: Int64) -> String {
        for unit in units where seconds != 0 && seconds % unit.seconds == 0 {
            return "\(seconds / unit.seconds)\(unit.suffix)"
        }
        return "\(seconds)s"
    }
}
