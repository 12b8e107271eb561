import Testing
@testable import FerryCore

/// Monday 2024-01-01 00:00:00 UTC.
private let monday2024: Int64 = 1_704_067_200
private let hour: Int64 = 3600
private let day: Int64 = 86_400
private let week: Int64 = 604_800

@Suite("Schedule")
struct ScheduleTests {
    // MARK: parsing

    @Test("every accepts N followed by s, m, h, d or w, a minute or more", arguments: [
        ("1m", 60), ("15m", 900), ("1h", 3600), ("90s", 90), ("60s", 60), ("1d", 86_400), ("1w", 604_800),
        ("2w", 1_209_600), (" 6h ", 21_600),
    ] as [(String, Int64)])
    func parsesEvery(text: String, seconds: Int64) throws {
        let schedule = try #require(Schedule.parseEvery(text))
        #expect(schedule.kind == .every(seconds: seconds))
        #expect(schedule.intervalSeconds == seconds)
    }

    @Test("every refuses what is not an interval of a minute or more", arguments: [
        "", "h", "1", "59s", "30s", "0m", "-1h", "+1h", "1.5h", "1H", "1M", "1y", "1 h", "h1", "1hm",
        "99999999999999999w", "9223372036854775807m",
    ])
    func refusesEvery(text: String) {
        #expect(Schedule.parseEvery(text) == nil)
    }

    @Test("at accepts HH:MM and H:MM, daily or on a weekday in any case or abbreviated")
    func parsesAt() throws {
        #expect(Schedule.parseAt("02:00", on: nil)?.kind == .daily(minuteOfDay: 120))
        #expect(Schedule.parseAt("2:05", on: nil)?.kind == .daily(minuteOfDay: 125))
        #expect(Schedule.parseAt("00:00", on: nil)?.kind == .daily(minuteOfDay: 0))
        #expect(Schedule.parseAt("23:59", on: nil)?.kind == .daily(minuteOfDay: 1439))
        #expect(Schedule.parseAt("02:00", on: "sunday")?.kind == .weekly(.sunday, minuteOfDay: 120))
        #expect(Schedule.parseAt("02:00", on: "SUNDAY")?.kind == .weekly(.sunday, minuteOfDay: 120))
        #expect(Schedule.parseAt("02:00", on: "Sun")?.kind == .weekly(.sunday, minuteOfDay: 120))
        #expect(Schedule.parseAt("12:30", on: "mon")?.kind == .weekly(.monday, minuteOfDay: 750))
        for day in Schedule.Weekday.allCases {
            #expect(Schedule.parseAt("01:00", on: day.description)?.kind == .weekly(day, minuteOfDay: 60))
            #expect(Schedule.parseAt("01:00", on: String(day.description.prefix(3)))?.kind == .weekly(day, minuteOfDay: 60))
        }
    }

    @Test("at refuses times that are not HH:MM on the clock, and unknown weekdays", arguments: [
        ("24:00", nil), ("12:60", nil), ("1200", nil), ("12:5", nil), ("123:00", nil), (":30", nil), ("12:", nil),
        ("-1:00", nil), ("12:00:00", nil), ("", nil), ("noon", nil), ("02:00", "sundays"), ("02:00", "su"),
        ("02:00", ""), ("02:00", "7"),
    ] as [(String, String?)])
    func refusesAt(text: String, weekday: String?) {
        #expect(Schedule.parseAt(text, on: weekday) == nil)
    }

    @Test("a schedule built from a kind checks its values")
    func kindRanges() {
        #expect(Schedule(kind: .every(seconds: 59)) == nil)
        #expect(Schedule(kind: .every(seconds: 60)) != nil)
        #expect(Schedule(kind: .daily(minuteOfDay: 1440)) == nil)
        #expect(Schedule(kind: .weekly(.friday, minuteOfDay: -1)) == nil)
        #expect(Schedule(kind: .weekly(.friday, minuteOfDay: 1439)) != nil)
    }

