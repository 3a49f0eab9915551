import PoolKit
/// A filter operator (PROTOCOL.md: `eq neq lt lte gt gte in is`).
public enum FilterOperator: String, Sendable, Hashable, CaseIterable {
    /// Equal.
    case eq
    /// Not equal (NULL never matches).
    case neq
    /// Less than.
    case lt
    /// Less than or equal.
    case lte
    /// Greater than.
    case gt
    /// Greater than or equal.
    case gte
    /// Equal to one of a list: `in.(a,b,c)`.
    case `in`
    /// `is.null` / `is.notnull`.
    case `is`
}

/// The result of evaluating a filter against a row, in three values: a row that
/// lacks a column the filter needs gives `unknown`, never `true`.
public enum FilterTruth: Sendable, Hashable {
    /// Every condition holds.
    case `true`
    /// Some condition is false (a NULL compared with `eq`…`in` is false).
    case `false`
    /// No condition is false, but the row does not carry a value some condition needs.
    case unknown

    /// Three-valued AND: false wins, then unknown.
    @inline(__always)
    static func && (lhs: FilterTruth, rhs: FilterTruth) -> FilterTruth {
        if lhs == .false || rhs == .false { return .false }
        if lhs == .unknown || rhs == .unknown { return .unknown }
        return .true
    }
}

/// How values of a column are compared, chosen once from its type OID.
enum ColumnClass: Sendable, Hashable {
    /// int2, int4, int8, oid: numbers (fast path through Int64).
    case integer
    /// float4, float8, numeric: numbers, compared as exact decimals.
    case number
    /// bool: false < true.
    case bool
    /// uuid: text, with the operand lower-cased as Postgres prints uuids.
    case uuid
    /// bpchar (`char(n)`): text without its trailing blanks, as Postgres compares it
    /// (`'ab'::char(5) = 'ab'`; the row's text form is `ab   `).
    case paddedText
    /// Everything else: the Postgres text form, compared byte by byte (C collation).
    case text

    init(typeOID: UInt32) {
        switch typeOID {
        case PostgresTypeOID.int2, PostgresTypeOID.int4, PostgresTypeOID.int8, PostgresTypeOID.oid: self = .integer
        case PostgresTypeOID.float4, PostgresTypeOID.float8, PostgresTypeOID.numeric: self = .number
        case PostgresTypeOID.bool: self = .bool
        case PostgresTypeOID.uuid: self = .uuid
        case PostgresTypeOID.bpchar: self = .paddedText
        default: self = .text
        }
    }

    static func typeName(_ oid: UInt32) -> String {
        switch oid {
        case PostgresTypeOID.int2: "int2"
        case PostgresTypeOID.int4: "int4"
        case PostgresTypeOID.int8: "int8"
        case PostgresTypeOID.oid: "oid"
        case PostgresTypeOID.float4: "float4"
        case PostgresTypeOID.float8: "float8"
        case PostgresTypeOID.numeric: "numeric"
        case PostgresTypeOID.bool: "bool"
        case PostgresTypeOID.uuid: "uuid"
        case PostgresTypeOID.bpchar: "bpchar"
        default: "type oid \(oid)"
        }
    }
}

/// A filter value, converted once for its column's type.
enum FilterOperand: Sendable, Hashable {
    /// A number; `int` is set when it is an integer that fits in Int64.
    case number(DecimalNumber, int: Int64?)
    case bool(Bool)
    case text([UInt8])
}

/// The key under which an equality condition is indexed, and under which a row's value is looked up:
/// equal values (by the column's comparison) give equal keys.
enum FilterIndexKey: Sendable, Hashable {
    case int(Int64)
    case number(DecimalNumber)
    case bool(Bool)
    case bytes([UInt8])

    init(_ operand: FilterOperand) {
        switch operand {
        case .number(let number, let int): self = int.map(FilterIndexKey.int) ?? .number(number)
        case .bool(let value): self = .bool(value)
        case .text(let bytes): self = .bytes(bytes)
        }
    }

