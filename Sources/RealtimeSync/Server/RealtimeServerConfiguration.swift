import Foundation
import Logging
import PoolKit
import Prometheus

/// An HTTP request for `/ws` as the admission hooks see it: the request target and headers.
public struct UpgradeRequest: Sendable {
    /// The request target, path and query (`/ws?access_token=…`).
    public var target: String
    /// Header fields, names lower-cased, in order.
    public var headers: [(name: String, value: String)]

    /// Creates a request.
    public init(target: String, headers: [(name: String, value: String)]) {
        self.target = target
        self.headers = headers.map { ($0.name.lowercased(), $0.value) }
    }

    /// The path without the query.
    public var path: String {
        if let query = target.firstIndex(of: "?") { return String(target[..<query]) }
        return target
    }

    /// The first value of header `name` (case-insensitive).
    public func header(_ name: String) -> String? {
        let lowered = name.lowercased()
        return headers.first { $0.name == lowered }?.value
    }

    /// The raw (not percent-decoded) value of query parameter `name`.
    public func queryParameter(_ name: String) -> String? {
        guard let start = target.firstIndex(of: "?") else { return nil }
        for pair in target[target.index(after: start)...].split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            if parts.first.map(String.init) == name { return parts.count > 1 ? String(parts[1]) : "" }
        }
        return nil
    }
}

/// What the admission hook decides about a WebSocket upgrade (`JWTAuthenticator.decide` for JWT auth).
public enum UpgradeDecision: Sendable {
    /// Upgrade; the session may subscribe to what `access` grants. `subject` is logged. At
    /// `expiresAt` (a token's `exp`; nil: never) the server closes the socket with 1008.
    case admit(TableAccess, subject: String?, expiresAt: Date? = nil)
    /// No upgrade: `401` with `{"error":"unauthorized"}`. `reason` is logged, never sent.
    case unauthorized(reason: String)
}

/// One step of the ordered shutdown that the composition root plugs in (cancel the
/// scheduler's jobs; stop capture at the shutdown LSN and drain the pool).
public struct ShutdownHook: Sendable {
    /// Named in the step's log line, e.g. `cancel scheduler jobs`.
    public var name: String
    /// How long the step may take; then it is cancelled and the log says so.
    public var deadline: Duration
    /// The step. Returns what it cut off (e.g. `2 running jobs cancelled`), or nil for nothing.
    public var run: @Sendable () async throws -> String?

    /// Creates a hook.
    public init(name: String, deadline: Duration, run: @escaping @Sendable () async throws -> String?) {
        self.name = name
        self.deadline = deadline
        self.run = run
    }
}

