import CLibPQ

// MARK: - Parameters

/// One query parameter as sent to the server: its bytes, format and type.
public struct PostgresParameter: Sendable, Hashable {
    /// The value's bytes: text form for text parameters, raw bytes for binary ones.
    public var bytes: [UInt8]
    /// True for the binary wire format (used for `bytea`), false for text.
    public var isBinary: Bool
    /// The type OID; 0 lets the server infer the type from the statement.
    public var typeOID: UInt32

    /// A text-format parameter; the server infers its type unless `typeOID` is given.
    public init(text: String, typeOID: UInt32 = 0) {
        self.bytes = Array(text.utf8)
        self.isBinary = false
        self.typeOID = typeOID
    }

    /// A binary-format parameter of the given type.
    public init(binary: [UInt8], typeOID: UInt32) {
        self.bytes = binary
        self.isBinary = true
        self.typeOID = typeOID
    }
}

/// A Swift value that can be bound to a `$n` placeholder.
public protocol PostgresBindable: Sendable {
    /// The value as a wire parameter.
    var postgresParameter: PostgresParameter { get }
}

extension String: PostgresBindable {
    /// Text, type inferred by the server.
    public var postgresParameter: PostgresParameter { PostgresParameter(text: self) }
}

extension Substring: PostgresBindable {
    /// Text, type inferred by the server.
    public var postgresParameter: PostgresParameter { PostgresParameter(text: String(self)) }
}

extension Int: PostgresBindable {
    /// Decimal text, type inferred by the server.
    public var postgresParameter: PostgresParameter { PostgresParameter(text: String(self)) }
}

extension Int64: PostgresBindable {
    /// Decimal text, type inferred by the server.
    public var postgresParameter: PostgresParameter { PostgresParameter(text: String(self)) }
}

extension Int32: PostgresBindable {
    /// Decimal text, type inferred by the server.
    public var postgresParameter: PostgresParameter { PostgresParameter(text: String(self)) }
}

extension Double: PostgresBindable {
    /// Text in the form `float8in` reads back exactly (shortest round-trip form).
    public var postgresParameter: PostgresParameter {
        if isNaN { return PostgresParameter(text: "NaN") }
        if isInfinite { return PostgresParameter(text: self < 0 ? "-Infinity" : "Infinity") }
        return PostgresParameter(text: String(self))
    }
}

extension Bool: PostgresBindable {
    /// `true` / `false`.
    public var postgresParameter: PostgresParameter { PostgresParameter(text: self ? "true" : "false") }
}

extension Array: PostgresBindable where Element == UInt8 {
    /// Raw bytes as `bytea` in binary format (no escaping, no size blow-up).
    public var postgresParameter: PostgresParameter { PostgresParameter(binary: self, typeOID: PostgresTypeOID.bytea) }
}

/// JSON text bound to or read from a `json`/`jsonb` column.
public struct PostgresJSON: Sendable, Hashable, PostgresBindable, PostgresDecodable {
    /// The JSON document as text.
    public var text: String

    /// Wraps JSON text.
    public init(_ text: String) { self.text = text }

    /// Text, type inferred by the server (works for `json` and `jsonb` columns and casts).
    public var postgresParameter: PostgresParameter { PostgresParameter(text: text) }

    /// Reads any column as its JSON text.
    public static func decode(from cell: PostgresCell) throws -> PostgresJSON { PostgresJSON(cell.string) }
}

/// Well-known PostgreSQL type OIDs.
public enum PostgresTypeOID {
    /// `bool`
    public static let bool: UInt32 = 16
    /// `bytea`
    public static let bytea: UInt32 = 17
    /// `int8`
    public static let int8: UInt32 = 20
    /// `int2`
    public static let int2: UInt32 = 21
    /// `int4`
    public static let int4: UInt32 = 23
    /// `text`
    public static let text: UInt32 = 25
    /// `oid`
    public static let oid: UInt32 = 26
    /// `json`
    public static let json: UInt32 = 114
    /// `float4`
    public static let float4: UInt32 = 700
    /// `float8`
    public static let float8: UInt32 = 701
    /// `bpchar` (`char(n)`, blank-padded)
    public static let bpchar: UInt32 = 1042
    /// `varchar`
    public static let varchar: UInt32 = 1043
    /// `timestamptz`
    public static let timestamptz: UInt32 = 1184
    /// `uuid`
    public static let uuid: UInt32 = 2950
    /// `numeric`
    public static let numeric: UInt32 = 1700
    /// `jsonb`
    public static let jsonb: UInt32 = 3802
}

// MARK: - Results

