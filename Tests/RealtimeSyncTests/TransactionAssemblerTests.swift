import PoolKit
import RealtimeSync
import Testing

@Suite("transaction assembler and ChangeEvent")
struct TransactionAssemblerTests {
    let relationMessage = PgOutputMessageBuilder.relation(ordersRelation)

    @Test("A transaction with more changes than maxChanges fails with transaction_too_large naming the knob and the LSN to skip it at; one at the limit is emitted whole")
    func transactionTooLarge() throws {
        var decoder = PgOutputDecoder()
        let insert = { (id: Int) in PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t(String(id)), t("open"), .null, t("1")]) }
        var fits = TransactionAssembler(maxChanges: 3)
        _ = try fits.apply(try decoder.decode(relationMessage))
        var outputs: [AssembledOutput] = []
        for message in transaction(lsn: 0x500, xid: 7, (1...3).map(insert)) {
            if let output = try fits.apply(try decoder.decode(message)) { outputs.append(output) }
        }
        guard case .transaction(let committed)? = outputs.first else { Issue.record("expected the transaction"); return }
        #expect(committed.changes.count == 3)

        var tooSmall = TransactionAssembler(maxChanges: 2, slotName: "orders_slot")
        let messages = transaction(lsn: 0x600, xid: 8, (1...3).map(insert))
        _ = try tooSmall.apply(try decoder.decode(messages[0]))
        _ = try tooSmall.apply(try decoder.decode(messages[1]))
        _ = try tooSmall.apply(try decoder.decode(messages[2]))
        let error = #expect(throws: ChangeAssemblyError.self) { _ = try tooSmall.apply(try decoder.decode(messages[3])) }
        #expect(error?.code == .transactionTooLarge)
        #expect(error?.message.contains("maxTransactionChanges") == true && error?.message.contains("--max-transaction-changes") == true)
        #expect(error?.message.contains("pg_replication_slot_advance") == true && error?.message.contains("pg_replication_slot_advance('orders_slot', '0/601')") == true, "\(String(describing: error))")
    }

    @Test("A transaction holding more bytes than maxBytes fails with transaction_too_large naming the knob; one at the limit is emitted whole, the count starts again at each Begin, a skipped one holds nothing")
    func transactionTooManyBytes() throws {
        var decoder = PgOutputDecoder()
        let wide = String(repeating: "x", count: 1_000)
        let insert = { (id: Int) in PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t(String(id)), t(wide), .null, t("1")]) }
        func run(_ assembler: inout TransactionAssembler, _ messages: [[UInt8]]) throws -> [CommittedTransaction] {
            var committed: [CommittedTransaction] = []
            for message in messages {
                if case .transaction(let transaction)? = try assembler.apply(try decoder.decode(message)) { committed.append(transaction) }
            }
            return committed
        }
        // What one change of these holds, as the assembler counts it.
        var unbounded = TransactionAssembler()
        let one = try run(&unbounded, [relationMessage] + transaction(lsn: 0x400, xid: 6, [insert(0)]))
        let perChange = try #require(one.first?.changes.first).approximateBytes
        #expect(perChange > 1_000 && perChange < 1_400, "a 1,000-byte value and three short ones: \(perChange)")

        // Exactly three changes' worth: two transactions of three, each emitted whole.
        var fits = TransactionAssembler(maxBytes: 3 * perChange)
        let both = try run(&fits, [relationMessage]
            + transaction(lsn: 0x500, xid: 7, (1...3).map(insert)) + transaction(lsn: 0x510, xid: 8, (4...6).map(insert)))
        #expect(both.map(\.changes.count) == [3, 3])

        // One byte less: the third change throws, naming the knob and the way past.
        var tooSmall = TransactionAssembler(maxBytes: 3 * perChange - 1, slotName: "orders_slot")
        let messages = [relationMessage] + transaction(lsn: 0x600, xid: 9, (1...3).map(insert))
        for message in messages.prefix(4) { _ = try tooSmall.apply(try decoder.decode(message)) }
        let error = #expect(throws: ChangeAssemblyError.self) { _ = try tooSmall.apply(try decoder.decode(messages[4])) }
        #expect(error?.code == .transactionTooLarge)
        #expect(error?.message.contains("more than \(3 * perChange - 1) bytes") == true, "\(String(describing: error))")
        #expect(error?.message.contains("maxTransactionBytes") == true && error?.message.contains("--max-transaction-bytes") == true)
        #expect(error?.message.contains("pg_replication_slot_advance('orders_slot', '0/601')") == true, "\(String(describing: error))")

        // Already emitted (at or before skipThrough): decoded, not held, so not refused.
        var resumed = TransactionAssembler(skipThrough: LSN(0x700), maxBytes: perChange)
        #expect(try run(&resumed, [relationMessage] + transaction(lsn: 0x700, xid: 10, (1...3).map(insert))).isEmpty)
        #expect(resumed.skippedTransactions == 1)

        // A transactional message's content counts too.
        var messagesBound = TransactionAssembler(maxBytes: 1_000)
        let big = PgOutputMessageBuilder.message(transactional: true, lsn: LSN(0x800), prefix: "p", content: Array(repeating: 1, count: 1_000))
        _ = try messagesBound.apply(try decoder.decode(PgOutputMessageBuilder.begin(finalLSN: LSN(0x810), commitTime: PostgresTimestamp(microsecondsSince2000: 0), xid: 11)))
        let messageError = #expect(throws: ChangeAssemblyError.self) { _ = try messagesBound.apply(try decoder.decode(big)) }
        #expect(messageError?.code == .transactionTooLarge)

        // Unless messages are not kept (as the change stream assembles: no consumer reads them):
        // then another application's large transactional message is neither held nor counted.
        var withoutMessages = TransactionAssembler(maxBytes: 3 * perChange, keepsMessages: false)
        let mixed = transaction(lsn: 0x900, xid: 12, [insert(1), PgOutputMessageBuilder.message(
            transactional: true, lsn: LSN(0x8F0), prefix: "outbox", content: Array(repeating: 7, count: 100 * perChange))])
        let kept = try run(&withoutMessages, [relationMessage] + mixed)
        #expect(kept.map(\.changes.count) == [1])
        #expect(kept.first?.messages.isEmpty == true)
    }

    @Test("approximateBytes counts an UPDATE's message once: its old and new rows share it")
    func updateBytesCountedOnce() throws {
        var decoder = PgOutputDecoder()
        var assembler = TransactionAssembler()
        let wide = String(repeating: "x", count: 1_000)
        let row: [TupleValue] = [t("1"), t(wide), .null, t("1")]
        let messages = [relationMessage] + transaction(lsn: 0x900, xid: 12, [
            PgOutputMessageBuilder.insert(relationOID: 16_400, new: row),
            PgOutputMessageBuilder.update(relationOID: 16_400, old: (.full, row), new: row),
            PgOutputMessageBuilder.update(relationOID: 16_400, new: row),   // key unchanged: the new row is the old one
        ])
        var changes: [ChangeEvent] = []
        for message in messages {
            if case .transaction(let committed)? = try assembler.apply(try decoder.decode(message)) { changes = committed.changes }
        }
        try #require(changes.count == 3)
        let insert = changes[0].approximateBytes, full = changes[1].approximateBytes, keyOnly = changes[2].approximateBytes
        // The full-row UPDATE's message holds the row twice (about 1,040 bytes more than the
        // INSERT's); counted per row it would be about 2,100 more.
        #expect(full > insert + 1_000 && full < insert + 1_400, "insert \(insert), update with old row \(full)")
        #expect(keyOnly < insert + 200, "insert \(insert), key-unchanged update \(keyOnly)")
    }

    @Test("Changes are emitted at Commit, in order, with cursors from the commit LSN")
    func emitsAtCommit() throws {
        var decoder = PgOutputDecoder()
        var assembler = TransactionAssembler()
        let messages = [relationMessage] + transaction(lsn: 0x16B_3748, xid: 1234, [
            PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), t("open"), .null, t("1.50")]),
            PgOutputMessageBuilder.update(relationOID: 16_400, new: [t("1"), t("paid"), .unchanged, t("1.50")]),
            PgOutputMessageBuilder.delete(relationOID: 16_400, oldKind: .key, old: [t("1"), .null, .null, .null]),
        ])
        var outputs: [AssembledOutput] = []
        for (position, message) in messages.enumerated() {
            if let output = try assembler.apply(try decoder.decode(message)) {
                #expect(position == messages.count - 1, "nothing is emitted before Commit")
                outputs.append(output)
            }
            #expect(assembler.isInTransaction == (1..<messages.count - 1).contains(position))
        }
        guard case .transaction(let committed)? = outputs.first else { Issue.record("expected a transaction"); return }
        #expect(committed.xid == 1234)
        #expect(committed.commitLSN == LSN(0x16B_3748))
        #expect(committed.endLSN == LSN(0x16B_3778))
        #expect(committed.changes.map(\.cursor.description) == [
            "00000000016B3748.00000000", "00000000016B3748.00000001", "00000000016B3748.00000002",
        ])
        #expect(assembler.emittedThrough == LSN(0x16B_3778))
        let json = committed.changes.map(jsonText)
        #expect(json[0] == #"{"cursor":"00000000016B3748.00000000","op":"INSERT","table":"public.orders","xid":1234,"#
            + #""commit_time":"2025-11-25T18:00:00.123456Z","new":{"id":1,"status":"open","notes":null,"amount":"1.50"},"old":null,"unchanged":[]}"#)
        #expect(json[1] == #"{"cursor":"00000000016B3748.00000001","op":"UPDATE","table":"public.orders","xid":1234,"#
            + #""commit_time":"2025-11-25T18:00:00.123456Z","new":{"id":1,"status":"paid","amount":"1.50"},"old":{"id":1},"unchanged":["notes"]}"#)
        #expect(json[2].hasSuffix(#""op":"DELETE","table":"public.orders","xid":1234,"commit_time":"2025-11-25T18:00:00.123456Z","new":null,"old":{"id":1},"unchanged":[]}"#))
        for text in json { _ = try parseJSON(Array(text.utf8)) }
    }

    @Test("writeJSONMembers lets a server wrap one encoding per client")
    func members() throws {
        var pipeline = Pipeline()
        try pipeline.feed([relationMessage] + transaction(lsn: 0x10, [PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("5"), .null, .null, .null])]))
        let event = try #require(pipeline.changes.first)
        var members: [UInt8] = []
        event.writeJSONMembers(into: &members)
        let frame = Array(#"{"type":"change","ids":["s1"],"#.utf8) + members + [UInt8(ascii: "}")]
        let object = try #require(try parseJSON(frame) as? [String: Any])
        #expect(object["type"] as? String == "change")
        #expect(object["cursor"] as? String == "0000000000000010.00000000")
        #expect((object["new"] as? [String: Any])?["id"] as? Int == 5)
    }

    @Test("UPDATE with old key 'K' shows only key columns in old; replica identity nothing gives old null")
    func oldRows() throws {
        let noKey = Relation(oid: 16_401, namespace: "public", name: "log", replicaIdentity: .nothing, columns: [
            RelationColumn(name: "line", typeOID: PostgresTypeOID.text),
        ])
        var pipeline = Pipeline()
        try pipeline.feed([relationMessage, PgOutputMessageBuilder.relation(noKey)] + transaction(lsn: 0x20, [
            PgOutputMessageBuilder.update(relationOID: 16_400, old: (.key, [t("1"), .null, .null, .null]), new: [t("2"), t("x"), .null, .null]),
            PgOutputMessageBuilder.update(relationOID: 16_401, new: [t("changed")]),
            PgOutputMessageBuilder.update(relationOID: 16_400, old: (.full, [t("2"), t("x"), .null, .null]), new: [t("2"), t("y"), .null, .null]),
        ]))
        let changes = pipeline.changes
        #expect(jsonText(changes[0]).contains(#""new":{"id":2,"status":"x","notes":null,"amount":null},"old":{"id":1}"#))
        #expect(changes[0].oldValue("id") == t("1"))
        #expect(changes[0].oldValue("status") == nil)
        #expect(changes[1].old == nil && changes[1].oldKind == nil)
        #expect(jsonText(changes[1]).contains(#""old":null"#))
        #expect(jsonText(changes[2]).contains(#""old":{"id":2,"status":"x","notes":null,"amount":null}"#))
        #expect(changes[2].oldValue("status") == t("x"))
    }

    @Test("A 1 MB text value survives decode, assembly and JSON")
    func largeValue() throws {
        let big = String(repeating: "0123456789abcdef", count: 65_536)  // 1 MiB
        var pipeline = Pipeline()
        try pipeline.feed([relationMessage] + transaction(lsn: 0x30, [PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, t(big), .null])]))
        let event = try #require(pipeline.changes.first)
        let object = try #require(try parseJSON(event.jsonBytes()) as? [String: Any])
        #expect((object["new"] as? [String: Any])?["notes"] as? String == big)
    }

    @Test("Transactions at or before skipThrough are not emitted again (replay after reconnect)")
    func skipsReplayed() throws {
        var decoder = PgOutputDecoder()
        var assembler = TransactionAssembler(skipThrough: LSN(0x200))
        var emitted: [LSN] = []
        for lsn: UInt64 in [0x100, 0x200, 0x300] {
            for message in [relationMessage] + transaction(lsn: lsn, [PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, .null, .null])]) {
                if case .transaction(let committed)? = try assembler.apply(try decoder.decode(message)) { emitted.append(committed.commitLSN) }
            }
        }
        #expect(emitted == [LSN(0x300)])
        #expect(assembler.skippedTransactions == 2)
        #expect(assembler.skipThrough == LSN(0x300))
        #expect(assembler.emittedThrough == LSN(0x330))
    }

    @Test("A connection lost mid-transaction: abandon, then the replayed transaction is emitted once")
    func abandon() throws {
        var decoder = PgOutputDecoder()
        var assembler = TransactionAssembler()
        let body = transaction(lsn: 0x500, [PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, .null, .null])])
        _ = try assembler.apply(try decoder.decode(relationMessage))
        _ = try assembler.apply(try decoder.decode(body[0]))
        _ = try assembler.apply(try decoder.decode(body[1]))
        assembler.abandonOpenTransaction()
        #expect(!assembler.isInTransaction)
        var count = 0
        for message in [relationMessage] + body {
            if case .transaction(let committed)? = try assembler.apply(try decoder.decode(message)) { count += committed.changes.count }
        }
        #expect(count == 1)
    }

    @Test("Protocol violations throw with stable codes")
    func violations() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(relationMessage)
        let insert = try decoder.decode(PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, .null, .null]))
        let begin = try decoder.decode(PgOutputMessageBuilder.begin(finalLSN: LSN(0x10), commitTime: fixedTime, xid: 1))
        let commit = try decoder.decode(PgOutputMessageBuilder.commit(commitLSN: LSN(0x10), endLSN: LSN(0x20), commitTime: fixedTime))
        let wrongCommit = try decoder.decode(PgOutputMessageBuilder.commit(commitLSN: LSN(0x11), endLSN: LSN(0x20), commitTime: fixedTime))

        var assembler = TransactionAssembler()
        #expect((#expect(throws: ChangeAssemblyError.self) { try assembler.apply(insert) })?.code == .outsideTransaction)
        #expect((#expect(throws: ChangeAssemblyError.self) { try assembler.apply(commit) })?.code == .outsideTransaction)
        #expect((#expect(throws: ChangeAssemblyError.self) {
            try assembler.apply(.origin(.init(commitLSN: LSN(1), name: "o")))
        })?.code == .outsideTransaction)
        _ = try assembler.apply(begin)
        #expect((#expect(throws: ChangeAssemblyError.self) { try assembler.apply(begin) })?.code == .nestedBegin)
        let mismatch = #expect(throws: ChangeAssemblyError.self) { try assembler.apply(wrongCommit) }
        #expect(mismatch?.code == .commitMismatch)
        #expect(mismatch?.message.contains("0/11") == true)
    }

    @Test("Truncate inside a transaction numbers one event per table after earlier changes")
    func truncateIndices() throws {
        let other = Relation(oid: 16_402, namespace: "app", name: "items", replicaIdentity: .default, columns: [])
        var pipeline = Pipeline()
        try pipeline.feed([relationMessage, PgOutputMessageBuilder.relation(other)] + transaction(lsn: 0x40, [
            PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, .null, .null]),
            PgOutputMessageBuilder.truncate(relationOIDs: [16_400, 16_402]),
        ]))
        #expect(pipeline.changes.map(\.index) == [0, 1, 2])
        #expect(pipeline.changes.map(\.operation) == [.insert, .truncate, .truncate])
        #expect(pipeline.changes.map(\.table) == ["public.orders", "public.orders", "app.items"])
    }

    @Test("Decode-and-encode entry point processes a synthetic stream")
    func throughputEntryPoint() throws {
        let messages = CaptureThroughput.syntheticInsertStream(transactions: 20, rowsPerTransaction: 100)
        #expect(messages.count == 1 + 20 * 102)
        let result = try CaptureThroughput.decodeAndEncode(messages)
        #expect(result.changes == 2_000)
        #expect(result.transactions == 20)
        #expect(result.messages == messages.count)
        #expect(result.jsonBytes > 2_000 * 100)
        var pipeline = Pipeline()
        try pipeline.feed(Array(messages.prefix(3)))
        try pipeline.feed(Array(messages[3...]))
        _ = try parseJSON(try #require(pipeline.changes.last).jsonBytes())
    }
}

