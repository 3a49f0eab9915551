import PoolKit
import Synchronization

/// Adapts the capture's `ChangeStream` to the server's `ChangeSource`.
///
/// - `changes(after:)`: `nil` is the live stream from now; a cursor resumes from the
///   stream's window. A cursor older than the window throws `ResumeWindowError`
///   (`resync_required`), at once or, while the stream is still opening its window, from
///   the iteration. A stream that stopped ends the sequence after what it delivered (as
///   `ChangeSource` asks), also for a cursor it never got to serve
///   (`ChangeStreamError.streamStopped`); one that failed throws
///   `ChangeStreamError.streamFailed` after it, so that the fan-out logs the cause and a
///   `since` catch-up answers `internal` instead of waiting on a stream that is gone.
/// - `catalog`: the publication's tables and columns, loaded with `loadCatalog(using:)`
///   once the stream's setup has run.
public final class ChangeStreamSource: ChangeSource {
    /// The stream this source reads.
    public let stream: ChangeStream
    private let catalogState: Mutex<TableCatalog>

    /// Creates a source over `stream`, serving `catalog` until `loadCatalog(using:)` replaces it.
    public init(stream: ChangeStream, catalog: TableCatalog = TableCatalog()) {
        self.stream = stream
        self.catalogState = Mutex(catalog)
    }

    /// The sequence `changes(after:)` returns: the stream's subscription, which ends
    /// (rather than throws) when the stream stops, and throws when it fails.
    public struct Changes: AsyncSequence, Sendable {
        /// Elements are committed changes.
        public typealias Element = ChangeEvent
        let subscription: ChangeSubscription?

        /// Makes the iterator.
        public func makeAsyncIterator() -> Iterator { Iterator(inner: subscription?.makeAsyncIterator()) }

        /// Waits for the next change; nil when the stream has stopped.
        public struct Iterator: AsyncIteratorProtocol {
            var inner: ChangeSubscription.Iterator?

            /// The next change, `nil` at the end (also when the stream stopped); throws
            /// `ChangeStreamError.streamFailed` when it failed, `ResumeWindowError` for a cursor
            /// older than the window.
            public mutating func next() async throws -> ChangeEvent? {
                guard inner != nil else { return nil }
                do {
                    return try await inner!.next()
                } catch let error as ChangeStreamError where error.code == .streamStopped {
                    inner = nil
                    return nil
                }
            }
        }
    }

    /// See `ChangeSource.changes(after:)`.
    public func changes(after cursor: Cursor?) async throws -> Changes {
        guard let cursor else { return Changes(subscription: stream.changes()) }
        return Changes(subscription: try stream.changes(after: cursor))
    }

    /// See `ChangeSource.currentCursor`: the newest change in the window, or the window's
    /// start with none yet (the origin before the window opens).
    public var currentCursor: Cursor {
        let statistics = stream.statistics
        return statistics.lastCursor ?? statistics.oldestResumable ?? Cursor(commitLSN: .zero, index: 0)
    }

    /// See `ChangeSource.isConnected`: the replication connection is streaming.
    public var isConnected: Bool { stream.isConnected }

    /// See `ChangeSource.isCaughtUp`: the stream has read the slot's backlog up to where the
    /// server's WAL was when it connected (`ChangeStream.isCaughtUp`).
    public var isCaughtUp: Bool { stream.isCaughtUp }

    /// See `ChangeSource.catalog`.
    public var catalog: TableCatalog { catalogState.withLock { $0 } }

    /// Replaces the catalog.
    public func setCatalog(_ catalog: TableCatalog) { catalogState.withLock { $0 = catalog } }

    /// Reads the columns of every table of the stream's publication (as the database lists it
    /// now, once setup ran: a table added with `ALTER PUBLICATION … ADD TABLE` is streamed by
    /// pgoutput too; before setup, the configured tables) and makes them the catalog.
    @discardableResult
    public func loadCatalog(using connection: PostgresConnection) async throws -> TableCatalog {
        var tables = stream.setupReport?.tables ?? stream.configuration.tables
        if stream.setupReport != nil {
            let names = try await CaptureSetup.publishedTables(connection, publication: stream.configuration.publicationName)
            if !names.isEmpty { tables = names }
        }
        var catalog = try await Self.catalog(of: tables, using: connection, publication: stream.configuration.publicationName)
        // Read after the columns: every ALTER they reflect committed before this position.
        let position: String? = try await connection.query("SELECT pg_current_wal_lsn()::text")[0].decode(String.self, at: 0)
        catalog.asOf = position.flatMap { LSN($0) }
        setCatalog(catalog)
        return catalog
    }

