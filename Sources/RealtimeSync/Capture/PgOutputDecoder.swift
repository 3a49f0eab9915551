/// Decodes pgoutput messages (logical replication protocol version 1, as in
/// PostgreSQL 15) from XLogData payloads, keeping the relation and type caches.
///
/// A value type with no I/O: feed it each XLogData payload (the bytes after the
/// `w` header) in stream order. Malformed input throws `PgOutputDecodingError`;
/// every read is bounds-checked.
public struct PgOutputDecoder: Sendable {
    /// Tables described so far, by OID; a new Relation message replaces the entry.
    public private(set) var relations: [UInt32: Relation] = [:]
    /// Non-built-in types described so far, by OID.
    public private(set) var types: [UInt32: TypeDescription] = [:]
    /// Non-built-in type OIDs resolved so far: a domain to its base type (through domains over
    /// domains), any other type to itself. A relation's columns carry the resolved OID, so
    /// that a domain over `int8` is written and filtered as an integer. Filled by
    /// `resolveTypes(_:relation:)` (the change stream asks the database for `unresolvedTypes(of:)`).
    public private(set) var baseTypes: [UInt32: UInt32] = [:]

    /// The lowest OID of a type that may be a domain: `FirstGenbkiObjectId`. Types below it
    /// are built in (never domains); from it on come types made by SQL, including the
    /// `information_schema` domains initdb creates (`cardinal_number` over `int4`, below
    /// `FirstNormalObjectId`, 16384) and every user type. pgoutput describes the same range
    /// with Type messages.
    public static let firstUserOID: UInt32 = 10_000

    /// Column type OIDs of `relation` that may be domains and are not resolved yet.
    public func unresolvedTypes(of relation: Relation) -> [UInt32] {
        var seen = Set<UInt32>()
        return relation.columns.compactMap { c in
            c.typeOID >= Self.firstUserOID && baseTypes[c.typeOID] == nil && seen.insert(c.typeOID).inserted ? c.typeOID : nil
        }
    }

    /// Records resolved types (`oid` → base type OID) and rewrites the cached relations that
    /// use them. Returns the relation `oid` as now cached, if any.
    @discardableResult
    public mutating func resolveTypes(_ resolved: [UInt32: UInt32], relation oid: UInt32? = nil) -> Relation? {
        baseTypes.merge(resolved) { _, new in new }
        for (key, relation) in relations where relation.columns.contains(where: { resolved[$0.typeOID] != nil }) {
            relations[key] = resolvingTypes(relation)
        }
        return oid.flatMap { relations[$0] }
    }

    private func resolvingTypes(_ relation: Relation) -> Relation {
        guard relation.columns.contains(where: { c in baseTypes[c.typeOID].map { $0 != c.typeOID } ?? false }) else { return relation }
        let columns = relation.columns.map { c -> RelationColumn in
            guard let base = baseTypes[c.typeOID], base != c.typeOID else { return c }
            return RelationColumn(name: c.name, typeOID: base, typeModifier: c.typeModifier, isKey: c.isKey)
        }
        return Relation(oid: relation.oid, namespace: relation.namespace, name: relation.name,
                        replicaIdentity: relation.replicaIdentity, columns: columns)
    }

    /// Creates a decoder with empty caches.
    public init() {}

