import Synchronization
import Testing
@testable import PoolKit

/// A discrete-event simulation of the shell around the pure state machine:
/// virtual time, connects that take time (and may fail), holders that hold for
/// a while, cancellations, and a timer that behaves like the shell's (it
/// sleeps until `scheduleNextWakeup` and is woken early only on `rescheduleTimer`).
struct PoolSimulation {
    enum TaskState: Equatable { case pending, waiting, holding, done, timedOut, cancelled, rejected }
    enum Event {
        case arrive(Int)
        case release(Int)
        case cancel(Int)
        case connectDone(TestMachine.ConnectRequest, fail: Bool)
    }

    var d: MachineDriver
    var random: SplitMix64
    var queue: [(time: Duration, seq: Int, event: Event)] = []
    var seq = 0
    var tasks: [TaskState]
    var leases: [Int: TestMachine.Lease] = [:]
    var waiterIDs: [Int: UInt64] = [:]
    var deadlines: [Int: Duration] = [:]
    var timerWake: Duration?
    var closedIDs = Set<Int>()
    var maxTotalSeen = 0
    var steps = 0

    // Workload knobs.
    var connectTime: ClosedRange<Int> = 1...20   // ms
    var holdTime: ClosedRange<Int> = 0...30      // ms
    var connectFailureRate = 0.0
    var brokenRate = 0.0
    var cancelRate = 0.0
    var timeout: Duration = .seconds(5)

    init(configuration: ConnectionPoolConfiguration, tasks: Int, seed: UInt64) {
        d = MachineDriver(configuration, seed: seed)
        random = SplitMix64(seed: seed &* 31 &+ 7)
        self.tasks = Array(repeating: .pending, count: tasks)
    }

    mutating func schedule(_ event: Event, at time: Duration) {
        seq += 1
        queue.append((time, seq, event))
    }

    mutating func int(_ r: ClosedRange<Int>) -> Int { r.lowerBound + Int(random.next() % UInt64(r.count)) }
    mutating func chance(_ p: Double) -> Bool { random.fraction() < p }

    /// Applies what the shell would do with a set of actions.
    mutating func perform(_ a: TestMachine.Actions) {
        for c in a.connects {
            schedule(.connectDone(c, fail: chance(connectFailureRate)), at: d.now + .milliseconds(int(connectTime)))
        }
        for h in a.handoffs { handOver(h) }
        for (task, error) in a.failures {
            #expect(tasks[task] == .waiting, "only waiters fail")
            tasks[task] = error.code == .acquireTimeout ? .timedOut : .rejected
            if error.code == .acquireTimeout {
                #expect(d.now == deadlines[task], "a waiter times out exactly at its deadline")
            }
        }
        for c in a.closes { close(c.connection) }
        if a.rescheduleTimer { wakeTimer() }
    }

    mutating func close(_ c: FakeConnection) {
        #expect(!closedIDs.contains(c.id), "\(c) closed twice")
        closedIDs.insert(c.id)
        #expect(!leases.values.contains { $0.connection === c }, "\(c) closed while a task holds it")
    }

    mutating func handOver(_ h: TestMachine.Handoff) {
        let task = h.waiter
        #expect(tasks[task] == .waiting)
        #expect(!closedIDs.contains(h.lease.connection.id), "handed a closed connection")
        tasks[task] = .holding
        leases[task] = h.lease
        schedule(.release(task), at: d.now + .milliseconds(int(holdTime)))
    }

    mutating func wakeTimer() {
        // The shell's timer wakes, ticks and sleeps again.
        let a = d.machine.tick(now: d.now)
        perform(a)
        timerWake = d.machine.scheduleNextWakeup(now: d.now)
    }

    mutating func releaseResult(_ r: TestMachine.ReleaseResult) {
        switch r.action {
        case .none, .idled: break
        case .handoff(let h): handOver(h)
        case .actions(let a): perform(a)
        }
        if r.rescheduleTimer { wakeTimer() }
    }

