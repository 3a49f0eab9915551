import Testing
@testable import Scheduler

@Suite("ManualClock")
struct ManualClockTests {
    @Test("a sleep cancelled just after advance woke it leaves nothing behind in the clock (long test runs cancel thousands)")
    func cancelAfterWakeLeavesNothing() async throws {
        let clock = ManualClock()
        for _ in 0..<200 {
            let sleeping = Task { try await clock.sleep(for: .seconds(1)) }
            while clock.sleeperCount == 0 { await Task.yield() }
            clock.advance(by: .seconds(1))
            sleeping.cancel()   // most often before the woken task runs again: no sleeper left to find
            _ = await sleeping.result
        }
        #expect(clock.notedCancellations == 0)
    }
}
