/// All of the pool's decisions, as a pure value type: it takes events (lease,
/// release, connect finished, time passed, drain) and returns actions (hand a
/// connection to a waiter, fail a waiter, open a connection, close one). It
/// never sleeps, never performs I/O and never reads a clock: time comes in as
/// `now`, a ``Duration`` since the pool's epoch. ``ConnectionPool`` is the thin
/// shell that performs the actions.
///
/// `Connection` and `Waiter` are opaque payloads; the shell uses a class
/// existential and a continuation, the tests use plain values.
///
/// ## Growth rule (why a spike does not open one connection per waiter)
///
/// A caller that finds no idle connection queues up (FIFO). Connections that
/// come back are handed straight to the head of the queue, so most waiters
/// are served by returns. New connections are opened:
///
/// 1. to keep `minIdle` connections open (warm-up and replacements), up to
///    `maxConcurrentConnects` at once;
/// 2. **on demand, one at a time**: while someone waits and at least one
///    connection is established, a new one is opened only if no connect is in
///    flight. When it completes it goes to the head waiter, and the next one is
///    opened only if someone is *still* waiting;
/// 3. on a cold pool (no established connection: start-up, or after the server
///    restarted), where no return can serve the waiters, up to
///    `min(waiters, maxConcurrentConnects)` at once.
///
/// This is HikariCP's rule (a single connection-adder that re-checks demand
/// before every add). Short queries drain a burst much faster than a connect
/// completes: 50 requests × 2 ms on 5 connections are served in 20 ms, while a
/// connect takes 150 ms, so the burst adds exactly one connection (the pool ends
/// with 6). A sustained overload still grows by one connection per connect
/// time up to `maxOpen`. Every connect counts toward `maxOpen` from the moment
/// it starts, and none starts during connect backoff.
struct PoolStateMachine<Connection, Waiter> {
    /// Time since the pool's epoch.
    typealias Time = Duration

    /// A connection lent to a holder.
    struct Lease {
        var connection: Connection
        var slot: Int
        var leaseID: UInt64
        var connectionID: UInt64
    }

    /// Who asks for a connection.
    struct Request: Sendable {
        var label: String?
        var fileID: String
        var line: Int
    }

    /// A connection handed to a waiter.
    struct Handoff {
        var waiter: Waiter
        var lease: Lease
        var waited: Duration
    }

    /// Why a connection is closed.
    enum CloseReason: String, Sendable {
        case maxIdle, idleTime, lifetime, broken, drain
    }

    /// A connection the shell must close.
    struct Close {
        var connection: Connection
        var connectionID: UInt64
        var reason: CloseReason
    }

    /// A connect the shell must start; it reports back with `connected` or `connectFailed`.
    struct ConnectRequest: Hashable, Sendable {
        var slot: Int
        var connectionID: UInt64
    }

    /// Everything the shell must do after an event.
    struct Actions {
        var handoffs: [Handoff] = []
        var failures: [(Waiter, ConnectionPoolError)] = []
        var connects: [ConnectRequest] = []
        var closes: [Close] = []
        var leaks: [ConnectionHolder] = []
        /// The next retry after a failed connect, for the log.
        var backoff: Duration?
        /// A deadline earlier than the timer's current wake-up appeared: wake the timer.
        var rescheduleTimer = false
        /// Draining and nothing is held or connecting any more.
        var drained = false
        /// A waiter queued while connections are parked in the shell's stripes: the shell
        /// sweeps them, then calls ``planConnectsAfterSweep(now:)``.
        var sweepStripes = false

        /// Adds `other`'s actions to these.
        mutating func absorb(_ other: Actions) {
            handoffs += other.handoffs
            failures += other.failures
            connects += other.connects
            closes += other.closes
            leaks += other.leaks
            backoff = other.backoff ?? backoff
            rescheduleTimer = rescheduleTimer || other.rescheduleTimer
            drained = drained || other.drained
            sweepStripes = sweepStripes || other.sweepStripes
        }
    }

    /// Result of the synchronous fast path.
    enum ImmediateLease {
        case leased(Lease, rescheduleTimer: Bool)
        case mustWait(waiterID: UInt64)
        case failed(ConnectionPoolError)
    }

    /// Result of queueing a waiter.
    enum EnqueueResult {
        case leased(Lease, rescheduleTimer: Bool)
        case enqueued(Actions)
        /// Refused; the actions (a connect for the demand, with `maxWaiters` 0) still run.
        case failed(ConnectionPoolError, Actions)
    }

    /// What to do with a returned connection.
    enum ReleaseAction {
        /// Stale or double release, or cut off by drain: nothing to do.
        case none
        /// Now idle; nothing else to do (the fast path).
        case idled
        /// Handed straight to a waiter.
        case handoff(Handoff)
        /// Anything else (close, connects, drain completion).
        case actions(Actions)
    }

    /// Result of a release.
    struct ReleaseResult {
        var useTime: Duration?
        var action: ReleaseAction = .none
        var rescheduleTimer = false
    }

    /// Result of starting a drain.
    struct DrainStart {
        var alreadyStarted = false
        var actions = Actions()
        var waitersFailed = 0
        var idleClosed = 0
    }

    /// Result of the drain deadline.
    struct DrainEnd {
        var cutOff: [(connection: Connection, holder: ConnectionHolder)] = []
        var connectsAbandoned = 0
        var returnedInTime = 0
        var closesUnfinished = 0
    }

