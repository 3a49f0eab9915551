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
            #expect(try gauge("db.client.connection.count", [("db.client.connection.state", "used")]) == 0)
            #expect(try metrics.expectTimer("db.client.connection.create_time", [name]).values.count == 1)
            _ = await pool.drain(deadline: .now)
            try await group.waitForAll()
        }
    }
}
