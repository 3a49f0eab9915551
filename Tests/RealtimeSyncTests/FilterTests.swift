import PoolKit
import RealtimeSync
import Testing

@Suite("filters")
struct FilterTests {
    /// Evaluates `filter` against an INSERT of `values`.
    func truth(_ filter: String, _ values: [String: String?]) throws -> FilterTruth {
        try itemsFilter(filter).evaluate(insertEvent(values))
    }

    func parseError(_ filter: String, columns: [RelationColumn] = itemsColumns) -> ProtocolError? {
        #expect(throws: ProtocolError.self, "\(filter)") { try Filter(parsing: filter, columns: columns) }
    }

    // MARK: parsing

    @Test("An unknown column is named exactly as the spec shows")
    func unknownColumn() {
        let error = parseError("stauts=eq.open")
        #expect(error?.code == .invalidFilter)
        #expect(error?.message == "unknown column 'stauts'")
    }

    @Test("Each malformed filter is invalid_filter with a message naming the bad part", arguments: [
        ("status", "must be column=op.value"),
        ("=eq.open", "has no column name"),
        ("status=like.open", "unknown operator 'like'"),
        ("status=eq", "needs '.' and a value after 'eq'"),
        ("status=", "has no operator"),
        ("status=EQ.open", "unknown operator 'EQ'"),
        ("status=eq.open&", "ends with '&'"),
        ("status=eq.open&&qty=eq.1", "empty condition"),
        ("&status=eq.open", "empty condition"),
        ("status=in.open", "'in' takes a list in parentheses"),
        ("status=in.()", "empty list in 'status=in.()'"),
        ("status=in.(a,b", "unclosed list"),
        ("status=in.(a,b)x", "unexpected text after ')'"),
        ("status=in.(a\"b)", "unexpected '\"'"),
        ("status=eq.\"open", "unterminated quoted value"),
        ("status=eq.\"open\"x", "unexpected text after the quoted value"),
        ("status=is.nil", "'is' takes null or notnull, got 'nil'"),
        ("qty=eq.abc", "'abc' is not a number (column 'qty' is int4)"),
        ("amount=gt.1,5", "'1,5' is not a number (column 'amount' is numeric)"),
        ("price=in.(1,x)", "'x' is not a number (column 'price' is float8)"),
        ("qty=eq.", "'' is not a number"),
        ("qty=eq.1e", "'1e' is not a number"),
        ("paid=eq.maybe", "'maybe' is not a boolean (column 'paid' is bool; use true or false)"),
    ])
    func malformed(filter: String, expected: String) {
        let error = parseError(filter)
        #expect(error?.code == .invalidFilter)
        #expect(error?.message.contains(expected) == true, "\(error?.message ?? "no error")")
    }

    @Test("Limits: 64 conditions, 1,000 items in a list, 1,000 values in a filter")
    func sizeLimits() throws {
        _ = try itemsFilter(Array(repeating: "qty=gt.1", count: 64).joined(separator: "&"))
        #expect(parseError(Array(repeating: "qty=gt.1", count: 65).joined(separator: "&"))?.message == "filter has more than 64 conditions")
        _ = try itemsFilter("qty=in.(" + (0..<1_000).map(String.init).joined(separator: ",") + ")")
        #expect(parseError("qty=in.(" + (0..<1_001).map(String.init).joined(separator: ",") + ")")?.message.hasSuffix("has more than 1000 items") == true)
        // 1,000 values in all conditions together: 999 in one list and 1 more fit, 2 more do not.
        let list = "qty=in.(" + (0..<999).map(String.init).joined(separator: ",") + ")"
        _ = try itemsFilter(list + "&qty=gt.1")
        #expect(parseError(list + "&qty=gt.1&qty=lt.9")?.message == "filter has more than 1000 values in all its conditions together")
        let hundred = "qty=in.(" + (0..<100).map(String.init).joined(separator: ",") + ")"
        _ = try itemsFilter(Array(repeating: hundred, count: 10).joined(separator: "&"))
        #expect(parseError(Array(repeating: hundred, count: 11).joined(separator: "&"))?.message == "filter has more than 1000 values in all its conditions together")
    }

