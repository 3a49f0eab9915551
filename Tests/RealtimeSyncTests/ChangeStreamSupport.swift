import Foundation
import PoolKit
import RealtimeSync
import Testing
import TestSupport

/// A unique lower-case name per test (slots, publications and tables share one server).
func uniqueCaptureName(_ prefix: String) -> String {
    "\(prefix)_\(UInt32.random(in: 0...UInt32.max))"
}

/// Runs SQL on a fresh connection, closed however the statement ends.
func runSQL(_ url: String, _ sql: String) async throws {
    let connection = try await PostgresConnection.connect(to: url)
    do {
        _ = try await connection.execute(sql)
    } catch {
        await connection.close()
        throw error
    }
    await connection.close()
}

struct CaptureTimedOut: Error, CustomStringConvertible {
    var what: String
    var description: String { "timed out: \(what)" }
}

/// Runs `body`, failing with `CaptureTimedOut` after `limit`.
func within<T: Sendable>(_ limit: Duration, _ what: String = "operation", _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask { try await Task.sleep(for: limit); return nil }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else { throw CaptureTimedOut(what: what) }
        return value
    }
}

/// The subscription ended normally before `take` had all the changes it was asked for.
struct ChangesEndedEarly: Error, CustomStringConvertible {
    var expected: Int
    var received: Int
    var description: String { "the subscription ended after \(received) of the \(expected) changes expected" }
}

/// Reads exactly `count` changes: fails after `timeout`, and with `ChangesEndedEarly` when the
/// subscription ends before `count` changes came (never returns fewer).
func take(_ count: Int, from subscription: ChangeSubscription, timeout: Duration = .seconds(30)) async throws -> [ChangeEvent] {
    try await within(timeout, "\(count) changes") {
        var events: [ChangeEvent] = []
        events.reserveCapacity(count)
        guard count > 0 else { return events }
        for try await event in subscription {
            events.append(event)
            if events.count == count { break }
        }
        guard events.count == count else { throw ChangesEndedEarly(expected: count, received: events.count) }
        return events
    }
}

/// A running `ChangeStream` on the given tables, stopped and its slot dropped at the end.
///
/// `body` gets the stream and a SQL connection; the stream is streaming before `body` runs.
func withChangeStream<T: Sendable>(
    url: String, tables: [String], slot: String = uniqueCaptureName("cs_slot"), publication: String? = nil,
    window: ResumeWindow<ContinuousClock.Instant>.Limits = .init(), consumerBufferLimit: Int = 10_000,
    dropSlotAtEnd: Bool = true,
    _ body: @escaping @Sendable (ChangeStream, PostgresConnection) async throws -> T
) async throws -> T {
    let config = ChangeStream.Configuration(
        connectionString: url, slotName: slot, publicationName: publication ?? slot + "_pub", tables: tables,
        window: window, statusInterval: .milliseconds(200), lagInterval: .milliseconds(500),
        reconnectInitialDelay: .milliseconds(50), reconnectMaxDelay: .milliseconds(500),
        consumerBufferLimit: consumerBufferLimit)
    let stream = ChangeStream(config)
    let sql = try await PostgresConnection.connect(to: url)
    do {
        let result = try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await stream.run() }
            try await waitUntilStreaming(stream)
            let result = try await body(stream, sql)
            stream.stop()
            try await group.waitForAll()
            return result
        }
        if dropSlotAtEnd { try await stream.dropSlot() }
        await sql.close()
        return result
    } catch {
        stream.stop()
        if dropSlotAtEnd { _ = try? await stream.dropSlot() }
        await sql.close()
        throw error
    }
}

func waitUntilStreaming(_ stream: ChangeStream, timeout: Duration = .seconds(30)) async throws {
    let deadline = ContinuousClock.now + timeout
    while !stream.statistics.connected {
        if ContinuousClock.now > deadline { throw CaptureTimedOut(what: "stream to connect") }
        try await Task.sleep(for: .milliseconds(10))
    }
}

/// The JSON object of an event, parsed with Foundation.
func jsonObject(_ event: ChangeEvent) throws -> [String: Any] {
    try #require(try parseJSON(event.jsonBytes()) as? [String: Any])
}

/// The text of an event's new (or old) value of `column`.
func newText(_ event: ChangeEvent, _ column: String) -> String? {
    guard case .text(let bytes)? = event.newValue(column) else { return nil }
    return String(decoding: bytes, as: UTF8.self)
}

/// Runs blocking work (initdb, pg_ctl) on its own thread: neither on the cooperative pool nor
/// on Dispatch's small pool, where seconds of blocking would delay other tests' libpq connects.
func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { cont in
        let thread = Thread {
            do { cont.resume(returning: try body()) } catch { cont.resume(throwing: error) }
        }
        thread.start()
    }
}

/// A private cluster for tests that restart or misconfigure the server. It runs alone among
/// the database tests (its processes and file descriptors would disturb fd-counting tests).
func withPrivateCluster<T: Sendable>(_ options: EmbeddedPostgres.Options = .init(),
                                     _ body: @escaping @Sendable (EmbeddedPostgres) async throws -> T) async throws -> T {
    try await TestDatabase.withDatabaseAlone { _ in try await runPrivateCluster(options, body) }
}

private func runPrivateCluster<T: Sendable>(_ options: EmbeddedPostgres.Options,
                                            _ body: @Sendable (EmbeddedPostgres) async throws -> T) async throws -> T {
    let pg = try await offPool { try EmbeddedPostgres.startBlocking(options) }
    do {
        let result = try await body(pg)
        try await offPool { pg.stop() }
        return result
    } catch {
        try await offPool { pg.stop() }
        throw error
    }
}

/// The slot's `confirmed_flush_lsn` as the server holds it.
func slotConfirmedFlush(_ sql: PostgresConnection, slot: String) async throws -> LSN {
    let rows = try await sql.query("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '\(slot)'")
    return try #require(try rows.first?.decode(String.self, at: 0).flatMap { LSN($0) }, "no slot \(slot)")
}
