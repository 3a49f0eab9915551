import PoolKit
/// Entry points for measuring the capture core (decode, assemble, JSON-encode)
/// without a database: used by `Benchmarks/` and by tests.
public enum CaptureThroughput {
    /// What one run did.
    public struct Result: Sendable, Hashable {
        /// Messages decoded.
        public var messages: Int
        /// Committed transactions.
        public var transactions: Int
        /// Changes (ChangeEvents) encoded.
        public var changes: Int
        /// Total JSON bytes written.
        public var jsonBytes: Int
    }

    /// Decodes every message with a fresh decoder, assembles transactions and
    /// encodes each change to JSON once (reusing one buffer, as fan-out would).
    public static func decodeAndEncode(_ messages: [[UInt8]]) throws -> Result {
        var decoder = PgOutputDecoder()
        var assembler = TransactionAssembler()
        var buffer: [UInt8] = []
        buffer.reserveCapacity(4096)
        var result = Result(messages: 0, transactions: 0, changes: 0, jsonBytes: 0)
        for bytes in messages {
            let message = try decoder.decode(bytes)
            result.messages += 1
            guard case .transaction(let transaction)? = try assembler.apply(message) else { continue }
            result.transactions += 1
            for change in transaction.changes {
                buffer.removeAll(keepingCapacity: true)
                change.writeJSON(into: &buffer)
                result.changes += 1
                result.jsonBytes += buffer.count
            }
        }
        return result
    }

    /// A synthetic stream like the issue's benchmark: `transactions` transactions of
    /// `rowsPerTransaction` inserts into `public.bench(id int8, amount numeric,
    /// status text, payload jsonb, created_at timestamptz, flag bool)`.
    public static func syntheticInsertStream(transactions: Int, rowsPerTransaction: Int) -> [[UInt8]] {
        let relation = Relation(oid: 16_384, namespace: "public", name: "bench", replicaIdentity: .default, columns: [
            RelationColumn(name: "id", typeOID: PostgresTypeOID.int8, isKey: true),
            RelationColumn(name: "amount", typeOID: PostgresTypeOID.numeric),
            RelationColumn(name: "status", typeOID: PostgresTypeOID.text),
            RelationColumn(name: "payload", typeOID: PostgresTypeOID.jsonb),
            RelationColumn(name: "created_at", typeOID: PostgresTypeOID.timestamptz),
            RelationColumn(name: "flag", typeOID: PostgresTypeOID.bool),
        ])
        var messages: [[UInt8]] = [PgOutputMessageBuilder.relation(relation)]
        messages.reserveCapacity(1 + transactions * (rowsPerTransaction + 2))
        var lsn: UInt64 = 0x0100_0000
        var id = 0
        let time = PostgresTimestamp(microsecondsSince2000: 817_408_800_123_456)
        for transaction in 0..<transactions {
            let commitLSN = LSN(lsn + UInt64(rowsPerTransaction) * 120)
            messages.append(PgOutputMessageBuilder.begin(finalLSN: commitLSN, commitTime: time, xid: UInt32(1000 + transaction)))
            for _ in 0..<rowsPerTransaction {
                id += 1
                messages.append(PgOutputMessageBuilder.insert(relationOID: relation.oid, new: [
                    PgOutputMessageBuilder.text(String(id)),
                    PgOutputMessageBuilder.text("\(id % 1000).25"),
                    PgOutputMessageBuilder.text(id % 2 == 0 ? "open" : "paid \"now\""),
                    PgOutputMessageBuilder.text(#"{"n": \#(id), "tags": ["a", "b"]}"#),
                    PgOutputMessageBuilder.text("2026-11-26 18:00:00.123456+00"),
                    PgOutputMessageBuilder.text(id % 3 == 0 ? "t" : "f"),
                ]))
            }
            lsn = commitLSN.rawValue + 48
            messages.append(PgOutputMessageBuilder.commit(commitLSN: commitLSN, endLSN: LSN(lsn), commitTime: time))
        }
        return messages
    }
}
