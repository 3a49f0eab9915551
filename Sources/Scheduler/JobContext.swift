import Logging
import Synchronization

/// What a run knows about itself.
public struct JobContext<Instant: InstantProtocol>: Sendable where Instant.Duration == Duration {
    /// The occurrence this run is for (jitter included; for a retry, when the retry was due).
    public let scheduledTime: Instant
    /// When the scheduler started the run.
    public let actualStart: Instant
    /// 1 for a regular run, 2... for retries of a failed run.
    public let attempt: Int
    /// The job's name from `JobOptions.name`.
    public let jobName: String
    let job: JobID
    /// The worker's reference to the scheduler (gives the handle, the logger
    /// and the shutdown flag); see `RunOwner`.
    let owner: RunOwner

    /// The job's handle, e.g. to cancel the job from inside its own run.
    public var handle: JobHandle { JobHandle(id: job, owner: owner.target) }

    /// How late the run started: `actualStart - scheduledTime`.
    public var lateness: Duration { scheduledTime.duration(to: actualStart) }

    /// The scheduler's logger with `job` and `attempt` metadata.
    public var logger: Logger {
        var l = owner.target.baseLogger
        l[metadataKey: "job"] = "\(jobName)"
        l[metadataKey: "attempt"] = "\(attempt)"
        return l
    }

    /// True once the scheduler has begun shutting down; a long run may use it
    /// to stop early.
    public var isShuttingDown: Bool { owner.target.flags.isShuttingDown }
}

/// A run context's way to its scheduler: one per worker. Building a context
/// then retains an object only that worker touches, instead of the scheduler
/// itself, whose reference count every worker would change twice per run
/// from every core.
final class RunOwner: Sendable {
    let target: any JobOwner

    init(_ target: any JobOwner) { self.target = target }
}

/// Flags shared between the scheduler and its runs.
final class SchedulerFlags: Sendable {
    private let shuttingDown = Atomic<Bool>(false)

    var isShuttingDown: Bool { shuttingDown.load(ordering: .acquiring) }

    func markShuttingDown() { shuttingDown.store(true, ordering: .releasing) }
}
