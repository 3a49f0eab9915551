import Foundation
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// The job whose run the current task is executing (to make `cancelAndWait()`
/// from inside a run return instead of waiting for itself).
///
/// Bound once per worker task, not once per run: a task-local binding per run
/// cost a push and a pop in the task's allocator for every run. The worker
/// updates its marker before and after each body instead (two relaxed stores).
enum CurrentRun {
    @TaskLocal static var marker: RunMarker?
}

/// Which job's run a worker is inside (see `CurrentRun`).
final class RunMarker: Sendable {
    /// The scheduler whose worker this is.
    let scheduler: ObjectIdentifier
    /// The worker's task: bodies run inline on it (compared, never used to act on the task).
    let worker: WorkerTask

    init(scheduler: ObjectIdentifier, worker: WorkerTask) {
        self.scheduler = scheduler
        self.worker = worker
    }

    /// True when the calling task is this worker's task and it is inside a run: the caller
    /// is a job's body itself (a task the body started inherits the marker but is not it).
    var callerIsARunningBody: Bool {
        guard serial.load(ordering: .relaxed) != 0 else { return false }
        return withUnsafeCurrentTask { $0 == worker.task }
    }

    /// The serial of the job whose body runs, 0 for none (job serials start at 1
    /// and are never reused within one scheduler).
    private let serial = Atomic<UInt64>(0)

    @inline(__always)
    func enter(_ id: JobID) { serial.store(id.serial, ordering: .relaxed) }

    @inline(__always)
    func leave() { serial.store(0, ordering: .relaxed) }

    func isInside(_ id: JobID) -> Bool { serial.load(ordering: .relaxed) == id.serial }
}

/// Runs periodic and one-shot jobs on one timer queue driven by one task.
///
/// - One driver: `run()` owns a task group. Its own task pops due jobs from a
///   single indexed heap and hands their runs, a batch at a time, to a small
///   elastic set of worker tasks (children of the same group) that call job
///   bodies directly, one after another; it sleeps until the next deadline
///   (on the injected `Clock`, or on the scheduler's own threads when
///   `Configuration.threads` asks for them). There is never a sleeping task per job,
///   nor a task per run.
/// - Decisions (policies, retries, statistics, shutdown) are made by a pure
///   state machine (`SchedulerState`) under one lock; this class only performs
///   them: starts and cancels tasks, sleeps, logs, counts.
/// - Cron triggers are mapped to the clock through `wallClock`: at each
///   occurrence the next wall-clock fire time `w` is computed and the job is
///   queued at `clock.now + (w - wallClock())`. Wall-clock jumps are thus
///   picked up at the next occurrence. With a `ManualClock`, the wall clock
///   defaults to `ManualClock.wallClock()`, so tests control both.
/// - Lifetime: `run()` returns after shutdown, once every run has ended and
///   every timer and thread of the scheduler is gone. Use it as a swift-service-lifecycle `Service`, or
///   call `run()` in a task of your own and `shutdown(deadline:)`.
public final class JobScheduler<C: Clock>: Service, Sendable, JobOwner where C.Duration == Duration {
    /// A job body. `nonisolated(nonsending)`: it starts on the worker that
    /// runs it, without an executor hop per run; a body isolated to an actor
    /// (e.g. `{ @MainActor ctx in ... }`) still runs on that actor.
    public typealias Body = nonisolated(nonsending) @Sendable (JobContext<C.Instant>) async throws -> Void

    /// Scheduler-wide settings.
    public struct Configuration: Sendable {
        /// How long graceful shutdown (from the service group) lets `.drain` runs finish.
        public var shutdownDeadline: Duration
        /// Seed for jitter; nil picks a random one.
        public var randomSeed: UInt64?
        /// How many runs the driver hands to the workers before it looks at the clock again.
        public var maxStartsPerWakeup: Int
        /// `scheduler` dimension of the metrics: give each scheduler of a process its own
        /// (two with the same label write the same gauges, and the last one written wins).
        public var metricsLabel: String
        /// Where the metrics go; nil: the process's `MetricsSystem` as bootstrapped
        /// when the scheduler is made.
        public var metricsFactory: (any MetricsFactory)?
        /// Most worker tasks alive at once. Workers run job bodies one after
        /// another; the scheduler keeps `min(activeProcessorCount, 2)` of them
        /// available and adds one when every worker has been inside one body
        /// for `workerStallThreshold` while runs wait. A run waits longer than
        /// that only when this many bodies are all slow at once.
        public var maxWorkers: Int
        /// How long one body may keep a worker before the worker counts as
        /// stalled and another worker is started for waiting runs. Nil picks
        /// 1 ms, or zero on a `ManualClock` (every run in progress then has a
        /// worker of its own, as if each run were its own task).
        public var workerStallThreshold: Duration?
        /// Threads of the scheduler's own that run the driver, the timer and the job bodies
        /// (a task executor, started by `run()` and ended before it returns). An idle one
        /// sleeps until the next deadline and runs the timer itself, and the driver and a
        /// worker follow on that thread: one wake-up per fire, where Swift's global executor
        /// takes two (its timer thread, then a cooperative thread). At 100k fires/s it cut
        /// the scheduler's CPU by about 40 % and its context switches by about half, but its
        /// lateness tail was no better on a busy 2-core machine (docs/BENCHMARKS.md), so
        /// 0, Swift's global executor, is the default. Used with `ContinuousClock` and
        /// `SuspendingClock`; other clocks (`ManualClock`) always use the global executor.
        /// A body that blocks its thread (a synchronous call that waits) holds one of these
        /// threads, as it would hold one of the cooperative pool's.
        public var threads: Int

        /// Creates a configuration with the documented defaults.
        public init(
            shutdownDeadline: Duration = .seconds(10), randomSeed: UInt64? = nil, maxStartsPerWakeup: Int = 256,
            metricsLabel: String = "default", maxWorkers: Int = 64, workerStallThreshold: Duration? = nil,
            metricsFactory: (any MetricsFactory)? = nil, threads: Int = 0
        ) {
            self.threads = threads
            self.metricsFactory = metricsFactory
            self.shutdownDeadline = shutdownDeadline
            self.randomSeed = randomSeed
            self.maxStartsPerWakeup = maxStartsPerWakeup
            self.metricsLabel = metricsLabel
            self.maxWorkers = maxWorkers
            self.workerStallThreshold = workerStallThreshold
        }
    }

    enum Lifecycle: Sendable { case idle, running, finished }

    /// The parked driver's continuation. Unsafe rather than checked: `CheckedContinuation`
    /// is resilient, so every optional copy and test of it on `schedule`'s path went
    /// through value-witness calls. It is resumed at most once because `signal` takes it
    /// out of `Core` under the lock before anyone resumes it.
    typealias DriverWake = UnsafeContinuation<Void, Never>

