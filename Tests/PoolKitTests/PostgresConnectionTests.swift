import Foundation
import Testing
import Synchronization
@testable import PoolKit
import TestSupport

@Suite("PostgresConnection against a real PostgreSQL")
struct PostgresConnectionTests {
    @Test("every supported type, NULL and non-ASCII text round-trip as parameters")
    func roundTripTypes() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            let text = "héllo wörld ✓ 日本語 🐘"
            let bytes: [UInt8] = [0, 1, 2, 0xFF, 0x80, 10, 13, 0x5C]
            let rows = try await conn.query(
                "SELECT $1::int4 AS i, $2::int8 AS big, $3::float8 AS d, $4::bool AS b, $5::text AS t, $6::bytea AS raw, $7::jsonb AS j, $8::text AS n, $9::float8 AS inf, $10::int2 AS small",
                Int(-42), Int64.max, 3.141592653589793, true, text, bytes, PostgresJSON(#"{"a": [1, 2.5, null, "x"]}"#), nil, Double.infinity, Int32(7))
            #expect(rows.count == 1)
            let row = rows[0]
            #expect(try row.decode(Int.self, named: "i") == -42)
            #expect(try row.decode(Int64.self, named: "big") == Int64.max)
            #expect(try row.decode(Double.self, named: "d") == 3.141592653589793)
            #expect(try row.decode(Bool.self, named: "b") == true)
            #expect(try row.decode(String.self, named: "t") == text)
            #expect(try row.decode([UInt8].self, named: "raw") == bytes)
            #expect(try row.decode(PostgresJSON.self, named: "j")?.text == #"{"a": [1, 2.5, null, "x"]}"#)
            #expect(try row.decode(String.self, named: "n") == nil)
            #expect(row["n"]?.isNull == true)
            #expect(try row.decode(Double.self, named: "inf") == .infinity)
            #expect(try row.decode(Int32.self, at: 9) == 7)
            #expect(rows.columns.map(\.typeOID) == [23, 20, 701, 16, 25, 17, 3802, 25, 701, 21])
            #expect(rows.commandTag == "SELECT 1")
            #expect(rows.rowsAffected == 1)
            // Decoding a value into the wrong type is an error that names the column, not a crash.
            #expect(throws: PostgresError.self) { try row.decode(Int.self, named: "t") }
            #expect(throws: PostgresError.self) { try row.decode(Int.self, named: "no_such_column") }
        }
    }

