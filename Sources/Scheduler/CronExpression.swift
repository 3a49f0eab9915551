import Foundation

/// A parsed cron expression evaluated in a time zone.
///
/// Five fields (`minute hour day-of-month month day-of-week`) or six with a
/// leading seconds field. Each field takes `*`, values, ranges `a-b`, steps
/// `*/n`, `a-b/n`, `a/n`, and comma lists; months and weekdays accept names
/// (`JAN`, `MON`), weekday 7 is Sunday, `?` means `*`. The macros `@yearly`,
/// `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight` and `@hourly` are
/// accepted. As in Vixie cron, when both day-of-month and day-of-week are
/// restricted a day matches if either matches; a field starting with `*`
/// (`*/2` too) is not restricted, so `0 0 */2 * 1` fires on odd days that
/// are Mondays.
///
/// Matching is done on local wall-clock time in `timeZone`. Across DST:
/// - a local time skipped by a spring-forward gap fires once, at the first
///   valid instant after the gap (e.g. `30 2 * * *` in Europe/Berlin on the
///   last Sunday of March fires at 03:00 CEST);
/// - a local time repeated by a fall-back overlap fires once, at its first
///   occurrence.
public struct CronExpression: Sendable, Hashable, CustomStringConvertible {
    /// The text the expression was parsed from.
    public let source: String
    /// The time zone whose wall clock the fields refer to.
    public let timeZone: TimeZone

    let seconds: UInt64  // bits 0...59
    let minutes: UInt64  // bits 0...59
    let hours: UInt64  // bits 0...23
    let daysOfMonth: UInt64  // bits 1...31
    let months: UInt64  // bits 1...12
    let daysOfWeek: UInt64  // bits 0...6, 0 = Sunday
    let domRestricted: Bool
    let dowRestricted: Bool
    /// True when the expression had a seconds field.
    public let hasSeconds: Bool

