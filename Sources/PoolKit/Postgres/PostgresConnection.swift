import CLibPQ
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// A notification delivered by `NOTIFY` on a channel this connection listens to.
public struct PostgresNotification: Sendable, Hashable {
    /// The channel name.
    public var channel: String
    /// The payload ("" when none was given).
    public var payload: String
    /// The backend PID of the session that sent it.
    public var senderPID: Int32
}

/// The transaction state of a connection, as libpq reports it.
public enum PostgresTransactionStatus: Sendable, Hashable {
    /// Idle, not in a transaction block.
    case idle
    /// A statement is running.
    case active
    /// Idle inside a transaction block.
    case inTransaction
    /// Idle inside a failed transaction block (only ROLLBACK will be accepted).
    case inFailedTransaction
    /// The connection is bad or closed.
    case unknown
}

/// One libpq connection to PostgreSQL, driven in non-blocking mode.
///
/// Every wait is for socket readiness on PoolKit's reactor threads (`epoll`), so a query never
/// blocks a Swift concurrency thread; the few libpq calls that can block (name resolution during
/// connect, `PQcancel`) run on a Dispatch thread. A connection runs one statement at a time; a
/// second concurrent call fails with `PostgresError.Code.invalidUsage` rather than corrupting the
/// protocol. Cancelling the calling Task during a statement sends a cancel request to the server
/// and throws `CancellationError` once the server cancelled it, and the connection stays usable;
/// a statement that completed before the cancel reached it keeps its outcome (its results, or
/// its own error), so that a COMMIT that committed does not look undone.
///
/// ```swift
/// let conn = try await PostgresConnection.connect(to: "postgres://app@localhost:5432/app")
/// let rows = try await conn.query("SELECT id, name FROM users WHERE id = $1", 42)
/// for row in rows { print(try row.decode(String.self, named: "name") ?? "NULL") }
/// await conn.close()   // idempotent; the owner closes
/// ```
public final class PostgresConnection: @unchecked Sendable {
    // @unchecked Sendable: this class wraps the libpq `PGconn` handle, which is not thread-safe.
    // Every libpq call on it is made while holding `state`'s lock, the handle is read only
    // through that lock, and it is freed exactly once by `close()` after being taken out of it.

    /// How to connect.
    public struct Configuration: Sendable {
        /// A `postgres://user:password@host:port/db?sslmode=...&application_name=...` URL
        /// (a unix-socket directory may be given as `host=/path` or a percent-encoded host) or a
        /// libpq `key=value` string.
        public var connectionString: String
        /// The longest a connect (TCP, TLS, authentication) may take. Default 10 s.
        public var connectTimeout: Duration
        /// Where server notices and connection events are logged.
        public var logger: Logger
        /// How long a statement busy-polls its socket for the answer before parking on the
        /// reactor (see `SpinPolicy`). Default 50 µs; `.zero` turns busy-polling off, which suits
        /// machines where the CPU is scarcer than latency matters.
        public var busyPoll: Duration
        /// When the Task running a statement is cancelled, the statement is cancelled on the
        /// server (`PQcancel`) and its answer awaited this long; if none comes (a partitioned
        /// network, a server that ignores the cancel), the connection is closed and the Task
        /// ends with `CancellationError` anyway. Default 5 s.
        public var cancelGracePeriod: Duration
        /// Notifications kept for `notifications` until read. Beyond this many, the oldest are
        /// dropped (logged, and counted in `droppedNotifications`): a connection that ran
        /// LISTEN but is never iterated must not grow without bound. Default 10,000.
        public var maxPendingNotifications: Int
        /// SQL a pool runs on every returned connection after its rollback and `UNLISTEN`, e.g.
        /// `"DISCARD ALL"` (PgBouncer's `server_reset_query`): it clears what a holder can leave
        /// behind that the default reset does not see (`SET` and `SET ROLE`, temporary tables,
        /// `PREPARE`d statements, `WITH HOLD` cursors, session advisory locks). A round trip
        /// per return. Default nil: no such query.
        public var resetQuery: String?

        /// Creates a configuration.
        public init(_ connectionString: String, connectTimeout: Duration = .seconds(10),
                    busyPoll: Duration = .microseconds(50), cancelGracePeriod: Duration = .seconds(5),
                    logger: Logger = Logger(label: "PoolKit.PostgresConnection")) {
            self.connectionString = connectionString
            self.connectTimeout = connectTimeout
            self.busyPoll = busyPoll
            self.cancelGracePeriod = cancelGracePeriod
            self.maxPendingNotifications = 10_000
            self.resetQuery = nil
            self.logger = logger
        }
    }

    // @unchecked Sendable: holds the libpq handle; it only ever lives inside `state`'s Mutex.
    struct State: @unchecked Sendable {
        var pg: OpaquePointer?
        /// The socket, claimed with the reactor when the connection was made.
        var socket: ReactorSocket
        var fd: Int32 { socket.fd }
        var busy = false
        var broken = false
        /// Counts statements, so that a late cancel watchdog cannot close a later one's connection.
        var statementSerial: UInt64 = 0
        /// Set by the cancel watchdog: the statement loop closes the connection itself (a close
        /// from the watchdog's task could free the fd while the loop is about to wait on it).
        var abandoned = false
        /// Set by `close()` while a statement runs: the statement loop closes the connection
        /// itself, for the same reason, and its statement fails with `connectionClosed`.
        var closeRequested = false
        /// The statement `cancelRunningQuery` last asked the server to cancel (0: none), so
        /// that `close()` right after it (a pool drain's cut-off) does not send another.
        var cancelSentFor: UInt64 = 0
        var notifications: [PostgresNotification] = []
        var notificationHead = 0
        var droppedNotifications = 0
        var listenerOnSocket = false
        var listenerActive = false
        var listenerParked: CheckedContinuation<Void, Never>?
        var spin = SpinPolicy()
        /// Set by `listen`; cleared by `unlistenAll`. Tells the pool a reset is needed.
        var hasListened = false
    }

    let state: Mutex<State>
    private let noticeSink: NoticeSink
    /// The configuration this connection was made with.
    public let configuration: Configuration
    /// The server's backend process ID for this session.
    public let backendPID: Int32
    /// The server's version, e.g. `15.18`.
    public let serverVersion: String
    /// The server's version as a number, e.g. `150018`.
    public let serverVersionNumber: Int
    /// The host this connection reached (a name, address or socket directory).
    public let host: String
    /// The port this connection reached.
    public let port: String

    fileprivate init(pg: OpaquePointer, socket: ReactorSocket, configuration: Configuration, noticeSink: NoticeSink) {
        self.configuration = configuration
        self.noticeSink = noticeSink
        self.backendPID = PQbackendPID(pg)
        self.serverVersionNumber = Int(PQserverVersion(pg))
        self.serverVersion = PQparameterStatus(pg, "server_version").map { String(cString: $0) } ?? "unknown"
        self.host = PQhost(pg).map { String(cString: $0) } ?? ""
        self.port = PQport(pg).map { String(cString: $0) } ?? ""
        var initial = State(pg: pg, socket: socket)
        let (secs, atto) = configuration.busyPoll.components
        initial.spin.maxBudget = max(0, Int(secs) * 1_000_000_000 + Int(atto / 1_000_000_000))
        self.state = Mutex(initial)
    }

    deinit {
        // The owner should call close(); this is the safety net so the PGconn is never leaked.
        let (pg, socket) = state.withLock { s in (s.pg, s.socket) }
        if let pg {
            SocketReactor.shared.release(socket)
            PQfinish(pg)
        }
    }

