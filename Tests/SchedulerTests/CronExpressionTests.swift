import Foundation
import Testing

@testable import Scheduler

@Suite("CronExpression")
struct CronExpressionTests {
    static func date(_ s: String) -> Date {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        return f.date(from: s)!
    }

    struct Case: Sendable, CustomTestStringConvertible {
        var expression: String
        var zone: String
        var after: String
        var expected: String
        var note: String
        var testDescription: String { "\(note): '\(expression)' [\(zone)] after \(after)" }
    }

    static let cases: [Case] = [
        // Europe/Berlin spring forward: 2024-03-31 02:00 CET -> 03:00 CEST (01:00Z)
        Case(expression: "30 2 * * *", zone: "Europe/Berlin", after: "2024-03-30T12:00:00Z", expected: "2024-03-31T01:00:00Z",
             note: "Berlin skipped 02:30 runs once at 03:00 CEST"),
        Case(expression: "30 2 * * *", zone: "Europe/Berlin", after: "2024-03-31T01:00:00Z", expected: "2024-04-01T00:30:00Z",
             note: "Berlin day after the gap back at 02:30 CEST"),
        Case(expression: "*/15 * * * *", zone: "Europe/Berlin", after: "2024-03-31T00:50:00Z", expected: "2024-03-31T01:00:00Z",
             note: "Berlin every 15 min: the skipped hour collapses to one run at 03:00"),
        Case(expression: "*/15 * * * *", zone: "Europe/Berlin", after: "2024-03-31T01:00:00Z", expected: "2024-03-31T01:15:00Z",
             note: "Berlin every 15 min continues at 03:15 CEST"),
        // Europe/Berlin fall back: 2024-10-27 03:00 CEST -> 02:00 CET (01:00Z)
        Case(expression: "30 2 * * *", zone: "Europe/Berlin", after: "2024-10-26T12:00:00Z", expected: "2024-10-27T00:30:00Z",
             note: "Berlin repeated 02:30 runs at its first occurrence (CEST)"),
        Case(expression: "30 2 * * *", zone: "Europe/Berlin", after: "2024-10-27T00:30:00Z", expected: "2024-10-28T01:30:00Z",
             note: "Berlin repeated 02:30 does not run again at 02:30 CET"),
        Case(expression: "0 * * * *", zone: "Europe/Berlin", after: "2024-10-27T00:00:00Z", expected: "2024-10-27T02:00:00Z",
             note: "Berlin hourly: 02:00 runs once, next is 03:00 CET"),
        // America/New_York spring forward: 2024-03-10 02:00 EST -> 03:00 EDT (07:00Z)
        Case(expression: "30 2 * * *", zone: "America/New_York", after: "2024-03-09T12:00:00Z", expected: "2024-03-10T07:00:00Z",
             note: "New York skipped 02:30 runs once at 03:00 EDT"),
        Case(expression: "30 2 * * *", zone: "America/New_York", after: "2024-03-10T07:00:00Z", expected: "2024-03-11T06:30:00Z",
             note: "New York day after the gap at 02:30 EDT"),
        // America/New_York fall back: 2024-11-03 02:00 EDT -> 01:00 EST (06:00Z)
        Case(expression: "30 1 * * *", zone: "America/New_York", after: "2024-11-02T12:00:00Z", expected: "2024-11-03T05:30:00Z",
             note: "New York repeated 01:30 runs at its first occurrence (EDT)"),
        Case(expression: "30 1 * * *", zone: "America/New_York", after: "2024-11-03T05:30:00Z", expected: "2024-11-04T06:30:00Z",
             note: "New York repeated 01:30 does not run again at 01:30 EST"),
        Case(expression: "0,30 * * * *", zone: "America/New_York", after: "2024-11-03T05:30:00Z", expected: "2024-11-03T07:00:00Z",
             note: "New York half-hourly: the repeated hour runs once"),
        Case(expression: "30 1 * * *", zone: "America/New_York", after: "2024-11-03T06:10:00Z", expected: "2024-11-03T06:30:00Z",
             note: "New York started inside the repeated hour: 01:30 EST is the first occurrence after start"),
        // month ends
        Case(expression: "0 0 31 * *", zone: "UTC", after: "2024-04-15T00:00:00Z", expected: "2024-05-31T00:00:00Z",
             note: "31st skips April"),
        Case(expression: "0 0 30 * *", zone: "UTC", after: "2024-01-31T00:00:00Z", expected: "2024-03-30T00:00:00Z",
             note: "30th skips February"),
        Case(expression: "59 23 31 12 *", zone: "UTC", after: "2024-12-31T23:59:00Z", expected: "2025-12-31T23:59:00Z",
             note: "year end rolls a year"),
        Case(expression: "0 0 1 * *", zone: "Europe/Berlin", after: "2024-01-31T12:00:00Z", expected: "2024-01-31T23:00:00Z",
             note: "first of month in Berlin is 23:00Z the day before"),
        // leap day
        Case(expression: "0 0 29 2 *", zone: "UTC", after: "2024-03-01T00:00:00Z", expected: "2028-02-29T00:00:00Z",
             note: "leap day waits for the next leap year"),
        Case(expression: "0 0 29 2 *", zone: "UTC", after: "2023-01-01T00:00:00Z", expected: "2024-02-29T00:00:00Z",
             note: "leap day 2024"),
        Case(expression: "0 12 28-29 2 *", zone: "UTC", after: "2023-02-28T12:00:00Z", expected: "2024-02-28T12:00:00Z",
             note: "no Feb 29 in 2023"),
        // fields
        Case(expression: "0 0 13 * 5", zone: "UTC", after: "2024-09-01T00:00:00Z", expected: "2024-09-06T00:00:00Z",
             note: "day-of-month OR day-of-week (Vixie)"),
        Case(expression: "0 0 */2 * 1", zone: "UTC", after: "2024-01-01T00:00:00Z", expected: "2024-01-15T00:00:00Z",
             note: "a day-of-month starting with * is no restriction: odd days AND Mondays (Vixie, cronie)"),
        Case(expression: "0 0 */9223372036854775807 * *", zone: "UTC", after: "2024-01-01T00:00:00Z", expected: "2024-02-01T00:00:00Z",
             note: "a step as large as Int.max selects the range's start only"),
        Case(expression: "1/9223372036854775807 * * * *", zone: "UTC", after: "2024-01-01T00:01:00Z", expected: "2024-01-01T01:01:00Z",
             note: "a value with a step as large as Int.max is that value only"),
        Case(expression: "0 9 * * MON-FRI", zone: "UTC", after: "2024-06-07T10:00:00Z", expected: "2024-06-10T09:00:00Z",
             note: "weekday names skip the weekend"),
        Case(expression: "*/10 * * * * *", zone: "UTC", after: "2024-01-01T00:00:05Z", expected: "2024-01-01T00:00:10Z",
             note: "six fields with seconds"),
        Case(expression: "0 0 * * 7", zone: "UTC", after: "2024-06-07T00:00:00Z", expected: "2024-06-09T00:00:00Z",
             note: "weekday 7 is Sunday"),
        Case(expression: "@hourly", zone: "UTC", after: "2024-06-07T10:00:00Z", expected: "2024-06-07T11:00:00Z",
             note: "macro"),
        Case(expression: "0 0 * * 1/2", zone: "UTC", after: "2024-06-07T00:00:00Z", expected: "2024-06-10T00:00:00Z",
             note: "a weekday with a step runs to Saturday: Monday, Wednesday, Friday, not Sunday"),
        Case(expression: "0 0 * * 7/2", zone: "UTC", after: "2024-06-07T00:00:00Z", expected: "2024-06-09T00:00:00Z",
             note: "7 with a step is Sunday"),
        Case(expression: "0 0 29 2 */6", zone: "UTC", after: "2032-03-01T00:00:00Z", expected: "2048-02-29T00:00:00Z",
             note: "February 29 on a weekend: 16 years on, beyond an 8-year search"),
        Case(expression: "0 3 * * *\n", zone: "UTC", after: "2024-06-07T00:00:00Z", expected: "2024-06-07T03:00:00Z",
             note: "a trailing newline (a value read from a file) is whitespace"),
    ]