/// Settings of a `RealtimeServer`. Every limit named in an error or log is a field here.
public struct RealtimeServerConfiguration: Sendable {
    /// Address to listen on. Default `127.0.0.1`.
    public var host: String
    /// Port to listen on; 0 picks a free one (see `RealtimeServer.waitUntilListening()`). Default 8080.
    public var port: Int
    /// Connections the kernel queues before the server accepts them (`listen(2)` backlog;
    /// Linux caps it at `net.core.somaxconn`). When the queue is full, the kernel drops the
    /// client's handshake and the client retries only after about a second, so a burst of
    /// connects (clients reconnecting after a deploy) needs room. Values are clamped to
    /// 1...65,535. Default 4,096.
    public var listenBacklog: Int
    /// Most client connections (HTTP and WebSocket) open at once; one more is answered 503
    /// with `Retry-After` and closed (after a short read of what it sent, so the answer is not lost to a reset). The process's open files are shared with the
    /// database connections and the runtime (libdispatch traps when it cannot get a
    /// descriptor), so clients must not be able to take them all. nil (default): the
    /// process's open-file limit (`RLIMIT_NOFILE`, `ulimit -n`) less an eighth of it, and at
    /// least 64, kept for the rest; read when the server is created.
    public var maxConnections: Int?
    /// Largest frame, and largest message, a client may send (close 1009 beyond). Default 64 KiB.
    public var maxClientMessageBytes: Int
    /// A connection that has not sent a complete first request head within this is closed
    /// (idle probes, slow-loris clients). Default 10 s.
    public var firstRequestTimeout: Duration
    /// How often the server pings each socket. A socket that answered neither of its last
    /// two pings when the next is due is dropped with 1001 (after two to three intervals of
    /// silence). Default 30 s.
    public var pingInterval: Duration
    /// How long the server waits for the client's close frame after sending its own, and at
    /// most for its own close frame to be written (its answer to the client's close, or NIO's
    /// to a frame its decoder refused) before the connection is dropped. Default 5 s.
    public var closeTimeout: Duration
    /// The longest an open socket's token expiry waits before it looks at the wall clock
    /// again (`JWTAuthenticator.now`): a monotonic timer does not count time the host was
    /// suspended, so a token's `exp` is re-checked at least this often. Default 60 s.
    public var tokenExpiryCheckInterval: Duration
    /// Each socket's send queue bounds (close 1013 beyond). Default 1,024 messages or 8 MiB.
    public var queueLimits: OutboundQueue<[UInt8]>.Limits
    /// Fan-out bounds (`maxSubscriptionsPerClient`, default 100).
    public var hubLimits: FanoutHub.Limits
    /// HS256 JWT auth (PROTOCOL.md "Auth"): when set, it decides every `/ws` upgrade and
    /// `admission` is not consulted. Default nil: auth off, and the server logs a warning at
    /// start (set `--jwt-secret` / `REALTIME_SYNC_JWT_SECRET` to turn it on).
    public var auth: JWTAuthenticator?
    /// Browser origins (`https://app.example.com`, as the `Origin` header gives them) whose
    /// pages may open `/ws`; `["*"]` allows any. A request without `Origin` (not a browser)
    /// and one from the server's own origin when it is addressed by IP address or `localhost`
    /// (the live page on `http://127.0.0.1:8080`) are always allowed; a page served under a DNS
    /// name must be listed here while auth is off (the name's owner could point it at this
    /// server: DNS rebinding).
    /// Default nil: with `auth` off, only those (so that a page on another site cannot read the
    /// changes through a visitor's browser, which sends it no token but reaches a server on
    /// localhost or the intranet); with `auth` on, any origin (every socket needs a token).
    /// A refused origin gets `403 {"error":"origin_not_allowed"}`.
    public var allowedOrigins: [String]?
    /// Decides each `/ws` upgrade when `auth` is nil (a custom hook). Default: admit everyone
    /// to every table.
    public var admission: @Sendable (UpgradeRequest) -> UpgradeDecision
    /// Steps run in order between "stop admitting" and "close sockets" (scheduler jobs,
    /// capture and pool). Empty by default.
    public var shutdownHooks: [ShutdownHook]
    /// Deadline for the fan-out to deliver every change up to the cursor at which shutdown began. Default 3 s.
    public var fanoutDrainDeadline: Duration
    /// Deadline for flushing every socket, sending 1001 and receiving the client's close. Default 5 s.
    public var socketCloseDeadline: Duration
    /// Deadline for the HTTP listener to stop after the sockets are closed. Default 2 s.
    public var listenerStopDeadline: Duration
    /// Where `/metrics` metrics live; pass the application's registry to expose its other metrics too.
    public var metricsRegistry: PrometheusCollectorRegistry
    /// The page served at `/`.
    public var indexHTML: String
    /// Where `subscribe` with `snapshot: true` reads rows (a pooled Postgres connection);
    /// nil answers such subscriptions with `invalid_message`. `RealtimeService` sets it.
    public var snapshotReader: TableSnapshotReader?
    /// Reads the database's current WAL position. A `since` cursor beyond it cannot have come
    /// from this database (another database, or one restored from a backup) and is refused
    /// with `invalid_message`; without the check such a subscription would stay silent until
    /// the stream passed the cursor. nil: not checked (such a cursor is taken). `RealtimeService`
    /// sets it (a pooled connection, asked only for a `since` ahead of both the server's own
    /// stream and the highest position an earlier question returned, one question at a time);
    /// when it throws, the subscription gets `internal`.
    public var walPosition: (@Sendable () async throws -> LSN)?
    /// Most rows a snapshot may send (after the filter); more gives `snapshot_too_large`. Default 10,000.
    public var snapshotMaxRows: Int
    /// Most rows in one `snapshot` message, and in one FETCH from Postgres (each FETCH is also
    /// sized by the previous one's bytes to about `snapshotChunkBytes`). Default 500.
    public var snapshotChunkRows: Int
    /// Snapshots that may run at once, server-wide; more wait their turn in arrival order (the
    /// client's later messages wait behind them). Each holds a pooled connection for its
    /// whole length, so this keeps clients from taking every connection the service's own
    /// jobs need. Default 4; `RealtimeService` lowers it to one less than its pool's `maxOpen`
    /// when that is smaller.
    public var maxConcurrentSnapshots: Int
    /// How long a `snapshot: true` subscription waits for its turn under
    /// `maxConcurrentSnapshots`; then it gets `internal` (subscribe again), instead of waiting
    /// behind snapshots whose clients stopped reading until their ping timeout. Default 30 s;
    /// `RealtimeService` sets it to its pool's `acquireTimeout` (`--pool-acquire-timeout`).
    public var snapshotTurnTimeout: Duration
    /// A `snapshot` message is sent once its rows reach this many bytes; each FETCH aims at
    /// about this much row text too, so wide rows are fetched a few at a time. Default 64 KiB.
    public var snapshotChunkBytes: Int
    /// Logger for the server, its sessions and its shutdown.
    public var logger: Logger

