import PoolKit
import Synchronization

/// Reads a streamed table's rows as of one database snapshot, for `subscribe` with
/// `snapshot: true`, on a connection borrowed from a PoolKit `ConnectionPool`.
///
/// `withSnapshot` opens `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, takes the table's
/// `ACCESS SHARE` lock (so that a running table rewrite ends first), and its first query
/// fixes the transaction's snapshot and reads it (`pg_current_snapshot()`) with
/// the WAL insert position taken just after it (`pg_current_wal_insert_lsn()`); the rows
/// are then read through a `SCROLL` cursor in that same snapshot. Row-level security is
/// turned off for the transaction (`row_security = off`): the change stream is not filtered by
/// policies, so a snapshot silently filtered by them would not match it; a role that policies
/// apply to gets Postgres's error instead (the role needs `BYPASSRLS`, superuser, or the
/// ownership of a table without `FORCE ROW LEVEL SECURITY`). An ordinary table is read with `ONLY`: its inheritance children are published
/// and streamed under their own names. The connection goes back
/// to the pool however `body` ends (the pool rolls back what is left open); cancelling the
/// calling task cancels the running statement on the server (`PQcancel`).
public final class TableSnapshotReader: Sendable {
    /// The pool the snapshot transactions borrow their connections from.
    public let pool: ConnectionPool<PostgresConnection, ContinuousClock>

    /// Creates a reader over `pool`.
    public init(pool: ConnectionPool<PostgresConnection, ContinuousClock>) { self.pool = pool }

    /// The database's current WAL insert position (`pg_current_wal_insert_lsn()`), on a pooled connection.
    public func currentWALPosition() async throws -> LSN {
        try await pool.withConnection(label: "wal position") { connection in
            let rows = try await connection.query("SELECT pg_current_wal_insert_lsn()::text")
            guard rows.count == 1, let position = LSN(rows[0][0].string) else {
                throw RealtimeServerError(.unexpectedDatabaseAnswer, "pg_current_wal_insert_lsn() gave an unexpected answer")
            }
            return position
        }
    }

    /// Opens a snapshot of `table` (`schema.table`, as the catalog names it) selecting `columns`
    /// in their order, and only the rows that pass `rowFilter` (the publication's row filter,
    /// SQL from the database's catalog, never from a client), runs `body` with it, and ends
    /// the transaction.
    /// `prefilter` (`Filter.snapshotPrefilter`): columns and SQL literals the rows must be
    /// among, ANDed into the SELECT so that Postgres reads only candidate rows.
    public func withSnapshot<Result: Sendable>(
        of table: String, columns: [RelationColumn], rowFilter: String? = nil,
        prefilter: [(column: String, literals: [String])] = [],
        _ body: @Sendable (TableSnapshot) async throws -> Result
    ) async throws -> Result {
        try await pool.withConnection(label: "snapshot \(table)") { connection in
            _ = try await connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            _ = try await connection.execute("SET LOCAL row_security = off")
            // The table's lock before the snapshot (LOCK takes none): a table rewrite (ALTER
            // TABLE … TYPE, VACUUM FULL, CLUSTER) is not MVCC-safe, and a snapshot taken while
            // one was running would read its new copy as empty.
            let quotedTable = try Self.quoted(table, connection)
            _ = try await connection.execute("LOCK TABLE \(quotedTable) IN ACCESS SHARE MODE")
            let marks = try await connection.query(
                "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text, (SELECT relkind::text FROM pg_class WHERE oid = $1::regclass)",
                parameters: [quotedTable]
            )
            guard marks.count == 1, let visibility = SnapshotVisibility(parsing: marks[0][0].string),
                  let position = LSN(marks[0][1].string) else {
                throw RealtimeServerError(.unexpectedDatabaseAnswer, "pg_current_snapshot() / pg_current_wal_insert_lsn() gave an unexpected answer (PostgreSQL 13 or later is required for snapshots)")
            }
            let list = try columns.map { try connection.escapeIdentifier($0.name) }.joined(separator: ", ")
            let cursor = "realtime_sync_snapshot"
            // A partitioned table ('p') is read whole: ONLY would give none of its partitions' rows.
            let only = marks[0][2].string == "r" ? "ONLY " : ""
            var conditions = rowFilter.map { ["(\($0))"] } ?? []
            for (column, literals) in prefilter {
                conditions.append("\(try connection.escapeIdentifier(column)) IN (\(literals.joined(separator: ", ")))")
            }
            let condition = conditions.isEmpty ? "" : " WHERE " + conditions.joined(separator: " AND ")
            _ = try await connection.execute("DECLARE \(cursor) SCROLL CURSOR FOR SELECT \(list) FROM \(only)\(quotedTable)\(condition)")
            let snapshot = TableSnapshot(connection: connection, cursor: cursor, columnCount: columns.count,
                                         visibility: visibility, walPosition: position)
            let result = try await body(snapshot)
            try await snapshot.finish()
            return result
        }
    }

