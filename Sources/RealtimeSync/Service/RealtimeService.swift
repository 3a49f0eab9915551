import ServiceLifecycle
import Foundation
import Logging
import Metrics
import PoolKit
import Scheduler
import Synchronization

/// Errors of the composition root: what failed and which knob to change.
public struct RealtimeServiceError: Error, Sendable, CustomStringConvertible {
    /// Stable error codes, for programs.
    public enum Code: String, Sendable, Hashable {
        /// A setting is invalid (the message names it).
        case invalidSetting = "SERVICE_INVALID_SETTING"
        /// `run()` was called twice.
        case alreadyRunning = "SERVICE_ALREADY_RUNNING"
        /// The service failed to start (the message says which part and why).
        case startFailed = "SERVICE_START_FAILED"
        /// The service has stopped.
        case stopped = "SERVICE_STOPPED"
        /// The change stream did not open its resume window (`startTimeout`) or ended first.
        case captureNotReady = "SERVICE_CAPTURE_NOT_READY"
        /// The change stream failed for good while serving (an error a reconnect cannot cure,
        /// e.g. the slot invalidated by `max_slot_wal_keep_size`, or, on PostgreSQL 15-17,
        /// the publication dropped):
        /// the server was shut down in order so that the process can be restarted. Also when it
        /// fails so during a shutdown (changes committed before it may not have reached clients).
        case captureFailed = "SERVICE_CAPTURE_FAILED"
        /// A second SIGTERM, SIGINT or SIGHUP cut the ordered shutdown short
        /// (`runUntilSignalled`): what was still to do was dropped.
        case shutdownForced = "SERVICE_SHUTDOWN_FORCED"
    }
    /// The stable code.
    public var code: Code
    /// What went wrong and what to change.
    public var message: String
    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    /// The code and the message, e.g. `SERVICE_CAPTURE_FAILED: ...` (searchable in logs).
    public var description: String { "\(code.rawValue): \(message)" }
}

/// The realtime service as users run it: a database (the given URL, or a throwaway
/// `EmbeddedPostgres`), a `ConnectionPool`, the `ChangeStream`, a `JobScheduler` with the
/// service's jobs (slot lag and pool sampling, a heartbeat that advances the slot on an
/// idle database, the demo writer) and the `RealtimeServer`, shut down in the order docs/OPERATIONS.md gives ("Shutdown order and deadlines").
///
/// A swift-service-lifecycle `Service`: `run()` serves until graceful shutdown. The
/// server alone reacts to the graceful-shutdown signal; pool, scheduler and capture run
/// under a private shutdown manager and are stopped by the server's hooks, in order:
/// stop admitting (server), cancel scheduler jobs, stop capture at the shutdown position
/// and drain the pool, close sockets with 1001 (server). An embedded cluster is removed last.
public final class RealtimeService: Service, Sendable {
    /// The demo: a table the service creates and writes a row into on an interval.
    public struct Demo: Sendable {
        /// The table (`schema.table`), created when missing as
        /// `(id serial primary key, status text, amount numeric, created_at timestamptz default now())`.
        public var table: String
        /// How often a row is written. Default 1 s.
        public var writeInterval: Duration

        /// Creates a demo setting; default `public.demo_orders` every second.
        public init(table: String = "public.demo_orders", writeInterval: Duration = .seconds(1)) {
            self.table = table
            self.writeInterval = writeInterval
        }
    }