    @Test("The empty filter has no conditions and matches every row, TRUNCATE and key-only DELETE included")
    func emptyFilter() throws {
        let filter = try itemsFilter("")
        #expect(filter.isEmpty)
        #expect(filter == Filter.all)
        #expect(filter.evaluate(insertEvent([:])) == .true)
        #expect(filter.evaluate(deleteEvent(["id": "1"])) == .true)
        #expect(filter.evaluate(truncateEvent()) == .true)
    }

    @Test("Conditions keep their text and operator; description joins them")
    func description() throws {
        let filter = try itemsFilter("status=eq.open&amount=gt.100&status=in.(\"a,b\",c)&uid=is.notnull")
        #expect(filter.conditions.map(\.column) == ["status", "amount", "status", "uid"])
        #expect(filter.conditions.map(\.operator) == [.eq, .gt, .in, .is])
        #expect(filter.description == "status=eq.open&amount=gt.100&status=in.(\"a,b\",c)&uid=is.notnull")
    }

    // MARK: numbers

    @Test("Integers compare as numbers, not text", arguments: [
        ("qty=gt.5", "6", FilterTruth.true), ("qty=gt.5", "5", .false), ("qty=gte.5", "5", .true),
        ("qty=gt.5", "10", .true),  // text order would say "10" < "5"
        ("qty=lt.-3", "-10", .true), ("qty=lt.-3", "-2", .false),
        ("qty=eq.007", "7", .true), ("qty=eq.+7", "7", .true), ("qty=neq.7", "7", .false), ("qty=neq.7", "8", .true),
        ("qty=eq.7.0", "7", .true), ("qty=gt.1.5", "2", .true), ("qty=lt.1.5", "1", .true), ("qty=eq.1.5", "1", .false),
        ("qty=lte.1e1", "10", .true), ("qty=gt.1e1", "10", .false),
        ("id=eq.9223372036854775807", "9223372036854775807", .true),
        ("id=eq.-9223372036854775808", "-9223372036854775808", .true),
        ("id=lt.9223372036854775808", "9223372036854775807", .true),  // operand beyond Int64
        ("id=gt.-99999999999999999999999", "-9223372036854775808", .true),
        ("id=gt.Infinity", "9223372036854775807", .false), ("id=lt.Infinity", "1", .true),
        ("qty=in.(1, 2 ,3)", "2", .true), ("qty=in.(1,2,3)", "4", .false), ("qty=in.(01,2.0)", "2", .true),
    ])
    func integers(filter: String, value: String, expected: FilterTruth) throws {
        let column = filter.split(separator: "=")[0]
        #expect(try truth(filter, [String(column): value]) == expected, "\(filter) on \(value)")
    }

    @Test("numeric and floats compare as exact decimals, however long", arguments: [
        ("amount=eq.1.5", "1.50", FilterTruth.true), ("amount=eq.1.50000", "1.5", .true), ("amount=eq.-0", "0.00", .true),
        ("amount=gt.100", "100.01", .true), ("amount=gt.100", "99.999", .false), ("amount=gt.100", "1000", .true),
        ("amount=gt.123456789012345678901234567890", "123456789012345678901234567890.000000000000000000001", .true),
        ("amount=lt.123456789012345678901234567890", "123456789012345678901234567889.999999999999999999999", .true),
        ("amount=eq.123456789012345678901234567890", "123456789012345678901234567891", .false),  // past Double precision
        ("amount=eq.0.1", "0.1000", .true), ("amount=lt.0.001", "0.0009", .true), ("amount=lt.-0.001", "-0.0009", .false),
        ("amount=gt.-1", "-0.5", .true), ("amount=lt.-1", "-1.5", .true), ("amount=eq.-1.5", "-1.5", .true),
        ("amount=gt.1e400", "NaN", .true),  // NaN sorts above every number, as in Postgres
        ("amount=eq.NaN", "NaN", .true), ("amount=eq.nan", "NaN", .true), ("amount=gt.Infinity", "NaN", .true),
        ("amount=lt.Infinity", "99999999999999999999999999", .true), ("amount=gt.-Infinity", "-1e400", .true),
        ("price=eq.0.1", "0.1", .true), ("price=gt.99999999999999999999", "1e+20", .true),
        ("price=eq.1e20", "1e+20", .true), ("price=lt.0", "-1.5e-05", .true), ("price=gt.-inf", "-1e+308", .true),
        ("price=eq.-Infinity", "-Infinity", .true), ("price=lt.NaN", "Infinity", .true), ("price=neq.NaN", "NaN", .false),
        ("price=in.(1.0,2.5)", "2.5", .true), ("price=eq.0", "-0", .true),
    ])
    func decimals(filter: String, value: String, expected: FilterTruth) throws {
        let column = filter.split(separator: "=")[0]
        #expect(try truth(filter, [String(column): value]) == expected, "\(filter) on \(value)")
    }

