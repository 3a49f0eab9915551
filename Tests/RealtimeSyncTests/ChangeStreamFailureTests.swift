import Foundation
import PoolKit
import RealtimeSync
import Synchronization
import Testing
import TestSupport

@Suite("ChangeStream: restarts and guards (real Postgres)", .serialized)
struct ChangeStreamFailureTests {
    @Test("Postgres restarts during a stream of inserts: the stream reconnects and the consumer gets every row exactly once, in order")
    func postgresRestart() async throws {
        try await withPrivateCluster { pg in
            let url = pg.url
            let table = uniqueCaptureName("cs_pgrestart")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let total = 600
            try await withChangeStream(url: url, tables: [table]) { stream, _ in
                let subscription = stream.changes()
                let seen = Mutex<[Int]>([])
                let consumer = Task {
                    for try await event in subscription {
                        let id = Int(newText(event, "id")!)!
                        seen.withLock { $0.append(id) }
                    }
                }
                // One row per transaction; a statement that fails across the restart is retried
                // (ON CONFLICT: it may have committed before the connection broke).
                let inserter = Task {
                    var conn = try await PostgresConnection.connect(to: url)
                    var id = 1
                    while id <= total {
                        do {
                            try await conn.query("INSERT INTO \(table) VALUES ($1) ON CONFLICT DO NOTHING", id)
                            id += 1
                        } catch {
                            await conn.close()
                            try await Task.sleep(for: .milliseconds(50))
                            if let fresh = try? await PostgresConnection.connect(to: url, connectTimeout: .seconds(2)) { conn = fresh }
                        }
                    }
                    await conn.close()
                }
                try await within(.seconds(60), "200 rows seen") {
                    while seen.withLock({ $0.count }) < 200 { try await Task.sleep(for: .milliseconds(10)) }
                }
                try await offPool { try pg.restart() }
                try await inserter.value
                try await within(.seconds(60), "all \(total) rows seen") {
                    while seen.withLock({ $0.count }) < total { try await Task.sleep(for: .milliseconds(20)) }
                }
                // Give a duplicate, if any, the time to show up.
                try await Task.sleep(for: .milliseconds(300))
                consumer.cancel()
                let ids = seen.withLock { $0 }
                #expect(ids == Array(1...total))
                #expect(stream.statistics.reconnects >= 1)
                #expect(stream.statistics.connected)
            }
        }
    }

