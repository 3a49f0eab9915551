import Foundation
import Synchronization

/// A clock that only moves when told to, for deterministic tests.
///
/// `sleep(until:)` parks the caller until `advance(by:)`/`advance(to:)` moves
/// `now` to or past its deadline. The clock counts its sleepers, which is how
/// `JobScheduler.waitUntilIdle()` knows that every task of the scheduler has
/// either finished or is waiting for time to pass. It also maps its instants
/// onto a wall clock (`wallClock()`), which a `JobScheduler` on this clock
/// uses for cron triggers.
public final class ManualClock: Clock, Sendable {
    /// An instant of a `ManualClock`: an offset from the clock's origin.
    public struct Instant: InstantProtocol, Sendable, Hashable, Comparable, CustomStringConvertible {
        /// Time since the clock's origin.
        public var offset: Duration

        /// Creates an instant `offset` after the origin.
        public init(offset: Duration) { self.offset = offset }

        /// This instant moved by `duration`.
        public func advanced(by duration: Duration) -> Instant { Instant(offset: offset + duration) }

        /// The duration from this instant to `other`.
        public func duration(to other: Instant) -> Duration { other.offset - offset }

        /// Orders by offset.
        public static func < (lhs: Instant, rhs: Instant) -> Bool { lhs.offset < rhs.offset }

        /// `+<offset>`.
        public var description: String { "+\(offset)" }
    }

    private struct Sleeper {
        var deadline: Instant
        var continuation: CheckedContinuation<Void, any Error>
    }

    private struct State {
        var now = Instant(offset: .zero)
        var sleepers: [UInt64: Sleeper] = [:]
        var cancelledBeforeRegistration: Set<UInt64> = []
        var nextID: UInt64 = 0
        var generation: UInt64 = 0
        var changeWaiters: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())
    /// The wall-clock time of the origin (`Instant(offset: .zero)`).
    public let wallClockOrigin: Date

    /// Creates a clock at offset zero whose origin is `wallClockOrigin` on the wall clock.
    public init(wallClockOrigin: Date = Date(timeIntervalSince1970: 1_700_000_000)) {
        self.wallClockOrigin = wallClockOrigin
    }

    /// The current instant.
    public var now: Instant { state.withLock { $0.now } }

    /// One nanosecond.
    public var minimumResolution: Duration { .nanoseconds(1) }

    /// The wall-clock time of `now`.
    public func wallClock() -> Date {
        let offset = now.offset
        let (s, a) = offset.components
        return wallClockOrigin.addingTimeInterval(TimeInterval(s) + TimeInterval(a) / 1e18)
    }

    /// Parks until `now >= deadline`; throws `CancellationError` if the task is cancelled first.
    public func sleep(until deadline: Instant, tolerance: Duration? = nil) async throws {
        let id = state.withLock { s -> UInt64 in
            s.nextID += 1
            return s.nextID
        }
        // A cancellation that lands after the sleep was woken finds no sleeper and notes the id
        // as cancelled before its registration: forgotten once the sleep is over, or long test
        // runs would keep every such id.
        defer { state.withLock { _ = $0.cancelledBeforeRegistration.remove(id) } }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let (outcome, waiters) = state.withLock { s -> (Int, [CheckedContinuation<Void, Never>]) in
                    if s.cancelledBeforeRegistration.remove(id) != nil { return (2, []) }
                    if deadline <= s.now { return (1, []) }
                    s.sleepers[id] = Sleeper(deadline: deadline, continuation: c)
                    s.generation &+= 1
                    let w = s.changeWaiters
                    s.changeWaiters = []
                    return (0, w)
                }
                switch outcome {
                case 1: c.resume()
                case 2: c.resume(throwing: CancellationError())
                default: break
                }
                for w in waiters { w.resume() }
            }
        } onCancel: {
            let (sleeper, waiters) = state.withLock { s -> (Sleeper?, [CheckedContinuation<Void, Never>]) in
                guard let sl = s.sleepers.removeValue(forKey: id) else {
                    s.cancelledBeforeRegistration.insert(id)
                    return (nil, [])
                }
                s.generation &+= 1
                let w = s.changeWaiters
                s.changeWaiters = []
                return (sl, w)
            }
            sleeper?.continuation.resume(throwing: CancellationError())
            for w in waiters { w.resume() }
        }
    }

    /// Moves `now` forward by `duration` at once and wakes every sleeper whose
    /// deadline has come, earliest first. (To let a scheduler react at each
    /// intermediate deadline, use `JobScheduler.advance(by:)`.)
    public func advance(by duration: Duration) {
        precondition(duration >= .zero, "ManualClock.advance(by:) needs a non-negative duration, got \(duration)")
        advance(to: now.advanced(by: duration))
    }

    /// Moves `now` to `instant` (never backwards) and wakes the due sleepers.
    public func advance(to instant: Instant) {
        let (due, waiters) = state.withLock { s -> ([Sleeper], [CheckedContinuation<Void, Never>]) in
            if instant > s.now { s.now = instant }
            let dueIDs = s.sleepers.filter { $0.value.deadline <= s.now }
                .sorted { ($0.value.deadline, $0.key) < ($1.value.deadline, $1.key) }.map(\.key)
            let due = dueIDs.compactMap { s.sleepers.removeValue(forKey: $0) }
            s.generation &+= 1
            let w = s.changeWaiters
            s.changeWaiters = []
            return (due, w)
        }
        for d in due { d.continuation.resume() }
        for w in waiters { w.resume() }
    }

    /// Cancellations noted for sleeps not (or no longer) registered (tests: none outlives its sleep).
    var notedCancellations: Int { state.withLock { $0.cancelledBeforeRegistration.count } }

    /// How many tasks are parked in `sleep(until:)`.
    public var sleeperCount: Int { state.withLock { $0.sleepers.count } }

    /// The earliest deadline of a parked sleeper.
    public var nextSleeperDeadline: Instant? {
        state.withLock { $0.sleepers.values.map(\.deadline).min() }
    }

    // MARK: - Change notification (used by JobScheduler.waitUntilIdle)

    /// A counter that moves whenever sleepers or an observed scheduler change.
    var generation: UInt64 { state.withLock { $0.generation } }

    /// Records that an observer's state changed and wakes `waitForChange` callers.
    func noteActivity() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Never>] in
            s.generation &+= 1
            let w = s.changeWaiters
            s.changeWaiters = []
            return w
        }
        for w in waiters { w.resume() }
    }

    /// Returns once `generation` differs from `since`.
    func waitForChange(since: UInt64) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now = state.withLock { s -> Bool in
                if s.generation != since { return true }
                s.changeWaiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }
}
