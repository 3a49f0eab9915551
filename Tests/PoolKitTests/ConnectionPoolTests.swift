import Logging
import Synchronization
import Testing
import TestSupport
@testable import PoolKit

typealias TestPool = ConnectionPool<MockConnection, ManualClock>

/// Runs `body` with a pool whose `run()` is running in a child task; cancels
/// `run()` afterwards (a forced drain) and returns the pool for final checks.
@discardableResult
func withRunningPool(
    _ configuration: ConnectionPoolConfiguration,
    clock: ManualClock = ManualClock(),
    factory: MockFactory = MockFactory(),
    connect: (@Sendable () async throws -> MockConnection)? = nil,
    stripes: Int? = nil,
    _ body: (TestPool, ManualClock, MockFactory) async throws -> Void
) async throws -> TestPool {
    let pool = TestPool(
        configuration: configuration, clock: clock, logger: Logger(label: "test"), seed: 1, stripes: stripes,
        connectionFactory: connect ?? { try factory.make() }
    )
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await pool.run() }
        try await body(pool, clock, factory)
        group.cancelAll()
        try await group.waitForAll()
    }
    return pool
}

func baseConfiguration(_ edit: (inout ConnectionPoolConfiguration) -> Void = { _ in }) -> ConnectionPoolConfiguration {
    var c = ConnectionPoolConfiguration(
        name: "shell", maxOpen: 2, minIdle: 1, maxIdle: 2, maxLifetime: nil, maxIdleTime: nil,
        acquireTimeout: .seconds(5), maxWaiters: 100, maxConcurrentConnects: 2, leakThreshold: nil
    )
    edit(&c)
    return c
}

