import Logging
import PoolKit

/// The database is not ready for change capture; the message names the setting, role or
/// table and the fix.
public struct CaptureSetupError: Error, Sendable, CustomStringConvertible {
    /// Stable error codes.
    public enum Code: String, Sendable, Hashable {
        /// `wal_level` is not `logical`.
        case walLevelNotLogical = "wal_level_not_logical"
        /// The role may not replicate (no REPLICATION attribute, not superuser).
        case missingReplicationPrivilege = "missing_replication_privilege"
        /// A configured table does not exist.
        case tableNotFound = "table_not_found"
        /// A table has no primary key and no usable replica identity.
        case missingReplicaIdentity = "missing_replica_identity"
        /// The publication does not exist and no tables were configured to create it.
        case publicationMissing = "publication_missing"
        /// The existing publication lacks configured tables.
        case publicationMissingTables = "publication_missing_tables"
        /// A partitioned table is in a publication that publishes its partitions one by one
        /// (`publish_via_partition_root` off), so its changes would carry the partitions' names.
        case partitionsPublishedSeparately = "partitions_published_separately"
    }

    /// Stable code.
    public var code: Code
    /// What is wrong and how to fix it.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}

/// What `CaptureSetup.prepare` found.
public struct CaptureSetupReport: Sendable {
    /// The tables the publication covers (`schema.table`), sorted.
    public var tables: [String]
    /// Whether the publication was created by this call.
    public var createdPublication: Bool
    /// `max_slot_wal_keep_size` in MB; -1 means unlimited (a stalled slot can fill the disk).
    public var maxSlotWALKeepSizeMB: Int
    /// Warnings worth logging (e.g. unlimited WAL retention).
    public var warnings: [String]
}

/// Publication management and the checks that must pass before capture starts, on a
/// normal (non-replication) connection.
public enum CaptureSetup {
    /// The tables `publication` covers now, as `schema.table`, in order (`pg_publication_tables`).
    public static func publishedTables(_ conn: PostgresConnection, publication: String) async throws -> [String] {
        let published = try await conn.query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2", publication)
        return try published.map { "\(try $0.decode(String.self, at: 0) ?? "").\(try $0.decode(String.self, at: 1) ?? "")" }
    }

