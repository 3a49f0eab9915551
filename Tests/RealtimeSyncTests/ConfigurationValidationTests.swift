import Testing
@testable import RealtimeSync
import PoolKit

@Suite("Configurations refuse out-of-range limits at start, naming the field")
struct ConfigurationValidationTests {
    @Test("ChangeStream.run() refuses a limit set out of range after init, before connecting")
    func changeStream() async throws {
        var configuration = ChangeStream.Configuration(connectionString: "postgres://nobody@127.0.0.1:1/none", slotName: "s", publicationName: "p")
        configuration.consumerBufferLimit = 0
        let stream = ChangeStream(configuration)
        // In a task of its own, stopped after a moment: a stream that went on to connect
        // would retry for ever.
        let running = Task { try await stream.run() }
        try await Task.sleep(for: .milliseconds(300))
        stream.stop()
        let result = await running.result
        guard case .failure(let error as ChangeStreamError) = result else {
            Issue.record("run() should have refused the configuration, got \(result)")
            return
        }
        #expect(error.code == .invalidConfiguration && error.message.contains("consumerBufferLimit is 0"), "\(error)")
        var window = ChangeStream.Configuration(connectionString: "x", slotName: "s", publicationName: "p")
        window.window.maxCount = 0
        #expect(throws: ChangeStreamError.self) { try window.validate() }
        #expect(throws: Never.self) { try ChangeStream.Configuration(connectionString: "x", slotName: "s", publicationName: "p").validate() }
        // A slot name PostgreSQL refuses fails here, before the publication is created.
        for name in ["MyApp", "my-app", String(repeating: "s", count: 64)] {
            #expect {
                try ChangeStream.Configuration(connectionString: "x", slotName: name, publicationName: "p").validate()
            } throws: { error in
                (error as? ChangeStreamError)?.message.contains("ChangeStream.Configuration.slotName '\(name)' is not a valid replication slot name") == true
            }
        }
        #expect(throws: Never.self) { try ChangeStream.Configuration(connectionString: "x", slotName: "my_app_2", publicationName: "p").validate() }
    }

    @Test("ChangeStreamSource: a resume from a stream that stops before its window opens ends the sequence (as ChangeSource asks), it does not throw stream_stopped")
    func sourceEndsWhenTheStreamStops() async throws {
        let stream = ChangeStream(.init(connectionString: "postgres://nobody@127.0.0.1:1/none", slotName: "s", publicationName: "p"))
        let source = ChangeStreamSource(stream: stream)
        let running = Task { try await stream.run() }
        let changes = try await source.changes(after: Cursor(commitLSN: LSN(0x1000), index: 0))
        let reading = Task { () throws -> Int in
            var count = 0
            for try await _ in changes { count += 1 }
            return count
        }
        // Stopped while it retries its connect (the address refuses; under a loaded full run
        // the first attempt has taken over 10 s to be scheduled).
        let deadline = ContinuousClock.now + .seconds(60)
        while stream.statistics.lastError == nil, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(stream.statistics.lastError != nil, "the stream never tried to connect")
        stream.stop()
        _ = await running.result
        let outcome = await reading.result
        #expect((try? outcome.get()) == 0, "the sequence threw: \(outcome)")
    }

    @Test("ChangeStreamSource: a stream that fails for good makes the sequence throw stream_failed with the cause, after what it delivered (a failure is not a stop: the fan-out logs it, a since catch-up answers internal)")
    func sourceThrowsWhenTheStreamFails() async throws {
        let stream = ChangeStream(.init(connectionString: "postgres://nobody@127.0.0.1:1/none", slotName: "s", publicationName: "p"))
        let source = ChangeStreamSource(stream: stream)
        let live = try await source.changes(after: nil)
        let resumed = try await source.changes(after: Cursor(commitLSN: LSN(0x1000), index: 0))
        // What ChangeStream.run() does when it fails for good (slot_lost, say).
        stream.hub.close(error: ChangeStreamError(.streamFailed, "the change stream for slot s failed: slot_lost: gone"))
        for changes in [live, resumed] {
            let error = await #expect(throws: ChangeStreamError.self) { for try await _ in changes {} }
            #expect(error?.code == .streamFailed && error?.message.contains("slot_lost") == true, "\(String(describing: error))")
        }
        // A plain stop ends both quietly, a cursor never served included.
        let stopped = ChangeStream(.init(connectionString: "postgres://nobody@127.0.0.1:1/none", slotName: "s", publicationName: "p"))
        let stoppedSource = ChangeStreamSource(stream: stopped)
        let quiet = [try await stoppedSource.changes(after: nil), try await stoppedSource.changes(after: Cursor(commitLSN: LSN(0x1000), index: 0))]
        stopped.hub.close(error: nil)
        for changes in quiet {
            var count = 0
            for try await _ in changes { count += 1 }
            #expect(count == 0)
        }
    }

    @Test("RealtimeServerConfiguration.validate() names the field", arguments: [
        "queueLimits.maxMessages is 0", "hubLimits.maxSubscriptionsPerClient is 0", "port is 70000", "snapshotChunkRows is 0",
        "pingInterval is 9.223372036854776e+18 seconds; it must be at most",
    ])
    func server(message: String) {
        var configuration = RealtimeServerConfiguration()
        #expect(throws: Never.self) { try configuration.validate() }
        switch message {
        case "queueLimits.maxMessages is 0": configuration.queueLimits.maxMessages = 0
        case "hubLimits.maxSubscriptionsPerClient is 0": configuration.hubLimits.maxSubscriptionsPerClient = 0
        case "port is 70000": configuration.port = 70_000
        case "pingInterval is 9.223372036854776e+18 seconds; it must be at most": configuration.pingInterval = .seconds(Int64.max)
        default: configuration.snapshotChunkRows = 0
        }
        #expect { try configuration.validate() } throws: { error in
            guard let e = error as? RealtimeServerError else { return false }
            return e.code == .invalidConfiguration && e.message.contains(message)
        }
    }

    @Test("ChangeStream.Configuration.validate() refuses a duration no clock can sleep (it names the field)")
    func changeStreamDurations() {
        var configuration = ChangeStream.Configuration(connectionString: "postgres://nobody@127.0.0.1:1/none", slotName: "s", publicationName: "p")
        #expect(throws: Never.self) { try configuration.validate() }
        configuration.reconnectMaxDelay = .seconds(Int64.max)
        #expect { try configuration.validate() } throws: { error in
            guard let e = error as? ChangeStreamError else { return false }
            return e.code == .invalidConfiguration && e.message.contains("reconnectMaxDelay") && e.message.contains("at most")
        }
    }
}