    /// `schema.table` with each part quoted by `PQescapeIdentifier`.
    static func quoted(_ table: String, _ connection: PostgresConnection) throws -> String {
        let parts = table.split(separator: ".", maxSplits: 1).map(String.init)
        return try parts.map { try connection.escapeIdentifier($0) }.joined(separator: ".")
    }
}

/// An open snapshot of one table (see `TableSnapshotReader.withSnapshot`): what it sees, and
/// its rows in chunks. Valid only inside the `withSnapshot` body that received it.
public struct TableSnapshot: Sendable {
    let connection: PostgresConnection
    let cursor: String
    let columnCount: Int
    /// Set by `finish()`.
    let finished = Finished()

    /// Whether the snapshot's transaction has ended (a class, so that copies share it).
    final class Finished: Sendable {
        let value = Atomic<Bool>(false)
    }
    /// Which committed transactions the rows include.
    public let visibility: SnapshotVisibility
    /// `pg_current_wal_insert_lsn()` read just after the snapshot was taken: the commit record of
    /// every transaction the snapshot sees starts before it.
    public let walPosition: LSN

    /// Up to `count` more rows, each value as its Postgres text (nil for NULL) in the order of the
    /// columns given to `withSnapshot`; empty at the end. The rows come one at a time (single-row
    /// mode) and are kept while their text stays within `maxBytes` in all, the first row always:
    /// the rows after that are let go as they arrive and the cursor is moved back before them,
    /// so that the next call starts with them. So the memory this takes is bounded by `maxBytes`
    /// plus one row, however wide the rows `count` brings turn out to be.
    public func nextRows(_ count: Int, maxBytes: Int = .max) async throws -> [[[UInt8]?]] {
        try await fetch(count, maxBytes: maxBytes).rows
    }

    /// `nextRows`, with the bytes of text the kept rows hold (what the FETCH sizer needs).
    func fetch(_ count: Int, maxBytes: Int) async throws -> (rows: [[[UInt8]?]], bytes: Int) {
        var rows: [[[UInt8]?]] = []
        var bytes = 0
        var passed = 0
        let columns = columnCount
        let asked = max(1, count)
        try await connection.query("FETCH FORWARD \(asked) FROM \(cursor)") { result in
            // Single-row mode: each result is one row.
            guard passed == 0, let row = result.first else {
                passed += 1
                return
            }
            let width = min(columns, row.count)
            var size = 0
            for column in 0..<width { size += row[column].isNull ? 0 : row[column].withUTF8 { $0.count } }
            if !rows.isEmpty && bytes + size > maxBytes {
                passed = 1
                return
            }
            var values: [[UInt8]?] = []
            values.reserveCapacity(columns)
            for column in 0..<width {
                let cell = row[column]
                values.append(cell.isNull ? nil : cell.withUTF8 { Array($0) })
            }
            rows.append(values)
            bytes += size
        }
        if passed > 0 {
            // The cursor is on the last row fetched, or past the end if fewer than asked came:
            // back onto the last row kept, so that the next FETCH starts with the first let go.
            let back = rows.count + passed < asked ? passed + 1 : passed
            _ = try await connection.execute("MOVE BACKWARD \(back) IN \(cursor)")
        }
        return (rows, bytes)
    }

    /// Moves back to before the first row (the same rows follow again: same snapshot).
    public func rewind() async throws {
        _ = try await connection.execute("MOVE ABSOLUTE 0 IN \(cursor)")
    }

    /// Ends the snapshot's transaction (`COMMIT`) once every row wanted has been read, so that
    /// nothing after it (waiting for a slow client, the handoff to the stream) runs with the
    /// transaction open: its lock and its hold on vacuum end here, and a failure to end it
    /// (the backend terminated meanwhile, e.g. by `idle_in_transaction_session_timeout`)
    /// comes before anything is handed over. No row can be read after it. Once only; later
    /// calls, and the one `withSnapshot` makes after its body, do nothing.
    public func finish() async throws {
        guard !finished.value.exchange(true, ordering: .relaxed) else { return }
        _ = try await connection.execute("COMMIT")
    }
}