    /// Settings of the whole service.
    public struct Configuration: Sendable {
        /// The database (`postgres://` URL or libpq string); nil starts an `EmbeddedPostgres`
        /// that is removed at shutdown.
        public var databaseURL: String?
        /// Tables to stream (`schema.table` or `table`); empty: the existing publication's
        /// (the demo table is added when `demo` is set).
        public var tables: [String]
        /// Publication name (created for `tables` when missing). Default `realtime_sync`.
        public var publication: String
        /// Replication slot name (persistent, created when missing). Default `realtime_sync`.
        public var slot: String
        /// The HTTP/WebSocket server (host, port, limits, page, deadlines).
        public var server: RealtimeServerConfiguration
        /// The connection pool used by the jobs.
        public var pool: ConnectionPoolConfiguration
        /// The capture's resume window bounds.
        public var window: ResumeWindow<ContinuousClock.Instant>.Limits
        /// Most changes in one transaction (`ChangeStream.Configuration.maxTransactionChanges`,
        /// held in memory until its commit). Default 1,000,000.
        public var maxTransactionChanges: Int
        /// Most bytes one transaction may hold until its commit
        /// (`ChangeStream.Configuration.maxTransactionBytes`). Default 256 MiB.
        public var maxTransactionBytes: Int
        /// How often the heartbeat (`pg_logical_emit_message`) runs. Default 10 s.
        public var heartbeatInterval: Duration
        /// How often slot lag and pool statistics are sampled and the publication's tables and
        /// columns re-read (an `ALTER TABLE` or `ALTER PUBLICATION … ADD TABLE` reaches new
        /// subscriptions and snapshots within this). Default 10 s.
        public var samplingInterval: Duration
        /// How long the capture may take to open its window at start. Default 30 s.
        public var startTimeout: Duration
        /// Deadline of the "cancel scheduler jobs" shutdown step. Default 2 s (20 % of 10 s,
        /// see `setShutdownDeadline`).
        public var jobsShutdownDeadline: Duration
        /// Deadline of the "stop capture and drain the pool" shutdown step. Default 3.5 s (35 %
        /// of 10 s).
        public var captureShutdownDeadline: Duration
        /// The demo writer; nil for none. `RealtimeService.embeddedDemo(logger:)` sets it.
        public var demo: Demo?
        /// Options of the embedded cluster (when `databaseURL` is nil).
        public var embedded: EmbeddedPostgres.Options
        /// Where the service logs (the server, capture, pool and scheduler get children of it).
        public var logger: Logger

        /// Creates a configuration with the defaults above. The shutdown deadlines are the
        /// 10 s split of `setShutdownDeadline(_:)`, which replaces the three shutdown
        /// deadlines of `server` too: set those after this initializer to change them.
        public init(databaseURL: String?, tables: [String] = [], publication: String = "realtime_sync",
                    slot: String = "realtime_sync", server: RealtimeServerConfiguration = RealtimeServerConfiguration(),
                    logger: Logger = Logger(label: "realtime-sync")) {
            self.databaseURL = databaseURL
            self.tables = tables
            self.publication = publication
            self.slot = slot
            self.server = server
            self.pool = ConnectionPoolConfiguration(name: "realtime-sync", maxOpen: 4)
            self.window = .init()
            self.maxTransactionChanges = 1_000_000
            self.maxTransactionBytes = 256 << 20
            self.heartbeatInterval = .seconds(10)
            self.samplingInterval = .seconds(10)
            self.startTimeout = .seconds(30)
            self.jobsShutdownDeadline = .seconds(3)
            self.captureShutdownDeadline = .seconds(5)
            self.demo = nil
            self.embedded = .init()
            self.logger = logger
            // DESIGN.md: the whole ordered shutdown is bounded, 10 s by default, split over its steps.
            self.setShutdownDeadline(.seconds(10))
        }

        /// Splits `total` over the shutdown steps: jobs 20 %, capture and pool 35 %, fan-out
        /// drain 10 %, sockets 30 %, listener 5 %.
        public mutating func setShutdownDeadline(_ total: Duration) {
            jobsShutdownDeadline = total * 0.2
            captureShutdownDeadline = total * 0.35
            server.fanoutDrainDeadline = total * 0.1
            server.socketCloseDeadline = total * 0.3
            server.listenerStopDeadline = total * 0.05
        }
    }

    /// What the service's sampling jobs last saw.
    public struct Samples: Sendable, Hashable {
        /// Bytes of WAL the slot holds (`pg_current_wal_lsn() - confirmed_flush_lsn`).
        public var slotLagBytes: Int?
        /// The pool's statistics at the last sample.
        public var pool: PoolStatistics?
        /// Heartbeats written so far.
        public var heartbeats = 0
        /// Demo rows written so far.
        public var demoRows = 0
    }

    private struct State: Sendable {
        var started = false
        var running: Running?
        var failure: RealtimeServiceError?
        var waiters: [CheckedContinuation<Running, any Error>] = []
        var samples = Samples()
    }

    /// The parts of a running service (available once it listens).
    public struct Running: Sendable {
        /// The database URL in use (the embedded cluster's when none was given).
        public var databaseURL: String
        /// The port the server listens on.
        public var port: Int
        /// The server.
        public var server: RealtimeServer
        /// The change source (the capture's stream).
        public var source: ChangeStreamSource
        /// The scheduler running the service's jobs.
        public var scheduler: JobScheduler<ContinuousClock>
        /// The URL of the live page.
        public var pageURL: String
        /// The embedded cluster's folder (removed at shutdown), when no database was given.
        public var embeddedDirectory: String?
    }

    /// The configuration in force.
    public let configuration: Configuration
    private let state = Mutex(State())
    private let logger: Logger

    /// Creates a service; nothing starts until `run()`.
    public init(_ configuration: Configuration) {
        self.configuration = configuration
        self.logger = configuration.logger
    }

    /// The default program: an embedded cluster, the demo table written every second,
    /// the live page on 127.0.0.1:8080.
    public static func embeddedDemo(logger: Logger = Logger(label: "realtime-sync")) -> Configuration {
        var configuration = Configuration(databaseURL: nil, server: RealtimeServerConfiguration(logger: logger), logger: logger)
        configuration.demo = Demo()
        return configuration
    }

    /// What the jobs last sampled.
    public var samples: Samples { self.state.withLock { $0.samples } }

    /// Whether the server's ordered shutdown ran to its end (not cut short by cancellation).
    var orderedShutdownDone: Bool {
        state.withLock { $0.running?.server.shutdownCompleted.load(ordering: .acquiring) ?? false }
    }

    /// Waits until the server listens and returns the running parts (port, URL, server).
    /// Throws when the service failed to start.
    public func waitUntilRunning() async throws -> Running {
        try await withCheckedThrowingContinuation { continuation in
            let answer = state.withLock { state -> Result<Running, RealtimeServiceError>? in
                if let running = state.running { return .success(running) }
                if let failure = state.failure { return .failure(failure) }
                state.waiters.append(continuation)
                return nil
            }
            if let answer { continuation.resume(with: answer) }
        }
    }

    private func resolveWaiters(_ result: Result<Running, RealtimeServiceError>) {
        let waiters = state.withLock { state in
            switch result {
            case .success(let running): state.running = running
            case .failure(let error): state.failure = error
            }
            defer { state.waiters.removeAll() }
            return state.waiters
        }
        for waiter in waiters { waiter.resume(with: result.mapError { $0 as any Error }) }
    }

    /// Starts everything, serves until graceful shutdown, shuts down in order and returns.
    /// Throws when a part cannot start (setup errors name the knob).
    public func run() async throws {
        let first = state.withLock { state -> Bool in
            defer { state.started = true }
            return !state.started
        }
        guard first else { throw RealtimeServiceError(.alreadyRunning, "RealtimeService.run() called twice; create a new service") }
        do {
            try await runOnce()
        } catch {
            resolveWaiters(.failure(RealtimeServiceError(.startFailed, "realtime service failed to start: \(error)")))
            throw error
        }
        resolveWaiters(.failure(RealtimeServiceError(.stopped, "realtime service has stopped")))
    }

    /// Checks the settings before anything starts (a server setting found invalid only by
    /// `RealtimeServer.run()` came after the pool, capture and scheduler had started).
    private func validate() throws {
        try configuration.server.validate()
        guard ReplicationConnection.isValidSlotName(configuration.slot) else {
            throw RealtimeServiceError(.invalidSetting, "slot '\(configuration.slot)' is not a valid replication slot name: use 1-63 characters from a-z, 0-9 and _ (--slot / REALTIME_SYNC_SLOT)")
        }
        if configuration.server.snapshotReader == nil, configuration.pool.maxOpen < 2 {
            throw RealtimeServiceError(.invalidSetting, "pool.maxOpen is \(configuration.pool.maxOpen); the service needs 2 or more (--pool-max-open / REALTIME_SYNC_POOL_MAX_OPEN): snapshots take at most maxOpen - 1, so that one connection stays for its jobs")
        }
        guard (1...Int(UInt32.max)).contains(configuration.maxTransactionChanges) else {
            throw RealtimeServiceError(.invalidSetting, "maxTransactionChanges is \(configuration.maxTransactionChanges); it must be from 1 to \(UInt32.max) (--max-transaction-changes / REALTIME_SYNC_MAX_TRANSACTION_CHANGES)")
        }
        guard configuration.maxTransactionBytes >= 1 else {
            throw RealtimeServiceError(.invalidSetting, "maxTransactionBytes is \(configuration.maxTransactionBytes); it must be at least 1 (--max-transaction-bytes / REALTIME_SYNC_MAX_TRANSACTION_BYTES)")
        }
    }

    private func runOnce() async throws {
        try validate()
        var embedded: EmbeddedPostgres?
        let url: String
        if let given = configuration.databaseURL, !given.isEmpty {
            url = given
        } else {
            // A warning: a deployment whose database URL did not arrive runs the demo instead.
            logger.warning("no database given (--database-url, REALTIME_SYNC_DATABASE_URL or DATABASE_URL): starting an embedded PostgreSQL with the demo table (not for production)")
            let cluster: EmbeddedPostgres
            do {
                cluster = try await EmbeddedPostgres.start(configuration.embedded)
            } catch {
                throw RealtimeServiceError(.startFailed, "no database given (--database-url, REALTIME_SYNC_DATABASE_URL or DATABASE_URL), and the embedded PostgreSQL for the demo did not start: \(error)")
            }
            embedded = cluster
            url = cluster.url
            logger.info("embedded PostgreSQL running", metadata: ["url": "\(cluster.redactedURL)", "directory": "\(cluster.directory)"])
        }
        do {
            try await serve(url: url, embeddedDirectory: embedded?.directory)
        } catch {
            await embedded?.shutdown()
            throw error
        }
        if let embedded {
            await embedded.shutdown()
            logger.info("embedded PostgreSQL stopped and removed")
        }
    }

    private func child(_ label: String) -> Logger {
        var child = logger
        child[metadataKey: "component"] = .string(label)
        return child
    }

    private func serve(url: String, embeddedDirectory: String?) async throws {
        var tables = configuration.tables
        if let demo = configuration.demo {
            try await Self.createDemoTable(demo.table, url: url)
            if !tables.contains(demo.table) { tables.append(demo.table) }
        }
        let stream = ChangeStream(.init(
            connectionString: url, slotName: configuration.slot, publicationName: configuration.publication,
            tables: tables, window: configuration.window, lagInterval: configuration.samplingInterval,
            stopCatchUp: min(.seconds(2), configuration.captureShutdownDeadline / 2),
            maxTransactionChanges: configuration.maxTransactionChanges, maxTransactionBytes: configuration.maxTransactionBytes,
            logger: child("capture")))
        let source = ChangeStreamSource(stream: stream)
        let pool = ConnectionPool<PostgresConnection, ContinuousClock>(postgres: url, configuration: configuration.pool, logger: child("pool"))
        let scheduler = JobScheduler(logger: child("scheduler"))
        let captureEnded = OneShot()
        let captureFailed = OneShot()

        var serverConfiguration = configuration.server
        if serverConfiguration.indexHTML == RealtimeServerConfiguration.placeholderPage {
            serverConfiguration.indexHTML = LivePage.html(table: configuration.demo?.table ?? tables.first ?? "")
        }
        if serverConfiguration.snapshotReader == nil {
            serverConfiguration.snapshotReader = TableSnapshotReader(pool: pool)
            // One connection stays for the service's jobs (heartbeat, slot lag, catalog) and
            // the `since` checks, however many clients ask for snapshots.
            serverConfiguration.maxConcurrentSnapshots = min(serverConfiguration.maxConcurrentSnapshots, configuration.pool.maxOpen - 1)
            serverConfiguration.snapshotTurnTimeout = configuration.pool.acquireTimeout
        }
        if serverConfiguration.walPosition == nil, let reader = serverConfiguration.snapshotReader {
            serverConfiguration.walPosition = { try await reader.currentWALPosition() }
        }
        let jobsDeadline = configuration.jobsShutdownDeadline
        let captureDeadline = configuration.captureShutdownDeadline
        serverConfiguration.shutdownHooks = [
            ShutdownHook(name: "cancel scheduler jobs", deadline: jobsDeadline) {
                let report = await scheduler.shutdown(deadline: jobsDeadline * 0.8)
                return report.cutOff.isEmpty ? nil : "\(report.cutOff.count) running jobs cancelled (jobsShutdownDeadline=\(jobsDeadline); --shutdown-deadline sets it)"
            },
            ShutdownHook(name: "stop capture at the shutdown position and drain the pool", deadline: captureDeadline) {
                // Both parts within the step's deadline, whatever the capture took: the pool's
                // drain ends by 85 % of it (its cut-off, cancelling queries on the server and
                // closing, gets the rest), and the capture is waited for until 60 % at most
                // (one that has not ended by then is cancelled by the teardown). The drain
                // had 40 % counted from the capture's end, so a slow stop left it no time
                // and the step's deadline cancelled it before its cut-off ran.
                let start = ContinuousClock.now
                stream.stop()
                _ = await captureEnded.wait(atMost: captureDeadline * 0.6)
                let report = await pool.drain(deadline: start.advanced(by: captureDeadline * 0.85))
                return report.cutOff.isEmpty && report.closesUnfinished == 0 ? nil : "pool: \(report)"
            },
        ] + configuration.server.shutdownHooks
        let server = RealtimeServer(source: source, configuration: serverConfiguration)

        try await withThrowingTaskGroup(of: Void.self) { group in
            // Pool, scheduler and capture run in a detached task (documented exception to
            // DESIGN.md rule 3, as in HTTPListener): it inherits no graceful-shutdown manager,
            // so the process's signal reaches only the server, which stops them in order via
            // its hooks (`tearDown` covers the error path). The task is owned here: awaited by
            // a child task, and cancelled with it.
            let componentsEnded = OneShot()
            let components = Task.detached {
                defer { componentsEnded.signal() }
                try await withThrowingTaskGroup(of: Void.self) { components in
                    components.addTask { try await pool.run() }
                    components.addTask { try await scheduler.run() }
                    components.addTask {
                        do {
                            try await stream.run()
                            captureEnded.signal(error: nil)
                        } catch is CancellationError {
                            captureEnded.signal(error: nil)  // cancelled, not failed
                            throw CancellationError()
                        } catch {
                            captureEnded.signal(error: "\(error)")
                            throw error
                        }
                    }
                    try await components.waitForAll()
                }
            }
            group.addTask {
                // Cancelled first, the components are cancelled and not waited for: `tearDown`
                // has bounded that wait, and a capture that ignores its cancellation is left
                // behind (logged) rather than holding `run()`.
                await withTaskCancellationHandler {
                    await componentsEnded.wait()
                } onCancel: {
                    components.cancel()
                }
                // Cancelled: the components are cancelled too, and get a bounded time to end
                // (the capture then releases its walsender and the slot) before `run()` returns.
                if !componentsEnded.isSignalled { _ = await componentsEnded.wait(atMost: .seconds(3)) }
                if componentsEnded.isSignalled { try await components.value }
            }
            do {
                try await waitForWindow(stream, ended: captureEnded)
                try await pool.withConnection(label: "catalog") { connection in
                    try await source.loadCatalog(using: connection)
                }
                logger.info("capturing", metadata: ["slot": "\(configuration.slot)", "publication": "\(configuration.publication)",
                                                    "tables": "\(source.catalog.tableNames.joined(separator: ","))"])
                try scheduleJobs(scheduler, pool: pool, stream: stream, source: source)
                let host = serverConfiguration.host
                group.addTask { [self] in
                    let port = try await server.waitUntilListening()
                    let shownHost = host == "0.0.0.0" || host == "::" ? "127.0.0.1" : host
                    let pageURL = "http://\(shownHost.contains(":") ? "[\(shownHost)]" : shownHost):\(port)/"
                    resolveWaiters(.success(Running(databaseURL: url, port: port, server: server, source: source,
                                                    scheduler: scheduler, pageURL: pageURL, embeddedDirectory: embeddedDirectory)))
                }
                // A capture that fails for good leaves nothing to serve: the server then shuts
                // down in order, and `run()` throws, so that the process exits and is restarted.
                group.addTask {
                    await captureEnded.wait()
                    guard let failure = captureEnded.error, !server.isDraining, !Task.isCancelled else { return }
                    self.logger.error("change capture failed for good; shutting the server down", metadata: ["error": "\(failure)"])
                    captureFailed.signal(error: failure)
                    server.requestShutdown()
                }
                try await server.run()
            } catch {
                let shutDownWhileStarting = error is StartInterrupted
                if shutDownWhileStarting {
                    logger.notice("realtime service shut down while starting")
                } else {
                    logger.error("realtime service stopping after an error", metadata: ["error": "\(error)"])
                }
                await tearDown(scheduler: scheduler, stream: stream, captureEnded: captureEnded, pool: pool,
                               firstWait: configuration.captureShutdownDeadline) { components.cancel() }
                group.cancelAll()
                if shutDownWhileStarting { return }
                throw error
            }
            // The hooks have already stopped everything (the capture hook waited its deadline
            // for the capture); this only covers hooks cut off by their deadline.
            await tearDown(scheduler: scheduler, stream: stream, captureEnded: captureEnded, pool: pool,
                           firstWait: .zero) { components.cancel() }
            if !captureEnded.isSignalled { group.cancelAll() }
            do {
                try await group.waitForAll()
            } catch is CancellationError {
            } catch let error as CaptureSetupError {
                throw error
            } catch {
                if !captureFailed.isSignalled && captureEnded.error == nil {
                    logger.warning("a component ended with an error at shutdown", metadata: ["error": "\(error)"])
                }
            }
            // Failed while serving (the watcher shut the server down), or during the shutdown
            // (the watcher stood aside, the server being stopped already): either way the
            // process must not exit 0 as if every change had been read.
            if captureFailed.isSignalled || captureEnded.error != nil {
                let failure = captureFailed.error ?? captureEnded.error ?? "unknown error"
                let when = captureFailed.isSignalled ? "the server was shut down" : "during the shutdown, so changes committed before it may not have reached the clients"
                throw RealtimeServiceError(.captureFailed, "the change stream for slot \(configuration.slot) failed and cannot resume by reconnecting: \(failure); \(when) (check the slot and the publication \(configuration.publication); see OPERATIONS.md)")
            }
        }
    }

    /// Stops what the hooks did not: bounded. A capture still running `firstWait` after
    /// `stop()` (a statement `stop()` does not reach, such as a `CREATE_REPLICATION_SLOT`
    /// waiting for another session's transaction) is cancelled, which cancels its statement
    /// on the server, and is waited for 2 s more at most.
    private func tearDown(scheduler: JobScheduler<ContinuousClock>, stream: ChangeStream, captureEnded: OneShot,
                          pool: ConnectionPool<PostgresConnection, ContinuousClock>, firstWait: Duration,
                          cancelComponents: () -> Void) async {
        await scheduler.shutdown(deadline: .seconds(1))
        stream.stop()
        if await !captureEnded.wait(atMost: firstWait) {
            logger.warning("capture still running after stop() (captureShutdownDeadline=\(configuration.captureShutdownDeadline); --shutdown-deadline sets it); cancelling it")
            cancelComponents()
            if await !captureEnded.wait(atMost: .seconds(2)) {
                logger.error("capture did not end within 2 s of its cancellation; leaving it behind")
            }
        }
        _ = await pool.drain(deadline: .now.advanced(by: .seconds(1)))
    }

    /// Thrown by the start when a graceful shutdown begins before the server runs.
    private struct StartInterrupted: Error {}

    /// Waits until the capture has opened its resume window (or failed, or a graceful
    /// shutdown began: a SIGTERM while starting ends the start).
    private func waitForWindow(_ stream: ChangeStream, ended: OneShot) async throws {
        let deadline = ContinuousClock.now.advanced(by: configuration.startTimeout)
        while stream.statistics.oldestResumable == nil {
            if Task.isShuttingDownGracefully { throw StartInterrupted() }
            if ended.isSignalled {
                throw RealtimeServiceError(.captureNotReady, "the change stream for slot \(configuration.slot) ended before it opened its window: \(ended.error ?? "stopped")")
            }
            if ContinuousClock.now >= deadline {
                let cause = stream.statistics.lastError.map { "; its last attempt failed: \($0)" } ?? "; is the database reachable and wal_level=logical?"
                throw RealtimeServiceError(.captureNotReady, "the change stream for slot \(configuration.slot) did not open its window within \(configuration.startTimeout) (startTimeout, --start-timeout / REALTIME_SYNC_START_TIMEOUT)\(cause)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    // MARK: Jobs

    /// The `reason` values of `realtime_sync_pool_closes`.
    static let poolCloseReasons = ["broken", "lifetime", "idle_time", "max_idle"]

    /// What the pool's counters grew by from one sample to the next (from zero for the first):
    /// failed connects, and closes by `poolCloseReasons`. Never negative.
    static func poolCounterIncrements(from previous: PoolStatistics?, to current: PoolStatistics) -> (connectFailures: Int, closes: [String: Int]) {
        func grew(_ count: (PoolStatistics) -> Int) -> Int { max(0, count(current) - (previous.map(count) ?? 0)) }
        return (grew(\.connectFailures), [
            "broken": grew(\.closedBroken), "lifetime": grew(\.closedLifetime),
            "idle_time": grew(\.closedIdleTime), "max_idle": grew(\.closedMaxIdle),
        ])
    }

    private func scheduleJobs(_ scheduler: JobScheduler<ContinuousClock>, pool: ConnectionPool<PostgresConnection, ContinuousClock>,
                              stream: ChangeStream, source: ChangeStreamSource) throws {
        let slot = configuration.slot
        let lagGauge = Gauge(label: "realtime_sync_replication_slot_lag_bytes", dimensions: [("slot", slot)])
        let poolGauges = ["open", "in_use", "idle", "waiting"].map {
            ($0, Gauge(label: "realtime_sync_pool_connections", dimensions: [("state", $0)]))
        }
        // What otherwise only `statistics` tells: failed connects (a database outage shows
        // here first) and closes by reason, counted from one sample to the next.
        let connectFailures = Counter(label: "realtime_sync_pool_connect_failures")
        let closes = Dictionary(uniqueKeysWithValues: Self.poolCloseReasons.map {
            ($0, Counter(label: "realtime_sync_pool_closes", dimensions: [("reason", $0)]))
        })
        // A run may wait for a connection for the pool's acquireTimeout, then gets 5 s for its
        // statement: an exhausted pool then fails the run with the pool's own error (naming
        // maxOpen and acquireTimeout), not with a timeout of the job's.
        let jobTimeout = configuration.pool.acquireTimeout + .seconds(5)
        let jobOptions = { (name: String) in JobOptions(name: name, overlap: .skip, timeout: jobTimeout, ownMetrics: true) }
        try scheduler.schedule(.every(configuration.samplingInterval), options: jobOptions("slot lag")) { _ in
            let lag = try await pool.withConnection(label: "slot lag") { connection in
                try await CaptureSetup.slotLagBytes(connection, slot: slot)
            }
            if let lag { lagGauge.record(lag) }
            self.state.withLock { $0.samples.slotLagBytes = lag }
        }
        try scheduler.schedule(.every(configuration.samplingInterval), options: jobOptions("pool statistics")) { _ in
            let statistics = pool.statistics
            for (name, gauge) in poolGauges {
                switch name {
                case "open": gauge.record(statistics.open)
                case "in_use": gauge.record(statistics.inUse)
                case "idle": gauge.record(statistics.idle)
                default: gauge.record(statistics.waiting)
                }
            }
            let previous = self.state.withLock { state -> PoolStatistics? in
                defer { state.samples.pool = statistics }
                return state.samples.pool
            }
            let counts = Self.poolCounterIncrements(from: previous, to: statistics)
            connectFailures.increment(by: counts.connectFailures)
            for (reason, increment) in counts.closes { closes[reason]?.increment(by: increment) }
        }
        // The catalog was read once at start: re-read it, so that after an ALTER TABLE new
        // subscriptions resolve the new columns and snapshots stop selecting dropped ones, and
        // a table added to the publication can be subscribed to.
        try scheduler.schedule(.every(configuration.samplingInterval), options: jobOptions("catalog refresh")) { _ in
            _ = try await pool.withConnection(label: "catalog refresh") { connection in
                try await source.loadCatalog(using: connection)
            }
        }
        try scheduler.schedule(.every(configuration.heartbeatInterval), options: jobOptions("heartbeat")) { _ in
            _ = try await pool.withConnection(label: "heartbeat") { connection in
                try await connection.query("SELECT pg_logical_emit_message(false, 'realtime-sync-heartbeat', '')")
            }
            self.state.withLock { $0.samples.heartbeats += 1 }
        }
        if let demo = configuration.demo {
            let statuses = ["new", "paid", "shipped", "delivered", "cancelled"]
            let table = demo.table
            try scheduler.schedule(.every(demo.writeInterval), options: jobOptions("demo writer")) { _ in
                let status = statuses.randomElement() ?? "new"
                let amount = String(format: "%.2f", Double.random(in: 1...500))
                _ = try await pool.withConnection(label: "demo writer") { connection in
                    try await connection.query("INSERT INTO \(try Self.quoted(table, connection)) (status, amount) VALUES ($1, $2::numeric)", status, amount)
                }
                self.state.withLock { $0.samples.demoRows += 1 }
            }
        }
    }

    private static func quoted(_ table: String, _ connection: PostgresConnection) throws -> String {
        let parts = table.split(separator: ".", maxSplits: 1).map(String.init)
        return try parts.map { try connection.escapeIdentifier($0) }.joined(separator: ".")
    }

    /// Creates the demo table when missing (see `Demo.table`).
    public static func createDemoTable(_ table: String, url: String) async throws {
        let connection = try await PostgresConnection.connect(to: url)
        do {
            _ = try await connection.execute("""
                CREATE TABLE IF NOT EXISTS \(try quoted(table, connection)) (
                    id serial PRIMARY KEY, status text, amount numeric, created_at timestamptz DEFAULT now())
                """)
        } catch {
            await connection.close()
            throw error
        }
        await connection.close()
    }

    /// Drops replication slot `slot` (refused by Postgres while a stream uses it). Returns
    /// whether it existed.
    public static func dropSlot(_ slot: String, url: String) async throws -> Bool {
        let stream = ChangeStream(.init(connectionString: url, slotName: slot, publicationName: slot))
        return try await stream.dropSlot()
    }
}

/// A signal that is raised once (with an optional error text) and awaited by any number of tasks.
final class OneShot: Sendable {
    private struct State {
        var signalled = false
        var error: String?
        var nextID = 0
        var waiters: [Int: CheckedContinuation<Void, Never>] = [:]
    }
    private let state = Mutex(State())

    var isSignalled: Bool { state.withLock { $0.signalled } }
    var error: String? { state.withLock { $0.error } }

    func signal(error: String? = nil) {
        let waiters = state.withLock { state in
            state.signalled = true
            state.error = error
            defer { state.waiters.removeAll() }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Returns true when signalled within `limit`, false after it. The caller's cancellation
    /// does not cut the wait short (a teardown that was itself cancelled still gives what it
    /// stops its bounded time).
    func wait(atMost limit: Duration) async -> Bool {
        await Task.detached {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await self.wait() }
                group.addTask { try? await Task.sleep(for: limit) }
                await group.next()
                group.cancelAll()
            }
        }.value
        return isSignalled
    }

    /// Returns when signalled, or when the calling task is cancelled.
    func wait() async {
        let id = state.withLock { state in
            state.nextID += 1
            return state.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let now = state.withLock { state -> Bool in
                    if state.signalled || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume()
        }
    }
}
