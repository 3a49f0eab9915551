#if canImport(Glibc)
import Glibc
#endif
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// A connection lent by a ``ConnectionPool``. Give it back with
/// ``ConnectionPool/release(_:)``; releasing it twice is harmless.
public struct ConnectionLease<Connection: PoolableConnection>: Sendable {
    /// The connection; use it only until the lease is released.
    public let connection: Connection
    /// The pool's id of the connection (as in logs and ``ConnectionHolder``).
    public let connectionID: UInt64
    let slot: Int
    let leaseID: UInt64
    /// The lend token when lent from a CPU-local stripe; 0 otherwise.
    let lend: UInt64
}

extension ConnectionLease {
    /// The lease as the state machine knows it (inlined: as a call, it cost 5 % of a mock
    /// lease+release cycle).
    @inline(__always)
    var raw: PoolMachine.Lease {
        PoolMachine.Lease(connection: connection, slot: slot, leaseID: leaseID, connectionID: connectionID)
    }
}

/// What a waiting acquire is resumed with.
///
/// These types live outside the generic ``ConnectionPool`` on purpose: the state
/// machine and the lock-protected state are then concrete types, compiled and
/// specialized once in PoolKit, and the hot path needs no generic metadata.
enum PoolWaitOutcome: Sendable {
    /// `checked`: the releaser handing it over found it not broken an instant ago, so the
    /// waiter need not check `isBroken` again (for a libpq connection that check is a `poll`).
    case leased(PoolMachine.Lease, waited: Duration, checked: Bool)
    case failed(ConnectionPoolError)
    case cancelled
}

/// Where a connection lent from a stripe went on its return (outside the generic pool, so
/// that the hot path needs no generic metadata).
enum StripeReturn {
    case parked(useTime: Int64)
    case unstashed(PoolMachine.ReleaseResult?, useTime: Int64)
    /// A flush adopted the lend (it is an ordinary lease now), or a stale release.
    case notInStripe
}

/// The state machine as the shell uses it: connections as class existentials, waiters as continuations.
typealias PoolMachine = PoolStateMachine<any AnyObject & Sendable, UnsafeContinuation<PoolWaitOutcome, Never>>

/// Everything the pool's `Mutex` protects.
struct PoolShellState {
    var machine: PoolMachine
    var runStarted = false
    var drainReport: DrainReport?
    var drainReportWaiters: [CheckedContinuation<DrainReport, Never>] = []
    var publishedIdle = -1
    var publishedUsed = -1
    var publishedPending = -1

    /// Mirrors whether anybody waits into `flags` for the stripes, and records the count
    /// gauges when they changed (inside the lock, so in order).
    ///
    /// A park in a stripe passes `counts: false`: lends from a stripe and returns to it publish
    /// nothing (the shared lock per cycle cost more than half the cache's gain), so publishing
    /// the park alone would show the connection idle for the whole time it is lent again and
    /// again. The stripe flush, at most `PoolStripes.flushInterval` after a park, publishes
    /// where every connection is then.
    mutating func publish(_ metrics: PoolMetrics, _ flags: PoolFlags, stripes: PoolStripes, counts: Bool = true) {
        let waiting = machine.waiterCount > 0
        if flags.waitersPresent.load(ordering: .relaxed) != waiting { flags.waitersPresent.store(waiting, ordering: .relaxed) }
        guard metrics.enabled, counts else { return }
        // A connection lent from a stripe is idle for the machine, in use for the user. Only a
        // parked connection is lent, and a park marks the stripes in use until the next flush
        // (which takes every lend back): otherwise no stripe line is read (one per CPU).
        var lent = 0
        if flags.stripesInUse.load(ordering: .relaxed) {
            for stripe in stripes.stripes { lent += stripe.lentNow.load(ordering: .relaxed) }
        }
        let idle = machine.idleCount - lent, used = machine.inUseCount + lent, pending = machine.waiterCount
        if idle != publishedIdle { publishedIdle = idle; metrics.idle.record(idle) }
        if used != publishedUsed { publishedUsed = used; metrics.used.record(used) }
        if pending != publishedPending { publishedPending = pending; metrics.pending.record(pending) }
    }
}

/// A bounded, fair, leak-finding, drainable pool of connections.
///
/// ```swift
/// let pool = ConnectionPool(configuration: .init(maxOpen: 10)) { try await PostgresConnection.connect(...) }
/// // run() owns the connects, timers and the drain; put it in a ServiceGroup
/// // or a task group for the pool's whole life.
/// try await pool.withConnection(label: "load-user") { conn in ... }
/// ```
///
/// Design: every decision is made by ``PoolStateMachine`` (a pure value type)
/// under one `Mutex`; this shell performs the resulting actions. An idle
/// connection is lent without suspending; a waiter is resumed directly by the
/// releasing task (direct handoff, FIFO). With `cpuLocalCache` (the default), a
/// returned connection that needs no reset may wait in the returning CPU's slot
/// instead, lent from there under that slot's own lock while nobody waits (the
/// machine counts it as idle; see ``PoolStripes``). Connects, the timer (timeouts,
/// idle/lifetime expiry, leak reports, backoff) and the shutdown drain run as
/// child tasks of ``run()``, which is the root that owns them. Closes run in the
/// task that decided them (the releaser, the timer, the drain).
///
/// ``run()`` must be running for connects and timeouts to happen.
public final class ConnectionPool<Connection: PoolableConnection, C: Clock>: Sendable where C.Duration == Duration {
    /// Opens a new connection. Called by ``run()``'s child tasks, at most
    /// `maxConcurrentConnects` at a time; should honour task cancellation.
    public typealias ConnectionFactory = @Sendable () async throws -> Connection

    typealias Machine = PoolMachine
    typealias WaitOutcome = PoolWaitOutcome
    typealias ShellState = PoolShellState

    /// The configuration in force (clamped into range).
    public let configuration: ConnectionPoolConfiguration
    let clock: C
    let epoch: C.Instant
    let factory: ConnectionFactory
    let logger: Logger
    let metrics: PoolMetrics
    let state: Mutex<ShellState>
    let connectRequests: AsyncStream<Machine.ConnectRequest>
    let connectRequestsContinuation: AsyncStream<Machine.ConnectRequest>.Continuation
    let timerWake = WakeSignal()
    let drainedSignal = WakeSignal()
    /// Fires when draining begins: connects still running are cancelled (`open`).
    let drainBegan = OneTimeEvent()
    /// When `C` is `ContinuousClock` on Linux: `CLOCK_BOOTTIME` (the clock `ContinuousClock`
    /// reads there) at `epoch`, in nanoseconds, so that ``now()`` reads it directly instead of
    /// going through the generic `Clock`/`InstantProtocol` witnesses twice per cycle.
    let continuousEpochNanoseconds: Int64?
    /// With `continuousEpochNanoseconds`: `CLOCK_BOOTTIME - CLOCK_MONOTONIC - epoch`, for
    /// ``stripeNow()``; refreshed at every timer wake and stripe flush (it changes only when the
    /// system sleeps).
    let coarseOffsetNanoseconds = Atomic<Int64>(0)
    /// With metrics on and `continuousEpochNanoseconds`, where the kernel keeps time by the
    /// CPU's counter: nanoseconds per tick (``TickClock``), and ``stripeStamp()`` reads the
    /// counter while `counterOn`; nil otherwise.
    let counterScale: Double?
    /// Cleared for good when the kernel stops keeping time by the counter (its watchdog found
    /// it unstable): the stamps then read `CLOCK_BOOTTIME`.
    let counterOn = Atomic<Bool>(true)
    /// The counter when the pool was made (a small difference converts to `Double` exactly).
    let tickBase: Int64
    /// With `counterScale`: the pool's time at `tickBase` as ``stripeStamp()`` computes it,
    /// refreshed with `coarseOffsetNanoseconds` (it absorbs the drift between the counter's
    /// rate and `CLOCK_BOOTTIME`'s, and a system sleep).
    let tickOffsetNanoseconds = Atomic<Int64>(0)
    /// `CLOCK_BOOTTIME` when ``refreshCoarseOffset()`` last read the kernel's clock source.
    let clockSourceCheckedAt = Atomic<Int64>(0)
    /// The CPU-local cache (`cpuLocalCache`); see ``PoolStripes``.
    let stripes: PoolStripes
    let flags = PoolFlags()