    enum Phase: Equatable { case running, draining, closed }

    private struct Holder {
        var leaseID: UInt64
        var request: Request
        var since: Time
        var leakReported = false
        /// The shell's lend token when the shell lent this connection from a stripe and the
        /// machine adopted that lend (see ``adopt(slot:leaseID:lend:request:since:)``); 0 otherwise.
        /// A release must name it, so that a stale release of an earlier lend cannot end this one.
        var lend: UInt64 = 0
        /// Parked in one of the shell's stripes: idle for every count, lent by the shell without
        /// this machine (see ``stash(slot:leaseID:now:)``).
        var stashed = false
    }

    private enum SlotKind: UInt8 {
        case free, connecting, idle, held, returning
    }

    /// One connection's bookkeeping. Flat fields (not an enum with payloads) so
    /// that the hot path updates them in place without copying the connection
    /// or the holder's strings.
    private struct Slot {
        var connectionID: UInt64
        var kind: SlotKind
        /// Valid while idle.
        var idleSince: Time = .zero
        var expiresAt: Time?
    }

    private struct WaiterEntry {
        var id: UInt64
        var waiter: Waiter
        var request: Request
        var enqueuedAt: Time
        /// When the acquire began waiting: `enqueuedAt` of its first queuing, before a broken
        /// connection handed to it sent it back to the front. The timeout error counts from here.
        var waitingSince: Time
        var deadline: Time
        /// The timeout the wait was given, and whether the call gave it (`lease(timeout:)`)
        /// rather than `acquireTimeout`: the timeout error names the one in force.
        var timeout: Duration?
    }

    let configuration: ConnectionPoolConfiguration
    private(set) var phase: Phase = .running
    private var slots: [Slot] = []
    /// Per slot (same index as `slots`): the connection, and its holder while held.
    /// Kept apart so that `Slot` is a trivial value the hot path reads without retains.
    private var connections: [Connection?] = []
    private var holdersBySlot: [Holder] = []
    private var freeSlots: [Int] = []
    /// Idle slots, least recently used first, most recently used last.
    private var idle: [Int] = []
    private var waiters = FIFOQueue<WaiterEntry>()
    private var established = 0
    private var connecting = 0
    /// When the last connect succeeded, and when the last connect handed to a waiter did, with
    /// that waiter's `waitingSince`: a timeout's message tells a database slow to accept from a
    /// pool whose connects finish but go to callers that waited longer.
    private var lastConnectSucceededAt: Time?
    private var lastConnectHandoff: (at: Time, receiverWaitingSince: Time)?
    private var inUse = 0
    /// Closes handed to the shell in `Actions` and not yet reported done (`closeFinished()`).
    private(set) var closesInFlight = 0
    /// Connections the shell holds in its stripes (``stash(slot:leaseID:now:)``): counted as idle.
    private(set) var stashedCount = 0
    private var nextLeaseID: UInt64 = 0
    private var nextWaiterID: UInt64 = 0
    private var nextConnectionID: UInt64 = 0
    private var consecutiveConnectFailures = 0
    private(set) var lastConnectError: (any Error)?
    private var backoffUntil: Time?
    /// When the timer will wake up next (nil: it waits to be woken).
    private var scheduledWake: Time?
    private var random: SplitMix64
    private var stats = PoolStatistics()
    private var drainReturned = 0

    /// Creates a state machine; `seed` makes the jitter reproducible.
    init(configuration: ConnectionPoolConfiguration, seed: UInt64) {
        self.configuration = configuration.normalized
        self.random = SplitMix64(seed: seed)
        slots.reserveCapacity(self.configuration.maxOpen)
        idle.reserveCapacity(self.configuration.maxOpen)
    }

    // MARK: - Counts

    /// Established + connecting.
    var totalConnections: Int { established + connecting }
    /// Idle connections.
    var idleCount: Int { idle.count + stashedCount }
    /// Connections lent out.
    var inUseCount: Int { inUse }
    /// Queued waiters.
    var waiterCount: Int { waiters.count }
    /// Connects in flight.
    var connectingCount: Int { connecting }

    // MARK: - Warm-up

    /// Opens connections up to `minIdle`; call once at start.
    mutating func start(now: Time) -> Actions {
        var actions = Actions()
        planConnects(now: now, into: &actions)
        return actions
    }

    // MARK: - Lease

    /// The fast path: lends the most recently used idle connection if nobody waits.
    mutating func leaseImmediately(request: Request, now: Time) -> ImmediateLease {
        guard phase == .running else { return .failed(shutDownError()) }
        if waiters.isEmpty, let (slot, sawExpired) = popUsableIdle(now: now) {
            let lease = hold(slot: slot, request: request, now: now)
            return .leased(lease, rescheduleTimer: noteLeakDeadline(now: now) || sawExpired)
        }
        nextWaiterID &+= 1
        return .mustWait(waiterID: nextWaiterID)
    }

    /// The synchronous fast path without side effects on failure: the most
    /// recently used idle connection if nobody waits, else nil.
    mutating func leaseIfIdle(request: Request, now: Time) -> (lease: Lease, rescheduleTimer: Bool)? {
        guard phase == .running, waiters.isEmpty, let (slot, sawExpired) = popUsableIdle(now: now) else { return nil }
        let lease = hold(slot: slot, request: request, now: now)
        return (lease, noteLeakDeadline(now: now) || sawExpired)
    }

