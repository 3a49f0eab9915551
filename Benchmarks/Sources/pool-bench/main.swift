// pool-bench: PoolKit's ConnectionPool against postgres-nio's pool (issue 3).
//
//   pool-bench mock [--iterations N] [--runs R]   lease+release, no-I/O mock connection:
//                                                  1 task; 32 tasks on 8 connections (the body
//                                                  does not suspend, so on this machine's 2
//                                                  threads at most 2 hold at once: no waiting);
//                                                  and 32 tasks on 8 connections that hold across
//                                                  a Task.yield() (waiters and handoffs);
//                                                  PoolKit vs postgres-nio, same run.
//                                                  POOL_BENCH_METRICS=1: a real (counting)
//                                                  metrics backend for PoolKit; postgres-nio
//                                                  keeps its no-op metrics
//   pool-bench handoff [--iterations N]            release -> waiting task latency (p50/p99/p999)
//   pool-bench all                                  mock + handoff
//   pool-bench postgres --url URL [--seconds N] ... real database: 10 connections, 64 workers running
//                                                  SELECT 1, PoolKit (busyPoll default and 0) vs
//                                                  postgres-nio's PostgresClient (PostgresBench.swift)
//
// Build and run in release: `cd Benchmarks && swift build -c release --product pool-bench`.
import _ConnectionPoolModule
import _ConnectionPoolTestUtils
import Foundation
import Logging
import PoolKit
import Synchronization
import CoreMetrics

// MARK: - Command line

let arguments = Array(CommandLine.arguments.dropFirst())
let command = arguments.first ?? "all"

func option(_ name: String, default value: Int) -> Int {
    guard let i = arguments.firstIndex(of: name), i + 1 < arguments.count, let v = Int(arguments[i + 1]) else { return value }
    return v
}

// MARK: - Mocks

/// A connection that does no I/O: the cost measured is the pool's alone.
final class BenchConnection: PoolableConnection {
    let id: Int
    init(id: Int) { self.id = id }
    var isBroken: Bool { false }
    /// Nothing to reset, like a `PostgresConnection` returned outside a transaction without `LISTEN`.
    var needsReset: Bool { false }
    func prepareForReuse() async throws {}
    func cancelRunningQuery() async {}
    func close() async {}
}

final class Counter: Sendable {
    let value = Atomic<Int>(0)
    func next() -> Int { value.add(1, ordering: .relaxed).newValue }
}

/// A value shared between tasks.
final class Shared<Value: Sendable>: Sendable {
    let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R: Sendable>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}

@inline(never)
func blackHole<T>(_ value: T) {}

/// `POOL_BENCH_CPU_CACHE=0`: our pools without their CPU-local cache (for comparison).
let cpuLocalCacheSetting = ProcessInfo.processInfo.environment["POOL_BENCH_CPU_CACHE"] != "0"

func makeOurPool(connections: Int) -> PoolKit.ConnectionPool<BenchConnection, ContinuousClock> {
    let ids = Counter()
    var configuration = PoolKit.ConnectionPoolConfiguration(name: "bench", maxOpen: connections, minIdle: connections, maxIdle: connections)
    configuration.maxConcurrentConnects = connections
    configuration.cpuLocalCache = cpuLocalCacheSetting
    var logger = Logger(label: "pool-bench")
    logger.logLevel = .warning
    return PoolKit.ConnectionPool(configuration: configuration, logger: logger) { BenchConnection(id: ids.next()) }
}

typealias NIOPool = _ConnectionPoolModule.ConnectionPool<
    MockConnection, Int, ConnectionIDGenerator, ConnectionRequest<MockConnection>, Int,
    MockPingPongBehavior<MockConnection>, NoOpConnectionPoolMetrics<Int>, ContinuousClock
>

func makeNIOPool(connections: Int) -> NIOPool {
    let factory = MockConnectionFactory<ContinuousClock>(autoMaxStreams: 1)
    var configuration = _ConnectionPoolModule.ConnectionPoolConfiguration()
    configuration.minimumConnectionCount = connections
    configuration.maximumConnectionSoftLimit = connections
    configuration.maximumConnectionHardLimit = connections
    return NIOPool(
        configuration: configuration,
        idGenerator: ConnectionIDGenerator(),
        keepAliveBehavior: MockPingPongBehavior(keepAliveFrequency: nil, connectionType: MockConnection.self),
        observabilityDelegate: NoOpConnectionPoolMetrics(connectionIDType: Int.self),
        clock: ContinuousClock()
    ) { id, pool in
        try await factory.makeConnection(id: id, for: pool)
    }
}

