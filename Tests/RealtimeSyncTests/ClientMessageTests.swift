import PoolKit
import Foundation
import RealtimeSync
import Testing

@Suite("client messages")
struct ClientMessageTests {
    func parse(_ text: String) throws(ProtocolError) -> ClientMessage { try ClientMessage.parse(Array(text.utf8)) }

    func failure(_ text: String) -> ProtocolError? {
        #expect(throws: ProtocolError.self, "\(text)") { try parse(text) }
    }

    @Test("The spec's subscribe parses with every member")
    func specSubscribe() throws {
        let message = try parse(#"""
            {"type":"subscribe","id":"s1","table":"public.orders",
             "events":["INSERT","UPDATE","DELETE"],
             "filter":"status=eq.open&amount=gt.100",
             "snapshot":false,
             "since":"00000000016B3748.00000003"}
            """#)
        #expect(message == .subscribe(SubscribeRequest(
            id: "s1", table: TableName(schema: "public", name: "orders"), events: [.insert, .update, .delete],
            filter: "status=eq.open&amount=gt.100", snapshot: false,
            since: Cursor(commitLSN: LSN(0x16B3748), index: 3))))
    }

    @Test("Defaults: public schema, all three events, no filter, no snapshot, no cursor; null means absent")
    func defaults() throws {
        guard case .subscribe(let request) = try parse(#"{"type":"subscribe","id":"a","table":"orders"}"#) else {
            Issue.record("not a subscribe"); return
        }
        #expect(request.table.description == "public.orders")
        #expect(request.events == .default)
        #expect(!request.events.contains(.truncate))
        #expect(request.filter == "")
        #expect(request.snapshot == false)
        #expect(request.since == nil)
        let nulls = try parse(#"{"type":"subscribe","id":"a","table":"sales.orders","events":null,"filter":null,"snapshot":null,"since":null}"#)
        #expect(nulls == .subscribe(SubscribeRequest(id: "a", table: TableName(schema: "sales", name: "orders"))))
        let snapshot = try parse(#"{"type":"subscribe","id":"a","table":"orders","snapshot":true,"events":["insert","Delete","TRUNCATE"]}"#)
        #expect(snapshot == .subscribe(SubscribeRequest(id: "a", table: TableName(schema: "public", name: "orders"),
                                                        events: [.insert, .delete, .truncate], snapshot: true)))
    }

    @Test("unsubscribe parses; whitespace and member order do not matter")
    func unsubscribe() throws {
        #expect(try parse(#" { "id" : "s1" , "type" : "unsubscribe" } "#) == .unsubscribe(id: "s1"))
    }

    @Test("id: 1 to 64 characters, counted in Unicode scalars")
    func idLength() throws {
        #expect(try parse(#"{"type":"unsubscribe","id":"\#(String(repeating: "x", count: 64))"}"#) == .unsubscribe(id: String(repeating: "x", count: 64)))
        let wide = String(repeating: "é", count: 64)  // 128 bytes, 64 characters
        #expect(try parse(#"{"type":"unsubscribe","id":"\#(wide)"}"#) == .unsubscribe(id: wide))
        #expect(try parse(#"{"type":"unsubscribe","id":"\u00e9\"\n"}"#) == .unsubscribe(id: "é\"\n"))
        let long = failure(#"{"type":"unsubscribe","id":"\#(String(repeating: "x", count: 65))"}"#)
        #expect(long?.code == .invalidMessage)
        #expect(long?.message == "'id' must have 1 to 64 characters, got 65")
        #expect(long?.id == nil)
        #expect(failure(#"{"type":"unsubscribe","id":""}"#)?.message == "'id' must have 1 to 64 characters, got 0")
        #expect(failure(#"{"type":"unsubscribe","id":7}"#)?.message == "'id' must be a string, got a number")
        #expect(failure(#"{"type":"unsubscribe"}"#)?.message.hasPrefix("missing 'id'") == true)
    }

    @Test("Every invalid_message and unknown_type case names the bad part and keeps a usable id", arguments: [
        ("", ProtocolErrorCode.invalidMessage, "message is not valid JSON", nil as String?),
        ("{", .invalidMessage, "message is not valid JSON: expected a member name at byte 2", nil),
        (#"{"type":"unsubscribe","id":"s1""#, .invalidMessage, "unexpected end of JSON", nil),
        ("[1]", .invalidMessage, "message must be a JSON object, got an array", nil),
        ("\"subscribe\"", .invalidMessage, "got a string", nil),
        (#"{"type":"subscribe","id":"s1","table":"orders",}"#, .invalidMessage, "expected a member name", nil),
        (#"{"type":"subscribe","type":"unsubscribe","id":"s1"}"#, .invalidMessage, "duplicate member 'type'", nil),
        // Past eight members the names are checked through a set: the same answer, also for
        // names that are equal as Swift strings (canonically equivalent).
        (#"{"a0":0,"a1":0,"a2":0,"a3":0,"a4":0,"a5":0,"a6":0,"a7":0,"a8":0,"a9":0,"a3":1}"#, .invalidMessage, "duplicate member 'a3'", nil),
        (#"{"a0":0,"a1":0,"a2":0,"a3":0,"a4":0,"a5":0,"a6":0,"a7":0,"\u00e9":0,"a9":0,"e\u0301":1}"#, .invalidMessage, "duplicate member", nil),
        (#"{"a0":0,"a1":0,"a2":0,"a3":0,"a4":0,"a5":0,"a6":0,"a7":0,"a8":0,"a9":0,"a1":1}"#, .invalidMessage, "duplicate member 'a1'", nil),
        (#"{"id":"s1"}"#, .invalidMessage, "missing 'type'", "s1"),
        (#"{"type":1,"id":"s1"}"#, .invalidMessage, "'type' must be a string, got a number", "s1"),
        (#"{"type":"subcribe","id":"s1"}"#, .unknownType, "unknown message type 'subcribe'; expected subscribe or unsubscribe", "s1"),
        (#"{"type":"SUBSCRIBE","id":"s1"}"#, .unknownType, "unknown message type 'SUBSCRIBE'", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","filtr":"a=eq.1"}"#, .invalidMessage, "unknown member 'filtr' in subscribe", "s1"),
        (#"{"type":"unsubscribe","id":"s1","table":"orders"}"#, .invalidMessage, "unknown member 'table' in unsubscribe", "s1"),
        (#"{"type":"subscribe","id":"s1"}"#, .invalidMessage, "missing 'table'", "s1"),
        (#"{"type":"subscribe","id":"s1","table":5}"#, .invalidMessage, "'table' must be a string, got a number", "s1"),
        (#"{"type":"subscribe","id":"s1","table":""}"#, .invalidMessage, "table '' must be schema.table or table", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"a.b.c"}"#, .invalidMessage, "table 'a.b.c' must be schema.table", "s1"),
        (#"{"type":"subscribe","id":"s1","table":".orders"}"#, .invalidMessage, "must be schema.table", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"my orders"}"#, .invalidMessage, "must be schema.table", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"public.\"Orders\""}"#, .invalidMessage, "quoted identifiers are not supported", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","events":[]}"#, .invalidMessage, "'events' must not be empty", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","events":"INSERT"}"#, .invalidMessage, "'events' must be an array of strings, got a string", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","events":["UPSERT"]}"#, .invalidMessage, "unknown event 'UPSERT'", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","events":["\u0131nsert"]}"#, .invalidMessage, "unknown event 'ınsert'", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","events":[1]}"#, .invalidMessage, "'events' must hold strings, got a number", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","filter":1}"#, .invalidMessage, "'filter' must be a string, got a number", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","snapshot":"yes"}"#, .invalidMessage, "'snapshot' must be true or false, got a string", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","since":12}"#, .invalidMessage, "'since' must be a cursor string, got a number", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","since":"16/B374D848"}"#, .invalidMessage, "'since': cursor \"16/B374D848\" has 11 characters", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","since":"00000000016B3748.0000000G"}"#, .invalidMessage, "non-hex character at position 25", "s1"),
        (#"{"type":"subscribe","id":"s1","table":"orders","snapshot":true,"since":"00000000016B3748.00000003"}"#, .invalidMessage, "'snapshot' and 'since' cannot be combined", "s1"),
    ])
    func invalid(text: String, code: ProtocolErrorCode, message: String, id: String?) {
        let error = failure(text)
        #expect(error?.code == code)
        #expect(error?.message.contains(message) == true, "\(error?.message ?? "no error")")
        #expect(error?.id == id)
    }

    @Test("The JSON parser is strict", arguments: [
        #"{"type":"unsubscribe","id":"s1"} x"#, #"{"type":"unsubscribe","id":'s1'}"#, #"{"type":"unsubscribe","id":"s1\x"}"#,
        #"{"type":"unsubscribe","id":"\ud800"}"#, #"{"type":"unsubscribe","id":"\udc00x"}"#, #"{"type":"unsubscribe","id":"a"/*c*/}"#,
        "{\"type\":\"unsubscribe\",\"id\":\"a\tb\"}", #"{"a":01}"#, #"{"a":1.}"#, #"{"a":-}"#, #"{"a":tru}"#, #"{"a" 1}"#,
        String(repeating: "[", count: 100_000),
    ])
    func strictJSON(text: String) {
        #expect(failure(text)?.code == .invalidMessage)
    }

    @Test("Escapes decode: \\uXXXX, surrogate pairs, \\/")
    func escapes() throws {
        #expect(try parse(#"{"type":"unsubscribe","id":"\ud83d\ude00\/\u0041\b\f\r\t"}"#) == .unsubscribe(id: "😀/A\u{08}\u{0C}\r\t"))
    }

    @Test("Invalid UTF-8 inside a string is invalid_message, not a trap")
    func invalidUTF8() {
        var bytes = Array(#"{"type":"unsubscribe","id":"ab"}"#.utf8)
        bytes.insert(0xFF, at: 29)
        #expect(throws: ProtocolError.self) { try ClientMessage.parse(bytes) }
        var overlong = Array(#"{"type":"unsubscribe","id":"ab"}"#.utf8)
        overlong.insert(contentsOf: [0xC0, 0xAF], at: 29)
        #expect(throws: ProtocolError.self) { try ClientMessage.parse(overlong) }
    }

    // MARK: fuzzing

    @Test("Random bytes never trap and always give a stable code")
    func fuzzBytes() async {
        var rng = SplitMix64(seed: 2026)
        for iteration in 0..<20_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            let length = Int.random(in: 0...64, using: &rng)
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) }
            checkNoTrap(bytes)
        }
    }

    @Test("Mutated valid messages never trap")
    func fuzzMutations() async {
        var rng = SplitMix64(seed: 99)
        let seeds = [
            #"{"type":"subscribe","id":"s1","table":"public.orders","events":["INSERT","UPDATE"],"filter":"status=eq.open&amount=gt.100","snapshot":false,"since":"00000000016B3748.00000003"}"#,
            #"{"type":"unsubscribe","id":"s1"}"#,
        ].map { Array($0.utf8) }
        let pieces = Array(#"{}[],:"\ 0123456789.eE+-truefalsenull\u00e9"#.utf8) + [0xC3, 0xA9, 0xFF, 0x00]
        for iteration in 0..<20_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            var bytes = seeds.randomElement(using: &rng)!
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let position = Int.random(in: 0...bytes.count, using: &rng)
                switch Int.random(in: 0...2, using: &rng) {
                case 0: bytes.insert(pieces.randomElement(using: &rng)!, at: position)
                case 1: if position < bytes.count { bytes.remove(at: position) }
                default: if position < bytes.count { bytes[position] = pieces.randomElement(using: &rng)! }
                }
            }
            checkNoTrap(bytes)
        }
    }

    @Test("Random JSON objects with random member types never trap")
    func fuzzStructured() async {
        var rng = SplitMix64(seed: 5)
        let keys = ["type", "id", "table", "events", "filter", "snapshot", "since", "extra"]
        func value(_ depth: Int) -> String {
            switch Int.random(in: 0...(depth > 2 ? 5 : 7), using: &rng) {
            case 0: return "null"
            case 1: return Bool.random(using: &rng) ? "true" : "false"
            case 2: return String(Int.random(in: -5...100, using: &rng))
            case 3: return ["\"subscribe\"", "\"unsubscribe\"", "\"s1\"", "\"\"", "\"orders\"", "\"a.b.c\"", "\"INSERT\"",
                            "\"status=eq.x\"", "\"00000000016B3748.00000003\"", "\"\\u0000\""].randomElement(using: &rng)!
            case 4: return "\"" + String(repeating: "x", count: Int.random(in: 60...70, using: &rng)) + "\""
            case 5: return "1e999"
            case 6: return "[" + (0..<Int.random(in: 0...3, using: &rng)).map { _ in value(depth + 1) }.joined(separator: ",") + "]"
            default: return "{" + (0..<Int.random(in: 0...3, using: &rng)).map { _ in "\"\(keys.randomElement(using: &rng)!)\":\(value(depth + 1))" }.joined(separator: ",") + "}"
            }
        }
        let good = ["type": "\"subscribe\"", "id": "\"s1\"", "table": "\"orders\"", "events": "[\"INSERT\"]",
                    "filter": "\"status=eq.x\"", "snapshot": "false", "since": "\"00000000016B3748.00000003\"", "extra": "1"]
        var parsed = 0
        for iteration in 0..<20_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            let members = keys.shuffled(using: &rng).filter { Double.random(in: 0..<1, using: &rng) < ($0 == "extra" ? 0.1 : 0.7) }
            let text = "{" + members.map { key in
                let member = Double.random(in: 0..<1, using: &rng) < 0.7 ? good[key]! : value(0)
                return "\"\(key)\":\(member)"
            }.joined(separator: ",") + "}"
            if checkNoTrap(Array(text.utf8)) { parsed += 1 }
        }
        #expect(parsed > 0)  // the generator reaches valid messages too
    }

    /// Parses; an error must have a known code, a message, and encode to valid JSON. True when it parsed.
    @discardableResult
    func checkNoTrap(_ bytes: [UInt8]) -> Bool {
        do {
            _ = try ClientMessage.parse(bytes)
            return true
        } catch {
            #expect([.invalidMessage, .unknownType].contains(error.code))
            #expect(!error.message.isEmpty)
            let frame = error.serverMessage.jsonBytes()
            #expect((try? JSONSerialization.jsonObject(with: Data(frame))) != nil, "\(text(frame))")
            return false
        }
    }

    // MARK: resolving against tables and grants

    let catalog = TableCatalog(["public.items": itemsColumns, "public.notes": [RelationColumn(name: "id", typeOID: PostgresTypeOID.int4, isKey: true)]])

    func request(_ table: String = "items", filter: String = "", id: String = "s1") -> SubscribeRequest {
        SubscribeRequest(id: id, table: TableName(parsing: table)!, filter: filter)
    }

    @Test("unknown_table, invalid_filter (the spec's message) and a compiled filter")
    func resolve() throws {
        let unknown = #expect(throws: ProtocolError.self) { try catalog.resolve(request("orders")) }
        #expect(unknown?.code == .unknownTable)
        #expect(unknown?.id == "s1")
        #expect(unknown?.message == "table 'public.orders' is not streamed by this server")
        let badFilter = #expect(throws: ProtocolError.self) { try catalog.resolve(request(filter: "stauts=eq.open")) }
        #expect(badFilter?.code == .invalidFilter)
        #expect(badFilter?.message == "unknown column 'stauts'")
        #expect(badFilter?.id == "s1")
        #expect(badFilter?.serverMessage.jsonBytes() == utf8(#"{"type":"error","id":"s1","code":"invalid_filter","message":"unknown column 'stauts'"}"#))
        let resolved = try catalog.resolve(request("public.items", filter: "status=eq.open"))
        #expect(resolved.table == "public.items")
        #expect(resolved.filter.description == "status=eq.open")
        #expect(catalog.tableNames == ["public.items", "public.notes"])
    }

    @Test("Table names are compared byte for byte, as Postgres does: a canonically equivalent spelling (a Kelvin sign for K, a decomposed accent) is another table, for grants and for the catalog")
    func namesComparedAsBytes() throws {
        let kunden = TableCatalog(["public.Kunden": itemsColumns, "public.caf\u{E9}": itemsColumns])
        let kelvin = "public.\u{212A}unden"  // == "public.Kunden" as a Swift String
        #expect(kelvin == "public.Kunden")
        let granted = #expect(throws: ProtocolError.self) {
            try kunden.resolve(request(kelvin), access: .restricted(["public.Kunden": "tenant_id=eq.42"]))
        }
        #expect(granted?.code == .forbidden)
        let unknown = #expect(throws: ProtocolError.self) { try kunden.resolve(request(kelvin)) }
        #expect(unknown?.code == .unknownTable)
        let decomposed = #expect(throws: ProtocolError.self) { try kunden.resolve(request("public.cafe\u{301}")) }
        #expect(decomposed?.code == .unknownTable)
        #expect(try kunden.resolve(request("public.Kunden"), access: .restricted(["public.Kunden": ""])).table == "public.Kunden")
        #expect(try kunden.resolve(request("public.caf\u{E9}")).table == "public.caf\u{E9}")
    }

    @Test("Two tables whose names are canonically equivalent are two tables: the catalog keeps both, and the fan-out gives each one's changes to its own subscribers only")
    func equivalentNamesStayApart() throws {
        let composed = Relation(oid: 17_001, namespace: "public", name: "caf\u{E9}", replicaIdentity: .default, columns: itemsColumns)
        let decomposedColumns = Array(itemsColumns.prefix(3))
        let decomposed = Relation(oid: 17_002, namespace: "public", name: "cafe\u{301}", replicaIdentity: .default, columns: decomposedColumns)
        #expect(composed.qualifiedName == decomposed.qualifiedName, "equal as Swift Strings")
        let catalog = TableCatalog(relations: [composed, decomposed])
        #expect(catalog.tableNames.count == 2)
        #expect(catalog.columns(of: composed.qualifiedName)?.count == itemsColumns.count)
        #expect(catalog.columns(of: decomposed.qualifiedName)?.count == 3)
        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), try catalog.resolve(request(composed.qualifiedName)))
        try hub.subscribe(client: FanoutClientID(2), try catalog.resolve(request(decomposed.qualifiedName)))
        #expect(hub.match(insertEvent(["id": "1"], relation: composed)).map(\.client) == [FanoutClientID(1)])
        #expect(hub.match(insertEvent(["id": "1"], relation: decomposed)).map(\.client) == [FanoutClientID(2)])
    }

    @Test("forbidden: a table outside the grant (even an unknown one), or a grant whose filter is broken; the mandatory filter comes first")
    func access() throws {
        let grants = TableAccess.restricted(["public.items": "tenant_id=eq.42", "public.notes": "", "public.ghost": ""])
        let outside = #expect(throws: ProtocolError.self) { try catalog.resolve(request("secret"), access: .restricted(["public.items": ""])) }
        #expect(outside?.code == .forbidden)
        #expect(outside?.message == "the token does not grant table 'public.secret'")
        let notNotes = #expect(throws: ProtocolError.self) { try catalog.resolve(request("notes"), access: .restricted(["public.items": ""])) }
        #expect(notNotes?.code == .forbidden)
        let ghost = #expect(throws: ProtocolError.self) { try catalog.resolve(request("ghost"), access: grants) }
        #expect(ghost?.code == .unknownTable)
        let broken = #expect(throws: ProtocolError.self) {
            try catalog.resolve(request(), access: .restricted(["public.items": "tenant=eq.1"]))
        }
        #expect(broken?.code == .forbidden)
        #expect(broken?.message.contains("unknown column 'tenant'") == true)
        let resolved = try catalog.resolve(request(filter: "status=eq.open"), access: grants)
        #expect(resolved.filter.description == "tenant_id=eq.42&status=eq.open")
        #expect(!resolved.filter.matches(insertEvent(["tenant_id": "7", "status": "open"])))
        #expect(resolved.filter.matches(insertEvent(["tenant_id": "42", "status": "open"])))
        #expect(!resolved.filter.matches(deleteEvent(["id": "1", "tenant_id": "42", "status": "open"])))  // withheld DELETE
        #expect(try catalog.resolve(request("notes"), access: grants).filter.isEmpty)
    }

    @Test("TableName parsing")
    func tableNames() {
        #expect(TableName(parsing: "orders")?.description == "public.orders")
        #expect(TableName(parsing: "Sales.Orders")?.description == "Sales.Orders")  // no case folding
        for bad in ["", ".", "a.", ".a", "a.b.c", "a b", "\"a\"", "a\u{7F}", String(repeating: "a", count: 200)] {
            #expect(TableName(parsing: bad) == nil, "\(bad)")
        }
    }
}
