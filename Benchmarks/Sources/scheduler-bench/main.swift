// scheduler-bench: JobScheduler against a naive baseline (one Task per job
// looping over an AsyncTimerSequence), in the same process run.
//
//   scheduler-bench lateness [ours|naive|all] [--quick]
//   scheduler-bench cost     [ours|naive|all]
//   scheduler-bench rss      ours|naive            (one implementation per process)
//
// Every figure is printed as one `RESULT key=value ...` line; the script
// Benchmarks/scripts/scheduler-bench.sh collects them next to the Java peer's.
import AsyncAlgorithms
import Foundation
import Logging
import Scheduler
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

let quietLogger = Logger(label: "bench", factory: { _ in SwiftLogNoOpLogHandler() })
let clock = ContinuousClock()

/// Whole nanoseconds (one 128-bit division; `components` costs two and is
/// slower, inside the measured body, than the Java peer's `long` arithmetic).
@inline(__always)
func ns(_ d: Duration) -> Int64 { Int64(truncatingIfNeeded: d.attoseconds / 1_000_000_000) }

func rssBytes() -> Int {
    guard let text = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let fields = text.split(separator: " ")
    return (Int(fields[1]) ?? 0) * Int(sysconf(Int32(_SC_PAGESIZE)))
}

/// Lateness samples of fires whose scheduled time falls inside the window.
///
/// Recording is what Java's peer does: one atomic fetch-add for a slot in a
/// preallocated buffer, no lock (a shared `Mutex` here made the two workers
/// contend inside the measured body, a cost the Java body does not have).
final class Samples: @unchecked Sendable {
    // Each slot is written once, by the fire that took its index; read after the run.
    private let values: UnsafeMutableBufferPointer<Int64>
    /// Per sample: which period of the window its scheduled time lies in.
    private let periods: UnsafeMutableBufferPointer<Int32>
    private let count = Atomic<Int>(0)
    let windowStart: ContinuousClock.Instant
    let windowEnd: ContinuousClock.Instant
    private let periodNs: Int64

    init(capacity: Int, windowStart: ContinuousClock.Instant, windowEnd: ContinuousClock.Instant, period: Duration) {
        values = .allocate(capacity: capacity)
        values.initialize(repeating: 0)
        periods = .allocate(capacity: capacity)
        periods.initialize(repeating: 0)
        self.windowStart = windowStart
        self.windowEnd = windowEnd
        periodNs = ns(period)
    }

    deinit {
        values.deallocate()
        periods.deallocate()
    }

    @inline(__always)
    func record(scheduled: ContinuousClock.Instant, now: ContinuousClock.Instant) {
        guard scheduled >= windowStart && scheduled < windowEnd else { return }
        let late = ns(scheduled.duration(to: now))
        let i = count.wrappingAdd(1, ordering: .relaxed).oldValue
        if i < values.count {
            values[i] = late
            periods[i] = Int32(ns(windowStart.duration(to: scheduled)) / periodNs)
        }
    }

    func report(impl: String, scenario: String, expected: Int) {
        let n = count.load(ordering: .acquiring)
        // The median over periods of each period's latest fire: one slow
        // period (a preemption) moves the overall p99 a lot, this hardly.
        var latest: [Int32: Int64] = [:]
        for i in 0..<min(n, values.count) { latest[periods[i], default: 0] = max(latest[periods[i], default: 0], values[i]) }
        let spans = latest.values.sorted()
        let medianLatest = spans.isEmpty ? Double.nan : Double(spans[spans.count / 2]) / 1000
        var v = Array(values.prefix(min(n, values.count)))
        v.sort()
        func pct(_ p: Double) -> Double {
            guard !v.isEmpty else { return .nan }
            return Double(v[min(v.count - 1, Int(Double(v.count) * p))]) / 1000
        }
        print(String(
            format: "RESULT impl=%@ scenario=%@ p50_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f min_us=%.1f period_max_median_us=%.1f fires=%d expected=%d",
            impl, scenario, pct(0.5), pct(0.99), pct(0.999), v.isEmpty ? .nan : Double(v.last!) / 1000,
            v.isEmpty ? .nan : Double(v[0]) / 1000, medianLatest, n, expected))
    }
}

struct Scenario {
    var name: String
    var jobs: Int
    var period: Duration
    var aligned: Bool
    var periods: Int
}