    /// The key of a row value of a column compared as `columnClass`; nil when the text does not parse.
    init?(rowText bytes: ArraySlice<UInt8>, columnClass: ColumnClass) {
        switch columnClass {
        case .integer:
            if let value = parseInt64(bytes) { self = .int(value); return }
            guard let number = DecimalNumber(text: bytes) else { return nil }
            self = number.exactInt64.map(FilterIndexKey.int) ?? .number(number)
        case .number:
            guard let number = DecimalNumber(text: bytes) else { return nil }
            self = number.exactInt64.map(FilterIndexKey.int) ?? .number(number)
        case .bool:
            guard let value = parseRowBool(bytes) else { return nil }
            self = .bool(value)
        case .uuid, .text:
            self = .bytes(Array(bytes))
        case .paddedText:
            self = .bytes(Array(withoutTrailingBlanks(bytes)))
        }
    }
}

/// One compiled condition of a filter: `column=op.value`.
public struct FilterCondition: Sendable, Hashable, CustomStringConvertible {
    /// The column's name.
    public let column: String
    /// The operator.
    public let `operator`: FilterOperator
    /// The condition as written by the client.
    public let description: String
    /// The column's position in the table the filter was compiled against (checked by name on use).
    let columnIndex: Int
    /// The column's type OID at compile time.
    let typeOID: UInt32
    let columnClass: ColumnClass
    /// One operand for eq…gte, the list for `in`, none for `is`.
    let operands: [FilterOperand]
    /// For `is`: true for `is.null`, false for `is.notnull`.
    let isNull: Bool
    /// For an `in` list longer than `Self.inSetThreshold`: its operands' keys, so that a row's
    /// value is parsed once and looked up, instead of parsed and compared once per item (up to
    /// 1,000 per list, on every change of the table, inside the fan-out's lock).
    let inKeys: Set<FilterIndexKey>?

    /// Lists longer than this are looked up through `inKeys`.
    static let inSetThreshold = 8

    init(column: String, operator op: FilterOperator, description: String, columnIndex: Int, typeOID: UInt32,
         columnClass: ColumnClass, operands: [FilterOperand], isNull: Bool) {
        self.column = column
        self.operator = op
        self.description = description
        self.columnIndex = columnIndex
        self.typeOID = typeOID
        self.columnClass = columnClass
        self.operands = operands
        self.isNull = isNull
        self.inKeys = op == .in && operands.count > Self.inSetThreshold ? Set(operands.map(FilterIndexKey.init)) : nil
    }
}

/// A row filter (PROTOCOL.md `filter`): conditions joined by `&`, all must hold.
/// Parsed once against a table's columns, evaluated in memory on each change,
/// never turned into SQL (a snapshot's SELECT gets only `snapshotPrefilter()`: integer and
/// uuid literals the server prints itself).
///
/// Grammar (bytes of the filter string):
/// ```
/// filter    = "" | condition *( "&" condition )
/// condition = column "=" op "." value
/// op        = eq | neq | lt | lte | gt | gte | in | is
/// value     = quoted | raw            for eq…gte: raw is everything up to the next '&'
///           | "(" [ item *( "," item ) ] ")"     for in (at least one item)
///           | "null" | "notnull"      for is
/// item      = quoted | raw            raw: up to ',' or ')', surrounding spaces trimmed
/// quoted    = '"' chars '"'           inside, \" is a quote and \\ a backslash
/// ```
/// A value that starts with `"` is quoted: that is how a value holds `&`, and
/// how an `in` item holds `,` `)` or surrounding spaces. Column names are matched
/// exactly (case-sensitive; quoted SQL identifiers are not supported). `in` never
/// matches NULL: use `is.null`. At most 64 conditions, and 1,000 items in a list.
///
/// Comparison by column type: int2/int4/int8/oid/float4/float8/numeric as exact
/// decimal numbers (`1.50` equals `1.5`; NaN above Infinity, as in Postgres),
/// bool (`true/false/t/f/yes/no/on/off/1/0`, false < true), uuid case-insensitively,
/// everything else as its Postgres text form in byte order (C collation).
///
/// Evaluation is three-valued (`FilterTruth`). The row is the new row for
/// INSERT and UPDATE and the old row for DELETE; TRUNCATE has no row. A column
/// the row does not carry (a non-key column of a key-only old row, an unchanged
/// TOAST value, a binary-format value, a column dropped or retyped since the
/// filter was compiled) makes its condition `unknown`, and only `true` matches:
/// the filter fails closed. (The server ends a subscription whose filter a schema change
/// broke for good: `brokenColumn(in:)`.) SQL NULL is a value: `is.null` holds, every other
/// operator is false.
public struct Filter: Sendable, Hashable, CustomStringConvertible {
    /// The conditions, all of which must hold; empty matches every row.
    public let conditions: [FilterCondition]

