import Logging

/// The part of a scheduler a handle talks to (type-erased over the clock).
protocol JobOwner: AnyObject, Sendable {
    func cancelJob(_ id: JobID)
    func cancelJobAndWait(_ id: JobID) async
    func delayUntilNextRun(_ id: JobID) -> Duration?
    func isJobGone(_ id: JobID) -> Bool
    func statistics(of id: JobID) -> JobStatistics?
    var baseLogger: Logger { get }
    var flags: SchedulerFlags { get }
}

/// Identifies one scheduled job: its slot in the job table and a serial
/// number that is never reused, so a stale handle never reaches a new job.
struct JobID: Hashable, Sendable {
    var slot: UInt32
    var serial: UInt64
}

/// A scheduled job. Copy it freely; all copies refer to the same job.
public struct JobHandle: Sendable, Hashable {
    let id: JobID
    let owner: any JobOwner

    /// Cancels the job: it is removed from the timer queue at once (its memory
    /// is freed) and a run in progress has its task cancelled. Idempotent;
    /// safe to call from inside the job's own run.
    public func cancel() {
        owner.cancelJob(id)
    }

    /// Cancels the job and returns once no run of it is in progress.
    /// Called from inside the job's own run, it cancels and returns at once. "Inside" is
    /// the body and the tasks it starts (they inherit its run marker): an unstructured
    /// `Task` a body started and left running counts as inside whatever run its worker
    /// runs next, so from there the call may return while that run still goes on.
    public func cancelAndWait() async {
        await owner.cancelJobAndWait(id)
    }

    /// How long until the next planned run (zero if it is due), or nil if
    /// none is planned (cancelled, finished, or a fixed-delay job whose run is
    /// in progress).
    public var nextRun: Duration? {
        owner.delayUntilNextRun(id)
    }

    /// True once the job can no longer run: it was cancelled, its scheduler
    /// shut down, or it was a one-shot job that completed.
    public var isCancelled: Bool {
        owner.isJobGone(id)
    }

    /// The job's statistics, or nil once the job is gone.
    public var statistics: JobStatistics? {
        owner.statistics(of: id)
    }

    /// Handles are equal when they refer to the same job.
    public static func == (lhs: JobHandle, rhs: JobHandle) -> Bool {
        lhs.id == rhs.id && lhs.owner === rhs.owner
    }

    /// Hashes the job identity.
    public func hash(into hasher: inout Hasher) {
        hasher.combine(id)
        hasher.combine(ObjectIdentifier(owner))
    }
}
