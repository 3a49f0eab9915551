import Foundation

/// SplitMix64: a small deterministic generator for jitter.
struct SplitMix64: RandomNumberGenerator, Sendable {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

final class CronBox: Sendable {
    let expression: CronExpression
    init(_ e: CronExpression) { expression = e }
}

/// A job's jitter, timeout and retry policy, boxed only when one of them is set: most
/// jobs have none, and the job record stays 24 bytes smaller.
final class OptionExtras: Sendable {
    let jitter: Int64
    let timeout: Int64  // 0: none
    let retry: RetryPolicy?
    init(jitter: Int64, timeout: Int64, retry: RetryPolicy?) {
        self.jitter = jitter
        self.timeout = timeout
        self.retry = retry
    }
}

/// Eight counters (a lateness histogram) with 4-byte alignment: `SIMD8<UInt32>` is 16-byte
/// aligned and padded the job record by 8 bytes.
struct Counts8: Sendable {
    private var counts: (UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32) = (0, 0, 0, 0, 0, 0, 0, 0)

    subscript(_ index: Int) -> UInt32 {
        get {
            precondition(index >= 0 && index < 8)
            return withUnsafeBytes(of: counts) { $0.load(fromByteOffset: index * 4, as: UInt32.self) }
        }
        set {
            precondition(index >= 0 && index < 8)
            withUnsafeMutableBytes(of: &counts) { $0.storeBytes(of: newValue, toByteOffset: index * 4, as: UInt32.self) }
        }
    }
}

extension UInt32 {
    /// Adds `n` (not negative), stopping at `UInt32.max`: a job's own counts are 32 bits to
    /// keep its record small, and a count that wrapped would read as a few where there were
    /// billions (the scheduler's totals are 64 bits).
    @inline(__always)
    mutating func addSaturating(_ n: Int64) {
        let sum = UInt64(self) &+ UInt64(Swift.max(0, n))
        self = sum > UInt64(UInt32.max) ? .max : UInt32(sum)
    }
}

/// State bits of a job record.
struct JobFlags: OptionSet, Sendable {
    var rawValue: UInt8
    static let gone = JobFlags(rawValue: 1)  // cancelled / shut down / completed: never fires again
    static let queuedRun = JobFlags(rawValue: 2)  // overlap .queueOne holds a run
    static let retryPending = JobFlags(rawValue: 4)  // the queue key is a retry, not the regular due
    static let inUse = JobFlags(rawValue: 8)
    /// Cancelled through its handle: never revived by a retry. (The run's own
    /// cancel reason is not enough: a cancel that lands after the body ended
    /// and before the run is recorded reaches no run.)
    static let cancelledByHandle = JobFlags(rawValue: 16)
}

/// The scheduler's bookkeeping as a value type: jobs, the timer queue, runs in
/// progress, run timeouts, statistics and the shutdown phase.
///
/// It takes events (schedule, cancel, time passed, run finished, shutdown)
/// and returns what the shell must do (start these runs, cancel those tasks,
/// resume those waiters). It never sleeps, never spawns, never reads a clock:
/// time comes in as ticks (nanoseconds since the scheduler's epoch) and, for
/// cron, as a wall-clock `Date`.
struct SchedulerState<Instant: InstantProtocol>: Sendable where Instant.Duration == Duration {
    typealias Body = nonisolated(nonsending) @Sendable (JobContext<Instant>) async throws -> Void

    enum CompactTrigger: Sendable {
        case fixedRate(period: Int64)
        case fixedDelay(delay: Int64)
        case once
        case cron(CronBox)
    }

    struct CompactOptions: Sendable {
        /// Jitter, timeout and retry; nil when none is set.
        var extras: OptionExtras?
        var overlapMax: UInt16
        var missedMax: UInt16
        var overlapKind: UInt8  // 0 skip, 1 queueOne, 2 concurrent
        var missedKind: UInt8  // 0 skip, 1 coalesce, 2 burst
        var cancelOnShutdown: Bool

        var jitter: Int64 { extras?.jitter ?? 0 }
        var timeout: Int64 { extras?.timeout ?? 0 }
        var retry: RetryPolicy? { extras?.retry }
    }

    struct Stats: Sendable {
        var runs: UInt64 = 0
        var failures: UInt32 = 0
        var skipped: UInt32 = 0
        var missed: UInt32 = 0
        var coalesced: UInt32 = 0
        var histogram = Counts8()
    }

    /// One job's record (the table holds one per job slot). Field order is layout: the small
    /// fields fill the trigger's padding; 136 bytes (a test holds it there).
    struct Job: Sendable {
        /// The body and name, boxed once per job (nil once the slot is free).
        var box: JobBox?
        /// The job's name ("" once the slot is free).
        var name: String { box?.name ?? "" }
        var trigger: CompactTrigger
        var flags: JobFlags = []
        var inFlight: UInt16 = 0
        var attempt: UInt16 = 1  // attempt number of the pending retry
        var burstRemaining: UInt16 = 0
        var queuedAttempt: UInt16 = 1  // attempt number of the run `.queueOne` holds (a retry keeps its own)
        var firstRun: Int32 = -1
        var options: CompactOptions
        var serial: UInt64
        var grid: Int64 = 0  // fixed rate: unjittered next occurrence; cron: its wall second
        var regularDue: Int64 = .max  // deadline of the next regular occurrence
        var queuedAt: Int64 = 0
        var stats = Stats()
    }

    struct Run: Sendable {
        var serial: UInt64 = 0  // 0: the slot is free (run serials start at 1)
        var jobSlot: UInt32 = 0
        var next: Int32 = -1
        var prev: Int32 = -1
        var attempt: UInt16 = 1
        var cut = false  // counted in the shutdown report's cut-off runs
    }

