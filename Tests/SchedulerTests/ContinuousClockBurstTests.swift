import Foundation
import Synchronization
import Testing

@testable import Scheduler

/// The burst path (driver parking after a full hand-over, workers refilling
/// the run queue before it runs dry) only runs on a real clock: on a
/// `ManualClock` the pool records every completion at once and never refills.
/// Runs `body` against a scheduler on the continuous clock that runs
/// meanwhile, then shuts it down and waits for `run()` to return.
func withContinuousScheduler(
    _ configuration: JobScheduler<ContinuousClock>.Configuration,
    _ body: (JobScheduler<ContinuousClock>, ContinuousClock) async throws -> Void
) async throws {
    let scheduler = JobScheduler(logger: quiet, configuration: configuration)
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await scheduler.run() }
        try await body(scheduler, ContinuousClock())
        await scheduler.shutdown(deadline: .seconds(1))
        try await group.waitForAll()
    }
}

@Suite("JobScheduler on the continuous clock")
struct ContinuousClockBurstTests {
    @Test("an aligned burst many hand-overs long runs every job; cancelAndWait from inside a run returns; nothing is left")
    func alignedBurst() async throws {
        let jobs = 2_000
        let counts = Mutex([Int](repeating: 0, count: jobs))
        try await withContinuousScheduler(.init(maxStartsPerWakeup: 16)) { scheduler, clock in
            let first = clock.now.advanced(by: .milliseconds(100))
            // coalesce: a fire is never dropped as missed on a loaded machine, so every job runs at least once
            let options = JobOptions(missedRuns: .coalesce)
            var handles: [JobHandle] = []
            for i in 0..<jobs {
                handles.append(try scheduler.schedule(.every(.milliseconds(100), startingAt: first), options: options) { _ in
                    counts.withLock { $0[i] += 1 }
                })
            }
            let selfRuns = Mutex(0)
            let selfCancelled = try scheduler.schedule(.every(.milliseconds(100), startingAt: first), options: options) { ctx in
                selfRuns.withLock { $0 += 1 }
                await ctx.handle.cancelAndWait()  // must return: it is inside this very run
            }
            // Several bursts; then wait (patiently, the machine may be loaded)
            // until every job has run and the self-cancelling run has ended.
            try await clock.sleep(until: first.advanced(by: .milliseconds(250)))
            let patience = clock.now.advanced(by: .seconds(20))
            while clock.now < patience {
                let allRan = counts.withLock { $0.allSatisfy { $0 >= 1 } }
                if allRan && selfCancelled.isCancelled { break }
                try await clock.sleep(for: .milliseconds(10))
            }
            #expect(selfCancelled.isCancelled)
            await selfCancelled.cancelAndWait()
            for h in handles { await h.cancelAndWait() }
            #expect(selfRuns.withLock { $0 } == 1)
            let stats = scheduler.statistics
            #expect(stats.inFlight == 0 && stats.jobs == 0 && stats.queuedTimers == 0)
            // every handle is cancelled and waited for: no run can change the counts now
            let c = counts.withLock { $0 }
            #expect(c.allSatisfy { $0 >= 1 })
            #expect(UInt64(c.reduce(0, +)) + 1 == stats.runs)
        }
    }

    @Test("no run starts once beginShutdown has returned, also one a worker had already taken from the queue; a saturated scheduler does not starve other tasks", arguments: 0..<3)
    func noStartAfterShutdown(round: Int) async throws {
        let shutdownReturned = Atomic(false)
        let started = Atomic(0)
        let startedLate = Atomic(0)
        // A few starts per wake-up: the workers refill the run queue in small chunks, taking
        // the scheduler's lock between taking a run and starting it, where shutdown can begin.
        try await withContinuousScheduler(.init(maxStartsPerWakeup: 8, maxWorkers: 2)) { scheduler, clock in
            let at = clock.now.advanced(by: .milliseconds(50))
            for _ in 0..<5_000 {
                try scheduler.schedule(.once(at: at)) { _ in
                    if shutdownReturned.load(ordering: .acquiring) { startedLate.add(1, ordering: .relaxed) }
                    started.add(1, ordering: .relaxed)
                }
            }
            // Mid-burst (this task gets a thread although the workers always have runs to do).
            let patience = clock.now.advanced(by: .seconds(20))
            while started.load(ordering: .relaxed) < 200 + 300 * round, clock.now < patience {
                try await clock.sleep(for: .microseconds(50))
            }
            scheduler.beginShutdown(deadline: .seconds(5))
            shutdownReturned.store(true, ordering: .releasing)
            #expect(started.load(ordering: .relaxed) < 5_000, "the burst was over before shutdown began: the test proves nothing")
        }
        #expect(started.load(ordering: .relaxed) > 0)
        #expect(startedLate.load(ordering: .relaxed) == 0)
    }