    /// The filter that matches every row (no conditions).
    public static let all = Filter(conditions: [])

    init(conditions: [FilterCondition]) { self.conditions = conditions }

    /// Whether the filter has no conditions.
    public var isEmpty: Bool { conditions.isEmpty }

    /// The conditions joined by `&`.
    public var description: String { conditions.map(\.description).joined(separator: "&") }

    /// Parses `text` against a table's columns. Throws `invalid_filter` naming the bad part
    /// (e.g. `unknown column 'stauts'`).
    public init(parsing text: String, columns: [RelationColumn]) throws(ProtocolError) {
        var parser = FilterParser(text: text, columns: columns)
        self.conditions = try parser.parse()
    }

    /// Checks only the grammar of `text` (no table at hand: every column name is accepted and
    /// values are taken as text). Used where a filter arrives before its table is known, e.g. an
    /// auth token's `rt` claim at the upgrade; `init(parsing:columns:)` still checks columns and
    /// value types at subscribe time. Throws `invalid_filter` naming the bad part.
    public static func checkSyntax(_ text: String) throws(ProtocolError) {
        var parser = FilterParser(text: text, columns: [], acceptsAnyColumn: true)
        _ = try parser.parse()
    }

    /// Both filters (this one's conditions first); both must be compiled for the same table.
    /// Used to AND an auth token's mandatory filter with the client's.
    public func and(_ other: Filter) -> Filter {
        Filter(conditions: conditions + other.conditions)
    }

    /// Three-valued evaluation against the event's row (see the type's documentation).
    public func evaluate(_ event: ChangeEvent) -> FilterTruth {
        var result = FilterTruth.true
        for condition in conditions {
            switch condition.evaluate(event) {
            case .false: return .false
            case .unknown: result = .unknown
            case .true: break
            }
        }
        return result
    }

    /// Whether the event's row passes: `evaluate(event) == .true` (unknown fails closed).
    public func matches(_ event: ChangeEvent) -> Bool { evaluate(event) == .true }