    /// A job's body and name, allocated once when the job is scheduled.
    final class JobBox: Sendable {
        let body: Body
        let name: String
        /// The job's own metric series (`JobOptions.ownMetrics`), nil for the shared ones.
        let series: JobSeries?

        init(body: @escaping Body, name: String, series: JobSeries?) {
            self.body = body
            self.name = name
            self.series = series
        }
    }

    /// A run the shell must start on a worker: a plain value with no
    /// reference counting, so handing it over costs neither an allocation
    /// nor a retain and release (on a body closure that many jobs may share,
    /// both cores contending for its reference count during a burst).
    ///
    /// Its two references are unretained. That is safe because of two rules
    /// of this state machine: a job's box stays in its slot until the job has
    /// no run in flight (`freeSlot` and `compactIfEmpty` check `inFlight`, and
    /// a run stays in flight until its end is recorded, after its worker is
    /// done with the body); and run-slot controls are never released before
    /// the state machine itself (`controls` only grows).
    struct RunStart: Sendable {
        private let box: Unmanaged<JobBox>
        private let unmanagedControl: Unmanaged<RunControl>
        let job: JobID
        let runSlot: UInt32
        let runSerial: UInt64
        let scheduled: Int64
        let attempt: Int
        /// Its end must be recorded at once, not in the next batch: something
        /// follows from it (fixed delay, queued or burst run, the job ends).
        let prompt: Bool

        init(box: JobBox, control: RunControl, job: JobID, runSlot: UInt32, runSerial: UInt64, scheduled: Int64, attempt: Int, prompt: Bool) {
            // Unretained: see above.
            self.box = Unmanaged.passUnretained(box)
            self.unmanagedControl = Unmanaged.passUnretained(control)
            self.job = job
            self.runSlot = runSlot
            self.runSerial = runSerial
            self.scheduled = scheduled
            self.attempt = attempt
            self.prompt = prompt
        }

        /// The job's body and name. A strong reference to the job's own box
        /// (whose reference count only the worker running it touches); call
        /// `body` through it, so the closure's context, which many jobs may
        /// share, is not retained for the call.
        @inline(__always)
        var jobBox: JobBox { box.takeUnretainedValue() }

        /// The run slot's control (see `RunControl`), addressed with `runSerial`.
        @inline(__always)
        var control: RunControl { unmanagedControl.takeUnretainedValue() }

        // The worker's calls on this run's control, through the unretained
        // reference (no retain/release per call; the control outlives the run).

        /// `RunControl.install` for this run.
        @inline(__always)
        func install(_ worker: WorkerTask) -> Bool {
            unmanagedControl._withUnsafeGuaranteedRef { $0.install(worker, serial: runSerial) }
        }

        /// `RunControl.uninstall` for this run.
        @inline(__always)
        func uninstall() -> CancelReason? {
            unmanagedControl._withUnsafeGuaranteedRef { $0.uninstall(serial: runSerial) }
        }

        /// Why this run was cancelled, if it was.
        @inline(__always)
        var cancelReason: CancelReason? {
            unmanagedControl._withUnsafeGuaranteedRef { $0.reason(serial: runSerial) }
        }
    }

    /// How a run ended.
    typealias Outcome = RunOutcome

    enum Phase: Sendable, Equatable {
        case running
        case draining(deadline: Int64)
    }

    private(set) var jobs: [Job] = []
    /// Slots the job table had when it was last given back (it regrows to this in one step).
    private var lastTableSize = 0
    private var freeJobs: [UInt32] = []
    private(set) var queue = TimerQueue()
    private var runs: [Run] = []
    /// Per run slot: its control, reused by each run in the slot. Never
    /// shrinks (`RunStart` refers to these unretained); at most one per run
    /// that was ever in flight at once.
    private var controls: [RunControl] = []
    private var freeRuns: [UInt32] = []
    private(set) var timeouts = TimerQueue()

    /// The run in slot `r`, to cancel.
    private func runCancel(_ r: Int) -> RunCancel { RunCancel(control: controls[r], serial: runs[r].serial) }

    /// The earliest run timeout, if any run has one.
    @inline(__always) var nextTimeout: Int64? { timeouts.min?.deadline }
    private var ready: [RunStart] = []
    private var waiters: [UInt32: [CheckedContinuation<Void, Never>]] = [:]
    private var rng: SplitMix64
    private var nextSerial: UInt64 = 1
    private var nextRunSerial: UInt64 = 1
    private(set) var phase: Phase = .running
    private var deadlinePassed = false

    private(set) var liveJobs = 0
    private var slotsInUse = 0
    private(set) var inFlight = 0
    // totals
    private(set) var totalRuns: UInt64 = 0
    private(set) var totalFailures: UInt64 = 0
    private(set) var totalTimeouts: UInt64 = 0
    private(set) var totalSkipped: UInt64 = 0
    private(set) var totalMissed: UInt64 = 0
    private(set) var totalCoalesced: UInt64 = 0
    private(set) var histogram = SIMD8<UInt64>()
    // shutdown report
    private(set) var cutOff: [ShutdownReport.CutOffRun] = []
    private(set) var drainedRuns = 0
    private(set) var jobsRemovedAtShutdown = 0

    init(seed: UInt64) {
        rng = SplitMix64(state: seed)
    }

    // MARK: - Queries

    /// The earliest time something must happen: a job comes due, a run times
    /// out, the shutdown deadline passes; `Int64.min` if runs are ready now.
    /// (The queries the shell calls under its lock are inlined: a call copied the
    /// whole 312-byte state onto the stack to pass it, several times per step.)
    @inline(__always)
    var nextDeadline: Int64? {
        if !ready.isEmpty { return .min }
        var d = queue.min?.deadline
        if let t = timeouts.min?.deadline { d = Swift.min(d ?? t, t) }
        if case .draining(let deadline) = phase, !deadlinePassed, inFlight > 0 {
            d = Swift.min(d ?? deadline, deadline)
        }
        return d
    }