    mutating func handle(_ event: Event) {
        switch event {
        case .arrive(let t):
            let request = TestMachine.Request(label: "task\(t)", fileID: "Sim.swift", line: t)
            switch d.machine.leaseImmediately(request: request, now: d.now) {
            case .leased(let l, let wake):
                tasks[t] = .holding
                leases[t] = l
                schedule(.release(t), at: d.now + .milliseconds(int(holdTime)))
                if wake { wakeTimer() }
            case .failed:
                tasks[t] = .rejected
            case .mustWait(let id):
                tasks[t] = .waiting
                waiterIDs[t] = id
                deadlines[t] = d.now + timeout
                switch d.machine.enqueue(waiterID: id, waiter: t, request: request, now: d.now, deadline: d.now + timeout) {
                case .leased(let l, let wake):
                    tasks[t] = .holding
                    leases[t] = l
                    schedule(.release(t), at: d.now + .milliseconds(int(holdTime)))
                    if wake { wakeTimer() }
                case .failed:
                    tasks[t] = .rejected
                case .enqueued(let a):
                    perform(a)
                    if chance(cancelRate) { schedule(.cancel(t), at: d.now + .milliseconds(int(0...60))) }
                }
            }
        case .release(let t):
            guard tasks[t] == .holding, let l = leases.removeValue(forKey: t) else { return }
            tasks[t] = .done
            let claimed172 = d.machine.beginRelease(slot: l.slot, leaseID: l.leaseID)
            #expect(claimed172)
            let claimed274 = d.machine.beginRelease(slot: l.slot, leaseID: l.leaseID)
            #expect(!claimed274, "double release must be refused")
            let r = d.machine.finishRelease(slot: l.slot, leaseID: l.leaseID, now: d.now, reusable: !chance(brokenRate))
            releaseResult(r)
        case .cancel(let t):
            switch tasks[t] {
            case .waiting:
                let w = d.machine.cancelWaiter(id: waiterIDs[t]!, now: d.now)
                #expect(w == t, "a waiting task is in the queue")
                tasks[t] = .cancelled
            case .holding:
                // Cancellation lost the race with a handoff: the shell gives the connection back.
                let l = leases.removeValue(forKey: t)!
                #expect(d.machine.cancelWaiter(id: waiterIDs[t]!, now: d.now) == nil)
                tasks[t] = .cancelled
                let claimed172 = d.machine.beginRelease(slot: l.slot, leaseID: l.leaseID)
                #expect(claimed172)
                releaseResult(d.machine.finishRelease(slot: l.slot, leaseID: l.leaseID, now: d.now, reusable: true))
            default:
                break
            }
        case .connectDone(let request, let fail):
            if fail {
                perform(d.machine.connectFailed(request, error: MockError.connectRefused, now: d.now))
            } else {
                perform(d.machine.connected(request, connection: d.makeConnection(), now: d.now))
            }
        }
    }

    /// Runs until no event is left (the timer alone does not keep it running once every task ended).
    mutating func run(until limit: Duration = .seconds(3600), check: (inout PoolSimulation) -> Void) {
        perform(d.machine.start(now: d.now))
        timerWake = d.machine.scheduleNextWakeup(now: d.now)
        while true {
            queue.sort { ($0.time, $0.seq) < ($1.time, $1.seq) }
            let nextEvent = queue.first?.time
            let allEnded = tasks.allSatisfy { $0 != .pending && $0 != .waiting && $0 != .holding }
            if nextEvent == nil && (allEnded || timerWake == nil) { break }
            if let wake = timerWake, nextEvent == nil || wake < nextEvent! {
                if allEnded && nextEvent == nil { break }
                d.now = max(d.now, wake)
                if d.now > limit { break }
                wakeTimer()
            } else {
                let e = queue.removeFirst()
                d.now = max(d.now, e.time)
                handle(e.event)
            }
            steps += 1
            if steps > 2_000_000 { Issue.record("simulation does not terminate"); break }
            maxTotalSeen = max(maxTotalSeen, d.machine.totalConnections)
            check(&self)
        }
    }

    /// Invariants that must hold after every step.
    func checkInvariants() {
        let s = d.machine.statistics()
        let c = d.machine.configuration
        #expect(s.open + s.opening <= c.maxOpen, "open \(s.open) + opening \(s.opening) > maxOpen \(c.maxOpen)")
        #expect(s.open == d.opened.count - closedIDs.count, "every open connection is accounted for")
        #expect(s.idle + s.inUse == s.open)
        #expect(s.inUse == leases.count, "in use == held by tasks")
        #expect(s.waiting == tasks.filter { $0 == .waiting }.count, "waiters == waiting tasks")
        let held = leases.values.map(\.connection.id)
        #expect(Set(held).count == held.count, "a connection is never lent twice")
        for (task, deadline) in deadlines where tasks[task] == .waiting {
            #expect(deadline >= d.now, "waiter \(task) is overdue")
        }
    }
}