    /// Creates a pool. Nothing is opened until ``run()`` runs (it then opens `minIdle` connections).
    ///
    /// - Parameters:
    ///   - configuration: the knobs; see ``ConnectionPoolConfiguration``.
    ///   - clock: the clock for every timeout and deadline (inject a manual clock in tests).
    ///   - logger: receives connect failures, leak reports, drain summaries.
    ///   - connectionFactory: opens one connection.
    public convenience init(
        configuration: ConnectionPoolConfiguration = ConnectionPoolConfiguration(),
        clock: C,
        logger: Logger = Logger(label: "PoolKit.ConnectionPool"),
        connectionFactory: @escaping ConnectionFactory
    ) {
        self.init(
            configuration: configuration, clock: clock, logger: logger,
            seed: UInt64.random(in: .min ... .max), connectionFactory: connectionFactory
        )
    }

    /// Creates a pool with a fixed seed for the lifetime and backoff jitter, and optionally a
    /// fixed number of CPU-local stripes (tests).
    init(
        configuration: ConnectionPoolConfiguration, clock: C, logger: Logger, seed: UInt64, stripes: Int? = nil,
        connectionFactory: @escaping ConnectionFactory
    ) {
        let configuration = configuration.normalized
        self.configuration = configuration
        self.clock = clock
        self.epoch = clock.now
        self.continuousEpochNanoseconds = C.self == ContinuousClock.self ? Self.bootTimeNanoseconds() : nil
        self.factory = connectionFactory
        var logger = logger
        logger[metadataKey: "db.client.connection.pool.name"] = .string(configuration.name)
        self.logger = logger
        self.metrics = PoolMetrics(configuration: configuration)
        self.counterScale = metrics.enabled && continuousEpochNanoseconds != nil ? TickClock.nanosecondsPerTick : nil
        self.tickBase = counterScale != nil ? TickClock.read() : 0
        self.stripes = PoolStripes(
            count: configuration.cpuLocalCache ? stripes ?? PoolStripes.defaultCount(enabled: true) : 0
        )
        (connectRequests, connectRequestsContinuation) = AsyncStream.makeStream(of: Machine.ConnectRequest.self)
        var machine = Machine(configuration: configuration, seed: seed)
        let warmUp = machine.start(now: .zero)
        for request in warmUp.connects { connectRequestsContinuation.yield(request) }
        state = Mutex(ShellState(machine: machine))
        refreshCoarseOffset()
    }

    // MARK: - Leasing

    /// Runs `body` with a connection and gives the connection back afterwards,
    /// also when `body` throws or the task is cancelled. The main API.
    ///
    /// - Parameters:
    ///   - label: names the holder in ``holders()``, leak reports and timeout errors.
    ///   - timeout: overrides `acquireTimeout` for this call.
    ///   - fileID: the holder's source file, reported with `label`.
    ///   - line: the holder's source line.
    ///   - body: uses the connection; must not keep it.
    /// - Throws: ``ConnectionPoolError`` (`POOL_ACQUIRE_TIMEOUT`, `POOL_TOO_MANY_WAITERS`,
    ///   `POOL_SHUT_DOWN`), `CancellationError`, or what `body` throws.
    @discardableResult
    nonisolated(nonsending)
    public func withConnection<Result>(
        label: String? = nil,
        timeout: Duration? = nil,
        fileID: String = #fileID,
        line: Int = #line,
        _ body: nonisolated(nonsending) (Connection) async throws -> Result
    ) async throws -> Result {
        let request = Machine.Request(label: label, fileID: fileID, line: line)
        // Fast path: this CPU's parked connection or an idle one, without suspending; one
        // body call site, so the async frame stays small.
        var fast = leaseWithoutWaiting(request)
        if let candidate = fast, candidate.connection.isBroken {
            await discard(candidate)
            fast = nil
        }
        let lease: ConnectionLease<Connection>
        if let fast {
            // Its (zero) wait is recorded once it is known to be usable: a broken one discarded
            // sends the caller to wait, and that wait is the lease's one sample.
            if metrics.enabled { metrics.recordNoWait() }
            lease = fast
        } else {
            lease = try await leaseWaiting(request, timeout: timeout)
        }
        let result: Result
        do {
            result = try await body(lease.connection)
        } catch {
            await self.release(lease)
            throw error
        }
        // The way back, without an async call when the connection needs no reset.
        switch releaseWithoutReset(lease) {
        case .done: break
        case .remaining(let actions): await perform(actions)
        case .needsReset: await releaseAfterReset(lease)
        }
        return result
    }

    /// A connection at once, if this CPU's stripe has one parked or one is idle and nobody waits.
    @inline(__always)
    private func leaseWithoutWaiting(_ request: Machine.Request) -> ConnectionLease<Connection>? {
        if stripes.enabled, let (raw, lend) = lendFromStripe(request) {
            return ConnectionLease(
                connection: unsafeDowncast(raw.connection, to: Connection.self), connectionID: raw.connectionID,
                slot: raw.slot, leaseID: raw.leaseID, lend: lend
            )
        }
        if let raw = leaseIfIdle(request) {
            return ConnectionLease(
                connection: unsafeDowncast(raw.connection, to: Connection.self), connectionID: raw.connectionID,
                slot: raw.slot, leaseID: raw.leaseID, lend: 0
            )
        }
        // With `maxWaiters` 0 nobody waits, so no waiter's sweep ever takes a connection parked
        // in another CPU's stripe: look there before being refused with "too many waiters".
        if configuration.maxWaiters == 0, stripes.enabled {
            for stripe in stripes.stripes {
                if let (raw, lend) = lend(from: stripe, request) {
                    return ConnectionLease(
                        connection: unsafeDowncast(raw.connection, to: Connection.self), connectionID: raw.connectionID,
                        slot: raw.slot, leaseID: raw.leaseID, lend: lend
                    )
                }
            }
            // About to be refused: connections lent from stripes become ordinary leases first,
            // so that the refusal names their holders and counts them in use, and so that the
            // machine, which counts a stripe's connection idle until then, plans a connect for
            // the refused demand.
            adoptStripeLends()
        }
        return nil
    }

    /// Gives back a connection found broken before use.
    nonisolated(nonsending)
    private func discard(_ lease: ConnectionLease<Connection>) async {
        if lease.lend != 0 {
            await returnLent(lease.connection, lease.raw, lend: lease.lend, knownBroken: true)
        } else {
            await giveBack(lease.raw, reusable: false)
        }
    }

    /// Lends a connection; the caller must ``release(_:)`` it. For code that
    /// cannot use ``withConnection(label:timeout:fileID:line:_:)``.
    ///
    /// Returns at once, without suspending, if a connection is idle and nobody
    /// waits. Otherwise waits in FIFO order until a connection is handed over,
    /// the timeout passes, or the task is cancelled. A connection found broken
    /// is discarded and the caller keeps its place and its deadline.
    nonisolated(nonsending)
    public func lease(
        label: String? = nil,
        timeout: Duration? = nil,
        fileID: String = #fileID,
        line: Int = #line
    ) async throws -> ConnectionLease<Connection> {
        let request = Machine.Request(label: label, fileID: fileID, line: line)
        if let fast = leaseWithoutWaiting(request) {
            if !fast.connection.isBroken {
                if metrics.enabled { metrics.recordNoWait() }
                return fast
            }
            await discard(fast)
        }
        return try await leaseWaiting(request, timeout: timeout)
    }