    /// True while draining once no run is in progress.
    @inline(__always)
    var isDrained: Bool {
        if case .draining = phase { return inFlight == 0 && ready.isEmpty }
        return false
    }

    /// True if `id` names the job now in its slot (no copy of the record).
    @inline(__always)
    private func isLive(_ id: JobID) -> Bool {
        let s = Int(id.slot)
        return s < jobs.count && jobs[s].serial == id.serial && jobs[s].flags.contains(.inUse)
    }

    /// True if the job was cancelled, shut down, completed, or never existed: it can no
    /// longer run. A one-shot job's attempt in progress that a retry may follow, should it
    /// fail, is not gone yet (its record says `.gone` while the attempt runs).
    func isGone(_ id: JobID) -> Bool {
        guard isLive(id) else { return true }
        let s = Int(id.slot)
        guard jobs[s].flags.contains(.gone) else { return false }
        return jobs[s].inFlight == 0 || onceRetryPolicy(s, afterAttempt: Int(jobs[s].attempt)) == nil
    }

    /// The retry policy under which a failure of a one-shot job's attempt `attempt` is
    /// retried (`finish`: the run failed and was not cancelled with its job); nil when it
    /// is not (no policy or no attempt left, cancelled by its handle, shutting down).
    private func onceRetryPolicy(_ s: Int, afterAttempt attempt: Int) -> RetryPolicy? {
        guard case .once = jobs[s].trigger, let retry = jobs[s].options.retry, attempt < retry.maxAttempts,
              !jobs[s].flags.contains(.cancelledByHandle), phase == .running, jobs[s].box != nil
        else { return nil }
        return retry
    }

    /// The job's queue deadline (its next run, or pending retry), if queued.
    func nextDue(_ id: JobID) -> Int64? {
        guard isLive(id), !jobs[Int(id.slot)].flags.contains(.gone) else { return nil }
        return queue.deadline(of: id.slot)
    }

    /// True if `id` has an entry in the timer queue.
    func isQueued(_ id: JobID) -> Bool {
        isLive(id) && queue.contains(id.slot)
    }

    /// Statistics of one job.
    func statistics(of id: JobID) -> JobStatistics? {
        guard isLive(id) else { return nil }
        let j = jobs[Int(id.slot)]
        guard !j.flags.contains(.gone) || j.inFlight > 0 else { return nil }
        return JobStatistics(
            name: j.name, runs: j.stats.runs, failures: UInt64(j.stats.failures),
            skippedOverlaps: UInt64(j.stats.skipped), missedRuns: UInt64(j.stats.missed),
            coalescedRuns: UInt64(j.stats.coalesced), inFlight: Int(j.inFlight),
            lateness: LatenessHistogram(counts: (0..<8).map { UInt64(j.stats.histogram[$0]) }))
    }

    /// Statistics of everything.
    var statistics: SchedulerStatistics {
        SchedulerStatistics(
            jobs: liveJobs, queuedTimers: queue.count + timeouts.count, runs: totalRuns,
            failures: totalFailures, timeouts: totalTimeouts, skippedOverlaps: totalSkipped,
            missedRuns: totalMissed, coalescedRuns: totalCoalesced, inFlight: inFlight,
            lateness: LatenessHistogram(counts: (0..<8).map { histogram[$0] }))
    }

    /// Slots allocated in the job table (including free ones), for tests.
    var jobTableCapacity: Int { jobs.count }
    /// Slots the job table has room for without growing, for tests.
    var jobTableReserved: Int { jobs.capacity }

    // MARK: - Schedule

    private mutating func jitter(_ options: CompactOptions) -> Int64 {
        options.jitter > 0 ? Int64(rng.next() % (UInt64(options.jitter) &+ 1)) : 0
    }

    /// Validates a trigger and options, the trigger first (the error names the job and the knob).
    static func validate(_ trigger: Trigger<Instant>, _ options: JobOptions) throws -> (CompactTrigger, CompactOptions) {
        (try validate(trigger, name: options.name), try validate(options))
    }

    /// The options of a job scheduled without any: nothing to validate.
    static var defaultOptions: CompactOptions {
        CompactOptions(extras: nil, overlapMax: 1, missedMax: 1, overlapKind: 0, missedKind: 0, cancelOnShutdown: false)
    }

    /// Validates a trigger.
    static func validate(_ trigger: Trigger<Instant>, name: String) throws -> CompactTrigger {
        func bad(_ code: SchedulerError.Code, _ m: String) -> SchedulerError { SchedulerError(code, "job '\(name)': \(m)") }
        let compact: CompactTrigger
        switch trigger.kind {
        case .fixedRate(let period, let firstDelay):
            // Checked in whole nanoseconds, the scheduler's unit: a period under 1 ns is
            // positive as a `Duration` but 0 ticks, which would fire without end.
            let p = period.nanoseconds
            guard p > 0 else { throw bad(.invalidTrigger, "interval \(period) must be at least 1 nanosecond (Trigger.every interval)") }
            if let f = firstDelay, f.attoseconds < 0 { throw bad(.invalidTrigger, "first delay \(f) must not be negative (Trigger.every firstAfter)") }
            compact = .fixedRate(period: p)
        case .fixedDelay(let delay, let initial):
            // At least 1 ns, as for `every`: a zero delay reruns at the same instant without end.
            guard delay.nanoseconds > 0 else { throw bad(.invalidTrigger, "delay \(delay) must be at least 1 nanosecond (Trigger.fixedDelay delay)") }
            if let i = initial, i < .zero { throw bad(.invalidTrigger, "initial delay \(i) must not be negative (Trigger.fixedDelay initialDelay)") }
            compact = .fixedDelay(delay: delay.nanoseconds)
        case .onceAfter(let d):
            guard d >= .zero else { throw bad(.invalidTrigger, "delay \(d) must not be negative (Trigger.once after)") }
            compact = .once
        case .onceAt:
            compact = .once
        case .cron:
            guard let box = trigger.cron else { preconditionFailure("a cron trigger without its expression") }
            compact = .cron(box)
        }
        return compact
    }

