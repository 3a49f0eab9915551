#if canImport(Glibc)
import CLibPQ
import Glibc
#endif
import Synchronization

/// A connection lent from a stripe, with its holder (the machine learns of it only if a
/// flush adopts it).
struct StripeLent {
    /// The lease's slot, id and connection id (not the connection: the holder has it, and
    /// keeping no reference here saves a retain and a release per lend).
    var slot: Int
    var leaseID: UInt64
    var connectionID: UInt64
    /// The lend token: `generation * PoolStripes.maxStripes + stripe index + 1`, never 0.
    var lend: UInt64
    var request: PoolMachine.Request
    var since: Duration
    /// `since` in nanoseconds, as ``ConnectionPool/stripeStamp()`` read it (0 for a clock other
    /// than `ContinuousClock`): use times are taken from it without `Duration` arithmetic.
    var sinceNanoseconds: Int64
    var expiresAt: Duration?
}

/// A stripe time stamp: the pool's time, also in whole nanoseconds (see
/// ``ConnectionPool/stripeStamp()``).
struct StripeStamp {
    /// The pool's time (since its epoch).
    var now: Duration
    /// `now` in nanoseconds, on `ContinuousClock`; 0 for other clocks.
    var nanoseconds: Int64
}

/// One CPU's slot: at most one parked (idle) connection and one lent from it.
struct StripeState {
    var parked: PoolMachine.Lease?
    var parkedSince: Duration = .zero
    var expiresAt: Duration?
    var lent: StripeLent?
    /// Lends since the last flush (added to the machine's `leases` counter then).
    var lends = 0
    var generation: UInt64 = 0
    /// Set by the drain: nothing is parked or lent here any more.
    var closed = false
}

/// A stripe, alone on its cache lines (the padding keeps two CPUs' stripes apart).
final class PoolStripe: Sendable {
    let state: Mutex<StripeState>
    let index: Int
    /// 1 while a connection is lent from this stripe (set under its lock, only with metrics
    /// on): the machine counts it idle, the count gauges count it used. On the stripe's own
    /// cache lines, so the CPU that lends writes nothing another CPU reads on its fast path.
    let lentNow = Atomic<Int>(0)
    private let padding: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)

    init(index: Int) {
        state = Mutex(StripeState())
        self.index = index
    }
}

/// The pool's CPU-local cache (`ConnectionPoolConfiguration.cpuLocalCache`).
///
/// Why: with two CPUs leasing and returning back to back, the cost of a lease+release was
/// the shared state's cache lines moving between the cores twice per cycle, whichever lock
/// guarded them (docs/bench-notes/pool.md). A stripe is used by one CPU almost always, so
/// its lock and its connection stay in that CPU's cache.
///
/// The protocol, which keeps the pool's promises:
/// - A connection gets into a stripe only through ``PoolStateMachine/stash(slot:leaseID:now:)``,
///   under the stripe's lock and then the machine's (that order, always), and only while nobody
///   waits. The machine keeps it as a stashed lease, counted idle.
/// - A lend from a stripe happens under the stripe's lock, only if `waitersPresent` is false. That
///   flag is set under the machine's lock when a waiter queues; if anything is stashed, the waiter
///   then takes every parked connection it can use (``ConnectionPool/handStripesToWaiters()``)
///   before the machine plans a connect for it. A return to a stripe reads
///   the flag under the stripe's lock, so either the waiter's sweep finds the connection parked or
///   the return sees the flag and hands the connection over through the machine: no waiter is
///   left waiting while a connection sits in a stripe, and no caller jumps ahead of a waiter.
/// - Within 100 ms of the first park (`flushInterval`), or at once when a parked connection
///   reaches the end of its lifetime, the timer flushes: parked connections go
///   back to the machine (idle, a waiter, or closed for lifetime), and a lend still out becomes
///   an ordinary lease of its holder (``PoolStateMachine/adopt(slot:leaseID:lend:request:since:)``),
///   so leak reports and the drain see it. The drain flushes and closes every stripe first.
/// - `statistics` and `holders()` read the stripes as they are (a lent one is in use, with
///   its holder; a parked one idle).
final class PoolStripes: Sendable {
    /// Stripes beyond this many CPUs share (the lend token keeps the stripe index in this range).
    static let maxStripes = 64
    /// How often parked and lent connections come back under the machine while the cache is used.
    static let flushInterval: Duration = .milliseconds(100)

