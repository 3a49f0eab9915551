import ArgumentParser
import Foundation
import Logging
import PoolKit
import RealtimeSync

/// The `realtime-sync` command: argument parsing and wiring only; the work lives in the library.
@main
struct RealtimeSyncCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "realtime-sync",
        abstract: "Stream PostgreSQL row changes to WebSocket clients.",
        version: RealtimeSyncVersion.current,
        subcommands: [Serve.self, Check.self, Slot.self, Token.self],
        defaultSubcommand: Serve.self
    )

    /// The entry point: SIGPIPE ignored first, so that a closed stdout or stderr pipe (a log
    /// shipper that exited) fails only the write, also before the first socket exists (NIO
    /// ignores SIGPIPE only from then on); then the parser's own `main`.
    static func main() async {
        signal(SIGPIPE, SIG_IGN)
        await main(nil)
    }
}

/// Reads a setting from its flag, else its environment variable, else the default; an
/// unparsable environment value is an error naming the variable, and so is a flag or a
/// variable that is set but empty (a deployment value that did not arrive must not quietly
/// mean the default: an empty REALTIME_SYNC_HOST bound to loopback, an empty
/// REALTIME_SYNC_TABLES streamed every table of the publication).
struct Setting {
    static let environment = ProcessInfo.processInfo.environment

    /// The text of `--name` or `variable`, else `fallback`.
    static func string(_ flag: String?, _ name: String, _ variable: String, _ fallback: String? = nil) throws -> String? {
        if let flag {
            guard !flag.isEmpty else { throw ValidationError("--\(name) is empty: give a value, or leave it out for the default\(shown(fallback))") }
            return flag
        }
        return try environmentValue(variable, fallback)
    }

    /// `variable`'s value if it is set; set but empty is an error naming it.
    static func environmentValue(_ variable: String, _ fallback: String? = nil) throws -> String? {
        guard let value = environment[variable] else { return fallback }
        guard !value.isEmpty else { throw ValidationError("\(variable) is set but empty: set it, or unset it for the default\(shown(fallback))") }
        return value
    }

    private static func shown(_ fallback: String?) -> String { fallback.map { " (\($0))" } ?? "" }

    /// The database URL: `--database-url`, else `REALTIME_SYNC_DATABASE_URL`, else
    /// `DATABASE_URL` (the more specific variable wins); nil when none is set. A flag or
    /// variable that is set but empty is an error: a deployment whose secret did not arrive
    /// must not quietly run against something else (`serve` would start the embedded demo).
    static func databaseURL(_ flag: String?) throws -> String? {
        if let flag {
            guard !flag.isEmpty else { throw ValidationError("--database-url is empty") }
            return flag
        }
        for variable in ["REALTIME_SYNC_DATABASE_URL", "DATABASE_URL"] {
            if let value = environment[variable] {
                guard !value.isEmpty else {
                    throw ValidationError("\(variable) is set but empty: set it to a postgres:// URL, or unset it\(variable == "DATABASE_URL" ? "" : " (DATABASE_URL is read when it is unset)")")
                }
                return value
            }
        }
        return nil
    }

    /// A name (a slot, a publication) from `--flag` or `variable`, else `fallback`. Set but
    /// empty is an error naming both: an empty slot name from a missing deployment value must
    /// not quietly mean the default slot (or fail only once the database is connected).
    static func name(_ flag: String?, _ name: String, _ variable: String, _ fallback: String) throws -> String {
        if let flag {
            guard !flag.isEmpty else { throw ValidationError("--\(name) is empty; leave it out for the default (\(fallback))") }
            return flag
        }
        if let value = environment[variable] {
            guard !value.isEmpty else { throw ValidationError("\(variable) is set but empty: set it, or unset it for the default (\(fallback))") }
            return value
        }
        return fallback
    }