    /// Validates options.
    static func validate(_ options: JobOptions) throws -> CompactOptions {
        func bad(_ code: SchedulerError.Code, _ m: String) -> SchedulerError { SchedulerError(code, "job '\(options.name)': \(m)") }
        guard options.jitter >= .zero else { throw bad(.invalidOption, "jitter \(options.jitter) must not be negative (JobOptions.jitter)") }
        // In whole nanoseconds, the scheduler's unit: under 1 ns would silently mean "no timeout".
        if let t = options.timeout, t.nanoseconds <= 0 { throw bad(.invalidOption, "timeout \(t) must be at least 1 nanosecond (JobOptions.timeout)") }
        if options.ownMetrics && options.name.isEmpty {
            throw bad(.invalidOption, "series of its own need a name for their job dimension (JobOptions.ownMetrics, JobOptions.name)")
        }
        var o = CompactOptions(
            extras: nil, overlapMax: 1, missedMax: 1, overlapKind: 0, missedKind: 0, cancelOnShutdown: options.shutdown == .cancel)
        switch options.overlap {
        case .skip: o.overlapKind = 0
        case .queueOne: o.overlapKind = 1
        case .concurrent(let max):
            guard max >= 1 && max <= Int(UInt16.max) else { throw bad(.invalidOption, "concurrent(max: \(max)) must be within 1...65535 (JobOptions.overlap)") }
            o.overlapKind = 2
            o.overlapMax = UInt16(max)
        }
        switch options.missedRuns {
        case .skip: o.missedKind = 0
        case .coalesce: o.missedKind = 1
        case .burst(let max):
            guard max >= 1 && max <= Int(UInt16.max) else { throw bad(.invalidOption, "burst(max: \(max)) must be within 1...65535 (JobOptions.missedRuns)") }
            o.missedKind = 2
            o.missedMax = UInt16(max)
        }
        if let r = options.retry {
            guard r.maxAttempts >= 1 && r.maxAttempts <= Int(UInt16.max) else { throw bad(.invalidOption, "retry maxAttempts \(r.maxAttempts) must be within 1...65535 (RetryPolicy.maxAttempts)") }
            guard r.multiplier >= 1 else { throw bad(.invalidOption, "retry multiplier \(r.multiplier) must be at least 1 (RetryPolicy.multiplier)") }
            guard r.initialBackoff >= .zero, r.maxBackoff >= r.initialBackoff else {
                throw bad(.invalidOption, "retry backoff \(r.initialBackoff)...\(r.maxBackoff) must be non-negative and ordered (RetryPolicy.initialBackoff, maxBackoff)")
            }
        }
        let jitter = options.jitter.nanoseconds
        let timeout = options.timeout?.nanoseconds ?? 0
        if jitter > 0 || timeout > 0 || options.retry != nil {
            o.extras = OptionExtras(jitter: jitter, timeout: timeout, retry: options.retry)
        }
        return o
    }

    /// Adds a job. `firstDue` comes from the shell, which knows the clock:
    /// the first occurrence in ticks (and, for cron, its wall second).
    mutating func schedule(
        name: String, trigger: CompactTrigger, options: CompactOptions, body: @escaping Body,
        series: JobSeries? = nil, firstGrid: Int64, firstDue: Int64
    ) throws -> JobID {
        guard phase == .running else {
            throw SchedulerError(.shutDown, "job '\(name)' not scheduled: the scheduler is shutting down or shut down (JobScheduler.shutdown)")
        }
        let reuse = freeJobs.popLast()
        if jobs.isEmpty && lastTableSize > 0 {
            // The tables were given back when they emptied; grow them to their last size in
            // one step instead of by doubling, which copied each generation (13.6 MB of
            // `memmove` per 100k jobs). Untouched reserved pages cost no memory.
            jobs.reserveCapacity(lastTableSize)
            queue.reserveCapacity(lastTableSize)
            lastTableSize = 0
        }
        if reuse == nil && jobs.count >= Int(UInt32.max) {
            throw SchedulerError(.tooManyJobs, "job '\(name)' not scheduled: \(jobs.count) job slots in use (cancel jobs you no longer need)")
        }
        let serial = nextSerial
        nextSerial &+= 1
        let due = firstDue.saturatingAdd(jitter(options))
        // The record and its box are built where they are stored (a `let` of either, used
        // here, was copied into the table: a retain and a release each).
        let slot: UInt32
        if let s = reuse {
            slot = s
            jobs[Int(s)] = Job(
                box: JobBox(body: body, name: name, series: series), trigger: trigger, flags: [.inUse], options: options, serial: serial,
                grid: firstGrid, regularDue: due)
        } else {
            slot = UInt32(jobs.count)
            jobs.append(Job(
                box: JobBox(body: body, name: name, series: series), trigger: trigger, flags: [.inUse], options: options, serial: serial,
                grid: firstGrid, regularDue: due))
        }
        queue.insert(slot, deadline: due)
        liveJobs += 1
        slotsInUse += 1
        return JobID(slot: slot, serial: serial)
    }

    // MARK: - Cancel

