import PoolKit

/// Version of the swift-realtime-sync toolkit.
public enum RealtimeSyncVersion {
    /// The release string printed by `realtime-sync --version`.
    public static let current = "0.1.0"
}

/// What `realtime-sync check` reports about a database.
public struct DatabaseCheck: Sendable, CustomStringConvertible {
    /// The server version, e.g. `15.18`.
    public var serverVersion: String
    /// The server's `wal_level` (`replica`, `logical`, ...).
    public var walLevel: String
    /// Where the connection went.
    public var host: String
    /// The port it went to.
    public var port: String

    /// Creates a report (normally made by `run(url:connectTimeout:)`).
    public init(serverVersion: String, walLevel: String, host: String, port: String) {
        self.serverVersion = serverVersion
        self.walLevel = walLevel
        self.host = host
        self.port = port
    }

    /// True when `wal_level` is `logical`, which change capture needs.
    public var isReadyForLogicalReplication: Bool { walLevel == "logical" }

    /// A few lines for a terminal.
    public var description: String {
        var lines = [
            "connected to \(host):\(port)",
            "server_version: \(serverVersion)",
            "wal_level: \(walLevel)",
        ]
        if !isReadyForLogicalReplication {
            lines.append("not ready: change capture needs wal_level=logical (set it in postgresql.conf or with ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)")
        }
        return lines.joined(separator: "\n")
    }

    /// Connects, reads the version and `wal_level`, and closes.
    public static func run(url: String, connectTimeout: Duration = .seconds(10)) async throws -> DatabaseCheck {
        let conn = try await PostgresConnection.connect(to: url, connectTimeout: connectTimeout)
        do {
            let rows = try await conn.query("SELECT current_setting('server_version'), current_setting('wal_level')")
            let check = DatabaseCheck(
                serverVersion: try rows[0].decode(String.self, at: 0) ?? conn.serverVersion,
                walLevel: try rows[0].decode(String.self, at: 1) ?? "unknown",
                host: conn.host, port: conn.port)
            await conn.close()
            return check
        } catch {
            await conn.close()
            throw error
        }
    }
}