func scenarios(quick: Bool) -> [Scenario] {
    [
        Scenario(name: "spread-100k-1s", jobs: 100_000, period: .seconds(1), aligned: false, periods: quick ? 2 : 4),
        Scenario(name: "spread-10k-100ms", jobs: 10_000, period: .milliseconds(100), aligned: false, periods: quick ? 10 : 30),
        Scenario(name: "aligned-100k-1s", jobs: 100_000, period: .seconds(1), aligned: true, periods: quick ? 2 : 4),
        Scenario(name: "aligned-10k-100ms", jobs: 10_000, period: .milliseconds(100), aligned: true, periods: quick ? 10 : 30),
    ]
}

// MARK: - Lateness

func latenessOurs(_ s: Scenario) async throws {
    var config = JobScheduler<ContinuousClock>.Configuration()
    // SCHEDULER_BENCH_WORKERS=1 measures one worker's cost per run, without
    // the kernel's placement of the second worker's thread in the figure
    if let v = ProcessInfo.processInfo.environment["SCHEDULER_BENCH_WORKERS"].flatMap(Int.init) { config.maxWorkers = v }
    // SCHEDULER_BENCH_THREADS=n runs the scheduler on n threads of its own
    // (Configuration.threads; default 0, Swift's global executor), for side-by-side runs.
    if let v = ProcessInfo.processInfo.environment["SCHEDULER_BENCH_THREADS"].flatMap(Int.init) { config.threads = v }
    let scheduler = JobScheduler(logger: quietLogger, configuration: config)
    let setup = Duration.milliseconds(s.jobs >= 100_000 ? 700 : 300)
    let base = clock.now.advanced(by: setup)
    // the first period is warm-up; measure the next `periods`
    let windowStart = base.advanced(by: s.period)
    let windowEnd = windowStart.advanced(by: s.period * s.periods)
    let samples = Samples(capacity: s.jobs * s.periods + 16, windowStart: windowStart, windowEnd: windowEnd, period: s.period)
    let body: JobScheduler<ContinuousClock>.Body = { ctx in
        samples.record(scheduled: ctx.scheduledTime, now: clock.now)
    }
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await scheduler.run() }
        let step = s.period / s.jobs
        for i in 0..<s.jobs {
            let first = s.aligned ? base : base.advanced(by: step * i)
            try scheduler.schedule(.every(s.period, startingAt: first), body)
        }
        if clock.now > base { print("WARN ours \(s.name): setup overran the first fire by \(base.duration(to: clock.now))") }
        try await clock.sleep(until: windowEnd.advanced(by: s.period / 2 + .milliseconds(200)))
        let stats = scheduler.statistics
        await scheduler.shutdown(deadline: .seconds(1))
        try await group.waitForAll()
        print("INFO ours \(s.name): runs=\(stats.runs) skippedOverlaps=\(stats.skippedOverlaps) missed=\(stats.missedRuns) failures=\(stats.failures)")
    }
    samples.report(impl: "ours", scenario: s.name, expected: s.jobs * s.periods)
}

func latenessNaive(_ s: Scenario) async throws {
    let setup = Duration.milliseconds(s.jobs >= 100_000 ? 1500 : 300)
    let base = clock.now.advanced(by: setup)
    let windowStart = base.advanced(by: s.period)
    let windowEnd = windowStart.advanced(by: s.period * s.periods)
    let samples = Samples(capacity: s.jobs * s.periods + 16, windowStart: windowStart, windowEnd: windowEnd, period: s.period)
    let stopAt = windowEnd.advanced(by: s.period / 2)
    var tasks: [Task<Void, Never>] = []
    tasks.reserveCapacity(s.jobs)
    let step = s.period / s.jobs
    for i in 0..<s.jobs {
        let first = s.aligned ? base : base.advanced(by: step * i)
        let period = s.period
        // The naive design under test: one Task per job sleeping on its own timer.
        tasks.append(Task {
            do { try await clock.sleep(until: first) } catch { return }
            samples.record(scheduled: first, now: clock.now)
            var k = 0
            for await now in AsyncTimerSequence(interval: period, clock: clock) {
                k += 1
                let scheduled = first.advanced(by: period * k)
                samples.record(scheduled: scheduled, now: now)
                if scheduled >= stopAt { break }
            }
        })
    }
    if clock.now > base { print("WARN naive \(s.name): setup overran the first fire by \(base.duration(to: clock.now))") }
    try await clock.sleep(until: windowEnd.advanced(by: s.period / 2 + .milliseconds(200)))
    for t in tasks { t.cancel() }
    for t in tasks { await t.value }
    samples.report(impl: "naive", scenario: s.name, expected: s.jobs * s.periods)
}

