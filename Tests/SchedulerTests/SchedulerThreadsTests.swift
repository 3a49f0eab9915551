import Foundation
import Synchronization
import Testing

@testable import Scheduler

/// The calling thread's kernel id, from `/proc/thread-self` (a link to `<pid>/task/<tid>`).
private func currentThreadID() -> Int? {
    guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self") else { return nil }
    return target.split(separator: "/").last.flatMap { Int($0) }
}

/// The calling thread's name (Linux; nil elsewhere).
private func currentThreadName() -> String? {
    #if os(Linux)
    return (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
    #else
    return nil
    #endif
}

/// True while the process still has a thread with this kernel id.
private func threadExists(_ tid: Int) -> Bool {
    FileManager.default.fileExists(atPath: "/proc/self/task/\(tid)")
}

/// Polls `condition` every 5 ms for up to `seconds`. Patient by default: in the full suite
/// other tests can keep Swift's cooperative threads busy for seconds, and `run()` starts
/// there (a CI dry run saw no scheduler start within 5 s).
private func eventually(_ seconds: Double = 30, _ condition: () -> Bool) async throws -> Bool {
    let end = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < end {
        if condition() { return true }
        try await Task.sleep(for: .milliseconds(5))
    }
    return condition()
}

@Suite("JobScheduler's own threads")
struct SchedulerThreadsTests {
    @Test("job bodies run on the scheduler's threads, and every one of them has exited once run() returns")
    func bodiesRunOnOwnThreads() async throws {
        let scheduler = JobScheduler(logger: quiet, configuration: .init(threads: 2))
        let threads = try #require(scheduler.threads)
        let seen = Mutex<(onOwn: Int, elsewhere: Int, tids: Set<Int>)>((0, 0, []))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            let handle = try scheduler.schedule(.every(.milliseconds(5))) { _ in
                let own = threads.isCurrentThread && (currentThreadName().map { $0.hasPrefix("scheduler-") } ?? true)
                let tid = currentThreadID()
                seen.withLock {
                    if own { $0.onOwn += 1 } else { $0.elsewhere += 1 }
                    if let tid { $0.tids.insert(tid) }
                }
            }
            #expect(try await eventually { seen.withLock { $0.onOwn } >= 20 })
            #expect(threads.liveThreads == 2)
            handle.cancel()
            await scheduler.shutdown(deadline: .seconds(1))
            try await group.waitForAll()
        }
        let (onOwn, elsewhere, tids) = seen.withLock { $0 }
        #expect(onOwn >= 20)
        #expect(elsewhere == 0)
        #if os(Linux)
        #expect(!tids.isEmpty)
        #endif
        // run() has returned: the threads left their loops; the kernel threads end right after.
        #expect(threads.liveThreads == 0)
        #expect(threads.pendingTimers == 0)
        #expect(try await eventually { tids.allSatisfy { !threadExists($0) } })
    }

    @Test("by default (threads: 0) the bodies run on Swift's global executor, with no thread of the scheduler's")
    func globalExecutorByDefault() async throws {
        let scheduler = JobScheduler(logger: quiet, configuration: .init())
        #expect(scheduler.threads == nil)
        let runs = Mutex(0)
        let names = Mutex<Set<String>>([])
        try await withContinuousSchedulerInstance(scheduler) { scheduler in
            _ = try scheduler.schedule(.every(.milliseconds(5))) { _ in
                if let name = currentThreadName() { names.withLock { _ = $0.insert(name) } }
                runs.withLock { $0 += 1 }
            }
            // Patient: other tests of this process may keep the cooperative threads busy.
            #expect(try await eventually { runs.withLock { $0 } >= 3 })
        }
        #expect(!names.withLock { $0 }.contains { $0.hasPrefix("scheduler-") })
    }

    @Test("a body that blocks its thread does not hold up another job's fires: the other thread keeps time and runs them")
    func blockedBodyDoesNotStopTheClock() async throws {
        let scheduler = JobScheduler(logger: quiet, configuration: .init(threads: 2))
        let fastRuns = Mutex<[ContinuousClock.Instant]>([])
        let blocked = Mutex<(start: ContinuousClock.Instant?, end: ContinuousClock.Instant?)>((nil, nil))
        try await withContinuousSchedulerInstance(scheduler) { scheduler in
            _ = try scheduler.schedule(.every(.milliseconds(10))) { _ in
                fastRuns.withLock { $0.append(.now) }
            }
            _ = try scheduler.schedule(.once(after: .milliseconds(50))) { _ in
                blocked.withLock { $0.start = .now }
                usleep(400_000)  // a synchronous wait: holds its thread
                blocked.withLock { $0.end = .now }
            }
            #expect(try await eventually { blocked.withLock { $0.end } != nil })
        }
        let (start, end) = blocked.withLock { $0 }
        let s = try #require(start)
        let e = try #require(end)
        let during = fastRuns.withLock { $0.filter { $0 > s && $0 < e } }
        // 40 fires are due while it blocks; a loaded machine may miss many, a stopped clock all
        // (one could have been taken before the block began: two show the clock kept going).
        #expect(during.count >= 2, "only \(during.count) runs of the 10 ms job during the 400 ms block")
    }

    @Test("two runs due at once, one of them blocking its thread: the other starts at once on another thread, also when a worker popped both")
    func blockedBodyDoesNotHoldUpItsBatchMate() async throws {
        let scheduler = JobScheduler(logger: quiet, configuration: .init(threads: 4))
        // Per round: when the blocking body ended, when its batch mate started.
        let blockerEnds = Mutex<[Int: ContinuousClock.Instant]>([:])
        let mateStarts = Mutex<[Int: ContinuousClock.Instant]>([:])
        let started = Mutex(false)
        try await withContinuousSchedulerInstance(scheduler) { scheduler in
            _ = try scheduler.schedule(.once(after: .zero)) { _ in started.withLock { $0 = true } }
            #expect(try await eventually { started.withLock { $0 } })
            // A frequent short job keeps the workers finishing runs, so that a worker (not only
            // the driver) often takes the next due runs from the timer queue itself.
            let ticker = try scheduler.schedule(.every(.milliseconds(1))) { _ in }
            let base = ContinuousClock.now.advanced(by: .milliseconds(100))
            for round in 0..<6 {
                let at = base.advanced(by: .milliseconds(350 * round))
                _ = try scheduler.schedule(.once(at: at)) { _ in
                    usleep(300_000)
                    blockerEnds.withLock { $0[round] = .now }
                }
                _ = try scheduler.schedule(.once(at: at)) { _ in mateStarts.withLock { $0[round] = .now } }
            }
            #expect(try await eventually { blockerEnds.withLock { $0.count } == 6 && mateStarts.withLock { $0.count } == 6 })
            ticker.cancel()
        }
        // Cause and effect, not a speed: held up by the blocking body, the mate would start
        // only after that body's 300 ms ended.
        let ends = blockerEnds.withLock { $0 }
        for (round, start) in mateStarts.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
            let end = try #require(ends[round])
            #expect(start < end, "round \(round): the run due with a blocking one started \(end.duration(to: start)) after that one ended")
        }
    }

    @Test("jobs scheduled ever earlier on the real clock fire in deadline order, each on time, and superseded timers are disarmed")
    func supersededSleepsAreCancelled() async throws {
        let scheduler = JobScheduler(logger: quiet, configuration: .init(threads: 2))
        let threads = try #require(scheduler.threads)
        let fired = Mutex<[(due: Int, lateness: Duration)]>([])
        let started = Mutex(false)
        var base = ContinuousClock.now
        var allScheduled = ContinuousClock.now
        try await withContinuousSchedulerInstance(scheduler) { scheduler in
            // Once a first run has happened, the driver runs on the scheduler's threads: what
            // follows no longer waits for Swift's cooperative threads (which other tests of
            // this process may keep busy).
            _ = try scheduler.schedule(.once(after: .zero)) { _ in started.withLock { $0 = true } }
            #expect(try await eventually { started.withLock { $0 } })
            // 10 jobs at fixed instants, each earlier than the one before: base + 3000, 2700, ..., 300 ms,
            // scheduled 15 ms apart, from a task on the scheduler's threads (the cooperative ones
            // may be kept busy by other tests for longer than the whole schedule).
            let (b, a, most) = try await Task(executorPreference: threads) { @Sendable () async throws -> (ContinuousClock.Instant, ContinuousClock.Instant, Int) in
                let base = ContinuousClock.now.advanced(by: .milliseconds(400))
                for i in 0..<10 {
                    let due = 3000 - 300 * i
                    _ = try scheduler.schedule(.once(at: base.advanced(by: .milliseconds(due)))) { ctx in
                        fired.withLock { $0.append((due, ctx.lateness)) }
                    }
                    // Time for the driver to arm a timer for it, superseding the previous one.
                    try await Task.sleep(for: .milliseconds(15))
                }
                let allScheduled = ContinuousClock.now
                // Never more than one timer armed: the later ones were superseded (disarmed),
                // not left to fire one by one.
                var most = 0
                let patience = ContinuousClock.now.advanced(by: .seconds(8))
                while fired.withLock({ $0.count }) < 10 && ContinuousClock.now < patience {
                    most = max(most, threads.pendingTimers)
                    try await Task.sleep(for: .milliseconds(2))
                }
                return (base, allScheduled, most)
            }.value
            base = b
            allScheduled = a
            #expect(most <= 1, "\(most) timers armed at once")
            #expect(fired.withLock { $0.count } == 10)
        }
        let runs = fired.withLock { $0 }
        // A timer kept for a later deadline would have held the earlier jobs until then. (Jobs
        // due before the last was scheduled, on a machine that slow, run as they come.)
        let inTime = runs.filter { base.advanced(by: .milliseconds($0.due)) > allScheduled }
        #expect(inTime.map(\.due) == inTime.map(\.due).sorted())
        // A job held by the superseded timer runs when the next later job is due, 300 ms on.
        for run in inTime {
            #expect(run.lateness < .milliseconds(250), "the job due at +\(run.due) ms ran \(run.lateness) late")
        }
    }

    @Test("shutdown with a job due in an hour returns at once: the armed timer is dropped and the threads end")
    func shutdownCancelsAFarSleep() async throws {
        let scheduler = JobScheduler(logger: quiet, configuration: .init(threads: 2))
        let threads = try #require(scheduler.threads)
        let runs = Mutex(0)
        let armed = Mutex<ContinuousClock.Instant?>(nil)
        try await withContinuousSchedulerInstance(scheduler) { scheduler in
            _ = try scheduler.schedule(.once(after: .seconds(3600))) { _ in runs.withLock { $0 += 1 } }
            #expect(try await eventually { threads.pendingTimers == 1 })
            armed.withLock { $0 = .now }
        }
        // Not the hour: the shutdown (and run()'s return, which may wait for a busy
        // cooperative thread in the full suite) takes seconds at most.
        let since = try #require(armed.withLock { $0 })
        #expect(since.duration(to: .now) < .seconds(20))
        #expect(runs.withLock { $0 } == 0)
        #expect(threads.liveThreads == 0 && threads.pendingTimers == 0)
    }

    @Test("the executor's hand-over rule: one task resumed lazily follows on the same thread; two wake another thread, so a long job does not hold both")
    func lazyHandOver() async throws {
        let threads = startedThreads("test-lazy")
        // Two tasks parked on continuations, on the executor.
        let parked = Mutex<[CheckedContinuation<Void, Never>]>([])
        let ranAt = Mutex<[ContinuousClock.Instant]>([])
        let waiters = (0..<2).map { _ in
            Task(executorPreference: threads) { @Sendable in
                await withCheckedContinuation { c in parked.withLock { $0.append(c) } }
                ranAt.withLock { $0.append(.now) }
            }
        }
        #expect(try await eventually { parked.withLock { $0.count } == 2 })
        // A job on the executor resumes both inside `lazily`, then blocks its thread 600 ms.
        let blockEnd = await Task(executorPreference: threads) { @Sendable in
            let both = parked.withLock { $0 }
            threads.lazily { for c in both { c.resume() } }
            usleep(600_000)
            return ContinuousClock.now
        }.value
        for w in waiters { await w.value }
        let first = try #require(ranAt.withLock { $0.min() })
        // The second resumed task woke the other thread: one of them ran during the block.
        #expect(first < blockEnd, "both resumed tasks waited \(blockEnd.duration(to: first)) past the end of the block")
        await threads.stop()
        #expect(threads.liveThreads == 0)
    }

    @Test("the executor alone: timers fire in deadline order on its threads, a disarmed one never runs, an earlier one wakes the timekeeper, a task that outlives stop() still runs")
    func executorDirectly() async throws {
        let clock = ContinuousClock()
        let epoch = clock.now
        let threads = startedThreads("test-sched", epoch: epoch)
        func ticks() -> Int64 { epoch.duration(to: clock.now).nanoseconds }
        let fired = Mutex<[(Int, Bool)]>([])
        let now = ticks()
        for (i, ms) in [60, 20, 40].enumerated() {
            _ = threads.arm(at: now + Int64(ms) * 1_000_000) { fired.withLock { $0.append((i, threads.isCurrentThread)) } }
        }
        let never = threads.arm(at: now + 30_000_000) { fired.withLock { $0.append((99, true)) } }
        #expect(threads.disarm(never))
        #expect(try await eventually { fired.withLock { $0.count } == 3 })
        try await Task.sleep(for: .milliseconds(50))
        let order = fired.withLock { $0 }
        #expect(order.map(\.0) == [1, 2, 0])
        #expect(order.allSatisfy { $0.1 }, "a timer's action ran off the executor's threads")
        #expect(!threads.disarm(never), "disarmed twice")
        // An earlier timer armed while the timekeeper waits for a later one: the timekeeper is
        // woken to wait for the earlier deadline instead.
        let laterDeadline = ticks() + 3_000_000_000
        let later = threads.arm(at: laterDeadline) {}
        try await Task.sleep(for: .milliseconds(20))  // the timekeeper is in its timed wait now
        let t0 = clock.now
        let early = Mutex<ContinuousClock.Instant?>(nil)
        _ = threads.arm(at: ticks() + 50_000_000) { early.withLock { $0 = .now } }
        #expect(try await eventually { early.withLock { $0 } != nil })
        // Not held until the later timer's deadline (a cause, not a speed).
        let firedAt = try #require(early.withLock { $0 })
        #expect(firedAt < epoch.advanced(by: .nanoseconds(laterDeadline)), "a 50 ms timer took \(t0.duration(to: firedAt)): it waited for the 3 s one")
        #expect(threads.pendingTimers == 1)
        #expect(threads.disarm(later))
        // Jobs of a task that prefers it run on its threads.
        let onOwn = await Task(executorPreference: threads) { threads.isCurrentThread }.value
        #expect(onOwn)
        // stop() drops armed timers and ends the threads.
        let dropped = Mutex(false)
        _ = threads.arm(at: ticks() + 3_600_000_000_000) { dropped.withLock { $0 = true } }
        await threads.stop()
        #expect(threads.liveThreads == 0 && threads.pendingTimers == 0)
        #expect(!dropped.withLock { $0 })
        // A task preferring the stopped executor is run elsewhere, not lost.
        let late = Task(executorPreference: threads) { 42 }
        #expect(await late.value == 42)
    }
}

/// Two started `SchedulerThreads` whose ticks count from `epoch`.
private func startedThreads(_ name: String, epoch: ContinuousClock.Instant = .now) -> SchedulerThreads {
    let threads = SchedulerThreads(count: 2, name: name) { epoch.duration(to: .now).nanoseconds }
    threads.start()
    return threads
}

/// Runs `body` while `scheduler` runs, then shuts it down and waits for `run()` to return.
private func withContinuousSchedulerInstance(
    _ scheduler: JobScheduler<ContinuousClock>,
    _ body: (JobScheduler<ContinuousClock>) async throws -> Void
) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await scheduler.run() }
        try await body(scheduler)
        await scheduler.shutdown(deadline: .seconds(1))
        try await group.waitForAll()
    }
}