    /// A timer task's entry (see `Core.liveTimers`).
    struct LiveTimer: Sendable {
        let id: UInt64
        let deadline: Int64
        /// The timer's task once it has started (nil before), to cancel it when superseded.
        /// Used only under the core lock while the entry is listed; the timer removes
        /// its entry under the lock before it ends, so the task outlives every use.
        /// Unretained: scanning the list (on every schedule) then costs no reference counting.
        var task: Unmanaged<WorkerTask>?
        /// On the scheduler's threads, the timer is no task but an action they run at its
        /// deadline: its token (`SchedulerThreads.arm`), 0 otherwise.
        var token: UInt64 = 0
    }

    struct Core: Sendable {
        var machine: SchedulerState<C.Instant>
        var lifecycle = Lifecycle.idle
        var driverParked = false
        var wakePending = false
        var driver: DriverWake?
        /// The timers that still matter: each wakes the driver at its deadline. Arming an
        /// earlier one cancels the later ones (the driver re-arms after it wakes), so
        /// jobs scheduled ever earlier keep one timer task, not one each.
        var liveTimers: [LiveTimer] = []
        /// Timer tasks alive, superseded ones included until they end (on the scheduler's
        /// threads: timer actions armed; kept there too so that the count means the same in
        /// both modes, although only the `ManualClock` idle check reads it).
        var timerTasks = 0
        var nextTimerID: UInt64 = 0
        /// Runs handed to the workers whose end is not recorded yet.
        var runTasks = 0
        /// When the driver must look at the workers again (see `WorkerPool.plan`).
        var workerRecheck: Int64?
        var shutdownStartedAt: Int64?
        var shutdownEndedAt: Int64?
        var shutdownWaiters: [CheckedContinuation<ShutdownReport, Never>] = []
        var report: ShutdownReport?
        /// Counts the gauge readings taken under this lock (only with metrics on).
        var gaugeReadings: UInt64 = 0

        /// The jobs and runs in flight now, numbered, for `publishGauges` (0: metrics off).
        mutating func gauges(_ enabled: Bool) -> GaugeReading {
            guard enabled else { return GaugeReading() }
            gaugeReadings &+= 1
            return GaugeReading(number: gaugeReadings, jobs: machine.liveJobs, inFlight: machine.inFlight)
        }
    }

    /// What the gauges should show, as read under the core lock, and in which order it was read.
    struct GaugeReading: Sendable {
        var number: UInt64 = 0
        var jobs = 0
        var inFlight = 0
    }

    /// The number of the reading the gauges show. Readings are written outside the core
    /// lock, so two writers can finish out of order: a writer whose reading is older than
    /// the one shown skips. (Otherwise a stale in-flight count could stay for good once the
    /// scheduler went quiet: a worker's 0 written, then the driver's earlier 1.)
    private let gaugesShown = Mutex<UInt64>(0)

    func publishGauges(_ reading: GaugeReading) {
        guard reading.number != 0 else { return }
        gaugesShown.withLock { shown in
            guard reading.number > shown else { return }
            shown = reading.number
            jobsGauge.record(reading.jobs)
            inFlightGauge.record(reading.inFlight)
        }
    }

    /// The clock everything waits on.
    public let clock: C
    let wallClock: @Sendable () -> Date
    let logger: Logger
    var baseLogger: Logger { logger }
    let configuration: Configuration
    let epoch: C.Instant
    let flags = SchedulerFlags()
    let core: Mutex<Core>
    /// The run queue and the workers; never locked while `core` is held by
    /// the same thread, except inside `core` (order: core, then pool).
    let pool: Mutex<WorkerPool<SchedulerState<C.Instant>.RunStart>>
    let activity: (@Sendable () -> Void)?
    /// The per-run series every job without series of its own records into.
    let shared: JobSeries
    let jobsGauge: Gauge
    let inFlightGauge: Gauge
    /// Where the metrics go (`Configuration.metricsFactory`, else the bootstrapped one).
    let metricsFactory: any MetricsFactory
    /// False when the metrics go to the no-op factory: the gauges are then not
    /// fed from `schedule` and `cancel` (a call per job for nothing).
    let metricsEnabled: Bool
    /// The scheduler's own threads (`Configuration.threads`); nil on Swift's global executor.
    let threads: SchedulerThreads?

    /// Creates a scheduler on `clock`.
    /// - Parameters:
    ///   - wallClock: the wall-clock time used to place cron occurrences;
    ///     default `Date()`, or `ManualClock.wallClock()` when `clock` is a `ManualClock`.
    public init(clock: C, wallClock: (@Sendable () -> Date)? = nil, logger: Logger = Logger(label: "swift-realtime-sync.scheduler"), configuration: Configuration = Configuration()) {
        self.clock = clock
        if let manual = clock as? ManualClock {
            self.wallClock = wallClock ?? { @Sendable in manual.wallClock() }
            self.activity = { @Sendable in manual.noteActivity() }
        } else {
            self.wallClock = wallClock ?? { @Sendable in Date() }
            self.activity = nil
        }
        self.logger = logger
        self.configuration = configuration
        self.epoch = clock.now
        let seed = configuration.randomSeed ?? UInt64.random(in: 0...UInt64.max)
        self.core = Mutex(Core(machine: SchedulerState(seed: seed)))
        let isManual = clock is ManualClock
        let threshold = configuration.workerStallThreshold ?? (isManual ? .zero : .milliseconds(1))
        let base = Swift.min(ProcessInfo.processInfo.activeProcessorCount, 2)
        self.pool = Mutex(WorkerPool(base: base, cap: configuration.maxWorkers, stallThreshold: threshold.nanoseconds, prompt: isManual))
        let dims = [("scheduler", configuration.metricsLabel)]
        let factory = configuration.metricsFactory ?? MetricsSystem.factory
        metricsFactory = factory
        metricsEnabled = !(factory is NOOPMetricsHandler)
        shared = JobSeries(dimensions: dims, factory: factory)
        jobsGauge = Gauge(label: "scheduler.jobs", dimensions: dims, factory: factory)
        inFlightGauge = Gauge(label: "scheduler.runs.in_flight", dimensions: dims, factory: factory)
        let threadCount = configuration.threads
        if threadCount > 0 && (C.self == ContinuousClock.self || C.self == SuspendingClock.self) {
            let clock = self.clock
            let epoch = self.epoch
            threads = SchedulerThreads(count: threadCount, name: "scheduler") { epoch.duration(to: clock.now).nanoseconds }
        } else {
            threads = nil
        }
    }