    /// The rest of ``lease(label:timeout:fileID:line:)``: waits in FIFO order (or finds an idle
    /// connection after all), discarding broken connections while keeping its place.
    nonisolated(nonsending)
    func leaseWaiting(_ request: Machine.Request, timeout: Duration?) async throws -> ConnectionLease<Connection> {
        var deadline: Duration?
        var waitingSince: Duration?
        var requeue = false
        // One `wait_time` sample per lease, for the wait as a whole: a broken connection
        // discarded sends the caller back to the queue's front, and the sample then runs from
        // the first leg's start to the end (the discard between the legs included).
        var waited: Duration?
        var began: Duration?
        while true {
            let (raw, checked, legWait) = try await acquire(
                request, timeout: timeout, deadline: &deadline, waitingSince: &waitingSince, began: &began, atFront: requeue)
            if let legWait { waited = (waited ?? .zero) + legWait }
            let connection = unsafeDowncast(raw.connection, to: Connection.self)
            if checked || !connection.isBroken {
                if metrics.enabled {
                    if requeue, let began { metrics.waitTime.record(now() - began) }
                    else if let waited { metrics.waitTime.record(waited) } else { metrics.recordNoWait() }
                }
                return ConnectionLease(connection: connection, connectionID: raw.connectionID, slot: raw.slot, leaseID: raw.leaseID, lend: 0)
            }
            logger.debug("discarding broken connection on lease", metadata: ["db.client.connection.id": "\(raw.connectionID)"])
            await giveBack(raw, reusable: false)
            requeue = true
        }
    }

    /// Gives a leased connection back. A broken connection, or one whose
    /// `prepareForReuse()` throws, is closed (and replaced if needed); otherwise
    /// it goes straight to the first waiter or becomes idle. Releasing a lease
    /// twice, or after a drain cut it off, does nothing.
    nonisolated(nonsending)
    public func release(_ lease: ConnectionLease<Connection>) async {
        switch releaseWithoutReset(lease) {
        case .done: break
        case .remaining(let actions): await perform(actions)
        case .needsReset: await releaseAfterReset(lease)
        }
    }

    /// What ``releaseWithoutReset(_:)`` did.
    private enum QuickRelease {
        /// Returned (idle, handed over, or a stale release): nothing left to do.
        case done
        /// Returned; these actions (closes, connects) are left for the caller to perform.
        case remaining(Machine.Actions)
        /// Nothing done: the connection needs `prepareForReuse()`.
        case needsReset
    }

    /// The release of a connection that is broken or needs no reset, without suspending (a
    /// handoff's resume included): back to its stripe (lent from one), parked in this CPU's
    /// stripe (when that is empty and nobody waits), or returned to the machine in one lock
    /// section. Closes, if any, are returned for the caller to perform in its task. Does
    /// nothing when the connection needs `prepareForReuse()`.
    ///
    /// `isBroken` is read once here (for a Postgres connection it is a `poll`). Reading the
    /// connection before the claim is harmless on a double release: the claim then fails and
    /// nothing else happens.
    @inline(__always)
    private func releaseWithoutReset(_ lease: ConnectionLease<Connection>) -> QuickRelease {
        let broken = lease.connection.isBroken
        guard broken || !lease.connection.needsReset else { return .needsReset }
        guard lease.lend != 0 else { return releaseMachineLease(lease, broken: broken) }
        guard let remaining = returnLentSynchronously(lease.raw, lend: lease.lend, reusable: !broken) else { return .done }
        return .remaining(remaining)
    }

    /// ``releaseWithoutReset(_:)`` for a lease of the machine (not lent from a stripe).
    private func releaseMachineLease(_ lease: ConnectionLease<Connection>, broken: Bool) -> QuickRelease {
        if !broken, stripes.enabled, !flags.waitersPresent.load(ordering: .relaxed),
           parkInStripe(lease.connection, slot: lease.slot, leaseID: lease.leaseID, connectionID: lease.connectionID) {
            return .done
        }
        guard let remaining = releaseSynchronously(slot: lease.slot, leaseID: lease.leaseID, reusable: !broken) else { return .done }
        return .remaining(remaining)
    }

    /// The release of a connection that needs `prepareForReuse()` first.
    nonisolated(nonsending)
    private func releaseAfterReset(_ lease: ConnectionLease<Connection>) async {
        if lease.lend != 0 {
            await returnLent(lease.connection, lease.raw, lend: lease.lend)
        } else {
            await releaseSlowly(lease.connection, slot: lease.slot, leaseID: lease.leaseID, connectionID: lease.connectionID)
        }
    }

    /// The release of a connection that needs `prepareForReuse()`: claim, reset, return.
    nonisolated(nonsending)
    private func releaseSlowly(_ connection: Connection, slot: Int, leaseID: UInt64, connectionID: UInt64) async {
        if Task.isCancelled {
            // The holder was cancelled, the usual way a request leaves mid-transaction. Its
            // cleanup runs in a task of its own: it does not inherit the cancellation (a driver
            // that checks it would refuse the ROLLBACK: a reconnect per cancelled request), and
            // the cancelled caller does not wait for it (a ROLLBACK on a hung socket). The
            // connection stays out of the pool until then; `leakThreshold` reports it if the
            // reset hangs.
            Task { await self.releaseSlowly(connection, slot: slot, leaseID: leaseID, connectionID: connectionID) }
            return
        }
        let claimed = state.withLock { $0.machine.beginRelease(slot: slot, leaseID: leaseID) }
        guard claimed else { return }
        var reusable = !connection.isBroken
        if reusable { reusable = await reset(connection, connectionID: connectionID) }
        if let remaining = finishReleaseSynchronously(slot: slot, leaseID: leaseID, reusable: reusable) {
            await perform(remaining)
        }
    }

    /// Runs `prepareForReuse()`; false (logged) if it threw, and the connection is to be closed.
    nonisolated(nonsending)
    private func reset(_ connection: Connection, connectionID: UInt64) async -> Bool {
        do {
            try await connection.prepareForReuse()
            return true
        } catch {
            logger.debug(
                "closing connection whose reset failed",
                metadata: ["db.client.connection.id": "\(connectionID)", "error": "\(error)"]
            )
            return false
        }
    }

    /// The synchronous fast path of `lease`: an idle connection if nobody waits.
    private func leaseIfIdle(_ request: Machine.Request) -> Machine.Lease? {
        let now = self.now()
        let leased = state.withLock { s -> (lease: Machine.Lease, rescheduleTimer: Bool)? in
            guard let leased = s.machine.leaseIfIdle(request: request, now: now) else { return nil }
            s.publish(metrics, flags, stripes: stripes)
            return leased
        }
        guard let (raw, rescheduleTimer) = leased else { return nil }
        if rescheduleTimer { timerWake.signal() }
        return raw
    }

    /// Claims and finishes a release in one lock section (no reset needed); returns what is left (closes) if anything.
    private func releaseSynchronously(slot: Int, leaseID: UInt64, reusable: Bool) -> Machine.Actions? {
        let now = self.now()
        let result = state.withLock { s -> Machine.ReleaseResult in
            let result = s.machine.release(slot: slot, leaseID: leaseID, now: now, reusable: reusable)
            s.publish(metrics, flags, stripes: stripes)
            return result
        }
        return performReleaseResult(result, reusable: reusable)
    }

    /// Runs the part of a release that needs no waiting; returns what is left (closes) if anything.
    private func finishReleaseSynchronously(slot: Int, leaseID: UInt64, reusable: Bool) -> Machine.Actions? {
        let now = self.now()
        let result = state.withLock { s -> Machine.ReleaseResult in
            let result = s.machine.finishRelease(slot: slot, leaseID: leaseID, now: now, reusable: reusable)
            s.publish(metrics, flags, stripes: stripes)
            return result
        }
        return performReleaseResult(result, reusable: reusable)
    }

