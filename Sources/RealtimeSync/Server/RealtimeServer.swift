#if canImport(Glibc)
import Glibc
#endif
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

/// Live counts of a `RealtimeServer` (also exported at `/metrics`).
public struct RealtimeServerStatistics: Sendable, Hashable {
    /// Open WebSocket sessions.
    public var sessions: Int
    /// Open subscriptions in the fan-out hub (resuming ones join it when caught up).
    public var subscriptions: Int
    /// Bytes waiting in every socket's send queue.
    public var queuedBytes: Int
    /// Messages waiting in every socket's send queue.
    public var queuedMessages: Int
    /// Messages written to sockets so far.
    public var deliveredMessages: Int
    /// Changes the fan-out has processed so far.
    public var changesProcessed: Int
    /// Sockets ended so far, by close code (1006: the connection ended without a close handshake).
    public var closes: [UInt16: Int]
    /// Whether shutdown has begun (no new sockets are admitted).
    public var isDraining: Bool
    /// The cursor of the last change the fan-out processed.
    public var fanoutCursor: Cursor
    /// Client connections (HTTP and WebSocket) open now.
    public var connections: Int = 0
    /// Connections refused so far because `maxConnections` were open.
    public var connectionsRefused: Int = 0
}

/// Where the server is in its life.
enum ServerPhase: Int, Sendable, Comparable {
    case running, draining, closingSockets, stopped
    static func < (lhs: ServerPhase, rhs: ServerPhase) -> Bool { lhs.rawValue < rhs.rawValue }
}

/// Everything the server's sessions and fan-out share, behind one lock.
struct ServerState: Sendable {
    var hub: FanoutHub
    var sessions: [FanoutClientID: SessionChannel] = [:]
    /// Subscriptions that resumed ahead of the fan-out: skip changes at or before the cursor.
    var startAfter: [FanoutClientID: [String: Cursor]] = [:]
    /// `snapshot: true` subscriptions that have not joined the hub yet (RealtimeServer+Snapshot.swift).
    var snapshots: [FanoutClientID: [String: PendingSnapshot]] = [:]
    /// The last transactions the fan-out processed, for the snapshot handoff.
    var recentTransactions = RecentTransactions(capacity: 8_192)
    /// The cursor of the last change the fan-out processed.
    var lastDelivered: Cursor
    /// Per table, the change stream's latest description of it, the commit position of the
    /// change that carried it, and where to check its subscriptions again (`noteRelation`).
    var relations: [TableKey: SeenRelation] = [:]
    var nextClientID: UInt64 = 1
    /// The event loops sessions run on, in order of first use (`SessionChannel.loopIndex`).
    var eventLoops: [ObjectIdentifier] = []
    var phase = ServerPhase.running
    var changesProcessed = 0
    var fanoutEnded = false
    var closes: [UInt16: Int] = [:]
    var listeningPort: Int?
    var listeningFailure: String?
    var portWaiters: [CheckedContinuation<Int, any Error>] = []

    /// Adds a subscription that has caught up (see `RealtimeServer.resume`).
    mutating func join(_ subscription: ResolvedSubscription, client: FanoutClientID, lastCovered: Cursor) {
        if let broken = schemaBrokenColumn(of: subscription) {
            // The table changed while it caught up or ran its snapshot: it could never match.
            _ = endForSchemaChange(client: client, id: subscription.id, column: broken.column, byToken: broken.byToken, table: subscription.table)
            return
        }
        do {
            try hub.subscribe(client: client, subscription)
        } catch {
            return  // the session checked id and count before; nothing else adds for it
        }
        if lastCovered > lastDelivered { startAfter[client, default: [:]][subscription.id] = lastCovered }
    }
}

