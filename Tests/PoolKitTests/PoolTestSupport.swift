import Synchronization
import Testing
@testable import PoolKit

/// A connection object for state-machine tests.
final class FakeConnection: Sendable, CustomStringConvertible {
    let id: Int
    init(id: Int) { self.id = id }
    var description: String { "conn\(id)" }
}

typealias TestMachine = PoolStateMachine<FakeConnection, Int>

extension Duration {
    static func ms(_ v: Int) -> Duration { .milliseconds(v) }
}

/// Helpers that drive a state machine the way the shell does.
struct MachineDriver {
    var machine: TestMachine
    var nextConnection = 0
    var opened: [FakeConnection] = []
    var closed: [FakeConnection] = []
    var now: Duration = .zero

    init(_ configuration: ConnectionPoolConfiguration, seed: UInt64 = 1) {
        machine = TestMachine(configuration: configuration, seed: seed)
    }

    mutating func makeConnection() -> FakeConnection {
        nextConnection += 1
        let c = FakeConnection(id: nextConnection)
        opened.append(c)
        return c
    }

    /// Completes connect requests successfully; returns all actions.
    @discardableResult
    mutating func complete(_ requests: [TestMachine.ConnectRequest]) -> TestMachine.Actions {
        var all = TestMachine.Actions()
        var pending = requests
        while !pending.isEmpty {
            let r = pending.removeFirst()
            let a = machine.connected(r, connection: makeConnection(), now: now)
            absorb(a, into: &all)
            pending += a.connects
        }
        return all
    }

    mutating func absorb(_ a: TestMachine.Actions, into all: inout TestMachine.Actions) {
        all.handoffs += a.handoffs
        all.failures += a.failures
        all.connects += a.connects
        all.closes += a.closes
        all.leaks += a.leaks
        all.drained = all.drained || a.drained
        for c in a.closes { closed.append(c.connection) }
    }

    /// Warms up to minIdle (completing all connects).
    mutating func warmUp() {
        let a = machine.start(now: now)
        complete(a.connects)
    }

    mutating func lease(_ label: String? = nil) -> TestMachine.Lease? {
        if case .leased(let l, _) = machine.leaseImmediately(request: .init(label: label, fileID: "T.swift", line: 1), now: now) {
            return l
        }
        return nil
    }

    /// Queues waiter `id`; returns the enqueue result.
    mutating func wait(_ id: Int, timeout: Duration = .seconds(5), label: String? = nil) -> TestMachine.EnqueueResult {
        let r = machine.leaseImmediately(request: .init(label: label, fileID: "T.swift", line: 2), now: now)
        guard case .mustWait(let wid) = r else { Issue.record("expected to wait, got \(r)"); return .failed(.init(code: .shutDown, message: ""), TestMachine.Actions()) }
        return machine.enqueue(waiterID: wid, waiter: id, request: .init(label: label, fileID: "T.swift", line: 2), now: now, deadline: now + timeout)
    }

    mutating func release(_ l: TestMachine.Lease, reusable: Bool = true) -> TestMachine.ReleaseResult {
        let claimed595 = machine.beginRelease(slot: l.slot, leaseID: l.leaseID)
        #expect(claimed595)
        let r = machine.finishRelease(slot: l.slot, leaseID: l.leaseID, now: now, reusable: reusable)
        if case .actions(let a) = r.action { for c in a.closes { closed.append(c.connection) } }
        return r
    }

    mutating func tick() -> TestMachine.Actions {
        let a = machine.tick(now: now)
        for c in a.closes { closed.append(c.connection) }
        return a
    }
}

/// A manual clock for shell tests: time moves only when the test advances it.
final class ManualClock: Clock, @unchecked Sendable {
    struct Instant: InstantProtocol {
        var offset: Duration
        func advanced(by duration: Duration) -> Instant { Instant(offset: offset + duration) }
        func duration(to other: Instant) -> Duration { other.offset - offset }
        static func < (l: Instant, r: Instant) -> Bool { l.offset < r.offset }
    }

    private struct Sleeper {
        var id: Int
        var deadline: Instant
        var length: Duration
        var continuation: CheckedContinuation<Void, any Error>
    }

    private struct State {
        var now = Instant(offset: .zero)
        var sleepers: [Sleeper] = []
        var nextID = 0
    }

    private let state = Mutex(State())

    var now: Instant { state.withLock { $0.now } }
    var minimumResolution: Duration { .nanoseconds(1) }