    /// A whole number of at least `minimum`, from `--flag` or `variable`; the error names both.
    static func int(_ flag: Int?, _ name: String, _ variable: String, _ fallback: Int, minimum: Int) throws -> Int {
        let number: Int
        if let flag {
            number = flag
        } else if let value = try environmentValue(variable) {
            guard let parsed = Int(value) else { throw ValidationError("\(variable)=\(value) is not a whole number") }
            number = parsed
        } else {
            return fallback
        }
        guard number >= minimum else { throw ValidationError("--\(name) / \(variable) is \(number); it must be \(minimum) or more") }
        return number
    }

    /// A positive number of seconds from `--flag` or `variable`; the error names both.
    static func seconds(_ flag: Double?, _ name: String, _ variable: String, _ fallback: Double) throws -> Duration {
        let value: Double
        if let flag {
            value = flag
        } else if let text = try environmentValue(variable) {
            guard let number = Double(text) else { throw ValidationError("\(variable)=\(text) is not a number of seconds") }
            value = number
        } else {
            value = fallback
        }
        // At least 1 ms: the value is rounded to whole milliseconds, and 0.0004 passed as
        // positive and became zero.
        guard value.isFinite, value < 1e9, value >= 0.001 else {
            throw ValidationError("--\(name) / \(variable) is \(value); it must be a number of seconds from 0.001 (1 ms) to below 1e9")
        }
        return .milliseconds(Int64((value * 1000).rounded()))
    }
}