    /// Checks `wal_level`, the REPLICATION privilege and each table's replica identity, and
    /// creates the publication for `tables` when it does not exist (or checks that the existing
    /// one covers them). With `tables` empty the publication must exist; its tables are checked.
    public static func prepare(_ conn: PostgresConnection, publication: String, tables: [String],
                               createPublication: Bool = true, logger: Logger? = nil) async throws -> CaptureSetupReport {
        let settings = try await conn.query("""
            SELECT current_setting('wal_level'),
                   (SELECT setting FROM pg_settings WHERE name = 'max_slot_wal_keep_size'),
                   r.rolreplication OR r.rolsuper, current_user::text
            FROM pg_roles r WHERE r.rolname = current_user
            """)
        guard settings.count == 1 else {
            throw PostgresError(code: .invalidUsage, message: "could not read the current role from pg_roles")
        }
        let walLevel = try settings[0].decode(String.self, at: 0) ?? "?"
        guard walLevel == "logical" else {
            throw CaptureSetupError(.walLevelNotLogical,
                "wal_level is '\(walLevel)' on \(conn.host):\(conn.port), but change capture needs wal_level=logical: run ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf) and restart PostgreSQL")
        }
        // pg_settings gives the number in the setting's unit, MB (current_setting() shows
        // '10GB', whose digits are not megabytes).
        let keepSetting = try settings[0].decode(String.self, at: 1)  // nil before PostgreSQL 13
        let keepMB = keepSetting.flatMap { Int($0) } ?? -1
        let role = try settings[0].decode(String.self, at: 3) ?? "?"
        guard try settings[0].decode(Bool.self, at: 2) == true else {
            throw CaptureSetupError(.missingReplicationPrivilege,
                "role '\(role)' lacks the REPLICATION privilege needed for a logical replication slot: run ALTER ROLE \(try displayIdentifier(role, conn)) REPLICATION (as a superuser), or connect as a role that has it")
        }
        var warnings: [String] = []
        if keepSetting != nil, keepMB == -1 {
            warnings.append("max_slot_wal_keep_size is -1 (unlimited) on \(conn.host):\(conn.port): if this capture stops for long, its replication slot keeps WAL until the disk fills; set max_slot_wal_keep_size (e.g. ALTER SYSTEM SET max_slot_wal_keep_size = '10GB') or drop the slot when capture is retired")
        }

        let wanted = try tables.map(parseTableName)
        for (schema, table) in wanted { try await checkReplicaIdentity(conn, schema: schema, table: table) }

        var created = false
        let existing = try await conn.query("SELECT puballtables FROM pg_publication WHERE pubname = $1", publication)
        var covered: Set<String> = []
        if existing.count == 0 {
            guard !wanted.isEmpty, createPublication else {
                throw CaptureSetupError(.publicationMissing,
                    "publication '\(publication)' does not exist: configure the tables to capture (they will be published) or run CREATE PUBLICATION \(try displayIdentifier(publication, conn)) FOR TABLE …")
            }
            let list = try wanted.map { "\(try conn.escapeIdentifier($0.0)).\(try conn.escapeIdentifier($0.1))" }.joined(separator: ", ")
            do {
                // Changes of a partitioned table's partitions are published under the table's
                // own name (PostgreSQL 13 and later), which is what clients subscribe to.
                let viaRoot = conn.serverVersionNumber >= 130_000 ? " WITH (publish_via_partition_root = true)" : ""
                try await conn.execute("CREATE PUBLICATION \(try conn.escapeIdentifier(publication)) FOR TABLE \(list)\(viaRoot)")
                created = true
            } catch let error as PostgresError where error.sqlState == "42710" {
                // Created concurrently by another instance: use it.
            }
        }
        covered.formUnion(try await publishedTables(conn, publication: publication))
        let missing = wanted.map { "\($0.0).\($0.1)" }.filter { !covered.contains($0) }
        if !missing.isEmpty {
            // A partitioned table in a publication without publish_via_partition_root shows up
            // as its partitions: ADD TABLE would not help, the option would.
            var partitionedTable: String?
            for name in missing where partitionedTable == nil {
                let (schema, table) = try parseTableName(name)
                // Any partition, at any depth (pg_partition_tree, PostgreSQL 12+), published.
                let rows = try await conn.query("""
                    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE c.relkind = 'p' AND n.nspname = $1 AND c.relname = $2
                      AND EXISTS (SELECT 1 FROM pg_partition_tree(c.oid) t
                                  JOIN pg_class pc ON pc.oid = t.relid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                                  JOIN pg_publication_tables p ON p.schemaname = pn.nspname AND p.tablename = pc.relname
                                  WHERE p.pubname = $3 AND t.relid <> c.oid)
                    """, schema, table, publication)
                if rows.count > 0 { partitionedTable = name }
            }
            if let table = partitionedTable {
                throw CaptureSetupError(.partitionsPublishedSeparately,
                    "publication '\(publication)' publishes the partitions of \(table) one by one, so their changes would not carry the name \(table): run ALTER PUBLICATION \(try displayIdentifier(publication, conn)) SET (publish_via_partition_root = true)")
            }
            throw CaptureSetupError(.publicationMissingTables,
                "publication '\(publication)' does not include \(missing.joined(separator: ", ")): run ALTER PUBLICATION \(try displayIdentifier(publication, conn)) ADD TABLE \(missing.joined(separator: ", ")), or configure a different publication")
        }
        if wanted.isEmpty {
            for name in covered.sorted() {
                let (schema, table) = try parseTableName(name)
                try await checkReplicaIdentity(conn, schema: schema, table: table)
            }
        }
        for warning in warnings { logger?.warning("\(warning)") }
        return CaptureSetupReport(tables: covered.sorted(), createdPublication: created, maxSlotWALKeepSizeMB: keepMB, warnings: warnings)
    }

    /// Throws `missingReplicaIdentity` when UPDATE/DELETE on the table could not be captured.
    static func checkReplicaIdentity(_ conn: PostgresConnection, schema: String, table: String) async throws {
        let rows = try await conn.query("""
            SELECT c.relreplident::text,
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
            """, schema, table)
        let name = "\(try displayIdentifier(schema, conn)).\(try displayIdentifier(table, conn))"
        guard rows.count == 1 else {
            throw CaptureSetupError(.tableNotFound, "table \(name) does not exist (configured for capture): create it or remove it from the configured tables")
        }
        let identity = try rows[0].decode(String.self, at: 0) ?? "d"
        let hasPK = try rows[0].decode(Bool.self, at: 1) ?? false
        let hasIndex = try rows[0].decode(Bool.self, at: 2) ?? false
        let ok: Bool = switch identity {
        case "f": true
        case "i": hasIndex
        case "n": false
        default: hasPK
        }
        guard ok else {
            let what = identity == "n" ? "has REPLICA IDENTITY NOTHING" : "has no primary key (replica identity default)"
            throw CaptureSetupError(.missingReplicaIdentity,
                "table \(name) \(what), so its UPDATEs and DELETEs cannot be captured: add a primary key or run ALTER TABLE \(name) REPLICA IDENTITY FULL")
        }
    }

