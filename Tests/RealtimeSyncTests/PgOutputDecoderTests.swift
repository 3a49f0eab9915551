import PoolKit
import RealtimeSync
import Testing

@Suite("pgoutput decoder")
struct PgOutputDecoderTests {
    @Test("Begin and Commit carry LSNs, time and xid")
    func beginCommit() throws {
        var decoder = PgOutputDecoder()
        let begin = try decoder.decode(PgOutputMessageBuilder.begin(finalLSN: LSN(0x16B3748), commitTime: fixedTime, xid: 1234))
        guard case .begin(let b) = begin else { Issue.record("expected Begin, got \(begin)"); return }
        #expect(b == .init(finalLSN: LSN(0x16B3748), commitTime: fixedTime, xid: 1234))
        let commit = try decoder.decode(PgOutputMessageBuilder.commit(commitLSN: LSN(0x16B3748), endLSN: LSN(0x16B3778), commitTime: fixedTime))
        guard case .commit(let c) = commit else { Issue.record("expected Commit, got \(commit)"); return }
        #expect(c == .init(flags: 0, commitLSN: LSN(0x16B3748), endLSN: LSN(0x16B3778), commitTime: fixedTime))
    }

    @Test("Relation is cached by OID and replaced by a new Relation message")
    func relationCache() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))
        #expect(decoder.relations[16_400] == ordersRelation)
        #expect(decoder.relations[16_400]?.qualifiedName == "public.orders")
        #expect(decoder.relations[16_400]?.keyColumnIndices == [0])

        let altered = Relation(oid: 16_400, namespace: "public", name: "orders", replicaIdentity: .full, columns: [
            RelationColumn(name: "id", typeOID: PostgresTypeOID.int8, isKey: true),
            RelationColumn(name: "status", typeOID: PostgresTypeOID.text),
        ])
        _ = try decoder.decode(PgOutputMessageBuilder.relation(altered))
        #expect(decoder.relations[16_400] == altered)
        #expect(decoder.relations.count == 1)
        // Tuples are now checked against the new column list.
        let insert = try decoder.decode(PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), t("open")]))
        guard case .insert(let i) = insert else { Issue.record("expected Insert"); return }
        #expect(i.relation.columns.count == 2)
        #expect(throws: PgOutputDecodingError.self) {
            try decoder.decode(PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), t("open"), .null, .null]))
        }
    }

    @Test("Relation in pg_catalog has an empty namespace")
    func catalogNamespace() throws {
        var decoder = PgOutputDecoder()
        let relation = Relation(oid: 1, namespace: "", name: "thing", replicaIdentity: .nothing, columns: [])
        _ = try decoder.decode(PgOutputMessageBuilder.relation(relation))
        #expect(decoder.relations[1]?.qualifiedName == "pg_catalog.thing")
        #expect(decoder.relations[1]?.replicaIdentity == .nothing)
    }

    @Test("Type message is cached")
    func typeMessage() throws {
        var decoder = PgOutputDecoder()
        let message = try decoder.decode(PgOutputMessageBuilder.type(TypeDescription(oid: 16_385, namespace: "public", name: "mood")))
        guard case .type(let type) = message else { Issue.record("expected Type"); return }
        #expect(type.name == "mood")
        #expect(decoder.types[16_385]?.namespace == "public")
    }

    @Test("Insert with text, null and unchanged columns")
    func insertColumns() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))
        let message = try decoder.decode(PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("7"), t("open"), .null, t("")]))
        guard case .insert(let insert) = message else { Issue.record("expected Insert"); return }
        #expect(insert.new.count == 4)
        #expect(insert.new.text(at: 0) == "7")
        #expect(insert.new[2] == .null)
        #expect(insert.new.text(at: 3) == "")
        #expect(insert.new[3] != .null)
    }

    @Test("Update without old tuple, with old key 'K', with full old row 'O'")
    func updateVariants() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))
        let new: [TupleValue] = [t("2"), t("paid"), .unchanged, t("10.5")]

        guard case .update(let plain) = try decoder.decode(PgOutputMessageBuilder.update(relationOID: 16_400, new: new)) else {
            Issue.record("expected Update"); return
        }
        #expect(plain.old == nil)
        #expect(plain.new[2] == .unchanged)

        guard case .update(let keyed) = try decoder.decode(PgOutputMessageBuilder.update(
            relationOID: 16_400, old: (.key, [t("1"), .null, .null, .null]), new: new)) else { Issue.record("expected Update"); return }
        #expect(keyed.old?.kind == .key)
        #expect(keyed.old?.tuple.text(at: 0) == "1")

        guard case .update(let full) = try decoder.decode(PgOutputMessageBuilder.update(
            relationOID: 16_400, old: (.full, [t("2"), t("open"), t("n"), t("9")]), new: new)) else { Issue.record("expected Update"); return }
        #expect(full.old?.kind == .full)
        #expect(full.old?.tuple.text(at: 1) == "open")
        #expect(full.new.text(at: 1) == "paid")
    }

    @Test("Delete with key and with full old row")
    func deleteVariants() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))
        guard case .delete(let keyed) = try decoder.decode(PgOutputMessageBuilder.delete(
            relationOID: 16_400, oldKind: .key, old: [t("3"), .null, .null, .null])) else { Issue.record("expected Delete"); return }
        #expect(keyed.old.kind == .key)
        guard case .delete(let full) = try decoder.decode(PgOutputMessageBuilder.delete(
            relationOID: 16_400, oldKind: .full, old: [t("3"), t("x"), .null, t("1")])) else { Issue.record("expected Delete"); return }
        #expect(full.old.kind == .full)
        #expect(full.old.tuple.text(at: 3) == "1")
    }

    @Test("Truncate lists relations and options")
    func truncate() throws {
        var decoder = PgOutputDecoder()
        let other = Relation(oid: 16_500, namespace: "app", name: "items", replicaIdentity: .default, columns: [])
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))
        _ = try decoder.decode(PgOutputMessageBuilder.relation(other))
        guard case .truncate(let truncate) = try decoder.decode(PgOutputMessageBuilder.truncate(
            relationOIDs: [16_400, 16_500], options: [.cascade, .restartIdentity])) else { Issue.record("expected Truncate"); return }
        #expect(truncate.relations.map(\.qualifiedName) == ["public.orders", "app.items"])
        #expect(truncate.options == [.cascade, .restartIdentity])
    }

    @Test("Origin and logical Message")
    func originAndMessage() throws {
        var decoder = PgOutputDecoder()
        guard case .origin(let origin) = try decoder.decode(PgOutputMessageBuilder.origin(commitLSN: LSN(0xAB), name: "upstream")) else {
            Issue.record("expected Origin"); return
        }
        #expect(origin == .init(commitLSN: LSN(0xAB), name: "upstream"))
        guard case .message(let message) = try decoder.decode(PgOutputMessageBuilder.message(
            transactional: true, lsn: LSN(0x99), prefix: "rt/tx", content: [0, 255])) else { Issue.record("expected Message"); return }
        #expect(message == LogicalMessage(isTransactional: true, lsn: LSN(0x99), prefix: "rt/tx", content: [0, 255]))
    }

    @Test("A 1 MB text value is decoded without loss")
    func largeValue() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))
        let big = String(repeating: "abcdefghij", count: 104_858)  // 1,048,580 bytes
        let message = PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, t(big), .null])
        guard case .insert(let insert) = try decoder.decode(message) else { Issue.record("expected Insert"); return }
        #expect(insert.new.text(at: 2)?.utf8.count == 1_048_580)
        #expect(insert.new.text(at: 2) == big)
    }

    @Test("Row messages for an unknown relation OID throw unknownRelation")
    func unknownRelation() {
        var decoder = PgOutputDecoder()
        let error = #expect(throws: PgOutputDecodingError.self) {
            try decoder.decode(PgOutputMessageBuilder.insert(relationOID: 42, new: [t("1")]))
        }
        #expect(error?.code == .unknownRelation)
        #expect(error?.message.contains("OID 42") == true)
    }

    @Test("Every truncation of every message type throws, never crashes")
    func truncatedInputThrows() throws {
        var setup = PgOutputDecoder()
        _ = try setup.decode(PgOutputMessageBuilder.relation(ordersRelation))
        let messages: [[UInt8]] = [
            PgOutputMessageBuilder.begin(finalLSN: LSN(1), commitTime: fixedTime, xid: 1),
            PgOutputMessageBuilder.commit(commitLSN: LSN(1), endLSN: LSN(2), commitTime: fixedTime),
            PgOutputMessageBuilder.origin(commitLSN: LSN(1), name: "o"),
            PgOutputMessageBuilder.relation(ordersRelation),
            PgOutputMessageBuilder.type(TypeDescription(oid: 1, namespace: "s", name: "n")),
            PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), t("a"), .null, .unchanged]),
            PgOutputMessageBuilder.update(relationOID: 16_400, old: (.key, [t("1"), .null, .null, .null]), new: [t("1"), t("a"), .null, .unchanged]),
            PgOutputMessageBuilder.delete(relationOID: 16_400, oldKind: .full, old: [t("1"), t("a"), .null, t("2")]),
            PgOutputMessageBuilder.truncate(relationOIDs: [16_400]),
            PgOutputMessageBuilder.message(transactional: false, lsn: LSN(1), prefix: "p", content: [1, 2, 3]),
        ]
        for message in messages {
            var decoder = setup
            _ = try decoder.decode(message)  // the whole message is fine
            for length in 0..<message.count {
                var decoder = setup
                let error = #expect(throws: PgOutputDecodingError.self, "prefix \(length) of \(message.count) bytes of \(message[0])") {
                    try decoder.decode(Array(message.prefix(length)))
                }
                if length == 0 { #expect(error?.code == .emptyMessage) }
            }
            var decoder2 = setup
            let trailing = #expect(throws: PgOutputDecodingError.self) { try decoder2.decode(message + [0]) }
            #expect(trailing?.code == .trailingBytes)
        }
    }

    @Test("Malformed fields throw clear errors")
    func malformedFields() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))

        var badKind = PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, .null, .null])
        badKind[8] = UInt8(ascii: "x")  // 'I' oid(4) 'N' count(2) → first column kind at offset 8
        let kindError = #expect(throws: PgOutputDecodingError.self) { try decoder.decode(badKind) }
        #expect(kindError?.code == .invalidField)
        #expect(kindError?.message.contains("'x'") == true)

        var badMarker = PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, .null, .null])
        badMarker[5] = UInt8(ascii: "Q")
        #expect(throws: PgOutputDecodingError.self) { try decoder.decode(badMarker) }

        var badDelete = PgOutputMessageBuilder.delete(relationOID: 16_400, oldKind: .key, old: [t("1"), .null, .null, .null])
        badDelete[5] = UInt8(ascii: "N")
        #expect(throws: PgOutputDecodingError.self) { try decoder.decode(badDelete) }

        var hugeLength = PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), .null, .null, .null])
        hugeLength.replaceSubrange(9..<13, with: [0x7F, 0xFF, 0xFF, 0xFF])
        let lengthError = #expect(throws: PgOutputDecodingError.self) { try decoder.decode(hugeLength) }
        #expect(lengthError?.code == .truncated)

        var negativeLength = hugeLength
        negativeLength.replaceSubrange(9..<13, with: [0xFF, 0xFF, 0xFF, 0xFE])
        #expect(throws: PgOutputDecodingError.self) { try decoder.decode(negativeLength) }

        var badIdentity = PgOutputMessageBuilder.relation(ordersRelation)
        let identityOffset = 1 + 4 + "public".utf8.count + 1 + "orders".utf8.count + 1
        badIdentity[identityOffset] = UInt8(ascii: "z")
        #expect(throws: PgOutputDecodingError.self) { try decoder.decode(badIdentity) }

        let unterminated: [UInt8] = [UInt8(ascii: "Y"), 0, 0, 0, 1] + Array("no-terminator".utf8)
        let stringError = #expect(throws: PgOutputDecodingError.self) { try decoder.decode(unterminated) }
        #expect(stringError?.code == .unterminatedString)

        let hugeTruncate: [UInt8] = [UInt8(ascii: "T"), 0x7F, 0xFF, 0xFF, 0xFF, 0]
        #expect(throws: PgOutputDecodingError.self) { try decoder.decode(hugeTruncate) }

        let unknown = #expect(throws: PgOutputDecodingError.self) { try decoder.decode([UInt8(ascii: "Z"), 1, 2]) }
        #expect(unknown?.code == .unknownMessageType)
        let streaming = #expect(throws: PgOutputDecodingError.self) { try decoder.decode([UInt8(ascii: "S"), 0, 0, 0, 1, 1]) }
        #expect(streaming?.code == .unsupportedMessageType)
        #expect(streaming?.message.contains("proto_version 1") == true)
    }

    @Test("Random garbage never crashes the decoder")
    func fuzz() async throws {
        var generator = SplitMix64(seed: 42)
        var base = PgOutputDecoder()
        _ = try base.decode(PgOutputMessageBuilder.relation(ordersRelation))
        let seeds: [[UInt8]] = [
            PgOutputMessageBuilder.update(relationOID: 16_400, old: (.full, [t("1"), t("a"), .null, t("2")]), new: [t("1"), t("b"), .unchanged, t("3")]),
            PgOutputMessageBuilder.relation(ordersRelation),
            PgOutputMessageBuilder.message(transactional: true, lsn: LSN(5), prefix: "x", content: [1]),
        ]
        for iteration in 0..<3_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            var message = seeds[Int(generator.next() % UInt64(seeds.count))]
            for _ in 0..<(1 + generator.next() % 4) {
                message[Int(generator.next() % UInt64(message.count))] = UInt8(truncatingIfNeeded: generator.next())
            }
            var decoder = base
            _ = try? decoder.decode(message)
        }
    }

    @Test("The raw-pointer entry point decodes the same as the array one")
    func rawPointer() throws {
        var decoder = PgOutputDecoder()
        _ = try decoder.decode(PgOutputMessageBuilder.relation(ordersRelation))
        let message = PgOutputMessageBuilder.insert(relationOID: 16_400, new: [t("1"), t("é"), .null, .null])
        let decoded = try message.withUnsafeBytes { raw in try decoder.decode(raw, walStart: LSN(9)) }
        guard case .insert(let insert) = decoded else { Issue.record("expected Insert"); return }
        #expect(insert.new.text(at: 1) == "é")
    }
}

/// A small deterministic PRNG for fuzzing.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
