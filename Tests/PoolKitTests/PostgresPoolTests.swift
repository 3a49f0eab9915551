import Foundation
import Synchronization
import Testing
@testable import PoolKit
import TestSupport

/// The pool with real libpq connections against a real server.
@Suite("ConnectionPool with PostgresConnection")
struct PostgresPoolTests {
    private func withPool<T: Sendable>(
        _ url: String, _ configuration: ConnectionPoolConfiguration,
        _ body: @Sendable (ConnectionPool<PostgresConnection, ContinuousClock>) async throws -> T
    ) async throws -> T {
        let pool = ConnectionPool<PostgresConnection, ContinuousClock>(postgres: url, configuration: configuration)
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await pool.run() }
            do {
                let result = try await body(pool)
                _ = await pool.drain(deadline: .now + .seconds(5))
                try await group.waitForAll()
                return result
            } catch {
                _ = await pool.drain(deadline: .now)
                try? await group.waitForAll()
                throw error
            }
        }
    }

    @Test("32 tasks preferring the reactor executor share 4 pooled connections: every answer is right and every task runs on a reactor thread")
    func tasksOnTheReactorExecutor() async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 4
            config.acquireTimeout = .seconds(30)
            try await withPool(url, config) { pool in
                // Per task: wrong answers, continuations that ran off the reactor threads, and
                // the reactor threads it ran on.
                let tallies = try await withTaskExecutorPreference(PostgresConnection.preferredExecutor) {
                    try await withThrowingTaskGroup(of: (Int, Int, Set<UInt>).self) { group in
                        for t in 0..<32 {
                            group.addTask {
                                var wrong = 0
                                var offReactor = 0
                                var threads: Set<UInt> = []
                                for i in 0..<100 {
                                    let expected = t * 1_000 + i
                                    let got = try await pool.withConnection { conn in
                                        try await conn.query("SELECT $1::int", expected)[0].decode(Int.self, at: 0)
                                    }
                                    if got != expected { wrong += 1 }
                                    if SocketReactor.shared.isCurrentThreadReactor {
                                        threads.insert(UInt(pthread_self()))
                                    } else {
                                        offReactor += 1
                                    }
                                }
                                return (wrong, offReactor, threads)
                            }
                        }
                        var sum = (0, 0, Set<UInt>())
                        for try await (w, o, threads) in group { sum = (sum.0 + w, sum.1 + o, sum.2.union(threads)) }
                        return sum
                    }
                }
                #expect(tallies.0 == 0)
                #expect(tallies.1 == 0, "continuations ran off the reactor threads")
                // 3,200 continuations spread over the reactor's threads, not all on one.
                #expect(tallies.2.count >= min(2, SocketReactor.shared.threadCount),
                        "ran on \(tallies.2.count) of \(SocketReactor.shared.threadCount) reactor threads")
                let stats = pool.statistics
                #expect(stats.open <= 4 && stats.inUse == 0 && stats.waiting == 0)
            }
        }
    }

    @Test("a connection returned inside a transaction is rolled back before reuse")
    func rollbackOnReturn() async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 1
            try await withPool(url, config) { pool in
                try await pool.withConnection { c in
                    try await c.execute("CREATE TABLE IF NOT EXISTS pool_rollback (v int); TRUNCATE pool_rollback")
                }
                let first = try await pool.withConnection { c -> Int32 in
                    #expect(!c.needsReset, "idle, no LISTEN: the pool may skip prepareForReuse")
                    try await c.execute("BEGIN")
                    try await c.query("INSERT INTO pool_rollback VALUES (1)")
                    #expect(c.needsReset, "in a transaction: the pool must reset it")
                    return c.backendPID
                }
                try await pool.withConnection { c in
                    #expect(c.backendPID == first, "maxOpen=1 must hand back the same connection")
                    #expect(c.transactionStatus == .idle)
                    let n = try await c.query("SELECT count(*) FROM pool_rollback")
                    #expect(try n[0].decode(Int.self, at: 0) == 0)
                    // A failed transaction is rolled back too.
                    try await c.execute("BEGIN")
                    _ = try? await c.query("SELECT 1/0")
                    #expect(c.transactionStatus == .inFailedTransaction, "the failed statement must leave the transaction aborted")
                }
                try await pool.withConnection { c in
                    #expect(c.backendPID == first, "the session with the aborted transaction was closed instead of rolled back and reused")
                    #expect(c.transactionStatus == .idle)
                    try await c.execute("DROP TABLE pool_rollback")
                }
            }
        }
    }

    @Test("resetQuery DISCARD ALL: a holder's SET, temporary table and prepared statement do not reach the next holder; without it they do")
    func resetQueryDiscardAll() async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 1
            for resetQuery in [nil, "DISCARD ALL"] as [String?] {
                let pool = ConnectionPool<PostgresConnection, ContinuousClock>(postgres: url, configuration: config, resetQuery: resetQuery)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await pool.run() }
                    let first = try await pool.withConnection { c -> Int32 in
                        try await c.execute("SET application_name = 'left_behind'; CREATE TEMP TABLE left_behind (v int); PREPARE left_behind AS SELECT 1")
                        #expect(c.needsReset == (resetQuery != nil))
                        return c.backendPID
                    }
                    try await pool.withConnection { c in
                        #expect(c.backendPID == first, "maxOpen=1: the same session")
                        let row = try await c.query(
                            "SELECT current_setting('application_name'), to_regclass('pg_temp.left_behind') IS NOT NULL, (SELECT count(*) FROM pg_prepared_statements WHERE name = 'left_behind')")[0]
                        let leftOver = try (row.decode(String.self, at: 0) == "left_behind", row.decode(Bool.self, at: 1), row.decode(Int.self, at: 2) == 1)
                        if resetQuery == nil {
                            #expect(leftOver == (true, true, true), "documented: without a resetQuery session state carries over")
                        } else {
                            #expect(leftOver == (false, false, false), "DISCARD ALL left \(leftOver)")
                        }
                    }
                    _ = await pool.drain(deadline: .now + .seconds(5))
                    try await group.waitForAll()
                }
            }
        }
    }

    @Test("a connection that ran LISTEN is cleaned before reuse")
    func unlistenOnReturn() async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 1
            try await withPool(url, config) { pool in
                let first = try await pool.withConnection { c -> Int32 in
                    try await c.listen("pool_chan")
                    #expect(c.needsReset, "ran LISTEN: the pool must reset it")
                    return c.backendPID
                }
                try await pool.withConnection { c in
                    #expect(c.backendPID == first, "maxOpen=1: the listening session must be cleaned and reused, not replaced")
                    #expect(!c.needsReset, "cleaned on return")
                    let rows = try await c.query("SELECT count(*) FROM pg_listening_channels()")
                    #expect(try rows[0].decode(Int.self, at: 0) == 0)
                }
            }
        }
    }

    @Test("a connection that ran LISTEN as plain SQL (simple or extended protocol) is cleaned before reuse", arguments: [true, false])
    func unlistenAfterPlainSQL(simple: Bool) async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 1
            try await withPool(url, config) { pool in
                let first = try await pool.withConnection { c -> Int32 in
                    if simple { try await c.execute("select 1; Listen pool_plain") } else { try await c.query("LISTEN pool_plain") }
                    #expect(c.needsReset, "ran LISTEN: the pool must reset it")
                    return c.backendPID
                }
                try await pool.withConnection { c in
                    #expect(c.backendPID == first, "maxOpen=1: the listening session must be cleaned and reused, not replaced")
                    let rows = try await c.query("SELECT count(*) FROM pg_listening_channels()")
                    #expect(try rows[0].decode(Int.self, at: 0) == 0, "the next holder's session still listens")
                }
            }
        }
    }

    @Test("a holder cancelled inside a transaction: the connection is rolled back and reused, not closed")
    func cancelledHolderRolledBack() async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 1
            try await withPool(url, config) { pool in
                let firstPID = try await pool.withConnection { c in try await c.query("SELECT pg_backend_pid()")[0].decode(Int.self, at: 0) }
                let inTransaction = AsyncStream.makeStream(of: Void.self)
                let holder = Task {
                    try await pool.withConnection { c in
                        try await c.execute("BEGIN")
                        inTransaction.continuation.yield()
                        try await Task.sleep(for: .seconds(30))
                    }
                }
                var began = inTransaction.stream.makeAsyncIterator()
                _ = await began.next()
                holder.cancel()
                _ = await holder.result
                let (pid, status) = try await pool.withConnection { c in
                    (try await c.query("SELECT pg_backend_pid()")[0].decode(Int.self, at: 0), c.transactionStatus)
                }
                #expect(pid == firstPID, "the connection was closed instead of rolled back")
                #expect(status == .idle)
                #expect(pool.statistics.closedBroken == 0)
            }
        }
    }

    @Test("killing every pooled backend under load: the pool recovers, no dead connection is handed out twice")
    func killBackendsUnderLoad() async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 5
            config.acquireTimeout = .seconds(10)
            config.connectBackoff = .init(initial: .milliseconds(10), maximum: .milliseconds(200))
            let appName = "pool-kill-\(UInt32.random(in: 0...UInt32.max))"
            let poolURL = url + (url.contains("?") ? "&" : "?") + "application_name=\(appName)"
            let killer = try await PostgresConnection.connect(to: url)
            defer { killer.closeNow() }
            let shared = LoadState()
            try await withPool(poolURL, config) { pool in
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for _ in 0..<20 {
                        group.addTask {
                            while !shared.stop.load(ordering: .relaxed) {
                                do {
                                    try await pool.withConnection { c in
                                        do {
                                            try await c.query("SELECT pg_sleep(0.002)")
                                            shared.successes.add(1, ordering: .relaxed)
                                        } catch let e as PostgresError where e.isConnectionBroken {
                                            shared.failedConnections.withLock { $0.append(c) }
                                        }
                                    }
                                } catch let e as PostgresError where e.isConnectionBroken {
                                    // Connect failures while the server kills sessions are fine.
                                }
                            }
                        }
                    }
                    // Five rounds at least, and on until five backends were killed: on a loaded
                    // machine (a CI run) the pool may not have reconnected by every round (one CI
                    // dry run killed 2 in 5 rounds).
                    var totalKilled = 0
                    var rounds = 0
                    while rounds < 5 || (totalKilled < 5 && rounds < 60) {
                        try await Task.sleep(for: .milliseconds(150))
                        let killed = try await killer.query(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", appName)
                        totalKilled += try killed[0].decode(Int.self, at: 0) ?? 0
                        rounds += 1
                    }
                    #expect(totalKilled >= 5, "only \(totalKilled) pooled backends were killed in \(rounds) rounds")
                    try await Task.sleep(for: .milliseconds(300))
                    let before = shared.successes.load(ordering: .relaxed)
                    try await Task.sleep(for: .milliseconds(300))
                    // After the last kill, queries succeed again.
                    #expect(shared.successes.load(ordering: .relaxed) > before)
                    shared.stop.store(true, ordering: .relaxed)
                    try await group.waitForAll()
                }
                let failed = shared.failedConnections.withLock { $0.map(ObjectIdentifier.init) }
                #expect(Set(failed).count == failed.count, "a dead connection was handed out more than once")
                let stats = pool.statistics
                #expect(stats.open <= 5)
                #expect(stats.closedBroken >= 1)
                // Every caller now gets a good connection.
                for _ in 0..<20 {
                    try await pool.withConnection { c in try await c.query("SELECT 1") }
                }
            }
        }
    }

    @Test("server stop and restart: acquires recover after the restart")
    func serverRestart() async throws {
        // Its own cluster: kept apart from the fd-counting test.
        try await TestDatabase.withoutExclusiveTests {
            let pg = try await EmbeddedPostgres.start()
            do {
                var config = ConnectionPoolConfiguration()
                config.maxOpen = 4
                config.minIdle = 2
                // 5 s, not less: in the full suite on a loaded machine, reconnects after the restart
                // took over 2 s (an acquire timed out with 2 connecting, right after the recovery).
                config.acquireTimeout = .seconds(5)
                config.connectBackoff = .init(initial: .milliseconds(20), maximum: .milliseconds(250))
                try await withPool(pg.url, config) { pool in
                    for _ in 0..<10 { try await pool.withConnection { c in try await c.query("SELECT 1") } }
                    try await stopServer(pg)
                    // While the server is down, acquires fail with a connection-level error: either a
                    // pooled connection that still looked alive breaks under the statement
                    // (PostgresError, isConnectionBroken), or the broken idle connections are
                    // discarded and every reconnect fails until acquireTimeout (5 s) passes.
                    do {
                        try await pool.withConnection { c in try await c.query("SELECT 1") }
                        Issue.record("an acquire and a statement succeeded while the server was down")
                    } catch let error as PostgresError {
                        #expect(error.isConnectionBroken, "not a connection failure: \(error)")
                    } catch let error as ConnectionPoolError {
                        #expect(error.code == .acquireTimeout, "unexpected pool error while the server is down: \(error)")
                    } catch {
                        Issue.record("unexpected error while the server is down: \(error)")
                    }
                    try await startServer(pg)
                    let start = ContinuousClock.now
                    var recovered = false
                    while ContinuousClock.now - start < .seconds(15) {
                        if (try? await pool.withConnection { c in try await c.query("SELECT 1") }) != nil {
                            recovered = true
                            break
                        }
                    }
                    #expect(recovered, "no successful acquire within 15 s of the restart")
                    // And it stays healthy: several in a row succeed.
                    for _ in 0..<20 { try await pool.withConnection { c in try await c.query("SELECT 1") } }
                }
            } catch {
                await pg.shutdown()
                throw error
            }
            await pg.shutdown()
        }
    }

    @Test("drain cancels held queries on the server and reports who held them")
    func drainCancelsOnServer() async throws {
        try await TestDatabase.withDatabase { url in
            var config = ConnectionPoolConfiguration()
            config.maxOpen = 2
            let pool = ConnectionPool<PostgresConnection, ContinuousClock>(postgres: url, configuration: config)
            let tag = "drain-\(UInt32.random(in: 0...UInt32.max))"
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await pool.run() }
                let holder = Task {
                    try await pool.withConnection(label: "slow-report") { c in
                        try await c.query("SELECT pg_sleep(30), $1::text", tag)
                    }
                }
                // Wait until the statement runs on the server.
                let observer = try await PostgresConnection.connect(to: url)
                defer { observer.closeNow() }
                var running = false
                for _ in 0..<200 where !running {
                    let r = try await observer.query("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()")
                    running = try r[0].decode(Int.self, at: 0)! > 0
                    if !running { try await Task.sleep(for: .milliseconds(10)) }
                }
                #expect(running)
                let start = ContinuousClock.now
                let report = await pool.drain(deadline: .now + .milliseconds(200))
                #expect(ContinuousClock.now - start < .seconds(3))
                #expect(report.cutOff.map(\.label) == ["slow-report"])
                let outcome = await holder.result
                if case .success = outcome { Issue.record("the held query should have been cut off") }
                // The server acts on a cancel request asynchronously: allow it a moment, far less
                // than the 30 s the statement would otherwise run.
                var stillRunning = 1
                for _ in 0..<100 where stillRunning > 0 {
                    let left = try await observer.query("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' AND state = 'active' AND pid <> pg_backend_pid()")
                    stillRunning = try left[0].decode(Int.self, at: 0) ?? 0
                    if stillRunning > 0 { try await Task.sleep(for: .milliseconds(20)) }
                }
                #expect(stillRunning == 0, "the query still runs on the server 2 s after the drain")
                // New acquires fail at once after a drain.
                await #expect(throws: ConnectionPoolError.self) { try await pool.withConnection { _ in } }
                try await group.waitForAll()
            }
        }
    }
}