@Suite("Pool stress and spike (deterministic)")
struct PoolStressTests {
    @Test(arguments: [UInt64(1), 2, 3, 42, 2024])
    func thousandTasksWithRandomHoldsCancellationsTimeoutsAndConnectFailures(seed: UInt64) {
        let configuration = ConnectionPoolConfiguration(
            name: "stress", maxOpen: 8, minIdle: 2, maxIdle: 6,
            maxLifetime: .milliseconds(800), lifetimeJitter: .milliseconds(200), maxIdleTime: .milliseconds(300),
            acquireTimeout: .milliseconds(40), maxWaiters: 150, maxConcurrentConnects: 3,
            connectBackoff: .init(initial: .milliseconds(5), maximum: .milliseconds(50), jitter: 0.3),
            leakThreshold: .milliseconds(25)
        )
        var sim = PoolSimulation(configuration: configuration, tasks: 1_000, seed: seed)
        sim.connectFailureRate = 0.2
        sim.brokenRate = 0.05
        sim.cancelRate = 0.15
        sim.timeout = .milliseconds(40)
        sim.holdTime = 0...30
        // Bursts of 40 every 400 ms (timeouts), a background trickle, and a quiet
        // gap at 2.0-2.6 s (idle-time expiry).
        for t in 0..<1_000 {
            let at: Int
            if t % 100 < 40 {
                at = (t / 100) * 400
            } else {
                let u = sim.int(0...3_400)
                at = u < 2_000 ? u : u + 600
            }
            sim.schedule(.arrive(t), at: .milliseconds(at))
        }
        sim.run { sim in sim.checkInvariants() }

        // Every task ended one way or another.
        #expect(sim.tasks.allSatisfy { [.done, .timedOut, .cancelled, .rejected].contains($0) })
        let s = sim.d.machine.statistics()
        #expect(s.waiting == 0 && s.inUse == 0)
        #expect(sim.maxTotalSeen <= configuration.maxOpen)
        // The run exercised what it claims to.
        #expect(s.timeouts > 0, "some acquires timed out")
        #expect(s.cancelledWaits > 0, "some waits were cancelled")
        #expect(s.connectFailures > 0, "some connects failed")
        #expect(s.closedBroken > 0 && s.closedLifetime > 0 && s.closedIdleTime > 0)
        #expect(s.leaksReported > 0)
        #expect(sim.tasks.filter { $0 == .done }.count > 500)
        // Drain: nothing leaks, every connection ever opened is closed exactly once.
        let start = sim.d.machine.beginDrain(now: sim.d.now)
        sim.perform(start.actions)
        let end = sim.d.machine.endDrain(now: sim.d.now)
        for (c, _) in end.cutOff { sim.close(c) }
        #expect(sim.closedIDs.count == sim.d.opened.count, "every connection closed")
        #expect(sim.d.machine.statistics().open == 0)
    }

    /// HikariCP's published spike: connect 150 ms, query 2 ms, minIdle 5,
    /// maxOpen 50, 50 requests at once. HikariCP ends with 5-6 connections,
    /// DBCP2 and Vibur with 45. The rule that wins is on `PoolStateMachine`.
    @Test(arguments: [2, 10, 50])
    func spikeOf50RequestsEndsWithAtMostSixConnections(maxConcurrentConnects: Int) {
        let configuration = ConnectionPoolConfiguration(
            name: "spike", maxOpen: 50, minIdle: 5, maxIdle: 50, maxLifetime: nil, maxIdleTime: nil,
            acquireTimeout: .seconds(30), maxConcurrentConnects: maxConcurrentConnects, leakThreshold: nil
        )
        var sim = PoolSimulation(configuration: configuration, tasks: 50, seed: 7)
        sim.connectTime = 150...150
        sim.holdTime = 2...2
        for t in 0..<50 { sim.schedule(.arrive(t), at: .seconds(1)) }
        sim.run { sim in sim.checkInvariants() }
        let s = sim.d.machine.statistics()
        #expect(sim.tasks.allSatisfy { $0 == .done })
        #expect(s.open <= 6, "pool ended with \(s.open) connections")
        #expect(sim.maxTotalSeen <= 6)
        #expect(s.open >= 5)
        #expect(s.timeouts == 0)
    }

    @Test func sustainedOverloadStillGrowsToMaxOpen() {
        let configuration = ConnectionPoolConfiguration(
            name: "grow", maxOpen: 20, minIdle: 2, maxLifetime: nil, maxIdleTime: nil,
            acquireTimeout: .seconds(60), maxConcurrentConnects: 4, leakThreshold: nil
        )
        var sim = PoolSimulation(configuration: configuration, tasks: 400, seed: 9)
        sim.connectTime = 10...10
        sim.holdTime = 500...500   // long transactions: returns cannot keep up
        sim.timeout = .seconds(60)
        for t in 0..<400 { sim.schedule(.arrive(t), at: .milliseconds(t)) }
        sim.run { sim in sim.checkInvariants() }
        #expect(sim.maxTotalSeen == 20)
        #expect(sim.tasks.allSatisfy { $0 == .done }, "\(Dictionary(grouping: sim.tasks, by: { $0 }).mapValues(\.count))")
    }
}