    /// Acts on a release's result outside the lock: metrics, timer, the waiter's resume.
    @inline(__always)
    private func performReleaseResult(_ result: Machine.ReleaseResult, reusable: Bool) -> Machine.Actions? {
        var remaining: Machine.Actions?
        switch result.action {
        case .none, .idled:
            break
        case .handoff(let handoff):
            // First thing after the lock: the waiter's latency starts here.
            // `reusable` was decided just now (isBroken, needsReset/prepareForReuse) for the connection handed over.
            handoff.waiter.resume(returning: .leased(handoff.lease, waited: handoff.waited, checked: reusable))
        case .actions(let actions):
            remaining = actions
        }
        if metrics.enabled, let useTime = result.useTime { metrics.useTime.record(useTime) }
        if result.rescheduleTimer { timerWake.signal() }
        return remaining
    }

    // MARK: - CPU-local stripes (see PoolStripes)

    /// Lends this CPU's parked connection to `request`, if there is one and nobody waits.
    @inline(__always)
    private func lendFromStripe(_ request: Machine.Request) -> (lease: Machine.Lease, lend: UInt64)? {
        let stamp = stripeStamp()
        let lent = stripes.withCurrent { stripe in
            stripe.state.withLock { s in lendLocked(&s, stripe: stripe, request, stamp: stamp) }
        }
        return lent
    }

    /// Lends the connection parked in `stripe`, if there is one and nobody waits (the
    /// `maxWaiters: 0` sweep of every stripe; the fast path is `lendFromStripe`).
    private func lend(from stripe: PoolStripe, _ request: Machine.Request) -> (lease: Machine.Lease, lend: UInt64)? {
        let stamp = stripeStamp()
        return stripe.state.withLock { s in lendLocked(&s, stripe: stripe, request, stamp: stamp) }
    }

    /// Under `stripe`'s lock: lends its parked connection if it may (nobody waits, within
    /// its lifetime). Written for inlining into the lock's closure: called from a shared
    /// function around the lock, the fast path cost about 25 ns more per cycle.
    @inline(__always)
    private func lendLocked(
        _ s: inout StripeState, stripe: PoolStripe, _ request: Machine.Request, stamp: StripeStamp
    ) -> (lease: Machine.Lease, lend: UInt64)? {
        let now = stamp.now
        guard s.parked != nil, s.lent == nil, !flags.waitersPresent.load(ordering: .relaxed),
              s.expiresAt.map({ $0 > now }) ?? true
        else { return nil }
        let lend = PoolStripes.nextLend(&s, index: stripe.index)
        let parked = s.parked.take()!
        s.lent = StripeLent(
            slot: parked.slot, leaseID: parked.leaseID, connectionID: parked.connectionID,
            lend: lend, request: request, since: now, sinceNanoseconds: stamp.nanoseconds, expiresAt: s.expiresAt
        )
        s.lends += 1
        if metrics.enabled { stripe.lentNow.store(1, ordering: .relaxed) }
        return (parked, lend)
    }

    /// Gives back a connection lent from a stripe: resets it if needed, then parks it in its
    /// stripe again, or returns it to the pool (a waiter, the idle list, or a close).
    nonisolated(nonsending)
    private func returnLent(_ connection: Connection, _ raw: Machine.Lease, lend: UInt64, knownBroken: Bool = false) async {
        let reusable = !knownBroken && !connection.isBroken
        if reusable && connection.needsReset {
            if Task.isCancelled {
                // As in `releaseSlowly`: a cancelled holder's cleanup runs in a task of its own.
                Task { await self.returnLent(connection, raw, lend: lend, knownBroken: knownBroken) }
                return
            }
            // Claim the lease before touching the connection, as `releaseSlowly` does: a second
            // release of this lease, once the connection is someone else's, must not reset it
            // (a ROLLBACK of the next holder's transaction).
            let (claimed, rescheduleTimer) = claimLent(raw, lend: lend)
            if rescheduleTimer { timerWake.signal() }
            guard claimed else { return }
            let stillGood = await reset(connection, connectionID: raw.connectionID)
            if let remaining = finishReleaseSynchronously(slot: raw.slot, leaseID: raw.leaseID, reusable: stillGood) {
                await perform(remaining)
            }
            return
        }
        if let remaining = returnLentSynchronously(raw, lend: lend, reusable: reusable) {
            await perform(remaining)
        }
    }

    /// Makes a stripe lend a lease of the machine that is being returned (adopting it if it is
    /// still lent from its stripe; a flush may have adopted it already). False if the lease is
    /// stale: released before, or cut off by a drain.
    private func claimLent(_ raw: Machine.Lease, lend: UInt64) -> (claimed: Bool, rescheduleTimer: Bool) {
        stripes.withStripe(ofLend: lend) { stripe in stripe.state.withLock { s in
            let lent = s.lent?.lend == lend ? s.lent : nil
            if lent != nil {
                s.lent = nil
                if metrics.enabled { stripe.lentNow.store(0, ordering: .relaxed) }
            }
            return state.withLock { m -> (claimed: Bool, rescheduleTimer: Bool) in
                var rescheduleTimer = false
                if let lent {
                    rescheduleTimer = m.machine.adopt(
                        slot: lent.slot, leaseID: lent.leaseID, lend: lent.lend, request: lent.request, since: lent.since
                    )
                }
                let claimed = m.machine.beginRelease(slot: raw.slot, leaseID: raw.leaseID, lend: lend)
                m.publish(metrics, flags, stripes: stripes)
                return (claimed, rescheduleTimer)
            }
        } }
    }

    @inline(__always)
    private func returnLentSynchronously(_ raw: Machine.Lease, lend: UInt64, reusable: Bool) -> Machine.Actions? {
        let stamp = stripeStamp()
        let now = stamp.now
        let outcome = stripes.withStripe(ofLend: lend) { stripe in stripe.state.withLock { s -> StripeReturn in
            guard s.lent?.lend == lend else { return .notInStripe }
            let useTime = metrics.enabled ? useNanoseconds(since: s.lent.unsafelyUnwrapped, until: stamp) : 0
            let expiresAt = s.lent.unsafelyUnwrapped.expiresAt
            s.lent = nil
            if metrics.enabled { stripe.lentNow.store(0, ordering: .relaxed) }
            if reusable, s.parked == nil, !s.closed, !flags.waitersPresent.load(ordering: .relaxed),
               expiresAt.map({ $0 > now }) ?? true {
                s.parked = raw
                s.parkedSince = now
                s.expiresAt = expiresAt
                return .parked(useTime: useTime)
            }
            // Somebody waits (or it cannot stay): back through the machine, still under the
            // stripe's lock so that no flush sees it half-way.
            let exactNow = self.now()
            let result = state.withLock { m -> Machine.ReleaseResult? in
                let result = m.machine.unstash(
                    slot: raw.slot, leaseID: raw.leaseID, now: exactNow, parkedSince: exactNow, reusable: reusable
                )
                m.publish(metrics, flags, stripes: stripes)
                return result
            }
            return .unstashed(result, useTime: useTime)
        } }
        switch outcome {
        case .parked(let useTime):
            if metrics.enabled { metrics.recordUseTime(nanoseconds: useTime) }
            return nil
        case .unstashed(let result, let useTime):
            if metrics.enabled { metrics.recordUseTime(nanoseconds: useTime) }
            guard let result else { return nil }
            return performReleaseResult(result, reusable: reusable)
        case .notInStripe:
            let exactNow = self.now()
            let result = state.withLock { m -> Machine.ReleaseResult in
                let result = m.machine.release(slot: raw.slot, leaseID: raw.leaseID, lend: lend, now: exactNow, reusable: reusable)
                m.publish(metrics, flags, stripes: stripes)
                return result
            }
            return performReleaseResult(result, reusable: reusable)
        }
    }