    // MARK: - Time conversion

    @inline(__always)
    func ticks(_ instant: C.Instant) -> Int64 { epoch.duration(to: instant).nanoseconds }

    @inline(__always)
    func instant(_ ticks: Int64) -> C.Instant { epoch.advanced(by: .nanoseconds(ticks)) }

    // MARK: - Scheduling

    /// Schedules `body` on `trigger`.
    ///
    /// Jobs may be scheduled before `run()` starts; they fire once it runs.
    /// - Throws: `SchedulerError` if the trigger or options are invalid (the
    ///   message names the knob) or the scheduler is shutting down.
    @_specialize(exported: true, where C == ContinuousClock)
    @discardableResult
    public func schedule(_ trigger: Trigger<C.Instant>, options: JobOptions, _ body: @escaping Body) throws -> JobHandle {
        let (compactTrigger, compactOptions) = try SchedulerState<C.Instant>.validate(trigger, options)
        let series = options.ownMetrics && metricsEnabled
            ? JobSeries(dimensions: [("scheduler", configuration.metricsLabel), ("job_name", options.name)], factory: metricsFactory) : nil
        return try schedule(trigger, compactTrigger, name: options.name, compactOptions, series: series, body)
    }

    /// Schedules `body` on `trigger` with the default `JobOptions` (name "job",
    /// overlap `.skip`, missed runs `.skip`, no jitter, timeout or retry,
    /// `.drain` at shutdown). The same as passing `JobOptions()`, without
    /// building and checking options on every call.
    /// - Throws: `SchedulerError` if the trigger is invalid (the message names
    ///   the knob) or the scheduler is shutting down.
    @_specialize(exported: true, where C == ContinuousClock)
    @discardableResult
    public func schedule(_ trigger: Trigger<C.Instant>, _ body: @escaping Body) throws -> JobHandle {
        let compactTrigger = try SchedulerState<C.Instant>.validate(trigger, name: JobOptions.defaultName)
        return try schedule(trigger, compactTrigger, name: JobOptions.defaultName, SchedulerState<C.Instant>.defaultOptions, body)
    }

    @inline(__always)
    private func schedule(
        _ trigger: Trigger<C.Instant>, _ compactTrigger: SchedulerState<C.Instant>.CompactTrigger, name: String,
        _ compactOptions: SchedulerState<C.Instant>.CompactOptions, series: JobSeries? = nil, _ body: @escaping Body
    ) throws -> JobHandle {
        // The clock is read only for triggers relative to now, and at most once (a clock read
        // is a tenth of a schedule call; a fixed-rate job with its first instant given needs none).
        lazy var now = ticks(clock.now)
        let grid: Int64
        let due: Int64
        switch trigger.kind {
        case .fixedRate(let period, let firstDelay):
            // `if let`, not `trigger.instant.map(ticks)`: the method reference is a closure
            // that retains and releases the scheduler on every call.
            if let first = trigger.instant {
                grid = ticks(first)
            } else {
                grid = now.saturatingAdd((firstDelay ?? period).nanoseconds)
            }
            due = grid
        case .fixedDelay(let delay, let initial):
            grid = now.saturatingAdd((initial ?? delay).nanoseconds)
            due = grid
        case .onceAfter(let delay):
            grid = now.saturatingAdd(delay.nanoseconds)
            due = grid
        case .onceAt:
            guard let at = trigger.instant else { preconditionFailure("a once(at:) trigger always has its instant") }
            grid = ticks(at)
            due = grid
        case .cron:
            guard let expression = trigger.cron?.expression else { preconditionFailure("a cron trigger always has its expression") }
            let wall = wallClock()
            guard let next = expression.nextSecond(after: Int(wall.timeIntervalSince1970.rounded(.down))) else {
                throw SchedulerError(.invalidCronExpression, "job '\(name)': cron expression '\(expression.source)' has no occurrence in the next 400 years (Trigger.cron)")
            }
            grid = Int64(next)
            due = now.saturatingAdd(Swift.max(0, Int64((Double(next) - wall.timeIntervalSince1970) * 1e9)))
        }
        let metrics = metricsEnabled
        let (id, wake, gauges) = try core.withLock { core -> (JobID, DriverWake?, GaugeReading) in
            let id = try core.machine.schedule(
                name: name, trigger: compactTrigger, options: compactOptions, body: body, series: series,
                firstGrid: grid, firstDue: due)
            return (id, Self.needsDriver(&core) ? Self.signal(&core) : nil, core.gauges(metrics))
        }
        wake?.resume()
        if metrics { publishGauges(gauges) }
        activity?()
        return JobHandle(id: id, owner: self)
    }

    // MARK: - Driver

    /// True if the driver must look at the state: runs are ready, the earliest
    /// deadline has no timer armed at or before it, or draining is complete.
    /// (`inout`, like `nextDeadline`, only so that `Core` is not copied: taken by value
    /// it was, 312 bytes per call on `schedule`'s and every run's path.)
    @inline(__always)
    static func needsDriver(_ core: inout Core) -> Bool {
        if core.lifecycle != .running { return false }
        if core.machine.isDrained { return true }
        guard let d = nextDeadline(&core) else { return false }
        for t in core.liveTimers where t.deadline <= d { return false }
        return true
    }

    /// The earliest instant the driver must act at: the state machine's next
    /// deadline or the next look at the workers.
    @inline(__always)
    static func nextDeadline(_ core: inout Core) -> Int64? {
        let d = core.machine.nextDeadline
        guard let r = core.workerRecheck else { return d }
        return Swift.min(d ?? r, r)
    }

    /// Wakes the driver: returns its continuation to resume outside the lock,
    /// or records a pending wake-up if it is not parked.
    @inline(__always)
    static func signal(_ core: inout Core) -> DriverWake? {
        if core.driverParked {
            core.driverParked = false
            let c = core.driver
            core.driver = nil
            return c
        }
        core.wakePending = true
        return nil
    }

    private struct Step {
        var cancels: [(RunCancel, CancelReason)] = []
        var plan = WorkerPool<SchedulerState<C.Instant>.RunStart>.Plan()
        var rejected: [RunCompletion] = []
        var started = 0
        var arm: (id: UInt64, deadline: Int64)?
        var more = false
        var exit = false
        var wakeDriver: DriverWake?
        var resumes: [CheckedContinuation<Void, Never>] = []
        var skipped: UInt64 = 0
        var missed: UInt64 = 0
        var coalesced: UInt64 = 0
        /// The same counts of jobs with series of their own (not in the three above).
        var own: [OwnSeriesCount] = []
        var gauges = GaugeReading()
    }