    /// The most recently used idle connection within its lifetime, taken off the idle list.
    /// Expired ones stay there for the timer's tick to close (the lease paths return no
    /// closes); `sawExpired` says to wake the timer now rather than at its planned instant,
    /// which may be later than a lease that runs before the timer task does.
    private mutating func popUsableIdle(now: Time) -> (slot: Int, sawExpired: Bool)? {
        guard let last = idle.last else { return nil }
        if slots[last].expiresAt.map({ $0 > now }) ?? true {
            idle.removeLast()
            return (last, false)
        }
        // Only expired ones: the caller waits for the replacement the tick opens (the timer is
        // due already: `scheduleNextWakeup` counts every idle connection's expiry, past or not).
        guard let k = idle.lastIndex(where: { slots[$0].expiresAt.map({ $0 > now }) ?? true }) else { return nil }
        return (idle.remove(at: k), true)
    }

    /// Queues a waiter (at the back; at the front for a waiter whose handed-over
    /// connection turned out broken). Lends at once if a connection became idle
    /// meanwhile and nobody else waits.
    mutating func enqueue(
        waiterID: UInt64, waiter: Waiter, request: Request, now: Time, deadline: Time, atFront: Bool = false,
        callTimeout: Duration? = nil, waitingSince: Time? = nil
    ) -> EnqueueResult {
        guard phase == .running else { return .failed(shutDownError(), Actions()) }
        if waiters.isEmpty, let (slot, sawExpired) = popUsableIdle(now: now) {
            let lease = hold(slot: slot, request: request, now: now)
            return .leased(lease, rescheduleTimer: noteLeakDeadline(now: now) || sawExpired)
        }
        if !atFront && waiters.count >= configuration.maxWaiters {
            stats.rejected += 1
            var actions = Actions()
            // With `maxWaiters` 0 nobody ever waits, so no waiter ever asks for a connection:
            // the refused acquire is the demand (with `minIdle` 0, none was ever opened).
            if waiters.isEmpty && stashedCount == 0 { planConnectForRefused(now: now, into: &actions) }
            // Idle connections past their lifetime (`popUsableIdle` lends none of them): the
            // timer closes and replaces them now, so that the next caller is served.
            if !idle.isEmpty { actions.rescheduleTimer = true }
            return .failed(tooManyWaitersError(), actions)
        }
        let entry = WaiterEntry(
            id: waiterID, waiter: waiter, request: request, enqueuedAt: now, waitingSince: waitingSince ?? now,
            deadline: deadline, timeout: callTimeout)
        if atFront { waiters.prepend(entry) } else { waiters.append(entry) }
        // Counted when the wait begins (as Go's database/sql does); its time is added when it
        // ends, however it ends (served, timed out, cancelled, failed by a drain).
        if !atFront { stats.waitCount += 1 }
        var actions = Actions()
        actions.rescheduleTimer = noteDeadline(deadline)
        if stashedCount > 0 {
            // A connection parked in the shell's stripes may serve this waiter: the shell sweeps
            // them first and then calls `planConnectsAfterSweep` (no connect for nothing).
            actions.sweepStripes = true
        } else {
            planConnects(now: now, into: &actions)
        }
        return .enqueued(actions)
    }

