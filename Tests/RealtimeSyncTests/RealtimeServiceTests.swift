import Foundation
import Logging
import PoolKit
@testable import RealtimeSync
import ServiceLifecycle
import Synchronization
import Testing
import TestSupport

@Suite("RealtimeService: the composition root end to end")
struct RealtimeServiceTests {
    /// Runs a service whose capture cannot start: another session's transaction holds
    /// CREATE_REPLICATION_SLOT. Returns how long `run()` took and what it threw.
    private func runBlockedStart(shutdownAfter: Duration?, _ configure: @Sendable (inout RealtimeService.Configuration) -> Void) async throws -> (Duration, (any Error)?) {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let holder = try await PostgresConnection.connect(to: url)
            _ = try await holder.execute("BEGIN")
            _ = try await holder.query("SELECT txid_current()")
            let slot = uniqueCaptureName("svc_blocked")
            let quiet = Logger(label: "test.service") { _ in SwiftLogNoOpLogHandler() }
            var configuration = RealtimeService.Configuration(
                databaseURL: url, tables: [table], publication: slot + "_pub", slot: slot,
                server: RealtimeServerConfiguration(host: "127.0.0.1", port: 0, logger: quiet), logger: quiet)
            configure(&configuration)
            let service = RealtimeService(configuration)
            let group = ServiceGroup(configuration: .init(services: [service], logger: quiet))
            let started = ContinuousClock.now
            var failure: (any Error)?
            await withTaskGroup(of: Void.self) { tasks in
                // The test's own bound: the holder's transaction ends after 40 s whatever happens.
                tasks.addTask {
                    try? await Task.sleep(for: .seconds(40))
                    _ = try? await holder.execute("ROLLBACK")
                }
                if let shutdownAfter {
                    tasks.addTask {
                        try? await Task.sleep(for: shutdownAfter)
                        await group.triggerGracefulShutdown()
                    }
                }
                do { try await group.run() } catch { failure = error }
                tasks.cancelAll()
            }
            let took = started.duration(to: .now)
            _ = try? await holder.execute("ROLLBACK")
            await holder.close()
            await dropCapture(url: url, slot: slot, publication: slot + "_pub")
            return (took, failure)
        }
    }

    @Test("A start that fails while the slot's creation waits for another transaction ends within its deadlines, not when that transaction ends")
    func failedStartIsBounded() async throws {
        let (took, failure) = try await runBlockedStart(shutdownAfter: nil) {
            $0.startTimeout = .seconds(1)
            $0.captureShutdownDeadline = .seconds(1)
        }
        #expect(failure != nil, "the start fails (startTimeout)")
        #expect(took < .seconds(15), "took \(took)")
    }

    @Test("A second instance on a slot the first one streams from fails its start after startTimeout, saying another process holds the slot and naming the settings to change")
    func slotHeldByAnotherInstance() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table]) { first, _, _ in
                var configuration = RealtimeService.Configuration(
                    databaseURL: url, tables: [table], publication: first.configuration.publication, slot: first.configuration.slot,
                    server: RealtimeServerConfiguration(host: "127.0.0.1", port: 0), logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
                configuration.startTimeout = .seconds(2)
                configuration.captureShutdownDeadline = .seconds(1)
                do {
                    try await RealtimeService(configuration).run()
                    Issue.record("a second instance started on a slot in use")
                } catch {
                    let text = "\(error)"
                    #expect(text.contains("SERVICE_CAPTURE_NOT_READY") && text.contains("startTimeout, --start-timeout"), "\(text)")
                    #expect(text.contains("another process streams from slot \(first.configuration.slot)"), "\(text)")
                    #expect(text.contains("--slot"), "\(text)")
                }
            }
        }
    }

    @Test("A graceful shutdown (SIGTERM) while the service starts ends the start, without an error")
    func shutdownWhileStarting() async throws {
        let (took, failure) = try await runBlockedStart(shutdownAfter: .seconds(1)) {
            $0.startTimeout = .seconds(60)
            $0.captureShutdownDeadline = .seconds(1)
        }
        #expect(failure == nil, "\(String(describing: failure))")
        #expect(took < .seconds(15), "took \(took)")
    }

    @Test("Settings are checked before anything starts: pool.maxOpen 1 and an invalid server setting are refused at once, naming them")
    func settingsCheckedFirst() async throws {
        // No database listens on port 1: a check made after connecting would fail there instead.
        var one = RealtimeService.Configuration(databaseURL: "postgres://unused@127.0.0.1:1/x")
        one.pool.maxOpen = 1
        do {
            let service = RealtimeService(one)
            try await withTimeout(20, "run") { try await service.run() }
            Issue.record("pool.maxOpen 1 must be refused")
        } catch let error as RealtimeServiceError {
            #expect(error.code == .invalidSetting, "\(error)")
            #expect(error.message.contains("--pool-max-open"), "\(error)")
        }
        var zero = RealtimeService.Configuration(databaseURL: "postgres://unused@127.0.0.1:1/x")
        zero.server.closeTimeout = .zero
        do {
            let service = RealtimeService(zero)
            try await withTimeout(20, "run") { try await service.run() }
            Issue.record("closeTimeout 0 must be refused")
        } catch {
            #expect("\(error)".contains("closeTimeout"), "\(error)")
        }
        let transactionLimits: [(String, String, @Sendable (inout RealtimeService.Configuration) -> Void)] = [
            ("maxTransactionChanges", "--max-transaction-changes", { $0.maxTransactionChanges = 0 }),
            ("maxTransactionBytes", "--max-transaction-bytes", { $0.maxTransactionBytes = 0 }),
        ]
        for (knob, flag, zero) in transactionLimits {
            var none = RealtimeService.Configuration(databaseURL: "postgres://unused@127.0.0.1:1/x")
            zero(&none)
            do {
                let service = RealtimeService(none)
                try await withTimeout(20, "run") { try await service.run() }
                Issue.record("\(knob) 0 must be refused")
            } catch let error as RealtimeServiceError {
                #expect(error.code == .invalidSetting && error.message.contains(knob) && error.message.contains(flag), "\(error)")
            }
        }
    }

    @Test("A capture that fails for good while serving (its publication dropped) shuts the server down and run() throws captureFailed")
    func captureFailureEndsTheService() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let slot = uniqueCaptureName("svc_fail")
            let quiet = Logger(label: "test.service") { _ in SwiftLogNoOpLogHandler() }
            let configuration = RealtimeService.Configuration(
                databaseURL: url, tables: [table], publication: slot + "_pub", slot: slot,
                server: RealtimeServerConfiguration(host: "127.0.0.1", port: 0, logger: quiet), logger: quiet)
            let service = RealtimeService(configuration)
            let group = ServiceGroup(configuration: .init(services: [service], logger: quiet))
            var failure: (any Error)?
            await withTaskGroup(of: Void.self) { tasks in
                tasks.addTask {
                    do {
                        let running = try await withTimeout(60, "service start") { try await service.waitUntilRunning() }
                        try await runSQL(url, "DROP PUBLICATION \(slot)_pub")
                        try await runSQL(url, "INSERT INTO \(table) (status) VALUES ('after the drop')")
                        _ = running
                    } catch where !Task.isCancelled {
                        Issue.record("setup: \(error)")
                    } catch {
                        return  // the service ended (as it should) while the insert ran
                    }
                    // The test's own bound: a service that never stops is shut down after 60 s.
                    try? await Task.sleep(for: .seconds(60))
                    await group.triggerGracefulShutdown()
                }
                do { try await group.run() } catch { failure = error }
                tasks.cancelAll()
            }
            await dropCapture(url: url, slot: slot, publication: slot + "_pub")
            let error = try #require(failure as? RealtimeServiceError, "\(String(describing: failure))")
            #expect(error.code == .captureFailed, "\(error)")
            // What the process prints on exit (OPERATIONS.md: searchable by its code).
            #expect("\(error)".hasPrefix("SERVICE_CAPTURE_FAILED: "), "\(error)")
        }
    }

    @Test("A capture that fails for good while the server shuts down (a job still running) makes run() throw captureFailed, not return as if every change was read")
    func captureFailureDuringShutdown() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let slot = uniqueCaptureName("svc_fail_late")
            let demo = "public." + uniqueCaptureName("svc_demo")
            let quiet = Logger(label: "test.service") { _ in SwiftLogNoOpLogHandler() }
            var configuration = RealtimeService.Configuration(
                databaseURL: url, tables: [table], publication: slot + "_pub", slot: slot,
                server: RealtimeServerConfiguration(host: "127.0.0.1", port: 0, logger: quiet), logger: quiet)
            configuration.demo = .init(table: demo, writeInterval: .milliseconds(100))
            configuration.jobsShutdownDeadline = .seconds(10)
            let service = RealtimeService(configuration)
            let group = ServiceGroup(configuration: .init(services: [service], logger: quiet))
            var failure: (any Error)?
            let ranAfter = OneShot()
            await withTaskGroup(of: Void.self) { tasks in
                tasks.addTask {
                    do {
                        let running = try await withTimeout(60, "service start") { try await service.waitUntilRunning() }
                        // The demo writer blocks on this lock, so the shutdown's job step waits for it.
                        let locker = try await PostgresConnection.connect(to: url)
                        _ = try await locker.execute("BEGIN; LOCK TABLE \(demo) IN ACCESS EXCLUSIVE MODE")
                        let probe = try await PostgresConnection.connect(to: url)
                        #expect(try await waitForLockWaiter(probe, table: demo), "the demo writer waits for the lock")
                        await group.triggerGracefulShutdown()
                        while !running.server.isDraining { try await Task.sleep(for: .milliseconds(10)) }
                        // The server is draining, the capture still runs: it now fails for good.
                        _ = try await probe.execute("DROP PUBLICATION \(slot)_pub")
                        _ = try await probe.execute("INSERT INTO \(table) (status) VALUES ('after the drop')")
                        try await Task.sleep(for: .milliseconds(500))
                        if running.server.isDraining { ranAfter.signal() }
                        _ = try await locker.execute("ROLLBACK")
                        await locker.close()
                        await probe.close()
                    } catch {
                        Issue.record("setup: \(error)")
                    }
                }
                do { try await group.run() } catch { failure = error }
                await tasks.waitForAll()
            }
            await dropCapture(url: url, slot: slot, publication: slot + "_pub")
            try? await runSQL(url, "DROP TABLE IF EXISTS \(demo)")
            #expect(ranAfter.isSignalled, "the shutdown was still in its job step when the capture failed")
            let error = try #require(failure as? RealtimeServiceError, "run() returned normally: \(String(describing: failure))")
            #expect(error.code == .captureFailed, "\(error)")
        }
    }

    @Test("A row inserted in Postgres reaches a subscribed WebSocket client as a change; GET / serves the live page")
    func insertReachesClient() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table]) { _, running, _ in
                let page = try await TestConnection.open(port: running.port)
                let response = try await page.request("GET", "/")
                #expect(response.status == 200)
                #expect(response.body.contains("new WebSocket"))
                #expect(response.body.contains("since"))
                await page.close()

                let client = try await connectWebSocket(port: running.port)
                try await client.subscribe("s1", table: table, filter: "status=eq.paid")
                let sql = try await PostgresConnection.connect(to: url)
                _ = try await sql.execute("INSERT INTO \(table) (status) VALUES ('open'); INSERT INTO \(table) (status) VALUES ('paid')")
                let change = try await client.receiveJSON(timeout: 15)
                #expect(change["type"] as? String == "change")
                #expect(change["op"] as? String == "INSERT")
                #expect(change["table"] as? String == table)
                #expect(change["ids"] as? [String] == ["s1"])
                #expect((change["new"] as? [String: Any])?["status"] as? String == "paid")
                await sql.close()
                await client.close()
            }
        }
    }

    @Test("ALTER TABLE … RENAME COLUMN in Postgres ends the subscription whose filter names the column with invalid_filter; an unfiltered one goes on")
    func columnRenameEndsFilteredSubscription() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table]) { _, running, _ in
                let client = try await connectWebSocket(port: running.port)
                try await client.subscribe("paid", table: table, filter: "status=eq.paid")
                try await client.subscribe("all", table: table)
                let sql = try await PostgresConnection.connect(to: url)
                _ = try await sql.execute("INSERT INTO \(table) (status) VALUES ('paid')")
                #expect(try await client.receiveJSON(timeout: 15)["ids"] as? [String] == ["paid", "all"])
                _ = try await sql.execute("ALTER TABLE \(table) RENAME COLUMN status TO state")
                _ = try await sql.execute("INSERT INTO \(table) (state) VALUES ('paid')")
                let error = try await client.receiveJSON(timeout: 15)
                #expect(error["type"] as? String == "error" && error["code"] as? String == "invalid_filter" && error["id"] as? String == "paid", "\(error)")
                #expect((error["message"] as? String)?.contains("column 'status'") == true, "\(error)")
                let change = try await client.receiveJSON(timeout: 15)
                #expect(change["ids"] as? [String] == ["all"])
                #expect((change["new"] as? [String: Any])?["state"] as? String == "paid")
                await sql.close()
                await client.close()
            }
        }
    }

    @Test("A client resumes with since after reconnecting: the changes it missed, once, in order")
    func resumeAfterReconnect() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table]) { _, running, _ in
                let sql = try await PostgresConnection.connect(to: url)
                let first = try await connectWebSocket(port: running.port)
                try await first.subscribe("s1", table: table)
                _ = try await sql.execute("INSERT INTO \(table) (id, status) VALUES (1, 'a')")
                let seen = try await first.receiveJSON(timeout: 15)
                let cursor = try #require(seen["cursor"] as? String)
                await first.close()
                for id in 2...4 { _ = try await sql.execute("INSERT INTO \(table) (id, status) VALUES (\(id), 'b')") }
                let second = try await connectWebSocket(port: running.port)
                try await second.subscribe("s1", table: table, since: cursor)
                var ids: [Int] = []
                while ids.count < 3 {
                    let change = try await second.receiveJSON(timeout: 15)
                    ids.append((change["new"] as? [String: Any])?["id"] as? Int ?? -1)
                }
                #expect(ids == [2, 3, 4])
                // Once: a live marker row written now is the very next message (a replayed
                // duplicate of 1...4 would come first).
                _ = try await sql.execute("INSERT INTO \(table) (id, status) VALUES (5, 'marker')")
                let marker = try await second.receiveJSON(timeout: 15)
                #expect(marker["type"] as? String == "change", "\(marker)")
                #expect((marker["new"] as? [String: Any])?["id"] as? Int == 5, "expected the marker row 5 next, got \(marker)")
                await second.close()
                await sql.close()
            }
        }
    }

    @Test("Graceful shutdown: every change committed before it reaches the client, then close 1001; steps logged in order")
    func gracefulShutdown() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let capture = LogCapture()
            let count = 30
            try await withRealtimeService(url: url, tables: [table], logger: capture.logger()) { _, running, group in
                let client = try await connectWebSocket(port: running.port)
                try await client.subscribe("s1", table: table)
                let sql = try await PostgresConnection.connect(to: url)
                for id in 1...count { _ = try await sql.execute("INSERT INTO \(table) (id, status) VALUES (\(id), 'x')") }
                await sql.close()
                await group.triggerGracefulShutdown()
                var ids: [Int] = []
                var closeCode: UInt16?
                while let frame = try await withTimeout(20, "reading", { try await client.receiveFrame() }) {
                    if frame.opcode == 0x8 {
                        closeCode = frame.closeCode
                        try? await client.sendClose(1000)
                        break
                    }
                    let object = try JSONSerialization.jsonObject(with: Data(frame.payload)) as? [String: Any]
                    ids.append((object?["new"] as? [String: Any])?["id"] as? Int ?? -1)
                }
                #expect(ids == Array(1...count))
                #expect(closeCode == 1001)
                await client.close()
            }
            let steps = capture.messages.filter { $0.hasPrefix("shutdown: ") }
            let expected = ["shutdown: stopped admitting", "shutdown: cancel scheduler jobs",
                            "shutdown: stop capture at the shutdown position and drain the pool",
                            "shutdown: fan-out delivered", "shutdown: closed sockets with 1001", "shutdown: stopped the HTTP listener"]
            #expect(steps.count == expected.count, "\(steps)")
            for (step, prefix) in zip(steps, expected) { #expect(step.hasPrefix(prefix), "\(steps)") }
        }
    }

    @Test("Demo mode: the scheduler's writer job inserts rows that reach a WebSocket client")
    func demoWriterReachesClient() async throws {
        try await TestDatabase.withDatabase { url in
            let table = "public." + uniqueCaptureName("svc_demo")
            try await withRealtimeService(url: url, tables: [], demo: .init(table: table, writeInterval: .milliseconds(200))) { service, running, _ in
                #expect(running.source.catalog.columns(of: table)?.map(\.name) == ["id", "status", "amount", "created_at"])
                let page = try await TestConnection.open(port: running.port)
                let response = try await page.request("GET", "/")
                #expect(response.body.contains(table))
                await page.close()
                let client = try await connectWebSocket(port: running.port)
                try await client.subscribe("demo", table: table)
                let change = try await client.receiveJSON(timeout: 15)
                #expect(change["type"] as? String == "change")
                #expect(change["op"] as? String == "INSERT")
                let row = try #require(change["new"] as? [String: Any])
                #expect(row["id"] is Int)
                #expect(row["status"] is String)
                #expect(await eventually(5) { service.samples.demoRows >= 1 })
                await client.close()
            }
        }
    }

    @Test("Sampling and heartbeat jobs run on the scheduler: slot lag and pool statistics sampled, heartbeats written")
    func jobsRun() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table], configure: {
                $0.samplingInterval = .milliseconds(100)
                $0.heartbeatInterval = .milliseconds(100)
            }) { service, _, _ in
                #expect(await eventually(15) {
                    let samples = service.samples
                    return samples.heartbeats >= 2 && samples.slotLagBytes != nil && samples.pool != nil
                })
            }
        }
    }

    @Test("ALTER TABLE ADD COLUMN reaches new subscriptions within the sampling interval (the catalog is re-read)")
    func catalogRefresh() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table], configure: { $0.samplingInterval = .milliseconds(200) }) { _, running, _ in
                try await runSQL(url, "ALTER TABLE \(table) ADD COLUMN priority int")
                let client = try await connectWebSocket(port: running.port)
                let answer = try await client.subscribeOnceKnown(table: table, filter: "priority=gt.1", refusedWith: "invalid_filter")
                #expect(answer["type"] as? String == "subscribed", "the new column never became known: \(answer)")
                await client.close()
            }
        }
    }

    @Test("A table added to the publication while the service runs can be subscribed to, and its changes arrive")
    func tableAddedToThePublication() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let added = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table], configure: { $0.samplingInterval = .milliseconds(200) }) { service, running, _ in
                try await runSQL(url, "ALTER PUBLICATION \(service.configuration.publication) ADD TABLE \(added)")
                let client = try await connectWebSocket(port: running.port)
                let answer = try await client.subscribeOnceKnown(table: added, refusedWith: "unknown_table")
                #expect(answer["type"] as? String == "subscribed", "the added table never became known: \(answer)")
                try await runSQL(url, "INSERT INTO \(added) (status) VALUES ('new')")
                let change = try await client.receiveJSON(timeout: 15)
                #expect(change["type"] as? String == "change")
                #expect(change["table"] as? String == added)
                await client.close()
            }
        }
    }

    @Test("A since cursor older than the capture's window is answered with resync_required")
    func resyncRequired() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            try await withRealtimeService(url: url, tables: [table]) { _, running, _ in
                let client = try await connectWebSocket(port: running.port)
                try await client.sendText(#"{"type":"subscribe","id":"old","table":"\#(table)","since":"0000000000000001.00000000"}"#)
                let answer = try await client.receiveJSON(timeout: 15)
                #expect(answer["type"] as? String == "resync_required")
                #expect(answer["id"] as? String == "old")
                await client.close()
            }
        }
    }

    @Test("With no database the service starts an embedded cluster, writes demo rows that reach a client, and removes the cluster at shutdown")
    func embeddedDemo() async throws {
        try await TestDatabase.withDatabase { _ in
            var configuration = RealtimeService.embeddedDemo(logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
            configuration.server.port = 0
            configuration.demo?.writeInterval = .milliseconds(200)
            let service = RealtimeService(configuration)
            let group = ServiceGroup(configuration: .init(services: [service], logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }))
            let directory = try await withThrowingTaskGroup(of: String?.self) { tasks in
                tasks.addTask { try await group.run(); return nil }
                do {
                    let running = try await withTimeout(120, "embedded start") { try await service.waitUntilRunning() }
                    let directory = try #require(running.embeddedDirectory)
                    #expect(FileManager.default.fileExists(atPath: directory))
                    #expect(running.pageURL == "http://127.0.0.1:\(running.port)/")
                    let client = try await connectWebSocket(port: running.port)
                    try await client.subscribe("demo", table: "public.demo_orders")
                    let change = try await client.receiveJSON(timeout: 15)
                    #expect(change["op"] as? String == "INSERT")
                    #expect((change["new"] as? [String: Any])?["amount"] != nil)
                    await group.triggerGracefulShutdown()
                    #expect(try await client.receiveClose(timeout: 15) == 1001)
                    try? await client.sendClose(1000)
                    await client.close()
                    try await tasks.waitForAll()
                    return directory
                } catch {
                    await group.triggerGracefulShutdown()
                    try? await tasks.waitForAll()
                    throw error
                }
            }
            #expect(!FileManager.default.fileExists(atPath: directory))
        }
    }

    @Test("slot drop: the service's persistent slot survives shutdown and RealtimeService.dropSlot removes it once")
    func dropSlotAfterShutdown() async throws {
        try await TestDatabase.withDatabase { url in
            let table = try await createServiceTable(url: url)
            let slot = uniqueCaptureName("svc_drop")
            try await withRealtimeService(url: url, tables: [table], dropCaptureAtEnd: false, configure: {
                $0.slot = slot
                $0.publication = slot + "_pub"
            }) { _, _, _ in }
            #expect(try await RealtimeService.dropSlot(slot, url: url))
            #expect(try await RealtimeService.dropSlot(slot, url: url) == false)
            let sql = try await PostgresConnection.connect(to: url)
            _ = try await sql.execute("DROP PUBLICATION IF EXISTS \(slot)_pub")
            await sql.close()
        }
    }

    @Test("No database given and the embedded one cannot start: the error says no database was given and names the flag and both variables")
    func embeddedStartFailureNamesTheDatabaseSettings() async throws {
        var configuration = RealtimeService.embeddedDemo(logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        configuration.embedded.parentDirectory = "/nonexistent-\(UInt32.random(in: 0...UInt32.max))/clusters"
        configuration.server.port = 0
        do {
            try await RealtimeService(configuration).run()
            Issue.record("the service ran without a database")
        } catch {
            #expect("\(error)".contains("SERVICE_START_FAILED"), "\(error)")
            #expect("\(error)".contains("--database-url, REALTIME_SYNC_DATABASE_URL or DATABASE_URL"), "\(error)")
            #expect("\(error)".contains("Options.parentDirectory"), "the cause is kept: \(error)")
        }
    }

    @Test("The pool's counters for /metrics grow by what statistics grew by between samples, from zero at the first, never backwards")
    func poolCounterIncrements() {
        var first = PoolStatistics()
        first.connectFailures = 3
        first.closedBroken = 2
        first.closedLifetime = 1
        let start = RealtimeService.poolCounterIncrements(from: nil, to: first)
        #expect(start.connectFailures == 3)
        #expect(start.closes == ["broken": 2, "lifetime": 1, "idle_time": 0, "max_idle": 0])
        var second = first
        second.connectFailures = 5
        second.closedMaxIdle = 4
        let next = RealtimeService.poolCounterIncrements(from: first, to: second)
        #expect(next.connectFailures == 2)
        #expect(next.closes == ["broken": 0, "lifetime": 0, "idle_time": 0, "max_idle": 4])
        #expect(Set(next.closes.keys) == Set(RealtimeService.poolCloseReasons))
        // A pool replaced by a new one (its counts start again): nothing negative.
        #expect(RealtimeService.poolCounterIncrements(from: second, to: PoolStatistics()).connectFailures == 0)
    }

    @Test("A setup error stops the start and names the fix (publication missing, no tables)")
    func setupErrorNamesTheFix() async throws {
        try await TestDatabase.withDatabase { url in
            do {
                try await withRealtimeService(url: url, tables: []) { _, _, _ in }
                Issue.record("the service started without tables or publication")
            } catch {
                #expect("\(error)".contains("publication"), "\(error)")
                #expect("\(error)".contains("CREATE PUBLICATION"), "\(error)")
            }
        }
    }
}