    /// The executor of PoolKit's reactor threads, which wait on every connection's socket.
    ///
    /// A task that prefers it (`withTaskExecutorPreference(PostgresConnection.preferredExecutor)`
    /// or `Task(executorPreference:)`) continues on a reactor thread as soon as its socket is
    /// ready: one thread wake-up per answer instead of two (reactor, then a cooperative thread).
    /// Use it for tasks that mostly wait on the database; keep CPU-heavy work off it, since
    /// while such a task runs, its reactor thread serves no other socket (as on any event loop).
    /// The number of reactor threads is 2 (1 on a single-core machine), or
    /// `POOLKIT_REACTOR_THREADS` (1-64) read at first use.
    public static var preferredExecutor: any TaskExecutor { SocketReactor.shared }

    // MARK: Connecting

    /// Connects with a URL or `key=value` string; see `Configuration`.
    public static func connect(to connectionString: String, connectTimeout: Duration = .seconds(10),
                               logger: Logger = Logger(label: "PoolKit.PostgresConnection")) async throws -> PostgresConnection {
        try await connect(Configuration(connectionString, connectTimeout: connectTimeout, logger: logger))
    }

    /// Connects without blocking a Swift concurrency thread (`PQconnectStartParams` +
    /// `PQconnectPoll`), bounded by `connectTimeout` and ended at once by Task cancellation.
    public static func connect(_ configuration: Configuration) async throws -> PostgresConnection {
        try await connect(configuration, extraKeywords: [])
    }

    /// Connects like `connect(_:)`, passing extra libpq keywords after the connection string
    /// (they override it), e.g. `replication=database` for a `ReplicationConnection`.
    static func connect(_ configuration: Configuration, extraKeywords: [(String, String)]) async throws -> PostgresConnection {
        try Task.checkCancellation()
        let starter = ConnectAttempt(configuration: configuration, extraKeywords: extraKeywords)
        return try await ConnectAttempt.firstOf(limit: configuration.connectTimeout, timeout: { starter.timeoutError() }) {
            try await starter.run()
        }
    }

    // MARK: State

    /// True once the connection is closed or known dead (terminated by the server, network
    /// failure). A broken connection must be discarded.
    ///
    /// On an idle connection this also reads what the socket holds (non-blocking `poll` and
    /// read, until it is empty, at most four rounds): a server that terminated the session has
    /// sent its last message and closed, so a pool never hands out a connection that is already
    /// known dead.
    public var isBroken: Bool {
        state.withLock { s in
            guard let pg = s.pg else { return true }
            if s.broken || PQstatus(pg) == CONNECTION_BAD { return true }
            if !s.busy && !s.listenerOnSocket {
                // Read whatever an idle connection has received, until the socket has nothing
                // more. A server that shuts down sends an error and then closes: the first read
                // takes the error (libpq keeps the connection OK), only a second one meets the
                // end of the stream. One read only had lent such a connection as good.
                var p = pollfd(fd: s.fd, events: Int16(POLLIN), revents: 0)
                var reads = 0
                while reads < 4, poll(&p, 1, 0) > 0 {
                    reads += 1
                    if PQconsumeInput(pg) == 0 || PQstatus(pg) == CONNECTION_BAD {
                        s.broken = true
                        return true
                    }
                    drainNotifications(pg, into: &s)
                    p.revents = 0
                }
            }
            return false
        }
    }

    /// True once `close()` has been called.
    public var isClosed: Bool { state.withLock { $0.pg == nil } }

    /// Notifications dropped unread because more than `maxPendingNotifications` were waiting.
    public var droppedNotifications: Int { state.withLock { $0.droppedNotifications } }

    /// The transaction state as of the last completed statement.
    public var transactionStatus: PostgresTransactionStatus {
        state.withLock { transactionStatusLocked($0) }
    }

    func transactionStatusLocked(_ s: State) -> PostgresTransactionStatus {
        guard let pg = s.pg else { return .unknown }
        if s.broken || PQstatus(pg) == CONNECTION_BAD { return .unknown }
        switch PQtransactionStatus(pg) {
        case PQTRANS_IDLE: return .idle
        case PQTRANS_ACTIVE: return .active
        case PQTRANS_INTRANS: return .inTransaction
        case PQTRANS_INERROR: return .inFailedTransaction
        default: return .unknown
        }
    }

    // MARK: Statements

    /// Runs one statement with `$1...$n` parameters (extended protocol, `PQsendQueryParams`);
    /// pass `nil` for SQL NULL. Parameters are always sent as data, never spliced into the SQL.
    @discardableResult
    nonisolated(nonsending)
    public func query(_ sql: String, _ parameters: (any PostgresBindable)?...) async throws -> PostgresQueryResult {
        try await query(sql, parameters: parameters)
    }

    /// Runs one statement with `$1...$n` parameters given as an array; `nil` is SQL NULL.
    @discardableResult
    nonisolated(nonsending)
    public func query(_ sql: String, parameters: [(any PostgresBindable)?]) async throws -> PostgresQueryResult {
        let params = parameters.map { $0?.postgresParameter }
        try Self.refuseNUL(sql, params)
        noteListen(sql)
        let results = try await run { pg in
            sendQueryParams(pg, sql, params)
        }
        guard let last = results.last else {
            throw PostgresError(code: .invalidUsage, message: "statement returned no result")
        }
        return last
    }

    /// Runs one statement like `query(_:parameters:)`, but hands its rows to `eachRow` one at a
    /// time as they arrive (libpq's single-row mode), each as a one-row result, instead of
    /// collecting them: memory holds one row, however many the statement returns. `eachRow` runs
    /// while the connection is busy with the statement: it must not run statements on this
    /// connection (asking its state, such as `transactionStatus`, is fine) and
    /// should be quick. Returns the statement's final result (its command tag; no rows). If the
    /// statement fails part way, the rows handed out before stay handed out and this throws.
    @discardableResult
    nonisolated(nonsending)
    public func query(_ sql: String, parameters: [(any PostgresBindable)?] = [],
                      eachRow: (PostgresQueryResult) -> Void) async throws -> PostgresQueryResult {
        let params = parameters.map { $0?.postgresParameter }
        try Self.refuseNUL(sql, params)
        noteListen(sql)
        let results = try await run(singleRows: true, eachRow: eachRow) { pg in
            let sent = sendQueryParams(pg, sql, params)
            if sent == 1 { _ = PQsetSingleRowMode(pg) }
            return sent
        }
        guard let last = results.last else {
            throw PostgresError(code: .invalidUsage, message: "statement returned no result")
        }
        return last
    }

    /// Runs one or more `;`-separated statements with the simple protocol (`PQsendQuery`), for
    /// DDL, transaction control and scripts. Returns one result per statement.
    @discardableResult
    nonisolated(nonsending)
    public func execute(_ sql: String) async throws -> [PostgresQueryResult] {
        try Self.refuseNUL(sql, [])
        noteListen(sql)
        return try await run { pg in PQsendQuery(pg, sql) }
    }

    /// Refuses a NUL byte in the SQL or in a text parameter: libpq passes both as C strings,
    /// so the value would be cut at the NUL and the statement would run on what came before.
    static func refuseNUL(_ sql: String, _ params: [PostgresParameter?]) throws {
        if sql.utf8.contains(0) {
            throw PostgresError(code: .invalidUsage, message: "the SQL text contains a NUL byte (U+0000), which libpq would cut it at; pass values as $n parameters")
        }
        for (i, p) in params.enumerated() {
            // PostgreSQL takes at most 1 GB in one value; a length past Int32 would trap here.
            if let p, p.bytes.count > 1 << 30 {
                throw PostgresError(code: .invalidUsage, message: "parameter $\(i + 1) is \(p.bytes.count) bytes; PostgreSQL takes at most 1 GB (1,073,741,824 bytes) in one value")
            }
            if let p, !p.isBinary, p.bytes.contains(0) {
                throw PostgresError(code: .invalidUsage, message: "parameter $\(i + 1) contains a NUL byte (U+0000), which PostgreSQL text cannot hold and libpq would cut the value at; strip it, or send the bytes as bytea ([UInt8])")
            }
        }
    }