    /// Cancels a job: removes it from the queue now and returns the controls
    /// of its runs in progress (the shell cancels their tasks). Nil if the job
    /// was already cancelled, or is gone with no run in progress.
    mutating func cancel(_ id: JobID) -> [RunCancel]? {
        // A job that is gone but still has a run in flight (a one-shot job
        // whose run is in progress, or a job whose last cron occurrence runs)
        // can still be cancelled: its run is cancelled and no retry follows.
        guard isLive(id), !jobs[Int(id.slot)].flags.contains(.cancelledByHandle) else { return nil }
        let s = Int(id.slot)
        if jobs[s].flags.contains(.gone) && jobs[s].inFlight == 0 { return nil }
        markGone(s)
        jobs[s].flags.insert(.cancelledByHandle)
        var cancels: [RunCancel] = []
        var r = jobs[s].firstRun
        while r >= 0 {
            cancels.append(runCancel(Int(r)))
            r = runs[Int(r)].next
        }
        defer { compactIfEmpty() }
        // A run made ready by the job's previous end (its queued or burst run) has no worker
        // yet, and none may come: with every worker busy, one of them perhaps in a body that
        // waits in `cancelAndWait` for this job, it would wait forever. It never starts.
        if !ready.isEmpty, ready.contains(where: { $0.job == id }) {
            let dropped = ready.filter { $0.job == id }
            ready.removeAll { $0.job == id }
            // Each is finished as not started; the last one frees the slot.
            for start in dropped { abandon(start, now: 0) }
            return cancels
        }
        if jobs[s].inFlight == 0 { freeSlot(s) }
        return cancels
    }

    private mutating func markGone(_ s: Int) {
        if !jobs[s].flags.contains(.gone) { liveJobs -= 1 }
        jobs[s].flags.insert(.gone)
        jobs[s].flags.remove([.queuedRun, .retryPending])
        jobs[s].burstRemaining = 0
        jobs[s].regularDue = .max
        queue.remove(UInt32(s))
    }

    /// Registers a waiter resumed when no run of the job is in progress.
    /// Returns false (nothing registered) if there is none already.
    mutating func addWaiter(_ id: JobID, _ c: CheckedContinuation<Void, Never>) -> Bool {
        guard isLive(id) else { return false }
        waiters[id.slot, default: []].append(c)
        return true
    }

    private mutating func freeSlot(_ s: Int) {
        if !jobs[s].flags.contains(.gone) { liveJobs -= 1 }
        queue.remove(UInt32(s))
        jobs[s].box = nil
        jobs[s].trigger = .once
        jobs[s].options.extras = nil
        jobs[s].serial = 0
        jobs[s].flags = []
        if !burstTimes.isEmpty { burstTimes[UInt32(s)] = nil }
        slotsInUse -= 1
        freeJobs.append(UInt32(s))
        if !waiters.isEmpty, let w = waiters.removeValue(forKey: UInt32(s)) { pendingResumes.append(contentsOf: w) }
    }

    /// Gives the tables' memory back once nothing is left in them.
    private mutating func compactIfEmpty() {
        if slotsInUse == 0 && waiters.isEmpty && jobs.count > 0 {
            lastTableSize = jobs.count
            jobs = []
            freeJobs = []
            queue.removeAll()
            burstTimes = [:]
        }
        if inFlight == 0 && ready.isEmpty && runs.count > 64 {
            runs = []
            freeRuns = []
            timeouts.removeAll()
        }
    }

    /// Waiters released by the last event; the shell takes and resumes them.
    private(set) var pendingResumes: [CheckedContinuation<Void, Never>] = []

    /// Takes the waiters to resume.
    mutating func takeResumes() -> [CheckedContinuation<Void, Never>] {
        if pendingResumes.isEmpty { return [] }
        defer { pendingResumes = [] }
        return pendingResumes
    }

    // MARK: - Time passes

    /// Result of `advance(now:wall:limit:)`.
    struct Due: Sendable {
        var starts: [RunStart] = []
        var cancels: [(RunCancel, CancelReason)] = []
    }

    /// Everything due at `now`: runs to start (at most `limit` from the queue
    /// per call; call again while `hasDue(now:)`), tasks to cancel for
    /// timeouts and the shutdown deadline.
    mutating func advance(now: Int64, wall: Date, limit: Int = .max) -> Due {
        var due = Due()
        if case .draining(let deadline) = phase, !deadlinePassed, now >= deadline {
            deadlinePassed = true
            for i in runs.indices {
                if runs[i].serial != 0, !runs[i].cut {
                    runs[i].cut = true
                    due.cancels.append((runCancel(i), .shutdownDeadline))
                    cutOff.append(.init(jobName: jobs[Int(runs[i].jobSlot)].name, attempt: Int(runs[i].attempt), reason: .deadlineExceeded))
                }
            }
        }
        while let e = timeouts.popDue(now: now) {
            let r = Int(e.id)
            if runs[r].serial != 0 { due.cancels.append((runCancel(r), .timeout)) }
        }
        if !ready.isEmpty {
            due.starts = ready
            ready = []
        }
        var reserved = false
        while due.starts.count < limit, let e = queue.popDue(now: now) {
            fire(Int(e.id), due: e.deadline, now: now, wall: wall, into: &due.starts)
            if !reserved && hasDue(now: now) {
                // A batch: room for it at once (grown by doubling, a 32-run refill chunk
                // reallocated the array six times). Only once a second run is due, and at
                // most 256 ahead, so that a single run or a huge limit reserves nothing large.
                reserved = true
                due.starts.reserveCapacity(due.starts.count + Swift.min(limit - due.starts.count, queue.count, 256))
            }
        }
        compactIfEmpty()
        return due
    }

    /// True if a queued job is due at `now`.
    @inline(__always)
    func hasDue(now: Int64) -> Bool {
        if let m = queue.min { return m.deadline <= now }
        return false
    }