private final class LoadState: Sendable {
    // Holds the connections themselves so no address is reused for a new one.
    let failedConnections = Mutex<[PostgresConnection]>([])
    let successes = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
}

private func stopServer(_ pg: EmbeddedPostgres) async throws {
    try await runOffPool { try pg.stopServer() }
}

private func startServer(_ pg: EmbeddedPostgres) async throws {
    try await runOffPool { try pg.startAgain() }
}

private func runOffPool(_ body: @escaping @Sendable () throws -> Void) async throws {
    try await withCheckedThrowingContinuation { (cont: CheckedContinuation<Void, Error>) in
        DispatchQueue(label: "PostgresPoolTests.server").async {
            do { try body(); cont.resume() } catch { cont.resume(throwing: error) }
        }
    }
}

@Suite("PostgresConnection: which statements may run LISTEN")
struct ListenDetectionTests {
    @Test("the word listen alone, in any case and any position, marks the session; longer words do not",
          arguments: [
              ("LISTEN orders", true), ("select 1; Listen pool_plain", true), ("EXECUTE 'LISTEN ' || ch", true),
              ("listen", true), ("UNLISTEN *", false), ("SELECT * FROM listeners", false),
              ("SELECT listen_count FROM t", false), ("SELECT 1", false), ("", false),
          ])
    func detection(sql: String, listens: Bool) {
        #expect(PostgresConnection.mentionsListen(sql) == listens)
    }
}
