import PoolKit

/// The table's `REPLICA IDENTITY` setting, as sent in a Relation message.
public enum ReplicaIdentity: UInt8, Sendable, Hashable {
    /// `d`: the primary key (old key sent for UPDATE when it changes, and for DELETE).
    case `default` = 0x64
    /// `n`: nothing; no old row is ever sent.
    case nothing = 0x6E
    /// `f`: the full old row is sent for UPDATE and DELETE.
    case full = 0x66
    /// `i`: the columns of a chosen unique index.
    case index = 0x69
}

/// A column of a replicated table, from a Relation message.
public struct RelationColumn: Sendable, Hashable {
    /// Column name.
    public var name: String
    /// The column's type OID (see `PostgresTypeOID`).
    public var typeOID: UInt32
    /// The column's `atttypmod` (-1 when none).
    public var typeModifier: Int32
    /// Whether the column is part of the replica identity key.
    public var isKey: Bool

    /// Creates a column description.
    public init(name: String, typeOID: UInt32, typeModifier: Int32 = -1, isKey: Bool = false) {
        self.name = name
        self.typeOID = typeOID
        self.typeModifier = typeModifier
        self.isKey = isKey
    }
}

/// Precomputed JSON fragments for a relation, built once per Relation message.
final class RelationJSONFragments: Sendable {
    /// `"schema.table"` with quotes.
    let table: [UInt8]
    /// `"name":` for each column.
    let keys: [[UInt8]]
    /// `"name"` for each column.
    let quotedNames: [[UInt8]]
    /// How each column's text is turned into JSON.
    let kinds: [JSONValueKind]

    init(qualifiedName: String, columns: [RelationColumn]) {
        var table: [UInt8] = []
        JSONWriter.writeString(qualifiedName, into: &table)
        self.table = table
        var keys: [[UInt8]] = []
        var names: [[UInt8]] = []
        for column in columns {
            var quoted: [UInt8] = []
            JSONWriter.writeString(column.name, into: &quoted)
            names.append(quoted)
            quoted.append(UInt8(ascii: ":"))
            keys.append(quoted)
        }
        self.keys = keys
        self.quotedNames = names
        self.kinds = columns.map { JSONValueKind(typeOID: $0.typeOID) }
    }
}

/// A replicated table as described by a Relation message; cached by OID in the decoder.
public struct Relation: Sendable, Hashable {
    /// The table's OID.
    public let oid: UInt32
    /// Schema name (Postgres sends an empty string for `pg_catalog`).
    public let namespace: String
    /// Table name.
    public let name: String
    /// The table's replica identity setting.
    public let replicaIdentity: ReplicaIdentity
    /// Columns in the order tuples carry them.
    public let columns: [RelationColumn]
    /// `schema.table` (`pg_catalog.table` when the namespace is empty).
    public let qualifiedName: String
    /// Positions of the replica identity key columns.
    public let keyColumnIndices: [Int]
    let json: RelationJSONFragments

    /// Creates a relation description.
    public init(oid: UInt32, namespace: String, name: String, replicaIdentity: ReplicaIdentity, columns: [RelationColumn]) {
        self.oid = oid
        self.namespace = namespace
        self.name = name
        self.replicaIdentity = replicaIdentity
        self.columns = columns
        self.qualifiedName = (namespace.isEmpty ? "pg_catalog" : namespace) + "." + name
        self.keyColumnIndices = columns.indices.filter { columns[$0].isKey }
        self.json = RelationJSONFragments(qualifiedName: qualifiedName, columns: columns)
    }

    /// The position of the column called `name`, if any.
    public func columnIndex(named name: String) -> Int? { columns.firstIndex { $0.name == name } }

    /// Compares every field sent by Postgres.
    public static func == (lhs: Relation, rhs: Relation) -> Bool {
        lhs.oid == rhs.oid && lhs.namespace == rhs.namespace && lhs.name == rhs.name
            && lhs.replicaIdentity == rhs.replicaIdentity && lhs.columns == rhs.columns
    }

    /// Hashes the OID and name.
    public func hash(into hasher: inout Hasher) {
        hasher.combine(oid)
        hasher.combine(qualifiedName)
    }
}

