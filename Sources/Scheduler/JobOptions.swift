/// What to do when a job comes due while a previous run of it is still in progress.
public enum OverlapPolicy: Sendable, Hashable {
    /// Do not start; count a skipped overlap (default).
    case skip
    /// Remember one run and start it as soon as the current one ends; further
    /// occurrences meanwhile are skipped.
    case queueOne
    /// Start alongside, up to `max` runs in progress at once; beyond that, skip.
    case concurrent(max: Int)
}

/// What to do when a job fell behind by at least one full occurrence (the
/// process stalled, the machine slept, or the driver was starved), so that
/// more than one occurrence is due at once.
///
/// An occurrence that is merely late (the next one is not yet due) always runs.
public enum MissedRunPolicy: Sendable, Hashable {
    /// Run none of the overdue occurrences; count them as missed and wait for
    /// the next occurrence in the future (default).
    case skip
    /// Run once now for all of them (for the latest); count the others as coalesced.
    case coalesce
    /// Run up to `max` of the most recent ones back to back, now; count the rest as missed.
    case burst(max: Int)
}

/// What a job's in-progress runs do when the scheduler shuts down.
public enum ShutdownBehavior: Sendable, Hashable {
    /// Let the run finish, up to the shutdown deadline; then cancel it (default).
    case drain
    /// Cancel the run's task at once.
    case cancel
}

/// Retry of a failed run with capped exponential backoff.
///
/// Attempt `n + 1` starts `min(initialBackoff * multiplier^(n-1), maxBackoff)`
/// after attempt `n` failed, up to `maxAttempts` attempts in all. If the job's
/// next regular occurrence comes first, the retry is dropped and the regular
/// run starts again at attempt 1. A fixed-delay job's next regular run comes
/// its delay after the retry ends (the delay counts from the last run's end).
public struct RetryPolicy: Sendable, Hashable {
    /// Attempts in all, including the first (>= 1).
    public var maxAttempts: Int
    /// Wait before the first retry.
    public var initialBackoff: Duration
    /// Upper bound of any wait.
    public var maxBackoff: Duration
    /// Growth factor per attempt (>= 1).
    public var multiplier: Double

    /// Creates a retry policy.
    public init(maxAttempts: Int = 3, initialBackoff: Duration = .seconds(1), maxBackoff: Duration = .seconds(60), multiplier: Double = 2) {
        self.maxAttempts = maxAttempts
        self.initialBackoff = initialBackoff
        self.maxBackoff = maxBackoff
        self.multiplier = multiplier
    }

    /// The wait after failed attempt `attempt` (1-based).
    /// Never traps: a growth past `Int64` nanoseconds, or an infinite multiplier, gives
    /// `maxBackoff`; a zero initial backoff stays zero.
    public func backoff(afterAttempt attempt: Int) -> Duration {
        let initialNanoseconds = initialBackoff.nanoseconds
        let maxNanoseconds = maxBackoff.nanoseconds
        if initialNanoseconds <= 0 { return .zero }
        let value = Double(initialNanoseconds) * Foundation.pow(multiplier, Double(max(0, attempt - 1)))
        // NaN fails the comparison, and the cap is at most Double(Int64.max) = 2^63, so
        // whatever passes converts to Int64.
        guard value < Double(maxNanoseconds) else { return .nanoseconds(max(0, maxNanoseconds)) }
        return .nanoseconds(Int64(value))
    }
}

import Foundation

/// Per-job options.
public struct JobOptions: Sendable {
    /// A name for logs, statistics, and the `job_name` dimension of `ownMetrics`.
    public var name: String
    /// See `OverlapPolicy`; default `.skip`.
    public var overlap: OverlapPolicy
    /// See `MissedRunPolicy`; default `.skip`.
    public var missedRuns: MissedRunPolicy
    /// Each occurrence is delayed by a uniform random amount in `0...jitter`.
    /// The grid itself does not drift.
    public var jitter: Duration
    /// If set, a run still in progress this long after it was handed to the
    /// workers (normally its start) has its task cancelled. It counts as a
    /// timeout, and as a failed run (so `retry` applies) unless its body
    /// returned normally anyway: that run did its work and is not repeated.
    public var timeout: Duration?
    /// If set, a failed run is retried with backoff.
    public var retry: RetryPolicy?
    /// What in-progress runs do at shutdown; default `.drain`.
    public var shutdown: ShutdownBehavior
    /// When true, the job's runs, failures, lateness, skipped overlaps, missed and coalesced
    /// runs go to series of its own, with the dimension `job_name` = `name` beside `scheduler`,
    /// and not to the scheduler's shared series (summed by `scheduler`, the two still give
    /// every job's total). Default false: six series a job, for a few named jobs, not for
    /// thousands (jobs with the same name share their series).
    public var ownMetrics: Bool

    /// The name of a job scheduled without one: "job".
    public static let defaultName = "job"

    /// Creates options; every parameter has the documented default.
    public init(
        name: String = JobOptions.defaultName,
        overlap: OverlapPolicy = .skip,
        missedRuns: MissedRunPolicy = .skip,
        jitter: Duration = .zero,
        timeout: Duration? = nil,
        retry: RetryPolicy? = nil,
        shutdown: ShutdownBehavior = .drain,
        ownMetrics: Bool = false
    ) {
        self.name = name
        self.overlap = overlap
        self.missedRuns = missedRuns
        self.jitter = jitter
        self.timeout = timeout
        self.retry = retry
        self.shutdown = shutdown
        self.ownMetrics = ownMetrics
    }
}

extension Int64 {
    /// `self + other`, saturating at `Int64`'s bounds: a deadline that far away is
    /// never reached, rather than wrapping into the past and firing at once.
    @inline(__always)
    func saturatingAdd(_ other: Int64) -> Int64 {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? (other > 0 ? .max : .min) : sum
    }
}

extension Duration {
    /// Whole nanoseconds, truncating toward zero, saturating at `Int64`'s bounds.
    ///
    /// Without a 128-bit division (`__divti3` was 1 % of `schedule`, and the scheduler
    /// converts instants to ticks several times per run): the magnitude is split as
    /// `hi * 2^64 + lo`, and `2^64 = q1 * 10^9 + r1`, so only 64-bit divisions by a
    /// constant remain, which compile to multiplications.
    @inline(__always)
    var nanoseconds: Int64 {
        let a = attoseconds
        let m = a.magnitude
        let hi = UInt64(truncatingIfNeeded: m >> 64)
        let lo = UInt64(truncatingIfNeeded: m)
        let d: UInt64 = 1_000_000_000
        let q1: UInt64 = 18_446_744_073  // 2^64 / 10^9
        let r1: UInt64 = 709_551_616  // 2^64 % 10^9
        // |a| >= 10^9 * 2^64 as: far beyond Int64.max ns.
        guard hi < d else { return a < 0 ? .min : .max }
        // m = d * (hi * q1) + hi * r1 + lo (an overflow of hi * q1 saturates below).
        let (base, o1) = hi.multipliedReportingOverflow(by: q1)
        let (s, carry) = (hi &* r1).addingReportingOverflow(lo)  // hi * r1 < 10^18: no overflow
        // After a carry, s + 2^64 = s + q1 * d + r1, and s < 10^18, so s + r1 fits.
        let (q, o2) = base.addingReportingOverflow(carry ? q1 &+ (s &+ r1) / d : s / d)
        if o1 || o2 || q > UInt64(Int64.max) {
            if a < 0 && !o1 && !o2 && q == UInt64(Int64.max) + 1 { return .min }
            return a < 0 ? .min : .max
        }
        return a < 0 ? -Int64(q) : Int64(q)
    }
}
