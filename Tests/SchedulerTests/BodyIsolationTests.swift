import Testing

@testable import Scheduler

@MainActor
private final class MainActorCounter {
    var count = 0
}

@Sendable private func freeFunctionBody(_ context: JobContext<ManualClock.Instant>) async throws {}

/// The body type is `nonisolated(nonsending)`: it runs on the worker without
/// an executor hop on entry. Bodies written as an actor-isolated closure or as
/// a plain function must still be accepted and keep their isolation.
@Suite("Job bodies of every isolation")
struct BodyIsolationTests {
    @Test("a @MainActor closure body runs on the main actor; a free function is accepted")
    func isolatedBodies() async throws {
        try await withScheduler { scheduler, _ in
            let counter = MainActorCounter()
            try scheduler.schedule(.once(after: .seconds(1))) { @MainActor _ in
                MainActor.assertIsolated()
                counter.count += 1
            }
            try scheduler.schedule(.once(after: .seconds(1)), freeFunctionBody)
            await scheduler.advance(by: .seconds(2))
            #expect(await counter.count == 1)
            #expect(scheduler.statistics.runs == 2)
        }
    }
}