// MARK: - Lease/release throughput

struct Throughput {
    var name: String
    var cyclesPerSecond: Double
}

/// Runs `tasks` tasks that each do `iterations / tasks` lease+release cycles; returns cycles/s.
///
/// `cycles(n)` runs `n` cycles in its own loop, so the loop calls the pool directly: calling a
/// `@Sendable` async closure once per cycle would add an executor check (`swift_task_switch`,
/// ~8 % of a PoolKit cycle in `perf`) to both pools' figures.
/// `--closure-per-cycle` restores the old harness (one closure call per cycle) for comparison.
let closurePerCycle = arguments.contains("--closure-per-cycle")

func measure(tasks: Int, iterations: Int, _ cycles: @escaping @Sendable (Int) async throws -> Void) async throws -> Double {
    let perTask = iterations / tasks
    let body = cycles
    let perCycle: @Sendable (Int) async throws -> Void = { n in
        for _ in 0..<n { try await body(1) }
    }
    let cycles = closurePerCycle ? perCycle : body
    let clock = ContinuousClock()
    let start = clock.now
    try await withThrowingTaskGroup(of: Void.self) { group in
        for _ in 0..<tasks {
            group.addTask { try await cycles(perTask) }
        }
        try await group.waitForAll()
    }
    let elapsed = start.duration(to: clock.now)
    let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
    return Double(perTask * tasks) / seconds
}

func waitUntil(_ condition: () -> Bool) async {
    while !condition() { await Task.yield() }
}

/// Both pools side by side, measured in alternation (ours, theirs, ours, ...): a load spike
/// on this shared machine then hits both sides alike instead of one whole side. Returns the
/// best run of each and the median of the per-pair ratios.
func sideBySide(
    tasks: Int, connections: Int, iterations: Int, nioIterations: Int, runs: Int, yielding: Bool = false
) async throws -> (ours: Double, theirs: Double, medianRatio: Double, waits: Int) {
    let pool = makeOurPool(connections: connections)
    let nio = makeNIOPool(connections: connections)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await pool.run() }
        group.addTask { await nio.run() }
        await waitUntil { pool.statistics.idle == connections }
        // With `yielding`, each holder suspends once while it holds its connection, so that
        // other tasks run, find all 8 taken and wait: the queue and handoffs are measured.
        let ourCycles: @Sendable (Int) async throws -> Void
        let nioCycles: @Sendable (Int) async throws -> Void
        if yielding {
            ourCycles = { n in
                for _ in 0..<n {
                    try await pool.withConnection { (c: BenchConnection) async -> Void in
                        await Task.yield()
                        blackHole(c)
                    }
                }
            }
            nioCycles = { n in
                for _ in 0..<n {
                    try await nio.withConnection { (c: MockConnection) async -> Void in
                        await Task.yield()
                        blackHole(c)
                    }
                }
            }
        } else {
            ourCycles = { n in
                for _ in 0..<n { try await pool.withConnection { blackHole($0) } }
            }
            nioCycles = { n in
                for _ in 0..<n { try await nio.withConnection { blackHole($0) } }
            }
        }
        let waitsBefore = pool.statistics.waitCount
        _ = try await measure(tasks: tasks, iterations: iterations / 10, ourCycles) // warm-up
        _ = try await measure(tasks: tasks, iterations: nioIterations / 10, nioCycles)
        var ours = 0.0, theirs = 0.0
        var ratios: [Double] = []
        for _ in 0..<runs {
            let a = try await measure(tasks: tasks, iterations: iterations, ourCycles)
            let b = try await measure(tasks: tasks, iterations: nioIterations, nioCycles)
            ours = max(ours, a)
            theirs = max(theirs, b)
            ratios.append(a / b)
            if ProcessInfo.processInfo.environment["POOL_BENCH_VERBOSE"] != nil {
                print("  run: PoolKit \(format(a)), postgres-nio \(format(b)) (\(tasks) tasks)")
            }
        }
        let waits = pool.statistics.waitCount - waitsBefore
        group.cancelAll()
        ratios.sort()
        return (ours, theirs, ratios[ratios.count / 2], waits)
    }
}

func format(_ v: Double) -> String {
    if v >= 1e6 { return String(format: "%.2fM", v / 1e6) }
    return String(format: "%.0fk", v / 1e3)
}