/// `realtime-sync serve` (the default): stream a database's changes to WebSocket clients;
/// with no database, an embedded PostgreSQL with a demo table written every second.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the change stream over WebSocket (the default command).",
        discussion: """
            Every option can also be set by an environment variable (the option wins):
              --database-url          REALTIME_SYNC_DATABASE_URL, else DATABASE_URL (none: embedded PostgreSQL + demo)
              --host                  REALTIME_SYNC_HOST              (127.0.0.1)
              --port                  REALTIME_SYNC_PORT              (8080; 0 picks a free port)
              --listen-backlog        REALTIME_SYNC_LISTEN_BACKLOG    (4096; capped by net.core.somaxconn)
              --max-connections       REALTIME_SYNC_MAX_CONNECTIONS   (the open-file limit less an eighth; more get 503)
              --tables                REALTIME_SYNC_TABLES            (comma-separated schema.table)
              --publication           REALTIME_SYNC_PUBLICATION       (realtime_sync)
              --slot                  REALTIME_SYNC_SLOT              (realtime_sync)
              --log-level             REALTIME_SYNC_LOG_LEVEL         (info)
              --log-format            REALTIME_SYNC_LOG_FORMAT        (text; or json)
              --pool-max-open         REALTIME_SYNC_POOL_MAX_OPEN     (4)
              --pool-acquire-timeout  REALTIME_SYNC_POOL_ACQUIRE_TIMEOUT (30 s)
              --window-max-age        REALTIME_SYNC_WINDOW_MAX_AGE    (300 s)
              --window-max-count      REALTIME_SYNC_WINDOW_MAX_COUNT  (100000)
              --window-max-bytes      REALTIME_SYNC_WINDOW_MAX_BYTES  (268435456 = 256 MiB)
              --heartbeat-interval    REALTIME_SYNC_HEARTBEAT_INTERVAL (10 s)
              --shutdown-deadline     REALTIME_SYNC_SHUTDOWN_DEADLINE (10 s, the whole ordered shutdown)
              --start-timeout         REALTIME_SYNC_START_TIMEOUT     (30 s for the change stream to open)
              --jwt-secret            REALTIME_SYNC_JWT_SECRET        (none: auth off, with a warning)
              --snapshot-max-rows     REALTIME_SYNC_SNAPSHOT_MAX_ROWS (10000 rows per snapshot; more: snapshot_too_large; 0: only snapshots with no rows after the filter)
              --snapshot-chunk-rows   REALTIME_SYNC_SNAPSHOT_CHUNK_ROWS (500 rows per snapshot message)
              --max-concurrent-snapshots REALTIME_SYNC_MAX_CONCURRENT_SNAPSHOTS (4, or --pool-max-open - 1 if less: 3 by default; more wait their turn)
              --max-transaction-changes REALTIME_SYNC_MAX_TRANSACTION_CHANGES (1000000 changes held until a transaction commits)
              --max-transaction-bytes REALTIME_SYNC_MAX_TRANSACTION_BYTES (268435456 = 256 MiB held until a transaction commits)
              --allowed-origins       REALTIME_SYNC_ALLOWED_ORIGINS   (browser origins that may open /ws, comma-separated, or *; none: with auth off the server's own by IP or localhost only, with auth on any)
            """)

    @Option(help: "postgres:// URL or libpq string; none starts an embedded PostgreSQL with a demo table.")
    var databaseURL: String?
    @Option(help: "Address to listen on.") var host: String?
    @Option(help: "Port to listen on.") var port: Int?
    @Option(help: "Connections queued before accept (listen backlog, capped by net.core.somaxconn).") var listenBacklog: Int?
    @Option(help: "Most client connections open at once; more get 503 (default: the open-file limit less an eighth).") var maxConnections: Int?
    @Option(help: "Tables to stream, comma-separated (schema.table).") var tables: String?
    @Option(help: "Publication name (created for --tables when missing).") var publication: String?
    @Option(help: "Replication slot name (created when missing).") var slot: String?
    @Option(help: "trace, debug, info, notice, warning, error or critical.") var logLevel: String?
    @Option(help: "json or text.") var logFormat: String?
    @Option(help: "Most pooled connections.") var poolMaxOpen: Int?
    @Option(help: "Seconds a snapshot or a service job waits for a pooled connection.") var poolAcquireTimeout: Double?
    @Option(help: "Seconds of changes kept for resume.") var windowMaxAge: Double?
    @Option(help: "Changes kept for resume.") var windowMaxCount: Int?
    @Option(help: "Bytes of changes kept for resume (row values plus 128 per change).") var windowMaxBytes: Int?
    @Option(help: "Seconds between heartbeats (pg_logical_emit_message).") var heartbeatInterval: Double?
    @Option(help: "Seconds the whole ordered shutdown may take.") var shutdownDeadline: Double?
    @Option(help: "Seconds the start may wait for the change stream to open (e.g. for a slot another process still holds).") var startTimeout: Double?
    @Option(help: "HS256 secret (at least 32 bytes) for JWT auth on /ws; none: auth off.") var jwtSecret: String?
    @Option(help: "Most rows a snapshot may send (more: snapshot_too_large).") var snapshotMaxRows: Int?
    @Option(help: "Most rows in one snapshot message.") var snapshotChunkRows: Int?
    @Option(help: "Snapshots running at once (each holds a pooled connection); at most --pool-max-open - 1.") var maxConcurrentSnapshots: Int?
    @Option(help: "Most changes in one transaction (held in memory until it commits); more stop the capture with a clear error.") var maxTransactionChanges: Int?
    @Option(help: "Most bytes one transaction may hold until it commits (row values plus 128 per change); more stop the capture with a clear error.") var maxTransactionBytes: Int?
    @Option(help: "Browser origins allowed to open /ws (comma-separated scheme://host[:port], or *).") var allowedOrigins: String?

    func run() async throws {
        // A setting the library refuses is a usage error too (exit 64, as for the parser's
        // own), not a runtime failure (exit 1): an orchestrator can tell the two apart.
        do {
            try await serve()
        } catch let error as RealtimeServiceError where error.code == .invalidSetting {
            throw ValidationError("\(error)")
        } catch let error as RealtimeServerError where error.code == .invalidConfiguration {
            throw ValidationError("\(error)")
        }
    }

    /// Raises the soft `RLIMIT_NOFILE` to the hard limit; the two limits when it changed.
    static func raiseOpenFileLimit() -> (from: UInt, to: UInt)? {
        var limit = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0, limit.rlim_cur < limit.rlim_max else { return nil }
        let from = limit.rlim_cur
        limit.rlim_cur = limit.rlim_max
        guard setrlimit(resource, &limit) == 0 else { return nil }
        return (UInt(from), UInt(limit.rlim_max))
    }

    private func serve() async throws {
        let registry = try RealtimeService.bootstrapObservability(
            logFormat: try Setting.string(logFormat, "log-format", "REALTIME_SYNC_LOG_FORMAT", "text")!,
            logLevel: try Setting.string(logLevel, "log-level", "REALTIME_SYNC_LOG_LEVEL", "info")!)

        // Sockets are files: the soft open-file limit (often 1,024) goes up to the hard one, as
        // Go's runtime does, so that clients are limited by --max-connections and the machine,
        // not by a default meant for old programs' select(2).
        if let (from, to) = Self.raiseOpenFileLimit() {
            Logger(label: "realtime-sync").info("open-file limit raised from \(from) to \(to) (the hard limit; ulimit -Hn)")
        }
        let url = try Setting.databaseURL(databaseURL)
        var configuration = url == nil ? RealtimeService.embeddedDemo() : RealtimeService.Configuration(databaseURL: url)
        if let list = try Setting.string(tables, "tables", "REALTIME_SYNC_TABLES") {
            configuration.tables = list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            guard !configuration.tables.isEmpty else {
                throw ValidationError("--tables / REALTIME_SYNC_TABLES lists no table ('\(list)'); name them (schema.table, comma-separated), or leave it out for the publication's tables")
            }
        }
        configuration.publication = try Setting.name(publication, "publication", "REALTIME_SYNC_PUBLICATION", "realtime_sync")
        configuration.slot = try Setting.name(slot, "slot", "REALTIME_SYNC_SLOT", "realtime_sync")
        configuration.server.host = try Setting.string(host, "host", "REALTIME_SYNC_HOST", "127.0.0.1")!
        configuration.server.port = try Setting.int(port, "port", "REALTIME_SYNC_PORT", 8080, minimum: 0)
        guard (0...65535).contains(configuration.server.port) else {
            throw ValidationError("--port / REALTIME_SYNC_PORT: \(configuration.server.port) is not a port (0-65535)")
        }
        configuration.server.listenBacklog = try Setting.int(listenBacklog, "listen-backlog", "REALTIME_SYNC_LISTEN_BACKLOG", 4_096, minimum: 1)
        guard (1...65_535).contains(configuration.server.listenBacklog) else {
            throw ValidationError("--listen-backlog / REALTIME_SYNC_LISTEN_BACKLOG: \(configuration.server.listenBacklog) is not from 1 to 65535 (the kernel caps it at net.core.somaxconn anyway)")
        }
        if maxConnections != nil || Setting.environment["REALTIME_SYNC_MAX_CONNECTIONS"] != nil {
            configuration.server.maxConnections = try Setting.int(maxConnections, "max-connections", "REALTIME_SYNC_MAX_CONNECTIONS", 0, minimum: 1)
        }
        configuration.server.metricsRegistry = registry
        configuration.pool.maxOpen = try Setting.int(poolMaxOpen, "pool-max-open", "REALTIME_SYNC_POOL_MAX_OPEN", 4, minimum: 2)
        configuration.pool.maxIdle = configuration.pool.maxOpen
        configuration.pool.acquireTimeout = try Setting.seconds(poolAcquireTimeout, "pool-acquire-timeout", "REALTIME_SYNC_POOL_ACQUIRE_TIMEOUT", 30)
        configuration.window.maxAge = try Setting.seconds(windowMaxAge, "window-max-age", "REALTIME_SYNC_WINDOW_MAX_AGE", 300)
        configuration.window.maxCount = try Setting.int(windowMaxCount, "window-max-count", "REALTIME_SYNC_WINDOW_MAX_COUNT", 100_000, minimum: 1)
        configuration.window.maxBytes = try Setting.int(windowMaxBytes, "window-max-bytes", "REALTIME_SYNC_WINDOW_MAX_BYTES", 256 << 20, minimum: 1)
        configuration.heartbeatInterval = try Setting.seconds(heartbeatInterval, "heartbeat-interval", "REALTIME_SYNC_HEARTBEAT_INTERVAL", 10)
        configuration.setShutdownDeadline(try Setting.seconds(shutdownDeadline, "shutdown-deadline", "REALTIME_SYNC_SHUTDOWN_DEADLINE", 10))
        configuration.startTimeout = try Setting.seconds(startTimeout, "start-timeout", "REALTIME_SYNC_START_TIMEOUT", 30)
        configuration.server.snapshotMaxRows = try Setting.int(snapshotMaxRows, "snapshot-max-rows", "REALTIME_SYNC_SNAPSHOT_MAX_ROWS", 10_000, minimum: 0)
        configuration.server.snapshotChunkRows = try Setting.int(snapshotChunkRows, "snapshot-chunk-rows", "REALTIME_SYNC_SNAPSHOT_CHUNK_ROWS", 500, minimum: 1)
        if allowedOrigins == nil, Setting.environment["REALTIME_SYNC_ALLOWED_ORIGINS"] == "" {
            // Set but empty (a missing deployment value) must not mean "the default": with auth
            // on that is any origin.
            throw ValidationError("REALTIME_SYNC_ALLOWED_ORIGINS is set but empty: list origins (scheme://host[:port], or *), or unset it for the default")
        }
        if let origins = try Setting.string(allowedOrigins, "allowed-origins", "REALTIME_SYNC_ALLOWED_ORIGINS") {
            let list = origins.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            guard !list.isEmpty else {
                throw ValidationError("--allowed-origins / REALTIME_SYNC_ALLOWED_ORIGINS is empty; leave it out for the default, or list origins (scheme://host[:port], or *)")
            }
            configuration.server.allowedOrigins = list
        }
        // Its upper bound is RealtimeService's check, which names the flag too.
        configuration.maxTransactionChanges = try Setting.int(
            maxTransactionChanges, "max-transaction-changes", "REALTIME_SYNC_MAX_TRANSACTION_CHANGES", 1_000_000, minimum: 1)
        configuration.maxTransactionBytes = try Setting.int(
            maxTransactionBytes, "max-transaction-bytes", "REALTIME_SYNC_MAX_TRANSACTION_BYTES", 256 << 20, minimum: 1)
        // Unset: 4, or fewer if the pool is smaller (one connection stays for the service's jobs).
        let snapshotsAsked = try Setting.int(maxConcurrentSnapshots, "max-concurrent-snapshots", "REALTIME_SYNC_MAX_CONCURRENT_SNAPSHOTS", 0, minimum: 1)
        if snapshotsAsked > 0 {
            guard snapshotsAsked <= configuration.pool.maxOpen - 1 else {
                throw ValidationError("--max-concurrent-snapshots / REALTIME_SYNC_MAX_CONCURRENT_SNAPSHOTS is \(snapshotsAsked); each snapshot holds a pooled connection and one stays for the service's jobs, so raise --pool-max-open to at least \(snapshotsAsked + 1) (it is \(configuration.pool.maxOpen))")
            }
            configuration.server.maxConcurrentSnapshots = snapshotsAsked
        }
        if jwtSecret == nil, let set = Setting.environment["REALTIME_SYNC_JWT_SECRET"], set.isEmpty {
            // An empty secret from a missing deployment secret must not turn auth off.
            throw ValidationError("REALTIME_SYNC_JWT_SECRET is set but empty: set the secret (32 bytes or more), or unset the variable to run without auth")
        }
        if let secret = try Setting.string(jwtSecret, "jwt-secret", "REALTIME_SYNC_JWT_SECRET") {
            do {
                configuration.server.auth = try await JWTAuthenticator(secret: secret)
            } catch {
                throw ValidationError("--jwt-secret / REALTIME_SYNC_JWT_SECRET: \(error)")
            }
        }

        let service = RealtimeService(configuration)
        try await service.runUntilSignalled { running in
            StandardStream.output.write("realtime-sync: live page at \(running.pageURL)  (WebSocket ws\(running.pageURL.dropFirst(4))ws; Ctrl-C to stop)\n")
        }
    }
}