    @Test("a parameter holding SQL stays data")
    func injectionStaysData() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            try await conn.execute("DROP TABLE IF EXISTS injection_x; CREATE TABLE injection_x (v text)")
            let evil = "'; DROP TABLE injection_x; --"
            let inserted = try await conn.query("INSERT INTO injection_x (v) VALUES ($1)", evil)
            #expect(inserted.rowsAffected == 1)
            #expect(inserted.commandTag == "INSERT 0 1")
            let back = try await conn.query("SELECT v FROM injection_x")
            #expect(try back[0].decode(String.self, at: 0) == evil)
            try await conn.execute("DROP TABLE injection_x")
        }
    }

    @Test("execute runs several statements with the simple protocol")
    func executeScript() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            let results = try await conn.execute("CREATE TEMP TABLE s (a int); INSERT INTO s VALUES (1),(2),(3); UPDATE s SET a = a + 1 WHERE a > 1; SELECT sum(a) FROM s")
            #expect(results.map(\.commandTag) == ["CREATE TABLE", "INSERT 0 3", "UPDATE 2", "SELECT 1"])
            #expect(try results[3][0].decode(Int.self, at: 0) == 8)
            #expect(conn.transactionStatus == .idle)
            try await conn.execute("BEGIN")
            #expect(conn.transactionStatus == .inTransaction)
            await #expect(throws: PostgresError.self) { try await conn.query("SELECT 1/0") }
            #expect(conn.transactionStatus == .inFailedTransaction)
            try await conn.execute("ROLLBACK")
            #expect(conn.transactionStatus == .idle)
            #expect(!conn.isBroken)
        }
    }

    @Test("a syntax error surfaces SQLSTATE 42601 with its position")
    func syntaxError() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            do {
                try await conn.query("SELECT * FROMM pg_class")
                Issue.record("expected a syntax error")
            } catch let error as PostgresError {
                #expect(error.code == .server)
                #expect(error.sqlState == "42601")
                #expect(error.position == 10)
                #expect(error.severity == "ERROR")
                #expect(error.message.contains("syntax error"))
                #expect(!error.isConnectionBroken)
            }
            // The connection is still usable.
            #expect(try await conn.query("SELECT 1")[0].decode(Int.self, at: 0) == 1)
            #expect(conn.serverVersionNumber >= 100000)
            #expect(!conn.serverVersion.isEmpty)
            #expect(conn.backendPID > 0)
        }
    }

    @Test("cancelling the Task during pg_sleep(10) returns well before the statement would have ended, and the connection stays usable")
    func cancellation() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            let start = ContinuousClock.now
            let task = Task { try await conn.query("SELECT pg_sleep(10)") }
            try await Task.sleep(for: .milliseconds(100))
            task.cancel()
            let result = await task.result
            let ms = elapsedMilliseconds(since: start)
            // Bounded against the statement's own 10 s, not against the machine's speed: only a
            // cancel that cut the statement short ends this early.
            #expect(ms < 5000, "cancel took \(ms) ms of pg_sleep(10)")
            switch result {
            case .success: Issue.record("pg_sleep(10) should have been cancelled")
            case .failure(let error): #expect(error is CancellationError, "got \(error)")
            }
            #expect(try await conn.query("SELECT 1")[0].decode(Int.self, at: 0) == 1)
            #expect(conn.transactionStatus == .idle)
            #expect(!conn.isBroken)
        }
    }

    /// Runs `body` in a task of its own and gives it `seconds` to finish: a statement that
    /// never returns fails the test instead of hanging it.
    private func finishes<T: Sendable>(within seconds: Double, _ body: @escaping @Sendable () async throws -> T) async throws -> Result<T, any Error> {
        let outcome = Mutex<Result<T, any Error>?>(nil)
        Task.detached {
            let r: Result<T, any Error>
            do { r = .success(try await body()) } catch { r = .failure(error) }
            outcome.withLock { $0 = r }
        }
        try await pollUntil(seconds: seconds) { outcome.withLock { $0 != nil } }
        return try #require(outcome.withLock { $0 }, "still running after \(seconds) s")
    }

    @Test("a cancelled Task whose statement completes anyway (it caught the cancel) gets the statement's result, not CancellationError: what it did is not undone")
    func cancelledButCompleted() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            let table = "cancel_done_\(UInt32.random(in: 0...UInt32.max))"
            try await conn.execute("""
                CREATE TABLE \(table) (id int);
                CREATE FUNCTION \(table)_f() RETURNS int LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO \(table) VALUES (1);
                    BEGIN PERFORM pg_sleep(20); EXCEPTION WHEN query_canceled THEN NULL; END;
                    RETURN 7;
                END $$;
                """)
            let task = Task { try await conn.query("SELECT \(table)_f()") }
            // Cancelled once the function sleeps inside its handler's block (watched from a
            // second connection), not after a fixed delay a loaded machine may not honour.
            let watcher = try await PostgresConnection.connect(to: url)
            let patience = ContinuousClock.now.advanced(by: .seconds(20))
            while ContinuousClock.now < patience {
                let rows = try await watcher.query("SELECT count(*)::int8 FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE '%\(table)_f()%'")
                if try rows[0].decode(Int.self, at: 0) == 1 { break }
                try await Task.sleep(for: .milliseconds(20))
            }
            await watcher.close()
            task.cancel()
            let result = await task.result
            let value = try (try? result.get())?[0].decode(Int.self, at: 0)
            #expect(value == 7, "\(result)")
            #expect(try await conn.query("SELECT count(*)::int8 FROM \(table)")[0].decode(Int.self, at: 0) == 1)
            try await conn.execute("DROP FUNCTION \(table)_f(); DROP TABLE \(table)")
            await conn.close()
        }
    }

    @Test("query(eachRow:) may ask its connection about itself from the callback (the rows are handed out with the connection's lock released)")
    func eachRowAsksTheConnection() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            let seen = Mutex<[PostgresTransactionStatus]>([])
            _ = try await conn.query("SELECT g FROM generate_series(1, 3) g", eachRow: { _ in
                seen.withLock { $0.append(conn.transactionStatus) }
            })
            #expect(seen.withLock { $0.count } == 3)
            await conn.close()
        }
    }

    @Test("COPY TO STDOUT and COPY FROM STDIN are refused with invalidUsage, load nothing, and leave the connection usable")
    func copyIsRefused() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            try await conn.execute("DROP TABLE IF EXISTS copy_refused; CREATE TABLE copy_refused (n int)")
            // 100,000 rows: more than one read's worth, so the COPY's data must be drained.
            let out = try await finishes(within: 10) { try await conn.execute("COPY (SELECT generate_series(1, 100000)) TO STDOUT") }
            guard case .failure(let outError as PostgresError) = out else { Issue.record("COPY TO STDOUT: \(out)"); return }
            #expect(outError.code == .invalidUsage && outError.message.contains("COPY"), "\(outError)")
            let into = try await finishes(within: 10) { try await conn.query("COPY copy_refused FROM STDIN") }
            guard case .failure(let inError as PostgresError) = into else { Issue.record("COPY FROM STDIN: \(into)"); return }
            #expect(inError.code == .invalidUsage, "\(inError)")
            #expect(!conn.isBroken)
            #expect(conn.transactionStatus == .idle)
            #expect(try await conn.query("SELECT count(*) FROM copy_refused")[0].decode(Int.self, at: 0) == 0)
            try await conn.execute("DROP TABLE copy_refused")
        }
    }

    @Test("a NUL byte in a text parameter or in the SQL is refused instead of cutting the value short")
    func nulIsRefused() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            await #expect { try await conn.query("SELECT $1::text", "a\u{0}b") } throws: { error in
                (error as? PostgresError)?.code == .invalidUsage && "\(error)".contains("parameter $1")
            }
            await #expect { try await conn.execute("SELECT 'a\u{0}b'") } throws: { error in
                (error as? PostgresError)?.code == .invalidUsage
            }
            #expect(throws: PostgresError.self) { try conn.escapeLiteral("a\u{0}b") }
            // Bytes that hold a NUL still go through as bytea.
            let bytes: [UInt8] = [97, 0, 98]
            #expect(try await conn.query("SELECT octet_length($1::bytea)", bytes)[0].decode(Int.self, at: 0) == 3)
        }
    }

    @Test("a cancelled statement whose server never answers ends after cancelGracePeriod, and the connection is closed as broken")
    func cancelWithoutAnswer() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(
                PostgresConnection.Configuration(url, cancelGracePeriod: .milliseconds(500)))
            defer { conn.closeNow() }
            let pid = conn.backendPID
            // 29, not 30: other tests look for their own pg_sleep(30) in pg_stat_activity.
            let task = Task { try await conn.query("SELECT pg_sleep(29)") }
            try await Task.sleep(for: .milliseconds(100))
            // A stopped backend takes neither the cancel nor anything else (as a partitioned
            // network would): only the grace period can end the wait.
            #expect(kill(pid, SIGSTOP) == 0, "cannot stop backend \(pid): errno \(errno)")
            defer { kill(pid, SIGCONT) }
            let start = ContinuousClock.now
            task.cancel()
            let ended = try await finishes(within: 10) { await task.result }
            let ms = elapsedMilliseconds(since: start)
            guard case .success(let result) = ended else { return }
            #expect(throws: CancellationError.self) { try result.get() }
            #expect(ms >= 400 && ms < 3000, "ended after \(ms) ms")
            #expect(conn.isBroken)
        }
    }

    @Test("close() while another task's statement runs: the statement fails with connectionClosed, close returns, the backend's session ends")
    func closeDuringAStatement() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(PostgresConnection.Configuration(url))
            let pid = conn.backendPID
            let task = Task { try await conn.query("SELECT pg_sleep(28)") }
            try await Task.sleep(for: .milliseconds(200))
            let start = ContinuousClock.now
            _ = try await finishes(within: 10) { await conn.close() }  // fails the test if close() hangs
            let ended = try await finishes(within: 10) { await task.result }
            #expect(elapsedMilliseconds(since: start) < 3000)
            guard case .success(let outcome) = ended, case .failure(let error) = outcome else {
                Issue.record("the statement did not fail: \(String(describing: ended))"); return
            }
            #expect((error as? PostgresError)?.code == .connectionClosed, "\(error)")
            #expect(conn.isBroken)
            let other = try await PostgresConnection.connect(PostgresConnection.Configuration(url))
            defer { other.closeNow() }
            var gone = false
            for _ in 0..<100 where !gone {
                gone = try await other.query("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", Int(pid))[0].decode(Int.self, at: 0) == 0
                if !gone { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(gone, "backend \(pid) is still there")
        }
    }

    @Test("a cancel request that arrives after its statement ended never fails the next statement on the connection")
    func lateCancelDoesNotHitTheNextStatement() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(PostgresConnection.Configuration(url, busyPoll: .zero))
            defer { conn.closeNow() }
            let rounds = 600
            // Rounds whose next statement ran and answered right, and among them those that
            // followed a cancelled statement (a cancel was requested: the server either cut the
            // statement short or had already finished it, the late cancel this test is about).
            var completedRounds = 0
            var checkedAfterCancel = 0
            for round in 0..<rounds {
                if conn.isBroken { break }  // a connection marked broken is not reused: that is allowed
                let task = Task { try await conn.query("SELECT pg_sleep(0.001)") }
                // Cancel around the moment the statement ends.
                try await Task.sleep(for: .microseconds(Int64(500 + (round % 13) * 100)))
                task.cancel()
                var cancelled = false
                if case .failure(let error) = await task.result, error is CancellationError { cancelled = true }
                if conn.isBroken { break }
                do {
                    let next = try await conn.query("SELECT $1::int", round)
                    #expect(try next[0].decode(Int.self, at: 0) == round, "round \(round): the next statement answered wrong")
                } catch let error as PostgresError {
                    Issue.record("round \(round): the next statement failed: \(error)")
                    break
                }
                completedRounds += 1
                if cancelled { checkedAfterCancel += 1 }
            }
            // Broken is allowed, but only after a cancel request outlived cancelGracePeriod (5 s):
            // most rounds must have run, or the test did not test much.
            #expect(completedRounds >= rounds / 2, "only \(completedRounds) of \(rounds) rounds ran a statement after the cancel")
            #expect(checkedAfterCancel > 0, "no statement was cancelled before a next one ran: the test did not test anything")
        }
    }

    @Test("a task that prefers the reactor executor runs there and can still be cancelled")
    func reactorExecutor() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            let result = try await Task(executorPreference: PostgresConnection.preferredExecutor) { () -> (Int, Bool) in
                var sum = 0
                for i in 0..<200 { sum += try await conn.query("SELECT $1::int", i)[0].decode(Int.self, at: 0) ?? 0 }
                let onReactor = SocketReactor.shared.isCurrentThreadReactor
                return (sum, onReactor)
            }.value
            #expect(result.0 == (0..<200).reduce(0, +))
            #expect(result.1, "the task did not continue on the reactor thread")
            let start = ContinuousClock.now
            let sleeper = Task(executorPreference: PostgresConnection.preferredExecutor) {
                try await conn.query("SELECT pg_sleep(10)")
            }
            try await Task.sleep(for: .milliseconds(100))
            sleeper.cancel()
            await #expect(throws: CancellationError.self) { try await sleeper.value }
            let ms = elapsedMilliseconds(since: start)
            #expect(ms < 5000, "cancel took \(ms) ms of pg_sleep(10): the statement was not cut short")
            #expect(try await conn.query("SELECT 7")[0].decode(Int.self, at: 0) == 7)
        }
    }

    @Test("a Task already cancelled sends nothing and throws CancellationError")
    func alreadyCancelled() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            let task = Task {
                withUnsafeCurrentTask { $0?.cancel() }
                return try await conn.query("SELECT 1")
            }
            await #expect(throws: CancellationError.self) { try await task.value }
            #expect(try await conn.query("SELECT 2")[0].decode(Int.self, at: 0) == 2)
        }
    }

    @Test("pg_terminate_backend: the next query fails as a broken connection")
    func terminatedBackend() async throws {
        try await TestDatabase.withDatabase { url in
            let victim = try await PostgresConnection.connect(to: url)
            let killer = try await PostgresConnection.connect(to: url)
            defer { victim.closeNow(); killer.closeNow() }
            let killed = try await killer.query("SELECT pg_terminate_backend($1)", Int(victim.backendPID))
            #expect(try killed[0].decode(Bool.self, at: 0) == true)
            // Give the server a moment to deliver the FATAL message and close the socket.
            try await Task.sleep(for: .milliseconds(50))
            do {
                try await victim.query("SELECT 1")
                Issue.record("a terminated connection must not answer")
            } catch let error as PostgresError {
                #expect(error.isConnectionBroken, "got \(error)")
                #expect(error.code == .connectionBroken)
                #expect(error.sqlState == "57P01", "the server's reason is kept: \(error)")
            }
            #expect(victim.isBroken)
            // And it stays broken, failing fast.
            await #expect(throws: PostgresError.self) { try await victim.query("SELECT 1") }
        }
    }

    @Test("A statement whose backend is terminated while it runs fails as a broken connection with the server's SQLSTATE and message")
    func terminatedDuringStatement() async throws {
        try await TestDatabase.withDatabase { url in
            let victim = try await PostgresConnection.connect(to: url)
            let killer = try await PostgresConnection.connect(to: url)
            defer { victim.closeNow(); killer.closeNow() }
            let running = Task { try await victim.query("SELECT pg_sleep(30)") }
            let deadline = ContinuousClock.now + .seconds(10)
            while ContinuousClock.now < deadline {
                let active = try await killer.query(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", Int(victim.backendPID))
                if try active[0].decode(Int.self, at: 0) == 1 { break }
                try await Task.sleep(for: .milliseconds(10))
            }
            _ = try await killer.query("SELECT pg_terminate_backend($1)", Int(victim.backendPID))
            do {
                _ = try await withTaskCancellationHandler { try await running.value } onCancel: { running.cancel() }
                Issue.record("a terminated statement must not return")
            } catch let error as PostgresError {
                #expect(error.code == .connectionBroken, "got \(error)")
                #expect(error.sqlState == "57P01", "got \(error)")
                #expect(error.message.contains("terminating connection"), "got \(error)")
            }
            #expect(victim.isBroken)
        }
    }

    @Test("notifications nobody reads are capped at maxPendingNotifications: the oldest are dropped and counted")
    func notificationCap() async throws {
        try await TestDatabase.withDatabase { url in
            var configuration = PostgresConnection.Configuration(url)
            configuration.maxPendingNotifications = 5
            let listener = try await PostgresConnection.connect(configuration)
            let sender = try await PostgresConnection.connect(to: url)
            defer { listener.closeNow(); sender.closeNow() }
            let channel = "capped_\(UInt32.random(in: 0...UInt32.max))"
            try await listener.listen(channel)
            try await sender.execute("BEGIN")
            for i in 1...20 { try await sender.query("SELECT pg_notify($1, $2)", channel, "\(i)") }
            try await sender.execute("COMMIT")
            // The listener reads them while it runs statements of its own, and never iterates.
            let end = ContinuousClock.now + .seconds(10)
            while listener.droppedNotifications < 15 && ContinuousClock.now < end {
                try await listener.query("SELECT 1")
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(listener.droppedNotifications == 15)
            var it = listener.notifications.makeAsyncIterator()
            var got: [String] = []
            for _ in 0..<5 { got.append(try #require(await it.next()).payload) }
            #expect(got == ["16", "17", "18", "19", "20"])
        }
    }

    @Test("blocking libpq calls that hang (name lookups, cancel requests) do not hold up a connect")
    func blockedCallsDoNotDelayConnects() async throws {
        try await TestDatabase.withDatabase { url in
            // Six calls stuck for 3 s, as a lookup of an unreachable DNS server would be.
            let blocked = SharedCounter()
            let ended = SharedCounter()
            for _ in 0..<6 {
                Task.detached {
                    _ = await BlockingExecutor.run {
                        blocked.increment()
                        sleep(3)
                        ended.increment()
                        return 0
                    }
                }
            }
            // Every one of them is stuck before the connect starts (not merely scheduled).
            try await pollUntil(seconds: 2) { blocked.value == 6 }
            try #require(blocked.value == 6, "only \(blocked.value) of 6 blocking calls started")
            let start = ContinuousClock.now
            let conn = try await PostgresConnection.connect(to: url, connectTimeout: .seconds(2))
            let connected = ContinuousClock.now
            await conn.close()
            // Cause and effect, not a speed: held up behind them, the connect would end only
            // once one of the blocked calls had returned.
            #expect(ended.value == 0, "connect took \(start.duration(to: connected)), ending after \(ended.value) blocked calls returned")
        }
    }

    @Test("a 20 MB parameter goes out whole over many flushes, and a 20 MB result comes back whole")
    func largeValues() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            let big = String(repeating: "abcdefghij", count: 2_000_000)
            let sent = try await conn.query("SELECT length($1::text)", big)
            #expect(try sent[0].decode(Int.self, at: 0) == big.utf8.count)
            let back = try await conn.query("SELECT repeat('abcdefghij', 2000000)")
            #expect(try back[0].decode(String.self, at: 0) == big)
            #expect(!conn.isBroken)
        }
    }

    @Test("notifications on two channels arrive with their payloads, in order")
    func notifications() async throws {
        try await TestDatabase.withDatabase { url in
            let listener = try await PostgresConnection.connect(to: url)
            let sender = try await PostgresConnection.connect(to: url)
            defer { listener.closeNow(); sender.closeNow() }
            // A channel name that needs quoting proves it is escaped, not concatenated.
            // Unique names: every test shares one database, and NOTIFY reaches every listener.
            let suffix = UInt32.random(in: 0...UInt32.max)
            let channels = ["orders_\(suffix)", "Weird \"Chan\"; DROP \(suffix)"]
            for c in channels { try await listener.listen(c) }
            let expected = (0..<10).map { i in (channels[i % 2], "payload \(i) ✓") }
            let collector = Task { () -> [PostgresNotification] in
                var got: [PostgresNotification] = []
                for try await n in listener.notifications {
                    got.append(n)
                    if got.count == expected.count { break }
                }
                return got
            }
            // Half sent while the listener waits on an idle socket, half in one transaction.
            for (c, p) in expected.prefix(5) { try await sender.query("SELECT pg_notify($1, $2)", c, p) }
            try await sender.execute("BEGIN")
            for (c, p) in expected.dropFirst(5) { try await sender.query("SELECT pg_notify($1, $2)", c, p) }
            try await sender.execute("COMMIT")
            let got = try await collector.value
            #expect(got.map(\.channel) == expected.map(\.0))
            #expect(got.map(\.payload) == expected.map(\.1))
            #expect(got.allSatisfy { $0.senderPID == sender.backendPID })
            // Notifications that arrive while the listener runs its own statement are kept.
            try await sender.query("SELECT pg_notify($1, 'during')", channels[0])
            try await Task.sleep(for: .milliseconds(20))
            try await listener.query("SELECT 1")
            var it = listener.notifications.makeAsyncIterator()
            #expect(try await it.next()?.payload == "during")
            try await listener.unlisten(channels[0])
            try await listener.unlistenAll()
        }
    }

    @Test("a notification a statement reads into the buffer while the listener is between its step and its wait wakes that wait (the statement's read left the socket empty)")
    func notificationReadBetweenStepAndWait() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            defer { conn.closeNow() }
            let channel = "self_\(UInt32.random(in: 0...UInt32.max))"
            try await conn.listen(channel)
            try conn.beginListening()
            defer { conn.endListening() }
            /// The listener's step (nothing buffered: it is about to wait on the socket); then,
            /// before it registers its wait, `send` runs a statement on this connection whose kick
            /// finds no wait to end and whose read takes the notification off the socket; then the
            /// wait the listener makes must end at once and the step deliver `payload`.
            func betweenStepAndWait(_ payload: String, _ send: () async throws -> Void) async throws {
                guard case .waitSocket(let socket) = try conn.nextNotificationStep() else {
                    Issue.record("expected the listener to wait on the socket")
                    return
                }
                try await send()
                #expect(conn.hasBufferedNotifications)
                let outcome = try await withTimeout(.seconds(10)) { await conn.waitForNotifications(on: socket) }
                #expect(outcome == .interrupted)
                conn.leftSocket()
                guard case .deliver(let n) = try conn.nextNotificationStep() else {
                    Issue.record("the buffered notification was not delivered")
                    return
                }
                #expect(n.payload == payload)
            }
            try await betweenStepAndWait("between") { try await conn.query("SELECT pg_notify($1, 'between')", channel) }
            // A multi-statement query, whose notification libpq parses only while handing out
            // the results after the first.
            try await betweenStepAndWait("behind a result") {
                try await conn.execute("SELECT pg_notify('\(channel)', 'behind a result'); SELECT 1")
            }
        }
    }

    @Test("close() from another task while the listener is between its step and its wait, the socket's number already another file's: the wait ends at once and the iteration finishes")
    func closeWhileListenerIsAboutToWait() async throws {
        try await TestDatabase.withDatabase { url in
            var reused = false
            // Tests run in parallel in this process: another may open a file in the moment the
            // number is free (then this is tried again), and nothing of theirs may be closed here.
            for _ in 0..<20 where !reused {
                let conn = try await PostgresConnection.connect(to: url)
                try await conn.listen("closing_\(UInt32.random(in: 0...UInt32.max))")
                try conn.beginListening()
                defer { conn.endListening() }
                guard case .waitSocket(let socket) = try conn.nextNotificationStep() else {
                    Issue.record("expected the listener to wait on the socket")
                    return
                }
                await conn.close()   // idle: closed at once, its socket released and its number freed
                // The next files opened get the lowest free numbers, the closed socket's among them.
                var pair: [Int32] = [-1, -1]
                try #require(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
                defer { close(pair[0]); close(pair[1]) }
                guard pair.contains(socket.fd) else { continue }
                reused = true
                // Before, this wait registered on the other file and slept as long as it stayed quiet.
                let outcome = try await withTimeout(.seconds(10)) { await conn.waitForNotifications(on: socket) }
                #expect(outcome == .interrupted)
                conn.leftSocket()
                guard case .finished = try conn.nextNotificationStep() else {
                    Issue.record("the iteration did not finish on a closed connection")
                    return
                }
            }
            #expect(reused, "another file took the closed socket's number in all 20 tries")
        }
    }

    @Test("connecting to a closed port fails fast, naming host and port")
    func closedPort() async throws {
        // A timing bound: hold the shared lock so that the CPU-heaviest tests (exclusive) do not run beside it.
        try await TestDatabase.withDatabase { _ in
            let port = try EmbeddedPostgres.freePort()
            let start = ContinuousClock.now
            do {
                _ = try await PostgresConnection.connect(to: "postgres://nobody@127.0.0.1:\(port)/db", connectTimeout: .seconds(3))
                Issue.record("connect to a closed port succeeded")
            } catch let error as PostgresError {
                #expect(error.code == .connectionFailed)
                #expect(error.description.contains("127.0.0.1"))
                #expect(error.description.contains("\(port)"))
                #expect(error.host == "127.0.0.1")
            }
            // Refused at once; the bound only proves it never waits for an OS-level TCP timeout.
            // It has slack over connectTimeout because CPU-heavy tests share the cooperative pool.
            #expect(elapsedMilliseconds(since: start) < 5000)
        }
    }

    @Test("connects over a unix socket, by key/value string and by URL with a percent-encoded host",
          .enabled(if: ProcessInfo.processInfo.environment["REALTIME_SYNC_TEST_DATABASE_URL"] == nil,
                   "needs the embedded cluster's socket folder"))
    func unixSocket() async throws {
        let pg = try #require(try await TestDatabase.shared.embedded())
        try await TestDatabase.withDatabase { _ in
            let keyValue = "host=\(pg.directory) port=\(pg.port) user=postgres dbname=postgres"
            let encoded = pg.directory.replacingOccurrences(of: "/", with: "%2F")
            for connectionString in [keyValue, "postgres://postgres@\(encoded):\(pg.port)/postgres"] {
                let conn = try await PostgresConnection.connect(to: connectionString)
                #expect(conn.host == pg.directory, "\(connectionString) went to \(conn.host)")
                let rows = try await conn.query("SELECT inet_server_addr() IS NULL")  // NULL over a unix socket
                #expect(try rows[0].decode(Bool.self, at: 0) == true)
                await conn.close()
            }
        }
    }

    // Audit, session 12: the embedded cluster trusted every TCP login on 127.0.0.1, so any
    // local user was its superuser (and could read the parent's secrets from its environment).
    @Test("the embedded cluster asks TCP logins for its password (its URL carries it; logs get redactedURL); the socket in its private folder needs none",
          .enabled(if: ProcessInfo.processInfo.environment["REALTIME_SYNC_TEST_DATABASE_URL"] == nil,
                   "needs the embedded cluster"))
    func embeddedClusterPassword() async throws {
        let pg = try #require(try await TestDatabase.shared.embedded())
        try await TestDatabase.withDatabase { _ in
            let withoutPassword = "postgres://postgres@127.0.0.1:\(pg.port)/postgres?sslmode=disable"
            let error = await #expect(throws: PostgresError.self) { _ = try await PostgresConnection.connect(to: withoutPassword) }
            #expect(error?.message.contains("password") == true, "\(String(describing: error))")
            let conn = try await PostgresConnection.connect(to: pg.url)
            let rows = try await conn.query("SELECT current_setting('password_encryption')")
            #expect(try rows[0].decode(String.self, at: 0) == "scram-sha-256")
            await conn.close()
            #expect(pg.redactedURL == "postgres://postgres:***@127.0.0.1:\(pg.port)/postgres?sslmode=disable")
            #expect(!pg.redactedURL.contains(String(pg.url.split(separator: "@")[0].split(separator: ":").last!)))
        }
    }

    @Test("a bad connection string is reported as invalidConfiguration (not retried as a failed connection), naming what libpq refused",
          arguments: [("postgres://[not-a-url", "IPv6"), ("host=127.0.0.1 bogus=1", "bogus"), ("host=127.0.0.1 sslmode=bogus", "sslmode"),
                      ("postgres://127.0.0.1:notaport/x", "notaport"), ("postgres://127.0.0.1/x?foo=bar", "foo")])
    func badConnectionString(_ case: (String, String)) async throws {
        let error = await #expect(throws: PostgresError.self) {
            _ = try await PostgresConnection.connect(to: `case`.0)
        }
        #expect(error?.code == .invalidConfiguration, "\(String(describing: error))")
        #expect(error?.message.contains(`case`.1) == true, "\(String(describing: error))")
        #expect(error?.isConnectionBroken == false)
    }

    @Test("several hosts with connect_timeout: a host that accepts and never answers gives way to the next after connect_timeout (libpq enforces it only in its blocking connect); when none answers, the error names each")
    func connectTimeoutPerHost() async throws {
        try await TestDatabase.withDatabase { url in
            let parts = try #require(URLComponents(string: url))
            let (host, port) = (try #require(parts.host), try #require(parts.port))
            // Silent hosts: listening sockets nobody accepts from (the kernel completes the
            // handshake; the startup message is never answered).
            func silentListener() throws -> (fd: Int32, port: Int) {
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                var address = sockaddr_in()
                address.sin_family = sa_family_t(AF_INET)
                address.sin_addr.s_addr = inet_addr("127.0.0.1")
                _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
                listen(fd, 16)
                var length = socklen_t(MemoryLayout<sockaddr_in>.size)
                _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
                return (fd, Int(UInt16(bigEndian: address.sin_port)))
            }
            let first = try silentListener(), second = try silentListener()
            defer { close(first.fd); close(second.fd) }
            var common = "user=\(parts.user ?? "postgres") dbname=\(parts.path.dropFirst()) connect_timeout=2 sslmode=disable"
            if let password = parts.password { common += " password=\(password)" }
            let conn = try await PostgresConnection.connect(to: "host=127.0.0.1,\(host) port=\(first.port),\(port) " + common, connectTimeout: .seconds(9))
            #expect(try await conn.query("SELECT inet_server_port()::int8")[0].decode(Int.self, at: 0) == port, "connected to the second host")
            await conn.close()
            let error = await #expect(throws: PostgresError.self) {
                _ = try await PostgresConnection.connect(to: "host=127.0.0.1,127.0.0.1 port=\(first.port),\(second.port) " + common, connectTimeout: .seconds(9))
            }
            #expect(error?.message.contains("could not connect to any of 2 hosts") == true, "\(String(describing: error))")
            #expect(error?.message.components(separatedBy: "connect_timeout=").count == 3, "\(String(describing: error))")
        }
    }

    @Test("several hosts with connect_timeout: a host whose step blocks a thread (a name lookup that hangs, which no timeout or cancellation interrupts) gives way to the next after connect_timeout; the blocked step is not awaited, and a connection it makes late is closed")
    func hungHostStepGivesWay() async throws {
        try await TestDatabase.withDatabase { url in
            let parts = try #require(URLComponents(string: url))
            let (host, port) = (try #require(parts.host), try #require(parts.port))
            var common = "user=\(parts.user ?? "postgres") dbname=\(parts.path.dropFirst()) connect_timeout=2 sslmode=disable"
            if let password = parts.password { common += " password=\(password)" }
            let lateClosed = Mutex<PostgresConnection?>(nil)
            let real = ConnectAttempt(configuration: .init("host=\(host) port=\(port) " + common))
            // The first host "hangs" for 6 s on a Dispatch thread, as libpq's getaddrinfo does
            // inside PQconnectPoll, then connects for real (to the one server).
            let attempt = ConnectAttempt(configuration: .init("host=dns-hangs.invalid,\(host) port=\(port) " + common, connectTimeout: .seconds(20))) { keywords in
                guard keywords.contains(where: { $0 == ("host", "dns-hangs.invalid") }) else { return try await real.run() }
                _ = await BlockingExecutor.run { usleep(6_000_000) }
                // Connects even though the step was cancelled meanwhile (a new Task does not
                // inherit it), as a step that ends without looking at cancellation would.
                let late = try await Task { try await real.run() }.value
                lateClosed.withLock { $0 = late }
                return late
            }
            let start = ContinuousClock.now
            let conn = try await ConnectAttempt.firstOf(limit: .seconds(20), timeout: { CancellationError() }) { try await attempt.run() }
            let took = ContinuousClock.now - start
            #expect(took < .seconds(5), "the hung host held the connect for \(took)")
            #expect(try await conn.query("SELECT 1::int8")[0].decode(Int.self, at: 0) == 1)
            await conn.close()
            // The hung step ends later, connects, and its connection is closed (not leaked).
            let deadline = ContinuousClock.now + .seconds(15)
            while lateClosed.withLock({ $0 }) == nil, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
            let late = try #require(lateClosed.withLock { $0 })
            while !late.isBroken, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
            #expect(late.isBroken, "the late connection was closed")
        }
    }

    @Test("a bare database name is a connection string libpq takes (it is not refused as invalid, as a parser of key=value strings would)")
    func bareDatabaseName() async throws {
        do {
            let conn = try await PostgresConnection.connect(to: "no_such_database_\(UInt32.random(in: 0...UInt32.max))", connectTimeout: .seconds(5))
            await conn.close()
        } catch let error as PostgresError {
            #expect(error.code != .invalidConfiguration, "\(error)")
        }
    }

    @Test("the client encoding is UTF8, the driver's own: a connection string asking for another is refused as invalidConfiguration (text would be garbled), one asking for UTF8 is taken")
    func clientEncodingIsUTF8() async throws {
        try await TestDatabase.withDatabase { url in
            let separator = url.contains("?") ? "&" : "?"
            let error = await #expect(throws: PostgresError.self) {
                _ = try await PostgresConnection.connect(to: url + separator + "client_encoding=LATIN1")
            }
            #expect(error?.code == .invalidConfiguration && error?.message.contains("client_encoding=LATIN1") == true, "\(String(describing: error))")
            let utf8 = try await PostgresConnection.connect(to: url + separator + "client_encoding=utf8")
            #expect(try await utf8.query("SHOW client_encoding")[0].decode(String.self, at: 0) == "UTF8")
            await utf8.close()
            let plain = try await PostgresConnection.connect(to: url)
            #expect(try await plain.query("SHOW client_encoding")[0].decode(String.self, at: 0) == "UTF8")
            await plain.close()
        }
    }

    @Test("a parameter over 1 GB is refused with invalidUsage before anything is sent (its length would not fit libpq's int)")
    func oversizedParameter() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            // Its pages are never touched (the length is checked first): no gigabyte is used.
            let huge = [UInt8](unsafeUninitializedCapacity: (1 << 30) + 1) { _, count in count = (1 << 30) + 1 }
            let error = await #expect(throws: PostgresError.self) { _ = try await conn.query("SELECT length($1::bytea)", huge) }
            #expect(error?.code == .invalidUsage && error?.message.contains("at most 1 GB") == true, "\(String(describing: error))")
            #expect(try await conn.query("SELECT 1")[0].decode(Int.self, at: 0) == 1, "the connection stays usable")
            await conn.close()
        }
    }

    @Test("query(eachRow:) hands rows over one at a time in order; an error part way throws after the rows before it, and the connection stays usable")
    func rowByRow() async throws {
        try await TestDatabase.withDatabase { url in
            let conn = try await PostgresConnection.connect(to: url)
            var seen: [Int] = []
            var widths: Set<Int> = []
            let end = try await conn.query("SELECT g FROM generate_series(1, 1000) g") { row in
                widths.insert(row.count)
                seen.append((try? row[0].decode(Int.self, at: 0)) ?? -1)
            }
            #expect(seen == Array(1...1000))
            #expect(widths == [1], "each call gets a one-row result")
            #expect(end.commandTag == "SELECT 1000" && end.count == 0)
            var before: [Int] = []
            await #expect(throws: PostgresError.self) {
                try await conn.query("SELECT 1 / (500 - g) FROM generate_series(1, 1000) g") { row in
                    before.append((try? row[0].decode(Int.self, at: 0)) ?? -1)
                }
            }
            #expect(before.count < 500, "rows after the error must not be handed out: \(before.count)")
            #expect(try await conn.query("SELECT $1::int", 7)[0].decode(Int.self, at: 0) == 7)
            await conn.close()
        }
    }

    @Test("1,000 open/close cycles leave no socket to the database open and the process's descriptors within 16 of the start")
    func noDescriptorLeak() async throws {
        try await TestDatabase.withDatabaseAlone { url in
            // Warm up lazily created runtime resources (reactor, dispatch threads).
            for _ in 0..<5 { await (try await PostgresConnection.connect(to: url)).close() }
            let before = openFileDescriptorCount()
            // The sockets to the database are counted where it is reached over TCP by URL (the
            // embedded test cluster always is); otherwise the descriptor count alone decides.
            let port = URLComponents(string: url)?.port
            if port == nil { print("noDescriptorLeak: the test database URL names no TCP port; only the descriptor count is checked") }
            let socketsBefore = port.map(openSocketCount(toPort:)) ?? 0
            if let port {
                // The count sees an open connection (or the check below could not fail).
                let probe = try await PostgresConnection.connect(to: url)
                #expect(openSocketCount(toPort: port) == socketsBefore + 1)
                await probe.close()
            }
            for i in 0..<1000 {
                let conn = try await PostgresConnection.connect(to: url)
                if i % 10 == 0 { try await conn.query("SELECT $1::int", i) }
                await conn.close()
                await conn.close() // idempotent
            }
            let after = openFileDescriptorCount()
            // The sockets to the database exactly (what a leaked connection leaves); the
            // process's whole count within a margin, as tests of other suites run meanwhile.
            if let port {
                #expect(openSocketCount(toPort: port) == socketsBefore, "sockets to the database: \(socketsBefore) before, \(openSocketCount(toPort: port)) after")
            }
            #expect(after - before <= 16, "fds before \(before), after \(after)")
        }
    }
}

