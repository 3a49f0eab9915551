/// The kind of row change.
public enum ChangeOperation: String, Sendable, Hashable, CaseIterable {
    /// A row was inserted.
    case insert = "INSERT"
    /// A row was updated.
    case update = "UPDATE"
    /// A row was deleted.
    case delete = "DELETE"
    /// The table was truncated.
    case truncate = "TRUNCATE"
}

/// One committed row change (or truncation of one table), in stream order.
///
/// `new` is nil for DELETE and TRUNCATE. `old` holds what the replica identity
/// provides: the full old row (`oldKind == .full`) or the key columns
/// (`oldKind == .key`, where only `relation.keyColumnIndices` are meaningful).
/// For an UPDATE that did not change the key, Postgres sends no old row; then
/// `old` is the new row read as a key (the key is unchanged), or nil when the
/// table has no key columns (replica identity nothing).
public struct ChangeEvent: Sendable {
    /// INSERT, UPDATE, DELETE or TRUNCATE.
    public let operation: ChangeOperation
    /// The table, as of this change.
    public let relation: Relation
    /// The new row (INSERT, UPDATE).
    public let new: TupleData?
    /// The old row or key (UPDATE, DELETE); see the type's documentation.
    public let old: TupleData?
    /// Whether `old` is a key or a full row.
    public let oldKind: OldRowKind?
    /// Transaction id.
    public let xid: UInt32
    /// The LSN of the transaction's commit record.
    public let commitLSN: LSN
    /// Commit time.
    public let commitTime: PostgresTimestamp
    /// 0-based position of this change in its transaction.
    public let index: UInt32
    /// TRUNCATE options (empty for other operations).
    public let truncateOptions: TruncateOptions

    /// Creates an event (the assembler builds these from decoded messages).
    public init(operation: ChangeOperation, relation: Relation, new: TupleData?, old: TupleData?, oldKind: OldRowKind?,
                xid: UInt32, commitLSN: LSN, commitTime: PostgresTimestamp, index: UInt32,
                truncateOptions: TruncateOptions = []) {
        self.operation = operation
        self.relation = relation
        self.new = new
        self.old = old
        self.oldKind = old == nil ? nil : oldKind
        self.xid = xid
        self.commitLSN = commitLSN
        self.commitTime = commitTime
        self.index = index
        self.truncateOptions = truncateOptions
    }

    /// `schema.table`.
    public var table: String { relation.qualifiedName }

    /// The stream position of this change.
    public var cursor: Cursor { Cursor(commitLSN: commitLSN, index: index) }

    /// Names of the columns whose value Postgres did not send (unchanged TOAST).
    public var unchangedColumns: [String] {
        guard let new else { return [] }
        return new.indices.filter { new.isUnchanged(at: $0) }.map { relation.columns[$0].name }
    }

    /// The new row's value of column `name`, or nil when there is no such column or no new row.
    public func newValue(_ name: String) -> TupleValue? {
        guard let new, let column = relation.columnIndex(named: name) else { return nil }
        return new[column]
    }

    /// The old row's value of column `name`; nil when the old row does not carry it
    /// (no old row, unknown column, or a non-key column of a key-only old row).
    public func oldValue(_ name: String) -> TupleValue? {
        guard let old, let column = relation.columnIndex(named: name) else { return nil }
        if oldKind == .key && !relation.columns[column].isKey { return nil }
        return old[column]
    }

    // MARK: JSON

    /// The event as one JSON object:
    /// `{"cursor":…,"op":…,"table":…,"xid":…,"commit_time":…,"new":…,"old":…,"unchanged":[…]}`.
    public func jsonBytes() -> [UInt8] {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(256)
        writeJSON(into: &buffer)
        return buffer
    }

    /// Appends the event as one JSON object (see `jsonBytes()`).
    public func writeJSON(into buffer: inout [UInt8]) {
        buffer.append(UInt8(ascii: "{"))
        writeJSONMembers(into: &buffer)
        buffer.append(UInt8(ascii: "}"))
    }