    @Test("the description and the nominal period")
    func descriptionAndInterval() throws {
        #expect(try #require(Schedule.parseEvery("90m")).description == "every 90m")
        #expect(try #require(Schedule.parseEvery("7d")).description == "every 1w")
        #expect(try #require(Schedule.parseAt("2:00", on: nil)).description == "daily at 02:00")
        #expect(try #require(Schedule.parseAt("2:00", on: nil)).intervalSeconds == day)
        #expect(try #require(Schedule.parseAt("14:05", on: "Sun")).description == "weekly on sunday at 14:05")
        #expect(try #require(Schedule.parseAt("14:05", on: "Sun")).intervalSeconds == week)
        #expect(try #require(Schedule.parseAt("14:05", on: "Sun")).timeOfDay == "14:05")
        #expect(try #require(Schedule.parseEvery("1h")).timeOfDay == nil)
    }

    @Test("durations print in the largest exact unit and read back", arguments: [
        (60, "1m"), (90, "90s"), (3600, "1h"), (5400, "90m"), (86_400, "1d"), (604_800, "1w"), (1_209_600, "2w"),
        (90_000, "25h"), (61, "61s"),
    ] as [(Int64, String)])
    func durationText(seconds: Int64, text: String) {
        #expect(DurationText.format(seconds: seconds) == text)
        #expect(DurationText.parseSeconds(text) == seconds)
    }

    // MARK: every

    @Test("every 1h fires on the hour, strictly after the given time")
    func hourly() throws {
        let s = try #require(Schedule.parseEvery("1h"))
        #expect(s.nextPoint(afterSeconds: 0) == hour)
        #expect(s.nextPoint(afterSeconds: 1) == hour)
        #expect(s.nextPoint(afterSeconds: hour - 1) == hour)
        #expect(s.nextPoint(afterSeconds: hour) == 2 * hour)
        #expect(s.nextPoint(afterSeconds: monday2024 + 59 * 60) == monday2024 + hour)
    }

    @Test("intervals that divide a day are multiples of the interval since the epoch", arguments: [
        "1m", "15m", "90s", "1h", "6h", "8h", "1d", "2d", "4d",
    ])
    func epochAligned(text: String) throws {
        let s = try #require(Schedule.parseEvery(text))
        let p = s.intervalSeconds
        for t in [Int64(0), 1, 12_345, monday2024, monday2024 + 7777, 1_999_999_999] {
            let next = s.nextPoint(afterSeconds: t)
            #expect(next % p == 0, "\(text) after \(t) gave \(next)")
            #expect(next > t && next - t <= p)
        }
    }

    @Test("every 15m after 1000 s is 1800 s; before the epoch it still counts from the epoch")
    func quarterHourAndNegative() throws {
        let s = try #require(Schedule.parseEvery("15m"))
        #expect(s.nextPoint(afterSeconds: 1000) == 1800)
        #expect(s.nextPoint(afterSeconds: -1) == 0)
        #expect(s.nextPoint(afterSeconds: -900) == 0)
        #expect(s.nextPoint(afterSeconds: -901) == -900)
        let h = try #require(Schedule.parseEvery("1h"))
        #expect(h.nextPoint(afterSeconds: -5400) == -3600)
    }

    @Test("every 1w fires on Mondays at 00:00 UTC")
    func weeklyInterval() throws {
        let s = try #require(Schedule.parseEvery("1w"))
        #expect(s.nextPoint(afterSeconds: 0) == 4 * day)  // Monday 1970-01-05
        #expect(s.nextPoint(afterSeconds: monday2024 - 1) == monday2024)
        #expect(s.nextPoint(afterSeconds: monday2024) == monday2024 + week)
        #expect(s.nextPoint(afterSeconds: monday2024 + 3 * day) == monday2024 + week)
    }

    @Test("intervals that do not divide four days count from Monday 1970-01-05")
    func oddIntervals() throws {
        let seven = try #require(Schedule.parseEvery("7h"))
        let anchor = 4 * day
        #expect(seven.nextPoint(afterSeconds: anchor) == anchor + 7 * hour)
        #expect(seven.nextPoint(afterSeconds: anchor - 1) == anchor)
        #expect(seven.nextPoint(afterSeconds: 0) == anchor - 13 * 7 * hour)  // 345600 − 13·25200 = 18000
        let twoWeeks = try #require(Schedule.parseEvery("2w"))
        // 2024-01-01 is 2817 weeks after the anchor, an odd number: not a point.
        #expect(twoWeeks.nextPoint(afterSeconds: monday2024 - 1) == monday2024 + week)
    }