func runMock() async throws {
    let iterations = option("--iterations", default: 2_000_000)
    let nioIterations = option("--nio-iterations", default: 300_000)
    let runs = option("--runs", default: 3)
    print("lease+release cycles/s, no-I/O mock connection (best of \(runs) alternating runs; ratio of bests, and median of the \(runs) same-pair ratios)")
    print("workload                                PoolKit      postgres-nio   ratio   median pair ratio")
    if ProcessInfo.processInfo.environment["POOL_BENCH_METRICS"] == "1" {
        MetricsSystem.bootstrap(CountingMetrics())
        print("(PoolKit with a counting metrics backend: wait/use times and gauges recorded; postgres-nio with its no-op metrics)")
    }
    let only = option("--tasks", default: 0)
    for (tasks, connections, yielding) in [(1, 8, false), (32, 8, false), (32, 8, true)] where only == 0 || only == tasks {
        let (ours, theirs, median, waits) = try await sideBySide(
            tasks: tasks, connections: connections, iterations: yielding ? iterations / 4 : iterations,
            nioIterations: nioIterations, runs: runs, yielding: yielding
        )
        let name = tasks == 1 ? "1 task, 8 connections" : "\(tasks) tasks on \(connections) connections\(yielding ? ", yield held" : "")"
        print(
            name.padding(toLength: 40, withPad: " ", startingAt: 0)
                + format(ours).padding(toLength: 13, withPad: " ", startingAt: 0)
                + format(theirs).padding(toLength: 15, withPad: " ", startingAt: 0)
                + String(format: "%.1fx", ours / theirs).padding(toLength: 8, withPad: " ", startingAt: 0)
                + String(format: "%.1fx", median)
        )
        if ProcessInfo.processInfo.environment["POOL_BENCH_VERBOSE"] != nil || yielding {
            print("  (PoolKit: \(waits) acquires waited in these runs)")
        }
        if yielding {
            // The floor of this row: the same 32 tasks doing only the Task.yield(), no pool.
            let floor = try await measure(tasks: tasks, iterations: iterations / 4) { n in
                for _ in 0..<n { await Task.yield(); blackHole(n) }
            }
            print("  (no pool, the Task.yield() alone: \(format(floor)) per second; over it, per cycle, PoolKit adds "
                  + String(format: "%.0f ns, postgres-nio %.0f ns: %.1fx", 1e9 / ours - 1e9 / floor, 1e9 / theirs - 1e9 / floor,
                           (1e9 / theirs - 1e9 / floor) / (1e9 / ours - 1e9 / floor)) + ")")
        }
    }
}

// MARK: - Handoff latency

func percentile(_ sorted: [Duration], _ p: Double) -> Duration {
    sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
}

/// The share of handoffs that took at least `threshold` (e.g. that waited for the releaser's thread).
func share(_ sorted: [Duration], atLeast threshold: Duration) -> String {
    let n = sorted.count - (sorted.firstIndex { $0 >= threshold } ?? sorted.count)
    return String(format: "%.2f %%", 100 * Double(n) / Double(sorted.count))
}

func micros(_ d: Duration) -> String {
    String(format: "%.2f µs", Double(d.components.attoseconds) / 1e12 + Double(d.components.seconds) * 1e6)
}