/// Errors of the server itself (not of a client's message).
public struct RealtimeServerError: Error, Sendable, CustomStringConvertible {
    /// Stable error codes, for programs.
    public enum Code: String, Sendable, Hashable {
        /// The HTTP listener could not start (e.g. the port is taken) or failed.
        case listenerFailed = "SERVER_LISTENER_FAILED"
        /// The HTTP listener stopped without being asked to.
        case listenerStopped = "SERVER_LISTENER_STOPPED"
        /// `run()` was called a second time (a server runs once; create a new one).
        case alreadyRan = "SERVER_ALREADY_RAN"
        /// The database answered a server query in a way it cannot use.
        case unexpectedDatabaseAnswer = "SERVER_UNEXPECTED_DATABASE_ANSWER"
        /// A `RealtimeServerConfiguration` field is out of range (the message names it).
        case invalidConfiguration = "SERVER_INVALID_CONFIGURATION"
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
    /// The code and the message, e.g. `SERVER_LISTENER_FAILED: ...` (searchable in logs).
    public var description: String { "\(code.rawValue): \(message)" }
}

/// The realtime service: HTTP and WebSocket endpoints (PROTOCOL.md), one session per
/// socket, the fan-out of the change source to subscriptions, and the ordered shutdown
/// of docs/OPERATIONS.md ("Shutdown order and deadlines"). A swift-service-lifecycle `Service`: `run()` serves until graceful
/// shutdown, then stops admitting, runs the shutdown hooks, delivers every change up to
/// the cursor at which shutdown began, closes every socket with 1001, and returns.
public final class RealtimeServer: Service, Sendable {
    /// The settings in force.
    public let configuration: RealtimeServerConfiguration
    let source: any ChangeSource
    let state: Mutex<ServerState>
    let deliveredCount = Atomic<Int>(0)
    let metrics: ServerMetrics
    let logger: Logger
    /// Requests for `run()`'s ordered shutdown: a graceful shutdown, or `requestShutdown()`
    /// (also before `run()` starts: the stream keeps the latest).
    private let shutdownSignal: AsyncStream<Void>
    private let shutdownContinuation: AsyncStream<Void>.Continuation
    private let runOnce = Atomic<Bool>(false)

    /// Bounds concurrent snapshots (`maxConcurrentSnapshots`).
    let snapshotGate: AsyncGate
    /// Answers the WAL question of `since` cursors ahead of the stream (`walPosition`).
    let walCheck = WALCheck()
    /// The ordered shutdown ran all its steps without being cancelled.
    let shutdownCompleted = Atomic<Bool>(false)
    /// Client connections open now, and those refused at `connectionLimit`.
    let openConnections = Atomic<Int>(0)
    let refusedConnections = Atomic<Int>(0)
    /// `maxConnections`, or its default from the open-file limit.
    let connectionLimit: Int
    /// When a refusal was last logged (seconds of `CLOCK_MONOTONIC`): one line per 10 s.
    private let refusalLogged = Atomic<Int>(Int.min)