    /// Marks the session as listening when `sql` may run `LISTEN` (see `mentionsListen`), so
    /// that a pool cleans it (`UNLISTEN *`) before the next holder gets it.
    @inline(__always)
    private func noteListen(_ sql: String) {
        if Self.mentionsListen(sql) { state.withLock { $0.hasListened = true } }
    }

    /// True when `sql` may run `LISTEN`: the word `listen` in any letter case, standing alone
    /// (not inside a longer word such as `UNLISTEN` or a table `listeners`, which would make
    /// every return of the connection pay an `UNLISTEN *`). A `LISTEN` the text does not show
    /// (inside a function) is seen when its first notification arrives.
    static func mentionsListen(_ sql: String) -> Bool {
        sql.utf8.withContiguousStorageIfAvailable(mentionsListen) ?? Array(sql.utf8).withUnsafeBufferPointer(mentionsListen)
    }

    private static func mentionsListen(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        let pattern: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) = (0x6C, 0x69, 0x73, 0x74, 0x65, 0x6E)  // "listen"
        guard bytes.count >= 6 else { return false }
        @inline(__always) func isWordByte(_ b: UInt8) -> Bool {
            (b >= 0x30 && b <= 0x39) || (b | 0x20 >= 0x61 && b | 0x20 <= 0x7A) || b == 0x5F || b == 0x24 || b >= 0x80
        }
        var i = 0
        while i + 6 <= bytes.count {
            if bytes[i] | 0x20 == pattern.0 && bytes[i + 1] | 0x20 == pattern.1 && bytes[i + 2] | 0x20 == pattern.2
                && bytes[i + 3] | 0x20 == pattern.3 && bytes[i + 4] | 0x20 == pattern.4 && bytes[i + 5] | 0x20 == pattern.5
                && (i == 0 || !isWordByte(bytes[i - 1]))
                && (i + 6 == bytes.count || !isWordByte(bytes[i + 6])) {
                return true
            }
            i += 1
        }
        return false
    }

    /// Quotes `identifier` for use as an SQL identifier (`PQescapeIdentifier`).
    public func escapeIdentifier(_ identifier: String) throws -> String {
        try escape(identifier, what: "identifier", with: PQescapeIdentifier)
    }

    /// Quotes `literal` for use as an SQL string literal (`PQescapeLiteral`). Prefer parameters.
    public func escapeLiteral(_ literal: String) throws -> String {
        try escape(literal, what: "literal", with: PQescapeLiteral)
    }

    private func escape(
        _ text: String, what: String,
        with function: (OpaquePointer?, UnsafePointer<CChar>?, Int) -> UnsafeMutablePointer<CChar>?
    ) throws -> String {
        try state.withLock { s in
            guard let pg = s.pg else { throw closedError() }
            let utf8 = Array(text.utf8)
            if utf8.contains(0) {
                throw PostgresError(code: .invalidUsage, message: "the \(what) contains a NUL byte (U+0000), which SQL text cannot hold")
            }
            guard let out = utf8.withUnsafeBufferPointer({ buf in
                buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) {
                    function(pg, $0, buf.count)
                }
            }) else {
                throw PostgresError(code: .invalidUsage, message: "cannot quote \(what): \(lastError(pg))")
            }
            defer { PQfreemem(out) }
            return String(cString: out)
        }
    }

    // MARK: LISTEN / NOTIFY

    /// Starts listening on `channel` (quoted with `PQescapeIdentifier`, so any name is safe).
    nonisolated(nonsending)
    public func listen(_ channel: String) async throws {
        try await execute("LISTEN " + escapeIdentifier(channel))
        state.withLock { $0.hasListened = true }
    }

    /// Stops listening on `channel`.
    nonisolated(nonsending)
    public func unlisten(_ channel: String) async throws {
        try await execute("UNLISTEN " + escapeIdentifier(channel))
    }

    /// Stops listening on every channel.
    nonisolated(nonsending)
    public func unlistenAll() async throws {
        try await execute("UNLISTEN *")
        state.withLock { s in
            s.hasListened = false
            s.notifications.removeAll()
            s.notificationHead = 0
        }
    }

    /// The notifications for the channels this connection listens to, in the order the server
    /// sent them. Iterate from one task at a time. Iteration ends when the connection closes;
    /// it throws when the connection breaks.
    public var notifications: PostgresNotificationSequence { PostgresNotificationSequence(connection: self) }

    // MARK: Closing

    /// Closes the connection and frees the `PGconn` exactly once. Idempotent. A statement or
    /// notification wait in progress ends with `connectionClosed`; a statement in progress is
    /// also cancelled on the server (the request is given at most a second to go out).
    public func close() async {
        // A statement running on another task closes the connection itself: it may be between
        // deciding to wait on the socket and registering that wait, and a socket closed here
        // meanwhile frees its fd number for the next file the process opens, whose readiness
        // that statement would then wait for. It is woken until it has seen the request
        // (an interrupt that lands just before it parks is lost), for at most a second.
        // The statement is cancelled on the server too: a backend notices a closed socket only
        // when it next reads from it, and would run the statement to its end, locks held.
        // With no statement running, the connection is taken here, under the same lock that
        // saw it idle: a statement that starts after finds it closed (decided, then closed
        // under a second lock, a statement could start in between and wait on the socket
        // closed under it).
        var taken: (pg: OpaquePointer, socket: ReactorSocket, parked: CheckedContinuation<Void, Never>?)?
        let (socket, cancel) = state.withLock { s -> (ReactorSocket?, CancelHandle?) in
            guard let pg = s.pg else { return (nil, nil) }
            guard s.busy else {
                taken = Self.takeForClose(&s)
                return (nil, nil)
            }
            s.broken = true
            s.closeRequested = true
            // Already asked for this statement (a pool drain cancels, then closes): not again.
            guard s.cancelSentFor != s.statementSerial else { return (s.socket, nil) }
            return (s.socket, PQgetCancel(pg).map(CancelHandle.init))
        }
        if let taken {
            Self.finishClose(taken.pg, socket: taken.socket, parked: taken.parked)
            return
        }
        if let cancel {
            // Given at most a second to go out (PQcancel blocks while it connects).
            let delivered = OneTimeEvent()
            Task {
                _ = await BlockingExecutor.run { cancel.send() }
                delivered.fire()
            }
            _ = await delivered.wait(atMost: .seconds(1))
        }
        if let socket {
            let giveUp = ContinuousClock.now.advanced(by: .seconds(1))
            while state.withLock({ $0.pg != nil && $0.busy }), ContinuousClock.now < giveUp {
                SocketReactor.shared.interrupt(socket)
                await PostgresConnection.pause(.milliseconds(1))
            }
        }
        closeNow()
    }

    /// Sleeps for `duration`, also in a cancelled task (a close must finish).
    private static func pause(_ duration: Duration) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            Task.detached {
                try? await Task.sleep(for: duration)
                c.resume()
            }
        }
    }

    func closeNow() {
        guard let taken = state.withLock({ Self.takeForClose(&$0) }) else { return }
        Self.finishClose(taken.pg, socket: taken.socket, parked: taken.parked)
    }

    /// Takes the `PGconn` out of the state (nil if already closed): from then on the
    /// connection is closed for every caller. `finishClose` frees it, outside the lock.
    private static func takeForClose(_ s: inout State) -> (pg: OpaquePointer, socket: ReactorSocket, parked: CheckedContinuation<Void, Never>?)? {
        guard let pg = s.pg else { return nil }
        s.pg = nil
        let parked = s.listenerParked
        s.listenerParked = nil
        return (pg, s.socket, parked)
    }

    private static func finishClose(_ pg: OpaquePointer, socket: ReactorSocket, parked: CheckedContinuation<Void, Never>?) {
        SocketReactor.shared.release(socket)
        parked?.resume()
        // PQfinish sends Terminate and closes the socket; in non-blocking mode it does not wait.
        PQfinish(pg)
    }

    /// Asks the server to cancel the statement this connection is running, if any
    /// (`PQcancel`, on a Dispatch thread). Returns once the request was delivered.
    public func cancelRunningQuery() async {
        let cancel: CancelHandle? = state.withLock { s in
            guard let pg = s.pg, let c = PQgetCancel(pg) else { return nil }
            if s.busy { s.cancelSentFor = s.statementSerial }
            return CancelHandle(c)
        }
        guard let cancel else { return }
        _ = await BlockingExecutor.run { cancel.send() }
    }

    // MARK: The statement loop

    private enum Step {
        case done
        case wait(ReactorSocket, SocketInterest)
    }

    /// Sends with `send`, flushes and collects every result until libpq reports the end; the
    /// rows of single-row mode go to `eachRow` instead, one result each, as they come.
    nonisolated(nonsending)
    func run(singleRows: Bool = false, eachRow: (PostgresQueryResult) -> Void = { _ in },
             _ send: (OpaquePointer) -> Int32) async throws -> [PostgresQueryResult] {
        try Task.checkCancellation()
        let (socket, kickListener, spinBudget, serial): (ReactorSocket, Bool, Int, UInt64) = try state.withLock { s in
            guard let pg = s.pg else { throw closedError() }
            guard !s.busy else {
                throw PostgresError(code: .invalidUsage,
                                    message: "connection \(PQbackendPID(pg)) is already running a statement; a PostgresConnection runs one statement at a time (use a ConnectionPool for concurrency)")
            }
            if s.broken || PQstatus(pg) == CONNECTION_BAD {
                throw brokenError(pg, context: "connection is broken")
            }
            s.busy = true
            s.statementSerial &+= 1
            if send(pg) == 0 {
                s.busy = false
                let bad = PQstatus(pg) == CONNECTION_BAD
                if bad { s.broken = true }
                throw bad ? brokenError(pg, context: "could not send statement") : PostgresError(code: .invalidUsage, message: lastError(pg))
            }
            return (s.socket, s.listenerOnSocket, s.spin.budgetNanoseconds(), s.statementSerial)
        }
        if kickListener { SocketReactor.shared.interrupt(socket) }
        var spinOutcome: Bool? = nil
        SpinPolicy.statementsInFlight.add(1, ordering: .relaxed)
        defer {
            SpinPolicy.statementsInFlight.subtract(1, ordering: .relaxed)
            finishStatement(spinOutcome: spinOutcome)
        }

        var results: [PostgresQueryResult] = []
        // Single rows read under the lock, handed to `eachRow` once it is released (a callback
        // that asked this connection anything would have taken the lock twice).
        var pendingRows: [PostgresQueryResult] = []
        var firstError: PostgresError?
        var cancelRequested = false
        var flushed = false
        var copyOut = false
        var watchdog: Task<Void, Never>?
        var cancelDelivered: OneTimeEvent?
        defer { watchdog?.cancel() }
        while true {
            let step: Step? = try state.withLock { s in
                guard let pg = s.pg else {
                    // Closed (by close()) after the Task was cancelled.
                    if cancelRequested { throw CancellationError() }
                    throw closedError()
                }
                if s.abandoned || s.closeRequested { return nil }
                /// The connection ended: the server's own error if it sent one first (the FATAL
                /// before it closes, e.g. 57P01 from pg_terminate_backend), else libpq's.
                func lost(_ context: String) -> PostgresError {
                    s.broken = true
                    // What libpq read before the end stays buffered (and is parsed here); only
                    // the server's own errors (those with a SQLSTATE) are kept, not the result
                    // libpq makes up for the lost socket.
                    while firstError == nil, PQisBusy(pg) == 0, let r = PQgetResult(pg) {
                        let box = ResultBox(r)
                        if PQresultStatus(r) == PGRES_FATAL_ERROR, PQresultErrorField(r, Int32(UInt8(ascii: "C"))) != nil {
                            firstError = serverError(box.pointer, pg)
                        }
                    }
                    if var error = firstError, error.code == .server, error.sqlState != nil {
                        error.code = .connectionBroken
                        return error
                    }
                    return brokenError(pg, context: context)
                }
                if !flushed {
                    let f = PQflush(pg)
                    if f < 0 { s.broken = true; throw brokenError(pg, context: "could not send statement") }
                    if f == 1 {
                        // Must also read: the server may be waiting for us to drain its output
                        // (libpq: wait until the socket is read-ready or write-ready).
                        if PQconsumeInput(pg) == 0 { throw lost("connection lost") }
                        return .wait(s.socket, .readableOrWritable)
                    }
                    flushed = true
                }
                if PQconsumeInput(pg) == 0 { throw lost("connection lost") }
                drainNotifications(pg, into: &s)
                /// Discards a COPY TO STDOUT's rows; true once it ended (its final result follows).
                func drainCopyOut() throws -> Bool {
                    while true {
                        var row: UnsafeMutablePointer<CChar>?
                        let n = PQgetCopyData(pg, &row, 1)
                        if let row { PQfreemem(row) }
                        if n > 0 { continue }
                        if n == 0 { return false }
                        if n == -2 { s.broken = true; throw brokenError(pg, context: "COPY TO STDOUT failed") }
                        copyOut = false
                        return true
                    }
                }
                if copyOut, try !drainCopyOut() { return .wait(s.socket, .readable) }
                while PQisBusy(pg) == 0 {
                    guard let r = PQgetResult(pg) else {
                        // Notifications libpq parsed while handing out the results (behind a
                        // result of a multi-statement query) go to the buffer now, not at the
                        // next statement: the socket is empty, so nothing else would wake a
                        // listener for them.
                        drainNotifications(pg, into: &s)
                        return .done
                    }
                    let box = ResultBox(r)
                    let status = PQresultStatus(r)
                    switch status {
                    case PGRES_SINGLE_TUPLE where singleRows:
                        // After an error only the end is awaited; nothing more is handed out.
                        if firstError == nil { pendingRows.append(makeResult(box)) }
                    case PGRES_TUPLES_OK, PGRES_COMMAND_OK, PGRES_EMPTY_QUERY, PGRES_SINGLE_TUPLE:
                        results.append(makeResult(box))
                    case PGRES_COPY_IN, PGRES_COPY_OUT, PGRES_COPY_BOTH:
                        // libpq hands out this result again on every call until the COPY ends,
                        // so it must be ended here: refused for COPY FROM STDIN (the server
                        // aborts it and rolls its rows back), drained for COPY TO STDOUT.
                        if firstError == nil {
                            firstError = PostgresError(
                                code: .invalidUsage,
                                message: "COPY FROM STDIN / TO STDOUT is not supported by query()/execute() (the statement's rows were not loaded or returned); run COPY with a file or program on the server, or INSERT/SELECT")
                        }
                        if status == PGRES_COPY_IN {
                            let ended = PQputCopyEnd(pg, "COPY FROM STDIN is not supported by this client")
                            if ended < 0 { s.broken = true; throw brokenError(pg, context: "could not end COPY FROM STDIN") }
                            if ended == 0 { return .wait(s.socket, .writable) }  // retried: libpq is still in COPY_IN
                            flushed = false
                            return .wait(s.socket, .writable)
                        } else if status == PGRES_COPY_OUT {
                            copyOut = true
                            if try !drainCopyOut() { return .wait(s.socket, .readable) }
                        } else {
                            // COPY BOTH (replication) has no clean end here: give the connection up.
                            s.broken = true
                            return .done
                        }
                    default:
                        if firstError == nil { firstError = serverError(box.pointer, pg) }
                    }
                }
                return .wait(s.socket, .readable)
            }
            if !pendingRows.isEmpty {
                for row in pendingRows { eachRow(row) }
                pendingRows.removeAll(keepingCapacity: true)
            }
            guard let step else {
                // The cancel watchdog gave up on the server's answer, or close() was called:
                // close here, on this task.
                let closing = state.withLock { $0.closeRequested && !$0.abandoned }
                closeNow()
                if closing && !cancelRequested { throw closedError() }
                throw CancellationError()
            }
            guard case let .wait(socket, interest) = step else { break }
            if interest == .readable, spinBudget > 0, spinOutcome == nil, !cancelRequested,
               SpinPolicy.statementsInFlight.load(ordering: .relaxed) <= 1 {
                // Adaptive busy-poll (see SpinPolicy): most answers on a local server arrive
                // within tens of microseconds, far sooner than two thread wake-ups via the reactor.
                let hit = spinUntilReadable(fd: socket.fd, budgetNanoseconds: spinBudget)
                spinOutcome = hit
                if hit { continue }
            }
            switch await SocketReactor.shared.wait(socket, for: interest, cancellable: !cancelRequested) {
            case .ready:
                continue
            case .cancelled:
                cancelRequested = true
                // The answer to the cancel is awaited for `cancelGracePeriod` at most; the cancel
                // request itself goes out on its own (PQcancel blocks while it connects).
                let grace = configuration.cancelGracePeriod
                watchdog = Task { [weak self] in
                    try? await Task.sleep(for: grace.sleepable)
                    if !Task.isCancelled { await self?.abandonStatement(serial, socket: socket) }
                }
                let delivered = OneTimeEvent()
                cancelDelivered = delivered
                Task { [weak self] in
                    await self?.cancelRunningQuery()
                    delivered.fire()
                }
            case .interrupted:
                // A notification listener held the socket, or close() ran; kick and re-check.
                SocketReactor.shared.interrupt(socket)
            }
        }
        if cancelRequested {
            // A cancel request still on its way could hit the next statement on this
            // connection (the next holder's): wait for it to go out, within the grace period;
            // past that the connection is marked broken, so that a pool discards it.
            if let delivered = cancelDelivered, await !delivered.wait(atMost: configuration.cancelGracePeriod) {
                state.withLock { $0.broken = true }
            }
            // Cancelled on the server (57014): CancellationError. A statement that completed
            // before the cancel reached it keeps its outcome: its results, or its own error (a
            // COMMIT that committed must not look undone, or a caller retrying would repeat it).
            if firstError == nil ? results.isEmpty : firstError?.sqlState == "57014" {
                throw CancellationError()
            }
        }
        if let firstError {
            if firstError.code == .server, firstError.severity == "FATAL" || firstError.severity == "PANIC" {
                // The server ends the session after a FATAL error (e.g. pg_terminate_backend).
                state.withLock { $0.broken = true }
            }
            if firstError.code == .server, firstError.severity == "FATAL" || firstError.severity == "PANIC" || isBroken {
                var e = firstError
                e.code = .connectionBroken
                throw e
            }
            throw firstError
        }
        return results
    }

    /// Closes the connection if statement `serial` still runs (its cancel got no answer within
    /// `cancelGracePeriod`); it is marked broken first, so a pool never lends it again.
    private func abandonStatement(_ serial: UInt64, socket: ReactorSocket) async {
        let stuck = state.withLock { s -> Bool in
            guard s.busy, s.statementSerial == serial, s.pg != nil else { return false }
            s.broken = true
            s.abandoned = true
            return true
        }
        guard stuck else { return }
        configuration.logger.warning("no answer to a cancelled statement within cancelGracePeriod (\(configuration.cancelGracePeriod)): closing the connection", metadata: [
            "db.backend_pid": "\(backendPID)",
        ])
        // Wake the statement loop until it has seen `abandoned` (an interrupt that lands just
        // before it parks is lost, hence the repeats).
        while state.withLock({ $0.busy && $0.statementSerial == serial && $0.pg != nil }) {
            SocketReactor.shared.interrupt(socket)
            do { try await Task.sleep(for: .milliseconds(5)) } catch { return }
        }
    }

    private func finishStatement(spinOutcome: Bool?) {
        let parked = state.withLock { s -> CheckedContinuation<Void, Never>? in
            s.busy = false
            if let spinOutcome { s.spin.record(hit: spinOutcome) }
            let p = s.listenerParked
            s.listenerParked = nil
            return p
        }
        parked?.resume()
    }

    private func makeResult(_ box: ResultBox) -> PostgresQueryResult {
        let tag = String(cString: PQcmdStatus(box.pointer))
        let tuples = String(cString: PQcmdTuples(box.pointer))
        let hasRows = PQresultStatus(box.pointer) == PGRES_TUPLES_OK || PQresultStatus(box.pointer) == PGRES_SINGLE_TUPLE
        return PostgresQueryResult(box: hasRows ? box : nil, commandTag: tag, rowsAffected: Int(tuples))
    }

    // MARK: Notifications plumbing

    enum ListenerStep {
        case deliver(PostgresNotification)
        case finished
        case park
        case waitSocket(ReactorSocket)
    }

    func nextNotificationStep() throws -> ListenerStep {
        try state.withLock { s in
            if let n = takeBuffered(&s) { return .deliver(n) }
            guard let pg = s.pg else { return .finished }
            if s.busy { return .park }
            if PQconsumeInput(pg) == 0 {
                s.broken = true
                throw brokenError(pg, context: "connection lost while waiting for notifications")
            }
            drainNotifications(pg, into: &s)
            if let n = takeBuffered(&s) { return .deliver(n) }
            s.listenerOnSocket = true
            return .waitSocket(s.socket)
        }
    }

    func beginListening() throws {
        try state.withLock { s in
            guard !s.listenerActive else {
                throw PostgresError(code: .invalidUsage, message: "notifications are already being awaited by another task on this connection")
            }
            s.listenerActive = true
        }
    }

    func endListening() {
        state.withLock { s in
            s.listenerActive = false
            s.listenerOnSocket = false
        }
    }

    func leftSocket() { state.withLock { $0.listenerOnSocket = false } }

    func park() async {
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            let resumeNow = state.withLock { s -> Bool in
                if s.busy && s.pg != nil && s.notificationHead >= s.notifications.count && !Task.isCancelled {
                    s.listenerParked = cont
                    return false
                }
                return true
            }
            if resumeNow { cont.resume() }
        }
    }

    private func takeBuffered(_ s: inout State) -> PostgresNotification? {
        guard s.notificationHead < s.notifications.count else { return nil }
        let n = s.notifications[s.notificationHead]
        s.notificationHead += 1
        if s.notificationHead == s.notifications.count {
            s.notifications.removeAll(keepingCapacity: true)
            s.notificationHead = 0
        }
        return n
    }

    private func drainNotifications(_ pg: OpaquePointer, into s: inout State) {
        var any = false
        while let n = PQnotifies(pg) {
            let note = PostgresNotification(
                channel: String(cString: n.pointee.relname),
                payload: String(cString: n.pointee.extra),
                senderPID: n.pointee.be_pid)
            PQfreemem(n)
            s.notifications.append(note)
            any = true
        }
        let limit = max(1, configuration.maxPendingNotifications)
        let pending = s.notifications.count - s.notificationHead
        if pending > limit {
            let drop = pending - limit
            if s.droppedNotifications == 0 || s.droppedNotifications / 10_000 != (s.droppedNotifications + drop) / 10_000 {
                configuration.logger.warning("notifications are not being read: dropping the oldest beyond maxPendingNotifications (\(limit))", metadata: [
                    "db.backend_pid": "\(backendPID)", "dropped": "\(s.droppedNotifications + drop)",
                ])
            }
            s.droppedNotifications += drop
            s.notificationHead += drop
            if s.notificationHead > 4_096 && s.notificationHead * 2 > s.notifications.count {
                s.notifications.removeFirst(s.notificationHead)
                s.notificationHead = 0
            }
        }
        if any { s.hasListened = true }  // however it came to listen, a pool must clean it
        if any, let parked = s.listenerParked {
            s.listenerParked = nil
            parked.resume()
        }
        // A listener waiting on the socket: the statement that read these has emptied it, so no
        // readiness would wake the listener (a NOTIFY sent on this very connection came with its
        // statement's answer). Its wait is ended; one not yet registered re-checks the buffer.
        if any && s.listenerOnSocket { SocketReactor.shared.interrupt(s.socket) }
    }

    /// Whether notifications wait in the buffer for the listener.
    var hasBufferedNotifications: Bool { state.withLock { $0.notificationHead < $0.notifications.count } }

    /// The listener's wait on the socket after `nextNotificationStep` said `.waitSocket`. A
    /// statement on another task may have read a notification into the buffer since that step
    /// (its kick then found no wait to end, and the socket is empty): the buffer is looked at
    /// again once the wait is registered.
    nonisolated(nonsending)
    func waitForNotifications(on socket: ReactorSocket) async -> SocketWaitOutcome {
        await SocketReactor.shared.wait(socket, for: .readable, recheck: { [self] in hasBufferedNotifications })
    }

    // MARK: Errors

    func closedError() -> PostgresError {
        PostgresError(code: .connectionClosed, message: "connection to \(host):\(port) is closed", host: host, port: port)
    }

    func brokenError(_ pg: OpaquePointer, context: String) -> PostgresError {
        PostgresError(code: .connectionBroken,
                      message: "\(context) (backend \(backendPID) at \(host):\(port)): \(lastError(pg))",
                      host: host, port: port)
    }
}