    private mutating func fire(_ s: Int, due: Int64, now: Int64, wall: Date, into starts: inout [RunStart]) {
        if jobs[s].flags.contains(.retryPending) {
            jobs[s].flags.remove(.retryPending)
            if jobs[s].regularDue <= now {
                // A stall passed both the retry and the next regular occurrence: the regular
                // one came first, so the retry is dropped and the job runs as due, at attempt 1
                // (`RetryPolicy`), under its missed-run policy. (The late retry ran instead, and
                // the regular occurrences it overlapped were counted as skipped overlaps.)
                fire(s, due: jobs[s].regularDue, now: now, wall: wall, into: &starts)
                return
            }
            if case .fixedDelay = jobs[s].trigger {
                // The next regular run comes a delay after this retry ends (`finish`), not
                // after the failed run: that one fell due during a long retry.
                jobs[s].regularDue = .max
            } else if jobs[s].regularDue != .max {
                queue.insert(UInt32(s), deadline: jobs[s].regularDue)
            }
            if case .once = jobs[s].trigger {
                // The retry is a one-shot job's last run again (`finish` revives it if this
                // attempt fails too and attempts remain); otherwise it stayed live forever.
                jobs[s].flags.insert(.gone)
                liveJobs -= 1
            }
            startOrOverlap(s, scheduled: due, attempt: jobs[s].attempt, now: now, into: &starts)
            return
        }
        jobs[s].attempt = 1
        var k: Int64 = 1
        var times: [Int64] = []  // scheduled ticks of the overdue occurrences (only when k > 1)
        switch jobs[s].trigger {
        case .fixedRate(let period):
            let grid = jobs[s].grid
            // As for cron: occurrences passed beyond the jitter bound are overdue; the jitter
            // delays a run on purpose and is not lateness (counted from the jittered due, a
            // jitter over the period made most occurrences "missed"). Overflow-safe: a first
            // instant centuries back saturates to Int64.min.
            let (behind, overflowed) = now.subtractingReportingOverflow(grid)
            let lag = overflowed ? Int64.max : behind.saturatingAdd(-jobs[s].options.jitter)
            if lag >= period {
                // Saturating: with a 1 ns period and a lag of Int64.max, 1 + lag / period overflowed.
                let (count, over) = (lag / period).addingReportingOverflow(1)
                k = over ? .max : count
            }
            if k > 1 {
                let keep = Int64(jobs[s].options.missedKind == 2 ? Int(jobs[s].options.missedMax) : 1)
                for i in Swift.max(0, k - keep)..<k { times.append(i == 0 ? due : grid + i * period) }
            }
            let (advance, overflow) = k.multipliedReportingOverflow(by: period)
            jobs[s].grid = grid.saturatingAdd(overflow ? .max : advance)  // a period of centuries: never again
            jobs[s].regularDue = jobs[s].grid.saturatingAdd(jitter(jobs[s].options))
            queue.insert(UInt32(s), deadline: jobs[s].regularDue)
        case .cron(let box):
            // Occurrences passed on the wall clock beyond the jitter bound are overdue: the
            // jitter delays a run on purpose and is not lateness (with a jitter over the
            // period, every run had otherwise counted as missed and none ran).
            // Counted, not walked (`CronExpression.catchUp`): after a day-long stall a
            // per-second job stepped 86,400 occurrences here, under the scheduler's lock.
            let wallSecond = Int(wall.timeIntervalSince1970.rounded(.down)) - Int(jobs[s].options.jitter / 1_000_000_000)
            let first = Int(jobs[s].grid)
            let keep = jobs[s].options.missedKind == 2 ? Int(jobs[s].options.missedMax) : 1
            let overdue = box.expression.catchUp(after: first, through: wallSecond, keep: keep)
            k = 1 + Int64(overdue.count)
            if k > 1 {
                for w in ([first] + overdue.last).suffix(keep) {
                    times.append(due + Int64(w - first) * 1_000_000_000)
                }
            }
            if let n = overdue.next {
                jobs[s].grid = Int64(n)
                // The jitter counts from the occurrence's wall time, not from now: an
                // occurrence already passed (by less than the jitter bound) runs within its
                // jitter, instead of a whole jitter later each time, which fell behind.
                let delta = (Double(n) - wall.timeIntervalSince1970) * 1e9
                jobs[s].regularDue = now + Swift.max(0, Int64(delta).saturatingAdd(jitter(jobs[s].options)))
                queue.insert(UInt32(s), deadline: jobs[s].regularDue)
            } else {
                jobs[s].regularDue = .max
                jobs[s].flags.insert(.gone)  // never fires again: completes after this run
                liveJobs -= 1
            }
        case .fixedDelay:
            jobs[s].regularDue = .max
        case .once:
            jobs[s].regularDue = .max
            jobs[s].flags.insert(.gone)
            liveJobs -= 1
        }
        if k == 1 {
            startOrOverlap(s, scheduled: due, attempt: 1, now: now, into: &starts)
        } else {
            switch jobs[s].options.missedKind {
            case 0:
                jobs[s].stats.missed.addSaturating(k)
                totalMissed &+= UInt64(k)
                countOwn(s) { $0.missed &+= UInt64(k) }
            case 1:
                jobs[s].stats.coalesced.addSaturating(k - 1)
                totalCoalesced &+= UInt64(k - 1)
                countOwn(s) { $0.coalesced &+= UInt64(k - 1) }
                startOrOverlap(s, scheduled: times.last!, attempt: 1, now: now, into: &starts)
            default:
                let n = times.count
                jobs[s].stats.missed.addSaturating(k - Int64(n))
                totalMissed &+= UInt64(k - Int64(n))
                countOwn(s) { $0.missed &+= UInt64(k - Int64(n)) }
                startOrOverlap(s, scheduled: times[0], attempt: 1, now: now, into: &starts)
                if n > 1 {
                    jobs[s].burstRemaining = UInt16(n - 1)
                    burstTimes[UInt32(s)] = Array(times.dropFirst().reversed())  // next last: popped in place
                }
            }
        }
        if jobs[s].flags.contains(.gone) && jobs[s].inFlight == 0 && !queue.contains(UInt32(s)) {
            freeSlot(s)
        }
    }