// MARK: - Schedule / cancel cost

func costOurs(n: Int, rounds: Int) async throws {
    let scheduler = JobScheduler(logger: quietLogger)
    let body: JobScheduler<ContinuousClock>.Body = { _ in }
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await scheduler.run() }
        var handles: [JobHandle] = []
        handles.reserveCapacity(n)
        // The arguments are computed before the clock starts, as the Java peer does.
        // `schedule_ns` is the call that matches Java's scheduleAtFixedRate(delay): a delay
        // from now, so both read the clock once per call. `schedule_at_ns` gives the first
        // instant instead (no clock read; Java's executor has no such call).
        let delays = (0..<n).map { Duration.seconds(3600) + .microseconds($0) }
        var best = (schedule: Int64.max, scheduleAt: Int64.max, cancel: Int64.max)
        func cancelAll() -> Int64 {
            let t0 = clock.now
            for h in handles { h.cancel() }
            let t1 = clock.now
            precondition(scheduler.statistics.queuedTimers == 0)
            handles.removeAll(keepingCapacity: true)
            return ns(t0.duration(to: t1))
        }
        for round in 0..<rounds {
            let t0 = clock.now
            for i in 0..<n {
                handles.append(try scheduler.schedule(.every(.seconds(1), firstAfter: delays[i]), body))
            }
            let sch = ns(t0.duration(to: clock.now))
            let can = cancelAll()
            // `Instant` arithmetic (a resilient type, 14 ns a step here) is the caller's
            // cost, not the scheduler's: the instants are computed before the clock starts.
            let far = clock.now.advanced(by: .seconds(3600))
            let starts = (0..<n).map { far.advanced(by: .microseconds($0)) }
            let t1 = clock.now
            for i in 0..<n {
                handles.append(try scheduler.schedule(.every(.seconds(1), startingAt: starts[i]), body))
            }
            let at = ns(t1.duration(to: clock.now))
            _ = cancelAll()
            if round > 0 { best = (min(best.schedule, sch), min(best.scheduleAt, at), min(best.cancel, can)) }  // round 0 warms up
        }
        print(String(format: "RESULT impl=ours metric=schedule_ns value=%.1f", Double(best.schedule) / Double(n)))
        print(String(format: "RESULT impl=ours metric=schedule_at_ns value=%.1f", Double(best.scheduleAt) / Double(n)))
        print(String(format: "RESULT impl=ours metric=cancel_ns value=%.1f", Double(best.cancel) / Double(n)))
        print(String(format: "RESULT impl=ours metric=cancel_all_ms value=%.2f", Double(best.cancel) / 1e6))
        await scheduler.shutdown(deadline: .zero)
        try await group.waitForAll()
    }
}

func costNaive(n: Int, rounds: Int) async {
    var best = (schedule: Int64.max, cancel: Int64.max, drained: Int64.max)
    for round in 0..<rounds {
        var tasks: [Task<Void, Never>] = []
        tasks.reserveCapacity(n)
        let far = clock.now.advanced(by: .seconds(3600))
        let t0 = clock.now
        for _ in 0..<n {
            tasks.append(Task {
                do { try await clock.sleep(until: far) } catch { return }
                for await _ in AsyncTimerSequence(interval: .seconds(1), clock: clock) {}
            })
        }
        let t1 = clock.now
        for t in tasks { t.cancel() }
        let t2 = clock.now
        for t in tasks { await t.value }
        let t3 = clock.now
        if round > 0 {
            best = (min(best.schedule, ns(t0.duration(to: t1))), min(best.cancel, ns(t1.duration(to: t2))), min(best.drained, ns(t1.duration(to: t3))))
        }
    }
    print(String(format: "RESULT impl=naive metric=schedule_ns value=%.1f", Double(best.schedule) / Double(n)))
    print(String(format: "RESULT impl=naive metric=cancel_ns value=%.1f", Double(best.cancel) / Double(n)))
    print(String(format: "RESULT impl=naive metric=cancel_all_ms value=%.2f", Double(best.cancel) / 1e6))
    print(String(format: "INFO naive cancel 100k until every task has ended: %.2f ms", Double(best.drained) / 1e6))
}