    /// Creates a configuration with the defaults above.
    public init(host: String = "127.0.0.1", port: Int = 8080, logger: Logger = Logger(label: "realtime-sync.server")) {
        self.host = host
        self.port = port
        self.listenBacklog = 4_096
        self.maxConnections = nil
        self.maxClientMessageBytes = 64 << 10
        self.firstRequestTimeout = .seconds(10)
        self.pingInterval = .seconds(30)
        self.closeTimeout = .seconds(5)
        self.tokenExpiryCheckInterval = .seconds(60)
        self.queueLimits = .init()
        self.hubLimits = .init()
        self.auth = nil
        self.allowedOrigins = nil
        self.admission = { _ in .admit(.unrestricted, subject: nil) }
        self.shutdownHooks = []
        self.fanoutDrainDeadline = .seconds(3)
        self.socketCloseDeadline = .seconds(5)
        self.listenerStopDeadline = .seconds(2)
        self.metricsRegistry = PrometheusCollectorRegistry()
        self.indexHTML = RealtimeServerConfiguration.placeholderPage
        self.snapshotReader = nil
        self.walPosition = nil
        self.snapshotMaxRows = 10_000
        self.snapshotChunkRows = 500
        self.snapshotChunkBytes = 64 << 10
        self.maxConcurrentSnapshots = 4
        self.snapshotTurnTimeout = .seconds(30)
        self.logger = logger
    }