@Suite("ConnectionPool (shell, mock connection, manual clock)")
struct ConnectionPoolTests {
    @Test func withConnectionLendsAndReturnsAndResetsTheConnection() async throws {
        let pool = try await withRunningPool(baseConfiguration()) { pool, _, factory in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let id = try await pool.withConnection(label: "first") { conn in
                #expect(pool.statistics.inUse == 1)
                #expect(pool.holders().first?.label == "first")
                #expect(pool.holders().first?.fileID.hasSuffix("ConnectionPoolTests.swift") == true)
                return conn.id
            }
            #expect(pool.statistics.inUse == 0 && pool.statistics.idle == 1)
            #expect(factory.made.first?.id == id)
            #expect(factory.made.first?.state.withLock { $0.resets } == 1, "reset on return")
            // also on throw
            await #expect(throws: MockError.self) {
                try await pool.withConnection { _ in throw MockError.resetFailed }
            }
            #expect(pool.statistics.inUse == 0)
        }
        #expect(pool.statistics.open == 0, "run() cancelled: drained")
    }

    @Test func acquireTimeoutThrowsAClearErrorNamingTheHolder() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease(label: "slow-report")
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    let error = await #expect(throws: ConnectionPoolError.self) { _ = try await pool.lease() }
                    #expect(error?.code == .acquireTimeout)
                    #expect(error?.description.contains("1/1 in use for 5s (maxOpen=1, acquireTimeout=5s)") == true)
                    #expect(error?.description.contains("'slow-report' at PoolKitTests/ConnectionPoolTests.swift") == true)
                }
                await eventually("waiting") { pool.statistics.waiting == 1 }
                clock.advance(by: .seconds(5))
                try await group.waitForAll()
            }
            #expect(pool.statistics.timeouts == 1)
            await pool.release(lease)
        }
    }

    @Test func cancellationEndsAWaitAtOnce() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease()
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    await #expect(throws: CancellationError.self) { _ = try await pool.lease() }
                }
                await eventually("waiting") { pool.statistics.waiting == 1 }
                group.cancelAll()
            }
            #expect(pool.statistics.waiting == 0)
            #expect(pool.statistics.cancelledWaits == 1)
            await pool.release(lease)
            #expect(pool.statistics.idle == 1, "the connection is not lost to the cancelled waiter")
        }
    }

    @Test func waiterIsServedByDirectHandoff() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease()
            try await withThrowingTaskGroup(of: UInt64.self) { group in
                group.addTask { try await pool.withConnection { conn in UInt64(conn.id) } }
                await eventually("waiting") { pool.statistics.waiting == 1 }
                await pool.release(lease)
                let served = try await group.next()
                #expect(served == lease.connectionID, "the released connection went straight to the waiter")
            }
            #expect(pool.statistics.waitCount == 1)
        }
    }

    @Test func brokenConnectionsAreDiscardedAndReplaced() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }) { pool, _, factory in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let first = try await pool.lease()
            first.connection.breakIt()
            await pool.release(first)
            #expect(first.connection.closeCount == 1)
            let second = try await pool.lease()
            #expect(second.connection !== first.connection)
            #expect(!second.connection.isBroken)
            // broken while idle: found on lease, discarded, the caller still gets a good one
            await pool.release(second)
            second.connection.breakIt()
            let third = try await pool.lease()
            #expect(third.connection !== second.connection && !third.connection.isBroken)
            await pool.release(third)
            #expect(pool.statistics.closedBroken == 2)
            #expect(factory.made.count == 3)
        }
    }

    @Test func failedResetClosesTheConnection() async throws {
        try await withRunningPool(baseConfiguration()) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease()
            lease.connection.state.withLock { $0.failReset = true }
            await pool.release(lease)
            #expect(lease.connection.closeCount == 1)
            #expect(pool.statistics.closedBroken == 1)
        }
    }

    @Test func releasingTwiceIsHarmless() async throws {
        try await withRunningPool(baseConfiguration()) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease()
            await pool.release(lease)
            let again = try await pool.lease()
            await pool.release(lease)   // stale: must not return `again`'s connection
            #expect(pool.statistics.inUse == 1)
            #expect(again.connection.state.withLock { $0.resets } == 1)
            await pool.release(again)
            #expect(pool.statistics.inUse == 0)
        }
    }

    @Test func aConnectionThatNeedsNoResetIsReturnedWithoutPrepareForReuse() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease()
            lease.connection.state.withLock { $0.clean = true }
            await pool.release(lease)
            #expect(lease.connection.state.withLock { $0.resets } == 0, "needsReset false: no prepareForReuse")
            #expect(pool.statistics.idle == 1 && pool.statistics.inUse == 0)
            // A second release of the same lease (now idle, then held by someone else) does nothing.
            await pool.release(lease)
            let again = try await pool.lease()
            await pool.release(lease)
            #expect(pool.statistics.inUse == 1)
            // Handed straight to a waiter.
            try await withThrowingTaskGroup(of: Int.self) { group in
                group.addTask { try await pool.withConnection { $0.id } }
                await eventually("waiting") { pool.statistics.waiting == 1 }
                await pool.release(again)
                let servedWith = try await group.next()
                #expect(servedWith == again.connection.id)
            }
            #expect(lease.connection.state.withLock { $0.resets } == 0)
            // Broken and clean: closed, not reset.
            let last = try await pool.lease()
            last.connection.breakIt()
            await pool.release(last)
            #expect(last.connection.closeCount == 1)
            #expect(last.connection.state.withLock { $0.resets } == 0)
            #expect(pool.statistics.closedBroken == 1)
        }
    }

    @Test func leaksAreReportedWithHolder() async throws {
        try await withRunningPool(baseConfiguration { $0.leakThreshold = .seconds(10) }) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease(label: "forgotten")
            clock.advance(by: .seconds(11))
            await eventually("leak reported") { pool.statistics.leaksReported == 1 }
            #expect(pool.holders().first?.heldFor == .seconds(11))
            await pool.release(lease)
        }
    }

    @Test func aReplacementIsOpenedOnlyAfterTheConnectionItReplacesIsClosed() async throws {
        // maxOpen counts sessions on the server too: a slow close of an expired connection
        // must not overlap the connect that replaces it.
        let factory = MockFactory()
        let mostOpen = Mutex(0)
        let connect: @Sendable () async throws -> MockConnection = {
            let open = factory.made.filter { $0.closeCount == 0 }.count + 1
            mostOpen.withLock { $0 = max($0, open) }
            let connection = try factory.make()
            connection.state.withLock { $0.closeDelay = .milliseconds(100) }
            return connection
        }
        let configuration = baseConfiguration { $0.maxOpen = 1; $0.minIdle = 1; $0.maxLifetime = .seconds(60); $0.lifetimeJitter = .zero }
        try await withRunningPool(configuration, factory: factory, connect: connect) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            clock.advance(by: .seconds(61))
            try await pollUntil(seconds: 3) { factory.made.count == 2 && pool.statistics.idle == 1 }
            #expect(factory.made.count == 2, "the expired connection was replaced")
            #expect(mostOpen.withLock { $0 } == 1, "the replacement was opened while the expired connection was still closing")
        }
    }

    // Audit, session 12: the idle list was lent from without a look at lifetimes, so a lease
    // that ran before the timer's task got connection #1 after its lifetime.
    @Test func anIdleConnectionPastItsLifetimeIsNotLentEvenBeforeTheTimerRuns() async throws {
        let configuration = baseConfiguration { $0.maxOpen = 1; $0.minIdle = 1; $0.maxLifetime = .seconds(60); $0.lifetimeJitter = .zero }
        try await withRunningPool(configuration) { pool, clock, factory in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            clock.advance(by: .seconds(61))
            // At once, before the timer's task has run its tick.
            let lease = try await pool.lease(label: "after-expiry")
            #expect(lease.connectionID == 2, "connection #1 was lent past its lifetime")
            #expect(factory.made.first?.closeCount == 1)
            await pool.release(lease)
        }
    }

    // Audit, session 12: a waiter handed a broken connection queues again at the front; its
    // timeout message counted only the wait after that.
    @Test func aTimeoutAfterABrokenHandoffReportsTheWholeWait() async throws {
        let factory = MockFactory()
        let opened = AsyncStream.makeStream(of: Void.self)
        let attempts = Mutex(0)
        let connect: @Sendable () async throws -> MockConnection = {
            let attempt = attempts.withLock { n -> Int in n += 1; return n }
            guard attempt == 1 else {
                // The database stops answering: the replacement never comes.
                try await Task.sleep(for: .seconds(3_600))
                throw CancellationError()
            }
            for await _ in opened.stream { break }
            let connection = try factory.make()
            connection.breakIt()
            return connection
        }
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1; $0.minIdle = 0 }, factory: factory, connect: connect) { pool, clock, _ in
            let waiter = Task { try await pool.lease(label: "patient") }
            try await pollUntil(seconds: 5) { attempts.withLock { $0 } == 1 && pool.statistics.waiting == 1 }
            clock.advance(by: .seconds(4))
            opened.continuation.yield()
            // Handed the broken connection, the waiter discards it and queues again.
            try await pollUntil(seconds: 5) { attempts.withLock { $0 } == 2 && pool.statistics.waiting == 1 }
            #expect(factory.made.first?.closeCount == 1)
            clock.advance(by: .seconds(1))
            let error = await #expect(throws: ConnectionPoolError.self) { _ = try await waiter.value }
            #expect(error?.code == .acquireTimeout)
            // The whole wait (both legs), and what it waited for: the replacement's connect.
            #expect(error?.message.contains("within 5s: 1 connect still in progress") == true, "\(String(describing: error))")
        }
    }

    @Test func drainReturnsOnlyOnceTheLastReturnedConnectionIsClosed() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }, factory: MockFactory(clean: true)) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let held = try await pool.lease(label: "held")
            held.connection.state.withLock { $0.closeDelay = .milliseconds(300) }
            let releaser = Task {
                try await Task.sleep(for: .milliseconds(100))
                await pool.release(held)
            }
            let report = await pool.drain(deadline: clock.now.advanced(by: .seconds(60)))
            // Before, the release signalled "drained" and then closed: the drain (and with it
            // run(), and a process exiting after it) could end while the close still ran.
            #expect(held.connection.closeCount == 1, "drain returned before the last connection's close ended")
            #expect(report.cutOff.isEmpty)
            try await releaser.value
        }
    }

    @Test func drainWaitsForEveryReturnedConnectionsCloseNotOnlyTheLast() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 2; $0.minIdle = 2 }, factory: MockFactory(clean: true)) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 2 }
            let slow = try await pool.lease(label: "slow close")
            let quick = try await pool.lease(label: "quick close")
            slow.connection.state.withLock { $0.closeDelay = .milliseconds(500) }
            let draining = Task { await pool.drain(deadline: clock.now.advanced(by: .seconds(60))) }
            await eventually("draining") { pool.drainBegan.hasFired }
            let slowReturn = Task { await pool.release(slow) }
            await eventually("slow one returned, its close running") { pool.statistics.inUse == 1 }
            await pool.release(quick)   // the last return: the lending is over, one close still runs
            let report = await draining.value
            #expect(slow.connection.closeCount == 1, "drain returned while an earlier return's close still ran")
            #expect(quick.connection.closeCount == 1)
            #expect(report.returnedInTime == 2 && report.cutOff.isEmpty)
            await slowReturn.value
        }
    }

    @Test func drainIsNotHeldPastItsDeadlineByAnIdleCloseThatHangs() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1; $0.minIdle = 1 }, factory: MockFactory(clean: true)) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease(label: "hanging close")
            lease.connection.state.withLock { $0.closeDelay = .seconds(5) }
            await pool.release(lease)
            await eventually("back in the pool") { pool.statistics.idle == 1 }
            let draining = Task { await pool.drain(deadline: clock.now.advanced(by: .seconds(1))) }
            await eventually("draining") { pool.drainBegan.hasFired }
            clock.advance(by: .seconds(2))
            let report = await draining.value
            #expect(lease.connection.closeCount == 0, "the drain waited for the close past its deadline")
            #expect(report.idleClosed == 1 && report.closesUnfinished == 1, "\(report)")
            #expect(report.description.contains("1 closes still running"), "\(report)")
            // The close ends in the background (its 5 s are real time).
            let until = ContinuousClock.now + .seconds(15)
            while lease.connection.closeCount == 0, ContinuousClock.now < until { try await Task.sleep(for: .milliseconds(20)) }
            #expect(lease.connection.closeCount == 1)
        }
    }

    @Test func aConnectionStuckInItsResetIsReportedAsALeak() async throws {
        try await withRunningPool(baseConfiguration { $0.leakThreshold = .seconds(10) }) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let lease = try await pool.lease(label: "stuck-reset")
            lease.connection.state.withLock { $0.hangReset = true }
            let releasing = Task { await pool.release(lease) }
            await eventually("reset started") { lease.connection.state.withLock { $0.resets } == 1 }
            clock.advance(by: .seconds(11))
            await eventually("leak reported") { pool.statistics.leaksReported == 1 }
            #expect(pool.holders().map(\.label) == ["stuck-reset"])
            await lease.connection.close()  // the reset fails; the pool closes the connection
            await releasing.value
        }
    }

    @Test func drainCancelsConnectsInFlightInsteadOfWaitingForTheDeadline() async throws {
        // The database is unreachable: a connect hangs until it is cancelled. Draining must not
        // wait the whole drain deadline for it.
        let connectStarted = AsyncStream.makeStream(of: Void.self)
        let hanging: @Sendable () async throws -> MockConnection = {
            connectStarted.continuation.yield()
            try await Task.sleep(for: .seconds(3_600))
            throw CancellationError()
        }
        try await withRunningPool(baseConfiguration { $0.minIdle = 1 }, connect: hanging) { pool, clock, _ in
            var started = connectStarted.stream.makeAsyncIterator()
            _ = await started.next()
            #expect(pool.statistics.opening == 1)
            let finished = Mutex(false)
            let draining = Task {
                let report = await pool.drain(deadline: clock.now.advanced(by: .seconds(10)))
                finished.withLock { $0 = true }
                return report
            }
            // The manual clock stands still: only the connect's cancellation can end the drain.
            try await pollUntil(seconds: 5) { finished.withLock { $0 } }
            #expect(finished.withLock { $0 }, "the drain waited for the hanging connect")
            #expect(pool.statistics.opening == 0)
            clock.advance(by: .seconds(10))  // lets a drain stuck on its deadline end, so that the test does
            #expect(await draining.value.cutOff.isEmpty)
        }
    }

    @Test func drainFailsWaitersAwaitsHoldersThenCancelsAndClosesThem() async throws {
        let clock = ManualClock()
        try await withRunningPool(baseConfiguration { $0.maxOpen = 2; $0.minIdle = 2 }, clock: clock) { pool, clock, factory in
            await eventually("warm-up") { pool.statistics.idle == 2 }
            let returned = try await pool.lease(label: "returns-in-time")
            let stuck = try await pool.lease(label: "stuck")
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    let e = await #expect(throws: ConnectionPoolError.self) { _ = try await pool.lease() }
                    #expect(e?.code == .shutDown)
                }
                await eventually("waiting") { pool.statistics.waiting == 1 }
                group.addTask {
                    let report = await pool.drain(deadline: clock.now.advanced(by: .seconds(10)))
                    #expect(report.waitersFailed == 1)
                    #expect(report.returnedInTime == 1)
                    #expect(report.cutOff.map(\.label) == ["stuck"])
                    #expect(report.description.contains("1 cut off ['stuck' at"))
                }
                await eventually("draining") { pool.statistics.waiting == 0 }
                await #expect(throws: ConnectionPoolError.self) { _ = try await pool.lease() }
                await pool.release(returned)
                #expect(returned.connection.closeCount == 1, "returned during drain: closed, not reused")
                clock.advance(by: .seconds(10))
                try await group.waitForAll()
            }
            #expect(stuck.connection.state.withLock { $0.cancels } == 1, "query cancelled on the server")
            #expect(stuck.connection.closeCount == 1)
            await pool.release(stuck)   // late release after the cut-off: harmless
            #expect(factory.made.allSatisfy { $0.closeCount == 1 })
            let again = await pool.drain(deadline: clock.now)
            #expect(again.cutOff.map(\.label) == ["stuck"], "drain is idempotent")
        }
    }

    /// On the real clock: stepping a manual clock races the timer task's re-arm after each failed
    /// connect, so this shell-level check runs in real time. Only lower bounds on time are
    /// asserted (CPU-heavy tests in the same process can hold the cooperative threads for
    /// seconds, which only makes gaps longer); the exact backoff schedule is checked on
    /// virtual time in the state-machine tests. It holds the test database's shared lock
    /// (without using the database) so that the CPU-heaviest tests, which take it
    /// exclusively, do not run beside it.
    @Test func connectFailuresBackOffAndTheWaiterLearnsTheError() async throws {
        try await TestDatabase.withDatabase { _ in try await checkConnectFailuresBackOff() }
    }

    private func checkConnectFailuresBackOff() async throws {
        let factory = MockFactory()
        factory.failNext(1_000)
        let configuration = baseConfiguration {
            $0.minIdle = 0
            $0.acquireTimeout = .milliseconds(1500)
            $0.connectBackoff = .init(initial: .milliseconds(10), maximum: .milliseconds(80), jitter: 0.2)
        }
        let pool = ConnectionPool<MockConnection, ContinuousClock>(
            configuration: configuration, clock: ContinuousClock(), logger: Logger(label: "test")
        ) { try factory.make() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await pool.run() }
            let e = await #expect(throws: ConnectionPoolError.self) { _ = try await pool.lease() }
            #expect(e?.code == .acquireTimeout)
            #expect(e?.description.contains("connection refused (mock)") == true, "the waiter is told the last connect error")
            // A patient waiter keeps the demand up until the pool has retried a few times.
            let waiter = Task { try await pool.lease(timeout: .seconds(60)) }
            let deadline = ContinuousClock.now + .seconds(60)
            while factory.state.withLock({ $0.attempts }) < 5 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            waiter.cancel()
            _ = try? await waiter.value
            _ = await pool.drain(deadline: .now)
            try await group.waitForAll()
        }
        let times = factory.state.withLock { $0.attemptTimes }
        #expect(times.count >= 5, "the pool retries failed connects: \(times.count) attempts")
        // Backoff: 10 ms doubling to 80 ms with 20 % jitter, so gap k is at least
        // 0.8 * min(10 ms * 2^k, 80 ms); without backoff the gaps would be microseconds.
        let gaps = zip(times, times.dropFirst()).map { $0.duration(to: $1) }
        for (k, gap) in gaps.prefix(4).enumerated() {
            let floor = Duration.milliseconds(10 * (1 << k)) * 0.8 - .milliseconds(1)
            #expect(gap >= floor, "gap \(k + 1) was \(gap), backoff floor \(floor)")
        }
    }

    /// HikariCP's spike against the real shell: connect 150 ms and queries 2 ms
    /// on a manual clock, minIdle 5, maxOpen 50, 50 requests at once.
    @Test func spikeAgainstTheShellEndsWithAtMostSixConnections() async throws {
        let work = ManualClock()
        let connectTime = Duration.milliseconds(150), queryTime = Duration.milliseconds(2)
        let configuration = ConnectionPoolConfiguration(
            name: "spike", maxOpen: 50, minIdle: 5, maxIdle: 50, maxLifetime: nil, maxIdleTime: nil,
            acquireTimeout: .seconds(30), leakThreshold: nil
        )
        let factory = MockFactory()
        let finished = SharedCounter()
        try await withRunningPool(configuration, factory: factory, connect: {
            try await work.sleep(until: work.now.advanced(by: connectTime), tolerance: nil)
            return try factory.make()
        }) { pool, _, _ in
            // Warm up to minIdle on the work clock.
            while true {
                await eventually("connects sleeping") {
                    let s = pool.statistics
                    return (s.opening > 0 && work.sleepers(ofLength: connectTime) == s.opening) || s.open >= 5
                }
                if pool.statistics.open >= 5 { break }
                work.advance(to: work.nextDeadline(lengths: [connectTime])!)
            }
            await eventually("warm") { pool.statistics.idle == 5 && pool.statistics.opening == 0 }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<50 {
                    group.addTask {
                        try await pool.withConnection { _ in
                            try await work.sleep(until: work.now.advanced(by: queryTime), tolerance: nil)
                        }
                        finished.increment()
                    }
                }
                var maxOpen = 0
                while finished.value < 50 {
                    // Quiescent: every request is waiting, querying or done; every connect is sleeping.
                    await eventually("quiescent") {
                        let s = pool.statistics
                        return finished.value + s.waiting + work.sleepers(ofLength: queryTime) == 50
                            && work.sleepers(ofLength: connectTime) == s.opening
                    }
                    maxOpen = max(maxOpen, pool.statistics.open + pool.statistics.opening)
                    guard let next = work.nextDeadline(lengths: [connectTime, queryTime]) else { break }
                    work.advance(to: next)
                }
                try await group.waitForAll()
                // Let the one extra connect land.
                while true {
                    await eventually("connect sleeping") { work.sleepers(ofLength: connectTime) == pool.statistics.opening }
                    guard let next = work.nextDeadline(lengths: [connectTime]) else { break }
                    work.advance(to: next)
                }
                #expect(maxOpen <= 6, "peak \(maxOpen)")
            }
            let s = pool.statistics
            #expect(s.open <= 6, "pool ended with \(s.open) connections")
            #expect(s.open >= 5)
            #expect(s.timeouts == 0)
        }
    }
}

