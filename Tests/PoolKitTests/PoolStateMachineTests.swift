import Testing
@testable import PoolKit

@Suite("PoolStateMachine")
struct PoolStateMachineTests {
    func config(_ edit: (inout ConnectionPoolConfiguration) -> Void = { _ in }) -> ConnectionPoolConfiguration {
        var c = ConnectionPoolConfiguration(
            name: "test", maxOpen: 4, minIdle: 0, maxIdle: 4, maxLifetime: nil, maxIdleTime: nil,
            acquireTimeout: .seconds(5), maxWaiters: 100, maxConcurrentConnects: 2, leakThreshold: nil
        )
        edit(&c)
        return c
    }

    @Test func zeroLifetimeIdleTimeAndLeakThresholdMeanOff() {
        var d = MachineDriver(config { $0.minIdle = 2; $0.maxLifetime = .zero; $0.maxIdleTime = .zero; $0.leakThreshold = .zero })
        d.warmUp()
        let held = d.lease()
        #expect(held != nil)
        d.now = .seconds(1)
        let tick = d.tick()
        // Taken literally: the idle one closed for its lifetime and reopened at once, the held
        // one reported as a leak, and the timer asked to wake again right away.
        #expect(tick.closes.isEmpty && tick.connects.isEmpty && tick.leaks.isEmpty)
        #expect(d.machine.scheduleNextWakeup(now: d.now) == nil)
        #expect(d.machine.configuration.maxLifetime == nil && d.machine.configuration.maxIdleTime == nil && d.machine.configuration.leakThreshold == nil)
    }

    @Test func minIdleWarmUpIsBoundedByMaxConcurrentConnects() {
        var d = MachineDriver(config { $0.minIdle = 3; $0.maxConcurrentConnects = 2 })
        let start = d.machine.start(now: .zero)
        #expect(start.connects.count == 2)
        #expect(d.machine.connectingCount == 2)
        let a = d.machine.connected(start.connects[0], connection: d.makeConnection(), now: .ms(10))
        #expect(a.connects.count == 1, "third warm-up connect starts when one finishes")
        d.complete([start.connects[1]] + a.connects)
        #expect(d.machine.statistics().open == 3)
        #expect(d.machine.idleCount == 3)
    }

    @Test func idleConnectionsAreReusedMostRecentlyUsedFirst() {
        var d = MachineDriver(config { $0.minIdle = 3 })
        d.warmUp()
        let a = d.lease()!, b = d.lease()!, c = d.lease()!
        _ = d.release(b)
        _ = d.release(a)
        _ = d.release(c)
        #expect(d.lease()!.connection === c.connection)
        #expect(d.lease()!.connection === a.connection)
        #expect(d.lease()!.connection === b.connection)
    }