/// `/readyz` as a load balancer sees it, against a real database that goes away and comes back.
@Suite("RealtimeService: readiness against a real outage")
struct RealtimeServiceReadinessTests {
    @Test("GET /readyz: 503 change_stream_disconnected while PostgreSQL is down, 200 again once the capture has reconnected; a change made after that reaches a client")
    func readyzFollowsTheDatabase() async throws {
        try await withPrivateCluster { pg in
            let table = try await createServiceTable(url: pg.url)
            try await withRealtimeService(url: pg.url, tables: [table]) { _, running, _ in
                /// `/readyz`'s status and body, asked every 100 ms until it answers `status` (at most `tries` times).
                func readiness(until status: Int, tries: Int) async throws -> (Int, String)? {
                    var last: (Int, String)?
                    for _ in 0..<tries {
                        if let connection = try? await TestConnection.open(port: running.port) {
                            last = (try? await connection.request("GET", "/readyz")).map { ($0.status, $0.body) }
                            await connection.close()
                        }
                        if last?.0 == status { break }
                        try await Task.sleep(for: .milliseconds(100))
                    }
                    return last
                }
                let ready = try await readiness(until: 200, tries: 1)
                #expect(ready?.0 == 200 && ready?.1 == #"{"ready":true}"#, "\(String(describing: ready))")
                try await offPool { try pg.stopServer() }
                let down = try await readiness(until: 503, tries: 100)
                #expect(down?.0 == 503 && down?.1 == #"{"ready":false,"reason":"change_stream_disconnected"}"#, "\(String(describing: down))")
                try await offPool { try pg.startAgain() }
                let up = try await readiness(until: 200, tries: 300)
                #expect(up?.0 == 200, "\(String(describing: up))")
                let client = try await connectWebSocket(port: running.port)
                try await client.subscribe("s", table: table)
                try await runSQL(pg.url, "INSERT INTO \(table) (status) VALUES ('after the outage')")
                let change = try await client.receiveJSON(timeout: 15)
                #expect(change["type"] as? String == "change", "\(change)")
                #expect((change["new"] as? [String: Any])?["status"] as? String == "after the outage", "\(change)")
                await client.close()
            }
        }
    }
}

extension TestConnection {
    /// Subscribes (ids `k1`, `k2`, …) every 100 ms, up to 50 times, until the server knows what
    /// the subscription names (after its catalog refresh); each refusal must carry `code`.
    /// Returns the last answer.
    func subscribeOnceKnown(table: String, filter: String? = nil, refusedWith code: String) async throws -> [String: Any] {
        var answer: [String: Any] = [:]
        for attempt in 1...50 {
            var message: [String: Any] = ["type": "subscribe", "id": "k\(attempt)", "table": table]
            if let filter { message["filter"] = filter }
            try await sendText(String(decoding: try JSONSerialization.data(withJSONObject: message), as: UTF8.self))
            answer = try await receiveJSON(timeout: 15)
            if answer["type"] as? String == "subscribed" { break }
            #expect(answer["code"] as? String == code, "\(answer)")
            try await Task.sleep(for: .milliseconds(100))
        }
        return answer
    }
}
