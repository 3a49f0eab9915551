import Foundation
import Logging
import PoolKit
import RealtimeSync
import ServiceLifecycle
import TestSupport

/// Runs a full `RealtimeService` (pool, capture, scheduler, server) against the test
/// database on 127.0.0.1:0 with a unique slot and publication; shuts it down gracefully
/// after `body` and drops the slot and publication.
func withRealtimeService(
    url: String, tables: [String], demo: RealtimeService.Demo? = nil, logger: Logger? = nil, dropCaptureAtEnd: Bool = true,
    configure: (inout RealtimeService.Configuration) -> Void = { _ in },
    _ body: @Sendable (RealtimeService, RealtimeService.Running, ServiceGroup) async throws -> Void
) async throws {
    let slot = uniqueCaptureName("svc_slot")
    let quiet = Logger(label: "test.service") { _ in SwiftLogNoOpLogHandler() }
    let log = logger ?? quiet
    var configuration = RealtimeService.Configuration(
        databaseURL: url, tables: tables, publication: slot + "_pub", slot: slot,
        server: RealtimeServerConfiguration(host: "127.0.0.1", port: 0, logger: log), logger: log)
    configuration.server.closeTimeout = .seconds(2)
    configuration.demo = demo
    configure(&configuration)
    let service = RealtimeService(configuration)
    let (slotName, publication) = (configuration.slot, configuration.publication)
    do {
        try await withRunningServices([service], start: {
            try await withTimeout(60, "service start") { try await service.waitUntilRunning() }
        }) { running, group in
            try await body(service, running, group)
        }
    } catch {
        await dropCapture(url: url, slot: slotName, publication: publication)
        throw error
    }
    if dropCaptureAtEnd { await dropCapture(url: url, slot: slotName, publication: publication) }
}

/// Drops the test's slot and publication.
func dropCapture(url: String, slot: String, publication: String) async {
    _ = try? await RealtimeService.dropSlot(slot, url: url)
    if let connection = try? await PostgresConnection.connect(to: url) {
        _ = try? await connection.execute("DROP PUBLICATION IF EXISTS \(publication)")
        await connection.close()
    }
}

/// Creates `public.<name>(id serial primary key, status text)` and returns `public.<name>`.
func createServiceTable(url: String, _ name: String = uniqueCaptureName("svc_items")) async throws -> String {
    try await runSQL(url, "CREATE TABLE \(name) (id serial PRIMARY KEY, status text)")
    return "public.\(name)"
}

/// Polls every 20 ms, for at most 15 s, until a session waits for a lock on `table`; true if one does.
func waitForLockWaiter(_ probe: PostgresConnection, table: String) async throws -> Bool {
    let deadline = ContinuousClock.now + .seconds(15)
    while ContinuousClock.now < deadline {
        let rows = try await probe.query("SELECT count(*) FROM pg_locks WHERE relation = '\(table)'::regclass AND NOT granted")
        if try rows[0].decode(Int.self, at: 0) ?? 0 >= 1 { return true }
        try await Task.sleep(for: .milliseconds(20))
    }
    return false
}