    /// One round of the driver's work, under the core lock: records finished
    /// runs, pops what is due (at most `limit` runs) and hands it to the pool
    /// (one pool lock for the batch), applies the elastic rule. The driver
    /// also arms the timer; a worker (`byDriver == false`) that ran out of
    /// runs does the same round instead of waiting for the driver, and wakes
    /// the driver only for what needs it (spawning, a timer, the end).
    @_specialize(where C == ContinuousClock)
    private func coreStep(_ core: inout Core, done: [RunCompletion], now: Int64, limit: Int, byDriver: Bool, refilling: Bool = false) -> Step {
        var step = Step()
        if byDriver { core.wakePending = false }
        if !done.isEmpty {
            var end: Int64 = 0
            for c in done {
                core.machine.finish(c)
                end = Swift.max(end, c.end)
            }
            core.runTasks -= done.count
            if core.machine.isDrained && core.runTasks == 0 && core.shutdownEndedAt == nil { core.shutdownEndedAt = end }
        }
        if core.lifecycle == .running, let d = core.machine.nextDeadline, d <= now {
            let skippedBefore = core.machine.totalSkipped
            let missedBefore = core.machine.totalMissed
            let coalescedBefore = core.machine.totalCoalesced
            let due = core.machine.advance(now: now, wall: wallClock(), limit: limit)
            step.cancels = due.cancels
            step.skipped = core.machine.totalSkipped &- skippedBefore
            step.missed = core.machine.totalMissed &- missedBefore
            step.coalesced = core.machine.totalCoalesced &- coalescedBefore
            step.own = core.machine.takeOwnSeriesCounts()
            for c in step.own {
                step.skipped &-= c.skipped
                step.missed &-= c.missed
                step.coalesced &-= c.coalesced
            }
            let starts = due.starts
            step.started = starts.count
            core.runTasks += starts.count
            if !starts.isEmpty {
                // Lock order: core, then pool (nothing takes core while holding pool).
                let moreDue = core.machine.hasDue(now: now)
                let (accepted, plan) = pool.withLock { p in (p.enqueue(starts, moreDue: moreDue, keepRefilling: refilling), p.plan(now: now, canSpawn: byDriver)) }
                step.plan = plan
                if !accepted {
                    step.rejected = starts.map {
                        RunCompletion(
                            runSlot: $0.runSlot, runSerial: $0.runSerial, attempt: $0.attempt, outcome: .notStarted,
                            reason: $0.cancelReason, lateness: 0, end: now)
                    }
                }
            }
        }
        step.gauges = core.gauges(metricsEnabled)
        step.resumes = core.machine.takeResumes()
        guard byDriver else {
            let needs =
                step.plan.spawnWanted || !step.rejected.isEmpty || (step.plan.recheck != nil && core.workerRecheck == nil)
                || (!core.machine.hasDue(now: now) && Self.needsDriver(&core))
            if needs { step.wakeDriver = Self.signal(&core) }
            return step
        }
        if step.started == 0 {
            step.plan = pool.withLock { $0.plan(now: now) }
        }
        if core.machine.isDrained && core.runTasks == 0 {
            if core.shutdownEndedAt == nil { core.shutdownEndedAt = now }
            step.exit = true
            return step
        }
        core.workerRecheck = step.plan.recheck
        if !step.rejected.isEmpty {
            step.more = true
        } else if core.machine.hasDue(now: now) {
            if step.started >= limit && pool.withLock({ !$0.prompt && $0.workers > 0 }) {
                // A burst: one full batch is handed over and the workers take
                // the rest from the timer queue themselves (`claimRefill`).
                // The driver must not keep popping: it would hold one of the
                // cooperative threads while a worker waits for it (the second
                // worker then joined ~1.3 ms into a 10k burst, after the driver
                // had queued all of it; `Task.yield()` did not hand the thread
                // over). It parks; a worker wakes it once nothing is due. Two
                // deadlines still get a timer, so that workers stuck in slow
                // bodies cannot hold everything up: the workers' recheck (to
                // add a worker) and the earliest run timeout (to cancel).
                // Not on a `ManualClock` (prompt: each run its own worker,
                // which only the driver starts).
                let wake = [core.workerRecheck, core.machine.nextTimeout].compactMap { $0 }.min()
                if let w = wake, !core.liveTimers.contains(where: { $0.deadline <= w }) {
                    step.arm = armTimer(&core, at: w)
                }
            } else {
                step.more = true
            }
        } else if let d = Self.nextDeadline(&core) {
            if d <= now {
                step.more = true
            } else if !core.liveTimers.contains(where: { $0.deadline <= d }) {
                step.arm = armTimer(&core, at: d)
            }
        }
        return step
    }

    /// Performs what a step returned, outside the locks.
    private func perform(_ step: Step) {
        for r in step.resumes { r.resume() }
        for (control, reason) in step.cancels { control.cancel(reason) }
        for w in step.plan.wake { w.resume() }
        step.wakeDriver?.resume()
        if step.skipped > 0 { shared.skipped.increment(by: Int64(clamping: step.skipped)) }
        if step.missed > 0 { shared.missed.increment(by: Int64(clamping: step.missed)) }
        if step.coalesced > 0 { shared.coalesced.increment(by: Int64(clamping: step.coalesced)) }
        for c in step.own {
            if c.skipped > 0 { c.series.skipped.increment(by: Int64(clamping: c.skipped)) }
            if c.missed > 0 { c.series.missed.increment(by: Int64(clamping: c.missed)) }
            if c.coalesced > 0 { c.series.coalesced.increment(by: Int64(clamping: c.coalesced)) }
        }
        if metricsEnabled { publishGauges(step.gauges) }
    }

    /// The driver: records finished runs, pops due jobs from the timer queue,
    /// hands their runs to the workers (one lock round per batch), applies
    /// the workers' elastic rule, and sleeps until the next deadline.
    @_specialize(where C == ContinuousClock)
    private func driverLoop(_ group: inout DiscardingTaskGroup) async {
        let limit = Swift.max(1, configuration.maxStartsPerWakeup)
        var carried: [RunCompletion] = []
        while true {
            var done = pool.withLock { $0.takeCompletions() }
            if !carried.isEmpty {
                done.append(contentsOf: carried)
                carried = []
            }
            let now = ticks(clock.now)
            let step = core.withLock { coreStep(&$0, done: done, now: now, limit: limit, byDriver: true) }
            // A single worker resumed follows the driver on its thread when the driver parks
            // next; more wake other threads (and so does any when the driver goes round again).
            let parksNext = !step.more && !step.exit
            if let threads, parksNext { threads.lazily { perform(step) } } else { perform(step) }
            for slot in step.plan.spawn {
                group.addTask { await self.worker(slot) }
            }
            if let (id, deadline) = step.arm, threads == nil {
                group.addTask { await self.timer(id, deadline) }
            }
            carried = step.rejected
            if step.exit { return }
            if step.more { continue }
            await park()
        }
    }