    /// Ends a lease of the machine by parking its connection in this CPU's stripe, if that
    /// stripe is empty and the machine agrees (nobody waits, within lifetime and `maxIdle`).
    private func parkInStripe(_ connection: Connection, slot: Int, leaseID: UInt64, connectionID: UInt64) -> Bool {
        // The first park since a flush, perhaps after hours without one: the stamps' offsets
        // are brought up to date before any lend of it can read them (``stripeStamp()``).
        if counterScale != nil, !flags.stripesInUse.load(ordering: .relaxed) { refreshCoarseOffset() }
        let now = self.now()
        let parked = stripes.withCurrent { stripe in stripe.state.withLock { s -> (stash: Machine.Stash, armed: Bool)? in
            // Not beside a connection lent from this stripe: a stripe lends one connection at a
            // time, so a second one parked there could not be lent until the next flush (a
            // caller would wait, or be refused under `maxWaiters` 0, with it idle).
            guard s.parked == nil, s.lent == nil, !s.closed else { return nil }
            let granted = state.withLock { m -> (stash: Machine.Stash, armed: Bool)? in
                guard let stash = m.machine.stash(slot: slot, leaseID: leaseID, now: now) else { return nil }
                // Under the pool's lock, so that a waiter queuing after this sees it.
                let armed = flags.arm(at: now)
                m.publish(metrics, flags, stripes: stripes, counts: false)
                return (stash, armed)
            }
            guard let granted else { return nil }
            s.parked = Machine.Lease(connection: connection, slot: slot, leaseID: leaseID, connectionID: connectionID)
            s.parkedSince = now
            s.expiresAt = granted.stash.expiresAt
            return granted
        } }
        guard let parked else { return false }
        if metrics.enabled { metrics.useTime.record(parked.stash.useTime) }
        // The timer flushes the stripes `flushInterval` after the first park.
        if parked.armed { timerWake.signal() }
        return true
    }

    /// Makes every connection lent from a stripe an ordinary lease of its holder (as a flush
    /// does, without touching parked ones): the machine then counts it in use and knows its
    /// holder, for the errors it writes (`POOL_ACQUIRE_TIMEOUT`, `POOL_TOO_MANY_WAITERS`) and its
    /// connect planning. Its holder's return finds it gone from the stripe and goes through the
    /// machine. Slow paths only: a waiter queues, or a caller is about to be refused.
    private func adoptStripeLends() {
        var rescheduleTimer = false
        for stripe in stripes.stripes {
            stripe.state.withLock { s in
                guard let lent = s.lent else { return }
                s.lent = nil
                if metrics.enabled { stripe.lentNow.store(0, ordering: .relaxed) }
                state.withLock { m in
                    if m.machine.adopt(slot: lent.slot, leaseID: lent.leaseID, lend: lent.lend, request: lent.request, since: lent.since) {
                        rescheduleTimer = true
                    }
                    m.publish(metrics, flags, stripes: stripes)
                }
            }
        }
        if rescheduleTimer { timerWake.signal() }
    }

    /// A waiter just queued: it (and any behind it) gets every parked connection it can use,
    /// and the connections lent from stripes become ordinary leases (``adoptStripeLends()``),
    /// so that a timeout names their holders.
    private func handStripesToWaiters() {
        adoptStripeLends()
        for stripe in stripes.stripes {
            let result = stripe.state.withLock { s -> Machine.ReleaseResult? in
                guard let parked = s.parked else { return nil }
                let now = self.now()
                let result = state.withLock { m -> Machine.ReleaseResult? in
                    let result = m.machine.unstash(
                        slot: parked.slot, leaseID: parked.leaseID, now: now, parkedSince: s.parkedSince,
                        reusable: true, onlyToWaiter: true
                    )
                    m.publish(metrics, flags, stripes: stripes)
                    return result
                }
                if result != nil { s.parked = nil }
                return result
            }
            // Not checked for `isBroken` since it was parked: the waiter checks. (`onlyToWaiter`:
            // a handoff or nothing, never a close, whose `closeFinished` a drain would wait for.)
            if let result, let left = performReleaseResult(result, reusable: false) {
                // Not expected (`onlyToWaiter`); done all the same rather than dropped, which
                // would leak a connection and hold a drain until its deadline.
                assert(left.closes.isEmpty, "a stripe's sweep to a waiter closed a connection")
                Task { await self.perform(left) }
            }
        }
    }

    /// Brings every stripe's connections back under the machine: parked ones return (idle,
    /// to a waiter, or closed), one still lent becomes an ordinary lease of its holder.
    /// `closing` (the drain) also shuts the stripes for good.
    nonisolated(nonsending)
    func flushStripes(closing: Bool) async {
        await perform(takeStripes(closing: closing))
    }

    /// The synchronous half of `flushStripes`: gives every stripe's connections back to the
    /// state machine and returns what that asks for, without doing it.
    private func takeStripes(closing: Bool) -> Machine.Actions {
        guard stripes.enabled else { return Machine.Actions() }
        flags.stripesInUse.store(false, ordering: .relaxed)
        var actions = Machine.Actions()
        for stripe in stripes.stripes {
            stripe.state.withLock { s in
                if closing { s.closed = true }
                guard s.parked != nil || s.lent != nil || s.lends > 0 else { return }
                let parked = s.parked, lent = s.lent, lends = s.lends, parkedSince = s.parkedSince
                s.parked = nil
                s.lent = nil
                if lent != nil, metrics.enabled { stripe.lentNow.store(0, ordering: .relaxed) }
                s.lends = 0
                let now = self.now()
                state.withLock { m in
                    m.machine.countStripeLeases(lends)
                    if let lent, m.machine.adopt(
                        slot: lent.slot, leaseID: lent.leaseID, lend: lent.lend,
                        request: lent.request, since: lent.since
                    ) {
                        actions.rescheduleTimer = true
                    }
                    if let parked, let result = m.machine.unstash(
                        slot: parked.slot, leaseID: parked.leaseID, now: now, parkedSince: parkedSince, reusable: true
                    ) {
                        if result.rescheduleTimer { actions.rescheduleTimer = true }
                        switch result.action {
                        case .none, .idled: break
                        case .handoff(let handoff): actions.handoffs.append(handoff)
                        case .actions(let more): actions.absorb(more)
                        }
                    }
                    m.publish(metrics, flags, stripes: stripes)
                }
            }
        }
        return actions
    }

    // MARK: - Introspection

    /// A snapshot of counts and counters.
    public var statistics: PoolStatistics {
        withStripesLocked { stripeStates in
            var statistics = state.withLock { $0.machine.statistics() }
            for s in stripeStates {
                // A lent connection is still stashed (idle) for the machine.
                if s.lent != nil {
                    statistics.idle -= 1
                    statistics.inUse += 1
                }
                statistics.leases += s.lends
            }
            return statistics
        }
    }

    /// Every connection lent out right now, longest held first, with its holder's label and source location.
    public func holders() -> [ConnectionHolder] {
        withStripesLocked { stripeStates in
            let now = self.now()
            var holders = state.withLock { $0.machine.holders(now: now) }
            let lent = stripeStates.compactMap(\.lent)
            guard !lent.isEmpty else { return holders }
            for lent in lent {
                holders.append(ConnectionHolder(
                    connectionID: lent.connectionID, label: lent.request.label,
                    fileID: lent.request.fileID, line: lent.request.line, heldFor: max(.zero, now - lent.since)
                ))
            }
            return holders.sorted { $0.heldFor > $1.heldFor }
        }
    }