/// Builds a `PostgresError` from a failed `PGresult`.
func serverError(_ res: OpaquePointer, _ pg: OpaquePointer?) -> PostgresError {
    func field(_ code: Character) -> String? {
        PQresultErrorField(res, Int32(code.asciiValue!)).map { String(cString: $0) }
    }
    let message = field("M") ?? String(cString: PQresultErrorMessage(res)).trimmingTrailingNewlines()
    return PostgresError(
        code: .server, message: message, sqlState: field("C"), severity: field("V") ?? field("S"),
        detail: field("D"), hint: field("H"), position: field("P").flatMap { Int($0) })
}

func lastError(_ pg: OpaquePointer) -> String {
    String(cString: PQerrorMessage(pg)).trimmingTrailingNewlines()
}

extension String {
    func trimmingTrailingNewlines() -> String {
        var s = Substring(self)
        while let last = s.last, last == "\n" || last == " " { s = s.dropLast() }
        return String(s)
    }
}

/// Sends `PQsendQueryParams` with text or binary parameters and text results.
private func sendQueryParams(_ pg: OpaquePointer, _ sql: String, _ params: [PostgresParameter?]) -> Int32 {
    let n = params.count
    if n == 0 {
        return PQsendQueryParams(pg, sql, 0, nil, nil, nil, nil, 0)
    }
    // One contiguous buffer for every value (each NUL-terminated for text parameters).
    var storage = [UInt8]()
    storage.reserveCapacity(params.reduce(0) { $0 + ($1?.bytes.count ?? 0) + 1 })
    var offsets = [Int](repeating: -1, count: n)
    var lengths = [Int32](repeating: 0, count: n)
    var formats = [Int32](repeating: 0, count: n)
    var types = [UInt32](repeating: 0, count: n)
    for (i, p) in params.enumerated() {
        guard let p else { continue }
        offsets[i] = storage.count
        storage.append(contentsOf: p.bytes)
        storage.append(0)
        lengths[i] = Int32(p.bytes.count)
        formats[i] = p.isBinary ? 1 : 0
        types[i] = p.typeOID
    }
    return storage.withUnsafeBufferPointer { buf in
        buf.baseAddress!.withMemoryRebound(to: CChar.self, capacity: buf.count) { base in
            var values = [UnsafePointer<CChar>?](repeating: nil, count: n)
            for i in 0..<n where offsets[i] >= 0 { values[i] = UnsafePointer(base + offsets[i]) }
            return PQsendQueryParams(pg, sql, Int32(n), types, values, lengths, formats, 0)
        }
    }
}

