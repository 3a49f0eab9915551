/// A histogram of run lateness (actual start minus scheduled time).
public struct LatenessHistogram: Sendable, Hashable {
    /// Upper bounds of the buckets; the last bucket counts everything above the last bound.
    public static let bounds: [Duration] = [
        .microseconds(10), .microseconds(100), .microseconds(500), .milliseconds(1),
        .milliseconds(10), .milliseconds(100), .seconds(1),
    ]
    static let boundsNanoseconds: [Int64] = [10_000, 100_000, 500_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000]

    /// `counts[i]` runs had lateness `<= bounds[i]` (and above the previous bound);
    /// `counts[bounds.count]` had more than the last bound.
    public internal(set) var counts: [UInt64]

    /// Total runs recorded.
    public var total: UInt64 { counts.reduce(0, +) }

    init(counts: [UInt64] = Array(repeating: 0, count: 8)) {
        self.counts = counts
    }

    @inline(__always)
    static func bucket(_ ns: Int64) -> Int {
        var i = 0
        while i < 7 && ns > boundsNanoseconds[i] { i += 1 }
        return i
    }
}

/// Statistics of one job. Its failures, skipped, missed and coalesced counts and its lateness
/// buckets are kept in 32 bits and stop at `UInt32.max` (4,294,967,295) instead of wrapping;
/// `runs` and the scheduler's totals (`SchedulerStatistics`) are 64-bit.
public struct JobStatistics: Sendable, Hashable {
    /// The job's name.
    public var name: String
    /// Runs that finished (successfully or not).
    public var runs: UInt64
    /// Runs that threw (or timed out).
    public var failures: UInt64
    /// Occurrences not started because a run was in progress (overlap policy).
    public var skippedOverlaps: UInt64
    /// Overdue occurrences dropped by the missed-run policy.
    public var missedRuns: UInt64
    /// Overdue occurrences folded into one run by `.coalesce`.
    public var coalescedRuns: UInt64
    /// Runs in progress now.
    public var inFlight: Int
    /// Lateness of started runs.
    public var lateness: LatenessHistogram
}

/// Statistics of the whole scheduler.
public struct SchedulerStatistics: Sendable, Hashable {
    /// Jobs scheduled and not yet cancelled or completed.
    public var jobs: Int
    /// Ids in the timer queue now (pending jobs plus run timeouts).
    public var queuedTimers: Int
    /// Runs that finished.
    public var runs: UInt64
    /// Runs that threw or timed out.
    public var failures: UInt64
    /// Runs whose task was cancelled by a timeout.
    public var timeouts: UInt64
    /// Occurrences skipped by overlap policies.
    public var skippedOverlaps: UInt64
    /// Overdue occurrences dropped by missed-run policies.
    public var missedRuns: UInt64
    /// Overdue occurrences coalesced into one run.
    public var coalescedRuns: UInt64
    /// Runs in progress now.
    public var inFlight: Int
    /// Lateness of all started runs.
    public var lateness: LatenessHistogram
}

/// What `shutdown(deadline:)` did.
public struct ShutdownReport: Sendable, Hashable {
    /// A run that shutdown cut off.
    public struct CutOffRun: Sendable, Hashable {
        /// Why it was cut off.
        public enum Reason: Sendable, Hashable {
            /// The job's `ShutdownBehavior` is `.cancel`.
            case cancelledByPolicy
            /// It was still running at the shutdown deadline.
            case deadlineExceeded
            /// The scheduler's task itself was cancelled.
            case schedulerCancelled
        }
        /// The job's name.
        public var jobName: String
        /// The attempt number of the run.
        public var attempt: Int
        /// Why.
        public var reason: Reason
    }

    /// Runs that finished on their own while draining.
    public var drainedRuns: Int
    /// Runs whose task shutdown cancelled.
    public var cutOff: [CutOffRun]
    /// Jobs removed from the queue.
    public var jobsRemoved: Int
    /// Time from the start of shutdown until the last run ended.
    public var duration: Duration
}