@Suite("ConnectionPool on the continuous clock: durations meaning \"never\"")
struct ConnectionPoolLongDurationTests {
    @Test("acquireTimeout and drainTimeout of Int64.max seconds, a zero backoff: a waiter, its cancel and a drain run (no clock trap)")
    func hugeDurations() async throws {
        var configuration = ConnectionPoolConfiguration(maxOpen: 1, minIdle: 0, maxIdle: 1)
        configuration.acquireTimeout = .seconds(Int64.max)
        configuration.drainTimeout = .seconds(Int64.max)
        configuration.maxIdleTime = nil
        configuration.leakThreshold = nil
        configuration.maxLifetime = .seconds(Int64.max)
        configuration.connectBackoff = .init(initial: .zero, maximum: .zero, jitter: 0)
        #expect(configuration.normalized.acquireTimeout == ConnectionPoolConfiguration.longestWait)
        #expect(configuration.normalized.connectBackoff.initial == .milliseconds(1), "a zero backoff retries dead servers in a tight loop")
        let factory = MockFactory(clean: true)
        let pool = ConnectionPool<MockConnection, ContinuousClock>(configuration: configuration, clock: ContinuousClock()) { try factory.make() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await pool.run() }
            let held = try await pool.lease(label: "held")
            // Waits with the pool's "forever" timeout (the timer sleeps towards its deadline).
            // The waiter must really queue (an immediate POOL_ACQUIRE_TIMEOUT from an overflowing
            // deadline would also end it) and end by its cancellation, not by a timeout.
            let waiter = Task { try await pool.lease(label: "waiter") }
            await eventually("the waiter is queued") { pool.statistics.waiting == 1 }
            waiter.cancel()
            await #expect(throws: CancellationError.self) { _ = try await waiter.value }
            await eventually("the cancelled waiter left the queue") { pool.statistics.waiting == 0 }
            let perCall = Task { try await pool.lease(label: "per-call", timeout: .seconds(Int64.max)) }
            await eventually("the per-call waiter is queued") { pool.statistics.waiting == 1 }
            perCall.cancel()
            await #expect(throws: CancellationError.self) { _ = try await perCall.value }
            #expect(pool.statistics.timeouts == 0, "a huge timeout fired as a timeout")
            #expect(pool.statistics.cancelledWaits == 2)
            let releaser = Task {
                try await Task.sleep(for: .milliseconds(100))
                await pool.release(held)
            }
            let report = await pool.drain(deadline: ContinuousClock.now.advanced(by: .seconds(Int64.max)))
            try await releaser.value
            #expect(report.cutOff.isEmpty)
            #expect(pool.statistics.open == 0)
            group.cancelAll()
        }
    }
}