@Suite("ChangeEvent JSON edge cases")
struct ChangeEventJSONTests {
    @Test("Names with quotes, backslashes and non-ASCII are escaped in keys and table")
    func escapedNames() throws {
        let odd = Relation(oid: 1, namespace: "my \"schema\"", name: "tâble\\x", replicaIdentity: .full, columns: [
            RelationColumn(name: "we\"ird", typeOID: PostgresTypeOID.int4, isKey: true),
            RelationColumn(name: "😀\ncol", typeOID: PostgresTypeOID.bool),
        ])
        var pipeline = Pipeline()
        try pipeline.feed([PgOutputMessageBuilder.relation(odd)] + transaction(lsn: 0x70, [
            PgOutputMessageBuilder.update(relationOID: 1, new: [t("1"), .unchanged]),
        ]))
        let event = try #require(pipeline.changes.first)
        #expect(jsonText(event).contains(#""table":"my \"schema\".tâble\\x""#))
        #expect(jsonText(event).contains(#""new":{"we\"ird":1},"old":{"we\"ird":1},"unchanged":["😀\ncol"]"#))
        let object = try #require(try parseJSON(event.jsonBytes()) as? [String: Any])
        #expect(object["unchanged"] as? [String] == ["😀\ncol"])
    }

    @Test("Binary-format values ('b') decode and encode as bytea hex strings")
    func binaryValues() throws {
        var pipeline = Pipeline()
        try pipeline.feed([PgOutputMessageBuilder.relation(ordersRelation)] + transaction(lsn: 0x80, [
            PgOutputMessageBuilder.insert(relationOID: 16_400, new: [.binary([0, 0, 0, 1]), .null, .null, .null]),
        ]))
        let event = try #require(pipeline.changes.first)
        #expect(event.newValue("id") == .binary([0, 0, 0, 1]))
        #expect(jsonText(event).contains(#""new":{"id":"\\x00000001","#))
    }
}