/// One column value of a TupleData, as sent by pgoutput.
public enum TupleValue: Sendable, Hashable {
    /// `n`: SQL NULL.
    case null
    /// `u`: an unchanged TOASTed value that Postgres did not send.
    case unchanged
    /// `t`: the value in Postgres text format (UTF-8 bytes).
    case text(ArraySlice<UInt8>)
    /// `b`: the value in binary format (only with the `binary` option).
    case binary(ArraySlice<UInt8>)
}

/// The columns of one row in a pgoutput message, stored without copying the
/// message: each value is a range into the message's bytes.
public struct TupleData: Sendable, RandomAccessCollection {
    @usableFromInline
    struct Cell: Sendable {
        /// 0 null, 1 unchanged, 2 text, 3 binary.
        @usableFromInline var kind: UInt8
        @usableFromInline var start: Int32
        @usableFromInline var length: Int32
    }

    @usableFromInline let storage: [UInt8]
    @usableFromInline let cells: [Cell]

    @usableFromInline
    init(storage: [UInt8], cells: [Cell]) {
        self.storage = storage
        self.cells = cells
    }

    /// Whether both tuples' values live in one buffer (the decoded message of an UPDATE).
    func sharesStorage(with other: TupleData) -> Bool {
        guard !storage.isEmpty else { return false }
        return storage.withUnsafeBufferPointer { mine in
            other.storage.withUnsafeBufferPointer { $0.baseAddress == mine.baseAddress && $0.count == mine.count }
        }
    }

    /// Builds a tuple from values (tests, fakes); the decoder does not copy like this.
    public init(_ values: [TupleValue]) {
        var storage: [UInt8] = []
        var cells: [Cell] = []
        for value in values {
            switch value {
            case .null: cells.append(Cell(kind: 0, start: 0, length: 0))
            case .unchanged: cells.append(Cell(kind: 1, start: 0, length: 0))
            case .text(let bytes), .binary(let bytes):
                let kind: UInt8
                if case .text = value { kind = 2 } else { kind = 3 }
                cells.append(Cell(kind: kind, start: Int32(storage.count), length: Int32(bytes.count)))
                storage.append(contentsOf: bytes)
            }
        }
        self.init(storage: storage, cells: cells)
    }

    /// First column position (0).
    public var startIndex: Int { 0 }
    /// Number of columns.
    public var endIndex: Int { cells.count }

    /// The value of column `position`.
    @inlinable
    public subscript(position: Int) -> TupleValue {
        let cell = cells[position]
        switch cell.kind {
        case 0: return .null
        case 1: return .unchanged
        case 2: return .text(storage[Int(cell.start)..<Int(cell.start) + Int(cell.length)])
        default: return .binary(storage[Int(cell.start)..<Int(cell.start) + Int(cell.length)])
        }
    }

    /// The text of column `position`, or nil when it is null, unchanged or binary.
    public func text(at position: Int) -> String? {
        guard case .text(let bytes) = self[position] else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Whether column `position` is an unchanged TOAST value.
    public func isUnchanged(at position: Int) -> Bool { cells[position].kind == 1 }
}

/// Whether an old row carries only the replica identity key or the whole row.
public enum OldRowKind: Sendable, Hashable {
    /// `K`: only key columns are meaningful (others are sent as null).
    case key
    /// `O`: the full old row (`REPLICA IDENTITY FULL`).
    case full
}

/// An old row sent with an Update or Delete message.
public struct OldRow: Sendable {
    /// Key only or full row.
    public var kind: OldRowKind
    /// The values.
    public var tuple: TupleData

    /// Creates an old row.
    public init(kind: OldRowKind, tuple: TupleData) {
        self.kind = kind
        self.tuple = tuple
    }
}

/// `TRUNCATE` options sent in a Truncate message.
public struct TruncateOptions: OptionSet, Sendable, Hashable {
    /// Raw option bits.
    public var rawValue: UInt8
    /// Creates options from raw bits.
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// `CASCADE`.
    public static let cascade = TruncateOptions(rawValue: 1)
    /// `RESTART IDENTITY`.
    public static let restartIdentity = TruncateOptions(rawValue: 2)
}

/// One decoded pgoutput (protocol version 1) message.
public enum PgOutputMessage: Sendable {
    /// `B`: a transaction starts.
    case begin(Begin)
    /// `C`: the transaction commits.
    case commit(Commit)
    /// `O`: the transaction came from another origin.
    case origin(Origin)
    /// `R`: a table's description (also stored in the decoder's cache).
    case relation(Relation)
    /// `Y`: a non-built-in type's name.
    case type(TypeDescription)
    /// `I`: a row was inserted.
    case insert(Insert)
    /// `U`: a row was updated.
    case update(Update)
    /// `D`: a row was deleted.
    case delete(Delete)
    /// `T`: tables were truncated.
    case truncate(Truncate)
    /// `M`: a logical decoding message from `pg_logical_emit_message`.
    case message(LogicalMessage)