/// `realtime-sync token`: print an HS256 JWT that `serve --jwt-secret` accepts (PROTOCOL.md "Auth").
struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a signed token (HS256 JWT) for a client.",
        discussion: """
            Example: realtime-sync token --secret "$REALTIME_SYNC_JWT_SECRET" \\
                       --table public.orders=tenant_id=eq.42 --table public.notes= --ttl 1h --sub user-7
            """)

    @Option(help: "The server's HS256 secret (or REALTIME_SYNC_JWT_SECRET).") var secret: String?
    @Option(name: .customLong("table"), help: "TABLE=FILTER the token grants (repeat it); an empty FILTER grants every row.")
    var tables: [String] = []
    @Option(help: "How long the token is valid: 90s, 15m, 1h (default), 7d.") var ttl: String?
    @Option(help: "The sub claim (who the token is for; logged by the server).") var sub: String?

    func run() async throws {
        guard let secret = try Setting.string(secret, "secret", "REALTIME_SYNC_JWT_SECRET") else {
            throw ValidationError("no secret given: pass --secret or set REALTIME_SYNC_JWT_SECRET")
        }
        let options: TokenOptions
        let authenticator: JWTAuthenticator
        do {
            options = try TokenOptions(tables: tables, ttl: ttl, subject: sub)
        } catch {
            throw ValidationError("\(error)")
        }
        do {
            authenticator = try await JWTAuthenticator(secret: secret)
        } catch {
            throw ValidationError("--secret / REALTIME_SYNC_JWT_SECRET: \(error)")
        }
        print(try await authenticator.sign(options.claims()))
    }
}