    /// For a snapshot's SELECT: the `eq` and `in` conditions on int2/int4/int8 and uuid
    /// columns, each as its column and SQL literals this function printed itself (integers,
    /// and uuids in their canonical form, checked): `column IN (literals)` for each, ANDed,
    /// holds for every row the filter can accept, so Postgres can read only those (through
    /// an index on a tenant column, say) instead of the whole table. The filter still judges
    /// every row read. No client text reaches SQL; other conditions are left out, and so is
    /// a condition whose column `columns` (the snapshot's, read later than the filter was
    /// compiled) lacks or has with another type: a schema change meanwhile must not turn
    /// into an SQL error (the join then ends the subscription as for any schema change).
    func snapshotPrefilter(columns: [RelationColumn]) -> [(column: String, literals: [String])] {
        var result: [(column: String, literals: [String])] = []
        for condition in conditions where condition.operator == .eq || condition.operator == .in {
            guard columns.contains(where: { $0.name.utf8.elementsEqual(condition.column.utf8) && $0.typeOID == condition.typeOID }) else { continue }
            var literals: [String] = []
            switch condition.typeOID {
            case PostgresTypeOID.int2, PostgresTypeOID.int4, PostgresTypeOID.int8:
                for operand in condition.operands {
                    // A value that is no integer (4.5) never equals an integer column's: dropped.
                    if case .number(_, let int?) = operand { literals.append(String(int)) }
                }
            case PostgresTypeOID.uuid:
                for operand in condition.operands {
                    guard case .text(let bytes) = operand else { continue }
                    // Operands are lower-cased; one not in the canonical form matches no row's text.
                    if Self.isCanonicalUUID(bytes) { literals.append("'" + String(decoding: bytes, as: UTF8.self) + "'::uuid") }
                }
            default:
                continue
            }
            // An empty list: no row can match (the filter would accept none).
            result.append((condition.column, literals.isEmpty ? ["NULL"] : literals))
        }
        return result
    }

    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower-case hex.
    static func isCanonicalUUID(_ bytes: [UInt8]) -> Bool {
        guard bytes.count == 36 else { return false }
        for (position, byte) in bytes.enumerated() {
            if position == 8 || position == 13 || position == 18 || position == 23 {
                guard byte == UInt8(ascii: "-") else { return false }
            } else {
                guard (byte >= 48 && byte <= 57) || (byte >= 97 && byte <= 102) else { return false }
            }
        }
        return true
    }

    /// For an auth token's mandatory filter: whether an UPDATE's full old row (`REPLICA
    /// IDENTITY FULL`) must be withheld (`old: null`) from the client this filter binds,
    /// because the row as it was does not pass (a row moved into the client's view from
    /// another tenant's: its old values are that tenant's). Unknown fails closed, as everywhere.
    ///
    /// A key (the default replica identity, or an index's) is withheld when it shows the row
    /// was not the client's: the filter is false on it (a key of `(tenant_id, id)` that moved
    /// from tenant 43). A key that lacks the filter's columns shows nothing of another
    /// tenant's row, and is kept.
    public func hidesOldRow(of event: ChangeEvent) -> Bool {
        guard !conditions.isEmpty, event.operation == .update, let kind = event.oldKind, let old = event.old else { return false }
        // The old row judged as a DELETE's is: the same cells, read from `old`.
        let before = ChangeEvent(operation: .delete, relation: event.relation, new: nil, old: old, oldKind: kind,
                                 xid: event.xid, commitLSN: event.commitLSN, commitTime: event.commitTime, index: event.index)
        let truth = evaluate(before)
        return kind == .full ? truth != .true : truth == .false
    }

    /// The first column a condition names that `relation` no longer has, or has with a type
    /// its operands do not compare with (dropped, renamed or retyped by a schema change): the
    /// filter could then never be true again. Nil when every column is there.
    public func brokenColumn(in relation: Relation) -> String? {
        for condition in conditions {
            guard let index = relation.columnIndex(named: condition.column),
                  condition.compares(with: relation.columns[index]) else { return condition.column }
        }
        return nil
    }

    /// The first condition that equality-indexing can use (`eq`, or `in` with at most
    /// `maxIndexedValues` items): its column and the keys it is indexed under.
    func indexableEquality(maxIndexedValues: Int = 64) -> (condition: FilterCondition, keys: [FilterIndexKey])? {
        for condition in conditions {
            switch condition.operator {
            case .eq:
                return (condition, [FilterIndexKey(condition.operands[0])])
            case .in where condition.operands.count <= maxIndexedValues:
                var keys: [FilterIndexKey] = []
                for operand in condition.operands {
                    let key = FilterIndexKey(operand)
                    if !keys.contains(key) { keys.append(key) }
                }
                return (condition, keys)
            default:
                continue
            }
        }
        return nil
    }
}

