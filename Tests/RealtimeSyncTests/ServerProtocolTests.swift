import Foundation
import Logging
import PoolKit
@testable import RealtimeSync
import Synchronization
import Testing

@Suite("server: WebSocket protocol")
struct ServerProtocolTests {
    @Test("subscribe, change, unsubscribe: subscribed carries the cursor, changes follow it, none after unsubscribed")
    func subscribeChangeUnsubscribe() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        source.publish(itemInserts([1]))
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            let cursor = try await socket.subscribe("s1", filter: "status=eq.open")
            #expect(cursor == itemInserts([1])[0].cursor.description)
            source.publish(itemInserts([2]))
            let change = try await socket.receiveJSON()
            #expect(change["type"] as? String == "change")
            #expect(change["ids"] as? [String] == ["s1"])
            #expect(change["op"] as? String == "INSERT")
            #expect(change["table"] as? String == "public.items")
            #expect(change["cursor"] as? String == itemInserts([2])[0].cursor.description)
            #expect((change["new"] as? [String: Any])?["id"] as? Int == 2)
            try await socket.sendText(#"{"type":"unsubscribe","id":"s1"}"#)
            let unsubscribed = try await socket.receiveJSON()
            #expect(unsubscribed["type"] as? String == "unsubscribed")
            #expect(unsubscribed["id"] as? String == "s1")
            #expect(test.server.statistics.subscriptions == 0)
            source.publish(itemInserts([3]))
            try await socket.subscribe("s2")  // the next message is this answer, not a change for s1
            // Nothing for s1 follows later either: read up to a change published after s2's
            // subscribed (row 3 may or may not reach s2, depending on when the fan-out saw it).
            source.publish(itemInserts([4]))
            while true {
                let message = try await socket.receiveJSON()
                #expect(message["type"] as? String == "change", "\(message)")
                #expect(!((message["ids"] as? [String]) ?? []).contains("s1"), "a change for s1 after unsubscribed: \(message)")
                if (message["new"] as? [String: Any])?["id"] as? Int == 4 {
                    #expect(message["ids"] as? [String] == ["s2"])
                    break
                }
            }
            try await socket.sendClose()
            #expect(try await socket.receiveClose() == 1000)
        }
    }

    @Test("While changes stream in, every change before unsubscribed carries that id, none follows it, and none precedes the next subscribed")
    func unsubscribeDuringStream() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog, windowLimits: .init(maxCount: 1_000_000))
        // A send queue the stream cannot fill even if this client reads slowly (a loaded
        // machine): a 1013 would end the test for a reason it is not about.
        try await withTestServer(source: source, configure: { $0.queueLimits = .init(maxMessages: 200_000, maxBytes: 256 << 20) }) { test in
            let socket = try await connectWebSocket(port: test.port)
            let publisher = Task {
                var next = 1
                while !Task.isCancelled && next < 200_000 {
                    source.publish(itemInserts(next..<next + 20))
                    next += 20
                    try? await Task.sleep(for: .milliseconds(1))
                }
            }
            defer { publisher.cancel() }
            var lastID = 0
            for round in 1...40 {
                let id = "s\(round)"
                // The next message must be this answer: no change may sit between the previous
                // `unsubscribed` and it, as there was no subscription then.
                try await socket.subscribe(id)
                var received = 0
                while received < 30 {
                    let change = try await socket.receiveJSON()
                    #expect(change["type"] as? String == "change")
                    #expect(change["ids"] as? [String] == [id])
                    let rowID = try #require((change["new"] as? [String: Any])?["id"] as? Int)
                    #expect(rowID > lastID, "changes arrive in commit order")
                    lastID = rowID
                    received += 1
                }
                try await socket.sendText(#"{"type":"unsubscribe","id":"\#(id)"}"#)
                while true {
                    let message = try await socket.receiveJSON()
                    if message["type"] as? String == "unsubscribed" {
                        #expect(message["id"] as? String == id)
                        break
                    }
                    #expect(message["type"] as? String == "change")
                    #expect(message["ids"] as? [String] == [id])
                }
            }
            publisher.cancel()
            await publisher.value
            try await socket.sendClose()
            #expect(try await socket.receiveClose() == 1000)
        }
    }

    @Test("A change matching several subscriptions of one client arrives once, with every matching id")
    func oneMessagePerClient() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("all")
            try await socket.subscribe("open", filter: "status=eq.open")
            try await socket.subscribe("closed", filter: "status=eq.closed")
            try await socket.subscribe("big", filter: "qty=gt.1")
            source.publish(itemInserts([1]))
            source.publish(itemInserts([2], status: "closed"))
            let first = try await socket.receiveJSON()
            #expect(first["ids"] as? [String] == ["all", "open"])
            let second = try await socket.receiveJSON()
            #expect(second["ids"] as? [String] == ["all", "closed", "big"])
            #expect(test.server.statistics.subscriptions == 4)
            await socket.close()
            #expect(await eventually { test.server.statistics.subscriptions == 0 })
        }
    }

    @Test("Each error code the server answers, with the socket left open")
    func errorCodes() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source, configure: { $0.hubLimits = .init(maxSubscriptionsPerClient: 2) }) { test in
            let socket = try await connectWebSocket(port: test.port)
            func expectError(_ message: String, code: String, id: String?) async throws {
                try await socket.sendText(message)
                let answer = try await socket.receiveJSON()
                #expect(answer["type"] as? String == "error", "\(message)")
                #expect(answer["code"] as? String == code, "\(message) → \(answer)")
                #expect(answer["id"] as? String == id, "\(message) → \(answer)")
                #expect((answer["message"] as? String)?.isEmpty == false)
            }
            try await expectError("not json", code: "invalid_message", id: nil)
            try await expectError(#"{"type":"subscribe","id":"x","table":"items","filtr":"a=eq.1"}"#, code: "invalid_message", id: "x")
            try await expectError(#"{"type":"hello","id":"x"}"#, code: "unknown_type", id: "x")
            try await expectError(#"{"type":"subscribe","id":"x","table":"items","filter":"stauts=eq.open"}"#, code: "invalid_filter", id: "x")
            try await expectError(#"{"type":"subscribe","id":"x","table":"nope"}"#, code: "unknown_table", id: "x")
            try await socket.subscribe("a")
            try await expectError(#"{"type":"subscribe","id":"a","table":"items"}"#, code: "duplicate_subscription", id: "a")
            try await socket.subscribe("b")
            try await expectError(#"{"type":"subscribe","id":"c","table":"items"}"#, code: "too_many_subscriptions", id: "c")
            try await expectError(#"{"type":"unsubscribe","id":"zz"}"#, code: "invalid_message", id: "zz")
            // Still open and serving.
            source.publish(itemInserts([1]))
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["a", "b"])
            await socket.close()
        }
    }

    @Test("forbidden: a table the admission hook does not grant")
    func forbidden() async throws {
        let source = InMemoryChangeSource(catalog: TableCatalog(["public.items": itemsColumns, "public.secret": itemsColumns]))
        try await withTestServer(source: source, configure: { configuration in
            configuration.admission = { _ in .admit(.restricted(["public.items": "tenant_id=eq.42"]), subject: "user-7") }
        }) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.sendText(#"{"type":"subscribe","id":"s","table":"secret"}"#)
            let answer = try await socket.receiveJSON()
            #expect(answer["code"] as? String == "forbidden")
            try await socket.subscribe("mine")
            source.publish([insertEvent(["id": "1", "tenant_id": "7"], lsn: 0x1001), insertEvent(["id": "2", "tenant_id": "42"], lsn: 0x1002)])
            let change = try await socket.receiveJSON()
            #expect((change["new"] as? [String: Any])?["id"] as? Int == 2)
            await socket.close()
        }
    }

    @Test("since: a client that reconnects gets every change after its cursor exactly once, in order, then live ones")
    func resumeAcrossReconnect() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let first = try await connectWebSocket(port: test.port)
            try await first.subscribe("s", filter: "status=eq.open")
            source.publish(itemInserts(1...5))
            var seen: [Int] = []
            var lastCursor = ""
            for _ in 1...5 {
                let change = try await first.receiveJSON()
                seen.append((change["new"] as? [String: Any])?["id"] as? Int ?? -1)
                lastCursor = change["cursor"] as? String ?? ""
            }
            await first.reset()
            // Missed while away: 6...40 (and a non-matching one), some during the catch-up.
            source.publish(itemInserts(6...30))
            source.publish(itemInserts([31], status: "closed"))
            let second = try await connectWebSocket(port: test.port)
            let cursor = try await second.subscribe("s", filter: "status=eq.open", since: lastCursor)
            #expect(cursor == lastCursor)
            source.publish(itemInserts(32...40))
            var cursors: [String] = []
            for _ in 6...39 {
                let change = try await second.receiveJSON()
                #expect(change["type"] as? String == "change")
                seen.append((change["new"] as? [String: Any])?["id"] as? Int ?? -1)
                cursors.append(change["cursor"] as? String ?? "")
            }
            #expect(seen == Array(1...30) + Array(32...40))
            #expect(cursors == cursors.sorted())
            // Live after the catch-up, nothing twice.
            source.publish(itemInserts([41]))
            let live = try await second.receiveJSON()
            #expect((live["new"] as? [String: Any])?["id"] as? Int == 41)
            #expect(await eventually { source.openStreamCount == 1 })  // only the fan-out's
            await second.close()
        }
    }

    @Test("since ahead of the database's WAL is refused; ahead of this server's stream but not of the database, it waits for the stream")
    func sinceAheadOfTheDatabase() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        source.publish(itemInserts(1...3))  // the stream is at LSN 0x1003
        try await withTestServer(source: source, configure: { $0.walPosition = { LSN(0x1010) } }) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.sendText(#"{"type":"subscribe","id":"f","table":"items","since":"0000000100000000.00000000"}"#)
            let answer = try await socket.receiveJSON()
            #expect(answer["type"] as? String == "error")
            #expect(answer["code"] as? String == "invalid_message")
            #expect((answer["message"] as? String)?.contains("ahead of this database's WAL") == true, "\(answer)")
            #expect(test.server.statistics.subscriptions == 0)
            // A lagging server: the cursor (0x1005) is ahead of its stream but within the database.
            let ahead = itemInserts([5])[0].cursor.description
            #expect(try await socket.subscribe("f", since: ahead) == ahead)
            source.publish(itemInserts(4...6))
            #expect((try await socket.receiveJSON()["new"] as? [String: Any])?["id"] as? Int == 6)
            await socket.close()
        }
    }

    @Test("since ahead of the stream: the WAL question is asked once for a burst of resumes (the highest answer settles every cursor at or below it), again only for a cursor beyond it, and not behind a snapshot's turn")
    func sinceAheadAsksOnce() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        source.publish(itemInserts(1...3))  // the stream is at LSN 0x1003
        let asked = Mutex(0)
        try await withTestServer(source: source, configure: { configuration in
            configuration.maxConcurrentSnapshots = 1
            configuration.walPosition = {
                let n = asked.withLock { $0 += 1; return $0 }
                try await Task.sleep(for: .milliseconds(50))  // a round trip, while the others arrive
                return n == 1 ? LSN(0x1010) : LSN(0x2000)
            }
        }) { test in
            // The one snapshot turn is taken, as by a long snapshot: the question does not wait for it.
            #expect(await test.server.snapshotGate.enter())
            defer { test.server.snapshotGate.leave() }
            let ahead = itemInserts([5])[0].cursor.description
            var sockets: [TestConnection] = []
            for _ in 0..<10 { sockets.append(try await connectWebSocket(port: test.port)) }
            try await withThrowingTaskGroup(of: String.self) { group in
                for (index, socket) in sockets.enumerated() {
                    group.addTask { try await socket.subscribe("r\(index)", since: ahead) }
                }
                for try await cursor in group { #expect(cursor == ahead) }
            }
            #expect(asked.withLock { $0 } == 1, "a question per resume")
            // Beyond the highest answer (0x1010) but within the database: asked again, taken.
            let further = Cursor(commitLSN: LSN(0x1F00), index: 0).description
            #expect(try await sockets[0].subscribe("beyond", since: further) == further)
            #expect(asked.withLock { $0 } == 2)
            for socket in sockets { await socket.close() }
        }
    }

    @Test("snapshot: true waits for its turn under maxConcurrentSnapshots at most snapshotTurnTimeout, then gets internal naming the knob; the id is free again")
    func snapshotTurnTimesOut() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        // Never asked: the turn does not come.
        let pool = ConnectionPool<PostgresConnection, ContinuousClock>(postgres: "postgres://nobody@127.0.0.1:1/none", configuration: .init(), logger: Logger(label: "test"))
        try await withTestServer(source: source, configure: { configuration in
            configuration.snapshotReader = TableSnapshotReader(pool: pool)
            configuration.maxConcurrentSnapshots = 1
            configuration.snapshotTurnTimeout = .milliseconds(300)
        }) { test in
            // The one turn is taken, as by a snapshot whose client stopped reading.
            #expect(await test.server.snapshotGate.enter())
            let socket = try await connectWebSocket(port: test.port)
            try await socket.sendText(#"{"type":"subscribe","id":"s","table":"items","snapshot":true}"#)
            let answer = try await socket.receiveJSON(timeout: 10)
            #expect(answer["type"] as? String == "error" && answer["code"] as? String == "internal" && answer["id"] as? String == "s", "\(answer)")
            #expect((answer["message"] as? String)?.contains("maxConcurrentSnapshots") == true, "\(answer)")
            test.server.snapshotGate.leave()
            // The id is free: a plain subscription takes it.
            #expect(try await socket.subscribe("s") == test.server.statistics.fanoutCursor.description)
            await socket.close()
        }
    }

    @Test("since ahead of the stream while the database fails slowly: the callers share the failing queries (a burst costs two queries, not one per caller), and each gets internal")
    func sinceAheadSharesFailures() async throws {
        struct Unreachable: Error {}
        let source = InMemoryChangeSource(catalog: serverCatalog)
        source.publish(itemInserts(1...3))
        let asked = Mutex(0)
        try await withTestServer(source: source, configure: { configuration in
            configuration.walPosition = {
                asked.withLock { $0 += 1 }
                try await Task.sleep(for: .milliseconds(300))
                throw Unreachable()
            }
        }) { test in
            var sockets: [TestConnection] = []
            for _ in 0..<10 { sockets.append(try await connectWebSocket(port: test.port)) }
            let ahead = itemInserts([5])[0].cursor.description
            try await withThrowingTaskGroup(of: String?.self) { group in
                for (index, socket) in sockets.enumerated() {
                    group.addTask {
                        try await socket.sendText(#"{"type":"subscribe","id":"r\#(index)","table":"items","since":"\#(ahead)"}"#)
                        return try await socket.receiveJSON(timeout: 20)["code"] as? String
                    }
                }
                for try await code in group { #expect(code == "internal") }
            }
            #expect(asked.withLock { $0 } <= 2, "a query per caller: \(asked.withLock { $0 })")
            for socket in sockets { await socket.close() }
        }
    }

    @Test("since ahead of this server's stream, when the database cannot be asked whether it issued it: refused with internal (retry), not taken unchecked")
    func sinceAheadUncheckable() async throws {
        struct Unreachable: Error {}
        let source = InMemoryChangeSource(catalog: serverCatalog)
        source.publish(itemInserts(1...3))
        try await withTestServer(source: source, configure: { $0.walPosition = { throw Unreachable() } }) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.sendText(#"{"type":"subscribe","id":"f","table":"items","since":"FFFFFFFFFFFFFFFF.00000000"}"#)
            let answer = try await socket.receiveJSON()
            #expect(answer["type"] as? String == "error" && answer["code"] as? String == "internal", "\(answer)")
            #expect((answer["message"] as? String)?.contains("retry") == true, "\(answer)")
            #expect(test.server.statistics.subscriptions == 0)
            // A cursor the stream holds needs no question: taken.
            let held = itemInserts([2])[0].cursor.description
            #expect(try await socket.subscribe("g", since: held) == held)
            await socket.close()
        }
    }

    @Test("a schema change that drops, renames or retypes a filtered column ends the subscriptions it breaks with invalid_filter; the others go on, and the id can be subscribed again")
    func schemaChangeEndsBrokenSubscriptions() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("s", filter: "status=eq.open")
            try await socket.subscribe("q", filter: "qty=gt.0")
            try await socket.subscribe("all")
            source.publish(itemInserts([1]))
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["s", "q", "all"])
            // ALTER TABLE items RENAME status TO state; ALTER TABLE items ALTER qty TYPE text.
            let columns = itemsColumns.map { column -> RelationColumn in
                switch column.name {
                case "status": RelationColumn(name: "state", typeOID: column.typeOID)
                case "qty": RelationColumn(name: "qty", typeOID: PostgresTypeOID.text)
                default: column
                }
            }
            let altered = Relation(oid: itemsRelation.oid, namespace: "public", name: "items", replicaIdentity: .default, columns: columns)
            source.setCatalog(TableCatalog(relations: [altered]))
            source.publish(insertEvent(["id": "2", "state": "open", "qty": "2"], relation: altered, lsn: 0x1002))
            var errors: [String: String] = [:]
            for _ in 0..<2 {
                let error = try await socket.receiveJSON()
                #expect(error["type"] as? String == "error" && error["code"] as? String == "invalid_filter", "\(error)")
                errors[error["id"] as? String ?? "?"] = error["message"] as? String
            }
            #expect(errors["s"]?.contains("column 'status' of public.items") == true, "\(errors)")
            #expect(errors["q"]?.contains("column 'qty'") == true, "\(errors)")
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["all"])
            #expect(test.server.statistics.subscriptions == 1)
            // The ids are free again: a subscription on the current columns.
            try await socket.subscribe("s", filter: "state=eq.open")
            source.publish(insertEvent(["id": "3", "state": "open", "qty": "3"], relation: altered, lsn: 0x1003))
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["all", "s"])
            await socket.close()
        }
    }

    @Test("a schema change is judged by position: a subscription checked against a catalog older than the stream's description is refused; one checked against a newer catalog survives a replay of the old description")
    func schemaChangeByPosition() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        let altered = itemsRelation(renaming: "status", to: "state")
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("all")
            // The stream describes the renamed table; the catalog (re-read every 10 s) does not yet.
            source.publish(insertEvent(["id": "1", "state": "open"], relation: altered, lsn: 0x1001))
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["all"])
            try await socket.sendText(#"{"type":"subscribe","id":"stale","table":"items","filter":"status=eq.open"}"#)
            let refused = try await socket.receiveJSON()
            #expect(refused["code"] as? String == "invalid_filter" && refused["id"] as? String == "stale", "\(refused)")
            #expect((refused["message"] as? String)?.contains("column 'status'") == true, "\(refused)")
            // A catalog read at 0x2000 knows the new name. A restarted stream replays changes from
            // before the rename (a new description of the old columns, at 0x1002): not a schema
            // change for a filter checked against the newer catalog.
            var current = TableCatalog(relations: [altered])
            current.asOf = LSN(0x2000)
            source.setCatalog(current)
            try await socket.subscribe("new", filter: "state=eq.open")
            let replayed = Relation(oid: itemsRelation.oid, namespace: "public", name: "items", replicaIdentity: .default, columns: itemsColumns)
            source.publish(insertEvent(["id": "2", "status": "open"], relation: replayed, lsn: 0x1002))
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["all"])
            source.publish(insertEvent(["id": "3", "state": "open"], relation: altered, lsn: 0x2001))
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["all", "new"])
            #expect(test.server.statistics.subscriptions == 2)
            await socket.close()
        }
    }

    @Test("a schema change the stream describes before the catalog's position is checked again once the stream passes that position: the broken subscriptions then end")
    func schemaChangeRecheckedAtCatalogPosition() async throws {
        // The catalog's columns were read before a rename committed at 0x1500, its position after
        // it (0x2000): it still lists 'status', and the stream's description at 0x1500 cannot
        // tell whether it is older than the catalog.
        var stale = serverCatalog
        stale.asOf = LSN(0x2000)
        let source = InMemoryChangeSource(catalog: stale)
        let altered = itemsRelation(renaming: "status", to: "state")
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("all")
            try await socket.subscribe("s", filter: "status=eq.open")
            source.publish(insertEvent(["id": "1", "state": "open"], relation: altered, lsn: 0x1500))
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["all"])
            try await socket.subscribe("t", filter: "status=eq.open")  // also let through, also checked again
            source.publish(insertEvent(["id": "2", "state": "open"], relation: altered, lsn: 0x2001))
            var ended: Set<String> = []
            for _ in 0..<2 {
                let error = try await socket.receiveJSON()
                #expect(error["code"] as? String == "invalid_filter", "\(error)")
                ended.insert(error["id"] as? String ?? "?")
            }
            #expect(ended == ["s", "t"])
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["all"])
            #expect(test.server.statistics.subscriptions == 1)
            await socket.close()
        }
    }

    @Test("since older than the resume window answers resync_required")
    func resyncRequired() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog, windowLimits: .init(maxCount: 3))
        source.publish(itemInserts(1...10))
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            let old = itemInserts([2])[0].cursor.description
            try await socket.sendText(#"{"type":"subscribe","id":"r","table":"items","since":"\#(old)"}"#)
            let answer = try await socket.receiveJSON()
            #expect(answer["type"] as? String == "resync_required")
            #expect(answer["id"] as? String == "r")
            #expect((answer["message"] as? String)?.contains("resume window") == true)
            #expect(test.server.statistics.subscriptions == 0)
            // Inside the window it resumes.
            let recent = itemInserts([8])[0].cursor.description
            try await socket.subscribe("r", since: recent)
            #expect((try await socket.receiveJSON()["new"] as? [String: Any])?["id"] as? Int == 9)
            #expect((try await socket.receiveJSON()["new"] as? [String: Any])?["id"] as? Int == 10)
            await socket.close()
        }
    }
}

/// public.items after `ALTER TABLE items RENAME <column> TO <name>`: a new description (as a
/// Relation message after the change makes one).
func itemsRelation(renaming column: String, to name: String) -> Relation {
    let columns = itemsColumns.map { $0.name == column ? RelationColumn(name: name, typeOID: $0.typeOID, isKey: $0.isKey) : $0 }
    return Relation(oid: itemsRelation.oid, namespace: "public", name: "items", replicaIdentity: .default, columns: columns)
}