    /// Checks every limit; the error names the field. `RealtimeServer.run()` calls it first,
    /// so a limit set out of range after `init` (the limit types check only their own
    /// initializers) fails at start instead of misbehaving later.
    public func validate() throws(RealtimeServerError) {
        func bad(_ message: String) -> RealtimeServerError { RealtimeServerError(.invalidConfiguration, "RealtimeServerConfiguration." + message) }
        guard (0...65_535).contains(port) else { throw bad("port is \(port); it must be 0 (any free port) to 65535") }
        if let maxConnections, maxConnections < 1 {
            throw bad("maxConnections is \(maxConnections); it must be at least 1, or nil for the default from the open-file limit (--max-connections / REALTIME_SYNC_MAX_CONNECTIONS)")
        }
        guard maxClientMessageBytes >= 16 else { throw bad("maxClientMessageBytes is \(maxClientMessageBytes); it must be at least 16") }
        guard pingInterval > .zero else { throw bad("pingInterval is \(pingInterval); it must be positive") }
        guard tokenExpiryCheckInterval > .zero else { throw bad("tokenExpiryCheckInterval is \(tokenExpiryCheckInterval); it must be positive") }
        guard firstRequestTimeout > .zero else { throw bad("firstRequestTimeout is \(firstRequestTimeout); it must be positive") }
        guard closeTimeout > .zero else { throw bad("closeTimeout is \(closeTimeout); it must be positive") }
        if let allowedOrigins, allowedOrigins.isEmpty {
            throw bad("allowedOrigins is empty; leave it nil for the default, or list origins (--allowed-origins / REALTIME_SYNC_ALLOWED_ORIGINS)")
        }
        for origin in allowedOrigins ?? [] where origin != "*" {
            // An Origin header is scheme://host[:port], never with a path, query or trailing
            // slash, nor a default port: such an entry would silently match nothing.
            let authority = origin.range(of: "://").map { origin[$0.upperBound...] } ?? ""
            let defaultPort = (origin.lowercased().hasPrefix("https://") && authority.hasSuffix(":443"))
                || (origin.lowercased().hasPrefix("http://") && authority.hasSuffix(":80"))
            guard !authority.isEmpty, !authority.contains(where: { "/?#".contains($0) }), !defaultPort else {
                throw bad("allowedOrigins has \"\(origin)\"; each entry must be \"*\" or scheme://host[:port] without a path and without the scheme's default port, as browsers send it in Origin (e.g. https://app.example.com; --allowed-origins / REALTIME_SYNC_ALLOWED_ORIGINS)")
            }
        }
        guard queueLimits.maxMessages >= 1 else { throw bad("queueLimits.maxMessages is \(queueLimits.maxMessages); it must be at least 1") }
        guard queueLimits.maxBytes >= 1 else { throw bad("queueLimits.maxBytes is \(queueLimits.maxBytes); it must be at least 1") }
        guard hubLimits.maxSubscriptionsPerClient >= 1 else { throw bad("hubLimits.maxSubscriptionsPerClient is \(hubLimits.maxSubscriptionsPerClient); it must be at least 1") }
        guard hubLimits.maxIndexedValues >= 1 else { throw bad("hubLimits.maxIndexedValues is \(hubLimits.maxIndexedValues); it must be at least 1") }
        for (name, deadline) in [("fanoutDrainDeadline", fanoutDrainDeadline), ("socketCloseDeadline", socketCloseDeadline), ("listenerStopDeadline", listenerStopDeadline)] {
            guard deadline >= .zero else { throw bad("\(name) is \(deadline); it must not be negative") }
        }
        guard snapshotMaxRows >= 0 else { throw bad("snapshotMaxRows is \(snapshotMaxRows); it must be 0 (only empty snapshots) or more") }
        guard snapshotTurnTimeout > .zero else { throw bad("snapshotTurnTimeout is \(snapshotTurnTimeout); it must be positive") }
        guard snapshotChunkRows >= 1 else { throw bad("snapshotChunkRows is \(snapshotChunkRows); it must be at least 1") }
        guard snapshotChunkBytes >= 1 else { throw bad("snapshotChunkBytes is \(snapshotChunkBytes); it must be at least 1") }
        guard maxConcurrentSnapshots >= 1 else { throw bad("maxConcurrentSnapshots is \(maxConcurrentSnapshots); it must be at least 1") }
        // Clocks cannot sleep that far (the runtime traps converting the instant).
        let longest = ConnectionPoolConfiguration.longestWait
        for (name, value) in [("pingInterval", pingInterval), ("firstRequestTimeout", firstRequestTimeout), ("closeTimeout", closeTimeout),
                              ("tokenExpiryCheckInterval", tokenExpiryCheckInterval),
                              ("fanoutDrainDeadline", fanoutDrainDeadline), ("socketCloseDeadline", socketCloseDeadline),
                              ("listenerStopDeadline", listenerStopDeadline), ("snapshotTurnTimeout", snapshotTurnTimeout)] {
            guard value <= longest else { throw bad("\(name) is \(value); it must be at most \(longest) (about 100 years)") }
        }
    }

    /// The placeholder page at `/` until the live page lands.
    public static let placeholderPage = """
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><title>realtime-sync</title></head>
        <body><h1>realtime-sync</h1>
        <p>WebSocket endpoint: <code>/ws</code>. Probes: <code>/healthz</code>, <code>/readyz</code>. Metrics: <code>/metrics</code>.</p>
        </body></html>
        """
}