    @Test("in a burst the driver parks after one hand-over, yet bodies stuck in a slow run still get another worker for the rest")
    func burstWithSlowBodies() async throws {
        // 2 workers (the default base on a 2-core machine is at most 2; fix it
        // with maxWorkers so the test means the same everywhere: a third and
        // fourth worker may be added for stalled ones)
        let fast = 200
        let ran = Mutex(0)
        let slowStarted = Mutex(0)
        let slowEnded = Mutex(0)
        // The slow bodies hold their workers until the test has seen every fast run (or the
        // bounded wait gives up): no race between the fast runs and a fixed sleep.
        let gateOpen = Mutex(false)
        try await withContinuousScheduler(.init(maxStartsPerWakeup: 16, maxWorkers: 4)) { scheduler, clock in
            let at = clock.now.advanced(by: .milliseconds(100))
            // two slow runs first (scheduled first, so queued first): each keeps its worker until the gate opens
            for _ in 0..<2 {
                try scheduler.schedule(.once(at: at)) { _ in
                    slowStarted.withLock { $0 += 1 }
                    let limit = clock.now.advanced(by: .seconds(30))
                    while !gateOpen.withLock({ $0 }), !Task.isCancelled, clock.now < limit {
                        try? await Task.sleep(for: .milliseconds(5))
                    }
                    slowEnded.withLock { $0 += 1 }
                }
            }
            for _ in 0..<fast {
                try scheduler.schedule(.once(at: at)) { _ in
                    ran.withLock { $0 += 1 }
                }
            }
            let patience = clock.now.advanced(by: .seconds(20))
            while clock.now < patience, ran.withLock({ $0 }) < fast || slowStarted.withLock({ $0 }) < 2 {
                try await clock.sleep(for: .milliseconds(5))
            }
            // every fast run ended while both slow ones still held their workers (the gate was
            // still closed): the stall rule added workers although the driver had parked
            #expect(ran.withLock { $0 } == fast)
            #expect(slowStarted.withLock { $0 } == 2)
            #expect(slowEnded.withLock { $0 } == 0, "a slow run ended before the gate opened")
            gateOpen.withLock { $0 = true }
            let drain = clock.now.advanced(by: .seconds(20))
            while clock.now < drain, slowEnded.withLock({ $0 }) < 2 {
                try await clock.sleep(for: .milliseconds(5))
            }
            #expect(slowEnded.withLock { $0 } == 2)
        }
    }

    @Test("a burst whose workers are all stuck at the worker cap is still cut short by the runs' timeouts")
    func burstStuckAtCapTimesOut() async throws {
        // 2 workers at most, 16 runs per hand-over, 20 runs due at once, each
        // sleeping far longer than its timeout: no worker is free to take the
        // rest of the burst and none can be added; only the timeouts (armed by
        // the driver although it parked mid-burst) end the runs. A run's
        // timeout counts from its hand-over, so runs still queued when theirs
        // passes end without starting.
        let jobs = 20
        let started = Mutex(0)
        try await withContinuousScheduler(.init(maxStartsPerWakeup: 16, maxWorkers: 2)) { scheduler, clock in
            let at = clock.now.advanced(by: .milliseconds(100))
            for _ in 0..<jobs {
                try scheduler.schedule(.once(at: at), options: .init(timeout: .milliseconds(100))) { _ in
                    started.withLock { $0 += 1 }
                    try? await Task.sleep(for: .seconds(60))
                }
            }
            let begin = clock.now
            let patience = begin.advanced(by: .seconds(20))
            var stats = scheduler.statistics
            while clock.now < patience, stats.jobs > 0 || stats.inFlight > 0 {
                try await clock.sleep(for: .milliseconds(10))
                stats = scheduler.statistics
            }
            // every run ended (by its timeout), seconds before the 60 s sleeps would have
            #expect(stats.jobs == 0 && stats.inFlight == 0)
            #expect(begin.duration(to: clock.now) < .seconds(15))
            #expect(stats.timeouts == UInt64(jobs))
            #expect(started.withLock { $0 } >= 2)
        }
    }
}
