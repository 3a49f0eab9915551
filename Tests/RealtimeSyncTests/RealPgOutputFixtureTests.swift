import RealtimeSync
import Testing

/// Bytes captured from PostgreSQL 15 (scripts/capture-pgoutput-fixtures.sh).
@Suite("real pgoutput fixtures")
struct RealPgOutputFixtureTests {
    @Test("Every JSON value form: ints, floats with NaN/Infinity, numeric, bool, json/jsonb, bytea, timestamptz, uuid, arrays, enum")
    func allTypes() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.allTypesInsert)
        #expect(pipeline.transactions.count == 1)
        let changes = pipeline.changes
        try #require(changes.count == 2)
        #expect(pipeline.decoder.types.values.map(\.name) == ["mood"])
        let first = changes[0]
        #expect(first.table == "public.kinds")
        #expect(first.operation == .insert)
        #expect(first.index == 0 && changes[1].index == 1)
        #expect(first.commitLSN == pipeline.transactions[0].commitLSN)
        #expect(first.cursor.description == String(first.commitLSN.rawValue, radix: 16, uppercase: true).leftPadded(to: 16) + ".00000000")
        #expect(changes[1].cursor.description.hasSuffix(".00000001"))

        let newRow = #"{"id":1,"big":9223372036854775807,"small":-32768,"f4":1.5,"f8":"NaN","num":"12345678901234567890.123456789","flag":true,"#
            + #""txt":"quote\" back\\ nl\n tab\t bell\u0007 snow☃ emoji😀","doc":{"a": [1, 2.5, null]},"docb":{"b": {"c": true}},"#
            + #""raw":"\\xdeadbeef","at":"2026-11-26 18:00:00.123456+00","uid":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11","#
            + #""ints":"{1,2,NULL}","tags":"{\"x y\",z}","m":"happy"}"#
        let json = jsonText(first)
        #expect(json.contains(#""new":\#(newRow),"old":null,"unchanged":[]"#), "\(json)")
        #expect(json.hasPrefix(#"{"cursor":"\#(first.cursor)","op":"INSERT","table":"public.kinds","xid":\#(first.xid),"commit_time":"#))

        let second = jsonText(changes[1])
        let secondRow = #"{"id":2,"big":null,"small":null,"f4":"-Infinity","f8":1e-300,"num":"NaN","flag":false,"txt":"","doc":null,"#
            + #""docb":[],"raw":"\\x","at":null,"uid":null,"ints":"{}","tags":null,"m":null}"#
        #expect(second.contains(#""new":\#(secondRow)"#), "\(second)")
        for change in changes { _ = try parseJSON(change.jsonBytes()) }
    }

    @Test("Default identity: UPDATE without key change, UPDATE of the key, DELETE by key")
    func defaultIdentity() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.updateDefaultIdentity)
        let changes = pipeline.changes
        try #require(changes.count == 3)
        #expect(changes.map(\.operation) == [.update, .update, .delete])
        // No key change: Postgres sends no old row; the key is read from the new row.
        #expect(changes[0].oldKind == .key)
        #expect(jsonText(changes[0]).contains(#""old":{"id":1},"unchanged":[]"#))
        #expect(changes[0].newValue("txt") == t("changed"))
        // Key change: the old key 'K' (other columns are not part of it).
        #expect(jsonText(changes[1]).contains(#""old":{"id":2}"#))
        #expect(changes[1].oldValue("big") == nil)
        #expect(changes[1].newValue("id") == t("3"))
        #expect(jsonText(changes[2]).contains(#""new":null,"old":{"id":3}"#))
        // psql -c sends the three statements as one implicit transaction.
        #expect(pipeline.transactions.count == 1)
        #expect(changes.map(\.index) == [0, 1, 2])
    }

    @Test("REPLICA IDENTITY FULL: full old rows for UPDATE and DELETE")
    func fullIdentity() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.fullIdentity)
        let changes = pipeline.changes
        try #require(changes.count == 3)
        #expect(changes[0].relation.replicaIdentity == .full)
        #expect(jsonText(changes[1]).contains(#""new":{"id":1,"name":"b","note":null},"old":{"id":1,"name":"a","note":null}"#))
        #expect(changes[1].oldKind == .full)
        #expect(jsonText(changes[2]).contains(#""op":"DELETE""#))
        #expect(jsonText(changes[2]).contains(#""new":null,"old":{"id":1,"name":"b","note":null}"#))
    }

    @Test("An unchanged TOAST column is reported as unchanged, not null")
    func unchangedToast() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.unchangedToast)
        let changes = pipeline.changes
        try #require(changes.count == 3)
        #expect(changes[0].newValue("body").map { if case .text(let b) = $0 { b.count } else { -1 } } == 8000)
        #expect(changes[1].newValue("body") == .unchanged)
        #expect(changes[1].unchangedColumns == ["body"])
        #expect(jsonText(changes[1]).contains(#""new":{"id":1,"counter":1},"old":{"id":1},"unchanged":["body"]"#))
        #expect(!jsonText(changes[1]).contains("\"body\":null"))
    }

    @Test("A multi-table transaction is one transaction, in order, contiguous indices")
    func multiTable() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.multiTable)
        #expect(pipeline.transactions.count == 1)
        let changes = pipeline.changes
        #expect(changes.map(\.table) == ["public.full_rows", "public.no_key", "public.full_rows"])
        #expect(changes.map(\.operation) == [.insert, .insert, .update])
        #expect(changes.map(\.index) == [0, 1, 2])
        #expect(changes.map(\.cursor) == changes.map(\.cursor).sorted())
        #expect(changes.map(\.cursor.description) == changes.map(\.cursor.description).sorted())
        #expect(Set(changes.map(\.xid)).count == 1)
    }

    @Test("A rolled-back transaction never appears")
    func rolledBack() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.rolledBack)
        #expect(pipeline.transactions.count == 1)
        #expect(pipeline.changes.map { $0.newValue("name") } == [t("kept")])
    }

    @Test("TRUNCATE of two tables gives one event per table")
    func truncate() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.truncate)
        let changes = pipeline.changes
        #expect(changes.map(\.table) == ["public.full_rows", "public.no_key"])
        #expect(changes.allSatisfy { $0.operation == .truncate && $0.truncateOptions == [.cascade, .restartIdentity] })
        #expect(jsonText(changes[0]).contains(#""op":"TRUNCATE","table":"public.full_rows""#))
        #expect(jsonText(changes[0]).contains(#""new":null,"old":null,"unchanged":[]"#))
    }

    @Test("Logical messages: non-transactional standalone, transactional inside its transaction")
    func logicalMessages() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.logicalMessages)
        #expect(pipeline.standalone.map(\.prefix) == ["rt/nontx"])
        #expect(pipeline.standalone.first?.content == Array("hello".utf8))
        #expect(pipeline.standalone.first?.isTransactional == false)
        #expect(pipeline.transactions.count == 1)
        #expect(pipeline.transactions[0].messages.map(\.prefix) == ["rt/tx"])
        #expect(pipeline.transactions[0].messages.first?.content == [0x00, 0xFF])
        #expect(pipeline.changes.count == 1)
        #expect(pipeline.changes.first?.table == "public.no_key")
    }

    @Test("Origin message names the replication origin")
    func origin() throws {
        var pipeline = Pipeline()
        try pipeline.feed(hex: PgOutputRealFixtures.withOrigin)
        #expect(pipeline.transactions.first?.origin == "upstream")
        #expect(pipeline.transactions.first?.commitTime.description == "2026-01-01T00:00:00.000000Z")
        #expect(pipeline.changes.count == 1)
    }

    @Test("Begin's final LSN equals Commit's LSN in real streams; commits strictly increase")
    func lsnsAgree() throws {
        let all = PgOutputRealFixtures.allTypesInsert + PgOutputRealFixtures.updateDefaultIdentity + PgOutputRealFixtures.fullIdentity
            + PgOutputRealFixtures.unchangedToast + PgOutputRealFixtures.multiTable + PgOutputRealFixtures.rolledBack
            + PgOutputRealFixtures.truncate + PgOutputRealFixtures.logicalMessages + PgOutputRealFixtures.withOrigin
        var pipeline = Pipeline()
        try pipeline.feed(hex: all)  // the assembler throws commitMismatch otherwise
        let lsns = pipeline.transactions.map(\.commitLSN)
        #expect(lsns == lsns.sorted() && Set(lsns).count == lsns.count)
        #expect(pipeline.transactions.allSatisfy { $0.endLSN > $0.commitLSN })
        #expect(pipeline.assembler.emittedThrough == pipeline.transactions.last?.endLSN)
    }
}

extension String {
    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