/// When to busy-poll for an answer instead of parking on the reactor.
///
/// A round trip to a nearby server takes 15-50 µs; parking costs two thread wake-ups (reactor
/// thread, then a cooperative thread) that add about as much again. So a statement first polls
/// its socket with `poll(fd, 0)` for up to `maxBudget`. When that misses several times in a row
/// (a slow query, a distant server) spinning pauses for the next `pauseLength` statements, so a
/// connection whose answers are slow never burns CPU. The spin is bounded and never calls a
/// blocking function, so the cooperative thread stays available within microseconds.
///
/// A statement spins only while it is the only one in flight in the process: with several
/// statements outstanding (a pool under load), the other cores are busy with their server
/// backends and the cooperative pool has other work, so a spinning thread would take CPU from
/// the very processes it waits for (measured: up to 56 % lower pool throughput on 2 cores).
struct SpinPolicy {
    /// Statements currently running on any connection of this process.
    static let statementsInFlight = Atomic<Int>(0)

    /// The longest one statement busy-polls, in nanoseconds (`Configuration.busyPoll`).
    var maxBudget = 50_000
    static let missesBeforePause = 3
    static let pauseLength = 64
    var misses = 0
    var paused = 0

    mutating func budgetNanoseconds() -> Int {
        if maxBudget == 0 { return 0 }
        if paused > 0 {
            paused -= 1
            return 0
        }
        return maxBudget
    }

