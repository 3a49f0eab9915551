import Foundation
@testable import PoolKit
import Testing
import TestSupport

/// A unique, valid slot/table name suffix per test.
private func uniqueName(_ prefix: String) -> String {
    "\(prefix)_\(UInt32.random(in: 0...UInt32.max))"
}

/// A table with its publication and a fresh slot name for one test. The fixture owns them and
/// the SQL connection: afterwards, also when the test fails, it drops the slot (once inactive,
/// so no slot is left holding WAL), the publication and the table, and closes the connection.
private func withReplicationFixture(
    _ url: String, columns: String = "id int PRIMARY KEY",
    _ body: (_ sql: PostgresConnection, _ slot: String, _ table: String) async throws -> Void
) async throws {
    let slot = uniqueName("rc_slot")
    let table = uniqueName("rc_t")
    let sql = try await PostgresConnection.connect(to: url)
    var failure: (any Error)?
    do {
        try await sql.execute("CREATE TABLE \(table) (\(columns)); CREATE PUBLICATION \(table)_pub FOR TABLE \(table)")
        try await body(sql, slot, table)
    } catch {
        failure = error
    }
    try? await waitUntilInactive(sql, slot: slot)
    _ = try? await sql.query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot)
    _ = try? await sql.execute("DROP PUBLICATION IF EXISTS \(table)_pub; DROP TABLE IF EXISTS \(table)")
    await sql.close()
    if let failure { throw failure }
}

/// pgoutput options for the fixture's publication.
private func pgoutputOptions(_ table: String) -> [(String, String)] {
    [("proto_version", "1"), ("publication_names", "\(table)_pub")]
}

