import Foundation
import PoolKit
import RealtimeSync
import Testing
import TestSupport

@Suite("ChangeStream (real Postgres)", .serialized)
struct ChangeStreamTests {
    @Test("INSERT, UPDATE without and with key change, DELETE with replica identity default and full, TRUNCATE")
    func rowOperations() async throws {
        try await TestDatabase.withDatabase { url in
            let keyed = uniqueCaptureName("cs_keyed")
            let full = uniqueCaptureName("cs_full")
            try await runSQL(url, """
                CREATE TABLE \(keyed) (id int PRIMARY KEY, name text, note text);
                CREATE TABLE \(full) (id int PRIMARY KEY, name text, note text);
                ALTER TABLE \(full) REPLICA IDENTITY FULL;
                """)
            try await withChangeStream(url: url, tables: [keyed, full]) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(keyed) VALUES (1, 'a', 'n1')")
                try await sql.execute("UPDATE \(keyed) SET name = 'b' WHERE id = 1")
                try await sql.execute("UPDATE \(keyed) SET id = 2 WHERE id = 1")
                try await sql.execute("DELETE FROM \(keyed) WHERE id = 2")
                try await sql.execute("INSERT INTO \(full) VALUES (1, 'a', 'n1')")
                try await sql.execute("UPDATE \(full) SET name = 'b' WHERE id = 1")
                try await sql.execute("DELETE FROM \(full) WHERE id = 1")
                try await sql.execute("INSERT INTO \(keyed) VALUES (5, 'x', NULL)")
                try await sql.execute("TRUNCATE \(keyed)")
                let events = try await take(9, from: changes)
                #expect(events.map(\.operation) == [.insert, .update, .update, .delete, .insert, .update, .delete, .insert, .truncate])
                #expect(events.map(\.table) == ["public.\(keyed)", "public.\(keyed)", "public.\(keyed)", "public.\(keyed)",
                                                "public.\(full)", "public.\(full)", "public.\(full)", "public.\(keyed)", "public.\(keyed)"])
                let j = events.map { String(decoding: $0.jsonBytes(), as: UTF8.self) }
                #expect(j[0].contains(#""new":{"id":1,"name":"a","note":"n1"},"old":null,"unchanged":[]"#), "\(j[0])")
                // No key change: the key, read from the new row.
                #expect(j[1].contains(#""new":{"id":1,"name":"b","note":"n1"},"old":{"id":1}"#), "\(j[1])")
                // Key change: the old key.
                #expect(j[2].contains(#""new":{"id":2,"name":"b","note":"n1"},"old":{"id":1}"#), "\(j[2])")
                #expect(j[3].contains(#""op":"DELETE""#) && j[3].contains(#""new":null,"old":{"id":2}"#), "\(j[3])")
                #expect(events[3].oldKind == .key)
                // Replica identity full: whole old rows.
                #expect(j[5].contains(#""new":{"id":1,"name":"b","note":"n1"},"old":{"id":1,"name":"a","note":"n1"}"#), "\(j[5])")
                #expect(j[6].contains(#""new":null,"old":{"id":1,"name":"b","note":"n1"}"#), "\(j[6])")
                #expect(events[6].oldKind == .full)
                #expect(j[8].contains(#""op":"TRUNCATE""#) && j[8].contains(#""new":null,"old":null"#), "\(j[8])")
                // Each statement is its own transaction: cursors increase, index 0.
                #expect(zip(events, events.dropFirst()).allSatisfy { $0.cursor < $1.cursor })
                #expect(events.allSatisfy { $0.index == 0 })
                for event in events { _ = try jsonObject(event) }
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(keyed); DROP TABLE \(full)")
            await cleanup.close()
        }
    }

    @Test("A 1 MB text value arrives whole; an unchanged TOAST column is reported unchanged, not null")
    func largeAndToast() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_toast")
            // EXTERNAL: stored out of line without compression, so the value is TOASTed.
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY, body text, n int); ALTER TABLE \(table) ALTER COLUMN body SET STORAGE EXTERNAL")
            try await withChangeStream(url: url, tables: [table]) { stream, sql in
                let changes = stream.changes()
                let big = String(String(repeating: "abcdefghijklmnopqrstuvwxyz", count: 38_462).prefix(1_000_000))
                try await sql.query("INSERT INTO \(table) VALUES (1, $1, 0)", big)
                try await sql.execute("UPDATE \(table) SET n = 1 WHERE id = 1")
                let events = try await take(2, from: changes)
                #expect(newText(events[0], "body") == big)
                #expect(events[0].jsonBytes().count > 1_000_000)
                #expect(events[1].newValue("body") == .unchanged)
                #expect(events[1].unchangedColumns == ["body"])
                let json = try jsonObject(events[1])
                let new = try #require(json["new"] as? [String: Any])
                #expect(new["body"] == nil)
                #expect(new["n"] as? Int == 1)
                #expect(json["unchanged"] as? [String] == ["body"])
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }

    @Test("Every JSON value form of PROTOCOL.md from a real server")
    func jsonValueForms() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_kinds")
            try await runSQL(url, """
                CREATE TABLE \(table) (id int PRIMARY KEY, big int8, small int2, f4 float4, f8 float8, num numeric,
                  flag bool, txt text, doc json, docb jsonb, raw bytea, at timestamptz, uid uuid, ints int[], nothing text)
                """)
            try await withChangeStream(url: url, tables: [table]) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("""
                    SET TIME ZONE 'UTC';
                    INSERT INTO \(table) VALUES (1, 9223372036854775807, -32768, 1.5, 'NaN', 12345678901234567890.123456789,
                      true, E'quote" back\\\\ nl\\n tab\\t', '{"a": [1, 2.5, null]}', '{"b": {"c": true}}', '\\xdeadbeef',
                      '2026-11-26 18:00:00.123456+00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{1,2,NULL}', NULL)
                    """)
                let event = try #require(try await take(1, from: changes).first)
                let text = String(decoding: event.jsonBytes(), as: UTF8.self)
                let expected = #"{"id":1,"big":9223372036854775807,"small":-32768,"f4":1.5,"f8":"NaN","num":"12345678901234567890.123456789","flag":true,"#
                    + #""txt":"quote\" back\\ nl\n tab\t","doc":{"a": [1, 2.5, null]},"docb":{"b": {"c": true}},"raw":"\\xdeadbeef","#
                    + #""at":"2026-11-26 18:00:00.123456+00","uid":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11","ints":"{1,2,NULL}","nothing":null}"#
                #expect(text.contains(#""new":\#(expected)"#), "\(text)")
                let json = try jsonObject(event)
                #expect(json["op"] as? String == "INSERT")
                #expect((json["cursor"] as? String).map { Cursor($0) == event.cursor } == true)
                #expect((json["commit_time"] as? String)?.hasSuffix("Z") == true)
                #expect(json["xid"] as? Int == Int(event.xid))
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }

    @Test("A domain column counts as its base type (a user's, and information_schema's, whose OIDs are below 16384): written as a JSON number, and compared as a number by a filter built from the catalog")
    func domainColumns() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_domain")
            let level = table + "_level", positive = table + "_positive"
            try await runSQL(url, """
                CREATE DOMAIN \(positive) AS int8 CHECK (VALUE > 0);
                CREATE DOMAIN \(level) AS \(positive);
                CREATE TABLE \(table) (id int PRIMARY KEY, lvl \(level), tag text, n information_schema.cardinal_number)
                """)
            let conn = try await PostgresConnection.connect(to: url)
            let catalog = try await ChangeStreamSource.catalog(of: ["public.\(table)"], using: conn)
            await conn.close()
            let columns = try #require(catalog.columns(of: "public.\(table)"))
            let filter = try Filter(parsing: "lvl=lte.3", columns: columns)
            try await withChangeStream(url: url, tables: [table]) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) VALUES (1, 3, 'a', 5), (2, 10, 'b', 40)")
                let events = try await take(2, from: changes)
                let texts = events.map { String(decoding: $0.jsonBytes(), as: UTF8.self) }
                // Before: information_schema.cardinal_number (OID below 16384) was not looked up: "n":"5".
                #expect(texts[0].contains(#""new":{"id":1,"lvl":3,"tag":"a","n":5}"#), "\(texts[0])")
                #expect(texts[1].contains(#""new":{"id":2,"lvl":10,"tag":"b","n":40}"#), "\(texts[1])")
                // As text, "10" sorts before "3": only a numeric comparison gets these right.
                #expect(filter.matches(events[0]))
                #expect(!filter.matches(events[1]))
            }
            try await runSQL(url, "DROP TABLE \(table); DROP DOMAIN \(level); DROP DOMAIN \(positive)")
        }
    }

    @Test("A partitioned table is captured under its own name, whichever partition a row lands in; a publication that publishes the partitions one by one is refused, naming the option")
    func partitionedTable() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_parted")
            try await runSQL(url, """
                CREATE TABLE \(table) (id int PRIMARY KEY, note text) PARTITION BY RANGE (id);
                CREATE TABLE \(table)_low PARTITION OF \(table) FOR VALUES FROM (0) TO (100);
                CREATE TABLE \(table)_high PARTITION OF \(table) FOR VALUES FROM (100) TO (200)
                """)
            try await withChangeStream(url: url, tables: [table]) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) VALUES (1, 'low'), (150, 'high'); UPDATE \(table) SET note = 'moved' WHERE id = 150")
                let events = try await take(3, from: changes)
                #expect(events.map(\.relation.qualifiedName) == Array(repeating: "public.\(table)", count: 3))
                #expect(events.map(\.operation) == [.insert, .insert, .update])
            }
            // A publication made by hand without publish_via_partition_root.
            let publication = table + "_byhand"
            try await runSQL(url, "CREATE PUBLICATION \(publication) FOR TABLE \(table)")
            let conn = try await PostgresConnection.connect(to: url)
            do {
                _ = try await CaptureSetup.prepare(conn, publication: publication, tables: [table], createPublication: true)
                Issue.record("a publication of the partitions must be refused")
            } catch let error as CaptureSetupError {
                #expect(error.code == .partitionsPublishedSeparately)
                #expect(error.message.contains("publish_via_partition_root = true"), "\(error.message)")
            }
            await conn.close()
            try await runSQL(url, "DROP PUBLICATION \(publication); DROP TABLE \(table)")
        }
    }

    @Test("With a short wal_sender_timeout (its reply requests come 60 ms apart) an idle stream keeps the window's hold on the slot")
    func shortSenderTimeoutKeepsTheHold() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_wst")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let shortTimeout = url + (url.contains("?") ? "&" : "?") + "options=-c%20wal_sender_timeout%3D120ms"
            let slot = uniqueCaptureName("cs_slot")
            try await withChangeStream(url: shortTimeout, tables: [table], slot: slot) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) VALUES (1)")
                let event = try #require(try await take(1, from: changes).first)
                // The window holds that change: the slot must stay at or before it.
                try await Task.sleep(for: .milliseconds(1_500))
                #expect(stream.statistics.confirmedFlush <= event.commitLSN,
                        "the hold was released on an idle database: \(stream.statistics.confirmedFlush) > \(event.commitLSN)")
                // What the server holds, not only what the stream thinks it reported.
                let onServer = try await slotConfirmedFlush(sql, slot: slot)
                #expect(onServer <= event.commitLSN, "the slot moved past the held change: \(onServer) > \(event.commitLSN)")
            }
            try await runSQL(url, "DROP TABLE \(table)")
        }
    }

    @Test("A multi-table transaction is contiguous and transactions arrive in commit order; a rolled-back one is never seen")
    func transactions() async throws {
        try await TestDatabase.withDatabase { url in
            let a = uniqueCaptureName("cs_a")
            let b = uniqueCaptureName("cs_b")
            try await runSQL(url, "CREATE TABLE \(a) (id int PRIMARY KEY); CREATE TABLE \(b) (id int PRIMARY KEY)")
            try await withChangeStream(url: url, tables: [a, b]) { stream, sql in
                let changes = stream.changes()
                let other = try await PostgresConnection.connect(to: stream.configuration.connectionString)
                // T1 starts first but commits last.
                try await other.execute("BEGIN; INSERT INTO \(a) VALUES (1); INSERT INTO \(b) VALUES (1)")
                try await sql.execute("BEGIN; INSERT INTO \(b) VALUES (2); INSERT INTO \(a) VALUES (2); INSERT INTO \(b) VALUES (3); COMMIT")
                try await sql.execute("BEGIN; INSERT INTO \(a) VALUES (99); ROLLBACK")
                try await other.execute("INSERT INTO \(a) VALUES (3); COMMIT")
                try await sql.execute("INSERT INTO \(b) VALUES (4)")
                await other.close()
                let events = try await take(7, from: changes)
                let seen = events.map { "\($0.relation.name == a ? "a" : "b")\(newText($0, "id")!)" }
                #expect(seen == ["b2", "a2", "b3", "a1", "b1", "a3", "b4"])
                #expect(events.map(\.index) == [0, 1, 2, 0, 1, 2, 0])
                #expect(Set(events[0..<3].map(\.xid)).count == 1 && Set(events[3..<6].map(\.xid)).count == 1)
                #expect(events[0].commitLSN < events[3].commitLSN && events[3].commitLSN < events[6].commitLSN)
                #expect(!seen.contains("a99"))
                #expect(zip(events, events.dropFirst()).allSatisfy { $0.cursor < $1.cursor })
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(a); DROP TABLE \(b)")
            await cleanup.close()
        }
    }

    @Test("Resume: a consumer reads half of 10,000 changes and stops; changes(after:) its last cursor gets exactly the other half in order")
    func resumeHalf() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_resume")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            try await withChangeStream(url: url, tables: [table]) { stream, sql in
                let first = stream.changes()
                // 100 transactions of 100 rows.
                try await sql.execute("DO $$ BEGIN FOR t IN 0..99 LOOP INSERT INTO \(table) SELECT t * 100 + g FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$")
                let firstHalf = try await take(5_000, from: first)
                let last = try #require(firstHalf.last?.cursor)
                #expect(firstHalf.map { Int(newText($0, "id")!)! } == Array(1...5_000))

                let second = try stream.changes(after: last)
                let secondHalf = try await take(5_000, from: second)
                #expect(secondHalf.map { Int(newText($0, "id")!)! } == Array(5_001...10_000))
                #expect(secondHalf.first!.cursor > last)
                // Nothing more: the next change is a new one.
                try await sql.execute("INSERT INTO \(table) VALUES (10001)")
                let next = try await take(1, from: second)
                #expect(newText(next[0], "id") == "10001")
                #expect(stream.statistics.changes == 10_001)
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }

    @Test("Capture restart: stop, commit 1,000 changes, start a new stream on the same slot: resuming gets all 1,000 exactly once")
    func captureRestart() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_restart")
            let slot = uniqueCaptureName("cs_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let lastCursor = try await withChangeStream(url: url, tables: [table], slot: slot, dropSlotAtEnd: false) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) SELECT generate_series(1, 10)")
                let events = try await take(10, from: changes)
                return events.last!.cursor
            }
            // Captured nothing while stopped.
            let sql = try await PostgresConnection.connect(to: url)
            try await sql.execute("DO $$ BEGIN FOR t IN 0..9 LOOP INSERT INTO \(table) SELECT 10 + t * 100 + g FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$")
            await sql.close()
            try await withChangeStream(url: url, tables: [table], slot: slot) { stream, sql in
                let resumed = try stream.changes(after: lastCursor)
                let events = try await take(1_000, from: resumed)
                #expect(events.map { Int(newText($0, "id")!)! } == Array(11...1_010))
                try await sql.execute("INSERT INTO \(table) VALUES (5000)")
                let next = try await take(1, from: resumed)
                #expect(newText(next[0], "id") == "5000")
                // The window was rebuilt from the WAL: it also holds the 10 changes from before.
                #expect(stream.statistics.windowCount == 1_011)
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }

    @Test("Caught up (isCaughtUp, what /readyz waits for) only once the window holds what was committed before the stream connected: a restart replays a backlog first; an idle stream is caught up soon")
    func caughtUpAfterTheBacklog() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_caught_up")
            let slot = uniqueCaptureName("cs_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            @Sendable func caughtUp(_ stream: ChangeStream) async throws {
                try await within(.seconds(60), "the stream to catch up") {
                    while !stream.isCaughtUp { try await Task.sleep(for: .milliseconds(1)) }
                }
            }
            try await withChangeStream(url: url, tables: [table], slot: slot, dropSlotAtEnd: false) { stream, _ in
                try await caughtUp(stream)
            }
            // 20,000 changes committed while no stream runs: the next one replays them first.
            try await runSQL(url, "DO $$ BEGIN FOR t IN 0..199 LOOP INSERT INTO \(table) SELECT t * 100 + g FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$")
            try await withChangeStream(url: url, tables: [table], slot: slot) { stream, _ in
                try await caughtUp(stream)
                let held = stream.statistics.windowCount
                #expect(held == 20_000, "caught up with \(held) of the backlog's 20,000 changes in the window")
            }
            try await runSQL(url, "DROP TABLE \(table)")
        }
    }

    @Test("A cursor older than the window gets resync_required, not a silent gap")
    func resyncRequired() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_resync")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            try await withChangeStream(url: url, tables: [table], window: .init(maxCount: 10)) { stream, sql in
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) SELECT generate_series(1, 30)")
                let events = try await take(30, from: changes)
                #expect(throws: ResumeWindowError.self) { _ = try stream.changes(after: events[5].cursor) }
                do {
                    _ = try stream.changes(after: events[5].cursor)
                } catch let error as ResumeWindowError {
                    #expect(error.code == .resyncRequired)
                    #expect(error.oldestResumable == events[19].cursor)
                }
                // The window's edge still resumes.
                let tail = try await take(10, from: try stream.changes(after: events[19].cursor))
                #expect(tail.map(\.cursor) == events[20...].map(\.cursor))
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }

    @Test("Idle database: a heartbeat never moves the slot past a change the window holds, and releases the WAL once the window has let it go")
    func heartbeatAdvancesIdleSlot() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_idle")
            let slot = uniqueCaptureName("cs_slot")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            try await withChangeStream(url: url, tables: [table], slot: slot, window: .init(maxAge: .seconds(2))) { stream, sql in
                @Sendable func confirmedFlush() async throws -> LSN {
                    let rows = try await sql.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '\(slot)'")
                    return try #require(try rows[0].decode(String.self, at: 0).flatMap { LSN($0) })
                }
                @Sendable func heartbeat() async throws {
                    _ = try await sql.query("SELECT pg_logical_emit_message(false, 'realtime-sync-heartbeat', '')")
                }
                let changes = stream.changes()
                try await sql.execute("INSERT INTO \(table) VALUES (1)")
                let event = try await take(1, from: changes)[0]
                // Held: heartbeats while the window holds the change leave the slot at or before it.
                for _ in 0..<3 {
                    try await heartbeat()
                    try await Task.sleep(for: .milliseconds(300))
                }
                #expect(try await confirmedFlush() <= event.commitLSN)
                // Past maxAge the window is empty: the next heartbeat lets the slot move on.
                try await Task.sleep(for: .seconds(2.2))
                let deadline = ContinuousClock.now + .seconds(20)
                var confirmed = try await confirmedFlush()
                while confirmed <= event.commitLSN, ContinuousClock.now < deadline {
                    try await heartbeat()
                    try await Task.sleep(for: .milliseconds(250))
                    confirmed = try await confirmedFlush()
                }
                #expect(confirmed > event.commitLSN, "slot still at \(confirmed), change committed at \(event.commitLSN)")
                // In this process the change's cursor still resumes, with nothing missed.
                let resumed = try stream.changes(after: event.cursor)
                try await sql.execute("INSERT INTO \(table) VALUES (2)")
                let next = try await take(1, from: resumed)
                #expect(next.map { newText($0, "id") } == ["2"])
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }

    @Test("A slow consumer is cut off after consumerBufferLimit with its last cursor, and resumes from it without loss")
    func slowConsumer() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_slow")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            try await withChangeStream(url: url, tables: [table], consumerBufferLimit: 50) { stream, sql in
                let slow = stream.changes()
                try await sql.execute("DO $$ BEGIN FOR t IN 0..9 LOOP INSERT INTO \(table) SELECT t * 20 + g FROM generate_series(1, 20) g; COMMIT; END LOOP; END $$")
                try await within(.seconds(30), "200 changes captured") {
                    while stream.statistics.changes < 200 { try await Task.sleep(for: .milliseconds(10)) }
                }
                var got: [Int] = []
                var resumeAfter: Cursor?
                do {
                    for try await event in slow { got.append(Int(newText(event, "id")!)!) }
                    Issue.record("expected consumer_too_slow")
                } catch let error as ChangeStreamError {
                    #expect(error.code == .consumerTooSlow)
                    #expect(error.message.contains("consumerBufferLimit=50"))
                    resumeAfter = error.resumeAfter
                }
                #expect(got == Array(1...60))  // transactions of 20 let in while at most 50 are queued: 20, 40, 60; not the fourth
                #expect(stream.statistics.consumersCutOff == 1)
                let rest = try await take(200 - got.count, from: try stream.changes(after: try #require(resumeAfter)))
                #expect(rest.map { Int(newText($0, "id")!)! } == Array((got.count + 1)...200))
            }
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }

    @Test("stop() first delivers everything committed before it was called, then ends every consumer")
    func stopCatchesUp() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_stop")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let consumer = try await withChangeStream(url: url, tables: [table]) { stream, sql in
                let subscription = stream.changes()
                let consumer = Task {
                    var ids: [Int] = []
                    for try await event in subscription { ids.append(Int(newText(event, "id")!)!) }
                    return ids
                }
                try await sql.execute("DO $$ BEGIN FOR t IN 0..19 LOOP INSERT INTO \(table) SELECT t * 100 + g FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$")
                return consumer  // withChangeStream calls stop() at once
            }
            #expect(try await within(.seconds(20)) { try await consumer.value } == Array(1...2_000))
            try await runSQL(url, "DROP TABLE \(table)")
        }
    }

    @Test("Dropping a consumer's sequence or cancelling its task releases it; stopping the stream ends every consumer")
    func release() async throws {
        try await TestDatabase.withDatabase { url in
            let table = uniqueCaptureName("cs_release")
            try await runSQL(url, "CREATE TABLE \(table) (id int PRIMARY KEY)")
            let survivor = try await withChangeStream(url: url, tables: [table]) { stream, sql in
                do { _ = stream.changes() }
                #expect(stream.statistics.consumers == 0)
                let waiting = Task {
                    for try await _ in stream.changes() {}
                    return true
                }
                // The task registers when it calls changes(): wait for that, not for a fixed time.
                #expect(await eventually(10) { stream.statistics.consumers == 1 }, "the waiting consumer never registered")
                waiting.cancel()
                _ = try await waiting.value
                #expect(stream.statistics.consumers == 0)
                let survivor = Task {
                    var n = 0
                    for try await _ in stream.changes() { n += 1 }
                    return n
                }
                // Subscribed before the insert, or it would (rightly) miss the change.
                try #require(await eventually(10) { stream.statistics.consumers == 1 }, "the surviving consumer never registered")
                try await sql.execute("INSERT INTO \(table) VALUES (1)")
                while stream.statistics.changes < 1 { try await Task.sleep(for: .milliseconds(10)) }
                return survivor
            }
            // The stream stopped: the consumer's iteration ended normally after the change.
            #expect(try await within(.seconds(10)) { try await survivor.value } == 1)
            let cleanup = try await PostgresConnection.connect(to: url)
            try await cleanup.execute("DROP TABLE \(table)")
            await cleanup.close()
        }
    }
}