    @Test("with an offset, every 1d fires at local midnight and 1h on the local hour")
    func everyWithOffset() throws {
        let daily = try #require(Schedule.parseEvery("1d"))
        #expect(daily.nextPoint(afterSeconds: 0, utcOffsetSeconds: 2 * hour) == day - 2 * hour)
        #expect(daily.nextPoint(afterSeconds: 0, utcOffsetSeconds: -5 * hour) == 5 * hour)
        let hourly = try #require(Schedule.parseEvery("1h"))
        // UTC+5:30: the local hour is at :30 UTC.
        #expect(hourly.nextPoint(afterSeconds: 0, utcOffsetSeconds: 19_800) == 1800)
        #expect(hourly.nextPoint(afterSeconds: 1800, utcOffsetSeconds: 19_800) == 1800 + hour)
        // A whole-hour offset does not move hourly points.
        #expect(hourly.nextPoint(afterSeconds: 10, utcOffsetSeconds: -7 * hour) == hour)
        let weekly = try #require(Schedule.parseEvery("1w"))
        // Monday 00:00 at UTC+1 is Sunday 23:00 UTC.
        #expect(weekly.nextPoint(afterSeconds: monday2024 - 2 * hour, utcOffsetSeconds: hour) == monday2024 - hour)
    }

    // MARK: daily

    @Test("daily at 02:00 UTC: the boundary itself is not a next point")
    func daily() throws {
        let s = try #require(Schedule.parseAt("02:00", on: nil))
        #expect(s.nextPoint(afterSeconds: 0) == 2 * hour)
        #expect(s.nextPoint(afterSeconds: 2 * hour - 1) == 2 * hour)
        #expect(s.nextPoint(afterSeconds: 2 * hour) == day + 2 * hour)
        #expect(s.nextPoint(afterSeconds: monday2024 + 23 * hour) == monday2024 + day + 2 * hour)
        let midnight = try #require(Schedule.parseAt("00:00", on: nil))
        #expect(midnight.nextPoint(afterSeconds: monday2024 - 1) == monday2024)
        #expect(midnight.nextPoint(afterSeconds: monday2024) == monday2024 + day)
        let late = try #require(Schedule.parseAt("23:59", on: nil))
        #expect(late.nextPoint(afterSeconds: monday2024) == monday2024 + day - 60)
    }

    @Test("daily at 02:00 local is 01:00 UTC at UTC+1 and 07:00 UTC at UTC−5")
    func dailyWithOffset() throws {
        let s = try #require(Schedule.parseAt("02:00", on: nil))
        #expect(s.nextPoint(afterSeconds: 0, utcOffsetSeconds: hour) == hour)
        #expect(s.nextPoint(afterSeconds: hour, utcOffsetSeconds: hour) == day + hour)
        // At t = 0 it is 19:00 on Dec 31 in UTC−5; the next local 02:00 is 07:00 UTC on Jan 1.
        #expect(s.nextPoint(afterSeconds: 0, utcOffsetSeconds: -5 * hour) == 7 * hour)
        // An offset that moves the point across midnight: 00:30 at UTC+1 is 23:30 UTC the day before.
        let early = try #require(Schedule.parseAt("00:30", on: nil))
        #expect(early.nextPoint(afterSeconds: monday2024, utcOffsetSeconds: hour) == monday2024 + day - 30 * 60)
        // Offsets of a day or more wrap (not that any zone has one).
        #expect(s.nextPoint(afterSeconds: 0, utcOffsetSeconds: day + hour) == hour)
    }

    // MARK: weekly

    @Test("weekly on sunday at 02:00 UTC, with the wrap to next week")
    func weekly() throws {
        let s = try #require(Schedule.parseAt("02:00", on: "sunday"))
        let sunday = monday2024 + 6 * day + 2 * hour  // 2024-01-07 02:00
        #expect(s.nextPoint(afterSeconds: monday2024) == sunday)
        #expect(s.nextPoint(afterSeconds: sunday - 1) == sunday)
        #expect(s.nextPoint(afterSeconds: sunday) == sunday + week)
        #expect(s.nextPoint(afterSeconds: sunday + hour) == sunday + week)
        #expect(s.nextPoint(afterSeconds: 0) == 3 * day + 2 * hour)  // Sunday 1970-01-04
    }

    @Test("weekly on monday at 00:00: from Sunday 23:59 the next point is a minute away")
    func weeklyMondayMidnight() throws {
        let s = try #require(Schedule.parseAt("00:00", on: "mon"))
        #expect(s.nextPoint(afterSeconds: monday2024 - 60) == monday2024)
        #expect(s.nextPoint(afterSeconds: monday2024) == monday2024 + week)
        #expect(s.nextPoint(afterSeconds: monday2024 - week) == monday2024)
    }