@Suite("ReplicationConnection (real Postgres)", .serialized)
struct ReplicationConnectionTests {
    @Test("A malformed CopyData message (short XLogData or keepalive, unknown tag) is a decoding error, not a broken connection to reconnect for")
    func malformedMessages() {
        for bytes in [[UInt8(ascii: "w")] + Array(repeating: 0, count: 10), [UInt8(ascii: "k"), 0, 0], [UInt8(ascii: "x"), 1], []] {
            let error = #expect(throws: PostgresError.self) {
                _ = try bytes.withUnsafeBytes { try ReplicationConnection.parse($0, backend: 1) }
            }
            #expect(error?.code == .decoding, "\(bytes)")
            #expect(error?.isConnectionBroken == false)
        }
        var keepalive: [UInt8] = [UInt8(ascii: "k")] + Array(repeating: 0, count: 17)
        keepalive[17] = 1
        guard case .keepalive(let parsed)? = try? keepalive.withUnsafeBytes({ try ReplicationConnection.parse($0, backend: 1) }) else {
            Issue.record("a well-formed keepalive must parse"); return
        }
        #expect(parsed.replyRequested)
    }

    @Test("IDENTIFY_SYSTEM, slot created once, COPY BOTH stream of one transaction, status updates, clean stop")
    func streamOneTransaction() async throws {
        try await TestDatabase.withDatabase { url in try await withReplicationFixture(url, columns: "id int PRIMARY KEY, v text") { sql, slot, table in

            let repl = try await ReplicationConnection.connect(.init(url))
            let identity = try await repl.identifySystem()
            #expect(identity.timeline >= 1)
            #expect(identity.xlogPosition > 0)
            #expect(identity.databaseName == "postgres")
            #expect(try await repl.createSlotIfMissing(slot))
            #expect(try await repl.createSlotIfMissing(slot) == false)

            try await repl.startReplication(slot: slot, options: [("proto_version", "1"), ("publication_names", "\(table)_pub")],
                                            statusInterval: .milliseconds(100))
            try await sql.execute("INSERT INTO \(table) VALUES (1, 'a'), (2, 'b')")

            // Begin, Relation, Insert, Insert, Commit: read until the Commit ('C').
            let tags = try await withTimeout(.seconds(20)) {
                var tags: [Character] = []
                while let message = try await repl.readMessage() {
                    guard case .xLogData(let data) = message else { continue }
                    #expect(data.walEnd >= data.walStart)
                    #expect(data.sendTime > 0)
                    tags.append(Character(UnicodeScalar(data.payload[0])))
                    if data.payload[0] == UInt8(ascii: "C") { break }
                }
                return tags
            }
            // A Relation comes before the first Insert; pgoutput may send it again at any time
            // (publication DDL by other sessions invalidates its cache).
            #expect(tags.filter { $0 != "R" } == ["B", "I", "I", "C"])
            #expect(tags.firstIndex(of: "R")! < tags.firstIndex(of: "I")!)

            // Idle for a few status intervals: the schedule sends updates without any message.
            let before = repl.statusUpdatesSent
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await repl.runStatusSchedule() }
                group.addTask {
                    try await Task.sleep(for: .milliseconds(450))
                    await repl.wake()
                }
                while try await repl.readMessage() != nil {}
                group.cancelAll()
            }
            #expect(repl.statusUpdatesSent >= before + 2)

            await repl.stop()
            #expect(repl.isClosed)
            await repl.close()  // idempotent

            // The slot is no longer active and can be dropped.
            try await waitUntilInactive(sql, slot: slot)
            try await sql.query("SELECT pg_drop_replication_slot($1)", slot)
        } }
    }

    @Test("A walsender terminated mid-stream: the read fails as a broken connection with the server's SQLSTATE (57P01) and message")
    func terminatedWalsender() async throws {
        try await TestDatabase.withDatabase { url in try await withReplicationFixture(url) { sql, slot, table in
            let repl = try await ReplicationConnection.connect(.init(url))
            #expect(try await repl.createSlotIfMissing(slot))
            try await repl.startReplication(slot: slot, options: pgoutputOptions(table), statusInterval: .seconds(10))
            _ = try await sql.query("SELECT pg_terminate_backend($1)", Int(repl.backendPID))
            do {
                try await withTimeout(.seconds(20)) { while try await repl.readMessage() != nil {} }
                Issue.record("the stream of a terminated walsender must fail, not end")
            } catch let error as PostgresError {
                #expect(error.code == .connectionBroken, "got \(error)")
                #expect(error.sqlState == "57P01", "got \(error)")
                #expect(error.message.contains("terminating connection"), "got \(error)")
            }
            await repl.close()
        } }
    }

    @Test("stop() with status updates due every millisecond still reads the stream to its end: no update follows our CopyDone")
    func stopWithUpdatesDue() async throws {
        try await TestDatabase.withDatabase { url in try await withReplicationFixture(url, columns: "id int PRIMARY KEY, v text") { sql, slot, table in
            let repl = try await ReplicationConnection.connect(.init(url))
            #expect(try await repl.createSlotIfMissing(slot))
            try await repl.startReplication(slot: slot, options: [("proto_version", "1"), ("publication_names", "\(table)_pub")],
                                            statusInterval: .milliseconds(1))
            // A backlog that stop() must read through after its CopyDone, for many milliseconds.
            try await sql.execute("INSERT INTO \(table) SELECT g, repeat('x', 100) FROM generate_series(1, 50000) g")
            try await Task.sleep(for: .milliseconds(100))
            await repl.stop(timeout: .seconds(20))
            #expect(repl.stoppedCleanly, "stop() gave up on the stream instead of reading it to its end")
            #expect(repl.isClosed)
            try await waitUntilInactive(sql, slot: slot)
            try await sql.query("SELECT pg_drop_replication_slot($1)", slot)
        } }
    }

    @Test("sendStatus from another task, beside a parked reader, with the socket full (walsender stopped): returns, no spin; the stream goes on after")
    func sendStatusBesideParkedReader() async throws {
        try await TestDatabase.withDatabase { url in try await withReplicationFixture(url) { sql, slot, table in
            let repl = try await ReplicationConnection.connect(.init(url))
            #expect(try await repl.createSlotIfMissing(slot))
            try await repl.startReplication(slot: slot, options: pgoutputOptions(table), statusInterval: .seconds(3_600))
            let reader = Task { () -> Bool in
                while let message = try await repl.readMessage() {
                    if case .xLogData(let data) = message, data.payload.first == UInt8(ascii: "I") { return true }
                }
                return false
            }
            try await Task.sleep(for: .milliseconds(300))  // the reader parks on the socket
            // The walsender stops reading: 400,000 updates (15.6 MB) are more than the two
            // sockets' buffers hold, so some sendStatus finds the socket full while the reader
            // waits on it. Before, that call retried against the reader's wait without pause
            // (a core spinning) until the reader woke, which nothing made it do: it timed out.
            let walsender = repl.backendPID
            #expect(kill(walsender, SIGSTOP) == 0)
            let clock = ContinuousClock()
            let started = clock.now
            var failure: (any Error)?
            do {
                try await withTimeout(.seconds(60)) { for _ in 0..<400_000 { try await repl.sendStatus() } }
            } catch {
                failure = error
            }
            let elapsed = started.duration(to: clock.now)
            kill(walsender, SIGCONT)
            #expect(failure == nil, "sendStatus failed or hung: \(String(describing: failure))")
            #expect(repl.statusUpdatesSent >= 400_000, "took \(elapsed)")
            // The walsender reads the backlog, and the reader still gets the stream.
            try await sql.execute("INSERT INTO \(table) VALUES (1)")
            let gotInsert = try await withTimeout(.seconds(30)) {
                try await withTaskCancellationHandler { try await reader.value } onCancel: { reader.cancel() }
            }
            #expect(gotInsert)
            await repl.stop()
        } }
    }

    @Test("The confirmed position reaches the server; a restart from it does not resend the transaction")
    func confirmedFlush() async throws {
        try await TestDatabase.withDatabase { url in try await withReplicationFixture(url) { sql, slot, table in
            let options = pgoutputOptions(table)

            let first = try await ReplicationConnection.connect(.init(url))
            try await first.createSlotIfMissing(slot)
            try await first.startReplication(slot: slot, options: options)
            try await sql.execute("INSERT INTO \(table) VALUES (1)")
            let end = try await withTimeout(.seconds(20)) {
                var end: UInt64 = 0
                while let message = try await first.readMessage() {
                    if case .xLogData(let data) = message, data.payload[0] == UInt8(ascii: "C") {
                        // Commit: flags(1) commitLSN(8) endLSN(8)
                        end = data.payload[10..<18].reduce(0) { $0 << 8 | UInt64($1) }
                        break
                    }
                }
                return end
            }
            first.confirm(flushedThrough: end)
            await first.stop()
            try await waitUntilInactive(sql, slot: slot)
            let confirmed = try await sql.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot)
            #expect(try confirmed[0].decode(String.self, at: 0) == lsnText(end))

            try await sql.execute("INSERT INTO \(table) VALUES (2)")
            let second = try await ReplicationConnection.connect(.init(url))
            try await second.startReplication(slot: slot, options: options)
            let firstInsertSeen = try await withTimeout(.seconds(20)) {
                var firstInsertSeen = false
                while let message = try await second.readMessage() {
                    guard case .xLogData(let data) = message else { continue }
                    if data.payload[0] == UInt8(ascii: "I") {
                        // The last column value is the id as text.
                        let text = String(decoding: data.payload.suffix(1), as: UTF8.self)
                        if text == "1" { firstInsertSeen = true }
                    }
                    if data.payload[0] == UInt8(ascii: "C") { break }
                }
                return firstInsertSeen
            }
            #expect(!firstInsertSeen)
            await second.stop()
        } }
    }

    @Test("A keepalive that asks for a reply is answered at once: with wal_sender_timeout=400ms and no scheduled updates the stream stays up")
    func replyWhenAsked() async throws {
        try await TestDatabase.withDatabase { url in try await withReplicationFixture(url) { sql, slot, table in
            let separator = url.contains("?") ? "&" : "?"
            let repl = try await ReplicationConnection.connect(.init(url + separator + "options=-c%20wal_sender_timeout%3D400"))
            try await repl.createSlotIfMissing(slot)
            // Scheduled updates every hour: only the server's requests make us answer.
            try await repl.startReplication(slot: slot, options: pgoutputOptions(table), statusInterval: .seconds(3600))
            let before = repl.statusUpdatesSent
            let requests = try await withThrowingTaskGroup(of: Int.self) { group in
                group.addTask {
                    var requests = 0
                    while let message = try await repl.readMessage() {
                        if case .keepalive(let k) = message, k.replyRequested { requests += 1 }
                    }
                    return requests
                }
                group.addTask {
                    // 1.5 s is almost four timeouts: without replies the server would have ended the stream.
                    try await Task.sleep(for: .milliseconds(1_500))
                    await repl.wake()
                    return 0
                }
                var total = 0
                for try await n in group { total += n }
                return total
            }
            #expect(requests >= 2)
            #expect(repl.statusUpdatesSent >= before + requests)
            // Still streaming: a new row arrives.
            try await sql.execute("INSERT INTO \(table) VALUES (1)")
            let sawInsert = try await withTimeout(.seconds(10)) {
                while let message = try await repl.readMessage() {
                    if case .xLogData(let d) = message, d.payload.first == UInt8(ascii: "I") { return true }
                }
                return false
            }
            #expect(sawInsert)
            await repl.stop()
        } }
    }

    @Test("START_REPLICATION of a missing slot is a server error naming it; the connection closes once")
    func missingSlot() async throws {
        try await TestDatabase.withDatabase { url in
            let repl = try await ReplicationConnection.connect(.init(url))
            do {
                try await repl.startReplication(slot: "no_such_slot_here", options: [("proto_version", "1"), ("publication_names", "x")])
                Issue.record("expected an error")
            } catch let error as PostgresError {
                #expect(error.sqlState == "42704")
                #expect(error.description.contains("no_such_slot_here"))
            }
            await repl.stop()
            await repl.close()
            #expect(repl.isClosed)
            do {
                try await repl.createSlotIfMissing("Bad-Name")
                Issue.record("expected an error")
            } catch let error as PostgresError {
                #expect(error.message.contains("a-z, 0-9 and _"))
            }
        }
    }
}