    mutating func record(hit: Bool) {
        if hit {
            misses = 0
        } else {
            misses += 1
            if misses >= Self.missesBeforePause {
                misses = 0
                paused = Self.pauseLength
            }
        }
    }
}

/// Polls `fd` for readability without blocking until it is readable or the budget is spent.
func spinUntilReadable(fd: Int32, budgetNanoseconds: Int) -> Bool {
    var start = timespec()
    clock_gettime(CLOCK_MONOTONIC, &start)
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    while true {
        if poll(&p, 1, 0) > 0 { return true }
        sched_yield()
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let elapsed = (now.tv_sec - start.tv_sec) * 1_000_000_000 + (now.tv_nsec - start.tv_nsec)
        if elapsed >= budgetNanoseconds { return false }
    }
}

/// A `PGcancel` freed exactly once.
final class CancelHandle: @unchecked Sendable {
    // @unchecked: PQcancel is documented thread-safe; the handle is freed only in deinit.
    let pointer: OpaquePointer
    init(_ pointer: OpaquePointer) { self.pointer = pointer }
    deinit { PQfreeCancel(pointer) }

    /// Sends the cancel request (blocking: call off the cooperative pool). Returns an error text or nil.
    func send() -> String? {
        var buf = [CChar](repeating: 0, count: 256)
        let ok = PQcancel(pointer, &buf, Int32(buf.count))
        if ok == 1 { return nil }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Routes libpq notices (e.g. `NOTICE: table does not exist, skipping`) to swift-log instead of stderr.
final class NoticeSink: Sendable {
    let logger: Logger
    init(logger: Logger) { self.logger = logger }
}

/// The first result of a connect: the attempt's, the timeout's or the caller's cancellation.
final class ConnectOutcome: Sendable {
    private struct State {
        var result: Result<PostgresConnection, any Error>?
        var waiter: CheckedContinuation<PostgresConnection, any Error>?
    }
    private let state = Mutex(State())

    /// Records `result` unless one was recorded; returns whether it was this one.
    @discardableResult
    func finish(_ result: Result<PostgresConnection, any Error>) -> Bool {
        let (won, waiter) = state.withLock { s -> (Bool, CheckedContinuation<PostgresConnection, any Error>?) in
            guard s.result == nil else { return (false, nil) }
            s.result = result
            defer { s.waiter = nil }
            return (true, s.waiter)
        }
        waiter?.resume(with: result)
        return won
    }

    /// Waits for the first result.
    func value() async throws -> PostgresConnection {
        try await withCheckedThrowingContinuation { cont in
            let ready = state.withLock { s -> Result<PostgresConnection, any Error>? in
                if let r = s.result { return r }
                s.waiter = cont
                return nil
            }
            if let ready { cont.resume(with: ready) }
        }
    }
}

/// One non-blocking connect (`PQconnectStartParams` + `PQconnectPoll`), host by host when
/// the string names several with a `connect_timeout`.
final class ConnectAttempt: Sendable {
    let configuration: Configuration
    typealias Configuration = PostgresConnection.Configuration
    /// Keywords appended after the connection string (later keywords win in libpq).
    let extraKeywords: [(String, String)]
    private let target = Mutex<(host: String, port: String, lastError: String)>(("?", "?", ""))
    /// One host's connect, given its keywords; nil: libpq's (`runOne`). Tests stand in a step
    /// that blocks as a name lookup does.
    typealias HostStep = @Sendable (_ keywords: [(String, String)]) async throws -> PostgresConnection
    private let hostStep: HostStep?

    init(configuration: Configuration, extraKeywords: [(String, String)] = [], hostStep: HostStep? = nil) {
        self.configuration = configuration
        self.extraKeywords = extraKeywords
        self.hostStep = hostStep
    }

    /// The first of `work`'s result, `limit` passing (`timeout()`'s error) and the caller's
    /// cancellation. `work` runs unstructured on purpose: a step of it that blocks in libpq (a
    /// name lookup, on a Dispatch thread) cannot be interrupted, and a task group or an awaited
    /// task would wait for it past the limit. Work that is left behind is cancelled, and a
    /// connection it still makes is closed.
    static func firstOf(
        limit: Duration, timeout: @escaping @Sendable () -> any Error,
        _ work: @escaping @Sendable () async throws -> PostgresConnection
    ) async throws -> PostgresConnection {
        let outcome = ConnectOutcome()
        let attempt = Task {
            do {
                let conn = try await work()
                if !outcome.finish(.success(conn)) { await conn.close() }
            } catch {
                outcome.finish(.failure(error))
            }
        }
        let timer = Task {
            try? await Task.sleep(for: limit.sleepable)
            if !Task.isCancelled { outcome.finish(.failure(timeout())) }
        }
        defer {
            timer.cancel()
            attempt.cancel()
        }
        return try await withTaskCancellationHandler {
            try await outcome.value()
        } onCancel: {
            outcome.finish(.failure(CancellationError()))
        }
    }

    /// One host's turn ran out (`connect_timeout` of a multi-host string).
    private struct HostTimedOut: Error {}

    func timeoutError() -> PostgresError {
        let t = target.withLock { $0 }
        return PostgresError(
            code: .connectTimeout,
            message: "could not connect to \(t.host):\(t.port) within \(configuration.connectTimeout) (connectTimeout=\(configuration.connectTimeout))\(t.lastError.isEmpty ? "" : ": \(t.lastError)")",
            host: t.host, port: t.port)
    }

    private func failure(_ pg: OpaquePointer) -> PostgresError {
        let host = PQhost(pg).map { String(cString: $0) } ?? "?"
        let port = PQport(pg).map { String(cString: $0) } ?? "?"
        return PostgresError(code: .connectionFailed,
                             message: "could not connect to \(host):\(port): \(lastError(pg))",
                             host: host, port: port)
    }

    /// Connects. A string that names several hosts (`host=a,b`, `postgres://a,b/db`) with a
    /// `connect_timeout` is tried one host at a time, each for at most `connect_timeout`, so
    /// that a host that does not answer (a frozen machine, a dropped route) gives way to the
    /// next: libpq enforces `connect_timeout` only in its blocking connect, never in the
    /// non-blocking `PQconnectPoll` this driver uses. `connectTimeout` bounds the whole.
    func run() async throws -> PostgresConnection {
        // The application name before the user's string (a later keyword wins in libpq, so
        // one the string sets is kept); client_encoding after it: the driver sends and reads
        // UTF-8 (a string asking for another encoding is refused by `hostPlan`).
        let name = [("fallback_application_name", "swift-realtime-sync")]
        let encoding = [("client_encoding", "UTF8")]
        guard let plan = try Self.hostPlan(configuration.connectionString) else {
            return try await runOne(name + [("dbname", configuration.connectionString)] + encoding + extraKeywords, expandDBName: true)
        }
        var failures: [String] = []
        var lastError: PostgresError?
        for (index, host) in plan.hosts.enumerated() {
            try Task.checkCancellation()
            var options = name + plan.common
            options.append(("host", host))
            if let hostaddrs = plan.hostaddrs { options.append(("hostaddr", hostaddrs[index])) }
            if let ports = plan.ports { options.append(("port", ports.count == 1 ? ports[0] : ports[index])) }
            options += encoding
            let keywords = options + extraKeywords
            do {
                // A host whose name lookup hangs gives way too: its step is left to end on its
                // own (`firstOf`), not awaited.
                return try await Self.firstOf(limit: plan.perHost, timeout: { HostTimedOut() }) { [self] in
                    if let hostStep { return try await hostStep(keywords) }
                    return try await runOne(keywords, expandDBName: false)
                }
            } catch {
                let shown = host.isEmpty ? "the default host" : host
                if error is HostTimedOut {
                    failures.append("\(shown): no answer within connect_timeout=\(plan.perHost)")
                    lastError = PostgresError(code: .connectionFailed, message: "could not connect to \(shown) within connect_timeout=\(plan.perHost)",
                                              host: host, port: plan.ports.map { $0.count == 1 ? $0[0] : $0[index] })
                    continue
                }
                if error is CancellationError { throw error }
                guard let error = error as? PostgresError, error.code != .invalidConfiguration else { throw error }
                failures.append("\(shown): \(error.message)")
                lastError = error
            }
        }
        guard var error = lastError else { throw PostgresError(code: .connectionFailed, message: "no host to connect to") }
        error.message = "could not connect to any of \(plan.hosts.count) hosts: " + failures.joined(separator: "; ")
        throw error
    }

    /// The hosts of a connection string to try one by one, with the options they share, or nil
    /// to leave it to libpq: one host, no `connect_timeout`, a string `PQconninfoParse` does
    /// not take (a bare database name, which libpq's expanded dbname does), or options whose
    /// meaning spans the hosts (`load_balance_hosts`, `target_session_attrs=prefer-standby`,
    /// a `service`). Throws for a `client_encoding` other than UTF8.
    struct HostPlan {
        var common: [(String, String)]
        var hosts: [String]
        var hostaddrs: [String]?
        var ports: [String]?
        var perHost: Duration
    }

    static func hostPlan(_ connectionString: String) throws -> HostPlan? {
        var message: UnsafeMutablePointer<CChar>?
        guard let parsed = PQconninfoParse(connectionString, &message) else {
            // libpq itself judges it (and names what is wrong).
            if let message { PQfreemem(message) }
            return nil
        }
        defer { PQconninfoFree(parsed) }
        var options: [(String, String)] = []
        var option = parsed
        while let keyword = option.pointee.keyword {
            if let value = option.pointee.val { options.append((String(cString: keyword), String(cString: value))) }
            option += 1
        }
        func value(_ name: String) -> String? { options.last { $0.0 == name }?.1 }
        if let encoding = value("client_encoding"), !["utf8", "utf-8", "unicode"].contains(encoding.lowercased()) {
            throw PostgresError(code: .invalidConfiguration,
                message: "invalid connection string: client_encoding=\(encoding); this driver sends and reads UTF-8 text, so it is always UTF8 (the server converts from the database's encoding)")
        }
        if value("load_balance_hosts") != nil || value("service") != nil || value("target_session_attrs") == "prefer-standby" { return nil }
        // libpq: zero, negative or absent waits for ever; 1 counts as 2 seconds.
        guard let text = value("connect_timeout"), let seconds = Int(text.trimmingCharacters(in: .whitespaces)), seconds > 0 else { return nil }
        let hosts = value("host")?.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let hostaddrs = value("hostaddr")?.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let ports = value("port")?.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let count = hosts?.count ?? hostaddrs?.count ?? 1
        guard count > 1 else { return nil }
        // Mismatched lists: libpq's own error ("could not match …") says it best.
        if let hostaddrs, hostaddrs.count != count { return nil }
        if let hosts, hosts.count != count { return nil }
        if let ports, ports.count != 1, ports.count != count { return nil }
        return HostPlan(
            common: options.filter { !["host", "hostaddr", "port"].contains($0.0) },
            hosts: hosts ?? Array(repeating: "", count: count), hostaddrs: hostaddrs, ports: ports,
            perHost: .seconds(max(2, seconds)))
    }

    /// One libpq connect: `keywords` in order (a later one wins), `dbname` expanded as a
    /// connection string when `expandDBName`.
    private func runOne(_ keywords: [(String, String)], expandDBName: Bool) async throws -> PostgresConnection {
        // Name resolution happens inside PQconnectStartParams/PQconnectPoll, so both run on a
        // Dispatch thread, never on the cooperative pool.
        let handle = await BlockingExecutor.run { () -> ConnHandle? in
            let kp = keywords.map { strdup($0.0) } + [nil]
            let vp = keywords.map { strdup($0.1) } + [nil]
            defer { (kp + vp).forEach { free($0) } }
            let pg = kp.map { UnsafePointer($0) }.withUnsafeBufferPointer { k in
                vp.map { UnsafePointer($0) }.withUnsafeBufferPointer { v in
                    PQconnectStartParams(k.baseAddress, v.baseAddress, expandDBName ? 1 : 0)
                }
            }
            return pg.map(ConnHandle.init)
        }
        guard let handle else {
            throw PostgresError(code: .connectionFailed, message: "libpq could not allocate a connection (out of memory)")
        }
        var owned = true
        defer { if owned { handle.finish() } }
        let pg = handle.pointer
        recordTarget(pg)
        if PQstatus(pg) == CONNECTION_BAD {
            // A string libpq refused before any connection attempt (an unknown keyword, an
            // invalid value: "invalid sslmode value"): not to be retried. (PQhost is never nil
            // here, so it cannot tell.)
            let message = lastError(pg)
            if Self.isConfigurationError(message) {
                throw PostgresError(code: .invalidConfiguration, message: "invalid connection string: \(message)")
            }
            throw failure(pg)
        }
        var poll = PGRES_POLLING_WRITING
        while true {
            switch poll {
            case PGRES_POLLING_OK:
                guard PQsetnonblocking(pg, 1) == 0 else { throw failure(pg) }
                let sink = NoticeSink(logger: configuration.logger)
                PQsetNoticeReceiver(pg, { arg, res in
                    guard let arg, let res else { return }
                    let sink = Unmanaged<NoticeSink>.fromOpaque(arg).takeUnretainedValue()
                    let e = serverError(res, nil)
                    sink.logger.debug("postgres notice: \(e.message)", metadata: ["sqlstate": "\(e.sqlState ?? "")"])
                }, Unmanaged.passUnretained(sink).toOpaque())
                owned = false
                // The socket libpq ended up with (a multi-host connect may have changed it).
                if PQsocket(pg) != handle.socket.fd { handle.reclaim(PQsocket(pg)) }
                return PostgresConnection(pg: pg, socket: handle.socket, configuration: configuration, noticeSink: sink)
            case PGRES_POLLING_FAILED:
                throw failure(pg)
            case PGRES_POLLING_READING, PGRES_POLLING_WRITING:
                if PQsocket(pg) != handle.socket.fd { handle.reclaim(PQsocket(pg)) }
                let outcome = await SocketReactor.shared.wait(handle.socket, for: poll == PGRES_POLLING_READING ? .readable : .writable)
                if outcome == .cancelled { throw CancellationError() }   // `handle.finish()` releases the socket
                let next = await BlockingExecutor.run { PQconnectPoll(handle.pointer) }
                recordTarget(pg)
                poll = next
            default:
                throw failure(pg)
            }
        }
    }

    /// Whether libpq's message says the connection string itself is wrong (its messages for
    /// unknown keywords, malformed URIs and invalid option values), not a host.
    static func isConfigurationError(_ message: String) -> Bool {
        let text = message.lowercased()
        return text.hasPrefix("invalid ") || text.contains("invalid connection option") || text.contains("invalid uri")
            || text.contains("missing \"=\"") || text.contains("unterminated quoted string")
            || text.contains("could not match") || text.contains("invalid value for parameter")
            || text.contains("end of string reached") || text.contains("unexpected spaces found")
    }

    private func recordTarget(_ pg: OpaquePointer) {
        // A host's step left behind (its name lookup outlasted its turn, `firstOf`) is cancelled:
        // the host it reaches later is not the one the timeout message must name.
        guard !Task.isCancelled else { return }
        let host = PQhost(pg).map { String(cString: $0) } ?? "?"
        let port = PQport(pg).map { String(cString: $0) } ?? "?"
        let err = lastError(pg)
        target.withLock { $0 = (host, port, err) }
    }
}

/// A `PGconn` during connect, finished at most once.
final class ConnHandle: @unchecked Sendable {
    // @unchecked: used by one connect attempt at a time (the poll loop), handed over on success.
    let pointer: OpaquePointer
    /// The socket the reactor knows as this connect's (libpq opens a new one per host or
    /// address it tries: each is claimed as it appears, and the last one released).
    private(set) var socket = ReactorSocket.none
    init(_ pointer: OpaquePointer) { self.pointer = pointer }

    /// Claims `fd`, libpq's socket now, releasing the one claimed before.
    func reclaim(_ fd: Int32) {
        SocketReactor.shared.release(socket)
        socket = SocketReactor.shared.claim(fd: fd)
    }

    func finish() {
        SocketReactor.shared.release(socket)
        PQfinish(pointer)
    }
}

/// The notifications of one connection as an `AsyncSequence`.
public struct PostgresNotificationSequence: AsyncSequence, Sendable {
    /// Elements are notifications.
    public typealias Element = PostgresNotification
    let connection: PostgresConnection

    /// Makes the iterator; iterate from one task at a time.
    public func makeAsyncIterator() -> Iterator { Iterator(connection: connection) }

    /// Waits for the next notification.
    public struct Iterator: AsyncIteratorProtocol {
        let connection: PostgresConnection

        /// The next notification; nil when the connection closed or the Task was cancelled.
        public mutating func next() async throws -> PostgresNotification? {
            try connection.beginListening()
            defer { connection.endListening() }
            while true {
                if Task.isCancelled { return nil }
                switch try connection.nextNotificationStep() {
                case .deliver(let n):
                    return n
                case .finished:
                    return nil
                case .park:
                    let conn = connection
                    await withTaskCancellationHandler {
                        await conn.park()
                    } onCancel: {
                        conn.unpark()
                    }
                case .waitSocket(let socket):
                    let outcome = await connection.waitForNotifications(on: socket)
                    connection.leftSocket()
                    if outcome == .cancelled { return nil }
                }
            }
        }
    }
}

extension PostgresConnection {
    func unpark() {
        let p = state.withLock { s -> CheckedContinuation<Void, Never>? in
            let p = s.listenerParked
            s.listenerParked = nil
            return p
        }
        p?.resume()
    }
}