    @Test("each weekday lands on its own day of the week", arguments: Schedule.Weekday.allCases)
    func eachWeekday(day weekday: Schedule.Weekday) throws {
        let s = try #require(Schedule.parseAt("06:15", on: weekday.description))
        let expected = monday2024 + Int64(weekday.rawValue) * day + 6 * hour + 15 * 60
        #expect(s.nextPoint(afterSeconds: monday2024) == expected)
        #expect(s.nextPoint(afterSeconds: expected) == expected + week)
    }

    @Test("weekly with an offset: monday 00:30 at UTC+1 is sunday 23:30 UTC; at UTC−8 it is monday 08:30 UTC")
    func weeklyWithOffset() throws {
        let s = try #require(Schedule.parseAt("00:30", on: "monday"))
        #expect(s.nextPoint(afterSeconds: monday2024 - 2 * hour, utcOffsetSeconds: hour) == monday2024 - 30 * 60)
        #expect(s.nextPoint(afterSeconds: monday2024 - 30 * 60, utcOffsetSeconds: hour) == monday2024 + week - 30 * 60)
        #expect(s.nextPoint(afterSeconds: monday2024, utcOffsetSeconds: -8 * hour) == monday2024 + 8 * hour + 30 * 60)
        let saturday = try #require(Schedule.parseAt("23:00", on: "sat"))
        // Saturday 23:00 at UTC−2 is Sunday 01:00 UTC.
        #expect(saturday.nextPoint(afterSeconds: monday2024, utcOffsetSeconds: -2 * hour) == monday2024 + 6 * day + hour)
    }

    // MARK: every kind

    @Test("the next point is always later, at most one period later, and a point itself")
    func invariants() throws {
        let schedules = try [
            Schedule.parseEvery("1m"), Schedule.parseEvery("7h"), Schedule.parseEvery("1w"), Schedule.parseEvery("3w"),
            Schedule.parseAt("02:00", on: nil), Schedule.parseAt("23:59", on: "sun"), Schedule.parseAt("00:00", on: "thu"),
        ].map { try #require($0) }
        let offsets: [Int64] = [0, hour, -5 * hour, 19_800, 14 * hour, -12 * hour]
        var t: Int64 = -3 * week
        while t < 3 * week {
            for s in schedules {
                for offset in offsets {
                    let next = s.nextPoint(afterSeconds: t, utcOffsetSeconds: offset)
                    #expect(next > t && next - t <= s.intervalSeconds, "\(s) offset \(offset) after \(t): \(next)")
                    #expect(s.nextPoint(afterSeconds: next - 1, utcOffsetSeconds: offset) == next)
                    #expect(s.nextPoint(afterSeconds: next, utcOffsetSeconds: offset) == next + s.intervalSeconds)
                }
            }
            t += 7919  // a prime, so that the samples fall at every phase of every period
        }
    }

    @Test("the far ends of time do not overflow")
    func extremes() throws {
        let s = try #require(Schedule.parseEvery("1h"))
        #expect(s.nextPoint(afterSeconds: .max) == .max)
        #expect(s.nextPoint(afterSeconds: .max - 1, utcOffsetSeconds: -14 * hour) == .max)
        #expect(s.nextPoint(afterSeconds: .min) > .min)
        let huge = try #require(Schedule(kind: .every(seconds: .max)))
        #expect(huge.nextPoint(afterSeconds: 0) > 0)
        #expect(huge.nextPoint(afterSeconds: .min, utcOffsetSeconds: .min) > .min)
    }

    @Test("next point times read as ISO 8601 UTC, not raw seconds", arguments: [
        (Int64(0), "1970-01-01T00:00:00Z"), (951_782_400, "2000-02-29T00:00:00Z"), (1_796_774_400, "2026-12-09T00:00:00Z"),
        (1_798_761_599, "2026-12-31T23:59:59Z"), (-1, "1969-12-31T23:59:59Z"), (4_107_542_400, "2100-03-01T00:00:00Z"),
        (.max, "9999-12-31T23:59:59Z"), (.min, "0000-01-01T00:00:00Z"),
    ])
    func utcTimestamps(seconds: Int64, text: String) {
        #expect(Schedule.utcTimestamp(seconds: seconds) == text)
    }
}