    @Test func waitersAreServedFIFOByDirectHandoffAndNobodyJumpsTheQueue() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1 })
        d.warmUp()
        let held = d.lease()!
        guard case .enqueued = d.wait(1), case .enqueued = d.wait(2) else { Issue.record("should wait"); return }
        let r = d.release(held)
        guard case .handoff(let h) = r.action else { Issue.record("expected handoff, got \(r.action)"); return }
        #expect(h.waiter == 1)
        #expect(h.lease.connection === held.connection)
        // A newcomer must queue behind waiter 2 even though a release is about to happen.
        let newcomer = d.machine.leaseImmediately(request: .init(label: nil, fileID: "x", line: 1), now: d.now)
        guard case .mustWait = newcomer else { Issue.record("newcomer jumped the queue"); return }
        let r2 = d.release(h.lease)
        guard case .handoff(let h2) = r2.action else { Issue.record("expected handoff"); return }
        #expect(h2.waiter == 2)
    }

    @Test func maxOpenCountsConnectsInFlightAndIsNeverExceeded() {
        var d = MachineDriver(config { $0.maxOpen = 3; $0.maxConcurrentConnects = 10 })
        var connects: [TestMachine.ConnectRequest] = []
        for i in 0..<10 {
            if case .enqueued(let a) = d.wait(i) { connects += a.connects }
        }
        #expect(connects.count == 3, "cold pool: parallel connects, but never more than maxOpen")
        #expect(d.machine.totalConnections == 3)
        let a = d.complete(connects)
        #expect(a.handoffs.map(\.waiter) == [0, 1, 2])
        #expect(a.connects.isEmpty)
        #expect(d.machine.totalConnections == 3)
    }

    @Test func coldPoolConnectsAreBoundedByMaxConcurrentConnectsAndWaiters() {
        var d = MachineDriver(config { $0.maxOpen = 10; $0.maxConcurrentConnects = 3 })
        guard case .enqueued(let a1) = d.wait(1) else { Issue.record(); return }
        #expect(a1.connects.count == 1, "one waiter, one connect")
        var more = 0
        for i in 2...10 { if case .enqueued(let a) = d.wait(i) { more += a.connects.count } }
        #expect(more == 2, "then up to maxConcurrentConnects=3 in flight")
    }

    @Test func demandGrowthIsOneConnectAtATimeWhileConnectionsExist() {
        var d = MachineDriver(config { $0.maxOpen = 10; $0.minIdle = 2; $0.maxConcurrentConnects = 4 })
        d.warmUp()
        let l1 = d.lease()!, l2 = d.lease()!
        var connects: [TestMachine.ConnectRequest] = []
        for i in 0..<20 { if case .enqueued(let a) = d.wait(i) { connects += a.connects } }
        #expect(connects.count == 1, "a burst opens one connection, not one per waiter")
        // Sustained overload: when it completes and people still wait, the next one starts.
        let a = d.machine.connected(connects[0], connection: d.makeConnection(), now: .ms(150))
        #expect(a.handoffs.count == 1)
        #expect(a.connects.count == 1)
        _ = (l1, l2)
    }

    @Test func maxIdleOnReturnClosesLRU() {
        var d = MachineDriver(config { $0.minIdle = 0; $0.maxIdle = 1; $0.maxOpen = 3; $0.maxConcurrentConnects = 3 })
        var connects: [TestMachine.ConnectRequest] = []
        for i in 0..<2 { if case .enqueued(let a) = d.wait(i) { connects += a.connects } }
        let handoffs = d.complete(connects).handoffs
        #expect(handoffs.count == 2)
        _ = d.release(handoffs[0].lease)
        let r = d.release(handoffs[1].lease)
        guard case .actions(let a) = r.action else { Issue.record("expected a close"); return }
        #expect(a.closes.map(\.reason) == [.maxIdle])
        #expect(a.closes.first?.connection === handoffs[0].lease.connection, "least recently used goes")
        #expect(d.machine.idleCount == 1)
        #expect(d.lease()?.connection === handoffs[1].lease.connection)
    }

    @Test func maxIdleTimeClosesIdleConnectionsButNotBelowMinIdle() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 3; $0.maxIdleTime = .seconds(60); $0.maxConcurrentConnects = 3 })
        d.warmUp()
        let l = d.lease()!
        var connects: [TestMachine.ConnectRequest] = []
        for i in 0..<2 { if case .enqueued(let a) = d.wait(i) { connects += a.connects } }
        let hs = d.complete(connects).handoffs
        #expect(d.machine.statistics().open >= 2)
        d.now = .seconds(1)
        _ = d.release(l)
        for h in hs { _ = d.release(h.lease) }
        let open = d.machine.statistics().open
        #expect(d.machine.scheduleNextWakeup(now: d.now) == .seconds(61))
        d.now = .seconds(60)
        #expect(d.tick().closes.isEmpty, "not yet")
        d.now = .seconds(61)
        let a = d.tick()
        #expect(a.closes.allSatisfy { $0.reason == .idleTime })
        #expect(d.machine.statistics().open == 1, "down to minIdle, from \(open)")
        #expect(d.machine.statistics().closedIdleTime == open - 1)
        d.now = .seconds(1000)
        #expect(d.tick().closes.isEmpty, "minIdle connection stays")
    }

    @Test func lifetimeIsJitteredClosedWhenIdleAndReplacedWithoutBurst() {
        var d = MachineDriver(config {
            $0.minIdle = 4; $0.maxOpen = 4; $0.maxConcurrentConnects = 4
            $0.maxLifetime = .seconds(600); $0.lifetimeJitter = .seconds(60)
        }, seed: 42)
        d.warmUp()
        #expect(d.machine.idleCount == 4)
        // The first expiry is somewhere in (540s, 600s], not all at 600s.
        let first = d.machine.scheduleNextWakeup(now: d.now)!
        #expect(first > .seconds(540) && first <= .seconds(600))
        var closedAt: [Duration] = []
        var t = Duration.zero
        while closedAt.count < 4 {
            t = d.machine.scheduleNextWakeup(now: t)!
            d.now = t
            let a = d.tick()
            for c in a.closes {
                #expect(c.reason == .lifetime)
                closedAt.append(t)
            }
            #expect(a.connects.count == a.closes.count, "each expired connection is replaced one for one")
            d.complete(a.connects)
            #expect(d.machine.totalConnections <= 4)
        }
        #expect(Set(closedAt).count == 4, "expiries are spread by jitter, no wave: \(closedAt)")
        #expect(d.machine.statistics().closedLifetime == 4)
    }

    // Audit, session 12: idle connections were lent without a look at their lifetime, so a
    // lease that came before the timer's tick got an expired one.
    @Test func anExpiredIdleConnectionIsNeverLentEvenBeforeTheTick() {
        var d = MachineDriver(config { $0.maxOpen = 2; $0.minIdle = 1; $0.maxLifetime = .seconds(60); $0.lifetimeJitter = .zero })
        d.warmUp()                                   // #1, expires at 60 s
        d.now = .seconds(30)
        let first = d.lease()!
        guard case .enqueued(let actions) = d.wait(1) else { Issue.record("expected to wait"); return }
        let served = d.complete(actions.connects)    // #2, expires at 90 s, handed to the waiter
        let second = served.handoffs.first!.lease
        _ = d.release(second)
        _ = d.release(first)                         // #1 is now the most recently used idle one
        d.now = .seconds(61)
        let lease = d.lease()
        #expect(lease?.connectionID == second.connectionID, "the expired #1 was lent (or nothing): \(String(describing: lease))")
        _ = d.release(lease!)
        // Only expired ones left: nothing is lent, the caller waits for the tick's replacement.
        d.now = .seconds(91)
        #expect(d.lease() == nil)
        let tick = d.tick()
        #expect(tick.closes.map(\.reason) == [.lifetime, .lifetime])
    }

    @Test func aRefusalWhileOnlyExpiredIdleConnectionsRemainWakesTheTimerToReplaceThem() {
        var d = MachineDriver(config { $0.maxOpen = 1; $0.minIdle = 1; $0.maxWaiters = 0; $0.maxLifetime = .seconds(60); $0.lifetimeJitter = .zero })
        d.warmUp()
        d.now = .seconds(61)
        let r = d.machine.leaseImmediately(request: .init(label: nil, fileID: "T.swift", line: 1), now: d.now)
        guard case .mustWait(let id) = r else { Issue.record("the expired connection was lent: \(r)"); return }
        let e = d.machine.enqueue(waiterID: id, waiter: 1, request: .init(label: nil, fileID: "T.swift", line: 1), now: d.now, deadline: d.now + .seconds(5))
        guard case .failed(let error, let actions) = e else { Issue.record("expected a refusal: \(e)"); return }
        #expect(error.code == .tooManyWaiters)
        #expect(actions.rescheduleTimer, "the timer must replace the expired connection now, not at its next planned wake")
        let tick = d.tick()
        #expect(tick.closes.map(\.reason) == [.lifetime] && tick.connects.count == 1)
    }

    @Test func lifetimeExpiryWhileHeldClosesOnlyOnReturn() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxLifetime = .seconds(100); $0.lifetimeJitter = .zero })
        d.warmUp()
        let l = d.lease()!
        d.now = .seconds(150)
        let a = d.tick()
        #expect(a.closes.isEmpty, "never closed while held")
        #expect(d.machine.statistics().inUse == 1)
        let r = d.release(l)
        guard case .actions(let ra) = r.action else { Issue.record("expected close on return"); return }
        #expect(ra.closes.map(\.reason) == [.lifetime])
        #expect(ra.connects.count == 1, "replaced to keep minIdle")
    }

    @Test func acquireTimeoutWhileAConnectHangsSaysSoNotExhausted() throws {
        var d = MachineDriver(config { $0.minIdle = 0; $0.maxOpen = 20; $0.acquireTimeout = .seconds(5) })
        guard case .enqueued(let w) = d.wait(1, timeout: .seconds(5)) else { Issue.record(); return }
        #expect(w.connects.count == 1, "its connect starts and never finishes")
        d.now = .seconds(5)
        let failure = try #require(d.tick().failures.first)
        let message = failure.1.description
        #expect(!message.contains("exhausted"), "0 of 20 in use is not exhausted: \(message)")
        #expect(message.contains("1 connect still in progress, none finished") && message.contains("connect_timeout") && message.contains("0/20 in use"), "\(message)")
    }

    @Test func acquireTimeoutAfterAConnectWentToAnEarlierWaiterDoesNotBlameTheDatabase() throws {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 3; $0.acquireTimeout = .seconds(5) })
        d.warmUp()
        _ = d.lease("holder")
        // Two waiters; one demand connect at a time while connections exist.
        guard case .enqueued(let first) = d.wait(1, timeout: .seconds(60)) else { Issue.record(); return }
        #expect(first.connects.count == 1)
        d.now = .seconds(1)
        guard case .enqueued = d.wait(2, timeout: .seconds(5)) else { Issue.record(); return }
        // The connect finishes within the second waiter's wait, and goes to the first; the next
        // connect starts for the second, which times out while it runs.
        d.now = .seconds(2)
        let done = d.machine.connected(first.connects[0], connection: d.makeConnection(), now: d.now)
        #expect(done.handoffs.count == 1 && done.connects.count == 1)
        d.now = .seconds(6)
        let failure = try #require(d.tick().failures.first)
        let message = failure.1.description
        #expect(message.contains("1 connect still in progress; connects finish, but while it has connections the pool opens one at a time") && message.contains("2/3 in use") && message.contains("minIdle=1"), "\(message)")
        #expect(!message.contains("none finished") && !message.contains("slow to accept"), "a connect finished during the wait: \(message)")
    }

    @Test func acquireTimeoutFailsTheWaiterWithAnErrorNamingTheKnobsAndHolders() throws {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1; $0.acquireTimeout = .seconds(5) })
        d.warmUp()
        _ = d.machine.leaseImmediately(request: .init(label: "report-export", fileID: "Reports.swift", line: 42), now: .zero)
        d.now = .seconds(1)
        guard case .enqueued = d.wait(7, timeout: .seconds(5)) else { Issue.record(); return }
        #expect(d.machine.scheduleNextWakeup(now: d.now) == .seconds(6))
        d.now = .seconds(6) - .nanoseconds(1)
        #expect(d.tick().failures.isEmpty)
        d.now = .seconds(6)
        let a = d.tick()
        let failure = try #require(a.failures.first)
        #expect(failure.0 == 7)
        #expect(failure.1.code == .acquireTimeout)
        let message = failure.1.description
        #expect(message.contains("pool 'test' exhausted: 1/1 in use for 5s (maxOpen=1, acquireTimeout=5s)"))
        #expect(message.contains("'report-export' at Reports.swift:42 for 6s"))
        #expect(message.hasSuffix("[POOL_ACQUIRE_TIMEOUT]"))
        #expect(d.machine.statistics().timeouts == 1)
        #expect(d.machine.waiterCount == 0)
    }

    @Test func maxWaitersShedsLoadAtOnce() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1; $0.maxWaiters = 2 })
        d.warmUp()
        _ = d.lease()
        guard case .enqueued = d.wait(1), case .enqueued = d.wait(2) else { Issue.record(); return }
        guard case .failed(let e, _) = d.wait(3) else { Issue.record("third waiter should be refused"); return }
        #expect(e.code == .tooManyWaiters)
        #expect(e.message.contains("maxWaiters=2"))
        #expect(d.machine.statistics().rejected == 1)
    }

    @Test func waitStatisticsCountEveryWaitHoweverItEnds() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1 })
        d.warmUp()
        let held = d.lease()!
        guard case .enqueued = d.wait(1, timeout: .seconds(5)) else { Issue.record(); return }  // times out at 5 s
        let request = TestMachine.Request(label: nil, fileID: "x", line: 1)
        guard case .mustWait(let id2) = d.machine.leaseImmediately(request: request, now: d.now) else { Issue.record(); return }
        _ = d.machine.enqueue(waiterID: id2, waiter: 2, request: request, now: d.now, deadline: .seconds(30))
        d.now = .seconds(2)
        #expect(d.machine.cancelWaiter(id: id2, now: d.now) == 2)  // cancelled after 2 s
        d.now = .seconds(5)
        #expect(d.tick().failures.map(\.0) == [1])
        guard case .enqueued = d.wait(3, timeout: .seconds(30)) else { Issue.record(); return }
        d.now = .seconds(6)
        guard case .handoff(let h) = d.release(held).action, h.waiter == 3 else { Issue.record(); return }  // served after 1 s
        let stats = d.machine.statistics()
        #expect(stats.waitCount == 3)
        #expect(stats.totalWaitTime == .seconds(8))
        #expect(stats.timeouts == 1 && stats.cancelledWaits == 1)
    }

    @Test func maxWaitersZeroRefusesToWaitButStillOpensAConnection() throws {
        // maxWaiters 0: nobody may wait; an acquire with nothing idle fails at once. With
        // minIdle 0 the pool must still open a connection for that demand, or every acquire
        // fails forever.
        var d = MachineDriver(config { $0.minIdle = 0; $0.maxOpen = 2; $0.maxWaiters = 0 })
        guard case .failed(let e, let actions) = d.wait(1) else { Issue.record("an acquire with nothing idle must fail at once"); return }
        #expect(e.code == .tooManyWaiters)
        #expect(actions.connects.count == 1)
        _ = d.complete(actions.connects)
        #expect(d.lease() != nil, "the connection opened for the refused acquire serves the next one")
        // A second refusal while a connect is already running plans no more.
        var e2 = MachineDriver(config { $0.minIdle = 0; $0.maxOpen = 2; $0.maxWaiters = 0 })
        guard case .failed(_, let first) = e2.wait(1), case .failed(_, let second) = e2.wait(2) else { Issue.record(); return }
        #expect(first.connects.count == 1 && second.connects.isEmpty)
    }

    @Test func connectBackoffIsCappedExponentialWithJitterAndWaitersLearnTheError() throws {
        var d = MachineDriver(config {
            $0.maxOpen = 2; $0.maxConcurrentConnects = 1; $0.acquireTimeout = .seconds(30)
            $0.connectBackoff = .init(initial: .ms(100), maximum: .seconds(1), jitter: 0)
        })
        guard case .enqueued(var a) = d.wait(1) else { Issue.record(); return }
        var delays: [Duration] = []
        for _ in 0..<6 {
            let request = try #require(a.connects.first, "a connect must be due")
            let f = d.machine.connectFailed(request, error: MockError.connectRefused, now: d.now)
            #expect(f.connects.isEmpty, "no connect during backoff")
            let delay = try #require(f.backoff)
            delays.append(delay)
            d.now += delay - .nanoseconds(1)
            #expect(d.tick().connects.isEmpty)
            d.now += .nanoseconds(1)
            a = d.tick()
        }
        #expect(delays == [.ms(100), .ms(200), .ms(400), .ms(800), .seconds(1), .seconds(1)])
        d.now = .seconds(30)
        let t = d.tick()
        let err = try #require(t.failures.first?.1)
        #expect(err.description.contains("connects are failing (6 in a row; last: connection refused (mock))"))
        #expect(err.lastConnectError is MockError)
        // jitter shortens by at most the fraction
        var j = MachineDriver(config { $0.connectBackoff = .init(initial: .seconds(1), maximum: .seconds(1), jitter: 0.5) })
        guard case .enqueued(let ja) = j.wait(1) else { Issue.record(); return }
        let jd = try #require(j.machine.connectFailed(ja.connects[0], error: MockError.connectRefused, now: .zero).backoff)
        #expect(jd <= .seconds(1) && jd >= .ms(500))
    }

    @Test func successfulConnectResetsBackoffAndLastError() {
        var d = MachineDriver(config { $0.connectBackoff = .init(initial: .ms(100), maximum: .seconds(10), jitter: 0) })
        guard case .enqueued(let a) = d.wait(1) else { Issue.record(); return }
        let f = d.machine.connectFailed(a.connects[0], error: MockError.connectRefused, now: .zero)
        #expect(d.machine.lastConnectError != nil)
        #expect(f.connects.isEmpty)
        d.now = .ms(100)
        let t = d.tick()
        #expect(t.connects.count == 1)
        let c = d.complete(t.connects)
        #expect(c.handoffs.map(\.waiter) == [1])
        #expect(d.machine.lastConnectError == nil)
        #expect(d.machine.statistics().connectFailures == 1)
    }

    @Test func leakThresholdReportsOnceWithLabelAndLocation() throws {
        var d = MachineDriver(config { $0.minIdle = 1; $0.leakThreshold = .seconds(10) })
        d.warmUp()
        _ = d.machine.leaseImmediately(request: .init(label: "nightly-job", fileID: "Jobs/Nightly.swift", line: 7), now: .zero)
        #expect(d.machine.scheduleNextWakeup(now: .zero) == .seconds(10))
        d.now = .seconds(9)
        #expect(d.tick().leaks.isEmpty)
        d.now = .seconds(10)
        let leak = try #require(d.tick().leaks.first)
        #expect(leak.label == "nightly-job")
        #expect(leak.fileID == "Jobs/Nightly.swift" && leak.line == 7)
        #expect(leak.heldFor == .seconds(10))
        #expect(leak.description == "'nightly-job' at Jobs/Nightly.swift:7 for 10s (connection #1)")
        d.now = .seconds(100)
        #expect(d.tick().leaks.isEmpty, "reported once")
        #expect(d.machine.statistics().leaksReported == 1)
    }

    @Test func cancellationRemovesTheWaiterAndRacesWithHandoffSafely() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1 })
        d.warmUp()
        let held = d.lease()!
        let r1 = d.machine.leaseImmediately(request: .init(label: nil, fileID: "x", line: 1), now: .zero)
        guard case .mustWait(let id1) = r1 else { Issue.record(); return }
        _ = d.machine.enqueue(waiterID: id1, waiter: 1, request: .init(label: nil, fileID: "x", line: 1), now: .zero, deadline: .seconds(5))
        let r2 = d.machine.leaseImmediately(request: .init(label: nil, fileID: "x", line: 1), now: .zero)
        guard case .mustWait(let id2) = r2 else { Issue.record(); return }
        _ = d.machine.enqueue(waiterID: id2, waiter: 2, request: .init(label: nil, fileID: "x", line: 1), now: .zero, deadline: .seconds(5))

        // Cancellation before the handoff: the waiter leaves the queue.
        #expect(d.machine.cancelWaiter(id: id1, now: d.now) == 1)
        #expect(d.machine.cancelWaiter(id: id1, now: d.now) == nil, "cancelling twice is a no-op")
        // The handoff wins the race against waiter 2's cancellation...
        guard case .handoff(let h) = d.release(held).action else { Issue.record(); return }
        #expect(h.waiter == 2)
        // ...so its cancellation finds nothing to remove,
        #expect(d.machine.cancelWaiter(id: id2, now: d.now) == nil)
        // and the shell gives the unused connection back: it is idle again (or goes to the next waiter).
        guard case .idled = d.release(h.lease).action else { Issue.record("handed-over connection must go back"); return }
        #expect(d.machine.idleCount == 1)
        #expect(d.machine.statistics().cancelledWaits == 1)
    }

    @Test func brokenConnectionIsDiscardedAndReplacedForTheWaiter() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1 })
        d.warmUp()
        let held = d.lease()!
        guard case .enqueued = d.wait(1) else { Issue.record(); return }
        let r = d.release(held, reusable: false)
        guard case .actions(let a) = r.action else { Issue.record(); return }
        #expect(a.closes.map(\.reason) == [.broken])
        #expect(a.handoffs.isEmpty, "a broken connection is never handed over")
        #expect(a.connects.count == 1, "replacement for the waiter")
        let c = d.complete(a.connects)
        #expect(c.handoffs.map(\.waiter) == [1])
        #expect(c.handoffs[0].lease.connection !== held.connection)
        #expect(d.machine.statistics().closedBroken == 1)
    }

    @Test func requeuedWaiterKeepsItsPlaceAtTheFront() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1; $0.maxWaiters = 1 })
        d.warmUp()
        let held = d.lease()!
        guard case .enqueued = d.wait(2) else { Issue.record(); return }
        // waiter 1 got a broken connection and comes back: it goes in front, even past maxWaiters.
        let r = d.machine.enqueue(waiterID: 99, waiter: 1, request: .init(label: nil, fileID: "x", line: 1), now: .zero, deadline: .seconds(1), atFront: true)
        guard case .enqueued = r else { Issue.record("\(r)"); return }
        guard case .handoff(let h) = d.release(held).action else { Issue.record(); return }
        #expect(h.waiter == 1)
    }

    @Test func doubleReleaseIsHarmless() {
        var d = MachineDriver(config { $0.minIdle = 1 })
        d.warmUp()
        let l = d.lease()!
        _ = d.release(l)
        let other = d.lease()!
        #expect(other.connection === l.connection)
        let claimed231 = d.machine.beginRelease(slot: l.slot, leaseID: l.leaseID)
        #expect(!claimed231, "stale lease is ignored")
        guard case .none = d.machine.finishRelease(slot: l.slot, leaseID: l.leaseID, now: .zero, reusable: true).action else {
            Issue.record(); return
        }
        #expect(d.machine.statistics().inUse == 1)
    }

    @Test func drainFailsWaitersClosesIdleAwaitsHoldersThenCutsOff() throws {
        var d = MachineDriver(config { $0.minIdle = 3; $0.maxOpen = 3; $0.maxConcurrentConnects = 3 })
        d.warmUp()
        let a = d.lease("a")!, b = d.lease("b")!
        let c = d.lease("c")!
        guard case .enqueued = d.wait(1) else { Issue.record("waiter expected"); return }
        let start = d.machine.beginDrain(now: .seconds(1))
        #expect(start.waitersFailed == 1)
        #expect(start.actions.failures.map(\.0) == [1])
        #expect(start.actions.failures.allSatisfy { $0.1.code == .shutDown })
        #expect(!start.actions.drained)
        _ = d.release(c)
        // New acquires fail at once.
        guard case .failed(let e) = d.machine.leaseImmediately(request: .init(label: nil, fileID: "x", line: 1), now: .seconds(1)) else {
            Issue.record(); return
        }
        #expect(e.code == .shutDown)
        #expect(d.machine.beginDrain(now: .seconds(1)).alreadyStarted)
        // a comes back in time: closed, not reused.
        let ra = d.release(a)
        guard case .actions(let aa) = ra.action else { Issue.record(); return }
        #expect(aa.closes.map(\.reason) == [.drain])
        #expect(!aa.drained)
        // deadline: b is cut off.
        d.now = .seconds(11)
        let end = d.machine.endDrain(now: d.now)
        #expect(end.cutOff.count == 1)
        let cut = try #require(end.cutOff.first)
        #expect(cut.connection === b.connection)
        #expect(cut.holder.label == "b")
        #expect(cut.holder.heldFor == .seconds(11))
        #expect(end.returnedInTime == 2)
        // b's holder releases late: harmless.
        let claimed879 = d.machine.beginRelease(slot: b.slot, leaseID: b.leaseID)
        #expect(!claimed879)
        #expect(d.machine.statistics().open == 0)
        #expect(d.machine.scheduleNextWakeup(now: d.now) == nil)
    }

    @Test func drainOfAQuietPoolClosesIdleAndIsDoneAtOnce() {
        var d = MachineDriver(config { $0.minIdle = 3; $0.maxConcurrentConnects = 3 })
        d.warmUp()
        let start = d.machine.beginDrain(now: .zero)
        #expect(start.idleClosed == 3)
        #expect(start.actions.closes.count == 3 && start.actions.closes.allSatisfy { $0.reason == .drain })
        // Drained once the shell has closed all three, not when it is told to close them.
        #expect(!start.actions.drained)
        let closed = (0..<3).map { _ in d.machine.closeFinished() }
        #expect(closed == [false, false, true])
        #expect(d.machine.endDrain(now: .zero).cutOff.isEmpty)
    }

    @Test func drainCompletesWhenLastHolderReturnsAndClosesLateConnects() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 2 })
        d.warmUp()
        let l = d.lease()!
        guard case .enqueued(let w) = d.wait(1) else { Issue.record(); return }
        #expect(w.connects.count == 1)
        let start = d.machine.beginDrain(now: .zero)
        #expect(start.waitersFailed == 1)
        guard case .actions(let a) = d.release(l).action else { Issue.record(); return }
        #expect(!a.drained, "a connect is still in flight")
        let returnedClosed = d.machine.closeFinished()
        #expect(a.closes.count == 1 && !returnedClosed, "a connect is still in flight")
        let late = d.machine.connected(w.connects[0], connection: d.makeConnection(), now: .ms(5))
        #expect(late.closes.map(\.reason) == [.drain])
        #expect(!late.drained, "its close is still to be done")
        let lateClosed = d.machine.closeFinished()
        #expect(lateClosed)
        #expect(d.machine.statistics().open == 0)
    }

    @Test func aDrainWaitsForClosesDecidedBeforeTheLastReturn() {
        // Two holders: the first one's close is slow, the second's return ends the lending.
        var d = MachineDriver(config { $0.minIdle = 2; $0.maxOpen = 2; $0.maxConcurrentConnects = 2 })
        d.warmUp()
        let a = d.lease()!, b = d.lease()!
        let start = d.machine.beginDrain(now: .zero)
        #expect(!start.actions.drained)
        guard case .actions(let first) = d.release(a, reusable: false).action,
              case .actions(let last) = d.release(b, reusable: false).action else { Issue.record(); return }
        #expect(first.closes.count == 1 && last.closes.count == 1)
        #expect(!last.drained, "a's close is still running")
        let closed = [d.machine.closeFinished(), d.machine.closeFinished()]
        #expect(closed == [false, true], "drained only once both closes are done")
    }

    @Test func aSuccessfulConnectEndsTheBackoffAnotherConnectsFailureBegan() {
        // Two connects at once after a failover: one meets the server still starting, one succeeds.
        var d = MachineDriver(config {
            $0.minIdle = 0; $0.maxOpen = 4; $0.maxConcurrentConnects = 2
            $0.connectBackoff = .init(initial: .seconds(5), maximum: .seconds(10), jitter: 0)
        })
        guard case .enqueued(let a) = d.wait(1), case .enqueued(let b) = d.wait(2) else { Issue.record(); return }
        let requests = a.connects + b.connects
        #expect(requests.count == 2)
        d.now = .seconds(1)
        let failed = d.machine.connectFailed(requests[0], error: MockError.connectRefused, now: d.now)
        #expect(failed.backoff == .seconds(5))
        let served = d.machine.connected(requests[1], connection: d.makeConnection(), now: d.now)
        #expect(served.handoffs.map(\.waiter) == [1])
        // The server accepts connects: waiter 2 gets one of its own now, not in 5 s.
        #expect(served.connects.count == 1, "the backoff outlived a successful connect")
    }

    @Test func theDrainsOwnCancelledConnectsAreNotConnectFailures() {
        var d = MachineDriver(config { $0.minIdle = 0; $0.maxOpen = 2 })
        guard case .enqueued(let w) = d.wait(1) else { Issue.record(); return }
        #expect(w.connects.count == 1)
        _ = d.machine.beginDrain(now: .zero)
        let cancelled = d.machine.connectFailed(w.connects[0], error: CancellationError(), now: .ms(1))
        #expect(cancelled.drained)
        #expect(d.machine.statistics().connectFailures == 0)
        #expect(d.machine.lastConnectError == nil)
    }

    @Test func aBrokenConnectionReturnedDuringTheDrainIsCountedBroken() {
        var d = MachineDriver(config { $0.minIdle = 1; $0.maxOpen = 1 })
        d.warmUp()
        let l = d.lease()!
        _ = d.machine.beginDrain(now: .zero)
        guard d.machine.beginRelease(slot: l.slot, leaseID: l.leaseID) else { Issue.record(); return }
        guard case .actions(let a) = d.machine.finishRelease(slot: l.slot, leaseID: l.leaseID, now: .ms(1), reusable: false).action else {
            Issue.record(); return
        }
        #expect(a.closes.map(\.reason) == [.broken])
        let closed = d.machine.closeFinished()
        #expect(!a.drained && closed)
        #expect(d.machine.statistics().closedBroken == 1 && d.machine.statistics().closedByDrain == 0)
    }

    @Test func timerWakeupNeverRequiresAWakeOnTheHotPath() {
        var d = MachineDriver(config { $0.minIdle = 2; $0.leakThreshold = .seconds(60); $0.maxIdleTime = .seconds(600) })
        d.warmUp()
        _ = d.machine.scheduleNextWakeup(now: .zero)
        for i in 1...100 {
            d.now = .ms(i)
            guard case .leased(let l, let wake) = d.machine.leaseImmediately(request: .init(label: nil, fileID: "x", line: 1), now: d.now) else {
                Issue.record(); return
            }
            #expect(!wake)
            #expect(!d.release(l).rescheduleTimer)
        }
    }

    @Test func statisticsAndHoldersDescribeThePool() {
        var d = MachineDriver(config { $0.minIdle = 2 })
        d.warmUp()
        _ = d.machine.leaseImmediately(request: .init(label: "x", fileID: "A.swift", line: 3), now: .seconds(1))
        let s = d.machine.statistics()
        #expect(s.open == 2 && s.idle == 1 && s.inUse == 1 && s.leases == 1 && s.connectsSucceeded == 2)
        let h = d.machine.holders(now: .seconds(4))
        #expect(h.count == 1)
        #expect(h.first?.heldFor == .seconds(3))
        #expect(h.first?.label == "x")
    }
}
