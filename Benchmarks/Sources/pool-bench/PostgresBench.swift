// pool-bench postgres: issue 3's real-database bar. 10 connections, 64 concurrent workers
// running `SELECT 1`, queries/s for
//   - PoolKit's ConnectionPool<PostgresConnection> (busyPoll default 50 µs, and 0), and
//   - postgres-nio's PostgresClient with 10 connections,
// each warmed up, then timed, every result checked (the value must be 1).
// pgbench and asyncpg run beside it from Benchmarks/scripts/pool-db-bench.sh.
//
//   pool-bench postgres --url URL [--seconds N] [--warmup N] [--connections 10] [--workers 64]
//                       [--variant all|ours|ours-spin0|ours-reactor|nio] [--busy-poll-us N]
//
// Prints one `RESULT <name> <queries/s> <queries>` line per variant (the script parses these).
import Foundation
import Logging
import PoolKit
import PostgresNIO
import Synchronization

struct PostgresBenchOptions {
    var url = ""
    var seconds = 10
    var warmup = 2
    var connections = 10
    var workers = 64
    var variant = "all"
    var busyPollMicros: Int?

    init(_ args: [String]) {
        func value(_ name: String) -> String? {
            guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
            return args[i + 1]
        }
        url = value("--url") ?? ProcessInfo.processInfo.environment["DATABASE_URL"] ?? ""
        seconds = value("--seconds").flatMap(Int.init) ?? seconds
        warmup = value("--warmup").flatMap(Int.init) ?? warmup
        connections = value("--connections").flatMap(Int.init) ?? connections
        workers = value("--workers").flatMap(Int.init) ?? workers
        variant = value("--variant") ?? variant
        busyPollMicros = value("--busy-poll-us").flatMap(Int.init)
    }
}

/// Queries completed and wrong answers, shared by the workers of one run.
final class QueryTally: Sendable {
    let done = Atomic<Int>(0)
    let wrong = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)

    func check(_ value: Int?) {
        if value != 1 { wrong.add(1, ordering: .relaxed) }
        done.add(1, ordering: .relaxed)
    }
    var stopped: Bool { stop.load(ordering: .relaxed) }
}

/// Lets `workers` loop until stopped; counts only what completes inside the timed window
/// (which starts after `warmup` seconds of the same load). Returns queries/s and queries.
func timedWindow(
    workers: Int, warmup: Int, seconds: Int, executor: (any TaskExecutor)? = nil,
    _ body: @escaping @Sendable (QueryTally) async throws -> Void
) async throws -> (rate: Double, queries: Int) {
    let tally = QueryTally()
    return try await withThrowingTaskGroup(of: Void.self) { group in
        for _ in 0..<workers {
            group.addTask(executorPreference: executor) {
                while !tally.stopped { try await body(tally) }
            }
        }
        try await Task.sleep(for: .seconds(warmup))
        let clock = ContinuousClock()
        let before = tally.done.load(ordering: .relaxed)
        let start = clock.now
        try await Task.sleep(for: .seconds(seconds))
        let after = tally.done.load(ordering: .relaxed)
        let elapsed = start.duration(to: clock.now)
        tally.stop.store(true, ordering: .relaxed)
        try await group.waitForAll()
        let wrong = tally.wrong.load(ordering: .relaxed)
        precondition(wrong == 0, "\(wrong) queries returned something other than 1")
        let secs = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        return (Double(after - before) / secs, after - before)
    }
}