@Suite("Pool stress (real concurrency, shell)")
struct PoolShellStressTests {
    /// 300 tasks against the real shell on a manual clock that a driver task
    /// advances: random holds, cancellations, timeouts, broken connections and
    /// failing connects. Checks the limits while running and that nothing leaks.
    ///
    /// `clean`: connections that need no reset, whose returns go through the CPU-local cache
    /// (parked per CPU, lent without the shared lock, swept to waiters, flushed by the timer).
    /// With 300 workers making one attempt each, somebody nearly always waits (connections go
    /// to waiters); with 5 workers making 60 attempts each on 6 connections, they rarely do
    /// (connections go through the stripes).
    @Test(arguments: [(false, 300, 1), (true, 300, 1), (true, 5, 60)])
    func tasksAgainstTheShell(clean: Bool, workers: Int, rounds: Int) async throws {
        let attempts = workers * rounds
        let configuration = ConnectionPoolConfiguration(
            name: "shell-stress", maxOpen: 6, minIdle: 1, maxIdle: 4,
            maxLifetime: .milliseconds(200), lifetimeJitter: .milliseconds(50), maxIdleTime: .milliseconds(50),
            acquireTimeout: .milliseconds(30), maxWaiters: 100, maxConcurrentConnects: 2,
            connectBackoff: .init(initial: .milliseconds(1), maximum: .milliseconds(5), jitter: 0.5),
            leakThreshold: .milliseconds(20)
        )
        let factory = MockFactory(clean: clean)
        let connectRandom = Mutex(SplitMix64(seed: 99))
        let success = SharedCounter(), timeouts = SharedCounter(), cancelled = SharedCounter()
        let rejected = SharedCounter(), done = SharedCounter()
        let pool = try await withRunningPool(configuration, factory: factory, connect: {
            if connectRandom.withLock({ $0.fraction() < 0.15 }) { throw MockError.connectRefused }
            return try factory.make()
        }) { pool, clock, _ in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    while done.value < attempts {
                        for _ in 0..<20 { await Task.yield() }
                        let s = pool.statistics
                        #expect(s.open + s.opening <= configuration.maxOpen)
                        #expect(s.idle + s.inUse == s.open)
                        clock.advance(by: .milliseconds(1))
                    }
                }
                for i in 0..<workers {
                    group.addTask {
                        for round in 0..<rounds {
                            var random = SplitMix64(seed: UInt64(i) &+ 1 &+ UInt64(round) &* 1_000)
                            let holdYields = Int(random.next() % 20)
                            let cancelAfter: Int? = random.fraction() < 0.15 ? Int(random.next() % 30) : nil
                            let breakIt = random.fraction() < 0.05
                            await withTaskGroup(of: Void.self) { attempt in
                                attempt.addTask {
                                    do {
                                        try await pool.withConnection(label: "worker-\(i)") { connection in
                                            #expect(connection.closeCount == 0, "lent a closed connection")
                                            connection.enter()
                                            for _ in 0..<holdYields { await Task.yield() }
                                            connection.leave()
                                            if breakIt { connection.breakIt() }
                                        }
                                        success.increment()
                                    } catch let error as ConnectionPoolError {
                                        if error.code == .acquireTimeout { timeouts.increment() } else { rejected.increment() }
                                    } catch is CancellationError {
                                        cancelled.increment()
                                    } catch {
                                        Issue.record("unexpected error \(error)")
                                    }
                                }
                                if let cancelAfter {
                                    for _ in 0..<cancelAfter { await Task.yield() }
                                    attempt.cancelAll()
                                }
                            }
                            done.increment()
                        }
                    }
                }
                try await group.waitForAll()
            }
            #expect(success.value + timeouts.value + cancelled.value + rejected.value == attempts, "every attempt ended")
            #expect(success.value > 0)
            let s = pool.statistics
            #expect(s.inUse == 0 && s.waiting == 0)
            #expect(s.leases >= success.value, "every lend is counted, also those from the CPU-local cache")
            if clean && workers < configuration.maxOpen {
                let stripeLends = pool.stripes.stripes.reduce(UInt64(0)) { $0 + $1.state.withLock { $0.generation } }
                #expect(stripeLends > 0, "the CPU-local cache was used")
            }
        }
        // run() was cancelled: forced drain. Every connection ever made is closed exactly once,
        // and none was ever lent to two holders at once.
        let made = factory.made
        #expect(!made.isEmpty)
        for connection in made {
            #expect(connection.closeCount == 1, "\(connection) closed \(connection.closeCount) times")
            #expect(connection.maxHolders <= 1, "\(connection) lent twice at once")
        }
        #expect(pool.statistics.open == 0)
    }
}