    /// Appends the object's members without braces, so a server can encode a change
    /// once and wrap it per client: `{"type":"change","ids":[…],` + members + `}`.
    ///
    /// Members, in order: `cursor`, `op`, `table`, `xid`, `commit_time` (UTC,
    /// microseconds), `new` (null for DELETE/TRUNCATE; unchanged TOAST columns left
    /// out), `old` (null when absent; only key columns for a key), `unchanged`
    /// (names of the columns left out of `new`, always present).
    ///
    /// `hidingOld` writes `old` as null (see `Filter.hidesOldRow`: under `REPLICA IDENTITY
    /// FULL` pgoutput marks every column as the key, so there is no key to cut the row to).
    public func writeJSONMembers(into buffer: inout [UInt8], hidingOld: Bool = false) {
        let json = relation.json
        buffer.append(contentsOf: #""cursor":""#.utf8)
        cursor.write(into: &buffer)
        buffer.append(contentsOf: #"","op":""#.utf8)
        switch operation {
        case .insert: buffer.append(contentsOf: "INSERT".utf8)
        case .update: buffer.append(contentsOf: "UPDATE".utf8)
        case .delete: buffer.append(contentsOf: "DELETE".utf8)
        case .truncate: buffer.append(contentsOf: "TRUNCATE".utf8)
        }
        buffer.append(contentsOf: #"","table":"#.utf8)
        buffer.append(contentsOf: json.table)
        buffer.append(contentsOf: #","xid":"#.utf8)
        Self.writeDecimal(UInt64(xid), into: &buffer)
        buffer.append(contentsOf: #","commit_time":""#.utf8)
        commitTime.writeISO8601(into: &buffer)
        buffer.append(contentsOf: #"","new":"#.utf8)
        var unchangedCount = 0
        if let new {
            unchangedCount = Self.writeRow(new, keysOnly: false, json: json, keyIndices: relation.keyColumnIndices, into: &buffer)
        } else {
            buffer.append(contentsOf: "null".utf8)
        }
        buffer.append(contentsOf: #","old":"#.utf8)
        if let old, !hidingOld {
            _ = Self.writeRow(old, keysOnly: oldKind == .key, json: json, keyIndices: relation.keyColumnIndices, into: &buffer)
        } else {
            buffer.append(contentsOf: "null".utf8)
        }
        buffer.append(contentsOf: #","unchanged":["#.utf8)
        if unchangedCount > 0, let new {
            var first = true
            for column in 0..<new.cells.count where new.cells[column].kind == 1 {
                if !first { buffer.append(UInt8(ascii: ",")) }
                first = false
                buffer.append(contentsOf: json.quotedNames[column])
            }
        }
        buffer.append(UInt8(ascii: "]"))
    }

    /// Writes a row object; returns how many unchanged columns were left out.
    private static func writeRow(_ tuple: TupleData, keysOnly: Bool, json: RelationJSONFragments, keyIndices: [Int],
                                 into buffer: inout [UInt8]) -> Int {
        buffer.append(UInt8(ascii: "{"))
        var first = true
        var unchanged = 0
        tuple.storage.withUnsafeBufferPointer { storage in
            @inline(__always) func column(_ position: Int) {
                let cell = tuple.cells[position]
                if cell.kind == 1 { unchanged += 1; return }
                if !first { buffer.append(UInt8(ascii: ",")) }
                first = false
                buffer.append(contentsOf: json.keys[position])
                switch cell.kind {
                case 0:
                    buffer.append(contentsOf: "null".utf8)
                case 2:
                    let text = UnsafeBufferPointer(rebasing: storage[Int(cell.start)..<Int(cell.start) + Int(cell.length)])
                    JSONWriter.writeValue(text: text, kind: json.kinds[position], into: &buffer)
                default:
                    JSONWriter.writeByteaHex(storage[Int(cell.start)..<Int(cell.start) + Int(cell.length)], into: &buffer)
                }
            }
            if keysOnly {
                for position in keyIndices where position < tuple.cells.count { column(position) }
            } else {
                for position in 0..<tuple.cells.count { column(position) }
            }
        }
        buffer.append(UInt8(ascii: "}"))
        return unchanged
    }

    static func writeDecimal(_ value: UInt64, into buffer: inout [UInt8]) {
        if value < 10 { buffer.append(UInt8(ascii: "0") + UInt8(value)); return }
        var digits: (UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0)  // 40 bytes, enough for 20 digits
        var count = 0
        var rest = value
        withUnsafeMutableBytes(of: &digits) { raw in
            while rest > 0 {
                raw[count] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
                count += 1
            }
            for position in stride(from: count - 1, through: 0, by: -1) { buffer.append(raw[position]) }
        }
    }
}

extension ChangeEvent {
    /// About how much memory the event holds: the bytes its rows' values live in (the decoded
    /// message, once when the new and old row share it, as an UPDATE's do) and their cell
    /// records, plus a fixed 128 bytes for the rest. What `ResumeWindow.Limits.maxBytes` and
    /// `ChangeStream.Configuration.maxTransactionBytes` count.
    public var approximateBytes: Int {
        var bytes = 128
        if let new { bytes += new.storage.count + new.cells.count * MemoryLayout<TupleData.Cell>.stride }
        if let old {
            bytes += old.cells.count * MemoryLayout<TupleData.Cell>.stride
            if new.map({ !$0.sharesStorage(with: old) }) ?? true { bytes += old.storage.count }
        }
        return bytes
    }
}