    func sleep(until deadline: Instant, tolerance: Duration?) async throws {
        let id = state.withLock { s -> Int in s.nextID += 1; return s.nextID }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                let action = state.withLock { s -> Int in
                    if Task.isCancelled { return 1 }
                    if deadline <= s.now { return 2 }
                    s.sleepers.append(Sleeper(id: id, deadline: deadline, length: s.now.duration(to: deadline), continuation: c))
                    return 0
                }
                if action == 1 { c.resume(throwing: CancellationError()) } else if action == 2 { c.resume() }
            }
        } onCancel: {
            let c = state.withLock { s -> CheckedContinuation<Void, any Error>? in
                guard let i = s.sleepers.firstIndex(where: { $0.id == id }) else { return nil }
                return s.sleepers.remove(at: i).continuation
            }
            c?.resume(throwing: CancellationError())
        }
    }

    /// Sleepers whose sleep had exactly this length.
    func sleepers(ofLength length: Duration) -> Int {
        state.withLock { $0.sleepers.filter { $0.length == length }.count }
    }

    /// All registered sleepers.
    var sleeperCount: Int { state.withLock { $0.sleepers.count } }

    /// The earliest sleeper deadline among sleeps of the given lengths.
    func nextDeadline(lengths: Set<Duration>) -> Instant? {
        state.withLock { $0.sleepers.filter { lengths.contains($0.length) }.map(\.deadline).min() }
    }

    /// Moves time forward and wakes every sleeper that is due.
    func advance(to instant: Instant) {
        let due = state.withLock { s -> [CheckedContinuation<Void, any Error>] in
            if instant > s.now { s.now = instant }
            let due = s.sleepers.filter { $0.deadline <= s.now }
            s.sleepers.removeAll { $0.deadline <= s.now }
            return due.map(\.continuation)
        }
        for c in due { c.resume() }
    }

    /// Moves time forward by a duration.
    func advance(by duration: Duration) { advance(to: now.advanced(by: duration)) }
}

/// A connection for shell tests: no I/O, counts what the pool does to it.
final class MockConnection: PoolableConnection, CustomStringConvertible {
    struct State {
        var broken = false
        var closed = 0
        var resets = 0
        var cancels = 0
        var holders = 0
        var failReset = false
        /// `prepareForReuse` hangs until the connection is closed (a ROLLBACK on a half-open socket).
        var hangReset = false
        /// `close()` takes this long (real time) before the session ends.
        var closeDelay: Duration?
        /// Called as `close()` begins (a test moves its manual clock there, say).
        var onClose: (@Sendable () -> Void)?
        var maxHolders = 0
        /// When true, `needsReset` answers false (the pool then skips `prepareForReuse`).
        var clean = false
    }
    let id: Int
    let state = Mutex(State())
    init(id: Int) { self.id = id }

    var isBroken: Bool { state.withLock { $0.broken || $0.closed > 0 } }
    var needsReset: Bool { state.withLock { !$0.clean } }
    func prepareForReuse() async throws {
        let (fail, hang) = state.withLock { s -> (Bool, Bool) in s.resets += 1; return (s.failReset, s.hangReset) }
        if hang {
            while state.withLock({ $0.closed == 0 }) { try await Task.sleep(for: .milliseconds(5)) }
            throw MockError.resetFailed
        }
        if fail { throw MockError.resetFailed }
    }
    func cancelRunningQuery() async { state.withLock { $0.cancels += 1 } }
    func close() async {
        state.withLock { $0.onClose }?()
        if let delay = state.withLock({ $0.closeDelay }) { try? await Task.sleep(for: delay) }
        state.withLock { $0.closed += 1 }
    }

    /// Marks the connection in use by one more holder (a second concurrent holder is a pool bug).
    func enter() { state.withLock { $0.holders += 1; $0.maxHolders = max($0.maxHolders, $0.holders) } }
    func leave() { state.withLock { $0.holders -= 1 } }
    func breakIt() { state.withLock { $0.broken = true } }
    var closeCount: Int { state.withLock { $0.closed } }
    var maxHolders: Int { state.withLock { $0.maxHolders } }
    var description: String { "mock\(id)" }
}

enum MockError: Error, CustomStringConvertible {
    case resetFailed, connectRefused
    var description: String {
        switch self {
        case .resetFailed: "reset failed"
        case .connectRefused: "connection refused (mock)"
        }
    }
}

/// Makes mock connections and remembers them.
final class MockFactory: Sendable {
    struct State {
        var made: [MockConnection] = []
        var failNext = 0
        var attempts = 0
        /// When each attempt was made (real clock).
        var attemptTimes: [ContinuousClock.Instant] = []
    }
    let state = Mutex(State())
    /// Connections made need no reset (`needsReset` false), as an idle Postgres connection:
    /// their returns take the pool's fastest path, through the CPU-local cache.
    let clean: Bool

    init(clean: Bool = false) { self.clean = clean }

    func make() throws -> MockConnection {
        try state.withLock { s in
            s.attempts += 1
            s.attemptTimes.append(.now)
            if s.failNext > 0 { s.failNext -= 1; throw MockError.connectRefused }
            let c = MockConnection(id: s.made.count + 1)
            if clean { c.state.withLock { $0.clean = true } }
            s.made.append(c)
            return c
        }
    }
    var made: [MockConnection] { state.withLock { $0.made } }
    func failNext(_ n: Int) { state.withLock { $0.failNext = n } }
}

/// Polls `condition` every 10 ms of real time, for at most `seconds` (for work that sleeps in
/// real time, which `eventually`'s yields do not wait for); the caller asserts the outcome.
func pollUntil(seconds: Double, _ condition: () -> Bool) async throws {
    let end = ContinuousClock.now + .seconds(seconds)
    while !condition() && ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(10)) }
}

/// Waits, without sleeping, until a condition holds (other tasks make progress meanwhile).
func eventually(_ what: String, _ condition: () -> Bool, sourceLocation: SourceLocation = #_sourceLocation) async {
    for _ in 0..<200_000 {
        if condition() { return }
        await Task.yield()
    }
    Issue.record("condition never became true: \(what)", sourceLocation: sourceLocation)
}

/// A counter shared between tasks.
final class SharedCounter: Sendable {
    private let count = Mutex(0)
    func increment() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}