    /// Runs `body` with every stripe locked (in order), so that what it reads of the stripes and
    /// (under the pool's lock, which it takes itself) of the machine is one consistent snapshot.
    private func withStripesLocked<R: Sendable>(
        from index: Int = 0, collected: [StripeState] = [], _ body: ([StripeState]) -> R
    ) -> R {
        if index == stripes.stripes.count { return body(collected) }
        return stripes.stripes[index].state.withLock { s in
            withStripesLocked(from: index + 1, collected: collected + [s], body)
        }
    }

    // MARK: - Service

    /// Runs the pool: opens connections, fires timeouts, closes idle and old
    /// connections, reports leaks. On graceful shutdown (swift-service-lifecycle)
    /// it drains with `drainTimeout`; on task cancellation it drains at once.
    /// Returns when the pool is drained. Call it once.
    public func run() async throws {
        let first = state.withLock { s -> Bool in
            defer { s.runStarted = true }
            return !s.runStarted
        }
        guard first else {
            logger.error("ConnectionPool.run() called more than once; the second call returns at once")
            return
        }
        await withDiscardingTaskGroup { group in
            group.addTask { await self.runTimer() }
            group.addTask {
                do {
                    try await gracefulShutdown()
                    _ = await self.drain(deadline: self.clock.now.advanced(by: self.configuration.drainTimeout))
                } catch {
                    _ = await self.drain(deadline: self.clock.now)
                }
            }
            for await request in connectRequests {
                group.addTask { await self.connect(request) }
            }
            group.cancelAll()
        }
    }