/// A row value as a filter sees it.
enum FilterCell {
    /// The row does not carry the value.
    case missing
    case null
    case text(ArraySlice<UInt8>)
}

extension FilterCondition {
    /// Whether this condition's operands compare with `column`'s values: its type, or one of
    /// the same comparison class (a column retyped since the filter was compiled may not be).
    @inline(__always)
    func compares(with column: RelationColumn) -> Bool {
        column.typeOID == typeOID || ColumnClass(typeOID: column.typeOID) == columnClass
    }

    /// The event's value of this condition's column (see `Filter` for which row).
    @inline(__always)
    func cell(in event: ChangeEvent) -> FilterCell {
        let relation = event.relation
        var index = columnIndex
        if index >= relation.columns.count || relation.columns[index].name != column {
            guard let found = relation.columnIndex(named: column) else { return .missing }
            index = found
        }
        guard compares(with: relation.columns[index]) else { return .missing }
        switch event.operation {
        case .insert, .update:
            guard let new = event.new, index < new.count else { return .missing }
            switch new[index] {
            case .null: return .null
            case .text(let bytes): return .text(bytes)
            case .binary: return .missing
            case .unchanged:
                // Unchanged TOAST: the value equals the old one, if a full old row carries it.
                guard event.oldKind == .full, let old = event.old, index < old.count else { return .missing }
                switch old[index] {
                case .null: return .null
                case .text(let bytes): return .text(bytes)
                case .binary, .unchanged: return .missing
                }
            }
        case .delete:
            guard let old = event.old, index < old.count else { return .missing }
            if event.oldKind == .key && !relation.columns[index].isKey { return .missing }
            switch old[index] {
            case .null: return .null
            case .text(let bytes): return .text(bytes)
            case .binary, .unchanged: return .missing
            }
        case .truncate:
            return .missing
        }
    }

    /// Three-valued evaluation of this condition against the event's row.
    func evaluate(_ event: ChangeEvent) -> FilterTruth {
        switch cell(in: event) {
        case .missing:
            return .unknown
        case .null:
            if self.operator == .is { return isNull ? .true : .false }
            return .false
        case .text(let bytes):
            if self.operator == .is { return isNull ? .false : .true }
            return evaluate(text: bytes)
        }
    }

    /// Compares a non-null row value.
    func evaluate(text bytes: ArraySlice<UInt8>) -> FilterTruth {
        switch self.operator {
        case .in:
            if let inKeys {
                guard let key = FilterIndexKey(rowText: bytes, columnClass: columnClass) else { return .unknown }
                return inKeys.contains(key) ? .true : .false
            }
            for operand in operands {
                guard let order = compare(bytes, operand) else { return .unknown }
                if order == 0 { return .true }
            }
            return .false
        case .is:
            return .true
        default:
            guard let order = compare(bytes, operands[0]) else { return .unknown }
            let holds: Bool
            switch self.operator {
            case .eq: holds = order == 0
            case .neq: holds = order != 0
            case .lt: holds = order < 0
            case .lte: holds = order <= 0
            case .gt: holds = order > 0
            case .gte: holds = order >= 0
            case .in, .is: holds = false
            }
            return holds ? .true : .false
        }
    }

    /// Row value compared with an operand: -1, 0, 1, or nil when the row text does not parse as the type.
    @inline(__always)
    private func compare(_ bytes: ArraySlice<UInt8>, _ operand: FilterOperand) -> Int? {
        switch operand {
        case .number(let number, let int):
            if columnClass == .integer, let int, let value = parseInt64(bytes) {
                return value < int ? -1 : (value == int ? 0 : 1)
            }
            guard let value = DecimalNumber(text: bytes) else { return nil }
            return value < number ? -1 : (value == number ? 0 : 1)
        case .bool(let expected):
            guard let value = parseRowBool(bytes) else { return nil }
            return value == expected ? 0 : (value ? 1 : -1)
        case .text(let expected):
            let bytes = columnClass == .paddedText ? withoutTrailingBlanks(bytes) : bytes
            if bytes.elementsEqual(expected) { return 0 }
            return bytes.lexicographicallyPrecedes(expected) ? -1 : 1
        }
    }
}