    /// Scheduled times of the remaining burst runs, per job slot (rare path).
    /// (Latest first, so that each run pops the next from the end, in place: a front removal
    /// from a copy moved the whole array under the lock for every run of a 65,535-run burst.)
    private var burstTimes: [UInt32: [Int64]] = [:]

    private mutating func startOrOverlap(_ s: Int, scheduled: Int64, attempt: UInt16, now: Int64, into starts: inout [RunStart]) {
        let inFlightNow = jobs[s].inFlight
        if inFlightNow == 0 || (jobs[s].options.overlapKind == 2 && inFlightNow < jobs[s].options.overlapMax) {
            starts.append(start(s, scheduled: scheduled, attempt: attempt, now: now))
            return
        }
        if jobs[s].options.overlapKind == 1 && !jobs[s].flags.contains(.queuedRun) {
            jobs[s].flags.insert(.queuedRun)
            jobs[s].queuedAt = scheduled
            jobs[s].queuedAttempt = attempt
            return
        }
        jobs[s].stats.skipped.addSaturating(1)
        totalSkipped &+= 1
        countOwn(s) { $0.skipped &+= 1 }
    }

    /// Counts of jobs with series of their own since the shell last took them
    /// (`takeOwnSeriesCounts`); they are in the totals too.
    private(set) var ownSeriesCounts: [OwnSeriesCount] = []

    /// Adds to the counts of job slot `s` if it has series of its own.
    @inline(__always)
    private mutating func countOwn(_ s: Int, _ add: (inout OwnSeriesCount) -> Void) {
        guard let series = jobs[s].box?.series else { return }
        var count = OwnSeriesCount(series: series)
        add(&count)
        ownSeriesCounts.append(count)
    }

    /// The counts of jobs with series of their own since the last call.
    mutating func takeOwnSeriesCounts() -> [OwnSeriesCount] {
        guard !ownSeriesCounts.isEmpty else { return [] }
        defer { ownSeriesCounts = [] }
        return ownSeriesCounts
    }

    private mutating func start(_ s: Int, scheduled: Int64, attempt: UInt16, now: Int64) -> RunStart {
        let r: Int
        if let f = freeRuns.popLast() {
            r = Int(f)
        } else {
            r = runs.count
            runs.append(Run())
            if controls.count < runs.count { controls.append(RunControl()) }
        }
        let serial = nextRunSerial
        nextRunSerial &+= 1
        let head = jobs[s].firstRun
        var prompt = jobs[s].flags.contains(.gone) || jobs[s].options.overlapKind == 1 || jobs[s].options.missedKind == 2
        if case .fixedDelay = jobs[s].trigger { prompt = true }
        let record = RunStart(
            box: jobs[s].box!, control: controls[r], job: JobID(slot: UInt32(s), serial: jobs[s].serial), runSlot: UInt32(r),
            runSerial: serial, scheduled: scheduled, attempt: Int(attempt), prompt: prompt)
        runs[r] = Run(serial: serial, jobSlot: UInt32(s), next: head, prev: -1, attempt: attempt)
        if head >= 0 { runs[Int(head)].prev = Int32(r) }
        jobs[s].firstRun = Int32(r)
        jobs[s].inFlight += 1
        inFlight += 1
        if jobs[s].options.timeout > 0 {
            timeouts.insert(UInt32(r), deadline: now.saturatingAdd(jobs[s].options.timeout))
        }
        return record
    }

    // MARK: - A run ended

    /// Records the end of a run and decides what follows: a fixed-delay job's
    /// next occurrence, a retry, a queued or burst run (started by the shell
    /// on its next `advance`). Returns the job's name and whether the shell's
    /// driver must look at the queue again.
    mutating func finish(_ start: RunStart, outcome: Outcome, lateness: Int64, now: Int64) {
        finish(RunCompletion(
            runSlot: start.runSlot, runSerial: start.runSerial, attempt: start.attempt, outcome: outcome,
            reason: start.cancelReason, lateness: lateness, end: now))
    }

    /// Records a run the shutdown took from the workers' queue before it started: not a
    /// failure, whatever cancelled it meanwhile (no retry, no revived one-shot job).
    mutating func abandon(_ start: RunStart, now: Int64) {
        finish(RunCompletion(
            runSlot: start.runSlot, runSerial: start.runSerial, attempt: start.attempt, outcome: .notStarted,
            reason: nil, lateness: 0, end: now))
    }