@Suite("EmbeddedPostgres")
struct EmbeddedPostgresTests {
    @Test("A tool run with a time limit (initdb gets startTimeout) that hangs is killed with its children at the limit, and the error names the knob")
    func hungToolIsKilled() throws {
        // As root the tools run through `runuser -u postgres`, which must not take them out of the group.
        for user in geteuid() == 0 ? [nil, "postgres"] : [nil] {
            try hungToolIsKilled(as: user)
        }
    }

    private func hungToolIsKilled(as user: String?) throws {
        let pidFile = NSTemporaryDirectory() + "/hung-tool-\(UInt64.random(in: 0...UInt64.max)).pid"
        defer { unlink(pidFile) }
        let began = ContinuousClock.now
        // The shell starts a child of its own (as initdb starts postgres) and waits.
        #expect {
            _ = try EmbeddedPostgres.run("/bin/sh", ["-c", "sleep 300 & echo $! > \(pidFile); wait"], as: user,
                                         timeout: (.seconds(1), "EmbeddedPostgres.Options.startTimeout"))
        } throws: { error in
            guard let error = error as? EmbeddedPostgresError else { return false }
            return error.code == .toolFailed && error.message.contains("did not finish within 1.0 seconds (EmbeddedPostgres.Options.startTimeout)")
        }
        #expect(ContinuousClock.now - began < .seconds(10))
        let child = try #require(Int32((try? String(contentsOfFile: pidFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""))
        // Its child went with it (killed, or reaped by init: not running either way). A killed
        // process shows as running until it is scheduled to die: on a busy machine, a moment.
        // (A pid taken since by another process counts as gone.)
        func state() -> Substring? {
            guard let fields = (try? String(contentsOfFile: "/proc/\(child)/stat", encoding: .utf8))?.split(separator: " "),
                  fields.count > 2, fields[1] == "(sleep)" else { return nil }
            return fields[2]
        }
        let stopped = ContinuousClock.now + .seconds(5)
        while let current = state(), current != "Z", ContinuousClock.now < stopped { usleep(10_000) }
        let last = state()
        #expect(last == nil || last == "Z", "the tool's child \(child) is still running (state \(last.map(String.init) ?? "-"))")
        // Without a time limit (and within it) a tool's output comes back.
        #expect(try EmbeddedPostgres.run("/bin/sh", ["-c", "echo done"], as: user, timeout: (.seconds(5), "knob")) == "done\n")
    }

    @Test("start and stop leave no postgres process and no temporary folder")
    func startStop() async throws {
        try await TestDatabase.withoutExclusiveTests {
            let pg = try await EmbeddedPostgres.start()
            let pid = try #require(pg.serverPID)
            let dir = pg.directory
            #expect(FileManager.default.fileExists(atPath: dir))
            let conn = try await PostgresConnection.connect(to: pg.url)
            let wal = try await conn.query("SHOW wal_level")
            #expect(try wal[0].decode(String.self, at: 0) == "logical")
            await conn.close()
            await pg.shutdown()
            await pg.shutdown() // idempotent
            #expect(!processIsAlive(pid), "postmaster \(pid) still alive")
            #expect(!FileManager.default.fileExists(atPath: dir))
            // No process anywhere still refers to the cluster's folder.
            let procs = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
            let stragglers = procs.filter { p in
                guard Int(p) != nil, let cmd = try? String(contentsOfFile: "/proc/\(p)/cmdline", encoding: .utf8) else { return false }
                return cmd.contains(dir)
            }
            #expect(stragglers.isEmpty, "processes still using \(dir): \(stragglers)")
        }
    }

    @Test("a server that does not stop within stopTimeout is killed with all its children")
    func stuckServerIsKilled() async throws {
        try await TestDatabase.withoutExclusiveTests {
            let pg = try await EmbeddedPostgres.start(.init(stopTimeout: .seconds(1)))
            let pid = try #require(pg.serverPID)
            // The server's children (checkpointer, writers, launchers).
            let children = childProcesses(of: pid)
            #expect(children.count >= 3, "children of \(pid): \(children)")
            // A postmaster that does not act on pg_ctl's request, and a child that cannot notice
            // its death: only a kill of each ends both.
            let stuck = try #require(children.first)
            kill(pid, SIGSTOP)
            kill(stuck, SIGSTOP)
            let started = ContinuousClock.now
            await pg.shutdown()
            let took = started.duration(to: .now)
            #expect(!processIsAlive(pid), "postmaster \(pid) still alive")
            let left = children.filter { processIsAlive($0) }
            #expect(left.isEmpty, "children still alive: \(left)")
            #expect(!FileManager.default.fileExists(atPath: pg.directory))
            #expect(took < .seconds(15), "stop took \(took)")
            for c in left { kill(c, SIGKILL) }  // not left behind if this fails
        }
    }

    @Test("startAgain on a port another process took meanwhile says so from server.log, and works once it is free")
    func startAgainOnATakenPort() async throws {
        try await TestDatabase.withoutExclusiveTests {
            let pg = try await EmbeddedPostgres.start()
            defer { pg.stop() }
            try pg.stopServer()
            // Another process's listener on the cluster's port.
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            try #require(fd >= 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_port = UInt16(pg.port).bigEndian
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            let bound = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            try #require(bound == 0 && listen(fd, 1) == 0, "could not take port \(pg.port): \(String(cString: strerror(errno)))")
            do {
                try pg.startAgain()
                Issue.record("the server must not start on a port in use")
            } catch let error as EmbeddedPostgresError {
                #expect(error.message.contains("server.log ends with"), "\(error.message)")
                #expect(error.message.contains("could not bind") || error.message.contains("already in use"), "\(error.message)")
            }
            close(fd)
            try pg.startAgain()
            let conn = try await PostgresConnection.connect(to: pg.url)
            #expect(try await conn.query("SELECT 1")[0].decode(Int.self, at: 0) == 1)
            await conn.close()
        }
    }

    @Test("a server that refuses to start: the error quotes server.log and the folder is removed")
    func failedStartQuotesTheLog() async throws {
        try await TestDatabase.withoutExclusiveTests {
            let parent = try clusterParent("embedded-fail-")
            defer { try? FileManager.default.removeItem(atPath: parent) }
            do {
                let pg = try await EmbeddedPostgres.start(.init(settings: ["no_such_setting": "1"], parentDirectory: parent))
                await pg.shutdown()
                Issue.record("a server with an unknown setting must not start")
            } catch let error as EmbeddedPostgresError {
                #expect(error.message.contains("unrecognized configuration parameter"), "\(error.message)")
            }
            let left = try FileManager.default.contentsOfDirectory(atPath: parent)
            #expect(left.isEmpty, "left behind: \(left)")
        }
    }

    @Test("missing server binaries give an error that says to install postgresql")
    func missingBinariesMessage() throws {
        do {
            _ = try EmbeddedPostgres.findBinDirectory(path: "/nonexistent", versionsRoot: "/nonexistent")
            Issue.record("lookup in empty folders must fail")
        } catch let error as EmbeddedPostgresError {
            #expect(error.message.hasPrefix("PostgreSQL server binaries not found: install postgresql"))
        }
        let found = try EmbeddedPostgres.findBinDirectory()
        #expect(FileManager.default.isExecutableFile(atPath: found + "/initdb"))
    }

    // Audit, session 12: the orphan cleanup removed any folder with the prefix and a dead owner,
    // whoever made it (as root, a planted one could point pg_ctl at another cluster).
    @Test("the orphan cleanup removes a dead process's folder, but not another user's or a symbolic link")
    func orphanCleanupTakesOnlyItsOwn() throws {
        let parent = NSTemporaryDirectory() + "/embedded-orphans-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: parent) }
        // A pid that is not running: above the kernel's pid_max.
        let dead = "99999999"
        let mine = parent + "/realtime-sync-pg-mine"
        try FileManager.default.createDirectory(atPath: mine, withIntermediateDirectories: false)
        try dead.write(toFile: mine + "/owner.pid", atomically: true, encoding: .utf8)
        let target = parent + "/elsewhere"
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: false)
        try dead.write(toFile: target + "/owner.pid", atomically: true, encoding: .utf8)
        try FileManager.default.createSymbolicLink(atPath: parent + "/realtime-sync-pg-link", withDestinationPath: target)
        var others: String?
        if geteuid() == 0, let nobody = EmbeddedPostgres.userIDs("nobody") {
            let theirs = parent + "/realtime-sync-pg-theirs"
            try FileManager.default.createDirectory(atPath: theirs, withIntermediateDirectories: false)
            try dead.write(toFile: theirs + "/owner.pid", atomically: true, encoding: .utf8)
            #expect(chown(theirs, nobody.uid, nobody.gid) == 0)
            others = theirs
        }
        EmbeddedPostgres.reapOrphans(parent: parent)
        #expect(!FileManager.default.fileExists(atPath: mine), "a dead process's own folder stays")
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: parent + "/realtime-sync-pg-link")) == target, "took a symbolic link for its own folder")
        #expect(FileManager.default.fileExists(atPath: target + "/owner.pid"))
        if let others { #expect(FileManager.default.fileExists(atPath: others), "removed another user's folder") }
    }

    // Audit, session 17: the cleanup ran `pg_ctl stop` on a stale postmaster.pid (which
    // signals whatever process got that pid), and judged the owner by its pid alone (reused:
    // in a container the owner is often pid 1 every time, so a killed one's folder stayed).
    @Test("the orphan cleanup signals no process a stale postmaster.pid names, and judges the owner by its lock, not its pid")
    func orphanCleanupTrustsNoBarePid() async throws {
        try await TestDatabase.withoutExclusiveTests {
            let parent = NSTemporaryDirectory() + "/embedded-orphans-\(UInt32.random(in: 0...UInt32.max))"
            try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: parent) }
            // A live process that is no postmaster, named by a dead owner's stale postmaster.pid;
            // as root, one of the `postgres` user's (whom the cleanup's tools run as, so a signal
            // from them would reach it), with every signal at its default action.
            let bystander = Process()
            if geteuid() == 0 {
                bystander.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
                bystander.arguments = ["--reuid=postgres", "--regid=postgres", "--clear-groups", "/usr/bin/env", "--default-signal", "/bin/sleep", "60"]
            } else {
                bystander.executableURL = URL(fileURLWithPath: "/usr/bin/env")
                bystander.arguments = ["--default-signal", "/bin/sleep", "60"]
            }
            try bystander.run()
            #expect(waitUntil(milliseconds: 5_000) {
                FileManager.default.contents(atPath: "/proc/\(bystander.processIdentifier)/cmdline")?.starts(with: Array("/bin/sleep".utf8)) == true
            }, "the bystander did not become sleep")
            defer { kill(bystander.processIdentifier, SIGKILL); bystander.waitUntilExit() }
            let stale = parent + "/realtime-sync-pg-stale"
            try FileManager.default.createDirectory(atPath: stale + "/data", withIntermediateDirectories: true)
            try "99999999".write(toFile: stale + "/owner.pid", atomically: true, encoding: .utf8)
            try "15\n".write(toFile: stale + "/data/PG_VERSION", atomically: true, encoding: .utf8)
            try "\(bystander.processIdentifier)\n\(stale)/data\n".write(toFile: stale + "/data/postmaster.pid", atomically: true, encoding: .utf8)
            // An owner that is gone although its pid runs (here: this very process's pid), and one
            // that still holds its lock.
            let reused = parent + "/realtime-sync-pg-reused"
            try FileManager.default.createDirectory(atPath: reused, withIntermediateDirectories: false)
            try "\(getpid())".write(toFile: reused + "/owner.pid", atomically: true, encoding: .utf8)
            #expect(FileManager.default.createFile(atPath: reused + "/owner.lock", contents: nil))
            let held = parent + "/realtime-sync-pg-held"
            try FileManager.default.createDirectory(atPath: held, withIntermediateDirectories: false)
            let lock = EmbeddedPostgres.holdOwnerLock(in: held)
            #expect(lock >= 0)
            defer { close(lock) }
            try "99999999".write(toFile: held + "/owner.pid", atomically: true, encoding: .utf8)

            EmbeddedPostgres.reapOrphans(parent: parent)
            #expect(bystander.isRunning, "the process a stale postmaster.pid named was signalled")
            #expect(!FileManager.default.fileExists(atPath: stale), "the dead owner's folder stays")
            #expect(!FileManager.default.fileExists(atPath: reused), "an unlocked owner.lock: the owner is gone, whatever its pid names now")
            #expect(FileManager.default.fileExists(atPath: held), "a folder whose owner holds its lock was removed")
        }
    }

    @Test("a postmaster is known by its command line where its working directory cannot be read (root without CAP_SYS_PTRACE): postgres -D <folder>, nothing else")
    func postmasterByCommandLine() async throws {
        try await TestDatabase.withoutExclusiveTests {
            let parent = try clusterParent("embedded-cmdline-")
            defer { try? FileManager.default.removeItem(atPath: parent) }
            let pg = try await EmbeddedPostgres.start(.init(parentDirectory: parent))
            let data = pg.directory + "/data"
            let folder = URL(fileURLWithPath: data).resolvingSymlinksInPath().path
            let pid = try #require(EmbeddedPostgres.postmasterPID(in: data))
            #expect(Postmaster.commandLineNames(pid, data, resolved: folder))
            #expect(!Postmaster.commandLineNames(pid, parent + "/other/data", resolved: parent + "/other/data"), "another folder's")
            #expect(!Postmaster.commandLineNames(getpid(), data, resolved: folder), "not a postgres process")
            let open = try #require(Postmaster.open(dataDirectory: data))
            open.close()
            await pg.shutdown()
        }
    }

    @Test("a cluster's watchdog runs beside it and is gone, reaped, once the cluster shuts down")
    func watchdogIsReaped() async throws {
        try await TestDatabase.withoutExclusiveTests {
            let parent = try clusterParent("embedded-watchdog-")
            defer { try? FileManager.default.removeItem(atPath: parent) }
            let pg = try await EmbeddedPostgres.start(.init(parentDirectory: parent))
            // This cluster's watchdog: a child of this process whose arguments name its folder.
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
            let watchdog = entries.compactMap(Int32.init).first { pid in
                guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
                let arguments = data.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
                return arguments.contains("realtime-sync-pg-watchdog") && arguments.contains(pg.directory)
            }
            #expect(watchdog != nil, "no watchdog beside the cluster")
            await pg.shutdown()
            if let watchdog {
                // Gone from /proc: exited and reaped (a zombie would still be listed).
                #expect(!FileManager.default.fileExists(atPath: "/proc/\(watchdog)"), "the watchdog outlived shutdown, or was left a zombie")
            }
            #expect(!FileManager.default.fileExists(atPath: pg.directory))
        }
    }
}

/// A fresh folder for clusters under the temporary directory, open to `postgres` (which runs
/// initdb when the tests run as root); the caller removes it.
func clusterParent(_ prefix: String) throws -> String {
    let parent = NSTemporaryDirectory() + "/" + prefix + "\(UInt32.random(in: 0...UInt32.max))"
    try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
    chmod(parent, 0o777)
    return parent
}
