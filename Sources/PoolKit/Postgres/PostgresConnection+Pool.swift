import Logging

extension PostgresConnection: PoolableConnection {
    /// True when ``prepareForReuse()`` has work to do or an error to report: a transaction is
    /// open or failed, the holder ran `LISTEN`, a statement is still running, or the connection
    /// is closed or broken. One uncontended lock and a read of libpq's cached transaction
    /// status (no I/O), so the pool's return path skips the `async` reset when it is false.
    public var needsReset: Bool {
        configuration.resetQuery != nil || state.withLock { s in
            s.busy || s.hasListened || s.pg == nil || transactionStatusLocked(s) != .idle
        }
    }

    /// Makes a returned connection ready for the next holder: rolls back an open or failed
    /// transaction and, if the holder ran `LISTEN`, runs `UNLISTEN *` and drops queued
    /// notifications; then runs `Configuration.resetQuery` if one is set. Returns at once when
    /// there is nothing to clean. Throws (so the pool closes the connection instead) when it is
    /// broken or still running a statement. Without a `resetQuery`, session state is not reset:
    /// `SET`/`SET ROLE`, temporary tables, `PREPARE`d statements, `WITH HOLD` cursors and
    /// session advisory locks reach the next holder (use `SET LOCAL` inside transactions in
    /// pooled code, or set `resetQuery` to `"DISCARD ALL"`).
    public func prepareForReuse() async throws {
        let (status, listened, busy) = state.withLock { s -> (PostgresTransactionStatus, Bool, Bool) in
            (s.pg == nil ? .unknown : transactionStatusLocked(s), s.hasListened, s.busy)
        }
        if busy {
            throw PostgresError(code: .invalidUsage, message: "connection returned to the pool while a statement was still running")
        }
        switch status {
        case .idle: break
        case .inTransaction, .inFailedTransaction: try await execute("ROLLBACK")
        case .active, .unknown:
            throw PostgresError(code: .connectionBroken, message: "connection returned to the pool in state \(status)")
        }
        if listened { try await unlistenAll() }
        if let resetQuery = configuration.resetQuery { try await execute(resetQuery) }
    }
}

/// Makes a `ConnectionPool` of `PostgresConnection`s.
extension ConnectionPool where Connection == PostgresConnection, C == ContinuousClock {
    /// A pool of libpq connections to `connectionString` (a `postgres://` URL or `key=value`
    /// string). Each connect is bounded by `connectTimeout`; `resetQuery` (e.g. `"DISCARD ALL"`)
    /// runs on every returned connection (`PostgresConnection.Configuration.resetQuery`). Run the
    /// pool's `run()` (or add it to a ServiceGroup) for it to open and recycle connections.
    public convenience init(
        postgres connectionString: String,
        configuration: ConnectionPoolConfiguration = ConnectionPoolConfiguration(),
        connectTimeout: Duration = .seconds(10),
        resetQuery: String? = nil,
        logger: Logger = Logger(label: "PoolKit.ConnectionPool")
    ) {
        var configured = PostgresConnection.Configuration(connectionString, connectTimeout: connectTimeout, logger: logger)
        configured.resetQuery = resetQuery
        let connectionConfiguration = configured
        self.init(configuration: configuration, clock: ContinuousClock(), logger: logger) {
            try await PostgresConnection.connect(connectionConfiguration)
        }
    }
}