    let stripes: [PoolStripe]
    let mask: Int
    /// The same stripes, unretained, for the hot path (no retain and release per access);
    /// `stripes` keeps them alive.
    private nonisolated(unsafe) let unretained: UnsafeMutableBufferPointer<Unmanaged<PoolStripe>>

    /// `count` stripes (a power of two up to `maxStripes`; 0: the cache is off). Tests use one
    /// stripe, so that every caller meets the same one.
    init(count: Int) {
        precondition(count >= 0 && count <= Self.maxStripes && count & (count &- 1) == 0)
        stripes = (0..<count).map { PoolStripe(index: $0) }
        mask = max(0, count - 1)
        unretained = .allocate(capacity: max(1, count))
        for (i, stripe) in stripes.enumerated() { unretained[i] = Unmanaged.passUnretained(stripe) }
    }

    deinit { unretained.deallocate() }

    /// One stripe per online CPU, rounded up to a power of two (0 when `enabled` is false).
    static func defaultCount(enabled: Bool) -> Int {
        guard enabled else { return 0 }
        var count = 1
        let cpus = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        while count < min(cpus, maxStripes) { count <<= 1 }
        return count
    }

    var enabled: Bool { !stripes.isEmpty }

    /// Runs `body` with the calling thread's CPU's stripe.
    @inline(__always)
    func withCurrent<R>(_ body: (PoolStripe) -> R) -> R {
        #if os(Linux) && canImport(Glibc)
        let cpu = Int(sched_getcpu())
        #else
        let cpu = 0
        #endif
        return unretained[max(0, cpu) & mask]._withUnsafeGuaranteedRef(body)
    }

    /// Runs `body` with the stripe a lend token came from.
    @inline(__always)
    func withStripe<R>(ofLend lend: UInt64, _ body: (PoolStripe) -> R) -> R {
        unretained[Int((lend &- 1) % UInt64(Self.maxStripes))]._withUnsafeGuaranteedRef(body)
    }

    /// The next lend token of stripe `index`.
    @inline(__always)
    static func nextLend(_ state: inout StripeState, index: Int) -> UInt64 {
        state.generation &+= 1
        return state.generation &* UInt64(maxStripes) &+ UInt64(index) &+ 1
    }
}

/// Flags read on the hot path without the pool's lock.
final class PoolFlags: Sendable {
    /// Somebody waits: stripes neither lend nor take connections back (set under the pool's lock).
    let waitersPresent = Atomic<Bool>(false)
    /// A connection was parked in a stripe since the last flush (set under the pool's lock;
    /// cleared by a flush before it visits the stripes, without the lock).
    let stripesInUse = Atomic<Bool>(false)
    /// When `stripesInUse` was set (the pool's time, in nanoseconds): the next flush is due
    /// `flushInterval` after it, however late the timer notices.
    let stripesInUseSince = Atomic<Int64>(0)

    /// Under the pool's lock, at a park: sets `stripesInUse` (with its time) if it was not set;
    /// true when it was not (the timer must then be woken to schedule the flush).
    func arm(at now: Duration) -> Bool {
        guard !stripesInUse.load(ordering: .relaxed) else { return false }
        let (seconds, attoseconds) = now.components
        stripesInUseSince.store(seconds &* 1_000_000_000 &+ attoseconds / 1_000_000_000, ordering: .relaxed)
        stripesInUse.store(true, ordering: .releasing)
        return true
    }

    /// When the next flush is due: `flushInterval` after the first park since the last flush;
    /// nil when nothing was parked since.
    var flushDue: Duration? {
        guard stripesInUse.load(ordering: .acquiring) else { return nil }
        return .nanoseconds(stripesInUseSince.load(ordering: .relaxed)) + PoolStripes.flushInterval
    }
}