/// `realtime-sync slot …`: manage the replication slot.
struct Slot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage the replication slot.", subcommands: [Drop.self])

    /// `realtime-sync slot drop`: retire a capture's slot so it no longer holds WAL.
    struct Drop: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Drop a replication slot (stop the service using it first).")

        @Option(help: "The slot to drop (or REALTIME_SYNC_SLOT).") var slot: String?
        @Option(help: "postgres:// URL or libpq string (or REALTIME_SYNC_DATABASE_URL, else DATABASE_URL).") var databaseURL: String?

        func run() async throws {
            guard let url = try Setting.databaseURL(databaseURL) else {
                throw ValidationError("no database given: pass --database-url or set REALTIME_SYNC_DATABASE_URL or DATABASE_URL")
            }
            if slot?.isEmpty == true { throw ValidationError("--slot is empty: name the slot to drop") }
            guard let slot = try Setting.string(slot, "slot", "REALTIME_SYNC_SLOT") else {
                throw ValidationError("no slot given: pass --slot or set REALTIME_SYNC_SLOT")
            }
            if try await RealtimeService.dropSlot(slot, url: url) {
                print("dropped replication slot \(slot)")
            } else {
                print("no replication slot named \(slot)")
                throw ExitCode(3)
            }
        }
    }
}