// MARK: - Memory

func rss(_ impl: String, n: Int) async throws {
    let body: JobScheduler<ContinuousClock>.Body = { _ in }
    if impl == "ours" {
        let scheduler = JobScheduler(logger: quietLogger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            // warm the allocator and the tables' growth path once
            var warm: [JobHandle] = []
            for _ in 0..<1000 { warm.append(try scheduler.schedule(.every(.seconds(3600)), body)) }
            for h in warm { h.cancel() }
            var handles: [JobHandle] = []
            handles.reserveCapacity(n)
            let before = rssBytes()
            for i in 0..<n {
                handles.append(try scheduler.schedule(.every(.seconds(1), startingAt: clock.now.advanced(by: .seconds(3600) + .microseconds(i))), body))
            }
            let after = rssBytes()
            // the handles array itself is the caller's: 24 bytes per handle
            let handleBytes = n * MemoryLayout<JobHandle>.stride
            // The bar's figure is the issue's: RSS delta / jobs, the caller's handle array included.
            print(String(format: "RESULT impl=ours metric=rss_bytes_per_job value=%.1f", Double(after - before) / Double(n)))
            print(String(format: "INFO ours rss delta %d bytes for %d jobs, of which %d the caller's handle array (%.1f bytes per job without it)",
                         after - before, n, handleBytes, Double(after - before - handleBytes) / Double(n)))
            for h in handles { h.cancel() }
            let freed = rssBytes()
            print("INFO ours rss after cancelling all: \(freed - before) bytes above baseline")
            await scheduler.shutdown(deadline: .zero)
            try await group.waitForAll()
        }
    } else {
        var tasks: [Task<Void, Never>] = []
        tasks.reserveCapacity(n)
        let before = rssBytes()
        let far = clock.now.advanced(by: .seconds(3600))
        for _ in 0..<n {
            tasks.append(Task {
                do { try await clock.sleep(until: far) } catch { return }
                for await _ in AsyncTimerSequence(interval: .seconds(1), clock: clock) {}
            })
        }
        try await clock.sleep(for: .milliseconds(500))  // let every task reach its sleep
        let after = rssBytes()
        let handleBytes = n * MemoryLayout<Task<Void, Never>>.stride
        print(String(format: "RESULT impl=naive metric=rss_bytes_per_job value=%.1f", Double(after - before - handleBytes) / Double(n)))
        for t in tasks { t.cancel() }
        for t in tasks { await t.value }
    }
}

// MARK: - main

let args = CommandLine.arguments.dropFirst()
let mode = args.first ?? "all"
let implArg = args.dropFirst().first { !$0.hasPrefix("--") } ?? "all"
let quick = args.contains("--quick")
let impls = implArg == "all" ? ["ours", "naive"] : [implArg]

switch mode {
case "lateness", "all":
    // SCHEDULER_BENCH_SCENARIO=<name>[,<name>...] runs those scenarios only (for profiling)
    let only = ProcessInfo.processInfo.environment["SCHEDULER_BENCH_SCENARIO"].map { $0.split(separator: ",").map(String.init) }
    for s in scenarios(quick: quick) where only == nil || only!.contains(s.name) {
        for impl in impls {
            if impl == "ours" { try await latenessOurs(s) } else { try await latenessNaive(s) }
        }
    }
    if mode == "all" { fallthrough }
case "cost":
    // SCHEDULER_BENCH_ROUNDS=<n> runs more rounds of ours (for profiling: the first round,
    // which grows every table from nothing, then weighs less in the samples)
    let rounds = ProcessInfo.processInfo.environment["SCHEDULER_BENCH_ROUNDS"].flatMap(Int.init) ?? 4
    for impl in impls {
        if impl == "ours" { try await costOurs(n: 100_000, rounds: rounds) } else { await costNaive(n: 100_000, rounds: 3) }
    }
case "rss":
    try await rss(impls[0], n: 100_000)
default:
    print("usage: scheduler-bench lateness|cost|rss [ours|naive|all] [--quick]")
}
