import Foundation

/// A trigger's kind with its durations. Not generic: the trigger's instant (if any) is kept
/// beside it, so that the kind copies and switches as plain bytes in `schedule` (a generic
/// enum went through its value witnesses there: 7 % of the call).
enum TriggerKind: Sendable {
    /// Fixed rate: occurrences on a grid `first + n * period`; the first at the
    /// trigger's instant if it has one, else `firstDelay` (default `period`) after scheduling.
    case fixedRate(period: Duration, firstDelay: Duration?)
    /// Fixed delay: next run `delay` after the previous run ended.
    case fixedDelay(delay: Duration, initialDelay: Duration?)
    /// Once, `delay` after scheduling.
    case onceAfter(Duration)
    /// Once, at the trigger's instant.
    case onceAt
    /// Cron in a time zone, mapped to the clock through the wall clock (the
    /// expression is the trigger's `cron`).
    case cron
}

/// When a job runs.
///
/// `Instant` is the scheduler clock's instant type; write triggers with the
/// static factories and let the compiler infer it:
/// `scheduler.schedule(.every(.seconds(5))) { ... }`.
public struct Trigger<Instant: InstantProtocol>: Sendable where Instant.Duration == Duration {
    let kind: TriggerKind
    /// The first occurrence of `.fixedRate` when given, the instant of `.onceAt`.
    let instant: Instant?
    /// The expression of `.cron`.
    let cron: CronBox?

    /// Only the factories below build triggers, so that `kind` and the stored values agree.
    private init(kind: TriggerKind, instant: Instant? = nil, cron: CronBox? = nil) {
        self.kind = kind
        self.instant = instant
        self.cron = cron
    }

    /// Fixed rate: runs every `interval`, on a grid that does not drift with run
    /// duration. The first run is at `startingAt`, or one interval after scheduling.
    @_specialize(exported: true, where Instant == ContinuousClock.Instant)
    public static func every(_ interval: Duration, startingAt first: Instant? = nil) -> Self {
        Self(kind: .fixedRate(period: interval, firstDelay: nil), instant: first)
    }

    /// Fixed rate with the first run `firstDelay` after scheduling (use `.zero` to run at once).
    @_specialize(exported: true, where Instant == ContinuousClock.Instant)
    public static func every(_ interval: Duration, firstAfter firstDelay: Duration) -> Self {
        Self(kind: .fixedRate(period: interval, firstDelay: firstDelay))
    }

    /// Fixed delay: each run starts `delay` after the previous run ended. The
    /// first run is `initialDelay` (default: `delay`) after scheduling.
    @_specialize(exported: true, where Instant == ContinuousClock.Instant)
    public static func fixedDelay(_ delay: Duration, initialDelay: Duration? = nil) -> Self {
        Self(kind: .fixedDelay(delay: delay, initialDelay: initialDelay))
    }

    /// Runs once, `delay` after scheduling.
    @_specialize(exported: true, where Instant == ContinuousClock.Instant)
    public static func once(after delay: Duration) -> Self {
        Self(kind: .onceAfter(delay))
    }

    /// Runs once at `instant` (at once if it is in the past).
    @_specialize(exported: true, where Instant == ContinuousClock.Instant)
    public static func once(at instant: Instant) -> Self {
        Self(kind: .onceAt, instant: instant)
    }

    /// Runs on a parsed cron expression (see `CronExpression` for DST rules).
    @_specialize(exported: true, where Instant == ContinuousClock.Instant)
    public static func cron(_ expression: CronExpression) -> Self {
        Self(kind: .cron, cron: CronBox(expression))
    }

    /// Parses `expression` and runs on it in `timeZone`.
    /// - Throws: `SchedulerError` `.invalidCronExpression`.
    @_specialize(exported: true, where Instant == ContinuousClock.Instant)
    public static func cron(_ expression: String, timeZone: TimeZone = .current) throws -> Self {
        Self(kind: .cron, cron: CronBox(try CronExpression(expression, timeZone: timeZone)))
    }
}