    /// Drains the pool: new acquires fail at once, waiters fail, idle
    /// connections close, held connections are awaited until `deadline` (and
    /// closed as they come back); at the deadline their queries are cancelled on
    /// the server and they are closed (a cancel request that cannot go out within
    /// a second does not hold the close up). Returns what it did and whom it cut off, once
    /// every close the pool had begun is done (also those begun by other tasks before the
    /// last return: an idle connection the timer was closing, an earlier holder's return),
    /// or at `deadline`, which a close still running (the drain's own idle closes included)
    /// does not hold up: the report counts it (`closesUnfinished`).
    /// Idempotent: later calls wait for the first drain and return its report.
    /// Cancelling the calling task cuts off at once.
    public func drain(deadline: C.Instant) async -> DrainReport {
        // The stripes' connections go back to the state machine and the drain begins with no
        // suspension between: acquires fail from here on. (What the flush asks for, such as
        // closing a parked connection past its lifetime, is done after; done first, it let
        // acquires through for as long as a close took.)
        let flushed = takeStripes(closing: true)
        let startedAt = now()
        let start = state.withLock { s -> Machine.DrainStart in
            let start = s.machine.beginDrain(now: startedAt)
            s.publish(metrics, flags, stripes: stripes)
            return start
        }
        if start.alreadyStarted {
            await perform(flushed)
            return await waitForDrainReport()
        }
        drainBegan.fire()
        logger.info("draining pool", metadata: ["waiters": "\(start.waitersFailed)", "idle": "\(start.idleClosed)"])
        // Waiters fail now; the closes (the idle connections', and what the stripes' flush
        // closed) run beside the wait, not before it: one that hangs neither holds the drain
        // past its deadline nor the waiters behind it (each close is counted until it ends, so
        // the drained signal waits for them when they end in time).
        var promptly = flushed, later = Machine.Actions()
        later.closes = flushed.closes + start.actions.closes
        later.connects = flushed.connects
        later.drained = flushed.drained || start.actions.drained
        promptly.closes = []
        promptly.connects = []
        promptly.drained = false
        performWithoutClosing(promptly)
        var startNow = start.actions
        startNow.closes = []
        startNow.drained = false
        performWithoutClosing(startNow)
        Task { await self.perform(later) }
        timerWake.signal()
        if !start.actions.drained {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await self.drainedSignal.wait() }
                // A deadline past `longestWait` means "wait for them": clocks cannot sleep that far.
                let until = min(deadline, self.clock.now.advanced(by: ConnectionPoolConfiguration.longestWait))
                group.addTask { try? await self.clock.sleep(until: until, tolerance: nil) }
                _ = await group.next()
                group.cancelAll()
            }
        }
        let endedAt = now()
        let end = state.withLock { s -> Machine.DrainEnd in
            let end = s.machine.endDrain(now: endedAt)
            s.publish(metrics, flags, stripes: stripes)
            return end
        }
        if !end.cutOff.isEmpty {
            await withDiscardingTaskGroup { group in
                for (object, holder) in end.cutOff {
                    let connection = unsafeDowncast(object, to: Connection.self)
                    group.addTask {
                        self.logger.warning("drain deadline passed (drainTimeout, or drain(deadline:)): cancelling query and closing connection", metadata: [
                            "db.client.connection.id": "\(holder.connectionID)", "holder": "\(holder)",
                        ])
                        // The cancel request is given at most a second to go out (PQcancel
                        // blocks while it connects, e.g. for minutes to an unreachable host);
                        // the connection is closed then either way.
                        let delivered = OneTimeEvent()
                        Task { await connection.cancelRunningQuery(); delivered.fire() }
                        _ = await delivered.wait(atMost: .seconds(1))
                        await connection.close()
                    }
                }
            }
        }
        var report = DrainReport()
        report.duration = now() - startedAt
        report.waitersFailed = start.waitersFailed
        report.idleClosed = start.idleClosed
        report.returnedInTime = end.returnedInTime
        report.cutOff = end.cutOff.map(\.holder)
        report.connectsAbandoned = end.connectsAbandoned
        report.closesUnfinished = end.closesUnfinished
        let waiters = state.withLock { s -> [CheckedContinuation<DrainReport, Never>] in
            s.drainReport = report
            defer { s.drainReportWaiters = [] }
            return s.drainReportWaiters
        }
        for waiter in waiters { waiter.resume(returning: report) }
        connectRequestsContinuation.finish()
        timerWake.signal()
        logger.info("pool \(report)")
        return report
    }

    // MARK: - Internals

    /// Time since the pool's epoch, as the state machine counts it.
    @inline(__always)
    func now() -> Duration {
        if let base = continuousEpochNanoseconds, let nanoseconds = Self.bootTimeNanoseconds() {
            return .nanoseconds(nanoseconds &- base)
        }
        return epoch.duration(to: clock.now)
    }

    /// The time stamps of the CPU-local stripes (a lend's start, a park).
    ///
    /// Metrics off: ``now()`` to within the kernel's tick (4 ms on this project's machines;
    /// 1-10 ms by kernel configuration), read from `CLOCK_MONOTONIC_COARSE` (3 ns instead of
    /// 21 ns; two reads per lease+release had been a fifth of a cycle). They feed held times,
    /// leak reports, idle times and lifetimes, where milliseconds do not matter.
    ///
    /// Metrics on, `db.client.connection.use_time` needs exact times: they come from the CPU's
    /// counter where the kernel keeps time by it (``TickClock``; within microseconds of
    /// ``now()``, to which its offset is refreshed at every timer wake and first park), else
    /// from `CLOCK_BOOTTIME` as ``now()`` reads it.
    @inline(__always)
    func stripeStamp() -> StripeStamp {
        #if os(Linux) && canImport(Glibc)
        if let base = continuousEpochNanoseconds {
            let nanoseconds: Int64
            if metrics.enabled {
                if let scale = counterScale, counterOn.load(ordering: .relaxed) {
                    nanoseconds = Int64(Double(TickClock.read() &- tickBase) * scale) &+ tickOffsetNanoseconds.load(ordering: .relaxed)
                } else if let boot = Self.bootTimeNanoseconds() {
                    nanoseconds = boot &- base
                } else {
                    return StripeStamp(now: now(), nanoseconds: 0)
                }
            } else {
                var ts = timespec()
                guard clock_gettime(CLOCK_MONOTONIC_COARSE, &ts) == 0 else { return StripeStamp(now: now(), nanoseconds: 0) }
                nanoseconds = Int64(ts.tv_sec) &* 1_000_000_000 &+ Int64(ts.tv_nsec) &+ coarseOffsetNanoseconds.load(ordering: .relaxed)
            }
            return StripeStamp(now: .nanoseconds(nanoseconds), nanoseconds: nanoseconds)
        }
        #endif
        return StripeStamp(now: now(), nanoseconds: 0)
    }

    /// ``stripeStamp()``'s time alone.
    @inline(__always)
    func stripeNow() -> Duration {
        stripeStamp().now
    }

    /// How long `lent` has been held at `stamp`, in nanoseconds (never negative: an offset
    /// refreshed in between, after a system sleep, could make it so).
    @inline(__always)
    func useNanoseconds(since lent: StripeLent, until stamp: StripeStamp) -> Int64 {
        if continuousEpochNanoseconds != nil {
            return max(0, stamp.nanoseconds &- lent.sinceNanoseconds)
        }
        let (seconds, attoseconds) = max(.zero, stamp.now - lent.since).components
        return seconds &* 1_000_000_000 &+ attoseconds / 1_000_000_000
    }

    /// Recomputes the offset ``stripeNow()`` adds to `CLOCK_MONOTONIC_COARSE`.
    func refreshCoarseOffset() {
        #if os(Linux) && canImport(Glibc)
        guard let base = continuousEpochNanoseconds else { return }
        // CLOCK_BOOTTIME between two CLOCK_MONOTONIC reads.
        guard let coarse = TickClock.bracket(tries: 3, outer: { TickClock.nanoseconds(of: CLOCK_MONOTONIC) ?? 0 },
                                             inner: Self.bootTimeNanoseconds) else { return }
        coarseOffsetNanoseconds.store(coarse.inner &- coarse.outer &- base, ordering: .relaxed)
        if let scale = counterScale, counterOn.load(ordering: .relaxed) {
            // The kernel's watchdog may have found the counter unstable since (common on
            // virtual machines): then it is never read again. Its clock source is read at
            // most every 10 s (three system calls; refreshes come up to ten times a second).
            if coarse.inner &- clockSourceCheckedAt.load(ordering: .relaxed) >= 10_000_000_000 {
                clockSourceCheckedAt.store(coarse.inner, ordering: .relaxed)
                // Unreadable (no file descriptor left, say): looked at again next time, not
                // taken for a change of clock source.
                if let source = TickClock.kernelClockSource(), source != "tsc" {
                    counterOn.store(false, ordering: .relaxed)
                    logger.notice("the kernel no longer keeps time by the CPU's counter (clock source \(source)): connection use times come from clock_gettime from now on")
                    return
                }
            }
            // The pool's time at `tickBase`, as the counter's rate puts it: the stamps then
            // drift from ``now()`` only by the difference between the counter's rate and
            // `CLOCK_BOOTTIME`'s (NTP's slew, normally under 500 ppm) until the next refresh.
            guard let pair = TickClock.bracket(tries: 3, outer: TickClock.read, inner: Self.bootTimeNanoseconds) else { return }
            tickOffsetNanoseconds.store(pair.inner &- base &- Int64(Double(pair.outer &- tickBase) * scale), ordering: .relaxed)
        }
        #endif
    }

    /// `CLOCK_BOOTTIME` in nanoseconds (Linux), nil elsewhere.
    @inline(__always)
    static func bootTimeNanoseconds() -> Int64? {
        #if os(Linux) && canImport(Glibc)
        TickClock.nanoseconds(of: CLOCK_BOOTTIME)
        #else
        return nil
        #endif
    }

    /// One leg of a lease: the connection at once, or after a wait in the queue. `began` is
    /// set to the first leg's start (no clock read of its own).
    nonisolated(nonsending)
    private func acquire(
        _ request: Machine.Request, timeout: Duration?, deadline: inout Duration?, waitingSince: inout Duration?,
        began: inout Duration?, atFront: Bool
    ) async throws -> (lease: Machine.Lease, checked: Bool, waited: Duration?) {
        let now = self.now()
        if began == nil { began = now }
        let immediate = state.withLock { s -> Machine.ImmediateLease in
            let result = s.machine.leaseImmediately(request: request, now: now)
            s.publish(metrics, flags, stripes: stripes)
            return result
        }
        let waiterID: UInt64
        switch immediate {
        case .leased(let lease, let rescheduleTimer):
            if rescheduleTimer { timerWake.signal() }
            return (lease, false, nil)
        case .failed(let error):
            throw error
        case .mustWait(let id):
            waiterID = id
        }
        let waitDeadline = deadline ?? now + (timeout ?? configuration.acquireTimeout).sleepable
        deadline = waitDeadline
        let firstWait = waitingSince ?? now
        waitingSince = firstWait
        let outcome: WaitOutcome = await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<WaitOutcome, Never>) in
                let enqueueAt = self.now()
                let result = state.withLock { s -> Machine.EnqueueResult? in
                    if Task.isCancelled { return nil }
                    let result = s.machine.enqueue(
                        waiterID: waiterID, waiter: continuation, request: request,
                        now: enqueueAt, deadline: waitDeadline, atFront: atFront, callTimeout: timeout,
                        waitingSince: firstWait
                    )
                    s.publish(metrics, flags, stripes: stripes)
                    return result
                }
                switch result {
                case nil:
                    continuation.resume(returning: .cancelled)
                case .leased(let lease, let rescheduleTimer)?:
                    if rescheduleTimer { timerWake.signal() }
                    continuation.resume(returning: .leased(lease, waited: .zero, checked: false))
                case .failed(let error, let actions)?:
                    performWithoutClosing(actions)
                    continuation.resume(returning: .failed(error))
                case .enqueued(let actions)?:
                    performWithoutClosing(actions)
                    if actions.sweepStripes {
                        handStripesToWaiters()
                        let now = self.now()
                        let more = state.withLock { m -> Machine.Actions in
                            let more = m.machine.planConnectsAfterSweep(now: now)
                            m.publish(metrics, flags, stripes: stripes)
                            return more
                        }
                        performWithoutClosing(more)
                    }
                }
            }
        } onCancel: {
            let cancelledAt = self.now()
            let waiter = state.withLock { s -> UnsafeContinuation<WaitOutcome, Never>? in
                let waiter = s.machine.cancelWaiter(id: waiterID, now: cancelledAt)
                s.publish(metrics, flags, stripes: stripes)
                return waiter
            }
            waiter?.resume(returning: .cancelled)
        }
        switch outcome {
        case .leased(let lease, let waited, let checked):
            if Task.isCancelled {
                // Handed over just as the caller gave up: the connection goes back (and the
                // wait, which obtained nothing, is not recorded as one that did).
                await giveBack(lease, reusable: true)
                throw CancellationError()
            }
            return (lease, checked, waited)
        case .failed(let error):
            throw error
        case .cancelled:
            throw CancellationError()
        }
    }

    /// Returns a connection the caller did not use (cancelled, or found broken).
    nonisolated(nonsending)
    private func giveBack(_ lease: Machine.Lease, reusable: Bool) async {
        guard state.withLock({ $0.machine.beginRelease(slot: lease.slot, leaseID: lease.leaseID) }) else { return }
        let stillGood = reusable && !unsafeDowncast(lease.connection, to: Connection.self).isBroken
        await finishRelease(slot: lease.slot, leaseID: lease.leaseID, reusable: stillGood)
    }

    nonisolated(nonsending)
    private func finishRelease(slot: Int, leaseID: UInt64, reusable: Bool) async {
        let now = self.now()
        let result = state.withLock { s -> Machine.ReleaseResult in
            let result = s.machine.finishRelease(slot: slot, leaseID: leaseID, now: now, reusable: reusable)
            s.publish(metrics, flags, stripes: stripes)
            return result
        }
        if metrics.enabled, let useTime = result.useTime { metrics.useTime.record(useTime) }
        if result.rescheduleTimer { timerWake.signal() }
        switch result.action {
        case .none, .idled:
            return
        case .handoff(let handoff):
            handoff.waiter.resume(returning: .leased(handoff.lease, waited: handoff.waited, checked: reusable))
        case .actions(let actions):
            await perform(actions)
        }
    }

    /// The timer: sleeps until the state machine's next deadline (or until a
    /// new, earlier one appears), then lets it act. Ends when the pool is closed.
    private func runTimer() async {
        while !Task.isCancelled {
            let machineWake = state.withLock { s -> Duration?? in
                s.machine.phase == .closed ? .none : .some(s.machine.scheduleNextWakeup(now: self.now()))
            }
            guard var wake = machineWake else { return }
            if let flush = flags.flushDue { wake = min(wake ?? flush, flush) }
            await withTaskGroup(of: Void.self) { group in
                if let wake {
                    group.addTask { try? await self.clock.sleep(until: self.epoch.advanced(by: wake), tolerance: nil) }
                }
                group.addTask { await self.timerWake.wait() }
                _ = await group.next()
                group.cancelAll()
            }
            if Task.isCancelled { return }
            if stripes.enabled {
                refreshCoarseOffset()   // cheap; catches a system sleep at the first wake after it
                // Read from the flags after the wake, not kept from before the sleep: a park
                // whose signal landed in the wait that the sleep's end cancelled counts too.
                if let flush = flags.flushDue {
                    let now = self.now()
                    if now >= flush || state.withLock({ $0.machine.hasExpiredStash(now: now) }) {
                        await flushStripes(closing: false)
                    }
                }
            }
            let now = self.now()
            let actions = state.withLock { s -> Machine.Actions in
                let actions = s.machine.tick(now: now)
                s.publish(metrics, flags, stripes: stripes)
                return actions
            }
            await perform(actions)
        }
    }

    /// Opens one connection (a child task of `run()`).
    private func connect(_ request: Machine.ConnectRequest) async {
        let startedAt = now()
        do {
            let connection = try await open()
            let openedAt = now()
            metrics.createTime.record(openedAt - startedAt)
            logger.debug("opened connection", metadata: [
                "db.client.connection.id": "\(request.connectionID)", "duration": "\(formatDuration(openedAt - startedAt))",
            ])
            let actions = state.withLock { s -> Machine.Actions in
                let actions = s.machine.connected(request, connection: connection, now: openedAt)
                s.publish(metrics, flags, stripes: stripes)
                return actions
            }
            await perform(actions)
        } catch {
            let failedAt = now()
            let actions = state.withLock { s -> Machine.Actions in
                let actions = s.machine.connectFailed(request, error: error, now: failedAt)
                s.publish(metrics, flags, stripes: stripes)
                return actions
            }
            // A connect cancelled because the pool drains is expected, not a warning.
            logger.log(level: drainBegan.hasFired ? .debug : .warning, "connect failed", metadata: [
                "db.client.connection.id": "\(request.connectionID)", "error": "\(error)",
                "retry_in": "\(actions.backoff.map(formatDuration) ?? "-")",
            ])
            await perform(actions)
        }
    }

    /// Runs the factory; cancels it when draining begins (a connect to an unreachable database
    /// would otherwise hold the drain until its deadline). A connection that arrives anyway
    /// is closed by the state machine.
    private func open() async throws -> Connection {
        try await withThrowingTaskGroup(of: Connection?.self) { group in
            group.addTask { try await self.factory() }
            group.addTask {
                await self.drainBegan.wait()
                return nil
            }
            var connection: Connection?
            for try await result in group {
                if let result {
                    connection = result
                    break
                }
                group.cancelAll()  // draining: the connect's outcome (most likely an error) follows
            }
            group.cancelAll()
            guard let connection else { throw CancellationError() }
            return connection
        }
    }

    /// Performs the actions that need no waiting: resumes waiters, starts connects, wakes the timer.
    private func performWithoutClosing(_ actions: Machine.Actions) {
        for handoff in actions.handoffs {
            handoff.waiter.resume(returning: .leased(handoff.lease, waited: handoff.waited, checked: false))
        }
        for (waiter, error) in actions.failures {
            if error.code == .acquireTimeout {
                metrics.timeouts.increment()
                logger.debug("acquire timed out", metadata: ["error": "\(error)"])
            }
            waiter.resume(returning: .failed(error))
        }
        for request in actions.connects { connectRequestsContinuation.yield(request) }
        for holder in actions.leaks {
            metrics.leaks.increment()
            logger.warning("connection held longer than leakThreshold=\(configuration.leakThreshold.map(formatDuration) ?? "-")", metadata: [
                "db.client.connection.id": "\(holder.connectionID)", "holder.label": "\(holder.label ?? "-")",
                "holder.location": "\(holder.fileID):\(holder.line)", "held_for": "\(formatDuration(holder.heldFor))",
            ])
        }
        if actions.rescheduleTimer { timerWake.signal() }
        // With closes left to the caller (`perform`), the drain hears of it once they are done:
        // before, it could return (and the process exit) while the last connection's close ran.
        if actions.drained && actions.closes.isEmpty { drainedSignal.signal() }
    }

    /// Performs all actions, closing connections in this task.
    nonisolated(nonsending)
    private func perform(_ actions: Machine.Actions) async {
        defer { if actions.drained && !actions.closes.isEmpty { drainedSignal.signal() } }
        guard !actions.closes.isEmpty && !actions.connects.isEmpty else {
            performWithoutClosing(actions)
            await closeAll(actions.closes)
            return
        }
        // Replacements start once the connections they replace are closed: the state machine
        // frees a slot when it decides to close, and a slow close (a Terminate on a congested
        // socket) would otherwise leave the server with more than `maxOpen` of our sessions.
        var first = actions
        first.connects = []
        performWithoutClosing(first)
        await closeAll(actions.closes)
        for request in actions.connects { connectRequestsContinuation.yield(request) }
    }

    nonisolated(nonsending)
    private func closeAll(_ closes: [Machine.Close]) async {
        if closes.count == 1 {
            await close(closes[0])
        } else if !closes.isEmpty {
            await withDiscardingTaskGroup { group in
                for close in closes { group.addTask { await self.close(close) } }
            }
        }
    }

    nonisolated(nonsending)
    private func close(_ close: Machine.Close) async {
        logger.debug("closing connection", metadata: [
            "db.client.connection.id": "\(close.connectionID)", "reason": "\(close.reason.rawValue)",
        ])
        await unsafeDowncast(close.connection, to: Connection.self).close()
        if state.withLock({ $0.machine.closeFinished() }) { drainedSignal.signal() }
    }

    private func waitForDrainReport() async -> DrainReport {
        await withCheckedContinuation { (continuation: CheckedContinuation<DrainReport, Never>) in
            let report = state.withLock { s -> DrainReport? in
                if let report = s.drainReport { return report }
                s.drainReportWaiters.append(continuation)
                return nil
            }
            if let report { continuation.resume(returning: report) }
        }
    }
}

extension ConnectionPool where C == ContinuousClock {
    /// Creates a pool on the continuous clock.
    public convenience init(
        configuration: ConnectionPoolConfiguration = ConnectionPoolConfiguration(),
        logger: Logger = Logger(label: "PoolKit.ConnectionPool"),
        connectionFactory: @escaping ConnectionFactory
    ) {
        self.init(configuration: configuration, clock: ContinuousClock(), logger: logger, connectionFactory: connectionFactory)
    }
}

extension ConnectionPool: Service {}
