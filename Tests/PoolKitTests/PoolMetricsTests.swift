import Logging
import MetricsTestKit
@testable import PoolKit
import Testing

@Suite("ConnectionPool metrics (OpenTelemetry names, an injected factory)")
struct PoolMetricsTests {
    @Test("count by state, pending requests, max, wait and use times, timeouts: as a holder and a waiter see them")
    func metrics() async throws {
        let metrics = TestMetrics()
        let factory = MockFactory(clean: true)
        var configuration = ConnectionPoolConfiguration(name: "metered", maxOpen: 1, acquireTimeout: .milliseconds(200))
        configuration.metricsFactory = metrics
        let pool = ConnectionPool<MockConnection, ContinuousClock>(
            configuration: configuration, clock: ContinuousClock(), logger: Logger(label: "test")
        ) { try factory.make() }
        let name = ("db.client.connection.pool.name", "metered")
        func gauge(_ label: String, _ dims: [(String, String)] = []) throws -> Double? {
            try metrics.expectGauge(label, [name] + dims).lastValue
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await pool.run() }
            #expect(try gauge("db.client.connection.max") == 1)
            // Its own timeout: the pool opens its first connection now (slow on a loaded machine).
            let held = try await pool.lease(label: "holder", timeout: .seconds(30))
            #expect(try gauge("db.client.connection.count", [("db.client.connection.state", "used")]) == 1)
            #expect(try gauge("db.client.connection.count", [("db.client.connection.state", "idle")]) == 0)
            // A second caller waits, then times out.
            let waiter = Task { try await pool.lease(label: "waiter") }
            try await pollUntil(seconds: 5) { (try? gauge("db.client.connection.pending_requests")) == 1 }
            #expect(try gauge("db.client.connection.pending_requests") == 1)
            let timedOut = await #expect(throws: ConnectionPoolError.self) { _ = try await waiter.value }
            #expect(timedOut?.description.contains("acquireTimeout=200ms") == true, "\(String(describing: timedOut))")
            let impatient = await #expect(throws: ConnectionPoolError.self) { _ = try await pool.lease(label: "impatient", timeout: .milliseconds(50)) }
            #expect(impatient?.description.contains("the call's timeout=50ms") == true, "\(String(describing: impatient))")
            #expect(try metrics.expectCounter("db.client.connection.timeouts", [name]).totalValue == 2)
            #expect(try gauge("db.client.connection.pending_requests") == 0)
            try await Task.sleep(for: .milliseconds(20))
            await pool.release(held)
            let use = try metrics.expectTimer("db.client.connection.use_time", [name]).values
            #expect(use.count == 1 && use[0] >= 200_000_000, "use time of the holder (held over 200 ms): \(use)")
            let waits = try metrics.expectTimer("db.client.connection.wait_time", [name]).values
            #expect(waits.count >= 1, "the holder's lease records its (zero) wait: \(waits)")
            // Returned into this CPU's stripe: the counts follow at the stripe's flush (100 ms).
            try await pollUntil(seconds: 5) { (try? gauge("db.client.connection.count", [("db.client.connection.state", "used")])) == 0 }
            #expect(try gauge("db.client.connection.count", [("db.client.connection.state", "used")]) == 0)
            #expect(try gauge("db.client.connection.count", [("db.client.connection.state", "idle")]) == 1)
            #expect(try metrics.expectTimer("db.client.connection.create_time", [name]).values.count == 1)
            _ = await pool.drain(deadline: .now)
            try await group.waitForAll()
        }
    }

    @Test("use time of a connection lent from a stripe: true to the clock, whichever clock times it")
    func stripeUseTime() async throws {
        let (metrics, configuration) = metered("timed") { $0.maxOpen = 1; $0.minIdle = 1 }
        let factory = MockFactory(clean: true)
        let pool = ConnectionPool<MockConnection, ContinuousClock>(
            configuration: configuration, clock: ContinuousClock(), logger: Logger(label: "test"), seed: 1, stripes: 1
        ) { try factory.make() }
        #if arch(x86_64)
        #expect((pool.counterScale != nil) == (TickClock.kernelClockSource() == "tsc"), "the CPU's counter exactly where the kernel keeps time by it")
        #else
        #expect(pool.counterScale == nil)
        #endif
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await pool.run() }
            try await pool.withConnection(timeout: .seconds(30)) { _ in }   // parked in the stripe on its return
            let leasing = ContinuousClock.now
            let lease = try await pool.lease(label: "timed")
            #expect(lease.lend != 0, "lent from the stripe")
            // The stripes' times (held times, leaks, lifetimes) agree with the pool's own clock:
            // the stripe's reading lies between two of the pool's (a pause between the reads
            // widens the window, it cannot fail the check), give or take the conversion's rounding.
            let before = pool.now(), stripe = pool.stripeNow(), after = pool.now()
            // 1 ms: the counter's offset to the pool's clock is calibrated from a bracketed
            // pair and refreshed while running, each within a loaded machine's scheduling noise.
            #expect(stripe >= before - .milliseconds(1) && stripe <= after + .milliseconds(1),
                    "stripe time \(stripe) outside the pool's \(before)...\(after)")
            try await Task.sleep(for: .milliseconds(50))
            await pool.release(lease)
            let heldAtMost = leasing.duration(to: .now)
            let use = try metrics.expectTimer("db.client.connection.use_time", [("db.client.connection.pool.name", "timed")]).values
            let timed = Duration.nanoseconds(use.last ?? -1)
            #expect(use.count == 2)
            #expect(timed >= .milliseconds(50) && timed <= heldAtMost + .milliseconds(1), "recorded \(timed), held at most \(heldAtMost)")
            _ = await pool.drain(deadline: .now)
            try await group.waitForAll()
        }
    }

    @Test("the CPU's counter: used only where the kernel keeps time by it, and then its rate matches CLOCK_MONOTONIC_RAW")
    func tickClockRate() async throws {
        guard let perTick = TickClock.nanosecondsPerTick else {
            #if arch(x86_64)
            #expect(TickClock.kernelClockSource() != "tsc", "calibration failed although the clock source is tsc")
            #endif
            print("tickClockRate: the kernel's clock source is \(TickClock.kernelClockSource() ?? "unknown"), not tsc: the pool does not use the counter, and its rate is not checked here")
            return
        }
        // One counter reading paired with the raw clock: bracketed by two clock reads, taken
        // again until they are close (a pause between unpaired reads would look like drift).
        func paired() throws -> (ticks: Int64, nanoseconds: Int64, window: Int64) {
            var best: (ticks: Int64, nanoseconds: Int64, window: Int64)?
            for _ in 0..<1_000 {
                let a = try #require(TickClock.rawNanoseconds()), t = TickClock.read(), b = try #require(TickClock.rawNanoseconds())
                if best == nil || b - a < best!.window { best = (t, a + (b - a) / 2, b - a) }
                if b - a < 10_000 { break }
            }
            return best!
        }
        let start = try paired()
        try await Task.sleep(for: .milliseconds(500))
        let end = try paired()
        let elapsedTicks = end.ticks - start.ticks, elapsed = end.nanoseconds - start.nanoseconds
        let error = abs(Double(elapsedTicks) * perTick - Double(elapsed)) / Double(elapsed)
        // 0.1 %: 500 µs over the 500 ms, against pairing windows of \(start.window) and \(end.window) ns.
        #expect(error < 0.001, "counter against CLOCK_MONOTONIC_RAW over \(elapsed) ns (pairing windows \(start.window), \(end.window) ns): relative error \(error)")
    }

    @Test("count gauges with the CPU-local cache: a connection lent from a stripe counts as used; a stripe flush publishes where each one is")
    func stripeLendsInGauges() async throws {
        let (metrics, configuration) = metered("striped") { $0.maxOpen = 2; $0.minIdle = 2 }
        let name = ("db.client.connection.pool.name", "striped")
        func count(_ state: String) throws -> Double? {
            try metrics.expectGauge("db.client.connection.count", [name, ("db.client.connection.state", state)]).lastValue
        }
        try await withRunningPool(configuration, factory: MockFactory(clean: true), stripes: 1) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 2 }
            try await pool.withConnection { _ in }   // parked in the stripe on its return
            let fromStripe = try await pool.lease(label: "from-the-stripe")
            #expect(fromStripe.lend != 0, "lent from the stripe")
            // A lease from the idle list publishes the counts: the stripe's lend is counted
            // used there. Before, the machine counted it idle: 1 used, 1 idle.
            let fromIdle = try await pool.lease(label: "from-the-idle-list")
            #expect(fromIdle.lend == 0)
            #expect(try count("used") == 2 && count("idle") == 0)
            // Parked in the stripe (its lent connection is out): a park publishes no counts, the
            // stripe flush publishes where each connection is.
            await pool.release(fromIdle)
            await pool.flushStripes(closing: false)
            #expect(try count("used") == 1 && count("idle") == 1)
            await pool.release(fromStripe)   // adopted by the flush: returned to the machine
            #expect(try count("used") == 0 && count("idle") == 2)
        }
    }

    @Test("a lease whose idle connection turns out broken is one wait_time sample: the wait for its replacement, not a zero for the discarded one as well",
          arguments: [true, false])
    func brokenIdleIsOneSample(striped: Bool) async throws {
        // (Striped, the task may land on another CPU between its release and its lease and reach
        // the connection through the waiters' sweep instead of the fast path; unstriped, the
        // fast path is certain.)
        let (metrics, configuration) = metered("idle-broken") { $0.maxOpen = 1; $0.minIdle = 1; $0.cpuLocalCache = striped }
        let name = ("db.client.connection.pool.name", "idle-broken")
        try await withRunningPool(configuration, factory: MockFactory(clean: true)) { pool, _, _ in
            await eventually("warm-up") { pool.statistics.idle == 1 }
            let first = try await pool.lease()
            await pool.release(first)   // idle again (in this CPU's slot when striped)
            first.connection.breakIt()
            let second = try await pool.lease()
            #expect(second.connection !== first.connection)
            await pool.release(second)
            let waits = try metrics.expectTimer("db.client.connection.wait_time", [name]).values
            #expect(waits.count == 2, "one sample per lease: \(waits)")
        }
    }

    @Test("a lease that waited past a discarded broken connection is one wait_time sample, of its whole wait (the discard's close between the legs included)")
    func oneWaitSamplePerLease() async throws {
        let (metrics, configuration) = metered("legs") { $0.maxOpen = 1; $0.minIdle = 0 }
        let name = ("db.client.connection.pool.name", "legs")
        let factory = MockFactory()
        let clock = ManualClock()
        try await withRunningPool(configuration, clock: clock, factory: factory, connect: {
            let made = try factory.make()
            if made.id == 2 {
                made.breakIt()   // the holder's replacement is broken from the start,
                made.state.withLock { $0.onClose = { clock.advance(by: .seconds(2)) } }   // and its close takes 2 s
            }
            return made
        }) { pool, clock, _ in
            let held = try await pool.lease(label: "holder")   // connection 1, opened for it
            held.connection.breakIt()
            let waiter = Task { try await pool.lease(label: "waiter") }
            await eventually("waiting") { pool.statistics.waiting == 1 }
            clock.advance(by: .milliseconds(30))
            // 1 is closed; 2 goes to the waiter, which discards it and waits at the front for 3.
            await pool.release(held)
            let lease = try await waiter.value
            #expect(lease.connection.id == 3, "the waiter's second leg")
            await pool.release(lease)
            let waits = try metrics.expectTimer("db.client.connection.wait_time", [name]).values
            #expect(waits.count == 2, "one sample per lease (the holder's, the waiter's), not per leg: \(waits)")
            #expect((waits.last ?? 0) >= 2_030_000_000, "the waiter's sample covers its first leg, and the discard between the legs, too: \(waits)")
            #expect(pool.statistics.waitCount == 2, "the holder waited for its connect, the waiter once for both legs")
        }
    }
}

/// A fresh `TestMetrics` and `baseConfiguration(edit)` named `name` that records into it.
private func metered(_ name: String, _ edit: (inout ConnectionPoolConfiguration) -> Void) -> (TestMetrics, ConnectionPoolConfiguration) {
    let metrics = TestMetrics()
    var configuration = baseConfiguration(edit)
    configuration.name = name
    configuration.metricsFactory = metrics
    return (metrics, configuration)
}
