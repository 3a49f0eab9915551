import Foundation
import PoolKit
import RealtimeSync
import Testing
import TestSupport

@Suite("auth end to end: RealtimeService with a JWT secret over PostgreSQL")
struct AuthServiceTests {
    @Test("Fail closed on real rows: DELETE withheld when the key-only old row lacks tenant_id, delivered with REPLICA IDENTITY FULL or tenant_id in the key; UPDATE judged by the new row")
    func deleteAndUpdateOnRealRows() async throws {
        try await TestDatabase.withDatabase { url in
            let base = uniqueCaptureName("auth")
            let (keyOnly, full, keyed) = ("\(base)_key", "\(base)_full", "\(base)_pk")
            let sql = try await PostgresConnection.connect(to: url)
            do {
                _ = try await sql.execute("""
                    CREATE TABLE \(keyOnly) (id int PRIMARY KEY, tenant_id int, status text);
                    CREATE TABLE \(full) (id int PRIMARY KEY, tenant_id int, status text);
                    ALTER TABLE \(full) REPLICA IDENTITY FULL;
                    CREATE TABLE \(keyed) (tenant_id int, id int, status text, PRIMARY KEY (tenant_id, id));
                    """)
            } catch {
                await sql.close()
                throw error
            }
            let tables = ["public.\(keyOnly)", "public.\(full)", "public.\(keyed)"]
            let auth = try await JWTAuthenticator(secret: testJWTSecret)
            let token = try await testToken(Dictionary(uniqueKeysWithValues: tables.map { ($0, "tenant_id=eq.42") }))
            let other = try await testToken(["public.\(keyOnly)": "tenant_id=eq.43"])
            do {
                try await withRealtimeService(url: url, tables: tables, configure: { $0.server.auth = auth }) { _, running, _ in
                    let client = try await connectWebSocket(port: running.port, token: token)
                    try await client.subscribe("k", table: tables[0])
                    let fullCursor = try await client.subscribe("f", table: tables[1])
                    try await client.subscribe("p", table: tables[2])
                    try await client.subscribe("k-open", table: tables[0], filter: "status=eq.open")
                    let tenant43 = try await connectWebSocket(port: running.port, token: other)
                    try await tenant43.subscribe("k", table: tables[0])
                    for table in [keyOnly, full, keyed] {
                        _ = try await sql.execute("INSERT INTO \(table) (id, tenant_id, status) VALUES (1, 42, 'open'), (2, 43, 'open')")
                    }
                    _ = try await sql.execute("UPDATE \(full) SET tenant_id = 43 WHERE id = 1")  // moves out of 42: not sent to 42
                    _ = try await sql.execute("UPDATE \(full) SET tenant_id = 42 WHERE id = 2")  // moves into 42: sent, its old row withheld
                    _ = try await sql.execute("UPDATE \(full) SET status = 'moved' WHERE id = 2")  // within 42: sent with the whole old row
                    for table in [keyOnly, full, keyed] { _ = try await sql.execute("DELETE FROM \(table)") }
                    _ = try await sql.execute("INSERT INTO \(keyOnly) (id, tenant_id, status) VALUES (3, 42, 'closed')")  // marker

                    var seen: [String] = []
                    var updateOlds: [[String: Any]] = []
                    while seen.last != "INSERT k 3" {
                        let change = try await client.receiveJSON(timeout: 20)
                        if change["op"] as? String == "UPDATE" { updateOlds.append(change["old"] as? [String: Any] ?? ["null": change["old"] is NSNull]) }
                        let row = (change["new"] as? [String: Any]) ?? (change["old"] as? [String: Any]) ?? [:]
                        let ids = (change["ids"] as? [String] ?? []).joined(separator: ",")
                        seen.append("\(change["op"] as? String ?? "?") \(ids) \(row["id"] as? Int ?? -1)")
                    }
                    #expect(seen == [
                        "INSERT k,k-open 1", "INSERT f 1", "INSERT p 1",
                        "UPDATE f 2", "UPDATE f 2",
                        // DELETE FROM keyOnly: withheld (its old row carries only id)
                        "DELETE f 2",  // full old row: tenant_id 42 (row 1 had moved to 43)
                        "DELETE p 1",  // tenant_id is part of the key
                        "INSERT k 3",
                    ])
                    // The row as it was in tenant 43 is not 42's to see: old is null. Once in 42, all of it.
                    #expect(updateOlds.count == 2)
                    #expect(updateOlds.first?["null"] as? Bool == true, "\(updateOlds)")
                    #expect(updateOlds.last?["tenant_id"] as? Int == 42 && updateOlds.last?["status"] as? String == "open", "\(updateOlds)")
                    // The same from a `since` catch-up (read from the window, not the live fan-out).
                    let resumed = try await connectWebSocket(port: running.port, token: token)
                    try await resumed.subscribe("again", table: tables[1], since: fullCursor)
                    var replayedOlds: [[String: Any]] = []
                    while replayedOlds.count < 2 {
                        let change = try await resumed.receiveJSON(timeout: 20)
                        if change["op"] as? String == "UPDATE" { replayedOlds.append(change["old"] as? [String: Any] ?? ["null": change["old"] is NSNull]) }
                    }
                    #expect(replayedOlds.first?["null"] as? Bool == true, "\(replayedOlds)")
                    #expect(replayedOlds.last?["status"] as? String == "open", "\(replayedOlds)")
                    await resumed.close()
                    // The other tenant saw its own row only, and no DELETE from the key-only table either.
                    let theirs = try await tenant43.receiveJSON(timeout: 20)
                    #expect(theirs["op"] as? String == "INSERT")
                    #expect((theirs["new"] as? [String: Any])?["id"] as? Int == 2)
                    try await tenant43.subscribe("marker", table: tables[0])  // the next message answers this
                    await client.close()
                    await tenant43.close()
                }
            } catch {
                await sql.close()
                throw error
            }
            _ = try? await sql.execute("DROP TABLE \(keyOnly), \(full), \(keyed)")
            await sql.close()
        }
    }
    @Test("snapshot:true with auth: the rows are filtered by the token's mandatory filter ANDed with the client's, like the changes that follow")
    func snapshotUnderMandatoryFilter() async throws {
        try await TestDatabase.withDatabase { url in
            let table = "public." + uniqueCaptureName("auth_snap")
            let sql = try await PostgresConnection.connect(to: url)
            do {
                _ = try await sql.execute("""
                    CREATE TABLE \(table) (id int PRIMARY KEY, tenant_id int, status text);
                    INSERT INTO \(table) SELECT g, 40 + g % 3, CASE WHEN g % 2 = 0 THEN 'paid' ELSE 'open' END FROM generate_series(1, 30) g;
                    """)
                let auth = try await JWTAuthenticator(secret: testJWTSecret)
                let token = try await testToken([table: "tenant_id=eq.42"])
                try await withRealtimeService(url: url, tables: [table], configure: { $0.server.auth = auth }) { _, running, _ in
                    let client = try await connectWebSocket(port: running.port, token: token)
                    let all = try await client.subscribeWithSnapshot("all", table: table)
                    #expect(all.rows.compactMap { $0["id"] as? Int }.sorted() == (1...30).filter { 40 + $0 % 3 == 42 })
                    #expect(all.rows.allSatisfy { $0["tenant_id"] as? Int == 42 })
                    let paid = try await client.subscribeWithSnapshot("paid", table: table, filter: "status=eq.paid")
                    #expect(paid.rows.compactMap { $0["id"] as? Int }.sorted() == (1...30).filter { 40 + $0 % 3 == 42 && $0 % 2 == 0 })
                    _ = try await sql.execute("INSERT INTO \(table) VALUES (100, 41, 'paid'), (101, 42, 'open')")
                    let change = try await client.receiveJSON(timeout: 20)
                    #expect((change["new"] as? [String: Any])?["id"] as? Int == 101)
                    #expect(change["ids"] as? [String] == ["all"])
                    await client.close()
                }
            } catch {
                _ = try? await sql.execute("DROP TABLE \(table)")
                await sql.close()
                throw error
            }
            _ = try? await sql.execute("DROP TABLE \(table)")
            await sql.close()
        }
    }
}