/// PoolKit: ConnectionPool<PostgresConnection>, `workers` tasks looping
/// `pool.withConnection { try await $0.query("SELECT 1") }`.
func benchOurPool(_ o: PostgresBenchOptions, busyPoll: Duration?, onReactor: Bool = false) async throws -> (rate: Double, queries: Int) {
    var configuration = PoolKit.ConnectionPoolConfiguration(
        name: "bench", maxOpen: o.connections, minIdle: o.connections, maxIdle: o.connections)
    configuration.maxConcurrentConnects = o.connections
    configuration.maxWaiters = max(configuration.maxWaiters, o.workers * 2)
    configuration.cpuLocalCache = cpuLocalCacheSetting
    var logger = Logger(label: "pool-bench")
    logger.logLevel = .warning
    var connectionConfiguration = PoolKit.PostgresConnection.Configuration(o.url, logger: logger)
    if let busyPoll { connectionConfiguration.busyPoll = busyPoll }  // nil: the library default
    let connect = connectionConfiguration
    let pool = PoolKit.ConnectionPool<PoolKit.PostgresConnection, ContinuousClock>(
        configuration: configuration, logger: logger
    ) {
        try await PoolKit.PostgresConnection.connect(connect)
    }
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await pool.run() }
        while pool.statistics.idle < o.connections { try await Task.sleep(for: .milliseconds(10)) }
        // onReactor: the workers prefer PostgresConnection.preferredExecutor (the reactor thread).
        let executor: (any TaskExecutor)? = onReactor ? PoolKit.PostgresConnection.preferredExecutor : nil
        let result = try await timedWindow(workers: o.workers, warmup: o.warmup, seconds: o.seconds, executor: executor) { tally in
            let value = try await pool.withConnection { conn in
                try await conn.query("SELECT 1")[0].decode(Int.self, at: 0)
            }
            tally.check(value)
        }
        let stats = pool.statistics
        precondition(stats.open == o.connections, "pool has \(stats.open) connections, expected \(o.connections)")
        group.cancelAll()
        return result
    }
}

/// postgres-nio: PostgresClient with `connections` connections (its `run()` in the task
/// group), `workers` tasks looping `client.query("SELECT 1")`.
func benchPostgresClient(_ o: PostgresBenchOptions) async throws -> (rate: Double, queries: Int) {
    guard let url = URLComponents(string: o.url), let host = url.host else {
        fatalError("cannot parse --url \(o.url)")
    }
    var configuration = PostgresClient.Configuration(
        host: host, port: url.port ?? 5432, username: url.user ?? "postgres", password: url.password,
        database: url.path.isEmpty ? nil : String(url.path.dropFirst()), tls: .disable)
    configuration.options.minimumConnections = o.connections
    configuration.options.maximumConnections = o.connections
    var logger = Logger(label: "pool-bench.postgres-nio")
    logger.logLevel = .warning
    let client = PostgresClient(configuration: configuration, backgroundLogger: logger)
    let queryLogger = logger
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { await client.run() }
        // Open every connection before the warm-up (the pool grows with demand).
        try await withThrowingTaskGroup(of: Void.self) { opening in
            for _ in 0..<o.connections {
                opening.addTask { try await client.withConnection { _ = try await $0.query("SELECT 1", logger: queryLogger); try await Task.sleep(for: .milliseconds(200)) } }
            }
            try await opening.waitForAll()
        }
        let result = try await timedWindow(workers: o.workers, warmup: o.warmup, seconds: o.seconds) { tally in
            var value: Int?
            for try await row in try await client.query("SELECT 1") {
                value = Int(try row.decode(Int32.self))
            }
            tally.check(value)
        }
        group.cancelAll()
        return result
    }
}

func runPostgres(_ args: [String]) async throws {
    let o = PostgresBenchOptions(args)
    guard !o.url.isEmpty else {
        print("usage: pool-bench postgres --url postgres://user@host:port/db [--seconds N] [--warmup N] [--connections 10] [--workers 64] [--variant all|ours|ours-spin0|ours-reactor|nio] [--busy-poll-us N]")
        exit(2)
    }
    func report(_ name: String, _ r: (rate: Double, queries: Int)) {
        FileHandle.standardOutput.write(Data(String(format: "RESULT %@ %.0f %d\n", name, r.rate, r.queries).utf8))
    }
    let variants = o.variant == "all" ? ["ours", "ours-spin0", "ours-reactor", "nio"] : [o.variant]
    for v in variants {
        switch v {
        case "ours":
            if let us = o.busyPollMicros {
                report("ours-spin\(us)", try await benchOurPool(o, busyPoll: .microseconds(us)))
            } else {
                report("ours", try await benchOurPool(o, busyPoll: nil))
            }
        case "ours-spin0":
            report("ours-spin0", try await benchOurPool(o, busyPoll: .zero))
        case "ours-reactor":
            report("ours-reactor", try await benchOurPool(o, busyPoll: .zero, onReactor: true))
        case "nio":
            report("nio", try await benchPostgresClient(o))
        default:
            print("unknown --variant \(v)")
            exit(2)
        }
    }
}