/// `bytes` without its trailing blanks (how `bpchar` values compare).
@inline(__always)
func withoutTrailingBlanks<Bytes: BidirectionalCollection>(_ bytes: Bytes) -> Bytes.SubSequence where Bytes.Element == UInt8 {
    var end = bytes.endIndex
    while end > bytes.startIndex {
        let before = bytes.index(before: end)
        guard bytes[before] == UInt8(ascii: " ") else { break }
        end = before
    }
    return bytes[..<end]
}

/// Postgres's text output of bool (`t`/`f`).
@inline(__always)
func parseRowBool(_ bytes: ArraySlice<UInt8>) -> Bool? {
    guard bytes.count == 1 else { return nil }
    switch bytes.first {
    case UInt8(ascii: "t"): return true
    case UInt8(ascii: "f"): return false
    default: return nil
    }
}

extension DecimalNumber {
    /// The value as an Int64 when it is an integer that fits.
    var exactInt64: Int64? {
        guard kind == .finite else { return nil }
        if digits.isEmpty { return 0 }
        guard exponent >= digits.count, exponent <= 19 else { return nil }
        var value: Int64 = 0
        for position in 0..<exponent {
            let digit = position < digits.count ? Int64(digits[position]) : 0
            let (times10, overflow1) = value.multipliedReportingOverflow(by: 10)
            let (next, overflow2) = negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
            guard !overflow1, !overflow2 else { return nil }
            value = next
        }
        return value
    }
}

/// Parses filter text into conditions (see `Filter` for the grammar).
struct FilterParser {
    private let text: String
    private let bytes: [UInt8]
    private let columns: [RelationColumn]
    /// Grammar only: a column name not in `columns` is taken as a text column (`Filter.checkSyntax`).
    private let acceptsAnyColumn: Bool
    private var position = 0

    init(text: String, columns: [RelationColumn], acceptsAnyColumn: Bool = false) {
        self.text = text
        self.bytes = Array(text.utf8)
        self.columns = columns
        self.acceptsAnyColumn = acceptsAnyColumn
    }

    private static let operatorList = "eq, neq, lt, lte, gt, gte, in, is"
    /// Most conditions in one filter (bounds the work per change).
    static let maxConditions = 64
    /// Most items in one `in` list.
    static let maxListItems = 1_000
    /// Most operands in one filter, all conditions together: 64 lists of 1,000 empty items fit
    /// in one 64 KiB message and would have held ~4 MB per subscription, 100 per client.
    static let maxOperands = 1_000

    private func string(_ range: Range<Int>) -> String { String(decoding: bytes[range], as: UTF8.self) }

    private func invalid(_ message: String) -> ProtocolError { ProtocolError(.invalidFilter, message) }

    mutating func parse() throws(ProtocolError) -> [FilterCondition] {
        var conditions: [FilterCondition] = []
        var operandCount = 0
        if bytes.isEmpty { return conditions }
        while true {
            guard conditions.count < Self.maxConditions else {
                throw invalid("filter has more than \(Self.maxConditions) conditions")
            }
            conditions.append(try parseCondition())
            operandCount += conditions[conditions.count - 1].operands.count
            guard operandCount <= Self.maxOperands else {
                throw invalid("filter has more than \(Self.maxOperands) values in all its conditions together")
            }
            if position == bytes.count { return conditions }
            // parseCondition stops at '&'.
            position += 1
            if position == bytes.count { throw invalid("filter \(quoteForMessage(text)) ends with '&'") }
        }
    }