/// Owns one `PGresult` and frees it exactly once.
final class ResultBox: @unchecked Sendable {
    // @unchecked: a PGresult is immutable once returned by libpq and reading it from several
    // threads is safe; it is freed only in deinit, when nothing can reach it any more.
    let pointer: OpaquePointer
    init(_ pointer: OpaquePointer) { self.pointer = pointer }
    deinit { PQclear(pointer) }
}

/// The rows and status of one statement.
public struct PostgresQueryResult: Sendable, RandomAccessCollection {
    /// A column of the result.
    public struct Column: Sendable, Hashable {
        /// The column's name as the server labels it.
        public var name: String
        /// The column's type OID.
        public var typeOID: UInt32
    }

    let box: ResultBox?
    /// The number of columns. Column names and types are read from the `PGresult` when asked
    /// for, so a result costs no array and no strings until they are used.
    let columnCount: Int
    /// The result's columns, in order.
    public var columns: [Column] {
        (0..<columnCount).map { Column(name: columnName(at: $0), typeOID: columnTypeOID(at: $0)) }
    }
    /// The command tag, e.g. `INSERT 0 3`, `SELECT 1`, `UPDATE 2`.
    public let commandTag: String
    /// Rows inserted, updated, deleted, selected, moved or copied, when the command reports it.
    public let rowsAffected: Int?
    private let rowCount: Int

    init(box: ResultBox?, commandTag: String, rowsAffected: Int?) {
        self.box = box
        self.commandTag = commandTag
        self.rowsAffected = rowsAffected
        if let box {
            self.columnCount = Int(PQnfields(box.pointer))
            self.rowCount = Int(PQntuples(box.pointer))
        } else {
            self.columnCount = 0
            self.rowCount = 0
        }
    }

    func columnName(at i: Int) -> String { String(cString: PQfname(box!.pointer, Int32(i))) }
    func columnTypeOID(at i: Int) -> UInt32 { UInt32(PQftype(box!.pointer, Int32(i))) }

    /// The first row's index, always 0.
    public var startIndex: Int { 0 }
    /// One past the last row's index.
    public var endIndex: Int { rowCount }

    /// The row at `position`.
    public subscript(position: Int) -> PostgresRow {
        precondition(position >= 0 && position < rowCount, "row index \(position) out of range 0..<\(rowCount)")
        return PostgresRow(result: self, index: position)
    }

    /// The index of the column called `name` (exact, case-sensitive match), if any.
    public func columnIndex(_ name: String) -> Int? {
        (0..<columnCount).first { columnName(at: $0) == name }
    }
}

/// One row of a result, with typed access by column index or name.
public struct PostgresRow: Sendable {
    let result: PostgresQueryResult
    let index: Int

    /// The number of columns.
    public var count: Int { result.columnCount }

    /// The cell in column `column` (0-based).
    public subscript(_ column: Int) -> PostgresCell {
        precondition(column >= 0 && column < result.columnCount,
                     "column index \(column) out of range 0..<\(result.columnCount)")
        return PostgresCell(result: result, row: index, column: column)
    }

    /// The cell in the column called `name`, or nil when the result has no such column.
    public subscript(_ name: String) -> PostgresCell? {
        result.columnIndex(name).map { self[$0] }
    }

    /// Decodes column `column` as `T`; nil for SQL NULL.
    public func decode<T: PostgresDecodable>(_ type: T.Type = T.self, at column: Int) throws -> T? {
        let cell = self[column]
        return cell.isNull ? nil : try T.decode(from: cell)
    }

    /// Decodes the column called `name` as `T`; nil for SQL NULL. Throws when there is no such column.
    public func decode<T: PostgresDecodable>(_ type: T.Type = T.self, named name: String) throws -> T? {
        guard let i = result.columnIndex(name) else {
            throw PostgresError(code: .invalidUsage,
                                message: "no column '\(name)' in result (columns: \(result.columns.map(\.name).joined(separator: ", ")))")
        }
        return try decode(type, at: i)
    }
}

/// One value of a row, in PostgreSQL's text form.
public struct PostgresCell: Sendable {
    let result: PostgresQueryResult
    let row: Int
    let column: Int

    private var pointer: OpaquePointer { result.box!.pointer }

    /// The column's name.
    public var columnName: String { result.columnName(at: column) }
    /// The column's type OID.
    public var typeOID: UInt32 { result.columnTypeOID(at: column) }
    /// True for SQL NULL.
    public var isNull: Bool { PQgetisnull(pointer, Int32(row), Int32(column)) == 1 }

    /// The raw text form; empty for NULL.
    public var string: String {
        String(cString: PQgetvalue(pointer, Int32(row), Int32(column)))
    }

    /// Calls `body` with the value's text bytes (no copy).
    public func withUTF8<R>(_ body: (UnsafeBufferPointer<UInt8>) throws -> R) rethrows -> R {
        let p = PQgetvalue(pointer, Int32(row), Int32(column))!
        let n = Int(PQgetlength(pointer, Int32(row), Int32(column)))
        return try p.withMemoryRebound(to: UInt8.self, capacity: n) {
            try body(UnsafeBufferPointer(start: $0, count: n))
        }
    }