func lsnText(_ lsn: UInt64) -> String {
    String(lsn >> 32, radix: 16, uppercase: true) + "/" + String(lsn & 0xFFFF_FFFF, radix: 16, uppercase: true)
}

func waitUntilInactive(_ sql: PostgresConnection, slot: String) async throws {
    for _ in 0..<500 {
        let rows = try await sql.query("SELECT active FROM pg_replication_slots WHERE slot_name = $1", slot)
        if try rows.count == 0 || rows[0].decode(Bool.self, at: 0) == false { return }
        try await Task.sleep(for: .milliseconds(10))
    }
    Issue.record("slot \(slot) still active after 5 s")
}

struct TimedOut: Error {}

/// Runs `body`, failing with `TimedOut` after `limit`.
func withTimeout<T: Sendable>(_ limit: Duration, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask { try await Task.sleep(for: limit); return nil }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else { throw TimedOut() }
        return value
    }
}

@Suite("ReplicationConnection: settings as SHOW prints them")
struct SettingDurationTests {
    @Test("wal_sender_timeout texts", arguments: [
        ("60s", Duration.seconds(60) as Duration?), ("150ms", .milliseconds(150)), ("1min", .seconds(60)), ("2h", .seconds(7_200)),
        ("0", nil), ("", nil), ("5 parsecs", nil), ("250", .milliseconds(250)),
    ])
    func parse(text: String, expected: Duration?) {
        #expect(ReplicationConnection.parseSettingDuration(text) == expected, "\(text)")
    }
}