    /// The end of the current condition when it holds no quoted part: the next '&' or the end.
    private func rawEnd(from start: Int) -> Int {
        var end = start
        while end < bytes.count, bytes[end] != UInt8(ascii: "&") { end += 1 }
        return end
    }

    private mutating func parseCondition() throws(ProtocolError) -> FilterCondition {
        let start = position
        let roughEnd = rawEnd(from: start)
        let shown = string(start..<roughEnd)
        if roughEnd == start { throw invalid("empty condition in filter \(quoteForMessage(text)) (conditions are joined by a single '&')") }
        // column
        var cursor = start
        while cursor < roughEnd, bytes[cursor] != UInt8(ascii: "=") { cursor += 1 }
        guard cursor < roughEnd else {
            throw invalid("condition \(quoteForMessage(shown)) must be column=op.value")
        }
        guard cursor > start else { throw invalid("condition \(quoteForMessage(shown)) has no column name") }
        let columnName = string(start..<cursor)
        let columnIndex: Int
        let column: RelationColumn
        if let found = columns.firstIndex(where: { $0.name == columnName }) {
            columnIndex = found
            column = columns[found]
        } else if acceptsAnyColumn {
            columnIndex = -1
            column = RelationColumn(name: columnName, typeOID: PostgresTypeOID.text)
        } else {
            throw invalid("unknown column \(quoteForMessage(columnName))")
        }
        // operator
        cursor += 1
        let operatorStart = cursor
        while cursor < roughEnd, bytes[cursor] != UInt8(ascii: ".") { cursor += 1 }
        let operatorName = string(operatorStart..<cursor)
        guard let op = FilterOperator(rawValue: operatorName) else {
            if cursor == roughEnd && operatorName.isEmpty {
                throw invalid("condition \(quoteForMessage(shown)) has no operator (expected one of \(Self.operatorList))")
            }
            throw invalid("unknown operator \(quoteForMessage(operatorName)) in \(quoteForMessage(shown)) (expected one of \(Self.operatorList))")
        }
        guard cursor < roughEnd else {
            throw invalid("condition \(quoteForMessage(shown)) needs '.' and a value after '\(operatorName)'")
        }
        cursor += 1
        position = cursor
        let columnClass = ColumnClass(typeOID: column.typeOID)
        var operands: [FilterOperand] = []
        var isNull = false
        switch op {
        case .is:
            let word = string(position..<roughEnd)
            switch word {
            case "null": isNull = true
            case "notnull": isNull = false
            default: throw invalid("'is' takes null or notnull, got \(quoteForMessage(word)) in \(quoteForMessage(shown))")
            }
            position = roughEnd
        case .in:
            guard position < bytes.count, bytes[position] == UInt8(ascii: "(") else {
                throw invalid("'in' takes a list in parentheses, e.g. \(columnName)=in.(a,b), in \(quoteForMessage(shown))")
            }
            position += 1
            var items: [[UInt8]] = []
            if position < bytes.count, bytes[position] == UInt8(ascii: ")") {
                throw invalid("empty list in \(quoteForMessage(shown))")
            }
            while true {
                var cursor = position
                while cursor < bytes.count, bytes[cursor] == UInt8(ascii: " ") { cursor += 1 }
                if cursor < bytes.count, bytes[cursor] == UInt8(ascii: "\"") {
                    position = cursor
                    items.append(try parseQuoted(shown: shown))
                    while position < bytes.count, bytes[position] == UInt8(ascii: " ") { position += 1 }
                } else {
                    let itemStart = position
                    while position < bytes.count, bytes[position] != UInt8(ascii: ","), bytes[position] != UInt8(ascii: ")"),
                          bytes[position] != UInt8(ascii: "&"), bytes[position] != UInt8(ascii: "\"") {
                        position += 1
                    }
                    var lower = itemStart
                    var upper = position
                    while lower < upper, bytes[lower] == UInt8(ascii: " ") { lower += 1 }
                    while upper > lower, bytes[upper - 1] == UInt8(ascii: " ") { upper -= 1 }
                    items.append(Array(bytes[lower..<upper]))
                }
                guard items.count <= Self.maxListItems else {
                    throw invalid("the list in \(quoteForMessage(shown)) has more than \(Self.maxListItems) items")
                }
                guard position < bytes.count else { throw invalid("unclosed list in \(quoteForMessage(shown)): missing ')'") }
                if bytes[position] == UInt8(ascii: ",") { position += 1; continue }
                if bytes[position] == UInt8(ascii: ")") { position += 1; break }
                throw invalid("unexpected \(quoteForMessage(String(decoding: [bytes[position]], as: UTF8.self))) in the list of \(quoteForMessage(shown)) (quote items that hold it)")
            }
            guard position == bytes.count || bytes[position] == UInt8(ascii: "&") else {
                throw invalid("unexpected text after ')' in \(quoteForMessage(shown))")
            }
            for item in items { operands.append(try operand(item, column: column, columnClass: columnClass, shown: shown)) }
        case .eq, .neq, .lt, .lte, .gt, .gte:
            let value: [UInt8]
            if position < bytes.count, bytes[position] == UInt8(ascii: "\"") {
                value = try parseQuoted(shown: shown)
                guard position == bytes.count || bytes[position] == UInt8(ascii: "&") else {
                    throw invalid("unexpected text after the quoted value in \(quoteForMessage(shown))")
                }
            } else {
                value = Array(bytes[position..<roughEnd])
                position = roughEnd
            }
            operands.append(try operand(value, column: column, columnClass: columnClass, shown: shown))
        }
        return FilterCondition(column: columnName, operator: op, description: string(start..<position), columnIndex: columnIndex,
                               typeOID: column.typeOID, columnClass: columnClass, operands: operands, isNull: isNull)
    }

