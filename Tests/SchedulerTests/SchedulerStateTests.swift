import Foundation
import Testing

@testable import Scheduler

/// glibc's `malloc_usable_size` (malloc.h is not in the Glibc module): what an allocation holds.
@_silgen_name("malloc_usable_size")
private func mallocUsableSize(_ pointer: UnsafeMutableRawPointer?) -> Int

/// The bookkeeping alone: no tasks, no clock, time passed in as ticks.
@Suite("SchedulerState")
struct SchedulerStateTests {
    typealias State = SchedulerState<ManualClock.Instant>
    static let second: Int64 = 1_000_000_000
    static let wall = Date(timeIntervalSince1970: 0)

    static func add(_ state: inout State, _ trigger: Trigger<ManualClock.Instant>, _ options: JobOptions = JobOptions(), at now: Int64 = 0, first: Int64) throws -> JobID {
        let (t, o) = try State.validate(trigger, options)
        return try state.schedule(name: options.name, trigger: t, options: o, body: { _ in }, firstGrid: first, firstDue: first)
    }

    @Test("a fixed-rate job fires once per period and is requeued on its grid")
    func fixedRate() throws {
        var state = State(seed: 1)
        let id = try Self.add(&state, .every(.seconds(1)), first: Self.second)
        #expect(state.advance(now: Self.second - 1, wall: Self.wall).starts.isEmpty)
        let due = state.advance(now: Self.second + 5, wall: Self.wall)
        #expect(due.starts.count == 1)
        #expect(due.starts[0].scheduled == Self.second)
        #expect(state.nextDue(id) == 2 * Self.second)
        state.finish(due.starts[0], outcome: .success, lateness: 5, now: Self.second + 10)
        #expect(state.statistics.runs == 1)
        #expect(state.inFlight == 0)
    }

    @Test("a job's own counts (32 bits) stop at their largest value instead of wrapping to a few, while the totals (64 bits) count on")
    func perJobCountsSaturate() throws {
        var state = State(seed: 1)
        let id = try Self.add(&state, .every(.nanoseconds(1)), first: 1)
        let first = state.advance(now: 1, wall: Self.wall).starts
        try #require(first.count == 1)
        state.finish(first[0], outcome: .success, lateness: 0, now: 1)
        // Five seconds of a 1 ns period missed at once (missed runs `.skip`).
        _ = state.advance(now: 5_000_000_001, wall: Self.wall)
        let total = state.statistics.missedRuns
        #expect(total >= 5_000_000_000)
        // Before: 5,000,000,000 wrapped to 705,032,704.
        #expect(state.statistics(of: id)?.missedRuns == UInt64(UInt32.max))
    }

    @Test("the shutdown report lists as cut off only runs that started: a queued run made ready by its predecessor's end, not yet taken by a worker, never starts and is not listed")
    func shutdownCutOffListsOnlyStartedRuns() throws {
        var state = State(seed: 1)
        _ = try Self.add(&state, .every(.seconds(1)), JobOptions(overlap: .queueOne, shutdown: .cancel), first: Self.second)
        let first = state.advance(now: Self.second, wall: Self.wall).starts
        try #require(first.count == 1)
        #expect(state.advance(now: 2 * Self.second, wall: Self.wall).starts.isEmpty)   // queued behind it
        state.finish(first[0], outcome: .success, lateness: 0, now: 2 * Self.second + 1)
        #expect(state.inFlight == 1, "the queued run is ready")
        let (cancels, _) = state.beginShutdown(deadline: 5 * Self.second)
        #expect(cancels.isEmpty)
        #expect(state.cutOff.isEmpty, "\(state.cutOff)")
        #expect(state.inFlight == 0)
    }

    @Test("skip overlap: a due occurrence while in flight is counted, not started")
    func skipOverlap() throws {
        var state = State(seed: 1)
        _ = try Self.add(&state, .every(.seconds(1)), first: Self.second)
        let first = state.advance(now: Self.second, wall: Self.wall)
        let second = state.advance(now: 2 * Self.second, wall: Self.wall)
        #expect(first.starts.count == 1 && second.starts.isEmpty)
        #expect(state.statistics.skippedOverlaps == 1)
    }