    /// Parses `expression` for `timeZone`.
    /// - Throws: `SchedulerError` with code `.invalidCronExpression` naming the field.
    public init(_ expression: String, timeZone: TimeZone = .current) throws {
        self.source = expression
        self.timeZone = timeZone
        // Any whitespace separates fields (a value read from a file ends with a newline).
        var text = expression.trimmingCharacters(in: .whitespacesAndNewlines)
        switch text.lowercased() {
        case "@yearly", "@annually": text = "0 0 1 1 *"
        case "@monthly": text = "0 0 1 * *"
        case "@weekly": text = "0 0 * * 0"
        case "@daily", "@midnight": text = "0 0 * * *"
        case "@hourly": text = "0 * * * *"
        default:
            if text.hasPrefix("@") {
                throw SchedulerError(.invalidCronExpression,
                    "cron expression '\(expression)': unknown macro '\(text)'; the macros are @yearly, @annually, @monthly, @weekly, @daily, @midnight and @hourly (@reboot has no meaning for a scheduler) (Trigger.cron)")
            }
        }
        let fields = text.split(whereSeparator: { $0.isWhitespace }).map(String.init)
        guard fields.count == 5 || fields.count == 6 else {
            throw SchedulerError(
                .invalidCronExpression,
                "cron expression '\(expression)' has \(fields.count) fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (with leading seconds) (Trigger.cron)"
            )
        }
        hasSeconds = fields.count == 6
        let f = hasSeconds ? fields : ["0"] + fields
        func parse(_ i: Int, _ name: String, _ lo: Int, _ hi: Int, _ names: [String] = []) throws -> (UInt64, Bool) {
            try CronExpression.parseField(f[i], name: name, lo: lo, hi: hi, names: names, expression: expression)
        }
        seconds = try parse(0, "second", 0, 59).0
        minutes = try parse(1, "minute", 0, 59).0
        hours = try parse(2, "hour", 0, 23).0
        let dom = try parse(3, "day-of-month", 1, 31)
        daysOfMonth = dom.0
        domRestricted = dom.1
        months = try parse(4, "month", 1, 12, ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]).0
        var dow = try parse(5, "day-of-week", 0, 7, ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])
        if dow.0 & (1 << 7) != 0 { dow.0 = (dow.0 | 1) & ~(1 << 7) }
        daysOfWeek = dow.0
        dowRestricted = dow.1
        // A day-of-month that no selected month has (e.g. 31 in February only) never fires.
        var possible = false
        for m in 1...12 where months & (1 << UInt64(m)) != 0 {
            let maxDay = CronExpression.daysIn(month: m, year: 2024)  // leap year: Feb 29 allowed
            if daysOfMonth & CronExpression.mask(1, maxDay) != 0 { possible = true }
        }
        if !possible && !(dowRestricted && domRestricted) {
            throw SchedulerError(
                .invalidCronExpression,
                "cron expression '\(expression)' never fires: no selected month has the selected day-of-month (Trigger.cron)"
            )
        }
    }

    /// `source` and time zone identifier.
    public var description: String { "\(source) [\(timeZone.identifier)]" }

    static func mask(_ lo: Int, _ hi: Int) -> UInt64 {
        guard hi >= lo else { return 0 }
        var m: UInt64 = 0
        for v in lo...hi { m |= 1 << UInt64(v) }
        return m
    }

    private static func parseField(
        _ field: String, name: String, lo: Int, hi: Int, names: [String], expression: String
    ) throws -> (UInt64, Bool) {
        func fail(_ why: String) -> SchedulerError {
            SchedulerError(.invalidCronExpression, "cron expression '\(expression)': \(name) field '\(field)' \(why) (Trigger.cron)")
        }
        func value(_ s: Substring) throws -> Int {
            if let v = Int(s) {
                guard v >= lo && v <= hi else { throw fail("has value \(v) outside \(lo)-\(hi)") }
                return v
            }
            if let i = names.firstIndex(of: s.uppercased()) {
                return i + (name == "month" ? 1 : 0)
            }
            throw fail("has '\(s)', which is not a number\(names.isEmpty ? "" : " or name")")
        }
        var result: UInt64 = 0
        // As in Vixie cron and cronie: a field that starts with `*` (so `*/2` too) is not a
        // restriction when day-of-month and day-of-week are combined.
        let restricted = !(field.hasPrefix("*") || field.hasPrefix("?"))
        for item in field.split(separator: ",", omittingEmptySubsequences: false) {
            guard !item.isEmpty else { throw fail("has an empty list item") }
            let parts = item.split(separator: "/", omittingEmptySubsequences: false)
            guard parts.count <= 2 else { throw fail("has more than one '/'") }
            var step = 1
            if parts.count == 2 {
                guard let s = Int(parts[1]), s > 0 else { throw fail("has step '\(parts[1])'; a step must be a positive number") }
                step = s
            }
            let range = parts[0]
            var a: Int
            var b: Int
            if range == "*" || range == "?" {
                a = lo
                b = hi
                if name == "day-of-week" { b = 6 }
            } else if let dash = range.firstIndex(of: "-") {
                a = try value(range[range.startIndex..<dash])
                b = try value(range[range.index(after: dash)...])
                guard a <= b else { throw fail("has range \(a)-\(b) whose start is after its end") }
            } else {
                a = try value(range)
                // `a/n` runs to the field's end; for day-of-week that is Saturday (6), as for
                // `*`: 7 is Sunday again, which `1/2` (Monday, Wednesday, Friday) must not add.
                b = parts.count == 2 ? (name == "day-of-week" ? Swift.max(a, 6) : hi) : a
            }
            var v = a
            while v <= b {
                result |= 1 << UInt64(v)
                let (next, overflow) = v.addingReportingOverflow(step)
                if overflow { break }  // a step beyond Int.max (`*/9223372036854775807`) trapped here
                v = next
            }
        }
        return (result, restricted)
    }

    // MARK: - Civil calendar arithmetic (proleptic Gregorian, days since 1970-01-01)

    static func daysFromCivil(_ y0: Int, _ m: Int, _ d: Int) -> Int {
        let y = m <= 2 ? y0 - 1 : y0
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = (m + 9) % 12
        let doy = (153 * mp + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146097 + doe - 719468
    }

    static func civilFromDays(_ z0: Int) -> (year: Int, month: Int, day: Int) {
        let z = z0 + 719468
        let era = (z >= 0 ? z : z - 146096) / 146097
        let doe = z - era * 146097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
        let y = yoe + era * 400
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (m <= 2 ? y + 1 : y, m, d)
    }

    static func daysIn(month: Int, year: Int) -> Int {
        switch month {
        case 2: return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }

    /// The lowest set bit at or above `from` in `mask`, if any at or below `upTo`.
    @inline(__always)
    static func next(in mask: UInt64, from: Int, upTo: Int) -> Int? {
        guard from <= upTo, from < 64 else { return nil }
        let m = mask >> UInt64(from)
        guard m != 0 else { return nil }
        let v = from + m.trailingZeroBitCount
        return v <= upTo ? v : nil
    }

    private func dayMatches(day: Int, weekday: Int) -> Bool {
        let dom = daysOfMonth & (1 << UInt64(day)) != 0
        let dow = daysOfWeek & (1 << UInt64(weekday)) != 0
        if domRestricted && dowRestricted { return dom || dow }
        return dom && dow
    }

    // MARK: - Time zone mapping (Foundation TimeZone)

    private func offset(at seconds: Int) -> Int {
        timeZone.secondsFromGMT(for: Date(timeIntervalSince1970: TimeInterval(seconds)))
    }

    /// The instant (seconds since 1970) of local wall time `wall` (naive seconds):
    /// the first occurrence if the wall time is repeated and later than `after`,
    /// the later occurrence if only that one is after `after`, the end of the
    /// gap if the wall time was skipped; nil if no such instant is after `after`.
    private func instant(forWall wall: Int, after: Int) -> Int? {
        let offsets = Set([offset(at: wall - 86_400), offset(at: wall), offset(at: wall + 86_400)])
        var valid: [Int] = []
        for o in offsets where offset(at: wall - o) == o { valid.append(wall - o) }
        valid.sort()
        if let first = valid.first(where: { $0 > after }) { return first }
        if !valid.isEmpty { return nil }
        // Skipped local time: the first valid instant after the gap is the transition itself.
        var lo = wall - (offsets.max() ?? 0)
        var hi = wall - (offsets.min() ?? 0)
        let before = offset(at: lo)
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2
            if offset(at: mid) == before { lo = mid } else { hi = mid }
        }
        return hi > after ? hi : nil
    }

    /// How far ahead `nextDate(after:)` looks: 400 years, one cycle of the Gregorian calendar
    /// (February 29 on a weekend, `0 0 29 2 */6` with `*` weekdays ANDed, recurs only every
    /// 12 to 28 years).
    static let horizonSeconds = 400 * 366 * 86_400

    /// The first instant strictly after `date` at which the expression fires,
    /// or nil if there is none within the next 400 years (one Gregorian cycle: an
    /// expression that matches at all matches within it; one that can never match, such as
    /// February 30, is refused when parsed).
    public func nextDate(after date: Date) -> Date? {
        guard let s = nextSecond(after: Int(date.timeIntervalSince1970.rounded(.down))) else { return nil }
        return Date(timeIntervalSince1970: TimeInterval(s))
    }

    /// `nextDate(after:)` on whole seconds since 1970.
    func nextSecond(after t: Int) -> Int? {
        var wall = t + offset(at: t) + 1
        let limit = wall + Self.horizonSeconds
        while wall < limit {
            guard let w = nextMatchingWall(from: wall, before: limit) else { return nil }
            if let instant = instant(forWall: w, after: t) {
                return instant
            }
            wall = w + 1
        }
        return nil
    }

    /// The first local wall second at or after `wall` (naive seconds) that the fields match,
    /// if one is before `limit`. Calendar arithmetic only: no time-zone lookup.
    private func nextMatchingWall(from start: Int, before limit: Int) -> Int? {
        var wall = start
        while wall < limit {
            let days = Int((Double(wall) / 86_400).rounded(.down))
            var secOfDay = wall - days * 86_400
            let (y, mo, d) = CronExpression.civilFromDays(days)
            if months & (1 << UInt64(mo)) == 0 {
                // first day of the next month
                let (ny, nm) = mo == 12 ? (y + 1, 1) : (y, mo + 1)
                wall = CronExpression.daysFromCivil(ny, nm, 1) * 86_400
                continue
            }
            let weekday = ((days % 7) + 7 + 4) % 7
            if !dayMatches(day: d, weekday: weekday) {
                wall = (days + 1) * 86_400
                continue
            }
            var h = secOfDay / 3600
            var mi = (secOfDay / 60) % 60
            var se = secOfDay % 60
            guard let nh = CronExpression.next(in: hours, from: h, upTo: 23) else {
                wall = (days + 1) * 86_400
                continue
            }
            if nh != h { h = nh; mi = 0; se = 0 }
            guard let nmi = CronExpression.next(in: minutes, from: mi, upTo: 59) else {
                wall = days * 86_400 + (h + 1) * 3600
                continue
            }
            if nmi != mi { mi = nmi; se = 0 }
            guard let nse = CronExpression.next(in: seconds, from: se, upTo: 59) else {
                wall = days * 86_400 + h * 3600 + (mi + 1) * 60
                continue
            }
            se = nse
            secOfDay = h * 3600 + mi * 60 + se
            return days * 86_400 + secOfDay
        }
        return nil
    }

    /// The occurrences after `t` up to and including `end` (seconds since 1970): how many, the
    /// last `keep` of them (oldest first), and the first one after `end` (nil: none within
    /// `nextSecond`'s horizon). Exactly what calling `nextSecond` from `t` until past `end`
    /// gives, without the walk: while the zone's offset is constant (more than two days from a
    /// transition) whole local days are counted by their fields, and only the first and last
    /// day (and the days holding the last `keep`) are stepped, by calendar arithmetic. A
    /// scheduler catching up a per-second job after a day-long stall did 86,400 `nextSecond`
    /// calls (six time-zone lookups each) under its lock.
    func catchUp(after t: Int, through end: Int, keep: Int) -> (count: Int, last: [Int], next: Int?) {
        guard end > t else { return (0, [], nextSecond(after: t)) }
        let keep = max(0, keep)
        var count = 0
        var recent: [Int] = []
        func note(_ instant: Int) {
            count += 1
            guard keep > 0 else { return }
            recent.append(instant)
            if recent.count >= 2 * keep + 64 { recent.removeFirst(recent.count - keep) }
        }
        func result(_ next: Int?) -> (count: Int, last: [Int], next: Int?) { (count, Array(recent.suffix(keep)), next) }
        let perDay = hours.nonzeroBitCount * minutes.nonzeroBitCount * seconds.nonzeroBitCount
        var cur = t
        while cur < end {
            // The first transition whose surroundings are not behind `cur` (any offset change
            // is under 26 hours). Around it wall times are skipped or repeated: within `margin`
            // of it (the change plus a minute) a wall second may map to either offset,
            // elsewhere to one.
            var transition = nextTransition(after: cur - 26 * 3600)
            var margin = 0
            while transition != .max {
                margin = abs(offset(at: transition + 1) - offset(at: transition - 1)) + 60
                if transition + margin > cur { break }
                transition = nextTransition(after: transition)
            }
            if transition != .max && transition - margin <= cur {
                // Near the transition: the exact walk, until past it.
                let until = transition + margin
                while cur < until {
                    guard let n = nextSecond(after: cur) else { return result(nil) }
                    if n > end { return result(n) }
                    note(n)
                    cur = n
                }
                continue
            }
            // Instants in (cur, safeEnd] have one offset, and their wall seconds no other: the
            // instant of wall second w is w - offset.
            let offset = offset(at: cur)
            let safeEnd = transition == .max ? end : min(end, transition - margin)
            let lastWall = safeEnd + offset
            var wall = cur + offset + 1
            // Step to the first whole local day, count whole days by their fields, then step to
            // the end. The last `keep` may lie in the counted days: the last matching ones are
            // remembered and stepped again (without counting) before the tail.
            let firstWholeDay = Int((Double(wall) / 86_400).rounded(.up))
            let lastWholeDay = Int((Double(lastWall + 1) / 86_400).rounded(.down)) - 1
            func step(before limit: Int, counting: Bool) {
                while let w = nextMatchingWall(from: wall, before: limit), w < limit {
                    if counting { note(w - offset) } else { recent.append(w - offset) }
                    wall = w + 1
                }
                wall = limit
            }
            if firstWholeDay <= lastWholeDay && perDay > 0 {
                step(before: firstWholeDay * 86_400, counting: true)
                let daysToKeep = (keep + perDay - 1) / perDay
                var lastDays: [Int] = []
                for day in firstWholeDay...lastWholeDay {
                    let (_, month, dayOfMonth) = CronExpression.civilFromDays(day)
                    let weekday = ((day % 7) + 7 + 4) % 7
                    guard months & (1 << UInt64(month)) != 0 && dayMatches(day: dayOfMonth, weekday: weekday) else { continue }
                    count += perDay
                    if daysToKeep > 0 {
                        lastDays.append(day)
                        if lastDays.count >= 2 * daysToKeep + 64 { lastDays.removeFirst(lastDays.count - daysToKeep) }
                    }
                }
                for day in lastDays.suffix(daysToKeep) {
                    wall = day * 86_400
                    step(before: (day + 1) * 86_400, counting: false)
                }
                if recent.count > keep { recent.removeFirst(recent.count - keep) }
                wall = (lastWholeDay + 1) * 86_400
            }
            step(before: lastWall + 1, counting: true)
            cur = safeEnd
        }
        return result(nextSecond(after: end))
    }

    /// The next time the zone's offset changes after `t` (seconds since 1970), or `Int.max`.
    private func nextTransition(after t: Int) -> Int {
        guard let date = timeZone.nextDaylightSavingTimeTransition(after: Date(timeIntervalSince1970: TimeInterval(t))) else { return .max }
        return Int(date.timeIntervalSince1970.rounded(.down))
    }
}