    /// The value decoded as `T`; nil for SQL NULL.
    public func decode<T: PostgresDecodable>(_ type: T.Type = T.self) throws -> T? {
        isNull ? nil : try T.decode(from: self)
    }

    func decodingError(_ swiftType: String) -> PostgresError {
        PostgresError(code: .decoding,
                      message: "cannot decode column '\(columnName)' (type oid \(typeOID)) value '\(string.prefix(64))' as \(swiftType)")
    }
}

/// A Swift type that can be read from a result cell (text format).
public protocol PostgresDecodable: Sendable {
    /// Decodes a non-NULL cell.
    static func decode(from cell: PostgresCell) throws -> Self
}

@inline(__always)
private func parseInteger(_ bytes: UnsafeBufferPointer<UInt8>) -> Int64? {
    var i = 0
    var negative = false
    guard !bytes.isEmpty else { return nil }
    if bytes[0] == UInt8(ascii: "-") { negative = true; i = 1 } else if bytes[0] == UInt8(ascii: "+") { i = 1 }
    guard i < bytes.count else { return nil }
    var value: Int64 = 0
    while i < bytes.count {
        let d = bytes[i] &- UInt8(ascii: "0")
        guard d < 10 else { return nil }
        let (m, o1) = value.multipliedReportingOverflow(by: 10)
        let (a, o2) = negative ? m.subtractingReportingOverflow(Int64(d)) : m.addingReportingOverflow(Int64(d))
        guard !o1, !o2 else { return nil }
        value = a
        i += 1
    }
    return value
}

extension Int64: PostgresDecodable {
    /// Reads `int2`/`int4`/`int8`/`oid` (and any integer text).
    public static func decode(from cell: PostgresCell) throws -> Int64 {
        guard let v = cell.withUTF8(parseInteger) else { throw cell.decodingError("Int64") }
        return v
    }
}

extension Int: PostgresDecodable {
    /// Reads `int2`/`int4`/`int8`/`oid` (and any integer text).
    public static func decode(from cell: PostgresCell) throws -> Int {
        guard let v = cell.withUTF8(parseInteger) else { throw cell.decodingError("Int") }
        return Int(v)
    }
}

extension Int32: PostgresDecodable {
    /// Reads integer text that fits 32 bits.
    public static func decode(from cell: PostgresCell) throws -> Int32 {
        guard let v = cell.withUTF8(parseInteger), let r = Int32(exactly: v) else { throw cell.decodingError("Int32") }
        return r
    }
}

extension Double: PostgresDecodable {
    /// Reads `float4`/`float8`/`numeric`/integers, including `NaN` and `±Infinity`.
    public static func decode(from cell: PostgresCell) throws -> Double {
        let s = cell.string
        switch s {
        case "NaN": return .nan
        case "Infinity": return .infinity
        case "-Infinity": return -.infinity
        default:
            guard let v = Double(s) else { throw cell.decodingError("Double") }
            return v
        }
    }
}

extension Bool: PostgresDecodable {
    /// Reads `bool` (`t`/`f`).
    public static func decode(from cell: PostgresCell) throws -> Bool {
        switch cell.string {
        case "t", "true": return true
        case "f", "false": return false
        default: throw cell.decodingError("Bool")
        }
    }
}

extension String: PostgresDecodable {
    /// Reads any column as its text form.
    public static func decode(from cell: PostgresCell) throws -> String { cell.string }
}

extension Array: PostgresDecodable where Element == UInt8 {
    /// Reads `bytea` (hex output form `\x…`); other types give their text bytes.
    public static func decode(from cell: PostgresCell) throws -> [UInt8] {
        try cell.withUTF8 { buf -> [UInt8] in
            guard cell.typeOID == PostgresTypeOID.bytea else { return Array(buf) }
            guard buf.count >= 2, buf[0] == UInt8(ascii: "\\"), buf[1] == UInt8(ascii: "x"), buf.count % 2 == 0 else {
                throw cell.decodingError("[UInt8] (expected bytea hex format; bytea_output=escape is not supported)")
            }
            var out = [UInt8]()
            out.reserveCapacity((buf.count - 2) / 2)
            var i = 2
            while i < buf.count {
                guard let hi = hexValue(buf[i]), let lo = hexValue(buf[i + 1]) else { throw cell.decodingError("[UInt8]") }
                out.append(hi << 4 | lo)
                i += 2
            }
            return out
        }
    }
}

@inline(__always)
private func hexValue(_ c: UInt8) -> UInt8? {
    switch c {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
    default: return nil
    }
}
