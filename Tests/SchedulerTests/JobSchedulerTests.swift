import Foundation
import Logging
import MetricsTestKit
import Synchronization
import Testing

@testable import Scheduler

typealias Context = JobContext<ManualClock.Instant>

/// Records what runs saw.
final class Recorder: Sendable {
    struct Event: Sendable, Equatable, CustomStringConvertible {
        var start: Duration
        var scheduled: Duration
        var attempt: Int
        var description: String { "start \(start) scheduled \(scheduled) attempt \(attempt)" }
    }

    let events = Mutex<[Event]>([])
    let notes = Mutex<[String]>([])

    func record(_ c: Context) {
        events.withLock { $0.append(Event(start: c.actualStart.offset, scheduled: c.scheduledTime.offset, attempt: c.attempt)) }
    }

    func note(_ s: String) { notes.withLock { $0.append(s) } }

    var starts: [Duration] { events.withLock { $0.map(\.start) } }
    var scheduled: [Duration] { events.withLock { $0.map(\.scheduled) } }
    var all: [Event] { events.withLock { $0 } }
    var allNotes: [String] { notes.withLock { $0 } }
}

let quiet = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })

func s(_ seconds: Double) -> Duration { .milliseconds(Int64((seconds * 1000).rounded())) }

/// Runs `body` with a scheduler on a manual clock whose `run()` is a child
/// task; shuts down and checks that nothing is left alive afterwards.
func withScheduler(
    maxStartsPerWakeup: Int = 256,
    _ body: (JobScheduler<ManualClock>, ManualClock) async throws -> Void
) async throws {
    let clock = ManualClock()
    let scheduler = JobScheduler(clock: clock, logger: quiet, configuration: .init(randomSeed: 42, maxStartsPerWakeup: maxStartsPerWakeup))
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await scheduler.run() }
        try await body(scheduler, clock)
        await scheduler.shutdown(deadline: .zero)
        try await group.waitForAll()
    }
    let live = scheduler.liveTasks
    #expect(live.timers == 0 && live.runs == 0 && live.finished)
    #expect(clock.sleeperCount == 0)
}

@Suite("JobScheduler on a manual clock")
struct JobSchedulerTests {
    // MARK: - Triggers

    @Test("fixed rate keeps its grid; fixed delay counts from the end of the previous run")
    func fixedRateVersusFixedDelay() async throws {
        try await withScheduler { scheduler, clock in
            let rate = Recorder()
            let delay = Recorder()
            try scheduler.schedule(.every(.seconds(10)), options: .init(name: "rate")) { c in
                rate.record(c)
                try await clock.sleep(for: .seconds(3))
            }
            try scheduler.schedule(.fixedDelay(.seconds(10)), options: .init(name: "delay")) { c in
                delay.record(c)
                try await clock.sleep(for: .seconds(3))
            }
            await scheduler.advance(by: .seconds(40))
            #expect(rate.starts == [s(10), s(20), s(30), s(40)])
            #expect(delay.starts == [s(10), s(23), s(36)])
        }
    }