    // Audit, session 15: at a fast shutdown the stream confirmed all WAL so that the server
    // could stop, and the server saved that at its shutdown checkpoint: a capture started after
    // the restart (a reboot, a deploy) rebuilt its window from the end of WAL, and every client
    // cursor from before needed a resync.
    @Test("Postgres restarts while the stream holds its window: the shutdown is not held up, the slot keeps the hold, and a capture started after it resumes from before the restart")
    func restartKeepsHold() async throws {
        try await withPrivateCluster { pg in
            let url = pg.url
            let table = uniqueCaptureName("cs_hold")
            let slot = uniqueCaptureName("cs_hold_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let first = try await withChangeStream(url: url, tables: [table], slot: slot, dropSlotAtEnd: false) { stream, sql in
                let changes = stream.changes()
                for id in 1...5 { try await sql.query("INSERT INTO \(table) VALUES ($1)", id) }
                let got = try await take(5, from: changes)
                let began = ContinuousClock.now
                try await offPool { try pg.restart() }
                #expect(began.duration(to: .now) < .seconds(20), "the shutdown waited for the stream")
                try await within(.seconds(60), "reconnected") {
                    while !stream.statistics.connected { try await Task.sleep(for: .milliseconds(20)) }
                }
                return got[0]
            }
            let sql = try await PostgresConnection.connect(to: url)
            let confirmed = try await sql.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot)
            let text = try #require(try confirmed.first?.decode(String.self, at: 0))
            let held = try #require(LSN(text))
            #expect(held <= first.commitLSN, "the slot moved past the window: \(held) after the first change at \(first.commitLSN)")
            await sql.close()
            // A new capture on the slot rebuilds the window from before the restart.
            try await withChangeStream(url: url, tables: [table], slot: slot) { stream, _ in
                let resumed = try await take(4, from: try stream.changes(after: first.cursor))
                #expect(resumed.map { newText($0, "id") } == ["2", "3", "4", "5"])
            }
        }
    }

    // Audit, session 15: START_REPLICATION on an invalidated slot failed with a raw error at
    // every start, for good (the slot exists, so it was never made anew).
    @Test("A slot invalidated while no stream ran (its WAL removed past max_slot_wal_keep_size): the next stream makes it anew, older cursors get resync_required, new changes flow")
    func invalidatedSlotAtStart() async throws {
        try await withPrivateCluster(.init(settings: ["max_slot_wal_keep_size": "1MB", "wal_keep_size": "0"])) { pg in
            let url = pg.url
            let table = uniqueCaptureName("cs_lostwal")
            let slot = uniqueCaptureName("cs_lostwal_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY, pad text)")
            let old = try await withChangeStream(url: url, tables: [table], slot: slot, dropSlotAtEnd: false) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) VALUES (1, 'x')")
                return try await take(1, from: changes)[0]
            }
            // Several WAL segments past the slot, then a checkpoint: the slot is invalidated.
            let sql = try await PostgresConnection.connect(to: url)
            for round in 0..<3 {
                try await sql.execute("INSERT INTO \(table) SELECT g, repeat('p', 200) FROM generate_series(\(round * 40_000 + 2), \(round * 40_000 + 40_001)) g")
                _ = try await sql.query("SELECT pg_switch_wal()::text")
            }
            try await sql.execute("CHECKPOINT")
            let status = try await sql.query("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", slot)
            try #require(try status.first?.decode(String.self, at: 0) == "lost", "the setup did not invalidate the slot")
            try await withChangeStream(url: url, tables: [table], slot: slot) { stream, sql in
                #expect(throws: ResumeWindowError.self) { _ = try stream.changes(after: old.cursor) }
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) VALUES (0, 'new')")
                #expect(try await take(1, from: changes).map { newText($0, "id") } == ["0"])
            }
            await sql.close()
        }
    }

    @Test("The walsender is terminated mid-stream: the stream replays from the window's start, skips what it emitted, and the consumer gets every row exactly once")
    func walsenderTerminated() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_kill")
            let slot = uniqueCaptureName("cs_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            try await withChangeStream(url: url, tables: [table], slot: slot) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("DO $$ BEGIN FOR t IN 0..9 LOOP INSERT INTO \(table) SELECT t * 10 + g FROM generate_series(1, 10) g; COMMIT; END LOOP; END $$")
                let before = try await take(100, from: changes)
                let terminated = try await sql.query(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active", slot)
                #expect(try terminated[0].decode(Bool.self, at: 0) == true)
                try await sql.execute("DO $$ BEGIN FOR t IN 10..19 LOOP INSERT INTO \(table) SELECT t * 10 + g FROM generate_series(1, 10) g; COMMIT; END LOOP; END $$")
                let after = try await take(100, from: changes)
                #expect((before + after).map { Int(newText($0, "id")!)! } == Array(1...200))
                try await sql.execute("INSERT INTO \(table) VALUES (1000)")
                let next = try await take(1, from: changes)
                #expect(newText(next[0], "id") == "1000")
                #expect(stream.statistics.reconnects >= 1)
                #expect(stream.statistics.changes == 201)
            }
            try await runSQL(url, "DROP TABLE \(table)")
        }
    }

    // Audit, session 12: at a reconnect the stream recreated a missing slot (at the current
    // WAL position), or took a slot moved on by someone else, and started after changes
    // committed while it was away: a silent gap.
    @Test("The slot is dropped, or moved on (pg_replication_slot_advance, another consumer), while the stream is disconnected: the stream fails with slot_lost instead of going on after changes it never read",
          arguments: [("SELECT pg_drop_replication_slot($1)", "is gone at reconnect", 0),
                      ("SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())", "was moved to", 1)])
    func slotLostWhileDisconnected(statement: String, reason: String, slotsAfter: Int) async throws {
        // A reconnect delay long enough to act on the slot in between.
        try await withFailingStream(prefix: "cs_lost", { $0.reconnectInitialDelay = .seconds(5); $0.reconnectMaxDelay = .seconds(5) }) { run, sql in
            let changes = run.stream.changes()
            try await sql.execute("INSERT INTO \(run.table) VALUES (1)")
            #expect(try await take(1, from: changes).map { newText($0, "id") } == ["1"])
            try await disconnect(sql, run.slot)
            try await sql.execute("INSERT INTO \(run.table) SELECT generate_series(2, 11)")
            _ = try await sql.query(statement, run.slot)
            // Before: the stream went on (with a new slot, or from the moved one) as if nothing was missing.
            let failure = try await run.failure()
            let error = failure as? ChangeStreamError
            #expect(error?.code == .slotLost, "\(failure)")
            #expect(error?.message.contains(run.slot) == true && error?.message.contains(reason) == true, "\(failure)")
            let ended = await #expect(throws: (any Error).self) { _ = try await take(1, from: changes, timeout: .seconds(10)) }
            #expect(ended is ChangeStreamError, "\(String(describing: ended))")
            let slots = try await sql.query("SELECT count(*)::int8 FROM pg_replication_slots WHERE slot_name = $1", run.slot)
            #expect(try slots[0].decode(Int.self, at: 0) == slotsAfter, "no slot was made in a dropped one's place")
        }
    }

    // Review, session 12: a stream whose first session never started (another instance still
    // held the slot, 55006) took its retry for a reconnect and failed with slot_lost once the
    // other instance had moved the slot on. Nothing was lost: its window was never fed.
    @Test("A new stream waits while the old one still holds the slot (a rolling restart), then starts where the old one left the slot, without slot_lost")
    func startsAfterTheOldInstanceReleasesTheSlot() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_handover")
            let slot = uniqueCaptureName("cs_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            // The old instance keeps one change in its window, so it moves the slot on with every transaction.
            try await withChangeStream(url: url, tables: [table], slot: slot, window: .init(maxCount: 1), dropSlotAtEnd: false) { old, sql in
                let oldChanges = old.changes()
                let new = ChangeStream(ChangeStream.Configuration(
                    connectionString: url, slotName: slot, publicationName: slot + "_pub", tables: [table],
                    statusInterval: .milliseconds(200), lagInterval: .milliseconds(500),
                    reconnectInitialDelay: .milliseconds(50), reconnectMaxDelay: .milliseconds(200)))
                let (watched, running) = WatchedRun.start(new, table: table, slot: slot)
                // The new stream tries (and fails, 55006) while the old one streams and confirms.
                for id in 1...5 {
                    try await sql.execute("INSERT INTO \(table) VALUES (\(id))")
                    _ = try await take(1, from: oldChanges)
                    try await Task.sleep(for: .milliseconds(300))
                }
                #expect(new.statistics.reconnects >= 1, "the new stream met the slot in use")
                #expect(!new.statistics.connected)
                old.stop()
                try await waitUntilStreaming(new)
                let newChanges = new.changes()
                try await sql.execute("INSERT INTO \(table) VALUES (6)")
                // The new stream starts where the old one held the slot: row 5 (the old window's
                // one change) may come again before 6; nothing older, nothing missing.
                var seen: [String] = []
                while seen.last != "6" && seen.count < 3 {
                    seen += try await take(1, from: newChanges).compactMap { newText($0, "id") }
                }
                #expect(seen == ["6"] || seen == ["5", "6"], "\(seen)")
                #expect(watched.outcome.withLock { $0 == nil }, "the new stream ended: \(String(describing: watched.outcome.withLock { $0 }))")
                new.stop()
                await running.value
                if case .failure(let error)? = watched.outcome.withLock({ $0 }) { Issue.record("the new stream failed: \(error)") }
                try await new.dropSlot()
            }
            try await runSQL(url, "DROP TABLE \(table)")
            try? await runSQL(url, "DROP PUBLICATION IF EXISTS \(slot)_pub")
        }
    }

    /// The two bounds on a transaction held until its commit, as a test drives them.
    enum TransactionBound: String, CaseIterable, Sendable {
        case changes = "maxTransactionChanges", bytes = "maxTransactionBytes"

        /// Sets the bound: 5 changes, or 2,000 bytes (a change of a one-integer row counts 128
        /// bytes and its row, so 5 fit and 20 do not).
        func apply(_ configuration: inout ChangeStream.Configuration) {
            switch self {
            case .changes: configuration.maxTransactionChanges = 5
            case .bytes: configuration.maxTransactionBytes = 2_000
            }
        }
    }

    @Test("A transaction over maxTransactionChanges or maxTransactionBytes stops the stream with transaction_too_large, naming the knob and the slot to advance; smaller ones before it are delivered",
          arguments: TransactionBound.allCases)
    func transactionTooLarge(bound: TransactionBound) async throws {
        try await withFailingStream(prefix: "cs_big", { bound.apply(&$0) }) { run, sql in
            let changes = run.stream.changes()
            try await sql.execute("INSERT INTO \(run.table) SELECT generate_series(1, 5)")
            #expect(try await take(5, from: changes).count == 5, "a transaction within the bound is delivered")
            try await sql.execute("INSERT INTO \(run.table) SELECT generate_series(6, 25)")
            let failure = try await run.failure()
            let error = failure as? ChangeAssemblyError
            #expect(error?.code == .transactionTooLarge, "\(failure)")
            #expect(error?.message.contains(bound.rawValue) == true, "\(failure)")
            #expect(error?.message.contains("pg_replication_slot_advance('\(run.slot)'") == true, "\(failure)")
        }
    }

    @Test("A slot of the stream's name made for something else (another output plugin, a physical slot) fails the start at once, naming the slot, what it is and the setting",
          arguments: ["test_decoding", "physical"])
    func slotMadeForSomethingElse(kind: String) async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let slot = uniqueCaptureName("foreign")
            try await runSQL(url, kind == "physical"
                ? "SELECT pg_create_physical_replication_slot('\(slot)', true)"
                : "SELECT pg_create_logical_replication_slot('\(slot)', 'test_decoding')")
            let stream = ChangeStream(.init(connectionString: url, slotName: slot, publicationName: slot + "_pub", tables: [table]))
            do {
                try await withTimeout(60, "the stream's start") { try await stream.run() }
                Issue.record("the stream ran on a \(kind) slot")
            } catch {
                // Before: START_REPLICATION's own error (`option "proto_version" = "1" is unknown`, or a
                // physical slot's), retried or reported without the slot or the setting.
                let text = "\(error)"
                #expect(text.contains("replication slot \(slot) exists") && text.contains(kind) && text.contains("--slot"), "\(text)")
            }
            try await runSQL(url, "SELECT pg_drop_replication_slot('\(slot)')")
            try await runSQL(url, "DROP PUBLICATION IF EXISTS \(slot)_pub")
        }
    }

    @Test("A slot's creation that waits for a transaction left open says so (statistics.lastError names pg_stat_activity and pg_prepared_xacts), and the stream starts once the transaction ends")
    func slotCreationWaitsForAnOpenTransaction() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let slot = uniqueCaptureName("waiting")
            let holder = try await PostgresConnection.connect(to: url)
            _ = try await holder.execute("BEGIN; INSERT INTO \(table) (status) VALUES ('held open')")
            let stream = ChangeStream(.init(connectionString: url, slotName: slot, publicationName: slot + "_pub", tables: [table]))
            let running = Task { try await stream.run() }
            func within(_ seconds: Double, _ condition: () -> Bool) async throws -> Bool {
                let end = ContinuousClock.now + .seconds(seconds)
                while !condition() && ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(50)) }
                return condition()
            }
            let said = try await within(30) { stream.statistics.lastError?.contains("pg_prepared_xacts") == true }
            #expect(said, "lastError: \(stream.statistics.lastError ?? "nil")")
            #expect(stream.statistics.oldestResumable == nil, "started while the transaction was open")
            _ = try await holder.execute("ROLLBACK")
            await holder.close()
            #expect(try await within(30) { stream.statistics.oldestResumable != nil }, "the stream did not start once the transaction ended")
            #expect(stream.statistics.lastError == nil)
            stream.stop()
            _ = await running.result
            try? await runSQL(url, "SELECT pg_drop_replication_slot('\(slot)')")
            try? await runSQL(url, "DROP PUBLICATION IF EXISTS \(slot)_pub")
        }
    }

    @Test("wal_level other than logical: a setup error naming the setting and the fix; run() fails with it")
    func walLevelNotLogical() async throws {
        try await withPrivateCluster(.init(settings: ["wal_level": "replica"])) { pg in
            let conn = try await PostgresConnection.connect(to: pg.url)
            do {
                _ = try await CaptureSetup.prepare(conn, publication: "p", tables: [])
                Issue.record("expected wal_level_not_logical")
            } catch let error as CaptureSetupError {
                #expect(error.code == .walLevelNotLogical)
                #expect(error.message.contains("wal_level is 'replica'"))
                #expect(error.message.contains("ALTER SYSTEM SET wal_level = logical"))
            }
            await conn.close()
            let stream = ChangeStream(.init(connectionString: pg.url, slotName: "never_made", publicationName: "p", tables: ["t"]))
            await #expect(throws: CaptureSetupError.self) { try await stream.run() }
        }
    }

    @Test("A role without REPLICATION, a table without primary key, a publication missing a table: each named with its fix")
    func guards() async throws {
        try await TestDatabase.withDatabase { url in
            let role = uniqueCaptureName("cs_role")
            let bare = uniqueCaptureName("cs_nopk")
            let keyed = uniqueCaptureName("cs_pk")
            let pub = uniqueCaptureName("cs_pub")
            let admin = try await PostgresConnection.connect(to: url)
            try await admin.execute("""
                CREATE ROLE \(role) LOGIN PASSWORD '\(role)_pw'; CREATE TABLE \(bare) (v text); CREATE TABLE \(keyed) (id int PRIMARY KEY);
                CREATE PUBLICATION \(pub) FOR TABLE \(keyed)
                """)

            // The same server as the role (with its password: TCP logins need one).
            var userURL = try #require(URLComponents(string: url))
            userURL.user = role
            userURL.password = role + "_pw"
            let asRole = try await PostgresConnection.connect(to: try #require(userURL.string))
            #expect(try await asRole.query("SELECT current_user::text")[0].decode(String.self, at: 0) == role)
            do {
                _ = try await CaptureSetup.prepare(asRole, publication: pub, tables: [keyed])
                Issue.record("expected missing_replication_privilege")
            } catch let error as CaptureSetupError {
                #expect(error.code == .missingReplicationPrivilege)
                #expect(error.message.contains("role '\(role)'"))
                #expect(error.message.contains("ALTER ROLE \(role) REPLICATION"))
            }
            await asRole.close()

            do {
                _ = try await CaptureSetup.prepare(admin, publication: pub, tables: [keyed, bare])
                Issue.record("expected missing_replica_identity")
            } catch let error as CaptureSetupError {
                #expect(error.code == .missingReplicaIdentity)
                #expect(error.message.contains("public.\(bare)"))
                #expect(error.message.contains("ALTER TABLE public.\(bare) REPLICA IDENTITY FULL"))
            }
            try await admin.execute("ALTER TABLE \(bare) REPLICA IDENTITY FULL")
            do {
                _ = try await CaptureSetup.prepare(admin, publication: pub, tables: [keyed, bare])
                Issue.record("expected publication_missing_tables")
            } catch let error as CaptureSetupError {
                #expect(error.code == .publicationMissingTables)
                #expect(error.message.contains("ALTER PUBLICATION \(pub) ADD TABLE public.\(bare)"))
            }
            // An existing publication with its tables is used as it is; unlimited WAL retention is flagged.
            let report = try await CaptureSetup.prepare(admin, publication: pub, tables: [])
            #expect(report.tables == ["public.\(keyed)"])
            #expect(!report.createdPublication)
            #expect(report.maxSlotWALKeepSizeMB == -1)
            #expect(report.warnings.contains { $0.contains("max_slot_wal_keep_size is -1") })
            // A missing publication is created for the configured tables.
            let created = try await CaptureSetup.prepare(admin, publication: pub + "_new", tables: [keyed, bare])
            #expect(created.createdPublication)
            #expect(created.tables == ["public.\(bare)", "public.\(keyed)"].sorted())
            do {
                _ = try await CaptureSetup.prepare(admin, publication: pub + "_none", tables: [])
                Issue.record("expected publication_missing")
            } catch let error as CaptureSetupError {
                #expect(error.code == .publicationMissing)
            }
            try await admin.execute("DROP PUBLICATION \(pub); DROP PUBLICATION \(pub)_new; DROP TABLE \(bare); DROP TABLE \(keyed); DROP ROLE \(role)")
            await admin.close()
        }
    }

    @Test("Reply requests from a short wal_sender_timeout are answered and keep the window's hold on the slot")
    func shortSenderTimeoutKeepsHold() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_hold")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let separator = url.contains("?") ? "&" : "?"
            let shortTimeout = url + separator + "options=-c%20wal_sender_timeout%3D300"
            let slot = uniqueCaptureName("cs_slot")
            try await withChangeStream(url: shortTimeout, tables: [table], slot: slot) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) SELECT generate_series(1, 10)")
                let events = try await take(10, from: changes)
                // Several timeouts' worth of idle time: the server asks for replies every 150 ms.
                try await Task.sleep(for: .milliseconds(1_200))
                #expect(stream.statistics.connected)
                #expect(stream.statistics.reconnects == 0)
                #expect(stream.statistics.confirmedFlush == events[0].commitLSN)
                // What the server holds, not only what the stream thinks it reported.
                #expect(try await slotConfirmedFlush(sql, slot: slot) == events[0].commitLSN)
            }
            try await runSQL(url, "DROP TABLE \(table)")
        }
    }

    @Test("Slot lag is measured in bytes and exposed in statistics; dropSlot() refuses while running and drops after")
    func slotLagAndDrop() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_lag")
            let slot = uniqueCaptureName("cs_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let stream = try await withChangeStream(url: url, tables: [table], slot: slot, dropSlotAtEnd: false) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) SELECT generate_series(1, 100)")
                let events = try await take(100, from: changes)
                // The window holds the slot at its first change, so the WAL since then is lag.
                let lag = try #require(try await stream.refreshSlotLag())
                #expect(lag > 0)
                #expect(stream.statistics.slotLagBytes == lag)
                // The confirmed position is held at the window's start.
                #expect(stream.statistics.confirmedFlush == events[0].commitLSN)
                await #expect(throws: ChangeStreamError.self) { try await stream.dropSlot() }
                return stream
            }
            #expect(try await stream.dropSlot())
            #expect(try await stream.dropSlot() == false)
            let check = try await PostgresConnection.connect(to: url)
            let rows = try await check.query("SELECT count(*)::int FROM pg_replication_slots WHERE slot_name = $1", slot)
            await check.close()
            #expect(try rows[0].decode(Int.self, at: 0) == 0)
            try await runSQL(url, "DROP TABLE \(table)")
        }
    }
}