/// `realtime-sync check`: can we reach the database, and is it set up for logical replication?
struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Connect to the database and print its version and wal_level.")

    @Option(name: .long, help: "postgres:// URL or libpq key=value string (default: $REALTIME_SYNC_DATABASE_URL, else $DATABASE_URL).")
    var databaseURL: String?

    @Option(name: .long, help: "Seconds to wait for the connection.")
    var connectTimeout: Double = 10

    func run() async throws {
        guard let url = try Setting.databaseURL(databaseURL) else {
            throw ValidationError("no database given: pass --database-url or set REALTIME_SYNC_DATABASE_URL or DATABASE_URL")
        }
        // At least 1 ms, as for serve's durations: the value is rounded to whole milliseconds.
        guard connectTimeout.isFinite, connectTimeout >= 0.001, connectTimeout < 1e9 else {
            throw ValidationError("--connect-timeout is \(connectTimeout); it must be a number of seconds from 0.001 (1 ms) to below 1e9")
        }
        do {
            let report = try await DatabaseCheck.run(url: url, connectTimeout: .milliseconds(Int64((connectTimeout * 1000).rounded())))
            print(report.description)
            if !report.isReadyForLogicalReplication {
                throw ExitCode(2)
            }
        } catch let error as PostgresError {
            StandardStream.error.write("realtime-sync check: \(error)\n")
            throw ExitCode(1)
        }
    }
}