    /// Creates a server over `source`; `run()` starts it. Throws nothing: the configuration
    /// is checked by `run()`, which fails with `SERVER_INVALID_CONFIGURATION` naming the field.
    public init(source: some ChangeSource, configuration: RealtimeServerConfiguration) {
        self.configuration = configuration
        self.source = source
        self.logger = configuration.logger
        self.state = Mutex(ServerState(hub: FanoutHub(limits: configuration.hubLimits), lastDelivered: source.currentCursor))
        self.metrics = ServerMetrics(registry: configuration.metricsRegistry)
        self.snapshotGate = AsyncGate(permits: configuration.maxConcurrentSnapshots)
        self.connectionLimit = configuration.maxConnections ?? Self.defaultConnectionLimit()
        (shutdownSignal, shutdownContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// A snapshot of the live counts.
    public var statistics: RealtimeServerStatistics {
        let (sessions, stats) = state.withLock { state in
            (Array(state.sessions.values),
             RealtimeServerStatistics(sessions: state.sessions.count, subscriptions: state.hub.subscriptionCount,
                                      queuedBytes: 0, queuedMessages: 0, deliveredMessages: 0,
                                      changesProcessed: state.changesProcessed, closes: state.closes,
                                      isDraining: state.phase >= .draining, fanoutCursor: state.lastDelivered))
        }
        var result = stats
        for session in sessions {
            let queued = session.queued
            result.queuedBytes += queued.bytes
            result.queuedMessages += queued.messages
        }
        result.deliveredMessages = deliveredCount.load(ordering: .relaxed)
        result.connections = openConnections.load(ordering: .relaxed)
        result.connectionsRefused = refusedConnections.load(ordering: .relaxed)
        return result
    }

    /// The default `maxConnections`: the open-file limit less an eighth of it, and at least
    /// 64, for the database connections, the runtime and the process's other files.
    static func defaultConnectionLimit() -> Int {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur != rlim_t.max else { return 1_000_000 }  // rlim_t.max: RLIM_INFINITY
        let files = Int(clamping: limit.rlim_cur)
        return Swift.max(1, files - Swift.max(64, files / 8))
    }

    /// Counts a connection just accepted; false when `connectionLimit` are open already (it
    /// is refused, and still counted until it closes: `connectionClosed()`).
    func admitConnection() -> Bool {
        let open = openConnections.add(1, ordering: .relaxed).newValue
        guard open > connectionLimit else { return true }
        refusedConnections.add(1, ordering: .relaxed)
        metrics.connectionsRefused.increment()
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let last = refusalLogged.load(ordering: .relaxed)
        if now.tv_sec >= last &+ 10, refusalLogged.compareExchange(expected: last, desired: now.tv_sec, ordering: .relaxed).exchanged {
            logger.warning("connection refused with 503: \(connectionLimit) client connections open (maxConnections, --max-connections / REALTIME_SYNC_MAX_CONNECTIONS; its default is the open-file limit, ulimit -n, less an eighth); logged once per 10 s", metadata: [
                "refused_total": "\(refusedConnections.load(ordering: .relaxed))"])
        }
        return false
    }

    /// A connection counted by `admitConnection()` closed.
    func connectionClosed() {
        openConnections.subtract(1, ordering: .relaxed)
    }

    /// Whether shutdown has begun.
    public var isDraining: Bool { state.withLock { $0.phase >= .draining } }

    /// Waits until the listener is bound and returns its port (useful with `port: 0`).
    /// Throws when the listener could not start.
    public func waitUntilListening() async throws -> Int {
        try await withCheckedThrowingContinuation { continuation in
            let answer = state.withLock { state -> Result<Int, RealtimeServerError>? in
                if let port = state.listeningPort { return .success(port) }
                if let failure = state.listeningFailure { return .failure(RealtimeServerError(.listenerFailed, failure)) }
                state.portWaiters.append(continuation)
                return nil
            }
            if let answer { continuation.resume(with: answer) }
        }
    }

    func listenerStarted(port: Int) {
        let waiters = state.withLock { state in
            state.listeningPort = port
            defer { state.portWaiters.removeAll() }
            return state.portWaiters
        }
        for waiter in waiters { waiter.resume(returning: port) }
    }

    func listenerFailed(_ message: String) {
        let waiters = state.withLock { state in
            state.listeningFailure = message
            defer { state.portWaiters.removeAll() }
            return state.portWaiters
        }
        for waiter in waiters { waiter.resume(throwing: RealtimeServerError(.listenerFailed, message)) }
    }

    private enum RunEvent: Sendable {
        case shutdownRequested
        case listenerEnded((any Error)?)
        case fanoutEnded
    }

    /// Serves until graceful shutdown (then shuts down in order) or cancellation (then
    /// closes everything at once). Throws when the listener cannot start.
    public func run() async throws {
        // A server runs once: its shutdown stream ends with its first run.
        guard runOnce.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else {
            throw RealtimeServerError(.alreadyRan, "RealtimeServer.run() was called a second time; create a new server")
        }
        // Whoever waits for the port learns of a run that ended before it listened (an
        // invalid setting, a shutdown requested before the listener started).
        defer {
            let neverListened = state.withLock { $0.listeningPort == nil && $0.listeningFailure == nil }
            if neverListened { listenerFailed("the server stopped before it was listening") }
        }
        try configuration.validate()
        let shutdownSignal = self.shutdownSignal
        let (fanoutStop, fanoutStopContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let listener = try HTTPListener(server: self)
        state.withLock { $0.lastDelivered = source.currentCursor }
        logger.info("realtime server starting", metadata: ["host": "\(configuration.host)", "port": "\(configuration.port)"])
        logAuthMode()
        try await withGracefulShutdownHandler {
            try await withThrowingTaskGroup(of: RunEvent.self) { group in
                group.addTask {
                    for await _ in shutdownSignal { return .shutdownRequested }
                    return .shutdownRequested
                }
                group.addTask {
                    do {
                        try await listener.run()
                        return .listenerEnded(nil)
                    } catch {
                        return .listenerEnded(error)
                    }
                }
                group.addTask {
                    await self.runFanout(stop: fanoutStop)
                    return .fanoutEnded
                }
                var fanoutRunning = true
                while let event = try await group.next() {
                    switch event {
                    case .fanoutEnded:
                        fanoutRunning = false
                    case .listenerEnded(let error):
                        group.cancelAll()
                        closeAllSessionsNow()
                        if let error {
                            let message = "the HTTP listener on \(configuration.host):\(configuration.port) failed: \(error) (RealtimeServerConfiguration.host / port; realtime-sync --host / --port, REALTIME_SYNC_HOST / REALTIME_SYNC_PORT)"
                            listenerFailed(message)
                            throw RealtimeServerError(.listenerFailed, message)
                        }
                        if Task.isCancelled { return }
                        throw RealtimeServerError(.listenerStopped, "the HTTP listener stopped unexpectedly")
                    case .shutdownRequested:
                        if Task.isCancelled {
                            group.cancelAll()
                            closeAllSessionsNow()
                            return
                        }
                        _ = fanoutRunning
                        await shutDownInOrder(stopFanout: fanoutStopContinuation, listener: listener)
                        group.cancelAll()
                        return
                    }
                }
            }
        } onGracefulShutdown: { [shutdownContinuation] in
            shutdownContinuation.yield()
        }
        state.withLock { $0.phase = .stopped }
    }

    /// Begins the ordered shutdown of a running server, as a graceful shutdown of its task
    /// does (`RealtimeService` calls it when its change capture fails for good); `run()`
    /// returns once it is done. Before `run()`, it makes `run()` shut down as soon as it starts.
    func requestShutdown() {
        shutdownContinuation.yield()
    }

    /// Drops every session at once (cancellation, listener failure).
    private func closeAllSessionsNow() {
        let sessions = state.withLock { state in
            state.phase = max(state.phase, .closingSockets)
            return Array(state.sessions.values)
        }
        for session in sessions {
            session.closeNow(.goingAway)
            session.channel.close(promise: nil)
        }
    }

    // MARK: Sessions' share of the state

    /// Registers a new socket. During shutdown the session is closed with 1001 at once.
    func openSession(channel: any Channel) -> SessionChannel {
        state.withLock { state in
            let id = FanoutClientID(state.nextClientID)
            state.nextClientID += 1
            let loop = ObjectIdentifier(channel.eventLoop)
            let loopIndex = state.eventLoops.firstIndex(of: loop) ?? {
                state.eventLoops.append(loop)
                return state.eventLoops.count - 1
            }()
            let session = SessionChannel(id: id, channel: channel, loopIndex: loopIndex,
                                         limits: configuration.queueLimits, closeTimeout: configuration.closeTimeout,
                                         written: { [self] count in self.recordDelivered(count) })
            state.sessions[id] = session
            if state.phase >= .draining { session.close(.goingAway) }
            return session
        }
    }

    /// Releases everything a session held; `code` is how its socket ended.
    func endSession(_ session: SessionChannel, code: UInt16) {
        state.withLock { state in
            state.sessions[session.id] = nil
            state.dropClient(session.id)
            state.closes[code, default: 0] += 1
        }
        session.finishSignals()
        metrics.recordClose(code: code)
    }

    func recordDelivered(_ count: Int) {
        deliveredCount.add(count, ordering: .relaxed)
        metrics.deliveredMessages.increment(by: Int64(count))
    }
}