    private func park() async {
        await withUnsafeContinuation { (c: DriverWake) in
            let resumeNow = core.withLock { core -> Bool in
                if core.wakePending {
                    core.wakePending = false
                    return true
                }
                core.driverParked = true
                core.driver = c
                return false
            }
            if resumeNow {
                c.resume()
                // Not parked after all: a task handed over lazily must not wait for this round.
                threads?.wakeIfQueued()
            }
            activity?()
        }
    }

    /// Lists a timer for `deadline` and drops the timers it supersedes (later ones). On the
    /// scheduler's threads it arms the timer there; otherwise the caller starts its task.
    /// Under the core lock.
    func armTimer(_ core: inout Core, at deadline: Int64) -> (id: UInt64, deadline: Int64) {
        var disarmed = 0
        core.liveTimers.removeAll { timer in
            guard timer.deadline > deadline else { return false }
            if drop(timer) { disarmed += 1 }
            return true
        }
        core.timerTasks -= disarmed
        core.nextTimerID &+= 1
        let id = core.nextTimerID
        var timer = LiveTimer(id: id, deadline: deadline, task: nil)
        if let threads {
            // The executor's lock inside the core lock (never the other way round: it runs
            // the action without its own lock).
            timer.token = threads.arm(at: deadline) { self.timerFired(id) }
        }
        core.liveTimers.append(timer)
        core.timerTasks += 1
        return (id, deadline)
    }

    /// Stops a listed timer that is no longer wanted. True if it is gone for good (the caller
    /// counts it out of `timerTasks`); false if it ends by itself (a task, cancelled here,
    /// or an action that fired already) and counts itself out, or if the threads have
    /// stopped (`run()` then clears the count). Under the core lock.
    private func drop(_ timer: LiveTimer) -> Bool {
        if timer.token != 0, let threads { return threads.disarm(timer.token) }
        // Its task only sleeps on the clock (no code of a job runs in it): cancelling
        // it here, under the lock, runs nothing that takes the lock.
        timer.task?.takeUnretainedValue().task.cancel()
        return false
    }

    /// A timer armed on the scheduler's threads reached its deadline: wakes the driver,
    /// which follows on this thread, unless the timer was superseded meanwhile.
    private func timerFired(_ id: UInt64) {
        let wake = core.withLock { core -> DriverWake? in
            core.timerTasks -= 1
            guard let i = core.liveTimers.firstIndex(where: { $0.id == id }) else { return nil }
            core.liveTimers.remove(at: i)
            return Self.signal(&core)
        }
        if let wake {
            if let threads { threads.lazily { wake.resume() } } else { wake.resume() }
        }
        activity?()
    }

    /// The one timer: sleeps on the clock until `deadline`, then wakes the driver;
    /// ends at once, without waking it, when an earlier timer superseded it.
    @_specialize(where C == ContinuousClock)
    private func timer(_ id: UInt64, _ deadline: Int64) async {
        guard let me = withUnsafeCurrentTask(body: { $0.map(WorkerTask.init) }) else {
            preconditionFailure("a scheduler timer always runs in a child task of the driver's group")
        }
        let listed = core.withLock { core -> Bool in
            guard let i = core.liveTimers.firstIndex(where: { $0.id == id }) else { return false }  // superseded already
            core.liveTimers[i].task = Unmanaged.passUnretained(me)
            return true
        }
        var fired = false
        if listed {
            do {
                try await clock.sleep(until: instant(deadline), tolerance: nil)
                fired = true
            } catch {}
        }
        let wake = core.withLock { core -> DriverWake? in
            if let i = core.liveTimers.firstIndex(where: { $0.id == id }) { core.liveTimers.remove(at: i) }
            core.timerTasks -= 1
            return fired ? Self.signal(&core) : nil
        }
        wake?.resume()
        withExtendedLifetime(me) {}
        activity?()
    }

    // MARK: - Workers

    /// One worker, a child task of the driver's group: takes runs from the
    /// pool and calls their bodies directly, one after another. It reports
    /// each finished run to the pool's completion buffer (recorded in batches)
    /// unless something follows from it at once. When the pool is empty it
    /// records what finished and takes the next due runs from the timer queue
    /// itself (as the driver would), and parks only if nothing is due. It
    /// exits when it is surplus, when the pool closes at shutdown, or when its
    /// task was cancelled (a run's cancellation cancels the worker running it;
    /// it never starts another run afterwards and the driver starts a
    /// replacement if runs wait).
    @_specialize(where C == ContinuousClock)
    private func worker(_ slot: Int) async {
        // A worker always runs in a task; the object lives until the loop returns.
        guard let workerTask = withUnsafeCurrentTask(body: { $0.map(WorkerTask.init) }) else {
            preconditionFailure("a scheduler worker always runs in a child task of the driver's group")
        }
        let marker = RunMarker(scheduler: ObjectIdentifier(self), worker: workerTask)
        let runOwner = RunOwner(self)
        await CurrentRun.$marker.withValue(marker) {
            await workerLoop(slot, marker: marker, workerTask: workerTask, runOwner: runOwner)
        }
        withExtendedLifetime(workerTask) {}
    }

    /// A worker running bodies back to back yields its thread after this many ticks (10 ms:
    /// at 1 ms, the yields made a 10,000-run burst about 13 % slower on this 2-core machine).
    private static var yieldInterval: Int64 { 10_000_000 }

