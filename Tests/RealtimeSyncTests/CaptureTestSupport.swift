import PoolKit
import Foundation
import RealtimeSync
import Testing

/// Bytes from a hex string (fixtures).
func bytes(hex: String) -> [UInt8] {
    var result: [UInt8] = []
    result.reserveCapacity(hex.utf8.count / 2)
    var high: UInt8?
    for character in hex.utf8 {
        let value: UInt8 = switch character {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): character - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): character - UInt8(ascii: "a") + 10
        default: character - UInt8(ascii: "A") + 10
        }
        if let h = high { result.append(h << 4 | value); high = nil } else { high = value }
    }
    return result
}

/// A text tuple value.
func t(_ string: String) -> TupleValue { PgOutputMessageBuilder.text(string) }

/// Decodes and assembles a message sequence into committed transactions and standalone messages.
struct Pipeline {
    var decoder = PgOutputDecoder()
    var assembler = TransactionAssembler()
    var transactions: [CommittedTransaction] = []
    var standalone: [LogicalMessage] = []

    mutating func feed(_ messages: [[UInt8]]) throws {
        for message in messages {
            let decoded = try decoder.decode(message)
            switch try assembler.apply(decoded) {
            case .transaction(let transaction)?: transactions.append(transaction)
            case .message(let logical)?: standalone.append(logical)
            case nil: break
            }
        }
    }

    mutating func feed(hex: [String]) throws { try feed(hex.map { bytes(hex: $0) }) }

    var changes: [ChangeEvent] { transactions.flatMap(\.changes) }
}

/// Parses JSON bytes with Foundation (tests only) to prove the output is valid JSON.
func parseJSON(_ data: [UInt8]) throws -> Any {
    try JSONSerialization.jsonObject(with: Data(data), options: [.fragmentsAllowed])
}

/// The JSON text of an event.
func jsonText(_ event: ChangeEvent) -> String { String(decoding: event.jsonBytes(), as: UTF8.self) }

/// A test instant: nanoseconds on a manual timeline.
struct TestInstant: InstantProtocol, Sendable {
    var offset: Duration
    static let zero = TestInstant(offset: .zero)
    func advanced(by duration: Duration) -> TestInstant { TestInstant(offset: offset + duration) }
    func duration(to other: TestInstant) -> Duration { other.offset - offset }
    static func < (lhs: TestInstant, rhs: TestInstant) -> Bool { lhs.offset < rhs.offset }
}

/// A relation used by hand-built messages: public.orders(id int4 key, status text, notes text, amount numeric).
let ordersRelation = Relation(oid: 16_400, namespace: "public", name: "orders", replicaIdentity: .default, columns: [
    RelationColumn(name: "id", typeOID: PostgresTypeOID.int4, isKey: true),
    RelationColumn(name: "status", typeOID: PostgresTypeOID.text),
    RelationColumn(name: "notes", typeOID: PostgresTypeOID.text),
    RelationColumn(name: "amount", typeOID: PostgresTypeOID.numeric),
])

let fixedTime = PostgresTimestamp(microsecondsSince2000: 817_408_800_123_456)  // 2025-11-25T18:00:00.123456Z

/// Wraps messages in Begin/Commit at `lsn`.
func transaction(lsn: UInt64, xid: UInt32 = 700, _ body: [[UInt8]]) -> [[UInt8]] {
    [PgOutputMessageBuilder.begin(finalLSN: LSN(lsn), commitTime: fixedTime, xid: xid)] + body
        + [PgOutputMessageBuilder.commit(commitLSN: LSN(lsn), endLSN: LSN(lsn + 0x30), commitTime: fixedTime)]
}