    @Test("next fire time matches the known answer", arguments: cases)
    func knownAnswers(_ c: Case) throws {
        let cron = try CronExpression(c.expression, timeZone: TimeZone(identifier: c.zone)!)
        let next = cron.nextDate(after: Self.date(c.after))
        #expect(next == Self.date(c.expected), "\(c.note): got \(String(describing: next))")
    }

    @Test("a day of DST change in Berlin fires hourly 23 times, the fall-back day 24 times (each local hour once)")
    func dstDayCounts() throws {
        let cron = try CronExpression("0 * * * *", timeZone: TimeZone(identifier: "Europe/Berlin")!)
        func count(from: String, to: String) -> Int {
            var n = 0
            var t = Self.date(from)
            let end = Self.date(to)
            while let next = cron.nextDate(after: t), next < end {
                n += 1
                t = next
            }
            return n
        }
        // local midnight to midnight
        #expect(count(from: "2024-03-30T22:59:59Z", to: "2024-03-31T22:00:00Z") == 23)
        #expect(count(from: "2024-10-26T21:59:59Z", to: "2024-10-27T23:00:00Z") == 24)
    }

    @Test("catchUp counts, keeps the last occurrences and finds the next exactly as walking nextSecond does, across DST and long spans",
          arguments: ["* * * * * *", "*/7 * * * * *", "0 * * * *", "30 2 * * *", "*/15 1-3 * * *", "0 0 29 2 *", "0 9 * * 1-5",
                      "0 0 1,15 * 0", "15 10 L * *".replacingOccurrences(of: "L", with: "28-31")])
    func catchUpMatchesWalk(_ expression: String) throws {
        let perSecond = expression.hasPrefix("*")
        for zone in ["UTC", "Europe/Berlin", "America/New_York"] {
            let cron = try CronExpression(expression, timeZone: TimeZone(identifier: zone)!)
            // Each transition of both zones in 2024, a long span across them, short spans.
            let spans: [(String, Int)] = [
                ("2024-03-31T00:10:00Z", 3 * 3600), ("2024-10-27T00:10:00Z", 3 * 3600),
                ("2024-03-10T06:10:00Z", 2 * 3600), ("2024-11-03T05:10:00Z", 2 * 3600),
                // The per-second forms are 34 M steps to walk over 400 days: 12 hours across Berlin's spring change.
                perSecond ? ("2024-03-30T19:00:07Z", 12 * 3600) : ("2024-01-01T00:00:00Z", 400 * 86_400),
                ("2024-06-07T10:00:00Z", 59), ("2024-06-07T10:00:00Z", perSecond ? 3 * 3600 : 86_400 * 9 + 3_601),
            ]
            for (from, length) in spans {
                let t = Int(Self.date(from).timeIntervalSince1970)
                let end = t + length
                var walked: [Int] = []
                var count = 0
                var next = cron.nextSecond(after: t)
                while let n = next, n <= end {
                    count += 1
                    walked.append(n)
                    if walked.count > 1_200 { walked.removeFirst(walked.count - 200) }
                    next = cron.nextSecond(after: n)
                }
                for keep in [0, 1, 3, 200] {
                    let fast = cron.catchUp(after: t, through: end, keep: keep)
                    let label = "\(expression) [\(zone)] from \(from) for \(length) s, keep \(keep)"
                    #expect(fast.count == count, "\(label)")
                    #expect(fast.last == Array(walked.suffix(keep)), "\(label)")
                    #expect(fast.next == next, "\(label)")
                }
            }
        }
    }

