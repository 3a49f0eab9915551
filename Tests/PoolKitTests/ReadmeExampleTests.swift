import Testing
import PoolKit
import TestSupport

/// The README's PoolKit example, run as written (with a table to query), so the docs match the code.
@Suite("README examples")
struct ReadmeExampleTests {
    @Test("the PostgresConnection example runs as written")
    func postgresConnectionExample() async throws {
        try await TestDatabase.withDatabase { url in
            let setup = try await PostgresConnection.connect(to: url)
            try await setup.execute("""
                DROP TABLE IF EXISTS users;
                CREATE TABLE users (id int PRIMARY KEY, name text, tags text[], seen timestamptz);
                INSERT INTO users VALUES (42, 'Ada', '{a,b}', NULL);
                """)
            await setup.close()

            let appURL = url + (url.contains("?") ? "&" : "?") + "application_name=worker"
            let conn = try await PostgresConnection.connect(to: appURL, connectTimeout: .seconds(5))
            let rows = try await conn.query("SELECT id, name, tags FROM users WHERE id = $1", 42)
            var seen: [(Int?, String?)] = []
            for row in rows {
                let id = try row.decode(Int.self, named: "id")
                let name = try row.decode(String.self, named: "name")
                seen.append((id, name))
            }
            #expect(seen.count == 1 && seen[0].0 == 42 && seen[0].1 == "Ada")
            try await conn.execute("BEGIN; UPDATE users SET seen = now() WHERE id = 42; COMMIT")
            let app = try await conn.query("SELECT current_setting('application_name')")
            #expect(try app[0].decode(String.self, at: 0) == "worker")

            try await conn.listen("orders")
            let sender = try await PostgresConnection.connect(to: url)
            try await sender.query("SELECT pg_notify('orders', 'order 1')")
            // The notification must arrive: a sequence that ended at once would skip a for-await body.
            var notes = conn.notifications.makeAsyncIterator()
            let note = try #require(try await notes.next(), "the notification sequence ended without the notification")
            #expect(note.channel == "orders" && note.payload == "order 1" && note.senderPID == sender.backendPID)
            await sender.close()
            await conn.close()
            await conn.close()
            #expect(conn.isClosed)
        }
    }
}