    @_specialize(where C == ContinuousClock)
    private func workerLoop(_ slot: Int, marker: RunMarker, workerTask: WorkerTask, runOwner: RunOwner) async {
        let limit = Swift.max(1, configuration.maxStartsPerWakeup)
        // During a burst, refill when this many runs or fewer are left queued.
        let refillLowWater = limit / 2
        // A refill hands its runs over in chunks of this many, so the other
        // workers never run dry while it pops.
        let refillChunk = Swift.max(1, Swift.min(32, limit / 4))
        var finished: RunCompletion?
        var finishedPrompt = false
        var finishedRun: SchedulerState<C.Instant>.RunStart?
        // When this worker last gave its thread up (see the yield after a run).
        var lastSuspension = ticks(clock.now)
        while true {
            let startInstant = clock.now
            let now = ticks(startInstant)
            if finished != nil { finished!.end = now }
            let pushedQuietly = finished != nil && !finishedPrompt
            let (next, flush, replace, refill) = pool.withLock { p -> (WorkerPool<SchedulerState<C.Instant>.RunStart>.Next, [RunCompletion], Bool, Bool) in
                // Read under the pool lock: a run's cancellation that lands
                // after this is aimed at a run this worker no longer runs.
                let cancelled = workerTask.isCancelled
                let next = p.next(worker: slot, finished: finished, now: now, cancelled: cancelled)
                var mustFlush = p.prompt || finishedPrompt
                var replace = false
                var refill = false
                switch next {
                case .run:
                    refill = p.claimRefill(lowWater: refillLowWater)
                    // the refill records what finished (keeps the runs in flight bounded)
                    mustFlush = mustFlush || refill
                case .park: mustFlush = true
                case .exit:
                    mustFlush = mustFlush || !p.completions.isEmpty
                    replace = cancelled && p.queued > 0
                }
                return (next, mustFlush ? p.takeCompletions() : [], replace, refill)
            }
            var toRecord = flush
            if pushedQuietly, toRecord.isEmpty, let f = finishedRun, f.cancelReason != nil {
                // Cancelled after the body ended (cancelAndWait may be waiting
                // for exactly this run): record it now, not in the next batch.
                toRecord = pool.withLock { $0.takeCompletions() }
            }
            finished = nil
            finishedRun = nil
            switch next {
            case .run(let start):
                if refill {
                    // Up to `limit` runs, a chunk per lock round: each chunk
                    // reaches the other workers as soon as it is popped.
                    var total = 0
                    var done = toRecord
                    while true {
                        let step = core.withLock {
                            coreStep(&$0, done: done, now: now, limit: refillChunk, byDriver: false, refilling: true)
                        }
                        done = []
                        perform(step)
                        if !step.rejected.isEmpty { record(step.rejected) }  // the pool closed meanwhile
                        total += step.started
                        if step.started < refillChunk || total >= limit || !step.rejected.isEmpty { break }
                    }
                    pool.withLock { $0.endRefill(foundNone: total == 0) }
                } else if !toRecord.isEmpty {
                    record(toRecord)
                }
                let c = await runOne(start, startInstant: startInstant, now: now, marker: marker, workerTask: workerTask, runOwner: runOwner)
                finished = c
                finishedPrompt = start.prompt || c.outcome != .success
                finishedRun = start
                if now &- lastSuspension >= Self.yieldInterval {
                    // Runs that never suspend, back to back for this long: let the executor's
                    // other tasks have the thread. (With more due than the workers manage, the
                    // workers held the cooperative threads for good and starved every other
                    // task of the process: the app's server, its pool, a test's sleep.)
                    await Task.yield()
                    lastSuspension = now
                }
            case .park:
                let step = core.withLock { coreStep(&$0, done: toRecord, now: now, limit: limit, byDriver: false) }
                // When this worker parks next, the driver or the one worker it wakes may follow
                // on this thread; when it runs what it popped (a body that may be slow), a
                // worker it wakes gets a thread of its own.
                if let threads, step.started == 0 { threads.lazily { perform(step) } } else { perform(step) }
                if !step.rejected.isEmpty { record(step.rejected) }  // the pool closed meanwhile
                activity?()
                if step.started > 0 { continue }
                lastSuspension = now
                await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                    if !pool.withLock({ $0.park(c) }) {
                        c.resume()
                        // Runs came in: this worker runs them instead of parking, so a task it
                        // handed over lazily above gets another thread if one is idle.
                        threads?.wakeIfQueued()
                    }
                }
            case .exit:
                if !toRecord.isEmpty || replace { record(toRecord, wakeDriver: replace) }
                activity?()
                return
            }
        }
    }

    /// Records finished runs in the state machine and wakes whoever follows.
    private func record(_ done: [RunCompletion], wakeDriver: Bool = false) {
        let metrics = metricsEnabled
        let (wake, resumes, gauges) = core.withLock { core -> (DriverWake?, [CheckedContinuation<Void, Never>], GaugeReading) in
            var end: Int64 = 0
            for c in done {
                core.machine.finish(c)
                end = Swift.max(end, c.end)
            }
            core.runTasks -= done.count
            if core.machine.isDrained && core.runTasks == 0 && core.shutdownEndedAt == nil {
                core.shutdownEndedAt = end
            }
            let wake = (wakeDriver && core.lifecycle == .running) || Self.needsDriver(&core) ? Self.signal(&core) : nil
            return (wake, core.machine.takeResumes(), core.gauges(metrics))
        }
        wake?.resume()
        for r in resumes { r.resume() }
        if metrics { publishGauges(gauges) }
        activity?()
    }

    /// Records completions still in the pool's buffer (before reading statistics).
    func drainCompletions() {
        let done = pool.withLock { $0.takeCompletions() }
        if !done.isEmpty { record(done) }
    }

    /// One run, called by a worker: the body runs inline on the worker's task
    /// (`nonisolated(nonsending)`, like `Body`: no executor hop into it or into the body).
    @inline(__always)
    nonisolated(nonsending) private func runOne(_ start: SchedulerState<C.Instant>.RunStart, startInstant: C.Instant, now: Int64, marker: RunMarker, workerTask: WorkerTask, runOwner: RunOwner) async -> RunCompletion {
        let lateness = now &- start.scheduled
        // RunControl uses the worker's task only between install and uninstall,
        // under its lock, i.e. while this worker is inside this run (see RunControl).
        let serial = start.runSerial
        let cancelledBeforeStart = start.install(workerTask)
        var outcome = RunOutcome.notStarted
        var reason: CancelReason?
        if !cancelledBeforeStart {
            let job = start.jobBox
            let context = JobContext(
                scheduledTime: instant(start.scheduled), actualStart: startInstant, attempt: start.attempt,
                jobName: job.name, job: start.job, owner: runOwner)
            do {
                marker.enter(start.job)
                defer { marker.leave() }
                try await job.body(context)
                outcome = .success
            } catch {
                let why = start.cancelReason
                if why != nil && why != .timeout {
                    outcome = .cancelled
                } else {
                    outcome = why == .timeout ? .cancelled : .failure
                    (job.series?.failures ?? shared.failures).increment()
                    logger.warning(
                        why == .timeout ? "job run timed out (JobOptions.timeout); its task was cancelled" : "job run failed",
                        metadata: ["job": "\(job.name)", "attempt": "\(start.attempt)", "error": "\(error)"])
                }
            }
            reason = start.uninstall()
            if outcome == .success && reason == .timeout {
                logger.warning("job run timed out and returned anyway (its body ignored the cancellation); counted as a timeout, not retried",
                               metadata: ["job": "\(job.name)", "attempt": "\(start.attempt)"])
            }
            let series = job.series ?? shared
            series.runs.increment()
            series.lateness.recordNanoseconds(lateness)
        } else {
            reason = start.cancelReason
            if reason == .timeout {
                (start.jobBox.series?.failures ?? shared.failures).increment()
                logger.warning(
                    "job run timed out before a worker took it: all JobScheduler.Configuration.maxWorkers=\(configuration.maxWorkers) workers were in other bodies (raise maxWorkers or JobOptions.timeout)",
                    metadata: ["job": "\(start.jobBox.name)", "attempt": "\(start.attempt)"])
            }
        }
        // `end` is set by the worker when it reports the run (its next clock read).
        return RunCompletion(
            runSlot: start.runSlot, runSerial: serial, attempt: start.attempt, outcome: outcome,
            reason: reason, lateness: lateness, end: 0)
    }

    // MARK: - Service

    /// Runs the driver until shutdown. Graceful shutdown (swift-service-lifecycle)
    /// starts `shutdown` with `Configuration.shutdownDeadline`; cancelling the
    /// task cancels every run at once. Returns once every run has ended and no
    /// timer is left.
    /// - Throws: `SchedulerError.alreadyRunning` if called twice.
    @_specialize(where C == ContinuousClock)
    public func run() async throws {
        let state = core.withLock { core -> Lifecycle in
            let s = core.lifecycle
            if s == .idle { core.lifecycle = .running }
            return s
        }
        switch state {
        case .finished: return
        case .running: throw SchedulerError(.alreadyRunning, "JobScheduler.run() called while the scheduler is already running; run it once (one ServiceGroup entry)")
        case .idle: break
        }
        logger.debug("scheduler started")
        threads?.start()
        await withTaskCancellationHandler {
            await withGracefulShutdownHandler {
                if let threads {
                    // On the scheduler's own threads: the driver and the workers (children of
                    // this group), and so the job bodies.
                    await withTaskExecutorPreference(threads) { await self.driveGroup() }
                } else {
                    // As before there were threads of its own: no preference scope at all.
                    await driveGroup()
                }
            } onGracefulShutdown: {
                self.beginShutdown(deadline: self.configuration.shutdownDeadline)
            }
        } onCancel: {
            self.cancelEverything()
        }
        // Every child has ended: the threads end once their queue is empty.
        if let threads {
            await threads.stop()
            // Timers still armed were dropped with the threads: none is live.
            core.withLock { core in
                core.liveTimers = []
                core.timerTasks = 0
            }
        }
        let (report, waiters) = core.withLock { core -> (ShutdownReport, [CheckedContinuation<ShutdownReport, Never>]) in
            core.lifecycle = .finished
            let r = Self.makeReport(core)
            core.report = r
            let w = core.shutdownWaiters
            core.shutdownWaiters = []
            return (r, w)
        }
        for w in waiters { w.resume(returning: report) }
        logger.info(
            "scheduler stopped",
            metadata: ["drained": "\(report.drainedRuns)", "cutOff": "\(report.cutOff.count)", "duration": "\(report.duration)"])
        activity?()
    }

    /// The driver's group: the driver loop in this task, timers and workers as children.
    private func driveGroup() async {
        await withDiscardingTaskGroup { group in
            await self.driverLoop(&group)
            // Only superseded timers can be left; every run has ended.
            group.cancelAll()
        }
    }

    private static func makeReport(_ core: Core) -> ShutdownReport {
        let start = core.shutdownStartedAt ?? 0
        let end = core.shutdownEndedAt ?? start
        return ShutdownReport(
            drainedRuns: core.machine.drainedRuns, cutOff: core.machine.cutOff,
            jobsRemoved: core.machine.jobsRemovedAtShutdown, duration: .nanoseconds(Swift.max(0, end - start)))
    }

    /// Starts shutting down without waiting: stops firing, cancels `.cancel`
    /// runs, lets `.drain` runs finish until `deadline` from now.
    public func beginShutdown(deadline: Duration) {
        flags.markShuttingDown()
        var idle: [CheckedContinuation<Void, Never>] = []
        let (shutdown, wake, resumes) = core.withLock { core -> ((cancels: [(RunCancel, CancelReason)], draining: [RunCancel]), DriverWake?, [CheckedContinuation<Void, Never>]) in
            // The pool closes in the same core section as the machine's shutdown (lock order:
            // core, then pool): a driver step between the two had the closed pool refuse its
            // starts and carried them to its next step, so the machine counted them as
            // started and the report listed runs that never began as cut off.
            let (abandoned, done, workers) = pool.withLock { $0.close() }
            idle = workers
            let now = ticks(clock.now)
            Self.recordClosed(&core, done: done, abandoned: abandoned, now: now)
            if core.shutdownStartedAt == nil { core.shutdownStartedAt = now }
            let shutdown = core.machine.beginShutdown(deadline: now.saturatingAdd(deadline.nanoseconds))
            if core.lifecycle == .idle {
                core.lifecycle = .finished
                core.shutdownEndedAt = now
                core.report = Self.makeReport(core)
                return (shutdown, nil, core.machine.takeResumes())
            }
            if core.machine.isDrained && core.runTasks == 0 && core.shutdownEndedAt == nil { core.shutdownEndedAt = now }
            return (shutdown, Self.signal(&core), core.machine.takeResumes())
        }
        for w in idle { w.resume() }
        for (c, r) in shutdown.cancels { c.cancel(r) }
        // A `.drain` run a worker took before the pool closed but has not begun never begins:
        // no run starts once this call returns.
        for c in shutdown.draining { c.preventStart() }
        wake?.resume()
        for r in resumes { r.resume() }
        activity?()
    }

    /// Records what closing the pool returned: finished runs, and runs handed
    /// over but never taken by a worker (they never start).
    private static func recordClosed(_ core: inout Core, done: [RunCompletion], abandoned: [SchedulerState<C.Instant>.RunStart], now: Int64) {
        for c in done { core.machine.finish(c) }
        for a in abandoned { core.machine.abandon(a, now: now) }
        core.runTasks -= done.count + abandoned.count
    }

    private func cancelEverything() {
        flags.markShuttingDown()
        var idle: [CheckedContinuation<Void, Never>] = []
        let (cancels, wake, resumes) = core.withLock { core -> ([(RunCancel, CancelReason)], DriverWake?, [CheckedContinuation<Void, Never>]) in
            // One section with the machine's change, as in `beginShutdown`.
            let (abandoned, done, workers) = pool.withLock { $0.close() }
            idle = workers
            let now = ticks(clock.now)
            Self.recordClosed(&core, done: done, abandoned: abandoned, now: now)
            if core.shutdownStartedAt == nil { core.shutdownStartedAt = now }
            let cancels = core.machine.cancelEverything()
            return (cancels, Self.signal(&core), core.machine.takeResumes())
        }
        for w in idle { w.resume() }
        for (c, r) in cancels { c.cancel(r) }
        wake?.resume()
        for r in resumes { r.resume() }
        activity?()
    }

    /// Shuts down and waits: stops firing (no run starts after this is
    /// called), cancels runs of `.cancel` jobs, lets `.drain` runs finish for
    /// up to `deadline` and then cancels them, and returns once `run()` has
    /// released everything. Idempotent; later calls return the same report.
    /// If `run()` never started, returns at once.
    ///
    /// Called from one of this scheduler's own job bodies, it begins the
    /// shutdown and returns at once with the report so far: the body's run
    /// cannot end while the body waits for it. `run()` completes the shutdown
    /// once the body returns. (A task the body started waits as any caller
    /// does; a child task of the body must not call it: the body's run waits
    /// for its children.)
    @discardableResult
    public func shutdown(deadline: Duration = .seconds(10)) async -> ShutdownReport {
        beginShutdown(deadline: deadline)
        if let marker = CurrentRun.marker, marker.scheduler == ObjectIdentifier(self), marker.callerIsARunningBody {
            return core.withLock { $0.report ?? Self.makeReport($0) }
        }
        return await withCheckedContinuation { (c: CheckedContinuation<ShutdownReport, Never>) in
            let report = core.withLock { core -> ShutdownReport? in
                if core.lifecycle == .finished { return core.report ?? Self.makeReport(core) }
                core.shutdownWaiters.append(c)
                return nil
            }
            if let report { c.resume(returning: report) }
        }
    }

    // MARK: - Handles and statistics

    @_specialize(where C == ContinuousClock)
    func cancelJob(_ id: JobID) {
        let metrics = metricsEnabled
        let (controls, resumes, gauges) = core.withLock { core in
            let controls = core.machine.cancel(id)
            // Nothing left to wait for: the armed timer goes too, at once, instead of sleeping
            // until the cancelled job's time (only then: a timer re-armed on every cancel of
            // the earliest job would cost a task per cancel).
            if controls != nil, core.lifecycle == .running, Self.nextDeadline(&core) == nil {
                var disarmed = 0
                core.liveTimers.removeAll { timer in
                    if drop(timer) { disarmed += 1 }
                    return true
                }
                core.timerTasks -= disarmed
            }
            return (controls, core.machine.takeResumes(), core.gauges(metrics))
        }
        if let controls {
            for c in controls { c.cancel(.jobCancelled) }
            if metrics { publishGauges(gauges) }
            if !controls.isEmpty { abandonQueuedRuns(of: id) }
        }
        for r in resumes { r.resume() }
        activity?()
    }

    /// A cancelled job's runs still waiting for a worker never start: recorded now, so that
    /// `cancelAndWait` does not wait for a worker to take them (with every worker busy, one
    /// of them perhaps in the waiting body, that was forever). A second lock round, only for
    /// a job with runs in flight (not on the path of cancelling a pending job).
    private func abandonQueuedRuns(of id: JobID) {
        let metrics = metricsEnabled
        let (resumes, gauges) = core.withLock { core -> ([CheckedContinuation<Void, Never>], GaugeReading?) in
            // The pool's lock after the scheduler's: the documented order.
            let removed = pool.withLock { $0.removeQueued { $0.job == id } }
            guard !removed.isEmpty else { return ([], nil) }
            let now = ticks(clock.now)
            for start in removed { core.machine.abandon(start, now: now) }
            core.runTasks -= removed.count
            // The in-flight gauge drops with them now (it waited for some worker's next end).
            return (core.machine.takeResumes(), core.gauges(metrics))
        }
        if metrics, let gauges { publishGauges(gauges) }
        for r in resumes { r.resume() }
    }

    func cancelJobAndWait(_ id: JobID) async {
        cancelJob(id)
        // From inside the job's own run (its body, or a task the body started and may await),
        // waiting would never end. Only this scheduler's runs count: another scheduler's
        // job serials count from 1 too.
        if let marker = CurrentRun.marker, marker.scheduler == ObjectIdentifier(self), marker.isInside(id) { return }
        drainCompletions()
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let registered = core.withLock { $0.machine.addWaiter(id, c) }
            if !registered { c.resume() }
        }
    }

    func delayUntilNextRun(_ id: JobID) -> Duration? {
        guard let due = core.withLock({ $0.machine.nextDue(id) }) else { return nil }
        let (delay, overflow) = due.subtractingReportingOverflow(ticks(clock.now))
        return .nanoseconds(overflow ? (due < 0 ? 0 : .max) : Swift.max(0, delay))
    }

    func isJobGone(_ id: JobID) -> Bool {
        core.withLock { $0.machine.isGone(id) }
    }

    func statistics(of id: JobID) -> JobStatistics? {
        drainCompletions()
        return core.withLock { $0.machine.statistics(of: id) }
    }

    /// When the job runs next on this scheduler's clock, or nil if no run is planned.
    public func nextRun(of handle: JobHandle) -> C.Instant? {
        guard handle.owner === self, let due = core.withLock({ $0.machine.nextDue(handle.id) }) else { return nil }
        return instant(due)
    }

    /// Statistics of all jobs.
    public var statistics: SchedulerStatistics {
        drainCompletions()
        return core.withLock { $0.machine.statistics }
    }

    /// Statistics of one job, or nil once it is gone.
    public func statistics(for handle: JobHandle) -> JobStatistics? {
        guard handle.owner === self else { return nil }
        return statistics(of: handle.id)
    }

    /// True if `handle`'s job holds an entry in the timer queue.
    public func isQueued(_ handle: JobHandle) -> Bool {
        guard handle.owner === self else { return false }
        return core.withLock { $0.machine.isQueued(handle.id) }
    }
}

extension JobScheduler where C == ContinuousClock {
    /// A scheduler on the `ContinuousClock`, with `Date()` as its wall clock.
    public convenience init(logger: Logger = Logger(label: "swift-realtime-sync.scheduler"), configuration: Configuration = Configuration()) {
        self.init(clock: ContinuousClock(), wallClock: nil, logger: logger, configuration: configuration)
    }
}

extension JobScheduler: CustomStringConvertible {
    /// A one-line summary.
    public var description: String {
        let s = statistics
        return "JobScheduler(jobs: \(s.jobs), inFlight: \(s.inFlight), runs: \(s.runs), failures: \(s.failures))"
    }
}
