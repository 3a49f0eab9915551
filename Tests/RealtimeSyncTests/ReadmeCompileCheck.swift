import Foundation
import PoolKit
import RealtimeSync
import Scheduler

// The README's pool, scheduler and RealtimeSync snippets, kept here so that a change to the API
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
                                            options: .init(name: "sync", overlap: .queueOne, timeout: .seconds(30))) { ctx in
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
}