    /// A Begin message.
    public struct Begin: Sendable, Hashable {
        /// The final LSN of the transaction: the LSN of its commit record.
        public var finalLSN: LSN
        /// Commit time.
        public var commitTime: PostgresTimestamp
        /// Transaction id.
        public var xid: UInt32
        /// Creates a Begin message.
        public init(finalLSN: LSN, commitTime: PostgresTimestamp, xid: UInt32) {
            self.finalLSN = finalLSN
            self.commitTime = commitTime
            self.xid = xid
        }
    }

    /// A Commit message.
    public struct Commit: Sendable, Hashable {
        /// Flags (currently unused, 0).
        public var flags: UInt8
        /// The LSN of the commit record (equals `Begin.finalLSN`).
        public var commitLSN: LSN
        /// The end LSN of the transaction: where the next one may start.
        public var endLSN: LSN
        /// Commit time.
        public var commitTime: PostgresTimestamp
        /// Creates a Commit message.
        public init(flags: UInt8 = 0, commitLSN: LSN, endLSN: LSN, commitTime: PostgresTimestamp) {
            self.flags = flags
            self.commitLSN = commitLSN
            self.endLSN = endLSN
            self.commitTime = commitTime
        }
    }

    /// An Origin message.
    public struct Origin: Sendable, Hashable {
        /// The commit LSN on the origin server.
        public var commitLSN: LSN
        /// The origin's name.
        public var name: String
        /// Creates an Origin message.
        public init(commitLSN: LSN, name: String) {
            self.commitLSN = commitLSN
            self.name = name
        }
    }

    /// An Insert message.
    public struct Insert: Sendable {
        /// The table (from the relation cache).
        public var relation: Relation
        /// The new row.
        public var new: TupleData
    }

    /// An Update message.
    public struct Update: Sendable {
        /// The table (from the relation cache).
        public var relation: Relation
        /// The old key (`K`) or full old row (`O`), or nil when Postgres sent neither.
        public var old: OldRow?
        /// The new row; unchanged TOAST columns are `.unchanged`.
        public var new: TupleData
    }

    /// A Delete message.
    public struct Delete: Sendable {
        /// The table (from the relation cache).
        public var relation: Relation
        /// The old key (`K`) or full old row (`O`).
        public var old: OldRow
    }

    /// A Truncate message.
    public struct Truncate: Sendable {
        /// The truncated tables, in message order.
        public var relations: [Relation]
        /// CASCADE / RESTART IDENTITY.
        public var options: TruncateOptions
    }
}

/// A Type message: the name of a non-built-in type used by a replicated column.
public struct TypeDescription: Sendable, Hashable {
    /// The type's OID.
    public var oid: UInt32
    /// Schema name (empty for `pg_catalog`).
    public var namespace: String
    /// Type name.
    public var name: String
    /// Creates a type description.
    public init(oid: UInt32, namespace: String, name: String) {
        self.oid = oid
        self.namespace = namespace
        self.name = name
    }
}

/// A logical decoding message written with `pg_logical_emit_message`.
public struct LogicalMessage: Sendable, Hashable {
    /// Whether it was emitted as part of a transaction.
    public var isTransactional: Bool
    /// The LSN of the message.
    public var lsn: LSN
    /// The prefix given by the writer.
    public var prefix: String
    /// The content bytes.
    public var content: [UInt8]
    /// Creates a logical message.
    public init(isTransactional: Bool, lsn: LSN, prefix: String, content: [UInt8]) {
        self.isTransactional = isTransactional
        self.lsn = lsn
        self.prefix = prefix
        self.content = content
    }
}