    /// Decodes one message. The returned tuples share `bytes`' storage (no copy).
    /// - Parameters:
    ///   - bytes: one XLogData payload, i.e. one pgoutput message.
    ///   - walStart: the XLogData header's start LSN (not needed by version 1; kept for diagnostics).
    public mutating func decode(_ bytes: [UInt8], walStart: LSN = .zero) throws(PgOutputDecodingError) -> PgOutputMessage {
        let result: Result<PgOutputMessage, PgOutputDecodingError> = bytes.withUnsafeBytes { raw in
            var reader = ByteReader(raw)
            do throws(PgOutputDecodingError) {
                return .success(try decodeMessage(&reader, storage: bytes, walStart: walStart))
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    /// Decodes one message from raw memory; the bytes are copied once.
    public mutating func decode(_ bytes: UnsafeRawBufferPointer, walStart: LSN = .zero) throws(PgOutputDecodingError) -> PgOutputMessage {
        try decode(Array(bytes), walStart: walStart)
    }

    /// Forgets every cached relation and type (e.g. after a new replication session starts).
    public mutating func reset() {
        relations.removeAll()
        types.removeAll()
        // baseTypes stays: a type's base never changes (ALTER DOMAIN cannot change it).
    }

    private mutating func decodeMessage(_ r: inout ByteReader, storage: [UInt8], walStart: LSN) throws(PgOutputDecodingError) -> PgOutputMessage {
        guard r.remaining > 0 else {
            throw PgOutputDecodingError(.emptyMessage, "empty pgoutput message at WAL \(walStart)")
        }
        let tag = r.byte()
        r.messageName = Self.name(of: tag)
        let message: PgOutputMessage
        switch tag {
        case UInt8(ascii: "B"):
            let lsn = try r.uint64("final LSN")
            let time = try r.int64("commit timestamp")
            let xid = try r.uint32("xid")
            message = .begin(.init(finalLSN: LSN(lsn), commitTime: PostgresTimestamp(microsecondsSince2000: time), xid: xid))
        case UInt8(ascii: "C"):
            let flags = try r.uint8("flags")
            let commitLSN = try r.uint64("commit LSN")
            let endLSN = try r.uint64("end LSN")
            let time = try r.int64("commit timestamp")
            message = .commit(.init(flags: flags, commitLSN: LSN(commitLSN), endLSN: LSN(endLSN),
                                    commitTime: PostgresTimestamp(microsecondsSince2000: time)))
        case UInt8(ascii: "O"):
            let lsn = try r.uint64("origin commit LSN")
            let name = try r.string("origin name")
            message = .origin(.init(commitLSN: LSN(lsn), name: name))
        case UInt8(ascii: "R"):
            let relation = resolvingTypes(try decodeRelation(&r))
            relations[relation.oid] = relation
            message = .relation(relation)
        case UInt8(ascii: "Y"):
            let oid = try r.uint32("type OID")
            let namespace = try r.string("type namespace")
            let name = try r.string("type name")
            let type = TypeDescription(oid: oid, namespace: namespace, name: name)
            types[oid] = type
            message = .type(type)
        case UInt8(ascii: "I"):
            let relation = try relation(&r)
            let marker = try r.uint8("tuple marker")
            guard marker == UInt8(ascii: "N") else {
                throw r.invalid("expected 'N' before the new tuple, found \(ByteReader.show(marker))")
            }
            let new = try decodeTuple(&r, storage: storage, relation: relation, role: "new tuple")
            message = .insert(.init(relation: relation, new: new))
        case UInt8(ascii: "U"):
            let relation = try relation(&r)
            var marker = try r.uint8("tuple marker")
            var old: OldRow?
            if marker == UInt8(ascii: "K") || marker == UInt8(ascii: "O") {
                let kind: OldRowKind = marker == UInt8(ascii: "K") ? .key : .full
                old = OldRow(kind: kind, tuple: try decodeTuple(&r, storage: storage, relation: relation, role: "old tuple"))
                marker = try r.uint8("new tuple marker")
            }
            guard marker == UInt8(ascii: "N") else {
                throw r.invalid("expected 'K', 'O' or 'N' before a tuple, found \(ByteReader.show(marker))")
            }
            let new = try decodeTuple(&r, storage: storage, relation: relation, role: "new tuple")
            message = .update(.init(relation: relation, old: old, new: new))
        case UInt8(ascii: "D"):
            let relation = try relation(&r)
            let marker = try r.uint8("tuple marker")
            let kind: OldRowKind
            switch marker {
            case UInt8(ascii: "K"): kind = .key
            case UInt8(ascii: "O"): kind = .full
            default: throw r.invalid("expected 'K' or 'O' before the old tuple, found \(ByteReader.show(marker))")
            }
            let old = try decodeTuple(&r, storage: storage, relation: relation, role: "old tuple")
            message = .delete(.init(relation: relation, old: OldRow(kind: kind, tuple: old)))
        case UInt8(ascii: "T"):
            let count = try r.uint32("relation count")
            let options = try r.uint8("options")
            guard Int(count) <= r.remaining / 4 else {
                throw r.truncated("\(count) relation OIDs")
            }
            var truncated: [Relation] = []
            truncated.reserveCapacity(Int(count))
            for _ in 0..<count { truncated.append(try relation(&r)) }
            message = .truncate(.init(relations: truncated, options: TruncateOptions(rawValue: options)))
        case UInt8(ascii: "M"):
            let flags = try r.uint8("flags")
            guard flags <= 1 else { throw r.invalid("flags must be 0 or 1, found \(flags)") }
            let lsn = try r.uint64("message LSN")
            let prefix = try r.string("prefix")
            let length = try r.uint32("content length")
            let content = try r.bytes(count: Int(length), field: "content")
            message = .message(LogicalMessage(isTransactional: flags == 1, lsn: LSN(lsn), prefix: prefix, content: Array(content)))
        case UInt8(ascii: "S"), UInt8(ascii: "E"), UInt8(ascii: "c"), UInt8(ascii: "A"),
             UInt8(ascii: "P"), UInt8(ascii: "K"), UInt8(ascii: "r"), UInt8(ascii: "b"):
            throw PgOutputDecodingError(.unsupportedMessageType,
                "\(Self.name(of: tag)) message (\(ByteReader.show(tag))) needs a newer protocol version; this decoder implements pgoutput proto_version 1 (WAL \(walStart))")
        default:
            throw PgOutputDecodingError(.unknownMessageType,
                "unknown pgoutput message type \(ByteReader.show(tag)) at WAL \(walStart) (\(storage.count) bytes)")
        }
        guard r.remaining == 0 else {
            throw PgOutputDecodingError(.trailingBytes,
                "\(r.messageName) message has \(r.remaining) unexpected bytes after its last field at offset \(r.offset)")
        }
        return message
    }

    private func relation(_ r: inout ByteReader) throws(PgOutputDecodingError) -> Relation {
        let oid = try r.uint32("relation OID")
        guard let relation = relations[oid] else {
            throw PgOutputDecodingError(.unknownRelation,
                "\(r.messageName) message refers to relation OID \(oid), but no Relation message described it")
        }
        return relation
    }

    private func decodeRelation(_ r: inout ByteReader) throws(PgOutputDecodingError) -> Relation {
        let oid = try r.uint32("relation OID")
        let namespace = try r.string("namespace")
        let name = try r.string("relation name")
        let identityByte = try r.uint8("replica identity")
        guard let identity = ReplicaIdentity(rawValue: identityByte) else {
            throw r.invalid("replica identity must be 'd', 'n', 'f' or 'i', found \(ByteReader.show(identityByte))")
        }
        let count = try r.uint16("column count")
        var columns: [RelationColumn] = []
        columns.reserveCapacity(Int(count))
        for _ in 0..<count {
            let flags = try r.uint8("column flags")
            let columnName = try r.string("column name")
            let type = try r.uint32("column type OID")
            let modifier = try r.int32("column type modifier")
            columns.append(RelationColumn(name: columnName, typeOID: type, typeModifier: modifier, isKey: flags & 1 == 1))
        }
        return Relation(oid: oid, namespace: namespace, name: name, replicaIdentity: identity, columns: columns)
    }

    private func decodeTuple(_ r: inout ByteReader, storage: [UInt8], relation: Relation, role: String) throws(PgOutputDecodingError) -> TupleData {
        let count = Int(try r.uint16("tuple column count"))
        guard count == relation.columns.count else {
            throw PgOutputDecodingError(.columnCountMismatch,
                "\(r.messageName) \(role) has \(count) columns but relation \(relation.qualifiedName) (OID \(relation.oid)) has \(relation.columns.count)")
        }
        var cells: [TupleData.Cell] = []
        cells.reserveCapacity(count)
        for column in 0..<count {
            let kind = try r.uint8("column kind")
            switch kind {
            case UInt8(ascii: "n"): cells.append(.init(kind: 0, start: 0, length: 0))
            case UInt8(ascii: "u"): cells.append(.init(kind: 1, start: 0, length: 0))
            case UInt8(ascii: "t"), UInt8(ascii: "b"):
                let length = try r.int32("column length")
                guard length >= 0 else {
                    throw r.invalid("column \(column) (\(relation.columns[column].name)) of the \(role) has negative length \(length)")
                }
                guard Int(length) <= r.remaining else {
                    throw r.truncated("\(length) bytes of column \(column) (\(relation.columns[column].name))")
                }
                guard r.offset <= Int(Int32.max) - Int(length) else {
                    throw r.invalid("message longer than 2 GiB")
                }
                cells.append(.init(kind: kind == UInt8(ascii: "t") ? 2 : 3, start: Int32(r.offset), length: length))
                r.offset += Int(length)
            default:
                throw r.invalid("column \(column) of the \(role) has kind \(ByteReader.show(kind)); expected 'n', 'u', 't' or 'b'")
            }
        }
        return TupleData(storage: storage, cells: cells)
    }

    static func name(of tag: UInt8) -> String {
        switch tag {
        case UInt8(ascii: "B"): "Begin"
        case UInt8(ascii: "C"): "Commit"
        case UInt8(ascii: "O"): "Origin"
        case UInt8(ascii: "R"): "Relation"
        case UInt8(ascii: "Y"): "Type"
        case UInt8(ascii: "I"): "Insert"
        case UInt8(ascii: "U"): "Update"
        case UInt8(ascii: "D"): "Delete"
        case UInt8(ascii: "T"): "Truncate"
        case UInt8(ascii: "M"): "Message"
        case UInt8(ascii: "S"): "Stream Start"
        case UInt8(ascii: "E"): "Stream Stop"
        case UInt8(ascii: "c"): "Stream Commit"
        case UInt8(ascii: "A"): "Stream Abort"
        case UInt8(ascii: "P"), UInt8(ascii: "K"), UInt8(ascii: "r"), UInt8(ascii: "b"): "Two-phase"
        default: "Unknown"
        }
    }
}

/// Bounds-checked big-endian reads over one message.
struct ByteReader {
    let base: UnsafeRawBufferPointer
    var offset = 0
    var messageName = "pgoutput"

    init(_ base: UnsafeRawBufferPointer) { self.base = base }

    var remaining: Int { base.count - offset }

    static func show(_ byte: UInt8) -> String {
        (0x21...0x7E).contains(byte) ? "'\(Character(Unicode.Scalar(byte)))'" : "0x" + String(byte, radix: 16)
    }

    func truncated(_ what: String) -> PgOutputDecodingError {
        PgOutputDecodingError(.truncated,
            "\(messageName) message ends at offset \(base.count) but needs \(what) at offset \(offset)")
    }

    func invalid(_ what: String) -> PgOutputDecodingError {
        PgOutputDecodingError(.invalidField, "\(messageName) message: \(what) (offset \(offset))")
    }

    /// Reads the first byte; callers check `remaining` first.
    mutating func byte() -> UInt8 {
        defer { offset += 1 }
        return base[offset]
    }

    @inline(__always)
    mutating func uint8(_ field: String) throws(PgOutputDecodingError) -> UInt8 {
        guard remaining >= 1 else { throw truncated("1 byte for \(field)") }
        defer { offset += 1 }
        return base[offset]
    }

    @inline(__always)
    mutating func uint16(_ field: String) throws(PgOutputDecodingError) -> UInt16 {
        guard remaining >= 2 else { throw truncated("2 bytes for \(field)") }
        defer { offset += 2 }
        return UInt16(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }

    @inline(__always)
    mutating func uint32(_ field: String) throws(PgOutputDecodingError) -> UInt32 {
        guard remaining >= 4 else { throw truncated("4 bytes for \(field)") }
        defer { offset += 4 }
        return UInt32(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    @inline(__always)
    mutating func int32(_ field: String) throws(PgOutputDecodingError) -> Int32 {
        Int32(bitPattern: try uint32(field))
    }

    @inline(__always)
    mutating func uint64(_ field: String) throws(PgOutputDecodingError) -> UInt64 {
        guard remaining >= 8 else { throw truncated("8 bytes for \(field)") }
        defer { offset += 8 }
        return UInt64(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }

    mutating func int64(_ field: String) throws(PgOutputDecodingError) -> Int64 {
        Int64(bitPattern: try uint64(field))
    }

    mutating func bytes(count: Int, field: String) throws(PgOutputDecodingError) -> UnsafeRawBufferPointer {
        guard count >= 0, count <= remaining else { throw truncated("\(count) bytes for \(field)") }
        defer { offset += count }
        return UnsafeRawBufferPointer(rebasing: base[offset..<offset + count])
    }

    /// A zero-terminated string.
    mutating func string(_ field: String) throws(PgOutputDecodingError) -> String {
        guard let end = base[offset...].firstIndex(of: 0) else {
            throw PgOutputDecodingError(.unterminatedString,
                "\(messageName) message: \(field) at offset \(offset) has no terminating zero byte")
        }
        defer { offset = end + 1 }
        return String(decoding: UnsafeRawBufferPointer(rebasing: base[offset..<end]), as: UTF8.self)
    }
}