    @Test("cancel drops a run made ready by the previous run's end (queueOne, burst): it never starts and nothing stays in flight")
    func cancelDropsReadyRuns() throws {
        // queueOne: an occurrence due while the first run is in progress is queued; burst: the
        // first advance comes two periods late, and two of the three occurrences are held.
        for (options, firstAdvance) in [(JobOptions(overlap: .queueOne), Self.second), (JobOptions(missedRuns: .burst(max: 3)), 3 * Self.second)] {
            var state = State(seed: 1)
            let id = try Self.add(&state, .every(.seconds(1)), options, first: Self.second)
            let first = state.advance(now: firstAdvance, wall: Self.wall).starts
            #expect(first.count == 1)
            #expect(state.advance(now: firstAdvance + Self.second, wall: Self.wall).starts.isEmpty)
            // Its end makes the next run ready; no worker has taken it yet when the job is cancelled.
            state.finish(first[0], outcome: .success, lateness: 0, now: firstAdvance + Self.second + 1)
            #expect(state.inFlight == 1, "\(options.overlap) \(options.missedRuns): no run was made ready")
            #expect(state.cancel(id) != nil)
            #expect(state.inFlight == 0, "\(options.overlap) \(options.missedRuns)")
            #expect(state.advance(now: firstAdvance + Self.second + 2, wall: Self.wall).starts.isEmpty)
            #expect(state.isGone(id) && state.liveJobs == 0)
            #expect(state.statistics.runs == 1)
            // The slot is free and reused cleanly.
            _ = try Self.add(&state, .every(.seconds(1)), first: 10 * Self.second)
            #expect(state.advance(now: 10 * Self.second, wall: Self.wall).starts.count == 1)
        }
    }

    @Test("after a stall past both a pending retry and the next regular occurrence, the regular run takes over at attempt 1 under the missed-run policy")
    func stalledRetryYieldsToRegularRun() throws {
        var state = State(seed: 1)
        let options = JobOptions(missedRuns: .coalesce, retry: RetryPolicy(maxAttempts: 3, initialBackoff: .seconds(10)))
        _ = try Self.add(&state, .every(.seconds(60)), options, first: 0)
        let first = state.advance(now: 0, wall: Self.wall).starts
        #expect(first.count == 1)
        state.finish(first[0], outcome: .failure, lateness: 0, now: Self.second)  // retry due at 11 s
        // The process stalls until 200 s: the retry (11 s) and the occurrences at 60, 120, 180 s passed.
        let due = state.advance(now: 200 * Self.second, wall: Self.wall).starts
        #expect(due.count == 1)
        #expect(due.first?.attempt == 1)
        #expect(due.first?.scheduled == 180 * Self.second)
        let statistics = state.statistics
        #expect(statistics.skippedOverlaps == 0)
        #expect(statistics.coalescedRuns == 2)
    }

    @Test("a job's record stays 136 bytes and its options 15 (memory per scheduled job, docs/BENCHMARKS.md)")
    func recordLayout() {
        #expect(MemoryLayout<State.Job>.stride <= 136)
        #expect(MemoryLayout<State.CompactOptions>.size <= 15)
        // The job's box (body, name, and since ownMetrics its series) takes the same 64-byte
        // malloc chunk it took without the series: no byte more per job.
        let box = State.JobBox(body: { _ in }, name: "job", series: nil)
        let usable = withExtendedLifetime(box) { mallocUsableSize(Unmanaged.passUnretained(box).toOpaque()) }
        #expect(usable <= 56, "the job box's allocation holds \(usable) usable bytes")
    }

