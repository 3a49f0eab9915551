import PoolKit
import RealtimeSync

/// public.items: one column of each comparison class the filters know.
let itemsColumns: [RelationColumn] = [
    RelationColumn(name: "id", typeOID: PostgresTypeOID.int8, isKey: true),
    RelationColumn(name: "status", typeOID: PostgresTypeOID.text),
    RelationColumn(name: "amount", typeOID: PostgresTypeOID.numeric),
    RelationColumn(name: "price", typeOID: PostgresTypeOID.float8),
    RelationColumn(name: "qty", typeOID: PostgresTypeOID.int4),
    RelationColumn(name: "paid", typeOID: PostgresTypeOID.bool),
    RelationColumn(name: "uid", typeOID: PostgresTypeOID.uuid),
    RelationColumn(name: "tenant_id", typeOID: PostgresTypeOID.int4),
    RelationColumn(name: "created", typeOID: PostgresTypeOID.timestamptz),
]

let itemsRelation = Relation(oid: 16_500, namespace: "public", name: "items", replicaIdentity: .default, columns: itemsColumns)

/// A tuple of `relation` from named text values; columns not named are NULL, `.unchanged` via `unchanged`.
func tuple(_ values: [String: String?], relation: Relation = itemsRelation, unchanged: Set<String> = []) -> TupleData {
    TupleData(relation.columns.map { column -> TupleValue in
        if unchanged.contains(column.name) { return .unchanged }
        guard let value = values[column.name], let value else { return .null }
        return t(value)
    })
}

/// An INSERT of `values` into public.items (or `relation`).
func insertEvent(_ values: [String: String?], relation: Relation = itemsRelation, lsn: UInt64 = 0x1000, index: UInt32 = 0) -> ChangeEvent {
    ChangeEvent(operation: .insert, relation: relation, new: tuple(values, relation: relation), old: nil, oldKind: nil,
                xid: 900, commitLSN: LSN(lsn), commitTime: fixedTime, index: index)
}

/// An UPDATE to `new`; `old` as a key or full row when given.
func updateEvent(_ new: [String: String?], old: [String: String?]? = nil, oldKind: OldRowKind = .key, unchanged: Set<String> = [],
                 relation: Relation = itemsRelation) -> ChangeEvent {
    ChangeEvent(operation: .update, relation: relation, new: tuple(new, relation: relation, unchanged: unchanged),
                old: old.map { tuple($0, relation: relation) }, oldKind: old == nil ? nil : oldKind,
                xid: 900, commitLSN: LSN(0x1000), commitTime: fixedTime, index: 0)
}

/// A DELETE whose old row is the key (other columns sent as NULL, as pgoutput does) or the full row.
func deleteEvent(_ old: [String: String?], oldKind: OldRowKind = .key, relation: Relation = itemsRelation) -> ChangeEvent {
    var values = old
    if oldKind == .key {
        for column in relation.columns where !column.isKey { values[column.name] = nil }
    }
    return ChangeEvent(operation: .delete, relation: relation, new: nil, old: tuple(values, relation: relation), oldKind: oldKind,
                       xid: 900, commitLSN: LSN(0x1000), commitTime: fixedTime, index: 0)
}

/// A TRUNCATE of public.items.
func truncateEvent(relation: Relation = itemsRelation) -> ChangeEvent {
    ChangeEvent(operation: .truncate, relation: relation, new: nil, old: nil, oldKind: nil,
                xid: 900, commitLSN: LSN(0x1000), commitTime: fixedTime, index: 0)
}

/// Compiles a filter for public.items.
func itemsFilter(_ text: String) throws -> Filter { try Filter(parsing: text, columns: itemsColumns) }

/// The UTF-8 bytes of a string.
func utf8(_ text: String) -> [UInt8] { Array(text.utf8) }

/// The text of bytes.
func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }
