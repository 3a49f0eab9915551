import Logging
import Metrics
import PoolKit
import ServiceLifecycle
import Synchronization

/// Counters and positions of a `ChangeStream`.
public struct ChangeStreamStatistics: Sendable {
    /// Whether the replication connection is streaming now.
    public var connected: Bool
    /// Committed transactions appended to the window (replays not counted).
    public var transactions: Int
    /// Changes appended to the window.
    public var changes: Int
    /// How many times the replication connection was re-established after a failure.
    public var reconnects: Int
    /// Changes held in the resume window.
    public var windowCount: Int
    /// The oldest cursor a consumer can resume after (nil before the window opens).
    public var oldestResumable: Cursor?
    /// The newest change's cursor.
    public var lastCursor: Cursor?
    /// The position reported to the server as flushed (held at the window's start).
    public var confirmedFlush: LSN
    /// Bytes of WAL the slot holds, as of the last check (`pg_current_wal_lsn() - confirmed_flush_lsn`).
    public var slotLagBytes: Int?
    /// Consumers registered now.
    public var consumers: Int
    /// Consumers cut off for falling behind (`consumerBufferLimit`).
    public var consumersCutOff: Int
    /// How many times the current replication connection's reader parked on the reactor
    /// waiting for data (0 when not connected; diagnostics for throughput tuning).
    public var readerWaits: Int
    /// Why the last connection attempt failed, while the stream retries (nil once streaming).
    public var lastError: String?
}

/// Streams committed row changes from a persistent logical replication slot (pgoutput) into
/// a resume window and out to any number of consumers, in commit order.
///
/// `run()` (a swift-service-lifecycle `Service`) checks the database (`CaptureSetup`),
/// creates the publication and the slot when missing, opens the window at the slot's
/// confirmed position and reads the stream until graceful shutdown or cancellation. The
/// confirmed position reported to the server is held at the window's start
/// (`ResumeWindow.retainLSN`), so after a restart the window is rebuilt from the WAL. When the
/// connection drops it reconnects with capped exponential backoff
/// (`reconnectInitialDelay` doubling to `reconnectMaxDelay`), resumes from the confirmed
/// position and skips transactions it already emitted, so consumers see no gap and no duplicate.
///
/// Consumers: `changes()` (from now) and `changes(after:)` (resume). See `ChangeHub` for the
/// buffering policy: a consumer more than `consumerBufferLimit` changes behind is ended with
/// `ChangeStreamError.consumerTooSlow` and resumes with its last cursor.
public final class ChangeStream: Service, Sendable {
    /// How to capture.
    public struct Configuration: Sendable {
        /// The database (URL or libpq `key=value` string), used for SQL and, with
        /// `replication=database` added, for the replication connection.
        public var connectionString: String
        /// The persistent replication slot (`[a-z0-9_]`, created when missing).
        public var slotName: String
        /// The publication to stream (created for `tables` when missing).
        public var publicationName: String
        /// Tables to capture (`schema.table` or `table`); empty: the existing publication's.
        public var tables: [String]
        /// Whether to create the publication when it does not exist. Default true.
        public var createPublication: Bool
        /// Resume window bounds (default 5 min / 100,000 changes / 256 MiB).
        public var window: ResumeWindow<ContinuousClock.Instant>.Limits
        /// How often a standby status update is sent. Default 10 s.
        public var statusInterval: Duration
        /// How often slot lag is measured. Default 10 s.
        public var lagInterval: Duration
        /// First reconnect delay. Default 100 ms.
        public var reconnectInitialDelay: Duration
        /// Largest reconnect delay. Default 5 s.
        public var reconnectMaxDelay: Duration
        /// Changes a consumer may have queued beyond its resume backlog. Default 10,000.
        public var consumerBufferLimit: Int
        /// Connect timeout for each connection. Default 10 s.
        public var connectTimeout: Duration
        /// On `stop()` (graceful shutdown), how long the stream may keep reading to deliver
        /// everything committed before the stop (up to `pg_current_wal_flush_lsn()` at that
        /// moment). Default 2 s; `.zero` stops at the next message.
        public var stopCatchUp: Duration
        /// How long the reader busy-polls the socket before parking on the reactor when libpq
        /// has no complete message (see `ReplicationConnection.connect`). Default 50 µs;
        /// `.zero` turns it off where CPU is scarcer than throughput matters.
        public var busyPoll: Duration
        /// Most changes one transaction may have. pgoutput (protocol 1) sends a transaction
        /// after it committed, and the stream holds all of it until its Commit; one larger than
        /// this stops the stream with `assembly_transaction_too_large` naming this knob, instead
        /// of growing until the process is killed for memory. Default 1,000,000 (about 250 MB of
        /// small rows: some 250 bytes per change of a row with four short columns, more for wider rows).
        public var maxTransactionChanges: Int
        /// Most bytes one transaction may hold until its Commit (`ChangeEvent.approximateBytes`:
        /// row values plus 128 bytes per change); more stop the stream with
        /// `assembly_transaction_too_large` naming this knob. Default 256 MiB, the resume
        /// window's default byte bound: a transaction of a thousand 1 MB rows, under
        /// `maxTransactionChanges` by far, would otherwise take a gigabyte.
        public var maxTransactionBytes: Int
        /// The longest `isCaughtUp` stays false after a connect while the session replays the
        /// slot's backlog; then it turns true anyway (logged), so that a replay that cannot end
        /// (a standby whose replay is delayed or paused) or every instance replaying after a
        /// database restart does not leave a load balancer with no ready instance for good.
        /// Default 60 s.
        public var catchUpReadinessLimit: Duration = .seconds(60)
        /// Where the stream logs.
        public var logger: Logger

        /// Creates a configuration.
        public init(connectionString: String, slotName: String, publicationName: String, tables: [String] = [],
                    createPublication: Bool = true,
                    window: ResumeWindow<ContinuousClock.Instant>.Limits = .init(),
                    statusInterval: Duration = .seconds(10), lagInterval: Duration = .seconds(10),
                    reconnectInitialDelay: Duration = .milliseconds(100), reconnectMaxDelay: Duration = .seconds(5),
                    consumerBufferLimit: Int = 10_000, connectTimeout: Duration = .seconds(10),
                    busyPoll: Duration = .microseconds(50), stopCatchUp: Duration = .seconds(2),
                    maxTransactionChanges: Int = 1_000_000, maxTransactionBytes: Int = 256 << 20,
                    logger: Logger = Logger(label: "RealtimeSync.ChangeStream")) {
            self.connectionString = connectionString
            self.slotName = slotName
            self.publicationName = publicationName
            self.tables = tables
            self.createPublication = createPublication
            self.window = window
            self.statusInterval = statusInterval
            self.lagInterval = lagInterval
            self.reconnectInitialDelay = reconnectInitialDelay
            self.reconnectMaxDelay = reconnectMaxDelay
            self.consumerBufferLimit = consumerBufferLimit
            self.connectTimeout = connectTimeout
            self.busyPoll = busyPoll
            self.stopCatchUp = stopCatchUp
            self.maxTransactionChanges = maxTransactionChanges
            self.maxTransactionBytes = maxTransactionBytes
            self.logger = logger
        }

        /// Checks every limit; the error (`invalidConfiguration`) names the field. `run()`
        /// calls it first, so a field set out of range after `init` fails at start.
        public func validate() throws(ChangeStreamError) {
            func bad(_ message: String) -> ChangeStreamError { ChangeStreamError(.invalidConfiguration, "ChangeStream.Configuration." + message) }
            guard !slotName.isEmpty else { throw bad("slotName is empty") }
            guard ReplicationConnection.isValidSlotName(slotName) else {
                throw bad("slotName '\(slotName)' is not a valid replication slot name: use 1-63 characters from a-z, 0-9 and _")
            }
            guard !publicationName.isEmpty else { throw bad("publicationName is empty") }
            guard window.maxCount >= 1 else { throw bad("window.maxCount is \(window.maxCount); it must be at least 1") }
            guard window.maxBytes >= 1 else { throw bad("window.maxBytes is \(window.maxBytes); it must be at least 1") }
            guard window.maxAge >= .zero else { throw bad("window.maxAge is \(window.maxAge); it must not be negative") }
            guard consumerBufferLimit >= 1 else { throw bad("consumerBufferLimit is \(consumerBufferLimit); it must be at least 1") }
            guard maxTransactionChanges >= 1, maxTransactionChanges <= Int(UInt32.max) else {
                throw bad("maxTransactionChanges is \(maxTransactionChanges); it must be from 1 to \(UInt32.max)")
            }
            guard maxTransactionBytes >= 1 else { throw bad("maxTransactionBytes is \(maxTransactionBytes); it must be at least 1") }
            for (name, value) in [("statusInterval", statusInterval), ("lagInterval", lagInterval),
                                  ("reconnectInitialDelay", reconnectInitialDelay), ("connectTimeout", connectTimeout)] {
                guard value > .zero else { throw bad("\(name) is \(value); it must be positive") }
            }
            guard reconnectMaxDelay >= reconnectInitialDelay else {
                throw bad("reconnectMaxDelay (\(reconnectMaxDelay)) is below reconnectInitialDelay (\(reconnectInitialDelay))")
            }
            guard stopCatchUp >= .zero, busyPoll >= .zero else { throw bad("stopCatchUp and busyPoll must not be negative") }
            // Clocks cannot sleep that far (the runtime traps converting the instant).
            let longest = ConnectionPoolConfiguration.longestWait
            for (name, value) in [("window.maxAge", window.maxAge), ("statusInterval", statusInterval), ("lagInterval", lagInterval),
                                  ("reconnectInitialDelay", reconnectInitialDelay), ("reconnectMaxDelay", reconnectMaxDelay),
                                  ("connectTimeout", connectTimeout), ("stopCatchUp", stopCatchUp), ("busyPoll", busyPoll)] {
                guard value <= longest else { throw bad("\(name) is \(value); it must be at most \(longest) (about 100 years)") }
            }
        }
    }

    private struct State {
        var running = false
        var finished = false
        var stopRequested = false
        var stopWaiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var nextWaiter: UInt64 = 0
        var connected = false
        var reconnects = 0
        var confirmed = LSN.zero
        /// A session has started streaming (and opened the window): later sessions are reconnects.
        var streamed = false
        /// The cluster and timeline the stream last read from (`IDENTIFY_SYSTEM`).
        var identity: ReplicationSystemIdentity?
        var slotLag: Int?
        var setupReport: CaptureSetupReport?
        var replication: ReplicationConnection?
        /// Set on stop: the reader ends once it has read this far (and no transaction is open).
        var catchUpTarget: LSN?
        /// Set on stop when catching up is over (reached, timed out or skipped).
        var stopNow = false
        /// See `ChangeStreamStatistics.lastError`.
        var lastError: String?
        /// The session has read up to where the server's WAL was when it connected
        /// (`IDENTIFY_SYSTEM`'s position): its window holds what was committed before (see
        /// `isCaughtUp`).
        var caughtUp = false
        /// When the session connected (the catch-up's readiness limit counts from there).
        var connectedAt: ContinuousClock.Instant?
        var catchUpLimitLogged = false
    }

    /// The configuration in force.
    public let configuration: Configuration
    let hub: ChangeHub
    private let state = Mutex(State())
    private let lagGauge: Gauge
    private let changesCounter: Counter
    private let reconnectCounter: Counter

    /// Creates a stream; nothing connects until `run()` (which first checks the configuration).
    public init(_ configuration: Configuration) {
        self.configuration = configuration
        self.hub = ChangeHub(limits: configuration.window, bufferLimit: configuration.consumerBufferLimit)
        let dimensions = [("slot", configuration.slotName)]
        self.lagGauge = Gauge(label: "realtime_sync_replication_slot_lag_bytes", dimensions: dimensions)
        self.changesCounter = Counter(label: "realtime_sync_changes_total", dimensions: dimensions)
        self.reconnectCounter = Counter(label: "realtime_sync_replication_reconnects_total", dimensions: dimensions)
    }

    // MARK: Consumers

    /// Every change committed from now on (including any the stream is still replaying to
    /// rebuild its window right after start).
    public func changes() -> ChangeSubscription {
        ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
    }

    /// Every change after `cursor`: those in the resume window, then live ones, with no gap or
    /// duplicate at the seam. Throws `ResumeWindowError` (`resync_required`) when the cursor
    /// is older than the window; before the window has opened (the stream is still
    /// connecting) that check happens when it opens and the iteration throws instead.
    public func changes(after cursor: Cursor) throws -> ChangeSubscription {
        ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: cursor)))
    }

    /// Whether the replication connection is streaming now (`statistics.connected`, without
    /// the window's lock that `statistics` also takes: `/readyz` asks it on every probe).
    public var isConnected: Bool { state.withLock { $0.connected } }

    /// Whether the connected session has read up to where the server's WAL was when it
    /// connected: after a start or a reconnect, it replays the slot's backlog first (the
    /// resume window is rebuilt from it), and until then a client would be served changes
    /// minutes old, and a wave of resuming clients would slow the replay itself. `/readyz`
    /// answers 503 `catching_up` meanwhile, at most `catchUpReadinessLimit` per connect.
    public var isCaughtUp: Bool {
        let (ready, overdue) = state.withLock { s -> (Bool, Bool) in
            guard s.connected else { return (false, false) }
            if s.caughtUp { return (true, false) }
            guard let at = s.connectedAt, at.duration(to: .now) >= configuration.catchUpReadinessLimit else { return (false, false) }
            defer { s.catchUpLimitLogged = true }
            return (true, !s.catchUpLimitLogged)
        }
        if overdue {
            configuration.logger.warning("change stream still replaying the slot's backlog after catchUpReadinessLimit=\(configuration.catchUpReadinessLimit); reporting ready anyway", metadata: [
                "slot": "\(configuration.slotName)"])
        }
        return ready
    }

    /// Counters and positions now.
    public var statistics: ChangeStreamStatistics {
        // Plain values out of the snapshot first: borrowing the snapshot tuple inside the lock's
        // closure crashed the Swift 6.3.1 optimizer (ownership verifier) in release builds.
        let hubState = hub.snapshot()
        let transactions = hubState.transactions, changes = hubState.changes
        let windowCount = hubState.window?.count ?? 0
        let oldestResumable = hubState.window?.oldestResumable
        let lastCursor = hubState.window?.last?.cursor
        let consumers = hubState.subscribers, consumersCutOff = hubState.cutOff
        return state.withLock { s in
            ChangeStreamStatistics(
                connected: s.connected, transactions: transactions, changes: changes,
                reconnects: s.reconnects, windowCount: windowCount,
                oldestResumable: oldestResumable, lastCursor: lastCursor,
                confirmedFlush: s.confirmed, slotLagBytes: s.slotLag,
                consumers: consumers, consumersCutOff: consumersCutOff,
                readerWaits: s.replication?.readerWaits ?? 0, lastError: s.lastError)
        }
    }

    /// What the setup checks found (nil before `run()` got that far).
    public var setupReport: CaptureSetupReport? { state.withLock { $0.setupReport } }

    // MARK: Running

    /// Runs until graceful shutdown (or `stop()`), then sends a final status update, ends the
    /// COPY and closes; consumers' iterations end after what they have queued. Task
    /// cancellation closes at once. Throws setup errors (`CaptureSetupError`) and protocol
    /// errors; connection failures are retried with backoff.
    public func run() async throws {
        try configuration.validate()
        try state.withLock { s in
            guard !s.running && !s.finished else {
                throw PostgresError(code: .invalidUsage, message: "ChangeStream for slot \(configuration.slotName) was already run; create a new one")
            }
            s.running = true
        }
        do {
            try await withGracefulShutdownHandler {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { await self.measureLag() }
                    do {
                        try await self.capture()
                    } catch {
                        group.cancelAll()
                        throw error
                    }
                    group.cancelAll()
                }
            } onGracefulShutdown: {
                self.stop()
            }
        } catch {
            finish(error: error is CancellationError ? nil : error)
            throw error
        }
        finish(error: nil)
    }

    /// Asks `run()` to stop cleanly (as graceful shutdown does). Idempotent.
    public func stop() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.stopRequested = true
            defer { s.stopWaiters.removeAll() }
            return Array(s.stopWaiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    private func finish(error: (any Error)?) {
        state.withLock { s in
            s.running = false
            s.finished = true
            s.connected = false
            s.replication = nil
        }
        hub.close(error: error.map { ChangeStreamError(.streamFailed, "the change stream for slot \(configuration.slotName) failed: \($0)") })
    }

    private var stopRequested: Bool { state.withLock { $0.stopRequested } }

    /// Returns when `stop()` is called or the task is cancelled.
    private func waitForStop() async {
        let id = state.withLock { s -> UInt64 in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
                let now = state.withLock { s -> Bool in
                    if s.stopRequested || Task.isCancelled { return true }
                    s.stopWaiters[id] = cont
                    return false
                }
                if now { cont.resume() }
            }
        } onCancel: {
            let cont = self.state.withLock { $0.stopWaiters.removeValue(forKey: id) }
            cont?.resume()
        }
    }

    private var connectionConfiguration: PostgresConnection.Configuration {
        .init(configuration.connectionString, connectTimeout: configuration.connectTimeout,
              busyPoll: configuration.busyPoll, logger: configuration.logger)
    }

    /// The capture loop: setup once, then sessions, reconnecting with backoff.
    private func capture() async throws {
        let logger = configuration.logger
        var decoder = PgOutputDecoder()
        // Transactional logical messages (another application's pg_logical_emit_message(true, …))
        // reach no consumer of the stream: not held, not counted against maxTransactionBytes.
        var assembler = TransactionAssembler(
            maxChanges: configuration.maxTransactionChanges, maxBytes: configuration.maxTransactionBytes, slotName: configuration.slotName,
            keepsMessages: false
        )
        var failures = 0
        var prepared = false
        while !stopRequested {
            try Task.checkCancellation()
            var replication: ReplicationConnection?
            do {
                if !prepared {
                    try await prepare()
                    prepared = true
                }
                let repl = try await ReplicationConnection.connect(connectionConfiguration)
                replication = repl
                // A reconnect that reached another cluster, or a new timeline that forked before
                // what this stream delivered (a failover to a standby that lagged), would go on
                // with a gap: the transactions committed there below that point are skipped.
                let identity = try await repl.identifySystem()
                // Checked once the resume position is known (below); another cluster at once.
                var failover: (was: ReplicationSystemIdentity, history: String?)?
                if state.withLock({ $0.streamed }), let was = state.withLock({ $0.identity }),
                   was.systemID != identity.systemID || was.timeline != identity.timeline {
                    let history = identity.timeline != was.timeline ? try? await repl.timelineHistory(identity.timeline) : nil
                    if let problem = Self.failoverProblem(
                        was: was, now: identity, history: history, deliveredThrough: assembler.emittedThrough
                    ) {
                        throw failoverError(problem)
                    }
                    failover = (was, history)
                }
                // A session after one that streamed (its window is open and fed from the slot)
                // must find the slot where the stream left it. Recreated, or moved on by
                // someone else, it would start after changes this stream never read: a gap.
                let streamed = state.withLock { $0.streamed }
                if !streamed {
                    try await createSlotSayingWhyItWaits(repl)
                }
                // What counts as a shutdown's quick reply requests: see ReplyRequests.
                var quickReplies = Duration.seconds(1)
                if let timeout = try? await repl.walSenderTimeout() { quickReplies = timeout / 4 }
                let info = try await withSQL { try await CaptureSetup.slotInfo($0, slot: configuration.slotName) }
                if let problem = info?.problem(slot: configuration.slotName) {
                    throw PostgresError(code: .invalidUsage, message: problem)
                }
                var slot = info.map { (confirmedFlush: $0.confirmedFlush, lost: $0.lost) }
                // An invalidated slot (its WAL removed past max_slot_wal_keep_size) fails every
                // START_REPLICATION. At start nothing is lost by making it anew (the WAL it
                // held is gone either way; clients with older cursors get resync_required);
                // after streaming from it, going on would be a gap.
                if slot?.lost == true {
                    if streamed {
                        throw ChangeStreamError(.slotLost,
                            "replication slot \(configuration.slotName) was invalidated while the stream was away (PostgreSQL removed the WAL it held: max_slot_wal_keep_size); changes committed after \(state.withLock { $0.confirmed }) cannot be read from it. The stream stopped instead of going on with a gap: restart it (it creates the slot anew; clients resuming from older cursors get resync_required)")
                    }
                    logger.warning("replication slot was invalidated (PostgreSQL removed the WAL it held: max_slot_wal_keep_size); dropping it and creating it anew: clients resuming from cursors before now get resync_required", metadata: [
                        "slot": "\(configuration.slotName)"])
                    // Checked and dropped in one statement, and a slot already gone is fine: two
                    // starts overlapping (a deploy) must not drop the one the other just made.
                    do {
                        _ = try await withSQL {
                            try await $0.query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND wal_status = 'lost'", configuration.slotName)
                        }
                    } catch let error as PostgresError where error.sqlState == "42704" {}
                    try await repl.createSlotIfMissing(configuration.slotName)
                    slot = try await withSQL { try await CaptureSetup.slotState($0, slot: configuration.slotName) }
                }
                let slotAt = slot?.confirmedFlush
                let start: LSN
                if streamed {
                    let resumeAt = max(state.withLock { $0.confirmed }, hub.openWindow(origin: .zero))
                    guard let slotAt else {
                        throw ChangeStreamError(.slotLost,
                            "replication slot \(configuration.slotName) is gone at reconnect (dropped, or a failover to a server without it); changes committed after \(resumeAt) cannot be read from it. The stream stopped instead of going on with a gap: restart it (it creates the slot anew; clients resuming from older cursors get resync_required)")
                    }
                    guard slotAt <= resumeAt else { throw slotMoved(to: slotAt, from: resumeAt) }
                    if let failover {
                        // With nothing captured for a while, keepalives and heartbeats move the
                        // resume position past the last transaction delivered: a timeline that
                        // forked before it would have its commits in between skipped.
                        if let problem = Self.failoverProblem(
                            was: failover.was, now: identity, history: failover.history,
                            deliveredThrough: assembler.emittedThrough, resumeAt: resumeAt
                        ) {
                            throw failoverError(problem)
                        }
                        logger.notice("the server is on a new timeline that forked after where this stream resumes; going on", metadata: [
                            "slot": "\(configuration.slotName)", "timeline": "\(identity.timeline)", "was": "\(failover.was.timeline)"])
                    }
                    start = resumeAt
                } else {
                    guard let slotAt else {
                        throw PostgresError(code: .invalidUsage, message: "replication slot \(configuration.slotName) has no confirmed position (is it a logical slot?)")
                    }
                    start = max(state.withLock { $0.confirmed }, slotAt)
                }
                state.withLock { $0.identity = identity }
                decoder.reset()
                assembler.abandonOpenTransaction()
                // The connection for the question below is opened before the stream starts: from
                // START_REPLICATION until the reader runs nobody answers the walsender's reply
                // requests, so that gap is one query, not a connect (with a short
                // wal_sender_timeout, a connect there ended the session, again at every retry).
                let held: LSN? = try await withSQL { sql in
                    try await repl.startReplication(
                        slot: configuration.slotName, startLSN: start.rawValue,
                        options: [("proto_version", "1"), ("publication_names", try quotedPublication()),
                                  ("messages", "true")],
                        statusInterval: configuration.statusInterval)
                    // This stream holds the slot now, so its position cannot move any more; it may
                    // have moved since it was read (another instance streamed the slot until a moment
                    // ago, pg_replication_slot_advance), and Postgres starts at the later of the two.
                    return try await CaptureSetup.confirmedFlush(sql, slot: configuration.slotName)
                }
                var streamStart = start
                if streamed {
                    // After streaming, a later start is a gap.
                    if let held, held > start { throw slotMoved(to: held, from: start) }
                } else {
                    // At start, the window opens where the stream really starts.
                    if let held { streamStart = max(start, held) }
                    _ = hub.openWindow(origin: streamStart)
                }
                repl.confirm(flushedThrough: streamStart.rawValue)
                // Caught up once the session reads past where the WAL was at connect (a
                // message at or after it, or a keepalive saying the server sent that far).
                let caughtUpAt = LSN(identity.xlogPosition)
                state.withLock { s in
                    s.connected = true
                    s.streamed = true
                    s.confirmed = streamStart
                    s.replication = repl
                    s.caughtUp = streamStart >= caughtUpAt
                    s.connectedAt = .now
                    s.catchUpLimitLogged = false
                }
                logger.info("change stream started", metadata: [
                    "slot": "\(configuration.slotName)", "start": "\(streamStart)", "backend": "\(repl.backendPID)"])
                failures = 0
                state.withLock { $0.lastError = nil }
                let stopped = try await session(repl, decoder: &decoder, assembler: &assembler, quickReplies: quickReplies,
                                                caughtUpAt: caughtUpAt)
                state.withLock { $0.connected = false; $0.replication = nil }
                if stopped {
                    await repl.stop()
                    logger.info("change stream stopped", metadata: ["slot": "\(configuration.slotName)", "confirmed": "\(state.withLock { $0.confirmed })"])
                    return
                }
                await repl.close()
                logger.warning("replication stream ended by the server; reconnecting", metadata: ["slot": "\(configuration.slotName)"])
            } catch {
                state.withLock { $0.connected = false; $0.replication = nil }
                await replication?.close()
                if error is CancellationError || Task.isCancelled { throw CancellationError() }
                guard Self.isRetryable(error) else { throw error }
                if stopRequested { return }
                failures += 1
                let delay = backoff(failures)
                var reason = "\(error)"
                if let error = error as? PostgresError, error.sqlState == "55006" {
                    // "replication slot … is active for PID …": another process streams from it.
                    reason += " (another process streams from slot \(configuration.slotName): stop it, or give this one a slot of its own, --slot / REALTIME_SYNC_SLOT)"
                }
                state.withLock { $0.reconnects += 1; $0.lastError = reason }
                reconnectCounter.increment()
                logger.warning("replication connection failed; reconnecting", metadata: [
                    "slot": "\(configuration.slotName)", "attempt": "\(failures)", "delay": "\(delay)", "error": "\(reason)"])
                await sleepUnlessStopped(delay)
            }
        }
    }

    /// Reads one replication session; returns true when stopped on request, false when the
    /// server ended the stream.
    private func session(_ repl: ReplicationConnection, decoder: inout PgOutputDecoder,
                         assembler: inout TransactionAssembler, quickReplies: Duration, caughtUpAt: LSN) async throws -> Bool {
        // Until the session has read this far (nil once it has): see `isCaughtUp`.
        var catchingUpTo: LSN? = state.withLock { $0.caughtUp } ? nil : caughtUpAt
        // Called once a message has been handled: with no transaction half-received, everything
        // up to `position` is in the window. (Checked before handling, a Commit whose position
        // is the target's, the last transaction of a backlog, counted before it was delivered:
        // the window was one transaction short when /readyz turned ready.)
        func reached(_ position: LSN, inTransaction: Bool) {
            guard let target = catchingUpTo, position >= target, !inTransaction else { return }
            catchingUpTo = nil
            state.withLock { $0.caughtUp = true }
            configuration.logger.info("change stream caught up with the server's WAL as of its connect", metadata: [
                "slot": "\(configuration.slotName)", "position": "\(position)"])
        }
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await repl.runStatusSchedule() }
            group.addTask {
                await self.waitForStop()
                // Cancelled: the session is over and its reader gone; nothing to wake.
                if Task.isCancelled { return }
                await self.catchUpBeforeStopping(repl)
                if Task.isCancelled { return }
                self.state.withLock { $0.stopNow = true }
                await repl.wake(timeout: .seconds(30))
            }
            defer { group.cancelAll() }
            var replyRequests = ReplyRequests()
            replyRequests.quick = quickReplies
            var sinceYield = 0
            while let message = try await repl.readMessage() {
                // A backlog can be read for seconds without the socket ever running dry, i.e.
                // without suspending: give the cooperative pool's other tasks a turn now and then.
                sinceYield += 1
                if sinceYield == 512 {
                    sinceYield = 0
                    await Task.yield()
                }
                guard case .xLogData(let data) = message else {
                    guard case .keepalive(let keepalive) = message else { continue }
                    if keepalive.replyRequested {
                        try await replyRequested(keepalive, repl, previous: &replyRequests)
                    }
                    if !assembler.isInTransaction { advanceIdle(through: LSN(keepalive.walEnd), repl) }
                    reached(LSN(keepalive.walEnd), inTransaction: assembler.isInTransaction)
                    if caughtUp(LSN(keepalive.walEnd), assembler) { break }
                    continue
                }
                var decoded = try decoder.decode(data.payload, walStart: LSN(data.walStart))
                if case .relation(let relation) = decoded {
                    let unknown = decoder.unresolvedTypes(of: relation)
                    if !unknown.isEmpty {
                        // A failed lookup, whatever the error, ends the session and is retried with
                        // backoff (`TypeLookupFailed`; the next session's Relation message asks
                        // again): going on would send a domain over int8 as strings, and a filter on
                        // such a column (an auth filter among them) would withhold every change.
                        let resolved: [UInt32: UInt32]
                        do {
                            resolved = try await baseTypes(of: unknown)
                        } catch {
                            throw TypeLookupFailed(table: relation.qualifiedName, underlying: error)
                        }
                        if let relation = decoder.resolveTypes(resolved, relation: relation.oid) {
                            decoded = .relation(relation)
                        }
                    }
                }
                let output = try assembler.apply(decoded)
                if case .message(let logical)? = output {
                    // Non-transactional messages (the heartbeat's among them) are sent when
                    // written: every transaction that committed before one was sent already.
                    advanceIdle(through: logical.lsn, repl)
                    reached(LSN(data.walStart), inTransaction: assembler.isInTransaction)
                    continue
                }
                guard case .transaction(let transaction)? = output else {
                    reached(LSN(data.walStart), inTransaction: assembler.isInTransaction)
                    continue
                }
                if let retain = hub.deliver(transaction) {
                    changesCounter.increment(by: transaction.changes.count)
                    confirm(retain, repl)
                }
                reached(LSN(data.walStart), inTransaction: assembler.isInTransaction)
                if caughtUp(LSN(data.walStart), assembler) { break }
            }
            return stopRequested
        }
    }

    /// The stream passed `position` between transactions: with an empty resume window the
    /// slot may move up to it (an idle database's heartbeats then release WAL).
    private func advanceIdle(through position: LSN, _ repl: ReplicationConnection) {
        if let retain = hub.idle(through: position) { confirm(retain, repl) }
    }

    /// Lets the slot's confirmed position move up to the window's retain position (both
    /// only ever move forward).
    private func confirm(_ retain: LSN, _ repl: ReplicationConnection) {
        repl.confirm(flushedThrough: retain.rawValue)
        state.withLock { $0.confirmed = max($0.confirmed, retain) }
    }

    /// Whether a stop is pending and the reader may end here: told to, or it has read up to
    /// the catch-up target with no transaction half-received.
    private func caughtUp(_ position: LSN, _ assembler: TransactionAssembler) -> Bool {
        state.withLock { s in
            guard s.stopRequested else { return false }
            if s.stopNow { return true }
            if let target = s.catchUpTarget, position >= target, !assembler.isInTransaction { return true }
            return false
        }
    }

    /// After `stop()`: learns the server's flushed WAL position and gives the reader up to
    /// `stopCatchUp` to read that far (asking the server for a keepalive so an idle stream
    /// learns its end of WAL at once). Returns early when cancelled (the reader got there).
    private func catchUpBeforeStopping(_ repl: ReplicationConnection) async {
        let limit = configuration.stopCatchUp
        guard limit > .zero else { return }
        let deadline = ContinuousClock.now + limit
        let target: LSN? = await withTaskGroup(of: LSN?.self) { group in
            group.addTask {
                try? await self.withSQL { conn in
                    let rows = try await conn.query("SELECT pg_current_wal_flush_lsn()::text")
                    return try rows[0].decode(String.self, at: 0).flatMap { LSN($0) }
                }
            }
            group.addTask {
                try? await Task.sleep(until: deadline)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
        guard let target else { return }
        state.withLock { $0.catchUpTarget = target }
        await repl.requestStatus(replyRequested: true)
        try? await Task.sleep(until: deadline)
    }

    /// What the reader remembers of the server's recent reply requests.
    struct ReplyRequests {
        var last: ContinuousClock.Instant?
        var lastWALEnd: UInt64 = 0
        var quickInARow = 0
        /// Requests closer together than this count as "quick": a quarter of
        /// `wal_sender_timeout` (its own requests come half a timeout after our last reply,
        /// and must not be taken for a shutdown's), or 1 s when it is off or unknown. A
        /// shutting-down walsender asks again one round trip after each reply, however long
        /// that round trip is (150 ms over a slow link kept a fixed 100 ms from noticing).
        var quick: Duration = .seconds(1)
    }

    /// A keepalive asked for a reply (`readMessage()` already sent one with the held position).
    ///
    /// A walsender that is shutting down (fast or smart shutdown, after the shutdown
    /// checkpoint) exits only once the client has confirmed everything it sent or gone away,
    /// and asks for a reply again as soon as each one arrives: requests a round trip apart,
    /// with the same end of WAL. Holding the confirmed position at the window's start would
    /// then block PostgreSQL's shutdown; confirming everything instead would move the slot
    /// past the window for good (it is saved at the shutdown checkpoint), so a capture started
    /// after the server is back (a host reboot, a deploy) would rebuild a window starting at
    /// the end of WAL, and every client's cursor would need a resync. So after three such
    /// requests in a row (each within `quick` of the previous, same end of WAL) the stream
    /// disconnects, keeping its hold, and reconnects with backoff as after any dropped
    /// connection. Requests caused by `wal_sender_timeout` come half a timeout after our
    /// answer and keep the stream connected.
    private func replyRequested(_ keepalive: PrimaryKeepalive, _ repl: ReplicationConnection,
                                previous: inout ReplyRequests) async throws {
        let now = ContinuousClock.now
        defer {
            previous.last = now
            previous.lastWALEnd = keepalive.walEnd
        }
        if let last = previous.last, last.duration(to: now) < previous.quick, previous.lastWALEnd == keepalive.walEnd {
            previous.quickInARow += 1
        } else {
            previous.quickInARow = 0
        }
        guard previous.quickInARow >= 2 else { return }
        let held = state.withLock { $0.confirmed }
        guard held < LSN(keepalive.walEnd) else { return }   // everything confirmed: it can stop
        configuration.logger.notice("the server asks for replies right after each one (shutting down?); disconnecting so that it can stop, keeping the resume window's hold on the slot", metadata: [
            "slot": "\(configuration.slotName)", "confirmed": "\(held)", "walEnd": "\(LSN(keepalive.walEnd))"])
        throw ServerShuttingDown()
    }

    /// The server is shutting down and waits for the stream to confirm all WAL or go away:
    /// the stream goes away (and reconnects, as after a dropped connection).
    struct ServerShuttingDown: Error, CustomStringConvertible {
        var description: String { "the server is shutting down" }
    }

    /// Why going on after a reconnect to `now` would leave a gap, or nil if it would not: `was`
    /// is where the stream read before, `deliveredThrough` the end of the last transaction it
    /// handed out, `history` the new timeline's history file (`TIMELINE_HISTORY`).
    static func failoverProblem(was: ReplicationSystemIdentity, now: ReplicationSystemIdentity,
                                history: String?, deliveredThrough: LSN, resumeAt: LSN = .zero) -> String? {
        if was.systemID != now.systemID {
            return "the reconnect reached another database cluster (system identifier \(now.systemID), this stream read from \(was.systemID)): a restore, or a failover to a server that is not a copy of the old one"
        }
        if was.timeline == now.timeline { return nil }
        // Each line: parent timeline, tab, the LSN where it ended, tab, reason.
        let switchPoint = (history ?? "").split(separator: "\n").lazy.compactMap { line -> LSN? in
            let fields = line.split(separator: "\t")
            guard fields.count >= 2, Int(fields[0].trimmingCharacters(in: .whitespaces)) == was.timeline else { return nil }
            return LSN(fields[1].trimmingCharacters(in: .whitespaces))
        }.first
        guard let switchPoint else {
            return "the server is on timeline \(now.timeline), and its history does not say where timeline \(was.timeline), which this stream read, ended"
        }
        if switchPoint < deliveredThrough {
            return "the server is on timeline \(now.timeline), which left timeline \(was.timeline) at \(switchPoint), before \(deliveredThrough), the end of the last transaction this stream delivered (a failover to a standby that lagged): what was delivered after \(switchPoint) does not exist there, and what was committed there before \(deliveredThrough) would be skipped"
        }
        if switchPoint < resumeAt {
            return "the server is on timeline \(now.timeline), which left timeline \(was.timeline) at \(switchPoint), before \(resumeAt), where this stream would resume (keepalives and heartbeats moved it past the last transaction delivered while nothing was captured; a failover to a standby that lagged): what was committed there between \(switchPoint) and \(resumeAt) would be skipped"
        }
        return nil
    }

    /// `slot_lost` for a failover the stream cannot follow without a gap.
    private func failoverError(_ problem: String) -> ChangeStreamError {
        ChangeStreamError(.slotLost, "replication slot \(configuration.slotName): \(problem). The stream stopped instead of going on with a gap: restart it (clients resuming from older cursors get resync_required)")
    }

    /// `slot_lost` for a slot that someone else moved past this stream's position.
    private func slotMoved(to slotAt: LSN, from resumeAt: LSN) -> ChangeStreamError {
        ChangeStreamError(.slotLost,
            "replication slot \(configuration.slotName) was moved to \(slotAt) while this stream was at \(resumeAt) (by another consumer of the slot, or pg_replication_slot_advance); the changes in between cannot be read. The stream stopped instead of going on with a gap: give each stream its own slot, and restart it (clients resuming from older cursors get resync_required)")
    }

    private func backoff(_ failures: Int) -> Duration {
        Self.backoff(failures: failures, initial: configuration.reconnectInitialDelay, max: configuration.reconnectMaxDelay)
    }

    /// The delay before reconnect attempt `failures` (1-based): `initial`, doubling, capped at `max`.
    static func backoff(failures: Int, initial: Duration, max cap: Duration) -> Duration {
        var delay = initial
        for _ in 1..<Swift.max(1, Swift.min(failures, 30)) {
            delay = delay * 2
            if delay >= cap { return cap }
        }
        return Swift.min(delay, cap)
    }

    private func sleepUnlessStopped(_ delay: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await Task.sleep(for: delay) }
            group.addTask { await self.waitForStop() }
            await group.next()
            group.cancelAll()
        }
    }

    /// Connection-level failures (and a slot still held by the previous walsender) are retried.
    static func isRetryable(_ error: any Error) -> Bool {
        if error is TypeLookupFailed || error is ServerShuttingDown { return true }
        guard let error = error as? PostgresError else { return false }
        if error.isConnectionBroken { return true }
        switch error.sqlState {
        case "55006", "57P01", "57P02", "57P03", "53300": return true  // slot in use, shutdown, starting, too many connections
        case let state? where state.hasPrefix("08"): return true
        default: return false
        }
    }

    /// Creates the slot unless it exists. Creating one waits for every transaction that holds
    /// a transaction id to end, in any database of the cluster: a session left idle in a
    /// transaction, or a forgotten prepared transaction, holds it for as long as it stays.
    /// After 5 s of that, the wait is said (a warning, and `statistics.lastError`), naming
    /// where to look, instead of a start that hangs with nothing to show.
    private func createSlotSayingWhyItWaits(_ repl: ReplicationConnection) async throws {
        let slot = configuration.slotName
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await repl.createSlotIfMissing(slot)
                return true
            }
            group.addTask { [self] in
                try await Task.sleep(for: .seconds(5))
                let note = "creating replication slot \(slot) waits for transactions that were open when it began to end (a session idle in a transaction, or a prepared transaction, in any database of the cluster: see pg_stat_activity rows with a backend_xid, and pg_prepared_xacts); it goes on once they end"
                state.withLock { $0.lastError = note }
                configuration.logger.warning("\(note)", metadata: ["slot": "\(slot)"])
                return false
            }
            while let created = try await group.next() {
                if created { break }
            }
            group.cancelAll()
        }
    }

    // MARK: SQL side

    /// The base type of each of `oids` (a domain's, through domains over domains; any other
    /// type is its own), asked on a short SQL connection.
    private func baseTypes(of oids: [UInt32]) async throws -> [UInt32: UInt32] {
        let list = "{" + oids.map(String.init).joined(separator: ",") + "}"
        let rows = try await withSQL { conn in
            try await conn.query("""
                WITH RECURSIVE d(root, oid, base) AS (
                    SELECT t.oid, t.oid, t.typbasetype FROM pg_type t WHERE t.oid = ANY($1::oid[])
                    UNION ALL SELECT d.root, t.oid, t.typbasetype FROM d JOIN pg_type t ON t.oid = d.base)
                SELECT root::int8, oid::int8 FROM d WHERE base = 0
                """, list)
        }
        var map: [UInt32: UInt32] = [:]
        for row in rows {
            if let root = try row.decode(Int.self, at: 0), let base = try row.decode(Int.self, at: 1) {
                map[UInt32(truncatingIfNeeded: root)] = UInt32(truncatingIfNeeded: base)
            }
        }
        // A type dropped meanwhile: keep it as it is rather than asking again for each relation.
        for oid in oids where map[oid] == nil { map[oid] = oid }
        return map
    }

    private func withSQL<T: Sendable>(_ body: (PostgresConnection) async throws -> T) async throws -> T {
        let conn = try await PostgresConnection.connect(connectionConfiguration)
        do {
            let result = try await body(conn)
            await conn.close()
            return result
        } catch {
            await conn.close()
            throw error
        }
    }

    private func prepare() async throws {
        let report = try await withSQL { conn in
            try await CaptureSetup.prepare(conn, publication: configuration.publicationName, tables: configuration.tables,
                                           createPublication: configuration.createPublication, logger: configuration.logger)
        }
        state.withLock { $0.setupReport = report }
    }

    private func quotedPublication() throws -> String {
        // publication_names is a list of identifiers: quote the name so any spelling works.
        "\"" + String(configuration.publicationName.flatMap { $0 == "\"" ? ["\"", "\""] : [$0] }) + "\""
    }

    /// Measures slot lag every `lagInterval` on its own connection (reopened after failures).
    private func measureLag() async {
        var conn: PostgresConnection?
        while !Task.isCancelled {
            do {
                if conn == nil || conn!.isBroken {
                    await conn?.close()
                    conn = try await PostgresConnection.connect(connectionConfiguration)
                }
                if let lag = try await CaptureSetup.slotLagBytes(conn!, slot: configuration.slotName) {
                    state.withLock { $0.slotLag = lag }
                    lagGauge.record(lag)
                }
            } catch {
                await conn?.close()
                conn = nil
            }
            do { try await Task.sleep(for: configuration.lagInterval) } catch { break }
        }
        await conn?.close()
    }

    /// Measures the slot's lag now (bytes of WAL it holds) and records it in statistics and
    /// the `realtime_sync_replication_slot_lag_bytes` gauge. Nil when the slot does not exist.
    @discardableResult
    public func refreshSlotLag() async throws -> Int? {
        let lag = try await withSQL { try await CaptureSetup.slotLagBytes($0, slot: configuration.slotName) }
        state.withLock { $0.slotLag = lag }
        if let lag { lagGauge.record(lag) }
        return lag
    }

    /// Drops the replication slot (releasing the WAL it holds). Fails with `slotActive` while
    /// this stream runs; returns false when the slot did not exist.
    @discardableResult
    public func dropSlot() async throws -> Bool {
        if state.withLock({ $0.running }) {
            throw ChangeStreamError(.slotActive, "replication slot \(configuration.slotName) is in use by this running stream: stop it (graceful shutdown or stop()) before dropSlot()")
        }
        return try await withSQL { conn in
            for _ in 0..<100 {
                do {
                    let rows = try await conn.query(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", configuration.slotName)
                    return rows.count == 1
                } catch let error as PostgresError where error.sqlState == "55006" {
                    // The walsender of the stream that just stopped may still be exiting.
                    try await Task.sleep(for: .milliseconds(50))
                }
            }
            throw ChangeStreamError(.slotActive, "replication slot \(configuration.slotName) is active in another session: stop that consumer (see pg_replication_slots.active_pid) before dropping it")
        }
    }
}

/// The base types of a table's columns could not be looked up (any error: a connection
/// failure, a `statement_timeout`, a recovery conflict). Retried like a connection failure:
/// the next session's Relation message asks again. Going on instead would send a domain over
/// `int8` as strings and withhold every change from subscriptions filtered on such a column.
struct TypeLookupFailed: Error, CustomStringConvertible {
    var table: String
    var underlying: any Error
    var description: String { "could not look up the base types of \(table)'s column types: \(underlying)" }
}
