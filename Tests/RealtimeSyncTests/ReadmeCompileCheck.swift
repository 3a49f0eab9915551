import Foundation
import PoolKit
import RealtimeSync
import Scheduler
import Logging
import ServiceLifecycle

// The README's and docs/' snippets (POOL, SCHEDULER, CAPTURE), kept here so that a change to the API
// breaks the build of the tests instead of silently outdating the README. Compiled, not run
// (they need a server that the README's reader has); the PostgresConnection example is run for
// real in PoolKitTests/ReadmeExampleTests.swift.
enum ReadmeSnippets {
    static func pool() async throws {
        let pool = ConnectionPool<PostgresConnection, ContinuousClock>(
            postgres: "postgres://app@localhost/app",
            configuration: .init(name: "main", maxOpen: 20, minIdle: 2, acquireTimeout: .seconds(5)))
        let name = try await pool.withConnection(label: "load-user") { conn in
            try await conn.query("SELECT name FROM users WHERE id = $1", 42)[0].decode(String.self, at: 0)
        }
        print(name ?? "", pool.statistics, pool.holders())
        let report = await pool.drain(deadline: .now + .seconds(10))
        print(report)
    }

    static func scheduler() async throws {
        let scheduler = JobScheduler()
        let handle = try scheduler.schedule(.every(.seconds(5)),
                                            options: .init(name: "sync", overlap: .queueOne, timeout: .seconds(30), ownMetrics: true)) { ctx in
            ctx.logger.info("sync run", metadata: ["attempt": "\(ctx.attempt)"])
        }
        try scheduler.schedule(try .cron("0 3 * * *", timeZone: TimeZone(identifier: "Europe/Berlin")!)) { _ in }
        async let running: Void = scheduler.run()
        handle.cancel()
        let report = await scheduler.shutdown(deadline: .seconds(10))
        try await running
        print(report)
    }

    static func changeStream(lastCursor: Cursor) async throws {
        let stream = ChangeStream(.init(
            connectionString: "postgres://app@db/app",
            slotName: "realtime_sync",
            publicationName: "realtime_sync",
            tables: ["public.orders"]))
        for try await change in try stream.changes(after: lastCursor) {
            print(change.cursor, change.operation, change.table)
        }
    }

    static func auth(secret: String) async throws {
        var configuration = RealtimeService.Configuration(databaseURL: "postgres://app@db/app", tables: ["public.orders"])
        configuration.server.auth = try await JWTAuthenticator(secret: secret)
        let options = try TokenOptions(tables: ["public.orders=tenant_id=eq.42", "public.notes="], ttl: "1h", subject: "user-7")
        print(try await configuration.server.auth!.sign(options.claims()))
    }
    // README: EmbeddedPostgres, RealtimeService, and the reactor executor.
    static func embedded() async throws {
        let pg = try await EmbeddedPostgres.start()
        let conn = try await PostgresConnection.connect(to: pg.url)
        await conn.close()
        await pg.shutdown()
    }

    static func service(url: String, logger: Logger) async throws {
        var configuration = RealtimeService.Configuration(databaseURL: url, tables: ["public.orders"])
        configuration.server.port = 0
        let service = RealtimeService(configuration)
        let group = ServiceGroup(services: [service], gracefulShutdownSignals: [.sigterm], logger: logger)
        async let running: Void = group.run()
        let started = try await service.waitUntilRunning()
        print(started.port, started.pageURL)
        await group.triggerGracefulShutdown()
        try await running
    }

    static func reactorExecutor(conn: PostgresConnection) async throws {
        try await withTaskExecutorPreference(PostgresConnection.preferredExecutor) {
            _ = try await conn.query("SELECT 1")
        }
    }

    // docs/POOL.md
    static func poolWithFactory(logger: Logger) async throws {
        let pool = ConnectionPool(
            configuration: .init(name: "main", maxOpen: 20, minIdle: 2, acquireTimeout: .seconds(5)),
            logger: logger
        ) {
            try await PostgresConnection.connect(to: "postgres://app@localhost/app")
        }
        let group = ServiceGroup(services: [pool], gracefulShutdownSignals: [.sigterm], logger: logger)
        _ = group
        let user = try await pool.withConnection(label: "load-user") { conn in
            try await conn.query("SELECT 1")
        }
        print(user)
        let lease = try await pool.lease(label: "stream-export")
        _ = lease.connection
        await pool.release(lease)
        await pool.release(lease)
    }

    // docs/SCHEDULER.md
    static func schedulerGuide(logger: Logger, syncOnce: @escaping @Sendable () async throws -> Void) async throws {
        let scheduler = JobScheduler()
        let sync = try scheduler.schedule(.every(.seconds(5)),
                                          options: .init(name: "sync", overlap: .queueOne, timeout: .seconds(30), ownMetrics: true)) { ctx in
            ctx.logger.info("sync", metadata: ["late": "\(ctx.lateness)"])
            try await syncOnce()
        }
        try scheduler.schedule(try .cron("0 3 * * *", timeZone: TimeZone(identifier: "Europe/Berlin")!),
                               options: .init(name: "vacuum", retry: .init(maxAttempts: 3))) { _ in try await syncOnce() }
        let group = ServiceGroup(services: [scheduler], gracefulShutdownSignals: [.sigterm], logger: logger)
        _ = group
        async let running: Void = scheduler.run()
        sync.cancel()
        await sync.cancelAndWait()
        let report = await scheduler.shutdown(deadline: .seconds(10))
        try await running
        print(report)
    }

    static func manualClock() async throws {
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock)
        async let running: Void = scheduler.run()
        try scheduler.schedule(.every(.seconds(1))) { _ in try await clock.sleep(for: .seconds(2)) }
        await scheduler.advance(by: .seconds(10))
        await scheduler.stall(for: .seconds(10))
        await scheduler.waitUntilIdle()
        _ = await scheduler.shutdown(deadline: .seconds(1))
        try await running
    }

    // docs/CAPTURE.md
    static func captureGuide(logger: Logger, cursor: Cursor) async throws {
        let stream = ChangeStream(.init(
            connectionString: "postgres://app@db/app",
            slotName: "realtime_sync",
            publicationName: "realtime_sync",
            tables: ["public.orders", "notes"]))
        let group = ServiceGroup(services: [stream], gracefulShutdownSignals: [.sigterm], logger: logger)
        _ = group
        for try await change in stream.changes() { print(change.cursor) }
        for try await change in try stream.changes(after: cursor) { print(change.cursor) }
    }
}
