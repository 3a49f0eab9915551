/// Builds pgoutput (protocol version 1) messages byte for byte, as Postgres
/// writes them: for tests, benchmarks and fake replication sources.
public enum PgOutputMessageBuilder {
    /// A Begin message.
    public static func begin(finalLSN: LSN, commitTime: PostgresTimestamp, xid: UInt32) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "B")]
        put(finalLSN.rawValue, &bytes)
        put(UInt64(bitPattern: commitTime.microsecondsSince2000), &bytes)
        put(xid, &bytes)
        return bytes
    }

    /// A Commit message.
    public static func commit(commitLSN: LSN, endLSN: LSN, commitTime: PostgresTimestamp, flags: UInt8 = 0) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "C"), flags]
        put(commitLSN.rawValue, &bytes)
        put(endLSN.rawValue, &bytes)
        put(UInt64(bitPattern: commitTime.microsecondsSince2000), &bytes)
        return bytes
    }

    /// An Origin message.
    public static func origin(commitLSN: LSN, name: String) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "O")]
        put(commitLSN.rawValue, &bytes)
        putString(name, &bytes)
        return bytes
    }

    /// A Relation message.
    public static func relation(_ relation: Relation) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "R")]
        put(relation.oid, &bytes)
        putString(relation.namespace, &bytes)
        putString(relation.name, &bytes)
        bytes.append(relation.replicaIdentity.rawValue)
        put(UInt16(relation.columns.count), &bytes)
        for column in relation.columns {
            bytes.append(column.isKey ? 1 : 0)
            putString(column.name, &bytes)
            put(column.typeOID, &bytes)
            put(UInt32(bitPattern: column.typeModifier), &bytes)
        }
        return bytes
    }

    /// A Type message.
    public static func type(_ type: TypeDescription) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "Y")]
        put(type.oid, &bytes)
        putString(type.namespace, &bytes)
        putString(type.name, &bytes)
        return bytes
    }

    /// An Insert message.
    public static func insert(relationOID: UInt32, new: [TupleValue]) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "I")]
        put(relationOID, &bytes)
        bytes.append(UInt8(ascii: "N"))
        putTuple(new, &bytes)
        return bytes
    }

    /// An Update message with an optional old key (`.key`) or old row (`.full`).
    public static func update(relationOID: UInt32, old: (kind: OldRowKind, values: [TupleValue])? = nil, new: [TupleValue]) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "U")]
        put(relationOID, &bytes)
        if let old {
            bytes.append(old.kind == .key ? UInt8(ascii: "K") : UInt8(ascii: "O"))
            putTuple(old.values, &bytes)
        }
        bytes.append(UInt8(ascii: "N"))
        putTuple(new, &bytes)
        return bytes
    }

    /// A Delete message.
    public static func delete(relationOID: UInt32, oldKind: OldRowKind, old: [TupleValue]) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "D")]
        put(relationOID, &bytes)
        bytes.append(oldKind == .key ? UInt8(ascii: "K") : UInt8(ascii: "O"))
        putTuple(old, &bytes)
        return bytes
    }

    /// A Truncate message.
    public static func truncate(relationOIDs: [UInt32], options: TruncateOptions = []) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "T")]
        put(UInt32(relationOIDs.count), &bytes)
        bytes.append(options.rawValue)
        for oid in relationOIDs { put(oid, &bytes) }
        return bytes
    }

    /// A logical decoding Message.
    public static func message(transactional: Bool, lsn: LSN, prefix: String, content: [UInt8]) -> [UInt8] {
        var bytes: [UInt8] = [UInt8(ascii: "M"), transactional ? 1 : 0]
        put(lsn.rawValue, &bytes)
        putString(prefix, &bytes)
        put(UInt32(content.count), &bytes)
        bytes.append(contentsOf: content)
        return bytes
    }

    /// A text value (`t`).
    public static func text(_ string: String) -> TupleValue { .text(ArraySlice(string.utf8)) }

    private static func put<T: FixedWidthInteger>(_ value: T, _ bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
    }

    private static func putString(_ string: String, _ bytes: inout [UInt8]) {
        bytes.append(contentsOf: string.utf8)
        bytes.append(0)
    }

    private static func putTuple(_ values: [TupleValue], _ bytes: inout [UInt8]) {
        put(UInt16(values.count), &bytes)
        for value in values {
            switch value {
            case .null: bytes.append(UInt8(ascii: "n"))
            case .unchanged: bytes.append(UInt8(ascii: "u"))
            case .text(let data), .binary(let data):
                if case .text = value { bytes.append(UInt8(ascii: "t")) } else { bytes.append(UInt8(ascii: "b")) }
                put(UInt32(data.count), &bytes)
                bytes.append(contentsOf: data)
            }
        }
    }
}