    /// An identifier as a user would type it: bare when it needs no quotes, else quoted.
    static func displayIdentifier(_ name: String, _ conn: PostgresConnection) throws -> String {
        let plain = name.utf8.first.map { ($0 >= 97 && $0 <= 122) || $0 == 95 } == true
            && name.utf8.allSatisfy { ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 95 }
        return plain ? name : try conn.escapeIdentifier(name)
    }

    /// `schema.table` or `table` (schema `public`); quotes are not interpreted.
    static func parseTableName(_ name: String) throws -> (String, String) {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        switch parts.count {
        case 1 where !parts[0].isEmpty: return ("public", String(parts[0]))
        case 2 where !parts[0].isEmpty && !parts[1].isEmpty: return (String(parts[0]), String(parts[1]))
        default:
            throw CaptureSetupError(.tableNotFound, "table name '\(name)' is not 'schema.table' or 'table'")
        }
    }

    /// The slot's confirmed position, or nil when the slot does not exist.
    public static func confirmedFlush(_ conn: PostgresConnection, slot: String) async throws -> LSN? {
        try await slotState(conn, slot: slot)?.confirmedFlush
    }

    /// The slot's confirmed position, and whether it was invalidated (`wal_status = 'lost'`:
    /// the WAL it held was removed, e.g. past `max_slot_wal_keep_size`; such a slot cannot be
    /// read from again); nil when the slot does not exist.
    public static func slotState(_ conn: PostgresConnection, slot: String) async throws -> (confirmedFlush: LSN?, lost: Bool)? {
        try await slotInfo(conn, slot: slot).map { ($0.confirmedFlush, $0.lost) }
    }

    /// What `pg_replication_slots` says of a slot.
    struct SlotInfo: Sendable {
        var confirmedFlush: LSN?
        var lost: Bool
        /// `logical` or `physical`.
        var type: String
        /// The output plugin (logical slots).
        var plugin: String?
        /// The database the slot was made in (logical slots).
        var database: String?
        /// The database `conn` is connected to.
        var currentDatabase: String

        /// Why a change stream cannot read from this slot, nil if it can: a slot of the same
        /// name made for something else (a physical slot, another plugin, another database)
        /// fails `START_REPLICATION` with an error that names neither the slot nor the setting.
        func problem(slot: String) -> String? {
            let choose = "choose another slot name (ChangeStream.Configuration.slotName, --slot / REALTIME_SYNC_SLOT), or drop that slot if nothing uses it"
            if type != "logical" {
                return "replication slot \(slot) exists as a \(type) slot; the change stream needs a logical slot with the pgoutput plugin: \(choose)"
            }
            if let plugin, plugin != "pgoutput" {
                return "replication slot \(slot) exists with the output plugin \(plugin); the change stream needs pgoutput: \(choose)"
            }
            if let database, database != currentDatabase {
                return "replication slot \(slot) belongs to the database \(database), not to \(currentDatabase) (a logical slot reads one database): \(choose)"
            }
            return nil
        }
    }

    /// The slot's row of `pg_replication_slots`, nil when there is no such slot.
    static func slotInfo(_ conn: PostgresConnection, slot: String) async throws -> SlotInfo? {
        let rows = try await conn.query(
            "SELECT confirmed_flush_lsn::text, wal_status = 'lost', slot_type, plugin::text, database::text, current_database()::text FROM pg_replication_slots WHERE slot_name = $1", slot)
        guard rows.count == 1 else { return nil }
        let row = rows[0]
        return SlotInfo(
            confirmedFlush: try row.decode(String.self, at: 0).flatMap(LSN.init), lost: try row.decode(Bool.self, at: 1) ?? false,
            type: try row.decode(String.self, at: 2) ?? "unknown", plugin: try row.decode(String.self, at: 3),
            database: try row.decode(String.self, at: 4), currentDatabase: try row.decode(String.self, at: 5) ?? "")
    }

    /// Bytes of WAL the slot holds (`pg_current_wal_lsn() - confirmed_flush_lsn`), nil when the
    /// slot does not exist.
    public static func slotLagBytes(_ conn: PostgresConnection, slot: String) async throws -> Int? {
        let rows = try await conn.query(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1", slot)
        guard rows.count == 1 else { return nil }
        return try rows[0].decode(Int.self, at: 0)
    }
}
