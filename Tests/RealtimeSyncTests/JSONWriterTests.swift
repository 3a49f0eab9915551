import PoolKit
import RealtimeSync
import Testing

@Suite("JSON values")
struct JSONWriterTests {
    func value(_ text: String, _ oid: UInt32) -> String {
        var buffer: [UInt8] = []
        JSONWriter.writeValue(text: Array(text.utf8), typeOID: oid, into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }

    @Test("Integers and floats are numbers; float NaN and Infinity are strings")
    func numbers() {
        #expect(value("-32768", PostgresTypeOID.int2) == "-32768")
        #expect(value("2147483647", PostgresTypeOID.int4) == "2147483647")
        #expect(value("-9223372036854775808", PostgresTypeOID.int8) == "-9223372036854775808")
        #expect(value("4294967295", PostgresTypeOID.oid) == "4294967295")
        #expect(value("1.5", PostgresTypeOID.float4) == "1.5")
        #expect(value("-0", PostgresTypeOID.float8) == "-0")
        #expect(value("1e+100", PostgresTypeOID.float8) == "1e+100")
        #expect(value("1.2345678901234567e-300", PostgresTypeOID.float8) == "1.2345678901234567e-300")
        #expect(value("NaN", PostgresTypeOID.float8) == #""NaN""#)
        #expect(value("Infinity", PostgresTypeOID.float4) == #""Infinity""#)
        #expect(value("-Infinity", PostgresTypeOID.float8) == #""-Infinity""#)
    }

    @Test("numeric is a string, NaN included")
    func numeric() {
        #expect(value("12345678901234567890.000000001", PostgresTypeOID.numeric) == #""12345678901234567890.000000001""#)
        #expect(value("NaN", PostgresTypeOID.numeric) == #""NaN""#)
    }

    @Test("bool is true/false")
    func bool() {
        #expect(value("t", PostgresTypeOID.bool) == "true")
        #expect(value("f", PostgresTypeOID.bool) == "false")
    }

    @Test("json and jsonb are embedded as JSON")
    func json() {
        #expect(value(#"{"a": [1, "x\"y"]}"#, PostgresTypeOID.jsonb) == #"{"a": [1, "x\"y"]}"#)
        #expect(value("  [1,2] ", PostgresTypeOID.json) == "  [1,2] ")
        #expect(value("null", PostgresTypeOID.json) == "null")
        #expect(value("\"s\"", PostgresTypeOID.jsonb) == "\"s\"")
    }

    @Test("Other types are their text form, escaped")
    func strings() throws {
        #expect(value("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", PostgresTypeOID.uuid) == #""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#)
        #expect(value("{1,2}", 1007) == #""{1,2}""#)
        #expect(value("\"q\" \\ /", PostgresTypeOID.text) == #""\"q\" \\ /""#)
        #expect(value("\u{0}\u{1}\u{8}\u{9}\u{A}\u{C}\u{D}\u{1F}\u{7F}", PostgresTypeOID.text) == #""\u0000\u0001\b\t\n\f\r\u001f"# + "\u{7F}\"")
        #expect(value("é ☃ 😀 𝄞", PostgresTypeOID.text) == "\"é ☃ 😀 𝄞\"")
        #expect(value("", PostgresTypeOID.text) == "\"\"")
        let mixed = "line1\nline2 \"quoted\" 😀 \u{2028}"
        let parsed = try parseJSON(Array(value(mixed, PostgresTypeOID.text).utf8)) as? String
        #expect(parsed == mixed)
    }

    @Test("Invalid UTF-8 becomes U+FFFD so the output stays valid")
    func invalidUTF8() throws {
        let cases: [[UInt8]] = [[0xFF], [0xC3], [0xE2, 0x98], [0xED, 0xA0, 0x80], [0xF0, 0x9F, 0x98], [0xC0, 0xAF], [0xF5, 0x80, 0x80, 0x80]]
        for bad in cases {
            var buffer: [UInt8] = []
            JSONWriter.writeString([UInt8(ascii: "a")] + bad + [UInt8(ascii: "b")], into: &buffer)
            let text = try #require(String(validating: buffer, as: UTF8.self), "\(bad)")
            #expect(text.hasPrefix("\"a\u{FFFD}") && text.hasSuffix("b\""), "\(bad) → \(text)")
        }
    }

    @Test("json that is not valid UTF-8 (a SQL_ASCII database) becomes a string with U+FFFD, not an invalid frame")
    func jsonInvalidUTF8() throws {
        var buffer: [UInt8] = []
        JSONWriter.writeValue(text: Array(#"{"a": ""#.utf8) + [0xFF] + Array(#""}"#.utf8), typeOID: PostgresTypeOID.json, into: &buffer)
        let text = try #require(String(validating: buffer, as: UTF8.self))
        #expect(text == "\"{\\\"a\\\": \\\"\u{FFFD}\\\"}\"", "\(text)")
        // Valid UTF-8 is still embedded as JSON.
        #expect(value(#"{"é": "☃"}"#, PostgresTypeOID.json) == #"{"é": "☃"}"#)
    }

    @Test("Malformed number text falls back to a string")
    func numberGrammar() {
        for valid in ["0", "-1", "10.25", "1e5", "1E-5", "-0.5e+10"] { #expect(JSONWriter.isJSONNumber(Array(valid.utf8)), "\(valid)") }
        for invalid in ["", "-", "01", ".5", "1.", "1e", "+1", "0x10", "1 ", "NaN"] { #expect(!JSONWriter.isJSONNumber(Array(invalid.utf8)), "\(invalid)") }
        #expect(value("01", PostgresTypeOID.int4) == #""01""#)
    }

    @Test("Tuple values: null and binary")
    func tupleValues() {
        var buffer: [UInt8] = []
        JSONWriter.writeValue(.null, typeOID: PostgresTypeOID.int4, into: &buffer)
        buffer.append(UInt8(ascii: ","))
        JSONWriter.writeValue(.binary([0xDE, 0xAD]), typeOID: PostgresTypeOID.bytea, into: &buffer)
        #expect(String(decoding: buffer, as: UTF8.self) == #"null,"\\xdead""#)
    }

    @Test("Commit times are ISO 8601 UTC with microseconds")
    func timestamps() {
        #expect(PostgresTimestamp(microsecondsSince2000: 0).description == "2000-01-01T00:00:00.000000Z")
        #expect(PostgresTimestamp(microsecondsSince2000: -1).description == "1999-12-31T23:59:59.999999Z")
        #expect(fixedTime.description == "2025-11-25T18:00:00.123456Z")
        #expect(PostgresTimestamp(microsecondsSince2000: 0x0003_0431_594E_3601).description == "2026-11-26T19:02:08.338433Z")
        #expect(PostgresTimestamp(microsecondsSince1970: 0).description == "1970-01-01T00:00:00.000000Z")
        #expect(PostgresTimestamp(microsecondsSince2000: 5_097_600_000_000).description == "2000-02-29T00:00:00.000000Z")
        #expect(PostgresTimestamp(microsecondsSince2000: 5_184_000_000_000).description == "2000-03-01T00:00:00.000000Z")
        #expect(PostgresTimestamp(microsecondsSince2000: .max).description == "infinity")
    }
}

@Suite("LSN and Cursor")
struct CursorTests {
    @Test("LSN text form round-trips")
    func lsn() {
        #expect(LSN(0x16_B374_D848).description == "16/B374D848")
        #expect(LSN("16/B374D848") == LSN(0x16_B374_D848))
        #expect(LSN("0/0") == .zero)
        #expect(LSN("16B374D848") == nil)
        #expect(LSN("1/2/3") == nil)
        #expect(LSN("+1/0") == nil && LSN("1/-0") == nil && LSN(" 1/0") == nil)
        #expect(LSN("G/0") == nil)
    }

    @Test("Cursor text: 16 uppercase hex digits, dot, 8 hex digits")
    func format() throws {
        let cursor = Cursor(commitLSN: LSN(0x16B_3748), index: 3)
        #expect(cursor.description == "00000000016B3748.00000003")
        #expect(try Cursor(parsing: "00000000016B3748.00000003") == cursor)
        #expect(try Cursor(parsing: "00000000016b3748.00000003") == cursor)
        #expect(Cursor("00000000016B3748.00000003") == cursor)
        let max = Cursor(commitLSN: LSN(.max), index: .max)
        #expect(max.description == "FFFFFFFFFFFFFFFF.FFFFFFFF")
        #expect(try Cursor(parsing: max.description) == max)
    }

    @Test("Bad cursors throw errors that say what is wrong")
    func errors() {
        let short = #expect(throws: CursorError.self) { try Cursor(parsing: "016B3748.3") }
        #expect(short?.code == .invalidLength)
        #expect(short?.message.contains("25") == true)
        let separator = #expect(throws: CursorError.self) { try Cursor(parsing: "00000000016B3748-00000003") }
        #expect(separator?.code == .missingSeparator)
        let hex = #expect(throws: CursorError.self) { try Cursor(parsing: "00000000016B374G.00000003") }
        #expect(hex?.code == .invalidHexDigit)
        #expect(hex?.message.contains("position 16") == true)
        #expect(throws: CursorError.self) { try Cursor(parsing: "00000000016B3748.0000000 ") }
        #expect(throws: CursorError.self) { try Cursor(parsing: "") }
        #expect(Cursor("nope") == nil)
    }

    @Test("String order equals stream order")
    func ordering() {
        var generator = SplitMix64(seed: 7)
        let cursors = (0..<500).map { _ in
            Cursor(commitLSN: LSN(generator.next() >> (generator.next() % 64)), index: UInt32(truncatingIfNeeded: generator.next() >> (generator.next() % 32)))
        }
        #expect(cursors.sorted().map(\.description) == cursors.map(\.description).sorted())
        #expect(Cursor(commitLSN: LSN(1), index: 9) < Cursor(commitLSN: LSN(2), index: 0))
        #expect(Cursor(commitLSN: LSN(2), index: 0) < Cursor(commitLSN: LSN(2), index: 1))
    }
}
