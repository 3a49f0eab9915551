import Logging
import Synchronization
import Testing
@testable import PoolKit

/// The pool's CPU-local cache (`cpuLocalCache`, on by default): a returned connection that
/// needs no reset is parked in the returning CPU's stripe and lent from there without the
/// pool's shared lock. These tests check that the pool's promises hold for such connections.
/// They run with one stripe, so that every caller meets it whatever CPU it runs on; a caller
/// "on another CPU" is played by `leaseWaiting`, the part of `lease` after the stripe and the
/// idle list.
@Suite("ConnectionPool CPU-local cache (shell, manual clock)")
struct CPULocalCacheTests {
    /// How many connections sit parked in a stripe right now.
    private func parked(_ pool: TestPool) -> Int {
        pool.stripes.stripes.reduce(0) { n, stripe in n + stripe.state.withLock { $0.parked == nil ? 0 : 1 } }
    }

    /// One connection (kept open), which lives exactly 60 s.
    private let oneConnectionOf60sLifetime = baseConfiguration {
        $0.maxOpen = 1; $0.minIdle = 1; $0.maxLifetime = .seconds(60); $0.lifetimeJitter = .zero
    }

    private func request(_ label: String) -> PoolMachine.Request {
        PoolMachine.Request(label: label, fileID: #fileID, line: #line)
    }

    /// A lease by a caller that meets no parked connection in its own stripe, failing the test
    /// (instead of hanging: the manual clock never times it out) if it is not served within 10 s.
    private func leaseFromAnotherCPU(_ pool: TestPool, _ label: String) async throws -> ConnectionLease<MockConnection> {
        let request = request(label)
        return try await withThrowingTaskGroup(of: ConnectionLease<MockConnection>?.self) { group in
            group.addTask { try await pool.leaseWaiting(request, timeout: nil) }
            group.addTask {
                try await Task.sleep(for: .seconds(10))
                return nil
            }
            let first = try await group.next()!
            group.cancelAll()
            guard let first else {
                Issue.record("'\(label)' was not served within 10 s")
                throw CancellationError()
            }
            return first
        }
    }

    @Test func aCleanReturnIsParkedAndLentAgainWithHolderAndCountsIntact() async throws {
        let factory = MockFactory(clean: true)
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }, factory: factory, stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection(label: "first") { _ in }
            #expect(parked(pool) == 1, "returned into this CPU's stripe")
            #expect(pool.statistics.idle == 1 && pool.statistics.inUse == 0 && pool.statistics.open == 1)
            let lease = try await pool.lease(label: "from-the-stripe")
            #expect(pool.statistics.inUse == 1 && pool.statistics.idle == 0)
            let holders = pool.holders()
            #expect(holders.map(\.label) == ["from-the-stripe"])
            #expect(holders.first?.fileID.hasSuffix("CPULocalCacheTests.swift") == true)
            await pool.release(lease)
            #expect(pool.statistics.inUse == 0 && pool.statistics.idle == 1)
            #expect(pool.holders().isEmpty)
            #expect(pool.statistics.leases == 2, "the stripe's lends are counted")
            #expect(factory.made.count == 1 && factory.made[0].state.withLock { $0.resets } == 0)
        }
    }

    @Test func aWaiterGetsAParkedConnectionAtOnceWithoutTheTimer() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }, factory: MockFactory(clean: true), stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            #expect(parked(pool) == 1)
            // A caller whose own stripe is empty (as on another CPU) finds no idle connection in the
            // shared state and queues; queuing sweeps the stripes. The clock never moves, so the
            // timer's flush cannot be what serves it.
            let lease = try await leaseFromAnotherCPU(pool, "other-cpu")
            #expect(parked(pool) == 0)
            #expect(pool.statistics.waitCount == 1 && pool.statistics.inUse == 1)
            #expect(pool.holders().map(\.label) == ["other-cpu"])
            await pool.release(lease)
            #expect(pool.statistics.inUse == 0 && pool.statistics.idle == 1)
        }
    }

    @Test func aWaiterServedFromAStripeOpensNoConnection() async throws {
        let configuration = baseConfiguration { $0.maxOpen = 10; $0.minIdle = 1; $0.maxIdle = 10 }
        let factory = MockFactory(clean: true)
        try await withRunningPool(configuration, factory: factory, stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            #expect(parked(pool) == 1)
            let lease = try await leaseFromAnotherCPU(pool, "other-cpu")
            // The growth rule opens one connection for a waiter nothing else can serve; this
            // one was served by the sweep, so nothing was opened for it.
            for _ in 0..<1_000 { await Task.yield() }
            #expect(pool.statistics.opening == 0 && pool.statistics.open == 1 && factory.made.count == 1)
            await pool.release(lease)
        }
    }

    @Test func maxIdleDoesNotCloseAReturnWhileTheParkedConnectionIsLentOut() async throws {
        let configuration = baseConfiguration { $0.maxOpen = 2; $0.minIdle = 1; $0.maxIdle = 1 }
        let factory = MockFactory(clean: true)
        try await withRunningPool(configuration, factory: factory, stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let a = try await pool.lease()
            let b = try await pool.lease()         // waits for a second connection
            await pool.release(a)                  // parked: the one idle connection maxIdle allows
            let x = try await pool.lease(label: "x")
            #expect(x.lend != 0 && x.connectionID == a.connectionID, "lent from the stripe")
            await pool.release(b)                  // nothing is idle: b must stay
            #expect(b.connection.closeCount == 0)
            #expect(pool.statistics.closedMaxIdle == 0)
            #expect(pool.statistics.idle == 1 && pool.statistics.inUse == 1)
            await pool.release(x)
        }
    }

    @Test func aParkedConnectionExpiringSoonAfterItsParkIsReplacedForAWaiterAtOnce() async throws {
        let factory = MockFactory(clean: true)
        try await withRunningPool(oneConnectionOf60sLifetime, factory: factory, stripes: 1) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            clock.advance(by: .milliseconds(59_990))
            try await pool.withConnection { _ in }   // parked 10 ms before its end of life
            #expect(parked(pool) == 1)
            clock.advance(by: .milliseconds(20))      // past its lifetime, before the periodic flush
            let lease = try await leaseFromAnotherCPU(pool, "waiter")
            #expect(lease.connectionID == 2, "a new connection: the expired one was closed at expiry")
            #expect(factory.made[0].closeCount == 1)
            await pool.release(lease)
        }
    }

    @Test func aLentConnectionReturnedWhileSomeoneWaitsGoesToTheWaiter() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }, factory: MockFactory(clean: true), stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            let held = try await pool.lease(label: "holder")
            #expect(held.lend != 0, "lent from the stripe")
            // With maxOpen 1, the waiter is served only if the return hands the connection over
            // (parked instead, it would sit in the stripe: `leaseFromAnotherCPU` fails after 10 s).
            async let waiter = leaseFromAnotherCPU(pool, "waiter")
            await eventually("waiting") { pool.statistics.waiting == 1 }
            await pool.release(held)
            let served = try await waiter
            #expect(parked(pool) == 0 && pool.statistics.inUse == 1)
            #expect(pool.holders().map(\.label) == ["waiter"], "the waiter holds it, as an ordinary lease")
            await pool.release(served)
            #expect(pool.statistics.waitCount == 1)
            #expect(pool.statistics.inUse == 0 && pool.statistics.waiting == 0)
        }
    }

    @Test func aConnectionLentFromAStripeIsReportedAsALeak() async throws {
        let configuration = baseConfiguration { $0.maxOpen = 1; $0.leakThreshold = .seconds(10) }
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            let lease = try await pool.lease(label: "forgotten")
            #expect(lease.lend != 0, "lent from the stripe")
            clock.advance(by: .seconds(11))
            await eventually("leak reported") { pool.statistics.leaksReported == 1 }
            #expect(pool.holders().map(\.label) == ["forgotten"])
            #expect(pool.holders().first?.heldFor == .seconds(11))
            await pool.release(lease)
            #expect(pool.statistics.inUse == 0 && pool.holders().isEmpty)
        }
    }

    @Test func aParkedConnectionPastItsLifetimeIsClosedAndReplaced() async throws {
        let factory = MockFactory(clean: true)
        try await withRunningPool(oneConnectionOf60sLifetime, factory: factory, stripes: 1) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            #expect(parked(pool) == 1)
            clock.advance(by: .seconds(61))
            await eventually("closed for lifetime") { pool.statistics.closedLifetime == 1 }
            await eventually("the close performed") { factory.made[0].closeCount == 1 }
            await eventually("replaced") { pool.statistics.idle == 1 && factory.made.count == 2 }
            let id = try await pool.withConnection { $0.id }
            #expect(id == 2, "never lent past its lifetime")
        }
    }

    @Test func acquiresFailOnceTheDrainIsCalledAlsoWhileItClosesAParkedConnection() async throws {
        // maxIdle 1: of two returned connections, one parks in the stripe and one idles; the
        // drain's flush finds the parked one surplus and closes it, slowly.
        let configuration = baseConfiguration { $0.maxOpen = 2; $0.minIdle = 0; $0.maxIdle = 1 }
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, clock, _ in
            let a = try await pool.lease(), b = try await pool.lease()
            await pool.release(a)
            await pool.release(b)
            #expect(parked(pool) == 1 && pool.statistics.idle == 2)
            a.connection.state.withLock { $0.closeDelay = .milliseconds(500) }
            b.connection.state.withLock { $0.closeDelay = .milliseconds(500) }
            let drain = Task { await pool.drain(deadline: clock.now) }
            try await pollUntil(seconds: 5) { pool.statistics.idle < 2 }
            try await Task.sleep(for: .milliseconds(50))
            let e = await #expect(throws: ConnectionPoolError.self, "an acquire after drain() was called must fail") {
                let lease = try await pool.lease(label: "after-drain")
                await pool.release(lease)
            }
            #expect(e?.code == .shutDown)
            let report = await drain.value
            #expect(report.cutOff.isEmpty)
            #expect(pool.statistics.open == 0)
        }
    }

    @Test func theDrainTakesParkedConnectionsAndCutsOffLentOnesByName() async throws {
        let configuration = baseConfiguration { $0.maxOpen = 3; $0.minIdle = 3; $0.maxIdle = 3 }
        // One lent from the stripe: cut off by name. (Nothing parks beside a lend: a stripe
        // lends one connection at a time, so the parked case is the second pool below.)
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, clock, factory in
            await eventually("warm-up") { pool.statistics.idle == 3 }
            let x = try await pool.lease()
            await pool.release(x)                          // parked
            let stuck = try await pool.lease(label: "stuck")
            #expect(stuck.lend != 0 && stuck.connectionID == x.connectionID, "lent from the stripe")
            let report = await pool.drain(deadline: clock.now)
            #expect(report.idleClosed == 2, "the two idle ones")
            #expect(report.cutOff.map(\.label) == ["stuck"])
            #expect(stuck.connection.state.withLock { $0.cancels } == 1)
            #expect(factory.made.count == 3 && factory.made.allSatisfy { $0.closeCount == 1 })
            #expect(parked(pool) == 0)
            await pool.release(stuck)   // after the cut-off: harmless
            #expect(pool.statistics.open == 0)
        }
        // One parked: closed with the idle ones.
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, clock, factory in
            await eventually("warm-up") { pool.statistics.idle == 3 }
            try await pool.withConnection { _ in }
            #expect(parked(pool) == 1)
            let report = await pool.drain(deadline: clock.now)
            #expect(report.idleClosed == 3, "the parked one and the two idle ones")
            #expect(report.cutOff.isEmpty)
            #expect(factory.made.count == 3 && factory.made.allSatisfy { $0.closeCount == 1 })
            #expect(parked(pool) == 0 && pool.statistics.open == 0)
        }
    }

    @Test func aStaleReleaseNeverEndsALaterLendOfTheSameConnection() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }, factory: MockFactory(clean: true), stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            let first = try await pool.lease(label: "first")
            await pool.flushStripes(closing: false)   // the timer's flush: the lend becomes an ordinary lease
            #expect(pool.holders().map(\.label) == ["first"])
            await pool.release(first)
            let second = try await pool.lease(label: "second")
            await pool.release(second)
            let third = try await pool.lease(label: "third")
            await pool.release(first)    // stale
            await pool.release(second)   // stale
            #expect(pool.statistics.inUse == 1)
            #expect(pool.holders().map(\.label) == ["third"])
            await pool.release(third)
            await pool.release(third)    // twice
            #expect(pool.statistics.inUse == 0)
            // The same stash lease lent twice: the first lend comes back (parked again), the
            // second is adopted by a flush; the first's stale release must not end the second.
            let a = try await pool.lease(label: "a")
            #expect(a.lend != 0, "lent from the stripe")
            await pool.release(a)
            let b = try await pool.lease(label: "b")
            #expect(b.lend != 0 && b.leaseID == a.leaseID, "the same stash lease, another lend")
            await pool.flushStripes(closing: false)
            await pool.release(a)        // stale
            #expect(pool.holders().map(\.label) == ["b"])
            await pool.release(b)
            #expect(pool.statistics.inUse == 0 && pool.statistics.idle == 1)
        }
    }

    @Test func aSecondReleaseOfALendNeverResetsTheNextHoldersConnection() async throws {
        let factory = MockFactory(clean: true)
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }, factory: factory, stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            let a = try await pool.lease(label: "a")
            #expect(a.lend != 0, "lent from the stripe")
            let connection = a.connection
            connection.state.withLock { $0.clean = false }   // a began a transaction
            await pool.release(a)
            #expect(connection.state.withLock { $0.resets } == 1)
            connection.state.withLock { $0.clean = true }
            let b = try await pool.lease(label: "b")
            #expect(b.connection === connection)
            connection.state.withLock { $0.clean = false }   // b is inside its own transaction
            await pool.release(a)   // a's release again (a defer and an explicit release)
            // Before, the second release reset (rolled back) b's connection, then found itself stale.
            #expect(connection.state.withLock { $0.resets } == 1, "b's transaction was rolled back by a's second release")
            #expect(pool.holders().map(\.label) == ["b"])
            await pool.release(b)
            #expect(connection.state.withLock { $0.resets } == 2)
            #expect(pool.statistics.inUse == 0 && pool.statistics.idle == 1)
            // The same, with the lend adopted by a flush before its release.
            connection.state.withLock { $0.clean = true }
            try await pool.withConnection { _ in }   // parked in the stripe again
            let c = try await pool.lease(label: "c")
            #expect(c.lend != 0, "lent from the stripe")
            connection.state.withLock { $0.clean = false }
            await pool.flushStripes(closing: false)
            await pool.release(c)
            await pool.release(c)
            #expect(connection.state.withLock { $0.resets } == 3)
            #expect(pool.statistics.inUse == 0 && pool.statistics.open == 1)
        }
    }

    @Test func withMaxWaitersZeroAConnectionParkedOnAnotherCPUIsLentNotRefused() async throws {
        // Two stripes on this machine's CPUs: the connection is parked in the stripe of the CPU
        // that returned it, and the next caller often runs on the other one. With maxWaiters 0
        // no waiter ever sweeps the stripes, so such a caller was refused with "too many
        // waiters" while the pool's only connection sat idle. (On a one-CPU machine both
        // stripes' callers meet the same one and the test cannot tell.)
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1; $0.maxWaiters = 0 }, factory: MockFactory(clean: true), stripes: 2) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            var refused = 0
            for _ in 0..<2_000 {
                let served = await Task.detached { (try? await pool.withConnection { _ in }) != nil }.value
                if !served { refused += 1 }
            }
            #expect(refused == 0, "\(refused) of 2,000 callers refused while the only connection was idle")
            #expect(pool.statistics.open == 1 && pool.statistics.inUse == 0)
        }
    }

    @Test func turnedOffNothingIsParked() async throws {
        let configuration = baseConfiguration { $0.cpuLocalCache = false }
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            #expect(pool.stripes.stripes.isEmpty && parked(pool) == 0)
            #expect(pool.statistics.idle == 1)
        }
    }

    // Audit, session 12: a connection returned through the machine was parked beside the one
    // lent from the same stripe, where it could not be lent until the next flush.
    @Test func aConnectionReturnedWhileTheStripeLendsAnotherIsLentAtOnce() async throws {
        let configuration = baseConfiguration { $0.maxOpen = 2; $0.minIdle = 2; $0.maxIdle = 2; $0.maxWaiters = 0 }
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 2 }
            let a = try await pool.lease(label: "a")
            let b = try await pool.lease(label: "b")
            await pool.release(a)
            #expect(parked(pool) == 1)
            let x = try await pool.lease(label: "x")
            #expect(x.lend != 0, "lent from the stripe")
            await pool.release(b)
            // Before: b sat in the stripe beside x's lend, and with `maxWaiters` 0 this was
            // refused ("0/2 in use") with b idle.
            let y = try await pool.lease(label: "y")
            #expect(y.connectionID == b.connectionID)
            #expect(pool.statistics.inUse == 2 && pool.statistics.idle == 0)
            await pool.release(x)
            await pool.release(y)
        }
    }

    @Test func aRefusalUnderMaxWaitersZeroCountsAStripeLendAndOpensAConnectionForTheDemand() async throws {
        let configuration = baseConfiguration { $0.maxOpen = 2; $0.minIdle = 1; $0.maxIdle = 2; $0.maxWaiters = 0 }
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, _, factory in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            let held = try await pool.lease(label: "held")
            #expect(held.lend != 0, "lent from the stripe")
            let refused = await #expect(throws: ConnectionPoolError.self) { _ = try await pool.lease(label: "refused") }
            #expect(refused?.code == .tooManyWaiters)
            // Before: "0/2 in use", the stripe's lend unknown to the machine.
            #expect(refused?.message.contains("1/2 in use") == true, "\(String(describing: refused))")
            // Before: the machine counted the lent connection idle and opened nothing for the
            // refused demand until a flush, which the manual clock never brings.
            await eventually("a connection opened for the refused caller") { factory.made.count == 2 && pool.statistics.idle == 1 }
            let next = try await pool.lease(label: "next")
            #expect(next.connectionID == 2)
            await pool.release(next)
            await pool.release(held)
        }
    }

    @Test func aTimeoutNamesTheHolderOfAConnectionLentFromTheStripe() async throws {
        try await withRunningPool(baseConfiguration { $0.maxOpen = 1 }, factory: MockFactory(clean: true), stripes: 1) { pool, clock, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            try await pool.withConnection { _ in }
            let held = try await pool.lease(label: "slow")
            #expect(held.lend != 0, "lent from the stripe")
            let late = Task { try await pool.lease(label: "late", timeout: .milliseconds(50)) }
            await eventually("queued") { pool.statistics.waiting == 1 }
            // Before the stripes' flush (100 ms): the holder was known only to its stripe.
            clock.advance(by: .milliseconds(50))
            let error = await #expect(throws: ConnectionPoolError.self) { _ = try await late.value }
            #expect(error?.code == .acquireTimeout)
            #expect(error?.message.contains("1/1 in use") == true, "\(String(describing: error))")
            #expect(error?.message.contains("'slow' at") == true, "\(String(describing: error))")
            await pool.release(held)
            #expect(pool.statistics.inUse == 0 && pool.holders().isEmpty)
        }
    }
}