/// A connection is released while the releaser keeps its thread busy; how long
/// until the task that waited for it runs with it?
func runHandoff() async throws {
    let iterations = option("--iterations", default: 20_000)
    print("handoff latency: release -> waiting task running with the connection (\(iterations) handoffs, releaser stays busy)")
    // PoolKit: the releaser holds the only connection; a second task waits for it.
    let pool = makeOurPool(connections: 1)
    let latencies = try await withThrowingTaskGroup(of: Void.self) { group -> [Duration] in
        group.addTask { try await pool.run() }
        await waitUntil { pool.statistics.idle == 1 }
        var result: [Duration] = []
        let clock = ContinuousClock()
        for _ in 0..<iterations {
            let held = try await pool.lease()
            let resumedAt = Shared<ContinuousClock.Instant?>(nil)
            let releasedAt = try await withThrowingTaskGroup(of: Void.self) { inner -> ContinuousClock.Instant in
                inner.addTask {
                    let lease = try await pool.lease()
                    let now = clock.now
                    resumedAt.withLock { $0 = now }
                    await pool.release(lease)
                }
                await waitUntil { pool.statistics.waiting == 1 }
                let releasedAt = clock.now
                await pool.release(held)
                let busyUntil = clock.now.advanced(by: .microseconds(200))
                while clock.now < busyUntil, resumedAt.withLock({ $0 }) == nil {}
                try await inner.waitForAll()
                return releasedAt
            }
            result.append(releasedAt.duration(to: resumedAt.withLock { $0 }!))
        }
        group.cancelAll()
        return result.sorted()
    }
    // Floor: the same dance with no pool at all: the releaser resumes a bare continuation the
    // waiter parked on, then stays busy. Whatever PoolKit adds on top of this is the pool's.
    let bare = Shared<UnsafeContinuation<Void, Never>?>(nil)
    let bareLatencies = await withTaskGroup(of: Void.self) { _ -> [Duration] in
        var result: [Duration] = []
        let clock = ContinuousClock()
        for _ in 0..<iterations {
            let resumedAt = Shared<ContinuousClock.Instant?>(nil)
            let releasedAt = await withTaskGroup(of: Void.self) { inner -> ContinuousClock.Instant in
                inner.addTask {
                    await withUnsafeContinuation { continuation in bare.withLock { $0 = continuation } }
                    let now = clock.now
                    resumedAt.withLock { $0 = now }
                }
                await waitUntil { bare.withLock { $0 != nil } }
                let releasedAt = clock.now
                bare.withLock { c -> UnsafeContinuation<Void, Never>? in defer { c = nil }; return c }!.resume()
                let busyUntil = clock.now.advanced(by: .microseconds(200))
                while clock.now < busyUntil, resumedAt.withLock({ $0 }) == nil {}
                await inner.waitForAll()
                return releasedAt
            }
            result.append(releasedAt.duration(to: resumedAt.withLock { $0 }!))
        }
        return result.sorted()
    }
    print("continuation  p50 \(micros(percentile(bareLatencies, 0.5)))   p99 \(micros(percentile(bareLatencies, 0.99)))   p99.9 \(micros(percentile(bareLatencies, 0.999)))   max \(micros(bareLatencies.last!))   >=100 µs: \(share(bareLatencies, atLeast: .microseconds(100)))   (no pool: the floor)")
    print("PoolKit       p50 \(micros(percentile(latencies, 0.5)))   p99 \(micros(percentile(latencies, 0.99)))   p99.9 \(micros(percentile(latencies, 0.999)))   max \(micros(latencies.last!))   >=100 µs: \(share(latencies, atLeast: .microseconds(100)))")

    let nio = makeNIOPool(connections: 1)
    let nioLatencies = try await withThrowingTaskGroup(of: Void.self) { group -> [Duration] in
        group.addTask { await nio.run() }
        var result: [Duration] = []
        let clock = ContinuousClock()
        let warm = try await nio.leaseConnection()
        warm.release()
        for _ in 0..<iterations {
            let held = try await nio.leaseConnection()
            let resumedAt = Shared<ContinuousClock.Instant?>(nil)
            let started = Shared(false)
            let releasedAt = try await withThrowingTaskGroup(of: Void.self) { inner -> ContinuousClock.Instant in
                inner.addTask {
                    started.withLock { $0 = true }
                    let lease = try await nio.leaseConnection()
                    let now = clock.now
                    resumedAt.withLock { $0 = now }
                    lease.release()
                }
                // postgres-nio exposes no waiter count: give the waiter time to queue.
                await waitUntil { started.withLock { $0 } }
                for _ in 0..<50 { await Task.yield() }
                let releasedAt = clock.now
                held.release()
                let busyUntil = clock.now.advanced(by: .microseconds(200))
                while clock.now < busyUntil, resumedAt.withLock({ $0 }) == nil {}
                try await inner.waitForAll()
                return releasedAt
            }
            result.append(releasedAt.duration(to: resumedAt.withLock { $0 }!))
        }
        group.cancelAll()
        return result.sorted()
    }
    print("postgres-nio  p50 \(micros(percentile(nioLatencies, 0.5)))   p99 \(micros(percentile(nioLatencies, 0.99)))   p99.9 \(micros(percentile(nioLatencies, 0.999)))   max \(micros(nioLatencies.last!))   >=100 µs: \(share(nioLatencies, atLeast: .microseconds(100)))")
}

// MARK: - Main

switch command {
case "mock":
    try await runMock()
case "handoff":
    try await runHandoff()
case "all":
    try await runMock()
    print()
    try await runHandoff()
case "postgres":
    try await runPostgres(arguments)
default:
    print("usage: pool-bench [mock|handoff|all] [--iterations N] [--nio-iterations N] [--runs R]")
    print("       pool-bench postgres --url URL [--seconds N] [--warmup N] [--connections 10] [--workers 64] [--variant all|ours|ours-spin0|nio] [--busy-poll-us N]")
    exit(2)
}