    /// The columns of `tables` (`schema.table` or `table`), as pgoutput describes them
    /// (type OID, a domain resolved to its base type; modifier; whether part of the primary
    /// key / replica identity index).
    ///
    /// Only the columns pgoutput sends: no generated column (PostgreSQL 12-17 never stream
    /// them; 18 streams those its publication names), and, for a table of `publication` with
    /// a column list (PostgreSQL 15+), only the listed columns; that publication's row filter is kept for snapshots. (A
    /// snapshot or filter reading more than the stream carries would hand clients columns and
    /// rows the publication leaves out, and a filter on such a column could never be met.)
    public static func catalog(of tables: [String], using connection: PostgresConnection,
                               publication: String? = nil) async throws -> TableCatalog {
        var catalog = TableCatalog()
        let version = try await connection.query("SELECT current_setting('server_version_num')::int8")
        let serverVersion = try version.first?.decode(Int.self, at: 0) ?? 0
        let listsColumns = serverVersion >= 150_000
        // PostgreSQL 18 streams a generated column its publication names (a column list, or
        // publish_generated_columns); `attnames` then says which. Before, none is streamed.
        let streamsGenerated = serverVersion >= 180_000 && publication != nil
        for table in tables {
            let parts = table.split(separator: ".", maxSplits: 1).map(String.init)
            let (schema, name) = parts.count == 2 ? (parts[0], parts[1]) : ("public", parts[0])
            let rows = try await connection.query("""
                SELECT a.attname::text AS name,
                       -- A domain counts as its base type (through domains over domains), as
                       -- the change stream's relations do (PgOutputDecoder.baseTypes).
                       (WITH RECURSIVE d(oid, base) AS (
                            SELECT t.oid, t.typbasetype FROM pg_type t WHERE t.oid = a.atttypid
                            UNION ALL SELECT t.oid, t.typbasetype FROM pg_type t JOIN d ON t.oid = d.base)
                        SELECT d.oid FROM d WHERE d.base = 0)::int8 AS type,
                       a.atttypmod::int8 AS modifier,
                       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                               AND (i.indisreplident OR i.indisprimary) AND a.attnum = ANY (i.indkey)) AS key
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_attribute a ON a.attrelid = c.oid
                WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                  AND (a.attgenerated = '' OR $3)
                ORDER BY a.attnum
                """, schema, name, streamsGenerated)
            // The publication's column list and row filter (one row per listed column).
            var published: Set<[UInt8]>?  // names as bytes, as Postgres compares them
            var rowFilter: String?
            if let publication, listsColumns {
                let entries = try await connection.query("""
                    SELECT p.rowfilter, x.name::text
                    FROM pg_publication_tables p LEFT JOIN LATERAL unnest(p.attnames) x(name) ON true
                    WHERE p.pubname = $1 AND p.schemaname = $2 AND p.tablename = $3
                    """, publication, schema, name)
                if !entries.isEmpty {
                    rowFilter = try entries[0].decode(String.self, at: 0)
                    published = Set(try entries.compactMap { try $0.decode(String.self, at: 1).map { Array($0.utf8) } })
                }
            }
            var columns: [RelationColumn] = []
            for row in rows {
                columns.append(RelationColumn(
                    name: try row.decode(String.self, named: "name") ?? "",
                    typeOID: UInt32(truncatingIfNeeded: try row.decode(Int.self, named: "type") ?? 0),
                    typeModifier: Int32(truncatingIfNeeded: try row.decode(Int.self, named: "modifier") ?? -1),
                    isKey: try row.decode(Bool.self, named: "key") ?? false))
            }
            if let published { columns.removeAll { !published.contains(Array($0.name.utf8)) } }
            if !columns.isEmpty { catalog.set("\(schema).\(name)", columns: columns, rowFilter: rowFilter) }
        }
        return catalog
    }
}