    /// A `"…"` value at `position`; leaves `position` after the closing quote.
    private mutating func parseQuoted(shown: String) throws(ProtocolError) -> [UInt8] {
        position += 1
        var value: [UInt8] = []
        while position < bytes.count {
            let byte = bytes[position]
            if byte == UInt8(ascii: "\"") { position += 1; return value }
            if byte == UInt8(ascii: "\\"), position + 1 < bytes.count,
               bytes[position + 1] == UInt8(ascii: "\"") || bytes[position + 1] == UInt8(ascii: "\\") {
                value.append(bytes[position + 1])
                position += 2
                continue
            }
            value.append(byte)
            position += 1
        }
        throw invalid("unterminated quoted value in \(quoteForMessage(shown)): missing '\"'")
    }

    /// Converts a value for the column's type.
    private func operand(_ value: [UInt8], column: RelationColumn, columnClass: ColumnClass, shown: String) throws(ProtocolError) -> FilterOperand {
        let valueText = String(decoding: value, as: UTF8.self)
        switch columnClass {
        case .integer, .number:
            guard let number = DecimalNumber(text: value) else {
                throw invalid("\(quoteForMessage(valueText)) is not a number (column \(quoteForMessage(column.name)) is \(ColumnClass.typeName(column.typeOID))) in \(quoteForMessage(shown))")
            }
            return .number(number, int: number.exactInt64)
        case .bool:
            switch valueText.lowercased() {
            case "true", "t", "yes", "y", "on", "1": return .bool(true)
            case "false", "f", "no", "n", "off", "0": return .bool(false)
            default:
                throw invalid("\(quoteForMessage(valueText)) is not a boolean (column \(quoteForMessage(column.name)) is bool; use true or false) in \(quoteForMessage(shown))")
            }
        case .uuid:
            return .text(value.map { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") ? $0 | 0x20 : $0 })
        case .text:
            return .text(value)
        case .paddedText:
            return .text(Array(withoutTrailingBlanks(value)))
        }
    }
}