    /// Removes a waiter whose task was cancelled. Returns it if it was still
    /// waiting; nil if it was already served, failed or never queued.
    mutating func cancelWaiter(id: UInt64, now: Time) -> Waiter? {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return nil }
        stats.cancelledWaits += 1
        let entry = waiters.remove(at: index)
        stats.totalWaitTime += now - entry.enqueuedAt
        return entry.waiter
    }

    // MARK: - Release

    /// First half of a release: claims the lease so that a second release of the
    /// same lease is a no-op. Returns false for a stale or double release.
    mutating func beginRelease(slot: Int, leaseID: UInt64, lend: UInt64 = 0) -> Bool {
        guard slot >= 0, slot < slots.count, slots[slot].kind == .held, holdersBySlot[slot].leaseID == leaseID,
              holdersBySlot[slot].lend == lend, !holdersBySlot[slot].stashed
        else { return false }
        slots[slot].kind = .returning
        return true
    }

    /// A whole release in one step, for a connection that needs no reset (the shell
    /// checked `isBroken` and `needsReset` just before): claims the lease and finishes
    /// it. A stale or double release does nothing (`action == .none`, no use time).
    mutating func release(slot: Int, leaseID: UInt64, lend: UInt64 = 0, now: Time, reusable: Bool) -> ReleaseResult {
        guard beginRelease(slot: slot, leaseID: leaseID, lend: lend) else { return ReleaseResult() }
        return finishRelease(slot: slot, leaseID: leaseID, now: now, reusable: reusable)
    }

    /// Second half of a release, after the shell checked `isBroken` and ran
    /// `prepareForReuse()`: hands the connection to the head waiter, makes it
    /// idle, or closes it (broken, expired, too many idle, draining).
    mutating func finishRelease(slot: Int, leaseID: UInt64, now: Time, reusable: Bool, idleSince: Time? = nil) -> ReleaseResult {
        guard slot >= 0, slot < slots.count, slots[slot].kind == .returning, holdersBySlot[slot].leaseID == leaseID
        else { return ReleaseResult() }
        inUse -= 1
        var result = ReleaseResult(useTime: now - holdersBySlot[slot].since)
        // `maxIdle` counts the idle list here, not the stashed connections: the machine cannot
        // tell a parked one from one lent from its stripe, and closing a returned connection
        // for a connection that is in use would churn. A park is admitted only within
        // `maxIdle` (`stash`), and a parked connection meets this check when it comes back,
        // so the idle count exceeds `maxIdle` by at most the parked ones, for at most a flush.
        if phase == .running, reusable, waiters.isEmpty, idle.count < configuration.maxIdle,
           slots[slot].expiresAt.map({ $0 > now }) ?? true {
            // The common case, without touching the connection reference.
            slots[slot].kind = .idle
            slots[slot].idleSince = idleSince ?? now
            idle.append(slot)
            result.rescheduleTimer = noteIdleDeadline(slot: slot, now: now)
            result.action = .idled
            return result
        }
        let connection = connections[slot]!

        if phase != .running {
            var actions = Actions()
            drainReturned += 1
            close(slot: slot, connection: connection, reason: reusable ? .drain : .broken, into: &actions)
            checkDrained(&actions)
            result.action = .actions(actions)
            return result
        }
        if !reusable {
            var actions = Actions()
            close(slot: slot, connection: connection, reason: .broken, into: &actions)
            planConnects(now: now, into: &actions)
            result.action = .actions(actions)
            return result
        }
        if let expiresAt = slots[slot].expiresAt, expiresAt <= now {
            var actions = Actions()
            close(slot: slot, connection: connection, reason: .lifetime, into: &actions)
            planConnects(now: now, into: &actions)
            result.action = .actions(actions)
            return result
        }
        if let entry = waiters.popFirst() {
            let handoff = handOff(slot: slot, connection: connection, to: entry, now: now)
            result.rescheduleTimer = noteLeakDeadline(now: now)
            result.action = .handoff(handoff)
            return result
        }
        if idle.count >= configuration.maxIdle {
            var actions = Actions()
            if configuration.maxIdle == 0 {
                close(slot: slot, connection: connection, reason: .maxIdle, into: &actions)
                planConnects(now: now, into: &actions)
                result.action = .actions(actions)
                return result
            }
            let lru = idle.removeFirst()
            if slots[lru].kind == .idle, let old = connections[lru] {
                close(slot: lru, connection: old, reason: .maxIdle, into: &actions)
            }
            makeIdle(slot: slot, connection: connection, now: now)
            actions.rescheduleTimer = noteIdleDeadline(slot: slot, now: now)
            result.action = .actions(actions)
            return result
        }
        slots[slot].kind = .idle
        slots[slot].idleSince = idleSince ?? now
        idle.append(slot)
        result.rescheduleTimer = noteIdleDeadline(slot: slot, now: now)
        result.action = .idled
        return result
    }

    // MARK: - Stripes (the shell's per-CPU cache of one idle connection)

    /// What ``stash(slot:leaseID:now:)`` grants: the ended lease's use time and the
    /// connection's lifetime deadline (the shell does not park it past that).
    struct Stash {
        var useTime: Duration
        var expiresAt: Time?
    }

    /// Ends a lease by parking its connection in one of the shell's stripes instead of the
    /// idle list: it stays `held` here, under the same lease id, marked stashed, and counts
    /// as idle. From then on the shell lends and takes it back under the stripe's own lock,
    /// without this machine, until it gives it back (``unstash``) or a lend of it is adopted
    /// (``adopt``). Refused (nil) unless the pool runs, nobody waits, the connection is within
    /// its lifetime and `maxIdle` has room: a connection a waiter could use is never parked.
    mutating func stash(slot: Int, leaseID: UInt64, now: Time) -> Stash? {
        guard phase == .running, waiters.isEmpty, idle.count + stashedCount < configuration.maxIdle,
              slot >= 0, slot < slots.count, slots[slot].kind == .held,
              holdersBySlot[slot].leaseID == leaseID, holdersBySlot[slot].lend == 0, !holdersBySlot[slot].stashed,
              slots[slot].expiresAt.map({ $0 > now }) ?? true
        else { return nil }
        let useTime = now - holdersBySlot[slot].since
        holdersBySlot[slot].stashed = true
        holdersBySlot[slot].since = now
        inUse -= 1
        stashedCount += 1
        return Stash(useTime: useTime, expiresAt: slots[slot].expiresAt)
    }

    /// The shell lent a stashed connection (`lend` is its token) to `request` at `since`,
    /// and that holder is still using it: it becomes an ordinary lease with that holder (for
    /// `holders()`, leak reports and the drain), released with the same lease id and `lend`.
    mutating func adopt(slot: Int, leaseID: UInt64, lend: UInt64, request: Request, since: Time) -> Bool {
        guard slot >= 0, slot < slots.count, slots[slot].kind == .held,
              holdersBySlot[slot].leaseID == leaseID, holdersBySlot[slot].stashed
        else { return false }
        holdersBySlot[slot] = Holder(leaseID: leaseID, request: request, since: since, lend: lend)
        stashedCount -= 1
        inUse += 1
        guard let threshold = configuration.leakThreshold else { return false }
        return noteDeadline(since + threshold)
    }

    /// A stashed connection comes back from its stripe (`parkedSince`: when it was last
    /// returned there): it goes to the head waiter, becomes idle, or closes, as a release would.
    /// With `onlyToWaiter`, it is taken back only if it can go to a waiter (nil otherwise).
    mutating func unstash(
        slot: Int, leaseID: UInt64, now: Time, parkedSince: Time, reusable: Bool, onlyToWaiter: Bool = false
    ) -> ReleaseResult? {
        guard slot >= 0, slot < slots.count, slots[slot].kind == .held,
              holdersBySlot[slot].leaseID == leaseID, holdersBySlot[slot].stashed
        else { return nil }
        if onlyToWaiter {
            guard phase == .running, reusable, !waiters.isEmpty, slots[slot].expiresAt.map({ $0 > now }) ?? true
            else { return nil }
        }
        holdersBySlot[slot].stashed = false
        stashedCount -= 1
        inUse += 1
        slots[slot].kind = .returning
        var result = finishRelease(slot: slot, leaseID: leaseID, now: now, reusable: reusable, idleSince: parkedSince)
        result.useTime = nil
        return result
    }

    /// After the shell swept its stripes for new waiters: opens connections for those still waiting.
    mutating func planConnectsAfterSweep(now: Time) -> Actions {
        var actions = Actions()
        planConnects(now: now, into: &actions)
        return actions
    }

    /// Whether a stashed connection is past its lifetime (the shell then flushes its stripes,
    /// so that the connection is closed and replaced now, not at the next periodic flush).
    func hasExpiredStash(now: Time) -> Bool {
        guard stashedCount > 0 else { return false }
        for index in slots.indices where slots[index].kind == .held && holdersBySlot[index].stashed {
            if let expiresAt = slots[index].expiresAt, expiresAt <= now { return true }
        }
        return false
    }

    /// Counts leases the shell made from its stripes (``statistics()``'s `leases`).
    mutating func countStripeLeases(_ n: Int) {
        stats.leases += n
    }

    // MARK: - Connects

    /// A connect finished: the connection goes to the head waiter or becomes idle.
    mutating func connected(_ request: ConnectRequest, connection: Connection, now: Time) -> Actions {
        var actions = Actions()
        guard request.slot < slots.count, slots[request.slot].kind == .connecting,
              slots[request.slot].connectionID == request.connectionID
        else {
            actions.closes.append(Close(connection: connection, connectionID: request.connectionID, reason: .drain))
            closesInFlight += 1
            return actions
        }
        connecting -= 1
        established += 1
        stats.connectsSucceeded += 1
        lastConnectSucceededAt = now
        consecutiveConnectFailures = 0
        lastConnectError = nil
        // The server accepts connects again: a backoff begun by another connect's failure
        // ends (it kept waiters on this one connection until it ran out, e.g. after a failover).
        backoffUntil = nil
        if phase != .running {
            close(slot: request.slot, connection: connection, reason: .drain, into: &actions)
            checkDrained(&actions)
            return actions
        }
        if let lifetime = configuration.maxLifetime {
            let jitter = configuration.lifetimeJitter * random.fraction()
            slots[request.slot].expiresAt = now + lifetime - jitter
        }
        if let entry = waiters.popFirst() {
            lastConnectHandoff = (now, entry.waitingSince)
            actions.handoffs.append(handOff(slot: request.slot, connection: connection, to: entry, now: now))
            actions.rescheduleTimer = noteLeakDeadline(now: now)
        } else {
            makeIdle(slot: request.slot, connection: connection, now: now)
            actions.rescheduleTimer = noteIdleDeadline(slot: request.slot, now: now)
        }
        planConnects(now: now, into: &actions)
        return actions
    }

    /// A connect failed: back off (capped exponential with jitter) and remember the error for waiters.
    mutating func connectFailed(_ request: ConnectRequest, error: any Error, now: Time) -> Actions {
        var actions = Actions()
        guard request.slot < slots.count, slots[request.slot].kind == .connecting,
              slots[request.slot].connectionID == request.connectionID
        else { return actions }
        connecting -= 1
        freeSlot(request.slot)
        if phase != .running && error is CancellationError {
            // The drain cancelled it: not a connect failure to count or tell waiters about.
            checkDrained(&actions)
            return actions
        }
        stats.connectFailures += 1
        consecutiveConnectFailures += 1
        lastConnectError = error
        if phase != .running {
            checkDrained(&actions)
            return actions
        }
        let delay = backoffDelay(failures: consecutiveConnectFailures)
        let until = now + delay
        backoffUntil = max(backoffUntil ?? until, until)
        actions.backoff = delay
        actions.rescheduleTimer = noteDeadline(until)
        planConnects(now: now, into: &actions)
        return actions
    }

    // MARK: - Time

    /// Time passed: time out waiters, report leaks, close idle connections that
    /// are too old or idle too long, end backoff, open what is needed.
    mutating func tick(now: Time) -> Actions {
        var actions = Actions()
        guard phase != .closed else { return actions }
        var i = 0
        while i < waiters.count {
            if waiters[i].deadline <= now {
                let entry = waiters.remove(at: i)
                stats.timeouts += 1
                stats.totalWaitTime += now - entry.enqueuedAt
                actions.failures.append((entry.waiter, timeoutError(for: entry, now: now)))
            } else {
                i += 1
            }
        }
        if let threshold = configuration.leakThreshold {
            for index in slots.indices {
                // A connection whose reset hangs (`.returning`) is as unavailable as one held.
                guard slots[index].kind == .held || slots[index].kind == .returning,
                      !holdersBySlot[index].leakReported, !holdersBySlot[index].stashed,
                      now - holdersBySlot[index].since >= threshold
                else { continue }
                holdersBySlot[index].leakReported = true
                stats.leaksReported += 1
                actions.leaks.append(holderInfo(slot: index, holder: holdersBySlot[index], now: now))
            }
        }
        guard phase == .running else { return actions }
        var k = 0
        while k < idle.count {
            let slot = idle[k]
            guard slots[slot].kind == .idle, let connection = connections[slot] else { k += 1; continue }
            let since = slots[slot].idleSince
            if let expiresAt = slots[slot].expiresAt, expiresAt <= now {
                idle.remove(at: k)
                close(slot: slot, connection: connection, reason: .lifetime, into: &actions)
            } else if let maxIdleTime = configuration.maxIdleTime, now - since >= maxIdleTime,
                      established > configuration.minIdle {
                idle.remove(at: k)
                close(slot: slot, connection: connection, reason: .idleTime, into: &actions)
            } else {
                k += 1
            }
        }
        planConnects(now: now, into: &actions)
        return actions
    }

    /// The earliest instant at which `tick` has something to do; the shell's
    /// timer sleeps until then (nil: until woken by `rescheduleTimer`).
    ///
    /// The wake-up is never later than `now + leakThreshold` and `now + maxIdleTime`,
    /// so that a lease or a return (whose leak or idle deadline is then always
    /// later) never has to wake the timer: the hot path stays free of wake-ups.
    mutating func scheduleNextWakeup(now: Time) -> Time? {
        var next: Time?
        func consider(_ t: Time) { if next == nil || t < next! { next = t } }
        guard phase != .closed else {
            scheduledWake = nil
            return nil
        }
        for i in 0..<waiters.count { consider(waiters[i].deadline) }
        if let backoffUntil { consider(backoffUntil) }
        if let threshold = configuration.leakThreshold { consider(now + threshold) }
        if let maxIdleTime = configuration.maxIdleTime { consider(now + maxIdleTime) }
        for (index, slot) in slots.enumerated() {
            switch slot.kind {
            case .held:
                let holder = holdersBySlot[index]
                if let threshold = configuration.leakThreshold, !holder.leakReported, !holder.stashed {
                    consider(holder.since + threshold)
                }
                if let expiresAt = slot.expiresAt, expiresAt > now { consider(expiresAt) }
            case .returning:
                let holder = holdersBySlot[index]
                if let threshold = configuration.leakThreshold, !holder.leakReported { consider(holder.since + threshold) }
                if let expiresAt = slot.expiresAt, expiresAt > now { consider(expiresAt) }
            case .idle:
                if let expiresAt = slot.expiresAt { consider(expiresAt) }
                if let maxIdleTime = configuration.maxIdleTime, established > configuration.minIdle {
                    consider(slot.idleSince + maxIdleTime)
                }
            case .free, .connecting:
                break
            }
        }
        scheduledWake = next
        return next
    }

    // MARK: - Drain

    /// Starts draining: new acquires fail, waiters fail, idle connections close;
    /// held connections are closed when they come back.
    mutating func beginDrain(now: Time) -> DrainStart {
        guard phase == .running else { return DrainStart(alreadyStarted: true) }
        phase = .draining
        backoffUntil = nil
        var start = DrainStart()
        for entry in waiters.removeAll() {
            stats.totalWaitTime += now - entry.enqueuedAt
            start.actions.failures.append((entry.waiter, shutDownError()))
            start.waitersFailed += 1
        }
        for slot in idle {
            if slots[slot].kind == .idle, let connection = connections[slot] {
                close(slot: slot, connection: connection, reason: .drain, into: &start.actions)
                start.idleClosed += 1
            }
        }
        idle.removeAll()
        checkDrained(&start.actions)
        return start
    }

    /// The drain deadline passed (or everything came back): whatever is still
    /// held is cut off (the shell cancels its query and closes it); a later
    /// release of such a lease is a no-op.
    mutating func endDrain(now: Time) -> DrainEnd {
        var end = DrainEnd()
        if phase == .running { _ = beginDrain(now: now) }
        guard phase == .draining else { return end }
        assert(stashedCount == 0, "the shell flushes its stripes before the drain")
        phase = .closed
        for index in slots.indices {
            guard slots[index].kind == .held || slots[index].kind == .returning,
                  let connection = connections[index]
            else { continue }
            end.cutOff.append((connection, holderInfo(slot: index, holder: holdersBySlot[index], now: now)))
            inUse -= 1
            established -= 1
            stats.closedByDrain += 1
            freeSlot(index)
        }
        end.connectsAbandoned = connecting
        end.returnedInTime = drainReturned
        end.closesUnfinished = closesInFlight
        return end
    }

    // MARK: - Introspection

    /// A snapshot of counts and counters.
    func statistics() -> PoolStatistics {
        var s = stats
        s.open = established
        s.inUse = inUse
        s.idle = idle.count + stashedCount
        s.waiting = waiters.count
        s.opening = connecting
        return s
    }

    /// Every held connection with its holder.
    func holders(now: Time) -> [ConnectionHolder] {
        var result: [ConnectionHolder] = []
        for index in slots.indices {
            if slots[index].kind == .held && !holdersBySlot[index].stashed || slots[index].kind == .returning {
                result.append(holderInfo(slot: index, holder: holdersBySlot[index], now: now))
            }
        }
        return result.sorted { $0.heldFor > $1.heldFor }
    }

    // MARK: - Internals

    /// The rule documented on the type: warm-up to `minIdle`, one demand connect
    /// at a time while connections exist, parallel demand connects on a cold pool.
    /// One connect for an acquire refused by `maxWaiters` 0, unless one is running already.
    private mutating func planConnectForRefused(now: Time, into actions: inout Actions) {
        guard phase == .running, connecting == 0, established < configuration.maxOpen else { return }
        if let until = backoffUntil {
            if now < until { return }
            backoffUntil = nil
        }
        nextConnectionID += 1
        let slot = allocateSlot(connectionID: nextConnectionID)
        connecting += 1
        actions.connects.append(ConnectRequest(slot: slot, connectionID: nextConnectionID))
    }

    private mutating func planConnects(now: Time, into actions: inout Actions) {
        guard phase == .running else { return }
        if let until = backoffUntil {
            if now < until { return }
            backoffUntil = nil
        }
        while connecting < configuration.maxConcurrentConnects && established + connecting < configuration.maxOpen {
            let warm = established + connecting < configuration.minIdle
            let demand: Bool
            if waiters.isEmpty {
                demand = false
            } else if established == 0 {
                demand = connecting < waiters.count
            } else {
                demand = connecting == 0
            }
            guard warm || demand else { break }
            nextConnectionID += 1
            let slot = allocateSlot(connectionID: nextConnectionID)
            connecting += 1
            actions.connects.append(ConnectRequest(slot: slot, connectionID: nextConnectionID))
        }
    }

    private mutating func hold(slot: Int, request: Request, now: Time) -> Lease {
        guard slots[slot].kind == .idle, let connection = connections[slot] else {
            preconditionFailure("idle list holds a slot that is not idle")
        }
        nextLeaseID &+= 1
        slots[slot].kind = .held
        holdersBySlot[slot] = Holder(leaseID: nextLeaseID, request: request, since: now)
        inUse += 1
        stats.leases += 1
        return Lease(connection: connection, slot: slot, leaseID: nextLeaseID, connectionID: slots[slot].connectionID)
    }

    private mutating func handOff(slot: Int, connection: Connection, to entry: WaiterEntry, now: Time) -> Handoff {
        nextLeaseID &+= 1
        slots[slot].kind = .held
        connections[slot] = connection
        holdersBySlot[slot] = Holder(leaseID: nextLeaseID, request: entry.request, since: now)
        inUse += 1
        stats.leases += 1
        let waited = now - entry.enqueuedAt
        stats.totalWaitTime += waited
        let lease = Lease(connection: connection, slot: slot, leaseID: nextLeaseID, connectionID: slots[slot].connectionID)
        return Handoff(waiter: entry.waiter, lease: lease, waited: waited)
    }

    private mutating func makeIdle(slot: Int, connection: Connection, now: Time) {
        slots[slot].kind = .idle
        connections[slot] = connection
        slots[slot].idleSince = now
        idle.append(slot)
    }

    private mutating func close(slot: Int, connection: Connection, reason: CloseReason, into actions: inout Actions) {
        actions.closes.append(Close(connection: connection, connectionID: slots[slot].connectionID, reason: reason))
        closesInFlight += 1
        established -= 1
        switch reason {
        case .maxIdle: stats.closedMaxIdle += 1
        case .idleTime: stats.closedIdleTime += 1
        case .lifetime: stats.closedLifetime += 1
        case .broken: stats.closedBroken += 1
        case .drain: stats.closedByDrain += 1
        }
        freeSlot(slot)
    }

    private mutating func allocateSlot(connectionID: UInt64) -> Int {
        let slot = Slot(connectionID: connectionID, kind: .connecting, expiresAt: nil)
        if let index = freeSlots.popLast() {
            slots[index] = slot
            return index
        }
        slots.append(slot)
        connections.append(nil)
        holdersBySlot.append(Holder(leaseID: 0, request: Request(label: nil, fileID: "", line: 0), since: .zero))
        return slots.count - 1
    }

    private mutating func freeSlot(_ index: Int) {
        slots[index].kind = .free
        connections[index] = nil
        holdersBySlot[index].request = Request(label: nil, fileID: "", line: 0)
        slots[index].expiresAt = nil
        freeSlots.append(index)
    }

    private mutating func checkDrained(_ actions: inout Actions) {
        if phase == .draining && inUse == 0 && connecting == 0 && closesInFlight == 0 { actions.drained = true }
    }

    /// The shell finished a close this machine asked for (any `Close` in `Actions`). True when
    /// that completes a drain: the drain waits for every close, also those decided before it
    /// began or by other tasks (a timer's idle close, a release's), not only the last one.
    mutating func closeFinished() -> Bool {
        closesInFlight -= 1
        var actions = Actions()
        checkDrained(&actions)
        return actions.drained
    }

    /// Records a new deadline; true if it is earlier than the timer's wake-up.
    private mutating func noteDeadline(_ deadline: Time) -> Bool {
        if let wake = scheduledWake, wake <= deadline { return false }
        scheduledWake = deadline
        return true
    }

    private mutating func noteLeakDeadline(now: Time) -> Bool {
        guard let threshold = configuration.leakThreshold else { return false }
        return noteDeadline(now + threshold)
    }

    private mutating func noteIdleDeadline(slot: Int, now: Time) -> Bool {
        var earliest = slots[slot].expiresAt
        if let maxIdleTime = configuration.maxIdleTime, established > configuration.minIdle {
            earliest = min(earliest ?? now + maxIdleTime, now + maxIdleTime)
        }
        guard let earliest else { return false }
        return noteDeadline(earliest)
    }

    private mutating func backoffDelay(failures: Int) -> Duration {
        let backoff = configuration.connectBackoff
        var delay = backoff.initial
        var n = 1
        while n < failures && delay < backoff.maximum {
            delay = delay * 2
            n += 1
        }
        delay = min(delay, backoff.maximum)
        return delay - delay * (backoff.jitter * random.fraction())
    }

    private func holderInfo(slot: Int, holder: Holder, now: Time) -> ConnectionHolder {
        ConnectionHolder(
            connectionID: slots[slot].connectionID, label: holder.request.label,
            fileID: holder.request.fileID, line: holder.request.line, heldFor: now - holder.since
        )
    }

    private func shutDownError() -> ConnectionPoolError {
        ConnectionPoolError(
            code: .shutDown,
            message: "pool '\(configuration.name)' is shutting down: new acquires are refused (drain started)"
        )
    }

    private func tooManyWaitersError() -> ConnectionPoolError {
        ConnectionPoolError(
            code: .tooManyWaiters,
            message: "pool '\(configuration.name)' overloaded: \(waiters.count) callers already waiting (maxWaiters=\(configuration.maxWaiters)); \(inUse)/\(configuration.maxOpen) in use (maxOpen=\(configuration.maxOpen))",
            lastConnectError: lastConnectError
        )
    }

    private func timeoutError(for entry: WaiterEntry, now: Time) -> ConnectionPoolError {
        let waited = formatDuration(now - entry.waitingSince)
        let limits = entry.timeout.map { "maxOpen=\(configuration.maxOpen), the call's timeout=\(formatDuration($0))" }
            ?? "maxOpen=\(configuration.maxOpen), acquireTimeout=\(formatDuration(configuration.acquireTimeout))"
        var message: String
        if let lastConnectError, established < configuration.maxOpen {
            message = "pool '\(configuration.name)' got no connection within \(waited): connects are failing (\(consecutiveConnectFailures) in a row; last: \(lastConnectError)); \(inUse)/\(configuration.maxOpen) in use (\(limits), connectBackoff max=\(formatDuration(configuration.connectBackoff.maximum)))"
        } else if connecting > 0 && established < configuration.maxOpen {
            // Not exhausted: what it waited for is a connect that has not finished, and raising
            // maxOpen would not help.
            let inProgress = "\(connecting) connect\(connecting == 1 ? "" : "s") still in progress"
            if let handoff = lastConnectHandoff, handoff.at >= entry.waitingSince, handoff.receiverWaitingSince < entry.waitingSince {
                // Connects finish, but went to callers ahead of this one.
                message = "pool '\(configuration.name)' got no connection within \(waited): \(inProgress); connects finish, but while it has connections the pool opens one at a time (no connect storms), and the last went to a caller that waited longer; \(inUse)/\(configuration.maxOpen) in use (\(limits); minIdle=\(configuration.minIdle) keeps connections open ahead of demand)"
            } else {
                // A database slow to accept, or unreachable with packets dropped.
                let noneFinished = lastConnectSucceededAt.map { $0 < entry.waitingSince } ?? true
                message = "pool '\(configuration.name)' got no connection within \(waited): \(inProgress)\(noneFinished ? ", none finished" : "") (the database is slow to accept or unreachable; the connect's own timeout, e.g. connect_timeout in a Postgres URL, is longer than this wait); \(inUse)/\(configuration.maxOpen) in use (\(limits))"
            }
        } else {
            message = "pool '\(configuration.name)' exhausted: \(inUse)/\(configuration.maxOpen) in use for \(waited) (\(limits))"
            if connecting > 0 { message += "; \(connecting) connecting" }
        }
        if !waiters.isEmpty { message += "; \(waiters.count) more waiting" }
        let longest = holders(now: now).prefix(3)
        if !longest.isEmpty { message += "; longest holders: " + longest.map(\.description).joined(separator: ", ") }
        return ConnectionPoolError(code: .acquireTimeout, message: message, lastConnectError: lastConnectError)
    }
}

// The results cross the pool's lock; they are Sendable when their payloads are.
extension PoolStateMachine.Lease: Sendable where Connection: Sendable {}
extension PoolStateMachine.Handoff: Sendable where Connection: Sendable, Waiter: Sendable {}
extension PoolStateMachine.Close: Sendable where Connection: Sendable {}
extension PoolStateMachine.Actions: Sendable where Connection: Sendable, Waiter: Sendable {}
extension PoolStateMachine.ImmediateLease: Sendable where Connection: Sendable {}
extension PoolStateMachine.EnqueueResult: Sendable where Connection: Sendable, Waiter: Sendable {}
extension PoolStateMachine.ReleaseAction: Sendable where Connection: Sendable, Waiter: Sendable {}
extension PoolStateMachine.ReleaseResult: Sendable where Connection: Sendable, Waiter: Sendable {}
extension PoolStateMachine.DrainStart: Sendable where Connection: Sendable, Waiter: Sendable {}
extension PoolStateMachine.DrainEnd: Sendable where Connection: Sendable {}
