@testable import RealtimeSync
import Synchronization
import Testing

@Suite("AsyncGate: the bound on concurrent snapshots")
struct AsyncGateTests {
    @Test("At most `permits` hold it; waiters get it in arrival order; a cancelled waiter leaves without a permit")
    func gate() async throws {
        let gate = AsyncGate(permits: 2)
        #expect(await gate.enter())
        #expect(await gate.enter())
        let order = OrderLog()
        let second = Task { () -> Bool in
            let got = await gate.enter()
            order.append(1)
            return got
        }
        #expect(await Self.poll { gate.counts.waiting == 1 })
        let third = Task { () -> Bool in
            let got = await gate.enter()
            order.append(2)
            return got
        }
        #expect(await Self.poll { gate.counts.waiting == 2 })
        let cancelled = Task { await gate.enter() }
        #expect(await Self.poll { gate.counts.waiting == 3 })
        cancelled.cancel()
        #expect(await cancelled.value == false)
        #expect(gate.counts.waiting == 2)
        #expect(gate.counts.free == 0)
        gate.leave()
        // The first permit goes to the longest waiter: check before giving the second one back,
        // so that a LIFO gate fails here instead of leaving `second` waiting for ever.
        #expect(await Self.poll { !order.values.isEmpty }, "the permit given back reached no waiter")
        try #require(order.values == [1], "the permit went to waiter \(order.values), not to the longest waiter")
        #expect(gate.counts.waiting == 1)
        #expect(await second.value)
        gate.leave()
        #expect(await third.value)
        #expect(order.values == [1, 2])
        gate.leave()
        gate.leave()
        #expect(gate.counts == (free: 2, waiting: 0))
    }

    final class OrderLog: Sendable {
        private let log = Mutex<[Int]>([])
        func append(_ value: Int) { log.withLock { $0.append(value) } }
        var values: [Int] { log.withLock { $0 } }
    }

    static func poll(_ condition: @Sendable () -> Bool) async -> Bool {
        for _ in 0..<1_000 {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return condition()
    }
}