    /// `finish(_:outcome:lateness:now:)` for a completion a worker reported.
    mutating func finish(_ c: RunCompletion) {
        let outcome = c.outcome
        let lateness = c.lateness
        let now = c.end
        let attempt = c.attempt
        let r = Int(c.runSlot)
        guard r < runs.count, runs[r].serial == c.runSerial else { return }
        let reason = c.reason
        let wasCut = runs[r].cut
        timeouts.remove(UInt32(r))
        let s = Int(runs[r].jobSlot)
        // unlink
        let (prev, next) = (runs[r].prev, runs[r].next)
        if prev >= 0 { runs[Int(prev)].next = next } else { jobs[s].firstRun = next }
        if next >= 0 { runs[Int(next)].prev = prev }
        runs[r] = Run()
        freeRuns.append(UInt32(r))
        inFlight -= 1
        jobs[s].inFlight -= 1
        defer { compactIfEmpty() }

        if outcome != .notStarted {
            let b = LatenessHistogram.bucket(lateness)
            jobs[s].stats.runs &+= 1
            jobs[s].stats.histogram[b].addSaturating(1)
            totalRuns &+= 1
            histogram[b] &+= 1
            if case .draining = phase, !wasCut { drainedRuns += 1 }
        }
        // Over its timeout is a failure when the timeout ended it: cancelled, or never started
        // (every worker was busy). A body that returned normally did its work: counted as a
        // timeout, not as a failure, and not retried (a retry would repeat its work).
        let failed = outcome == .failure || (reason == .timeout && outcome != .success)
        if failed {
            jobs[s].stats.failures.addSaturating(1)
            totalFailures &+= 1
        }
        if reason == .timeout { totalTimeouts &+= 1 }

        if jobs[s].flags.contains(.gone) {
            if jobs[s].inFlight == 0 && !queue.contains(UInt32(s)) {
                if failed, reason != .jobCancelled, let retry = onceRetryPolicy(s, afterAttempt: attempt) {
                    // a one-shot job's retry keeps it alive (unless its backoff never ends)
                    if scheduleRetry(s, retry: retry, attempt: attempt, now: now) {
                        jobs[s].flags.remove(.gone)
                        liveJobs += 1
                    } else {
                        freeSlot(s)
                    }
                } else {
                    freeSlot(s)
                }
            }
            return
        }
        if case .fixedDelay(let delay) = jobs[s].trigger, jobs[s].inFlight == 0 {
            jobs[s].regularDue = now.saturatingAdd(delay).saturatingAdd(jitter(jobs[s].options))
            queue.insert(UInt32(s), deadline: jobs[s].regularDue)
        }
        // A regular occurrence already waits to start (queued behind this run by `.queueOne`,
        // or the rest of a burst): it came first, so this run's retry is dropped and the job
        // goes on with it at attempt 1 (`RetryPolicy`). Scheduled as well, the retry fell due
        // while that run went on, took the queue's one place, and the next regular occurrence
        // was skipped for it.
        let regularWaits = jobs[s].flags.contains(.queuedRun) || jobs[s].burstRemaining > 0
        if failed, !regularWaits, let retry = jobs[s].options.retry, attempt < retry.maxAttempts {
            _ = scheduleRetry(s, retry: retry, attempt: attempt, now: now)
        }
        if jobs[s].burstRemaining > 0, let t = burstTimes[UInt32(s)]?.popLast() {
            jobs[s].burstRemaining -= 1
            if burstTimes[UInt32(s)]?.isEmpty == true { burstTimes[UInt32(s)] = nil }
            ready.append(self.start(s, scheduled: t, attempt: 1, now: now))
        } else if jobs[s].flags.contains(.queuedRun) {
            jobs[s].flags.remove(.queuedRun)
            ready.append(self.start(s, scheduled: jobs[s].queuedAt, attempt: jobs[s].queuedAttempt, now: now))
        }
    }

    /// Queues a retry before the job's next regular run; false when none was queued (the
    /// regular run comes first, or the backoff saturated to never).
    private mutating func scheduleRetry(_ s: Int, retry: RetryPolicy, attempt: Int, now: Int64) -> Bool {
        let at = now.saturatingAdd(retry.backoff(afterAttempt: attempt).nanoseconds)
        guard at < jobs[s].regularDue, at < .max else { return false }
        jobs[s].flags.insert(.retryPending)
        jobs[s].attempt = UInt16(attempt + 1)
        queue.insert(UInt32(s), deadline: at)
        return true
    }

    // MARK: - Shutdown

    /// Stops firing: removes every job from the queue, drops ready runs, and
    /// returns the runs to cancel now (jobs with `ShutdownBehavior.cancel`) and the
    /// other runs in flight, which drain until `deadline` (after which `advance` cancels
    /// them) if they have started, and must not start if they have not (`preventStart`).
    mutating func beginShutdown(deadline: Int64) -> (cancels: [(RunCancel, CancelReason)], draining: [RunCancel]) {
        guard phase == .running else { return ([], []) }
        phase = .draining(deadline: deadline)
        var cancels: [(RunCancel, CancelReason)] = []
        var draining: [RunCancel] = []
        // Runs made ready but not yet handed to a worker never start (abandoned below): not
        // cut off, as runs waiting in the workers' queue are not (the shell abandons those).
        let notStarted = ready.isEmpty ? [] : Set(ready.map { Int($0.runSlot) })
        for s in jobs.indices where jobs[s].flags.contains(.inUse) {
            if !jobs[s].flags.contains(.gone) { jobsRemovedAtShutdown += 1 }
            markGone(s)
            var r = jobs[s].firstRun
            while r >= 0 {
                if !jobs[s].options.cancelOnShutdown {
                    draining.append(runCancel(Int(r)))
                } else if !runs[Int(r)].cut && !notStarted.contains(Int(r)) {
                    runs[Int(r)].cut = true
                    cancels.append((runCancel(Int(r)), .shutdownPolicy))
                    cutOff.append(.init(jobName: jobs[s].name, attempt: Int(runs[Int(r)].attempt), reason: .cancelledByPolicy))
                }
                r = runs[Int(r)].next
            }
        }
        // ready runs never start
        let abandoned = ready
        ready = []
        for a in abandoned { abandon(a, now: 0) }
        burstTimes = [:]
        for s in jobs.indices where jobs[s].flags.contains(.inUse) && jobs[s].inFlight == 0 {
            freeSlot(s)
        }
        compactIfEmpty()
        return (cancels, draining)
    }

    /// The scheduler's own task was cancelled: cancel every run now.
    mutating func cancelEverything() -> [(RunCancel, CancelReason)] {
        var cancels = beginShutdown(deadline: .min).cancels
        deadlinePassed = true
        for i in runs.indices {
            if runs[i].serial != 0, !runs[i].cut {
                runs[i].cut = true
                cancels.append((runCancel(i), .schedulerCancelled))
                cutOff.append(.init(jobName: jobs[Int(runs[i].jobSlot)].name, attempt: Int(runs[i].attempt), reason: .schedulerCancelled))
            }
        }
        return cancels
    }
}