    @Test("A long in list (looked up through a set) answers as the item-by-item comparison of a short one does", arguments: [
        ("qty", "1,2.0,007,-5", "1000", ["2", "7", "-5", "3", "10", "1", "x1"]),
        ("amount", "1.5,0.1000,-0,1e2,NaN", "1000", ["1.50", "0.1", "0", "100.000", "NaN", "2", "1e2", "oops"]),
        ("price", "0.1,-Infinity,1e20", "1000", ["0.1", "-Infinity", "1e+20", "0.2"]),
        ("status", "open,Open,closed", "z", ["open", "OPEN", "Open", "closed ", "closed", ""]),
        ("uid", "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "00000000-0000-0000-0000-0000000000", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99"]),
    ])
    func longInLists(column: String, items: String, padPrefix: String, rows: [String]) throws {
        // Padding no row equals: 20 more items push the list past the set threshold.
        let padding = (10..<30).map { "\(padPrefix)\($0)" }.joined(separator: ",")
        let short = "\(column)=in.(\(items))"
        let long = "\(column)=in.(\(padding),\(items))"
        for row in rows {
            #expect(try truth(long, [column: row]) == truth(short, [column: row]), "\(column) \(row)")
        }
        #expect(try truth(long, [column: nil]) == .false)
    }

    @Test("Exact decimal order agrees with integer arithmetic on random scaled values")
    func decimalProperty() async throws {
        var rng = SplitMix64(seed: 42)
        func decimalText(_ units: Int64, scale: Int) -> String {
            // units / 10^scale, printed with a point and sometimes extra zeros.
            let negative = units < 0
            var digits = String(units.magnitude)
            if scale > 0 {
                while digits.count <= scale { digits = "0" + digits }
                digits.insert(".", at: digits.index(digits.endIndex, offsetBy: -scale))
            }
            if Bool.random(using: &rng) && scale > 0 { digits += "00" }
            return (negative ? "-" : "") + digits
        }
        for iteration in 0..<2_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            let a = Int64.random(in: -1_000_000...1_000_000, using: &rng), sa = Int.random(in: 0...4, using: &rng)
            let b = Int64.random(in: -1_000_000...1_000_000, using: &rng), sb = Int.random(in: 0...4, using: &rng)
            // Compare a/10^sa with b/10^sb exactly on a common scale.
            let left = a * Int64(pow10(4 - sa)), right = b * Int64(pow10(4 - sb))
            let filter = try itemsFilter("amount=lt.\(decimalText(b, scale: sb))")
            let expected: FilterTruth = left < right ? .true : .false
            #expect(filter.evaluate(insertEvent(["amount": decimalText(a, scale: sa)])) == expected,
                    "\(decimalText(a, scale: sa)) < \(decimalText(b, scale: sb))")
            let equal = try itemsFilter("amount=eq.\(decimalText(b, scale: sb))")
            #expect(equal.evaluate(insertEvent(["amount": decimalText(a, scale: sa)])) == (left == right ? .true : .false))
        }
    }

    func pow10(_ exponent: Int) -> Int { (0..<exponent).reduce(1) { value, _ in value * 10 } }

    // MARK: bool, text, uuid, others

    @Test("bool accepts the usual spellings; false sorts before true", arguments: [
        ("paid=eq.true", "t", FilterTruth.true), ("paid=eq.true", "f", .false), ("paid=eq.f", "f", .true),
        ("paid=eq.YES", "t", .true), ("paid=eq.off", "f", .true), ("paid=eq.1", "t", .true), ("paid=neq.true", "f", .true),
        ("paid=lt.true", "f", .true), ("paid=gt.false", "t", .true), ("paid=in.(true)", "t", .true),
    ])
    func bools(filter: String, value: String, expected: FilterTruth) throws {
        #expect(try truth(filter, ["paid": value]) == expected)
    }

    @Test("Text compares byte by byte (C collation)", arguments: [
        ("status=eq.open", "open", FilterTruth.true), ("status=eq.open", "Open", .false), ("status=eq.open", "open ", .false),
        ("status=lt.b", "a", .true), ("status=lt.a", "B", .true), ("status=gt.z", "é", .true),
        ("status=lt.ab", "a", .true), ("status=gt.a", "ab", .true), ("status=eq.", "", .true),
        ("status=eq.a.b=c", "a.b=c", .true), ("status=eq.\"a&b\"", "a&b", .true), ("status=eq.\"say \\\"hi\\\"\"", "say \"hi\"", .true),
        ("status=eq.\"back\\\\slash\"", "back\\slash", .true),
        ("status=in.(\"a,b\",c)", "a,b", .true), ("status=in.(\"a,b\",c)", "a", .false), ("status=in.(\"a,b\",c)", "c", .true),
        ("status=in.( \" x \" )", " x ", .true), ("status=in.(x , y)", "y", .true), ("status=in.(\"a)\")", "a)", .true),
        ("status=in.(null)", "null", .true),
    ])
    func texts(filter: String, value: String, expected: FilterTruth) throws {
        #expect(try truth(filter, ["status": value]) == expected, "\(filter) on \(value)")
    }

    @Test("uuid matches whatever the letter case of the filter; other types compare as their text")
    func uuidAndOthers() throws {
        let uid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        #expect(try truth("uid=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", ["uid": uid]) == .true)
        #expect(try truth("uid=in.(A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11)", ["uid": uid]) == .true)
        #expect(try truth("created=gte.2026-01-01", ["created": "2026-03-01 10:00:00+00"]) == .true)
        #expect(try truth("created=lt.2026-01-01", ["created": "2026-03-01 10:00:00+00"]) == .false)
    }

    @Test("char(n) compares without trailing blanks on either side, as Postgres does, also through the hub's equality index")
    func paddedChar() throws {
        let columns = [
            RelationColumn(name: "id", typeOID: PostgresTypeOID.int8, isKey: true),
            RelationColumn(name: "code", typeOID: PostgresTypeOID.bpchar),
        ]
        let relation = Relation(oid: 16_501, namespace: "public", name: "codes", replicaIdentity: .default, columns: columns)
        func truth(_ filter: String, _ value: String) throws -> FilterTruth {
            try Filter(parsing: filter, columns: columns).evaluate(insertEvent(["id": "1", "code": value], relation: relation))
        }
        // A char(5) holding 'ab' is sent as "ab   ".
        #expect(try truth("code=eq.ab", "ab   ") == .true)
        #expect(try truth("code=eq.\"ab \"", "ab   ") == .true)
        #expect(try truth("code=neq.ab", "ab   ") == .false)
        #expect(try truth("code=in.(xy,ab)", "ab   ") == .true)
        #expect(try truth("code=eq.a", "ab   ") == .false)
        #expect(try truth("code=gte.ab", "ab   ") == .true)
        #expect(try truth("code=gt.ab", "ab   ") == .false)
        #expect(try truth("code=lt.ab", "a    ") == .true)
        #expect(try truth("code=eq.\" ab\"", " ab  ") == .true, "leading blanks count")
        #expect(try truth("code=eq.ab", " ab  ") == .false, "leading blanks count")

        var hub = FanoutHub()
        try hub.subscribe(client: FanoutClientID(1), ResolvedSubscription(
            id: "ab", table: "public.codes", events: .default, filter: Filter(parsing: "code=eq.ab", columns: columns)))
        try hub.subscribe(client: FanoutClientID(2), ResolvedSubscription(
            id: "list", table: "public.codes", events: .default, filter: Filter(parsing: "code=in.(ab,cd)", columns: columns)))
        let matched = hub.match(insertEvent(["id": "1", "code": "ab   "], relation: relation)).map(\.client.rawValue)
        #expect(matched == [1, 2])
    }

    // MARK: NULL and missing values

    @Test("SQL NULL: is.null holds, every comparison is false (neq and in included)")
    func nulls() throws {
        for filter in ["status=eq.x", "status=neq.x", "status=lt.x", "status=gte.x", "status=in.(x)", "qty=neq.1", "paid=neq.true", "status=is.notnull"] {
            #expect(try truth(filter, ["status": nil]) == .false, "\(filter)")
        }
        #expect(try truth("status=is.null", ["status": nil]) == .true)
        #expect(try truth("status=is.null", ["status": "x"]) == .false)
        #expect(try truth("status=is.notnull", ["status": "x"]) == .true)
    }

    @Test("DELETE with a key-only old row fails closed on non-key columns, is.null included")
    func deleteFailsClosed() throws {
        let delete = deleteEvent(["id": "1", "status": "open", "tenant_id": "42"])
        #expect(try itemsFilter("tenant_id=eq.42").evaluate(delete) == .unknown)
        #expect(try itemsFilter("tenant_id=eq.42").matches(delete) == false)
        #expect(try itemsFilter("tenant_id=is.null").evaluate(delete) == .unknown)  // sent as NULL, but not known to be NULL
        #expect(try itemsFilter("tenant_id=is.notnull").evaluate(delete) == .unknown)
        #expect(try itemsFilter("id=eq.1").evaluate(delete) == .true)
        #expect(try itemsFilter("id=eq.2").evaluate(delete) == .false)
        // Three values: a false condition decides even when another is unknown.
        #expect(try itemsFilter("tenant_id=eq.42&id=eq.2").evaluate(delete) == .false)
        #expect(try itemsFilter("tenant_id=eq.42&id=eq.1").evaluate(delete) == .unknown)
        // With REPLICA IDENTITY FULL the old row carries everything.
        let full = deleteEvent(["id": "1", "status": "open", "tenant_id": "42"], oldKind: .full)
        #expect(try itemsFilter("tenant_id=eq.42&status=eq.open").evaluate(full) == .true)
        #expect(try itemsFilter("tenant_id=eq.41").evaluate(full) == .false)
    }

    @Test("INSERT and UPDATE use the new row; TRUNCATE has no row")
    func rows() throws {
        let update = updateEvent(["id": "1", "status": "paid"], old: ["id": "1", "status": "open"], oldKind: .full)
        #expect(try itemsFilter("status=eq.paid").evaluate(update) == .true)
        #expect(try itemsFilter("status=eq.open").evaluate(update) == .false)
        #expect(try itemsFilter("status=eq.open").evaluate(truncateEvent()) == .unknown)
        #expect(try itemsFilter("status=is.null").evaluate(truncateEvent()) == .unknown)
    }

    @Test("An unchanged TOAST value is unknown, unless a full old row carries it")
    func unchangedToast() throws {
        let keyOnly = updateEvent(["id": "1"], unchanged: ["status"])
        #expect(try itemsFilter("status=eq.open").evaluate(keyOnly) == .unknown)
        #expect(try itemsFilter("status=is.null").evaluate(keyOnly) == .unknown)
        let full = updateEvent(["id": "1"], old: ["id": "1", "status": "open"], oldKind: .full, unchanged: ["status"])
        #expect(try itemsFilter("status=eq.open").evaluate(full) == .true)
        #expect(try itemsFilter("status=eq.paid").evaluate(full) == .false)
    }

    @Test("Binary-format values are unknown")
    func binary() throws {
        let event = ChangeEvent(operation: .insert, relation: itemsRelation,
                                new: TupleData([t("1"), .binary([0x6F, 0x70]), .null, .null, .null, .null, .null, .null, .null]),
                                old: nil, oldKind: nil, xid: 1, commitLSN: LSN(1), commitTime: fixedTime, index: 0)
        #expect(try itemsFilter("status=eq.op").evaluate(event) == .unknown)
    }

    @Test("Columns are found by name when the table changed; a dropped or retyped column is unknown")
    func schemaDrift() throws {
        let filter = try itemsFilter("status=eq.open&qty=gt.1")
        // Columns reordered, one added.
        let moved = Relation(oid: 16_500, namespace: "public", name: "items", replicaIdentity: .default, columns: [
            RelationColumn(name: "extra", typeOID: PostgresTypeOID.text),
            RelationColumn(name: "qty", typeOID: PostgresTypeOID.int8),
            RelationColumn(name: "id", typeOID: PostgresTypeOID.int8, isKey: true),
            RelationColumn(name: "status", typeOID: PostgresTypeOID.varchar),
        ])
        #expect(filter.evaluate(insertEvent(["extra": "x", "qty": "2", "id": "1", "status": "open"], relation: moved)) == .true)
        #expect(filter.evaluate(insertEvent(["qty": "1", "id": "1", "status": "open"], relation: moved)) == .false)
        // qty retyped to text: numbers can no longer be compared; status dropped.
        let retyped = Relation(oid: 16_500, namespace: "public", name: "items", replicaIdentity: .default, columns: [
            RelationColumn(name: "id", typeOID: PostgresTypeOID.int8, isKey: true),
            RelationColumn(name: "qty", typeOID: PostgresTypeOID.text),
        ])
        #expect(try itemsFilter("qty=gt.1").evaluate(insertEvent(["id": "1", "qty": "5"], relation: retyped)) == .unknown)
        #expect(try itemsFilter("status=eq.open").evaluate(insertEvent(["id": "1"], relation: retyped)) == .unknown)
    }

    // MARK: combining

    @Test("and(_:) puts the mandatory filter first and needs both")
    func and() throws {
        let mandatory = try itemsFilter("tenant_id=eq.42")
        let own = try itemsFilter("status=eq.open")
        let both = mandatory.and(own)
        #expect(both.description == "tenant_id=eq.42&status=eq.open")
        #expect(both.matches(insertEvent(["tenant_id": "42", "status": "open"])))
        #expect(!both.matches(insertEvent(["tenant_id": "41", "status": "open"])))
        #expect(!both.matches(insertEvent(["tenant_id": "42", "status": "paid"])))
        #expect(Filter.all.and(own) == own)
        #expect(mandatory.and(.all) == mandatory)
    }

    @Test("Filter parsing never traps on random input")
    func fuzzParse() async {
        var rng = SplitMix64(seed: 7)
        let alphabet = Array("status=eq.in.(),\"\\&qtyamountpaid is.null notnull 0123456789.-eE+é\u{0}".utf8)
        for iteration in 0..<20_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            let length = Int.random(in: 0...24, using: &rng)
            let bytes = (0..<length).map { _ in alphabet.randomElement(using: &rng)! }
            let input = String(decoding: bytes, as: UTF8.self)
            do {
                let filter = try Filter(parsing: input, columns: itemsColumns)
                _ = filter.evaluate(insertEvent(["status": "open", "qty": "1", "amount": "1.5", "paid": "t"]))
                _ = filter.evaluate(deleteEvent(["id": "1"]))
            } catch {
                #expect(error.code == .invalidFilter)
                #expect(!error.message.isEmpty)
            }
        }
    }
}