    @Test("once after a delay and once at an instant run exactly once, then the job is gone")
    func once() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let a = try scheduler.schedule(.once(after: .seconds(5))) { c in r.record(c) }
            let b = try scheduler.schedule(.once(at: clock.now.advanced(by: .seconds(7)))) { c in r.record(c) }
            #expect(a.nextRun == .seconds(5))
            await scheduler.advance(by: .seconds(20))
            #expect(r.starts == [s(5), s(7)])
            #expect(a.isCancelled && b.isCancelled)
            #expect(scheduler.statistics.jobs == 0)
        }
    }

    @Test("cron trigger fires on wall-clock boundaries of the manual clock")
    func cronOnManualClock() async throws {
        // origin 1_700_000_000 = 2023-11-14T22:13:20Z
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            try scheduler.schedule(try .cron("*/15 * * * * *", timeZone: TimeZone(identifier: "UTC")!)) { c in r.record(c) }
            await scheduler.advance(by: .seconds(60))
            // wall seconds 20 -> next multiples of 15: :30, :45, :00, :15
            #expect(r.starts == [s(10), s(25), s(40), s(55)])
        }
    }

    @Test("cron with a jitter longer than its period still runs every occurrence it reaches (the jitter is not lateness)")
    func cronWithLongJitter() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            // Every 15 s with up to 40 s of jitter: a run starts up to 40 s after its wall
            // second, when later occurrences have passed on the wall clock.
            let h = try scheduler.schedule(try .cron("*/15 * * * * *", timeZone: TimeZone(identifier: "UTC")!),
                                           options: .init(jitter: .seconds(40))) { c in r.record(c) }
            await scheduler.advance(by: .seconds(600))
            // 40 occurrences in 600 s (the last ones may still be in their jitter). Each runs
            // within its jitter, or, when its jittered time had already passed as the one
            // before ran, is due at that same instant and skipped as an overlap: none missed.
            let statistics = try #require(h.statistics)
            #expect(statistics.missedRuns == 0)
            #expect(r.all.count >= 20, "\(r.all.count) runs")
            #expect((37...40).contains(r.all.count + Int(statistics.skippedOverlaps)), "\(r.all.count) runs, \(statistics.skippedOverlaps) skipped")
            #expect(Set(r.scheduled).count == r.all.count, "an occurrence ran twice")
        }
    }

    @Test("fixed rate with a jitter longer than its period: no occurrence counted missed; each runs or is skipped as an overlap")
    func fixedRateWithLongJitter() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1), firstAfter: .seconds(1)), options: .init(jitter: .seconds(3))) { c in r.record(c) }
            await scheduler.advance(by: .seconds(300))
            let statistics = try #require(h.statistics)
            #expect(statistics.missedRuns == 0)
            // 300 occurrences, the last few still in their jitter.
            #expect((294...300).contains(r.all.count + Int(statistics.skippedOverlaps)), "\(r.all.count) runs, \(statistics.skippedOverlaps) skipped")
            #expect(Set(r.scheduled).count == r.all.count, "an occurrence ran twice")
        }
    }

    @Test("a fixed-rate first instant centuries back does not trap; a zero fixed delay is refused")
    func extremeTriggers() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            _ = try scheduler.schedule(.every(.seconds(1), startingAt: clock.now.advanced(by: .seconds(-Int64.max / 2)))) { c in r.record(c) }
            await scheduler.advance(by: .seconds(3))
            #expect(r.all.count >= 1)
            #expect(throws: SchedulerError.self) { try scheduler.schedule(.fixedDelay(.zero)) { _ in } }
        }
        // A period of 1 ns from centuries back: more occurrences passed than an Int64 counts.
        try await withScheduler { scheduler, clock in
            let tiny = Recorder()
            _ = try scheduler.schedule(.every(.nanoseconds(1), startingAt: clock.now.advanced(by: .seconds(-10_000_000_000)))) { c in tiny.record(c) }
            await scheduler.advance(by: .nanoseconds(3))
            #expect(tiny.all.count >= 1)
            #expect(scheduler.statistics.missedRuns > UInt64(Int64.max / 2))
        }
    }

    @Test("a one-shot job whose retry backoff never ends is done after its failure, not kept live for ever")
    func oneShotWithEndlessBackoff() async throws {
        try await withScheduler { scheduler, _ in
            let forever = Duration.seconds(Int64.max / 2)
            let h = try scheduler.schedule(.once(after: .seconds(1)),
                                           options: .init(retry: .init(maxAttempts: 3, initialBackoff: forever, maxBackoff: forever))) { _ in
                throw CancellationError()
            }
            await scheduler.advance(by: .seconds(2))
            #expect(h.isCancelled, "the job should be over")
            #expect(scheduler.statistics.jobs == 0)
        }
    }

    @Test("a one-shot job with a retry is not cancelled while a failing attempt may still be retried; it is once no attempt is left")
    func oneShotRetryIsNotCancelledMidRun() async throws {
        try await withScheduler { scheduler, clock in
            let retry = RetryPolicy(maxAttempts: 2, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
            let h = try scheduler.schedule(.once(after: .seconds(1)), options: .init(retry: retry)) { _ in
                try await clock.sleep(for: .seconds(5))
                throw CancellationError()
            }
            await scheduler.advance(by: .seconds(3))  // attempt 1 runs (1 s to 6 s)
            #expect(!h.isCancelled, "attempt 1 may fail and be retried")
            await scheduler.advance(by: .seconds(6))  // t = 9: attempt 2 runs (7 s to 12 s), the last
            #expect(h.isCancelled, "no attempt is left after this one")
            await scheduler.advance(by: .seconds(5))
            #expect(h.isCancelled)
            #expect(scheduler.statistics.jobs == 0)
        }
    }

    @Test("fixed delay with a retry: the next regular run comes a delay after the retry ends, with no spurious overlap")
    func fixedDelayAfterRetry() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let retry = RetryPolicy(maxAttempts: 2, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
            let h = try scheduler.schedule(.fixedDelay(.seconds(10)), options: .init(overlap: .concurrent(max: 2), retry: retry)) { c in
                r.record(c)
                if c.attempt == 1 && r.all.count == 1 { throw CancellationError() }  // the first run fails at once
                if c.attempt == 2 { try await clock.sleep(for: .seconds(15)) }  // its retry takes 15 s
            }
            await scheduler.advance(by: .seconds(40))
            // first run 10 s, retry 11 s ending at 26 s, next regular run 36 s
            #expect(r.starts == [s(10), s(11), s(36)])
            #expect(h.statistics?.skippedOverlaps == 0)
        }
    }

    // MARK: - Overlap policies (period 1 s, run 2.25 s)

    @Test("overlap skip: occurrences during a run are skipped and counted")
    func overlapSkip() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1)), options: .init(overlap: .skip)) { c in
                r.record(c)
                try await clock.sleep(for: s(2.25))
            }
            await scheduler.advance(by: s(7.5))
            #expect(r.starts == [s(1), s(4), s(7)])
            #expect(h.statistics?.skippedOverlaps == 4)
        }
    }

    @Test("overlap queueOne: one occurrence waits and starts when the run ends")
    func overlapQueueOne() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1)), options: .init(overlap: .queueOne)) { c in
                r.record(c)
                try await clock.sleep(for: s(2.25))
            }
            await scheduler.advance(by: s(7.5))
            #expect(r.starts == [s(1), s(3.25), s(5.5)])
            #expect(r.scheduled == [s(1), s(2), s(4)])
            #expect(h.statistics?.skippedOverlaps == 3)  // at 3, 5 and 7
        }
    }

    @Test("overlap concurrent(max: 2): at most two runs at once")
    func overlapConcurrent() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1)), options: .init(overlap: .concurrent(max: 2))) { c in
                r.record(c)
                try await clock.sleep(for: s(2.25))
            }
            await scheduler.advance(by: s(7.5))
            #expect(r.starts == [s(1), s(2), s(4), s(5), s(7)])
            #expect(h.statistics?.skippedOverlaps == 2)  // at 3 and 6
        }
    }

    // MARK: - Missed-run policies after a 10-period stall

    @Test("missed skip: after a stall none of the overdue runs happen; the grid resumes")
    func missedSkip() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1)), options: .init(missedRuns: .skip)) { c in r.record(c) }
            await scheduler.advance(by: s(1.5))
            await scheduler.stall(for: s(10))  // now 11.5: occurrences 2...11 are overdue
            #expect(r.starts == [s(1)])
            #expect(h.statistics?.missedRuns == 10)
            await scheduler.advance(by: s(0.5))
            #expect(r.starts == [s(1), s(12)])
        }
    }

    @Test("missed coalesce: one run for all overdue occurrences")
    func missedCoalesce() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1)), options: .init(missedRuns: .coalesce)) { c in r.record(c) }
            await scheduler.advance(by: s(1.5))
            await scheduler.stall(for: s(10))
            #expect(r.starts == [s(1), s(11.5)])
            #expect(r.scheduled == [s(1), s(11)])
            #expect(h.statistics?.coalescedRuns == 9)
            await scheduler.advance(by: s(0.5))
            #expect(r.starts == [s(1), s(11.5), s(12)])
        }
    }

    @Test("missed burst(max: 3): the three most recent run back to back, the rest are missed")
    func missedBurst() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1)), options: .init(missedRuns: .burst(max: 3))) { c in r.record(c) }
            await scheduler.advance(by: s(1.5))
            await scheduler.stall(for: s(10))
            #expect(r.starts == [s(1), s(11.5), s(11.5), s(11.5)])
            #expect(r.scheduled == [s(1), s(9), s(10), s(11)])
            #expect(h.statistics?.missedRuns == 7)
            await scheduler.advance(by: s(0.5))
            #expect(r.starts.last == s(12))
        }
    }

    @Test("cron after a two-day stall: coalesce runs once, burst(max: 3) runs the last three, the rest are counted exactly")
    func cronLongStall() async throws {
        try await withScheduler { scheduler, _ in
            let utc = TimeZone(identifier: "UTC")!
            let c = Recorder(), b = Recorder()
            let coalescing = try scheduler.schedule(try .cron("* * * * * *", timeZone: utc), options: .init(missedRuns: .coalesce)) { x in c.record(x) }
            let bursting = try scheduler.schedule(try .cron("* * * * * *", timeZone: utc), options: .init(missedRuns: .burst(max: 3))) { x in b.record(x) }
            await scheduler.advance(by: s(1.5))
            // Overdue: the occurrences at 2 ... 172,801 s. Before, the catch-up stepped at most
            // 100,000 of them per pass (each a time-zone lookup, under the scheduler's lock) and
            // applied the policy per pass: two coalesced runs, two bursts.
            await scheduler.stall(for: .seconds(172_800))
            #expect(c.scheduled == [s(1), s(172_801)])
            #expect(coalescing.statistics?.coalescedRuns == 172_799)
            #expect(b.scheduled == [s(1), s(172_799), s(172_800), s(172_801)])
            #expect(bursting.statistics?.missedRuns == 172_797)
            await scheduler.advance(by: s(1))
            #expect(c.scheduled.last == s(172_802) && b.scheduled.last == s(172_802))
        }
    }

    @Test("metrics: the jobs gauge follows schedule and cancel, in_flight follows runs, coalesced and missed runs are counted apart")
    func metrics() async throws {
        let metrics = TestMetrics()
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet,
                                     configuration: .init(randomSeed: 42, metricsLabel: "t", metricsFactory: metrics))
        let dims = [("scheduler", "t")]
        func gauge(_ label: String) throws -> Double? { try metrics.expectGauge(label, dims).lastValue }
        func counter(_ label: String) -> Int64 { metrics.counterTotal(label: label, dimensions: dims) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            let coalescing = try scheduler.schedule(.every(.seconds(1)), options: .init(missedRuns: .coalesce)) { _ in }
            let skipping = try scheduler.schedule(.every(.seconds(1))) { _ in }
            let long = try scheduler.schedule(.once(after: s(20.2))) { _ in try await clock.sleep(for: .seconds(5)) }
            #expect(try gauge("scheduler.jobs") == 3)
            await scheduler.advance(by: s(1.5))
            await scheduler.stall(for: s(10))
            #expect(counter("scheduler.job.coalesced_runs") == 9)
            #expect(counter("scheduler.job.missed_runs") == 10)
            skipping.cancel()
            #expect(try gauge("scheduler.jobs") == 2)
            coalescing.cancel()
            #expect(try gauge("scheduler.jobs") == 1)
            await scheduler.advance(by: s(9))  // 20.5 s: the one-shot job's run is in progress
            #expect(try gauge("scheduler.runs.in_flight") == 1)
            #expect(try gauge("scheduler.jobs") == 0)
            await scheduler.advance(by: .seconds(6))
            #expect(try gauge("scheduler.runs.in_flight") == 0)
            #expect(long.isCancelled)
            await scheduler.shutdown(deadline: .zero)
            try await group.waitForAll()
        }
    }

    @Test("metrics: a job with series of its own (JobOptions.ownMetrics) is counted under job_name=<name>, and not in the shared series")
    func ownSeries() async throws {
        let metrics = TestMetrics()
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet,
                                     configuration: .init(randomSeed: 42, metricsLabel: "j", metricsFactory: metrics))
        let shared = [("scheduler", "j")], sync = [("scheduler", "j"), ("job_name", "sync")], flaky = [("scheduler", "j"), ("job_name", "flaky")]
        func counter(_ label: String, _ dims: [(String, String)]) -> Int64 { metrics.counterTotal(label: label, dimensions: dims) }
        let unnamed = #expect(throws: SchedulerError.self) {
            try scheduler.schedule(.every(.seconds(1)), options: .init(name: "", ownMetrics: true)) { _ in }
        }
        #expect(unnamed?.description.contains("JobOptions.ownMetrics") == true, "\(String(describing: unnamed))")
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            _ = try scheduler.schedule(.every(.seconds(1)), options: .init(name: "sync", missedRuns: .coalesce, ownMetrics: true)) { _ in }
            _ = try scheduler.schedule(.every(.seconds(1)), options: .init(name: "flaky", ownMetrics: true)) { _ in throw CancellationError() }
            _ = try scheduler.schedule(.every(.seconds(1))) { _ in }
            await scheduler.advance(by: s(1.5))
            await scheduler.stall(for: s(10))
            scheduler.drainCompletions()
            #expect(counter("scheduler.job.runs", sync) == 2, "its first run, then the 10 missed folded into one")
            #expect(counter("scheduler.job.coalesced_runs", sync) == 9)
            #expect(counter("scheduler.job.runs", flaky) == 1 && counter("scheduler.job.failures", flaky) == 1)
            #expect(counter("scheduler.job.missed_runs", flaky) == 10)
            #expect(try metrics.expectTimer("scheduler.job.lateness", sync).values.count == 2)
            // The shared series (exactly these dimensions): the third job alone.
            func sharedOnly(_ label: String) throws -> Int64 { try metrics.expectCounter(label, shared).totalValue }
            #expect(try sharedOnly("scheduler.job.runs") == 1)
            #expect(try sharedOnly("scheduler.job.failures") == 0)
            #expect(try sharedOnly("scheduler.job.coalesced_runs") == 0)
            #expect(try sharedOnly("scheduler.job.missed_runs") == 10)
            #expect(try metrics.expectTimer("scheduler.job.lateness", shared).values.count == 1)
            // Summed over every series with scheduler=j (as `sum by (scheduler)`): the statistics' totals.
            let totals = scheduler.statistics
            #expect(totals.runs == 4 && totals.failures == 1 && totals.missedRuns == 20 && totals.coalescedRuns == 9)
            #expect(counter("scheduler.job.runs", shared) == 4 && counter("scheduler.job.failures", shared) == 1)
            #expect(counter("scheduler.job.missed_runs", shared) == 20 && counter("scheduler.job.coalesced_runs", shared) == 9)
            await scheduler.shutdown(deadline: .zero)
            try await group.waitForAll()
        }
    }

    @Test("metrics: cancelling a job whose run waits for a busy worker lowers in_flight at once (it waited for some worker's next end)")
    func inFlightAfterCancellingAQueuedRun() async throws {
        let metrics = TestMetrics()
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet,
                                     configuration: .init(metricsLabel: "q", maxWorkers: 1, metricsFactory: metrics))
        func inFlight() throws -> Double? { try metrics.expectGauge("scheduler.runs.in_flight", [("scheduler", "q")]).lastValue }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            _ = try scheduler.schedule(.once(after: .seconds(1))) { _ in try await clock.sleep(for: .seconds(10)) }
            let queued = try scheduler.schedule(.once(after: .seconds(1))) { _ in }
            await scheduler.advance(by: .seconds(1))
            #expect(scheduler.statistics.inFlight == 2, "one run on the worker, one waiting for it")
            queued.cancel()
            #expect(scheduler.statistics.inFlight == 1)
            #expect(try inFlight() == 1)
            await scheduler.advance(by: .seconds(10))
            await scheduler.shutdown(deadline: .zero)
            try await group.waitForAll()
        }
    }

    @Test("metrics: gauge readings written out of order (a worker's 0, then the driver's older 1) leave the newer one shown")
    func gaugeReadingsInOrder() throws {
        let metrics = TestMetrics()
        let scheduler = JobScheduler(clock: ManualClock(), logger: quiet, configuration: .init(metricsLabel: "o", metricsFactory: metrics))
        let older = JobScheduler<ManualClock>.GaugeReading(number: 1, jobs: 1, inFlight: 1)
        let newer = JobScheduler<ManualClock>.GaugeReading(number: 2, jobs: 0, inFlight: 0)
        scheduler.publishGauges(newer)
        scheduler.publishGauges(older)
        #expect(try metrics.expectGauge("scheduler.runs.in_flight", [("scheduler", "o")]).lastValue == 0)
        #expect(try metrics.expectGauge("scheduler.jobs", [("scheduler", "o")]).lastValue == 0)
        scheduler.publishGauges(JobScheduler<ManualClock>.GaugeReading(number: 3, jobs: 2, inFlight: 1))
        #expect(try metrics.expectGauge("scheduler.runs.in_flight", [("scheduler", "o")]).lastValue == 1)
    }

    @Test("jobs scheduled ever earlier keep one timer task, not one each, and cancelling them leaves at most one")
    func oneTimerForEarlierDeadlines() async throws {
        try await withScheduler { scheduler, _ in
            var handles: [JobHandle] = []
            for i in 0..<100 {
                handles.append(try scheduler.schedule(.once(after: .seconds(Double(1_000 - i)))) { _ in })
                await scheduler.waitUntilIdle()
            }
            #expect(scheduler.liveTasks.timers == 1)
            for h in handles { h.cancel() }
            await scheduler.waitUntilIdle()
            #expect(scheduler.liveTasks.timers <= 1)
        }
    }

    // MARK: - Jitter

    @Test("jitter delays each occurrence within 0...jitter and the grid does not drift")
    func jitterInBounds() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            try scheduler.schedule(.every(.seconds(1)), options: .init(jitter: .milliseconds(200))) { c in r.record(c) }
            await scheduler.advance(by: s(100.5))
            let events = r.all
            #expect(events.count == 100)
            var offsets = Set<Duration>()
            for (i, e) in events.enumerated() {
                let grid = Duration.seconds(i + 1)
                let offset = e.scheduled - grid
                #expect(offset >= .zero && offset <= .milliseconds(200), "run \(i): \(e)")
                #expect(e.start == e.scheduled)
                offsets.insert(offset)
            }
            #expect(offsets.count > 10, "jitter was applied")
        }
    }

    // MARK: - Cancel

    @Test("cancel before the first run: it never runs and leaves the queue")
    func cancelBeforeFirstRun() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1))) { c in r.record(c) }
            #expect(scheduler.isQueued(h))
            h.cancel()
            #expect(!scheduler.isQueued(h))
            #expect(h.isCancelled)
            #expect(h.nextRun == nil)
            await scheduler.advance(by: .seconds(5))
            #expect(r.starts.isEmpty)
        }
    }

    @Test("cancel during a run: the run's task sees cancellation and no further run starts")
    func cancelDuringRun() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1))) { c in
                r.record(c)
                do {
                    try await clock.sleep(for: .seconds(30))
                    r.note("finished")
                } catch is CancellationError {
                    r.note("cancelled: \(Task.isCancelled)")
                }
            }
            await scheduler.advance(by: s(1.5))
            #expect(h.statistics?.inFlight == 1)
            h.cancel()
            await scheduler.waitUntilIdle()
            #expect(r.allNotes == ["cancelled: true"])
            await scheduler.advance(by: .seconds(5))
            #expect(r.starts == [s(1)])
            #expect(scheduler.statistics.inFlight == 0)
        }
    }

    @Test("cancel twice is harmless; cancelAndWait returns once the run has ended")
    func cancelTwiceAndWait() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(1))) { c in
                r.record(c)
                try? await clock.sleep(for: .seconds(30))
                r.note("ended")
            }
            await scheduler.advance(by: s(1.5))
            await h.cancelAndWait()
            #expect(r.allNotes == ["ended"])
            h.cancel()
            h.cancel()
            await h.cancelAndWait()
            #expect(h.isCancelled)
            await scheduler.advance(by: .seconds(3))
            #expect(r.starts == [s(1)])
        }
    }

    @Test("cancelling a one-shot job while its run is in progress cancels the run and stops its retries")
    func cancelRunningOnce() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let retry = RetryPolicy(maxAttempts: 3, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
            let h = try scheduler.schedule(.once(after: .seconds(1)), options: .init(retry: retry)) { c in
                r.record(c)
                do {
                    try await clock.sleep(for: .seconds(30))
                    r.note("slept")
                } catch {
                    r.note("cancelled")
                }
                throw CancellationError()  // a failed attempt: without the cancel it would be retried
            }
            await scheduler.advance(by: s(1.5))
            h.cancel()
            await h.cancelAndWait()
            #expect(r.allNotes == ["cancelled"])
            await scheduler.advance(by: .seconds(10))
            #expect(r.starts == [s(1)])
            #expect(h.isCancelled)
            #expect(scheduler.statistics.jobs == 0)
        }
    }

    @Test("a one-shot job whose first attempt fails is done after its retry: gone from the statistics, its handle cancelled, its body released",
          arguments: [true, false])
    func onceRetryEnds(retrySucceeds: Bool) async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let retry = RetryPolicy(maxAttempts: 2, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
            weak var canary: Canary?
            let h = try { () throws -> JobHandle in
                let captured = Canary()
                canary = captured
                return try scheduler.schedule(.once(after: .seconds(1)), options: .init(retry: retry)) { [captured] c in
                    _ = captured
                    r.record(c)
                    if c.attempt == 1 || !retrySucceeds { throw CancellationError() }
                }
            }()
            await scheduler.advance(by: .seconds(5))
            #expect(r.all.map(\.attempt) == [1, 2])
            #expect(r.starts == [s(1), s(2)])
            #expect(h.isCancelled)
            #expect(h.nextRun == nil)
            #expect(scheduler.statistics.jobs == 0)
            #expect(canary == nil, "the scheduler still holds the job's body")
            await scheduler.advance(by: .seconds(10))
            #expect(r.all.count == 2)
        }
    }

    @Test("more runs due at once than one hand-over holds: every one starts at its time, each with a worker")
    func dueBeyondOneHandOver() async throws {
        try await withScheduler(maxStartsPerWakeup: 2) { scheduler, clock in
            let r = Recorder()
            for _ in 0..<5 {
                try scheduler.schedule(.once(after: .seconds(1))) { c in
                    r.record(c)
                    try? await clock.sleep(for: .seconds(10))
                }
            }
            await scheduler.advance(by: s(1.5))
            // all five are in progress at 1 s, not two now and the rest after 11 s
            #expect(r.starts == [s(1), s(1), s(1), s(1), s(1)])
            #expect(scheduler.statistics.inFlight == 5)
            await scheduler.advance(by: .seconds(10))
            #expect(scheduler.statistics.inFlight == 0)
        }
    }

    @Test("cancel from inside the job's own run")
    func cancelFromInside() async throws {
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            try scheduler.schedule(.every(.seconds(1))) { c in
                r.record(c)
                if c.attempt == 1 && r.starts.count == 3 {
                    c.handle.cancel()
                    await c.handle.cancelAndWait()  // returns: it cannot wait for itself
                    r.note("cancelled inside: \(Task.isCancelled)")
                }
            }
            await scheduler.advance(by: .seconds(10))
            #expect(r.starts == [s(1), s(2), s(3)])
            #expect(r.allNotes == ["cancelled inside: true"])
        }
    }

    @Test("a job scheduled without options runs with the defaults; one with options keeps them")
    func scheduleWithAndWithoutOptions() async throws {
        try await withScheduler { scheduler, _ in
            let plain = try scheduler.schedule(.every(.seconds(1))) { _ in }
            let named = try scheduler.schedule(.every(.seconds(1)), options: JobOptions(name: "sync")) { _ in }
            #expect(scheduler.statistics(for: plain)?.name == "job")
            #expect(scheduler.statistics(for: named)?.name == "sync")
            #expect(throws: SchedulerError.self) { try scheduler.schedule(.every(.zero)) { _ in } }
            // positive, but no whole nanosecond: would be a period of 0 ticks
            let tiny = #expect(throws: SchedulerError.self) { try scheduler.schedule(.every(Duration(attoseconds: 1))) { _ in } }
            #expect(tiny?.message.contains("at least 1 nanosecond (Trigger.every interval)") == true)
            // a bad trigger and bad options: the trigger's error, as before the options had their own check
            let both = #expect(throws: SchedulerError.self) {
                try scheduler.schedule(.every(.zero), options: JobOptions(timeout: .zero)) { _ in }
            }
            #expect(both?.code == .invalidTrigger)
            await scheduler.advance(by: .seconds(2))
            #expect(scheduler.statistics(for: plain)?.runs == 2 && scheduler.statistics(for: named)?.runs == 2)
        }
    }

    @Test("durations too large for the clock mean 'never', not a trap or a run at once")
    func hugeDurations() async throws {
        try await withScheduler { scheduler, _ in
            let huge = Duration.seconds(Int64.max)
            let r = Recorder()
            let once = try scheduler.schedule(.once(after: huge)) { _ in r.note("once") }
            _ = try scheduler.schedule(.every(.seconds(1), firstAfter: huge)) { _ in r.note("every") }
            _ = try scheduler.schedule(.fixedDelay(.seconds(1), initialDelay: huge)) { _ in r.note("delay") }
            _ = try scheduler.schedule(.every(huge, firstAfter: .zero), options: JobOptions(jitter: huge)) { _ in r.note("jittered") }
            _ = try scheduler.schedule(.every(huge, firstAfter: .zero), options: JobOptions(name: "centuries")) { _ in r.note("centuries") }
            await scheduler.advance(by: .seconds(10))
            // the one with no jitter runs at once, then its next run is centuries away
            #expect(r.allNotes == ["centuries"])
            #expect(once.nextRun != nil && !once.isCancelled)
        }
        let policy = RetryPolicy(maxAttempts: 100, initialBackoff: .seconds(1), maxBackoff: .seconds(Int64.max))
        #expect(policy.backoff(afterAttempt: 90) == .nanoseconds(Int64.max))
        #expect(RetryPolicy(initialBackoff: .zero, multiplier: .infinity).backoff(afterAttempt: 3) == .zero)
        #expect(RetryPolicy(initialBackoff: .seconds(1), maxBackoff: .seconds(60), multiplier: .infinity).backoff(afterAttempt: 3) == .seconds(60))
    }

    @Test("after cancelling 10,000 handles the queue holds nothing of them")
    func tenThousandCancels() async throws {
        try await withScheduler { scheduler, _ in
            var handles: [JobHandle] = []
            for i in 0..<10_000 {
                handles.append(try scheduler.schedule(.every(.seconds(Int64(1 + i % 60)))) { _ in })
            }
            #expect(scheduler.statistics.jobs == 10_000)
            #expect(scheduler.statistics.queuedTimers == 10_000)
            for h in handles { h.cancel() }
            let stats = scheduler.statistics
            #expect(stats.jobs == 0)
            #expect(stats.queuedTimers == 0)
            #expect(scheduler.core.withLock { $0.machine.jobTableCapacity } == 0)
            #expect(scheduler.core.withLock { $0.machine.queue.entries.capacity } == 0)
            #expect(handles.allSatisfy { $0.isCancelled && !scheduler.isQueued($0) })
            await scheduler.advance(by: .seconds(61))
            #expect(scheduler.statistics.runs == 0)
        }
    }

    // MARK: - Failures

    @Test("a throwing job keeps running on schedule; failures are counted")
    func throwingKeepsSchedule() async throws {
        struct Boom: Error {}
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(10))) { c in
                r.record(c)
                throw Boom()
            }
            await scheduler.advance(by: .seconds(50))
            #expect(r.starts == [s(10), s(20), s(30), s(40), s(50)])
            #expect(h.statistics?.failures == 5)
            #expect(scheduler.statistics.failures == 5)
        }
    }

    @Test("a throwing job retries with capped exponential backoff, then resumes its schedule")
    func retryWithBackoff() async throws {
        struct Boom: Error {}
        try await withScheduler { scheduler, _ in
            let r = Recorder()
            let retry = RetryPolicy(maxAttempts: 4, initialBackoff: .seconds(1), maxBackoff: .seconds(3), multiplier: 2)
            try scheduler.schedule(.every(.seconds(10)), options: .init(retry: retry)) { c in
                r.record(c)
                throw Boom()
            }
            await scheduler.advance(by: .seconds(27))
            #expect(r.starts == [s(10), s(11), s(13), s(16), s(20), s(21), s(23), s(26)])
            #expect(r.all.map(\.attempt) == [1, 2, 3, 4, 1, 2, 3, 4])
        }
    }

    @Test("a run over its timeout has its task cancelled and counts as a failure")
    func timeout() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(10)), options: .init(timeout: .seconds(2))) { c in
                r.record(c)
                do {
                    try await clock.sleep(for: .seconds(5))
                    r.note("finished")
                } catch {
                    r.note("cancelled at \(clock.now.offset)")
                    throw error
                }
            }
            await scheduler.advance(by: .seconds(15))
            #expect(r.allNotes == ["cancelled at 12.0 seconds"])
            #expect(h.statistics?.failures == 1)
            #expect(scheduler.statistics.timeouts == 1)
        }
    }

    @Test("a run that ignores its timeout's cancellation and returns counts as a timeout, not as a failure, and is not retried")
    func timeoutIgnored() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let retry = RetryPolicy(maxAttempts: 3, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
            let h = try scheduler.schedule(.every(.seconds(10)), options: .init(timeout: .seconds(2), retry: retry)) { c in
                r.record(c)
                try? await clock.sleep(for: .seconds(5))  // swallows the cancellation and returns normally: its work is done
            }
            await scheduler.advance(by: .seconds(15))
            #expect(r.all.map(\.attempt) == [1], "a run that returned was retried")
            #expect(h.statistics?.runs == 1)
            #expect(h.statistics?.failures == 0)
            #expect(scheduler.statistics.timeouts == 1)
        }
    }

    @Test("advance() on the manual clock returns when more runs sleep than maxWorkers allows (the extra ones wait for a worker, i.e. for time)")
    func manualClockWithMoreRunsThanWorkers() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet, configuration: .init(randomSeed: 42, maxWorkers: 2))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            let r = Recorder()
            try scheduler.schedule(.every(.seconds(1)), options: .init(overlap: .concurrent(max: 5))) { c in
                r.record(c)
                try await clock.sleep(for: .seconds(3))
            }
            // Unstructured and bounded: an advance that never returns must fail the test.
            let advanced = Task { await scheduler.advance(by: .seconds(10)) }
            try await pollUntil(seconds: 20) { clock.now.offset >= .seconds(10) }
            #expect(clock.now.offset >= .seconds(10), "advance(by:) hung with 2 workers and up to 5 runs in progress")
            try await pollUntil(seconds: 20) { r.all.count >= 5 }
            #expect(r.all.count >= 5)
            await scheduler.shutdown(deadline: .zero)
            _ = await advanced.value
            try await group.waitForAll()
        }
    }

    @Test("cancelAndWait from the only worker's body, for a job whose run waits for that worker, returns: the run never starts")
    func cancelAndWaitForARunWaitingForAWorker() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet, configuration: .init(randomSeed: 42, maxWorkers: 1))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            let r = Recorder()
            let handles = Mutex<JobHandle?>(nil)
            let waited = Mutex(false)
            let at = clock.now.advanced(by: .seconds(1))
            try scheduler.schedule(.once(at: at), options: .init(name: "a")) { _ in
                r.note("a")
                if let b = handles.withLock({ $0 }) { await b.cancelAndWait() }
                waited.withLock { $0 = true }
            }
            let b = try scheduler.schedule(.once(at: at), options: .init(name: "b")) { _ in r.note("b") }
            handles.withLock { $0 = b }
            // Unstructured and bounded: a run that never returns must fail the test, not hang it.
            let advanced = Task { await scheduler.advance(by: .seconds(2)) }
            try await pollUntil(seconds: 20) { waited.withLock { $0 } }
            #expect(waited.withLock { $0 }, "a's cancelAndWait never returned")
            #expect(r.allNotes == ["a"], "b's run must not start once cancelled")
            #expect(b.isCancelled)
            await scheduler.shutdown(deadline: .zero)
            _ = await advanced.value
            try await group.waitForAll()
        }
    }

    @Test("cancelling the last job ends the armed timer at once: no task sleeps until the cancelled job's time")
    func cancelEndsTheTimer() async throws {
        try await withScheduler { scheduler, clock in
            let h = try scheduler.schedule(.once(after: .seconds(3_600))) { _ in }
            await scheduler.waitUntilIdle()
            #expect(scheduler.liveTasks.timers == 1)
            h.cancel()
            try await pollUntil(seconds: 10) { scheduler.liveTasks.timers == 0 }
            #expect(scheduler.liveTasks.timers == 0)
            #expect(clock.sleeperCount == 0)
        }
    }

    @Test("queueOne with a retry: a regular occurrence queued behind the failed run came first, so the retry is dropped and no regular occurrence is skipped for it")
    func queueOneRetryNeverDisplacesARegularOccurrence() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let retry = RetryPolicy(maxAttempts: 2, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
            // The run due at 10 takes 15 s and fails (the one due at 20 waits in the queue);
            // the one due at 20 takes 12 s and succeeds; the others end at once.
            let handle = try scheduler.schedule(.every(.seconds(10)), options: .init(overlap: .queueOne, retry: retry)) { c in
                r.record(c)
                switch c.scheduledTime.offset {
                case .seconds(10):
                    try await clock.sleep(for: .seconds(15))
                    throw CancellationError()
                case .seconds(20):
                    try await clock.sleep(for: .seconds(12))
                default: break
                }
            }
            await scheduler.advance(by: .seconds(45))
            // Before: the retry, due at 26 while the run due at 20 went on, took the queue's
            // place, the occurrence due at 30 was skipped, and the retry ran at 37 instead.
            #expect(r.scheduled == [.seconds(10), .seconds(20), .seconds(30), .seconds(40)], "\(r.all)")
            #expect(r.all.allSatisfy { $0.attempt == 1 }, "\(r.all)")
            #expect(scheduler.statistics(for: handle)?.skippedOverlaps == 0)
        }
    }

    @Test("queueOne with a retry: every run failing and longer than the period never retries (a regular run always waits) and never goes past attempt 1")
    func queueOneRetryBehindLongRuns() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let retry = RetryPolicy(maxAttempts: 3, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
            try scheduler.schedule(.every(.seconds(10)), options: .init(overlap: .queueOne, retry: retry)) { c in
                r.record(c)
                try await clock.sleep(for: .seconds(15))
                throw CancellationError()
            }
            await scheduler.advance(by: .seconds(100))
            #expect(!r.all.isEmpty)
            #expect(r.all.allSatisfy { $0.attempt == 1 }, "\(r.all)")
        }
    }

    @Test("a run whose timeout passes while it waits for a busy worker counts as a failed, timed-out run")
    func timeoutBeforeStart() async throws {
        let clock = ManualClock()
        let logs = LogRecorder()
        let scheduler = JobScheduler(clock: clock, logger: logs.logger, configuration: .init(randomSeed: 42, maxWorkers: 1))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            let r = Recorder()
            // The one worker stays in "slow" until the test lets it go (real time, not the clock).
            try scheduler.schedule(.once(after: .seconds(5)), options: .init(name: "slow")) { _ in
                r.note("slow started")
                while !r.allNotes.contains("release") { try await Task.sleep(for: .milliseconds(2)) }
            }
            try scheduler.schedule(.once(after: .seconds(10)), options: .init(name: "waiting", timeout: .seconds(5))) { _ in }
            // `advance` waits for idle, which a run queued for a busy worker never is: the clock
            // alone, each step awaited on the state it leads to.
            func pendingTimeout() -> Int64? { scheduler.core.withLock { $0.machine.nextTimeout } }
            try await pollUntil(seconds: 10) { clock.sleeperCount > 0 }
            clock.advance(by: .seconds(5))
            try await pollUntil(seconds: 5) { r.allNotes == ["slow started"] }
            clock.advance(by: .seconds(5))  // 10 s: "waiting" is handed to the workers, its timeout armed
            try await pollUntil(seconds: 5) { pendingTimeout() != nil }
            clock.advance(by: .seconds(5))  // 15 s: its timeout cancels it in the queue
            try await pollUntil(seconds: 5) { pendingTimeout() == nil }
            r.note("release")
            try await pollUntil(seconds: 5) { scheduler.statistics.timeouts > 0 }
            #expect(scheduler.statistics.failures == 1)
            #expect(scheduler.statistics.timeouts == 1)
            #expect(scheduler.statistics.runs == 1)
            #expect(logs.messages.contains { $0.contains("waiting") && $0.contains("maxWorkers") }, "\(logs.messages)")
            await scheduler.shutdown(deadline: .zero)
            try await group.waitForAll()
        }
    }

    @Test("a run's cancellation handler may cancel its own job when the timeout cancels the run (no deadlock)")
    func cancelFromCancellationHandler() async throws {
        try await withScheduler { scheduler, clock in
            let r = Recorder()
            let h = try scheduler.schedule(.every(.seconds(10)), options: .init(timeout: .seconds(2))) { c in
                r.record(c)
                let handle = c.handle
                try await withTaskCancellationHandler {
                    try await clock.sleep(for: .seconds(5))
                } onCancel: {
                    handle.cancel()
                }
            }
            await scheduler.advance(by: .seconds(15))
            #expect(r.starts == [s(10)])
            #expect(h.isCancelled)
            #expect(scheduler.statistics.jobs == 0)
            #expect(scheduler.statistics.timeouts == 1)
        }
    }

    // MARK: - Shutdown

    @Test("shutdown with drain waits for the run in progress; nothing is alive afterwards")
    func shutdownDrain() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet)
        let r = Recorder()
        try scheduler.schedule(.every(.seconds(1)), options: .init(shutdown: .drain)) { c in
            r.record(c)
            do {
                try await clock.sleep(for: .seconds(5))
                r.note("finished at \(clock.now.offset)")
            } catch {
                r.note("cancelled")
            }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            await scheduler.advance(by: s(1.5))
            scheduler.beginShutdown(deadline: .seconds(10))
            #expect(scheduler.statistics.jobs == 0)
            async let report = scheduler.shutdown()
            await scheduler.advance(by: .seconds(5))
            let result = await report
            #expect(result.drainedRuns == 1)
            #expect(result.cutOff.isEmpty)
            #expect(result.duration == .seconds(4.5))
            try await group.waitForAll()
        }
        #expect(r.allNotes == ["finished at 6.0 seconds"])
        let live = scheduler.liveTasks
        #expect(live.timers == 0 && live.runs == 0 && live.finished)
        #expect(clock.sleeperCount == 0)
        clock.advance(by: .seconds(100))
        #expect(r.starts == [s(1)])
        #expect(throws: SchedulerError.self) { try scheduler.schedule(.every(.seconds(1))) { _ in } }
    }

    @Test("a job's body may call shutdown(): it begins the shutdown and returns instead of waiting for its own run forever")
    func shutdownFromInsideAJob() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet)
        let r = Recorder()
        try scheduler.schedule(.once(after: .seconds(1)), options: .init(name: "stopper")) { c in
            r.record(c)
            let report = await scheduler.shutdown(deadline: .seconds(5))
            r.note("shutdown returned, \(report.cutOff.count) cut off, shutting down: \(c.isShuttingDown)")
        }
        try scheduler.schedule(.every(.seconds(3))) { c in r.record(c) }  // due after the shutdown began: never runs
        // Unstructured, so that a hang fails this test instead of stalling the run.
        let running = Task { try await scheduler.run() }
        // The clock alone: `scheduler.advance` waits for the scheduler to be idle, which it
        // is not while the job waits in shutdown().
        try await pollUntil(seconds: 10) { clock.sleeperCount > 0 }  // the driver waits for 1 s
        clock.advance(by: s(1.5))
        try await pollUntil(seconds: 10) { scheduler.liveTasks.finished }
        try #require(scheduler.liveTasks.finished, "run() did not return after a job called shutdown()")
        try await running.value
        #expect(r.allNotes == ["shutdown returned, 0 cut off, shutting down: true"])
        clock.advance(by: .seconds(10))
        #expect(r.scheduled == [s(1)])
        let live = scheduler.liveTasks
        #expect(live.timers == 0 && live.runs == 0 && live.finished)
        // Another caller, after the fact, gets the final report: the stopper's run drained.
        let final = await scheduler.shutdown()
        #expect(final.cutOff.isEmpty)
        #expect(final.drainedRuns == 1)
        #expect(final.jobsRemoved == 1)
    }

    @Test("shutdown() from a task a job's body started waits for the whole shutdown, as any caller does")
    func shutdownFromATaskTheBodyStarted() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet)
        let r = Recorder()
        try scheduler.schedule(.once(after: .seconds(1))) { _ in
            Task {
                _ = await scheduler.shutdown(deadline: .zero)
                r.note("shutdown() returned; run() finished: \(scheduler.liveTasks.finished)")
            }
            try await clock.sleep(for: .seconds(60))  // still inside its run when the task calls shutdown()
        }
        let running = Task { try await scheduler.run() }
        try await pollUntil(seconds: 10) { clock.sleeperCount > 0 }
        clock.advance(by: s(1.5))
        try await pollUntil(seconds: 10) { !r.allNotes.isEmpty }
        #expect(r.allNotes == ["shutdown() returned; run() finished: true"])
        try await running.value
    }

    @Test("shutdown with drain cancels a run still going at the deadline and reports it")
    func shutdownDrainDeadline() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet)
        let r = Recorder()
        try scheduler.schedule(.once(after: .seconds(1)), options: .init(name: "long")) { _ in
            do {
                try await clock.sleep(for: .seconds(60))
                r.note("finished")
            } catch {
                r.note("cancelled at \(clock.now.offset)")
            }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            await scheduler.advance(by: .seconds(1))
            scheduler.beginShutdown(deadline: .seconds(2))
            async let report = scheduler.shutdown()
            await scheduler.advance(by: .seconds(2))
            let result = await report
            #expect(result.cutOff == [.init(jobName: "long", attempt: 1, reason: .deadlineExceeded)])
            #expect(result.drainedRuns == 0)
            try await group.waitForAll()
        }
        #expect(r.allNotes == ["cancelled at 3.0 seconds"])
        #expect(clock.sleeperCount == 0)
    }

    @Test("shutdown with cancel cancels the run at once and reports it")
    func shutdownCancel() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet)
        let r = Recorder()
        try scheduler.schedule(.every(.seconds(1)), options: .init(name: "sync", shutdown: .cancel)) { c in
            r.record(c)
            do {
                try await clock.sleep(for: .seconds(60))
                r.note("finished")
            } catch {
                r.note("cancelled at \(clock.now.offset), shutting down: \(c.isShuttingDown)")
            }
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            await scheduler.advance(by: s(1.5))
            let result = await scheduler.shutdown(deadline: .seconds(30))
            #expect(result.cutOff == [.init(jobName: "sync", attempt: 1, reason: .cancelledByPolicy)])
            try await group.waitForAll()
        }
        #expect(r.allNotes == ["cancelled at 1.5 seconds, shutting down: true"])
        let live = scheduler.liveTasks
        #expect(live.timers == 0 && live.runs == 0 && live.finished)
        #expect(clock.sleeperCount == 0)
        clock.advance(by: .seconds(10))
        #expect(r.starts == [s(1)])
    }

    @Test("cancelling the scheduler's task cancels every run and run() returns")
    func taskCancellation() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: quiet)
        let r = Recorder()
        try scheduler.schedule(.every(.seconds(1))) { _ in
            do { try await clock.sleep(for: .seconds(60)) } catch { r.note("cancelled") }
        }
        let task = Task { try await scheduler.run() }  // root owned by this test
        await scheduler.advance(by: s(1.5))
        task.cancel()
        try await task.value
        #expect(r.allNotes == ["cancelled"])
        #expect(clock.sleeperCount == 0)
        #expect(scheduler.liveTasks.finished)
    }

    // MARK: - Statistics and errors

    @Test("statistics count runs and lateness; invalid options name the knob")
    func statisticsAndErrors() async throws {
        try await withScheduler { scheduler, _ in
            let h = try scheduler.schedule(.every(.seconds(1)), options: .init(name: "tick")) { _ in }
            await scheduler.advance(by: .seconds(3))
            let st = try #require(h.statistics)
            #expect(st.name == "tick" && st.runs == 3 && st.failures == 0)
            #expect(st.lateness.counts[0] == 3)  // on a manual clock runs start exactly on time
            #expect(scheduler.statistics.runs == 3)
            #expect(scheduler.nextRun(of: h) == ManualClock.Instant(offset: .seconds(4)))
            #expect(h.nextRun == .seconds(1))

            for (trigger, options, knob) in [
                (Trigger<ManualClock.Instant>.every(.zero), JobOptions(), "Trigger.every"),
                (.every(.seconds(1)), JobOptions(overlap: .concurrent(max: 0)), "JobOptions.overlap"),
                (.every(.seconds(1)), JobOptions(missedRuns: .burst(max: 0)), "JobOptions.missedRuns"),
                (.every(.seconds(1)), JobOptions(jitter: .seconds(-1)), "JobOptions.jitter"),
                (.every(.seconds(1)), JobOptions(timeout: .zero), "JobOptions.timeout"),
                (.every(.seconds(1)), JobOptions(retry: .init(maxAttempts: 0)), "RetryPolicy.maxAttempts"),
            ] {
                #expect {
                    try scheduler.schedule(trigger, options: options) { _ in }
                } throws: { error in
                    (error as? SchedulerError)?.message.contains(knob) == true
                }
            }
        }
    }
}

/// Polls `condition` every 10 ms of real time, for at most `seconds` (for what the manual
/// clock's `advance` cannot wait for); the caller asserts the outcome.
func pollUntil(seconds: Double, _ condition: () -> Bool) async throws {
    let end = ContinuousClock.now + .seconds(seconds)
    while !condition() && ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(10)) }
}

/// An object captured by a job's body, to see (through a weak reference) when the scheduler lets go of the body.
final class Canary: Sendable {}

/// Keeps every log message with its metadata, for tests of what the scheduler logs.
final class LogRecorder: Sendable {
    let lines = Mutex<[String]>([])

    var messages: [String] { lines.withLock { $0 } }

    var logger: Logger {
        Logger(label: "test") { _ in Handler(recorder: self) }
    }

    struct Handler: LogHandler {
        let recorder: LogRecorder
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let all = metadata.merging(event.metadata ?? [:]) { _, new in new }
            recorder.lines.withLock { $0.append("\(event.message) \(all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))") }
        }
    }
}