    @Test("Duration.nanoseconds equals the 128-bit division it replaces, truncating and saturating")
    func nanosecondsConversion() {
        func reference(_ d: Duration) -> Int64 { Int64(clamping: d.attoseconds / 1_000_000_000) }
        var edges: [Duration] = [
            .zero, .nanoseconds(1), .nanoseconds(-1), .seconds(3600), .seconds(-3600),
            Duration(attoseconds: 999_999_999), Duration(attoseconds: -999_999_999),
            Duration(attoseconds: 1_000_000_000), Duration(attoseconds: -1_000_000_001),
            .nanoseconds(Int64.max), .nanoseconds(Int64.min),
            Duration(attoseconds: Int128(Int64.max) * 1_000_000_000 + 999_999_999),
            Duration(attoseconds: Int128(Int64.max) * 1_000_000_000 + 1_000_000_000),
            Duration(attoseconds: Int128(Int64.min) * 1_000_000_000 - 1_000_000_000),
            Duration(attoseconds: Int128(UInt64.max)), Duration(attoseconds: Int128(UInt64.max) + 1),
            Duration(attoseconds: -Int128(UInt64.max) - 1),
            Duration(attoseconds: Int128(1_000_000_000) << 64), Duration(attoseconds: (Int128(1_000_000_000) << 64) - 1),
            Duration(attoseconds: .max), Duration(attoseconds: .min + 1),
        ]
        var rng = SplitMix64(state: 42)
        for _ in 0..<20_000 {
            let hi = Int64(bitPattern: rng.next()) >> Int64(rng.next() % 64)
            edges.append(Duration(attoseconds: Int128(hi) << 64 | Int128(rng.next())))
        }
        for d in edges { #expect(d.nanoseconds == reference(d), "\(d.attoseconds)") }
    }

    @Test("scheduling without options uses exactly what JobOptions() validates to")
    func defaultOptions() throws {
        let validated = try State.validate(JobOptions())
        let preset = State.defaultOptions
        #expect(preset.extras == nil && validated.extras == nil)
        #expect(preset.overlapKind == validated.overlapKind && preset.overlapMax == validated.overlapMax)
        #expect(preset.missedKind == validated.missedKind && preset.missedMax == validated.missedMax)
        #expect(preset.cancelOnShutdown == validated.cancelOnShutdown)
        #expect(JobOptions().name == JobOptions.defaultName)
    }

    @Test("jitter, timeout and retry are boxed only when one is set")
    func optionExtras() throws {
        let plain = try State.validate(.every(.seconds(1)), JobOptions())
        #expect(plain.1.extras == nil && plain.1.jitter == 0 && plain.1.timeout == 0 && plain.1.retry == nil)
        let retry = RetryPolicy(maxAttempts: 3, initialBackoff: .milliseconds(10), maxBackoff: .seconds(1))
        let tiny = #expect(throws: SchedulerError.self) { try State.validate(.every(.seconds(1)), JobOptions(timeout: Duration(attoseconds: 999_999_999))) }
        #expect(tiny?.message.contains("at least 1 nanosecond (JobOptions.timeout)") == true)
        let full = try State.validate(.every(.seconds(1)), JobOptions(jitter: .milliseconds(5), timeout: .seconds(2), retry: retry))
        #expect(full.1.jitter == 5_000_000 && full.1.timeout == 2_000_000_000 && full.1.retry?.maxAttempts == 3)
    }

    @Test("cancel removes the queue entry at once and returns the running run's control")
    func cancel() throws {
        var state = State(seed: 1)
        let id = try Self.add(&state, .every(.seconds(1)), first: Self.second)
        let other = try Self.add(&state, .every(.seconds(1)), first: 10 * Self.second)
        let run = state.advance(now: Self.second, wall: Self.wall).starts[0]
        let cancelled = state.cancel(id)
        let controls = try #require(cancelled)
        #expect(controls.count == 1 && controls[0].control === run.control && controls[0].serial == run.runSerial)
        #expect(!state.isQueued(id) && state.isGone(id))
        #expect(state.cancel(id) == nil)  // idempotent
        #expect(state.queue.count == 1)
        _ = state.cancel(other)
        state.finish(run, outcome: .cancelled, lateness: 0, now: Self.second)
        #expect(state.queue.isEmpty && state.jobTableCapacity == 0)
    }

    @Test("tables given back at a cancel-all regrow to their last size in one step")
    func regrowAfterCancelAll() throws {
        var state = State(seed: 1)
        let ids = try (0..<1_000).map { try Self.add(&state, .every(.seconds(1)), first: Self.second + Int64($0)) }
        for id in ids { _ = state.cancel(id) }
        #expect(state.jobTableCapacity == 0 && state.jobTableReserved == 0 && state.queue.entries.capacity == 0)
        let again = try Self.add(&state, .every(.seconds(1)), first: Self.second)
        #expect(state.jobTableReserved >= 1_000 && state.queue.entries.capacity >= 1_000)
        // only once: a later emptying of a small table does not keep the large size
        _ = state.cancel(again)
        _ = try Self.add(&state, .every(.seconds(1)), first: Self.second)
        #expect(state.jobTableReserved < 1_000)
    }

    @Test("a one-shot job cancelled while a retry attempt runs is not revived when that attempt fails")
    func cancelOnceDuringRetry() throws {
        var state = State(seed: 1)
        let retry = RetryPolicy(maxAttempts: 3, initialBackoff: .seconds(1), maxBackoff: .seconds(1))
        let id = try Self.add(&state, .once(after: .seconds(1)), JobOptions(retry: retry), first: Self.second)
        let first = state.advance(now: Self.second, wall: Self.wall).starts[0]
        state.finish(first, outcome: .failure, lateness: 0, now: Self.second + 1)
        #expect(state.nextDue(id) == 2 * Self.second + 1)  // attempt 2 after 1 s
        let second = state.advance(now: 3 * Self.second, wall: Self.wall).starts[0]
        #expect(second.attempt == 2)
        // the run is in progress: cancel reaches it
        let cancelled = state.cancel(id)
        let cancels = try #require(cancelled)
        #expect(cancels.count == 1 && cancels[0].serial == second.runSerial)
        let again = state.cancel(id)
        #expect(again == nil)
        // its body had already failed on its own before the cancel: the
        // worker reports no cancel reason, and still no third attempt follows
        state.finish(RunCompletion(
            runSlot: second.runSlot, runSerial: second.runSerial, attempt: 2, outcome: .failure, reason: nil,
            lateness: 0, end: 3 * Self.second + 1))
        #expect(state.isGone(id) && !state.isQueued(id))
        #expect(state.queue.isEmpty && state.inFlight == 0 && state.jobTableCapacity == 0)
    }

    @Test("burst and coalesce after a stall decide from the overdue count")
    func missed() throws {
        var state = State(seed: 1)
        let a = try Self.add(&state, .every(.seconds(1)), JobOptions(missedRuns: .coalesce), first: Self.second)
        let b = try Self.add(&state, .every(.seconds(1)), JobOptions(missedRuns: .burst(max: 2)), first: Self.second)
        let due = state.advance(now: 10 * Self.second + 1, wall: Self.wall)  // occurrences 1...10
        #expect(due.starts.count == 2)
        #expect(state.statistics(of: a)?.coalescedRuns == 9)
        #expect(state.statistics(of: b)?.missedRuns == 8)
        let burstRun = due.starts.first { $0.job == b }!
        #expect(burstRun.scheduled == 9 * Self.second)
        state.finish(burstRun, outcome: .success, lateness: 0, now: 10 * Self.second + 2)
        let next = state.advance(now: 10 * Self.second + 2, wall: Self.wall)
        #expect(next.starts.map(\.scheduled) == [10 * Self.second])
    }

    @Test("shutdown removes every job and cancels only .cancel runs; the deadline cuts off the rest")
    func shutdown() throws {
        var state = State(seed: 1)
        _ = try Self.add(&state, .every(.seconds(1)), JobOptions(name: "drain"), first: Self.second)
        _ = try Self.add(&state, .every(.seconds(1)), JobOptions(name: "cancel", shutdown: .cancel), first: Self.second)
        let runs = state.advance(now: Self.second, wall: Self.wall).starts
        let (cancels, draining) = state.beginShutdown(deadline: 5 * Self.second)
        #expect(cancels.count == 1 && cancels[0].1 == .shutdownPolicy)
        #expect(draining.count == 1)  // the .drain job's run: kept from starting if it has not
        #expect(state.queue.isEmpty && state.liveJobs == 0)
        #expect(state.nextDeadline == 5 * Self.second)
        let late = state.advance(now: 5 * Self.second, wall: Self.wall)
        #expect(late.starts.isEmpty && late.cancels.count == 1 && late.cancels[0].1 == .shutdownDeadline)
        for r in runs { state.finish(r, outcome: .cancelled, lateness: 0, now: 5 * Self.second) }
        #expect(state.isDrained)
        #expect(state.cutOff.map(\.reason) == [.cancelledByPolicy, .deadlineExceeded])
        #expect(throws: SchedulerError.self) { try Self.add(&state, .every(.seconds(1)), first: 0) }
    }

    @Test("a run slot's control is reused: a late cancel of an older run never reaches the newer one")
    func controlReuse() async {
        let control = RunControl()
        // in a task of its own: the last step cancels the "worker" task
        await Task {
            withUnsafeCurrentTask { task in
                guard let task else {
                    Issue.record("no current task")
                    return
                }
                let worker = WorkerTask(task)
                // run 1 in this slot is cancelled before it starts
                control.cancel(serial: 1, .jobCancelled)
                #expect(control.install(worker, serial: 1))
                #expect(control.reason(serial: 1) == .jobCancelled)
                // run 2 reuses the slot: not cancelled by run 1's request
                #expect(!control.install(worker, serial: 2))
                control.cancel(serial: 1, .timeout)  // stale: older than the slot's newest run
                #expect(!task.isCancelled)
                #expect(control.reason(serial: 2) == nil)
                #expect(control.uninstall(serial: 2) == nil)
                // run 3 is cancelled before its worker installs: the first reason wins
                control.cancel(serial: 3, .shutdownPolicy)
                control.cancel(serial: 3, .timeout)
                #expect(control.install(worker, serial: 3))
                #expect(control.reason(serial: 3) == .shutdownPolicy)
                #expect(!task.isCancelled)
                // run 4 runs and is cancelled: its task is cancelled, and a stale
                // request for run 3 afterwards does not replace run 4's reason
                #expect(!control.install(worker, serial: 4))
                control.cancel(serial: 4, .timeout)
                #expect(task.isCancelled)
                control.cancel(serial: 3, .jobCancelled)
                #expect(control.uninstall(serial: 4) == .timeout)
            }
        }.value
    }
}