/// Ends the stream's walsender and waits until its slot is free (before the stream reconnects).
private func disconnect(_ sql: PostgresConnection, _ slot: String) async throws {
    _ = try await sql.query("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active", slot)
    for _ in 0..<200 {
        let active = try await sql.query("SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot)
        if try active.count == 1 && active[0].decode(Bool.self, at: 0) == false { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    Issue.record("the slot stayed in use")
    throw CancellationError()
}

/// A stream a test expects to fail: `run()` in a task of its own, watched.
private final class WatchedRun: Sendable {
    let stream: ChangeStream
    let table: String
    let slot: String
    let outcome = Mutex<Result<Void, any Error>?>(nil)

    private init(stream: ChangeStream, table: String, slot: String) {
        self.stream = stream
        self.table = table
        self.slot = slot
    }

    /// Starts `stream.run()` in a task of its own that records how it ended.
    static func start(_ stream: ChangeStream, table: String, slot: String) -> (WatchedRun, Task<Void, Never>) {
        let run = WatchedRun(stream: stream, table: table, slot: slot)
        let task = Task {
            do {
                try await stream.run()
                run.outcome.withLock { $0 = .success(()) }
            } catch {
                run.outcome.withLock { $0 = .failure(error) }
            }
        }
        return (run, task)
    }

    /// The error `run()` ended with, waiting up to 30 s; throws if it went on (or ended without one).
    func failure() async throws -> any Error {
        let patience = ContinuousClock.now + .seconds(30)
        while outcome.withLock({ $0 == nil }) && ContinuousClock.now < patience { try await Task.sleep(for: .milliseconds(20)) }
        guard case .failure(let failure)? = outcome.withLock({ $0 }) else { throw StreamWentOn() }
        return failure
    }
}

/// Runs a stream on a new table (one `id int` column) in a task of its own, configured by
/// `configure`, streaming before `body` runs; stops it and drops what it made at the end.
private func withFailingStream(
    prefix: String, _ configure: @escaping @Sendable (inout ChangeStream.Configuration) -> Void,
    _ body: @Sendable (WatchedRun, PostgresConnection) async throws -> Void
) async throws {
    try await TestDatabase.withDatabase { url in
        let table = uniqueCaptureName(prefix)
        let slot = uniqueCaptureName("cs_slot")
        try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
        var configuration = ChangeStream.Configuration(
            connectionString: url, slotName: slot, publicationName: slot + "_pub", tables: [table],
            statusInterval: .milliseconds(200), lagInterval: .milliseconds(500))
        configure(&configuration)
        let stream = ChangeStream(configuration)
        let (run, running) = WatchedRun.start(stream, table: table, slot: slot)
        let sql = try await PostgresConnection.connect(to: url)
        var failure: (any Error)?
        do {
            try await waitUntilStreaming(stream)
            try await body(run, sql)
        } catch {
            failure = error
        }
        stream.stop()
        await running.value
        _ = try? await sql.query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", slot)
        await sql.close()
        try? await runSQL(url, "DROP TABLE \(table)")
        try? await runSQL(url, "DROP PUBLICATION IF EXISTS \(slot)_pub")
        if let failure { throw failure }
    }
}

/// The stream kept running when it should have failed.
private struct StreamWentOn: Error, CustomStringConvertible {
    var description: String { "the stream went on (no error within 30 s)" }
}