    @Test("catchUp over a year of a per-second job in Berlin: 31.6 M occurrences counted without a walk, the last three and the next exact")
    func catchUpYear() throws {
        let cron = try CronExpression("* * * * * *", timeZone: TimeZone(identifier: "Europe/Berlin")!)
        let t = Int(Self.date("2024-01-01T00:00:00Z").timeIntervalSince1970)
        let end = t + 366 * 86_400
        let result = cron.catchUp(after: t, through: end, keep: 3)
        // Every second of the leap year, less the second pass of the repeated hour in October
        // (each local time fires once; the skipped hour in March costs nothing: 03:00 follows 01:59:59).
        #expect(result.count == 366 * 86_400 - 3_600)
        #expect(result.last == [end - 2, end - 1, end])
        #expect(result.next == end + 1)
    }

    @Test("invalid expressions name the field and the knob")
    func invalid() {
        for (text, word) in [("61 * * * *", "minute"), ("* * *", "fields"), ("0 0 31 2 *", "never fires"),
                             ("0 25 * * *", "hour"), ("*/0 * * * *", "step"), ("0 0 * FOO *", "month"),
                             ("@reboot", "unknown macro '@reboot'"), ("0 0 L * *", "day-of-month")] {
            do {
                _ = try CronExpression(text, timeZone: TimeZone(identifier: "UTC")!)
                Issue.record("'\(text)' should not parse")
            } catch let e as SchedulerError {
                #expect(e.code == .invalidCronExpression)
                #expect(e.message.contains(word), "\(e.message)")
                #expect(e.message.contains("Trigger.cron"))
            } catch {
                Issue.record("unexpected \(error)")
            }
        }
    }
}
