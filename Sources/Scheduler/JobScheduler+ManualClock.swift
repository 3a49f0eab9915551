/// Deterministic driving of a scheduler on a `ManualClock`, for tests.
///
/// "Idle" means: the driver is parked, and every other task of the scheduler
/// (its timer and each run in progress) is parked in the manual clock's
/// `sleep`. A job body used with these helpers may therefore wait only on the
/// manual clock (one sleep at a time) or not at all. The clock's sleepers are counted:
/// give each scheduler a `ManualClock` of its own (another sleeper on it, a second
/// scheduler's timer or the test's own sleep, keeps it from ever looking idle).
extension JobScheduler where C == ManualClock {
    /// True when the scheduler has processed everything due at the clock's
    /// current instant and all its tasks wait for time to pass (or it has finished).
    public var isIdle: Bool {
        let (lifecycle, parked, expected) = core.withLock { c in
            (c.lifecycle, c.driverParked, c.timerTasks + c.runTasks)
        }
        switch lifecycle {
        case .finished: return true
        case .idle: return false
        case .running:
            guard parked else { return false }
            // Workers waiting for runs are idle; a run not yet taken, or one
            // whose end is not recorded yet, is not, unless every worker is busy
            // (`maxWorkers`): then queued runs wait for a body to end, i.e. for time.
            let (settled, waitingForAWorker) = pool.withLock { p -> (Bool, Int) in
                let full = p.workers >= p.cap && p.idleWorkers == 0
                return ((p.queued == 0 || full) && p.completions.isEmpty, full ? p.queued : 0)
            }
            return settled && clock.sleeperCount == expected - waitingForAWorker
        }
    }

    /// Returns once the scheduler is idle (see `isIdle`). No sleeps, no
    /// yield counting: it waits for the clock's change notifications.
    public func waitUntilIdle() async {
        while true {
            let generation = clock.generation
            if isIdle && clock.generation == generation { return }
            await clock.waitForChange(since: generation)
        }
    }

    /// Moves the clock forward by `duration`, stopping at every sleeper's
    /// deadline on the way and waiting until idle at each, so every timer and
    /// every sleeping run wakes at its exact instant.
    public func advance(by duration: Duration) async {
        await advance(to: clock.now.advanced(by: duration))
    }

    /// `advance(by:)` to an instant.
    public func advance(to target: ManualClock.Instant) async {
        await waitUntilIdle()
        while let next = clock.nextSleeperDeadline, next <= target {
            clock.advance(to: next)
            await waitUntilIdle()
        }
        clock.advance(to: target)
        await waitUntilIdle()
    }

    /// Moves the clock by `duration` at once, as if the process had stalled:
    /// nothing wakes in between. Then waits until idle.
    public func stall(for duration: Duration) async {
        await waitUntilIdle()
        clock.advance(by: duration)
        await waitUntilIdle()
    }

    /// Number of live timer tasks, runs in progress, and whether `run()` has
    /// returned: everything the scheduler keeps alive (for tests).
    public var liveTasks: (timers: Int, runs: Int, finished: Bool) {
        core.withLock { ($0.timerTasks, $0.runTasks, $0.lifecycle == .finished) }
    }

    /// Number of worker tasks alive (for tests).
    public var liveWorkers: Int {
        pool.withLock { $0.workers }
    }
}
