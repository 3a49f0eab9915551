@testable import RealtimeSync
import PoolKit
import Testing

/// A committed transaction of `count` inserts into orders at `lsn`, ids from `firstID`.
private func committed(lsn: UInt64, firstID: Int, count: Int) -> CommittedTransaction {
    let changes = (0..<count).map { i in
        ChangeEvent(operation: .insert, relation: ordersRelation,
                    new: TupleData([t(String(firstID + i)), t("open"), .null, t("1.5")]), old: nil, oldKind: nil,
                    xid: UInt32(lsn), commitLSN: LSN(lsn), commitTime: fixedTime, index: UInt32(i))
    }
    return CommittedTransaction(xid: UInt32(lsn), commitLSN: LSN(lsn), endLSN: LSN(lsn + 0x30), commitTime: fixedTime,
                                origin: nil, changes: changes, messages: [])
}

/// Transactions `range` of 100 inserts each: transaction t holds ids t*100+1 ... t*100+100.
private func deliverHundreds(_ hub: ChangeHub, _ range: Range<Int>) {
    for t in range { _ = hub.deliver(committed(lsn: UInt64(0x1000 + t * 0x100), firstID: t * 100 + 1, count: 100)) }
}

private func id(_ event: ChangeEvent) -> Int { Int(event.new!.text(at: 0)!)! }

private func ids(_ events: [ChangeEvent]) -> [Int] { events.map(id) }

/// The id of the next change the iterator yields (failing the test if the stream ended).
private func nextID(_ iterator: inout ChangeSubscription.AsyncIterator) async throws -> Int {
    id(try #require(try await iterator.next()))
}

private func drain(_ subscription: ChangeSubscription, _ count: Int) async throws -> [ChangeEvent] {
    var out: [ChangeEvent] = []
    for try await event in subscription {
        out.append(event)
        if out.count == count { break }
    }
    return out
}

@Suite("ChangeHub: window, seam and consumer policy (no I/O)")
struct ChangeHubTests {
    @Test("A resume registered between two deliveries gets the window after its cursor, then live changes: no gap, no duplicate")
    func seam() async throws {
        let hub = ChangeHub(limits: .init(maxCount: 1_000), bufferLimit: 100)
        hub.openWindow(origin: LSN(0x100))
        _ = hub.deliver(committed(lsn: 0x200, firstID: 1, count: 3))
        _ = hub.deliver(committed(lsn: 0x300, firstID: 4, count: 3))
        let resumed = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: Cursor(commitLSN: LSN(0x200), index: 1))))
        let live = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        _ = hub.deliver(committed(lsn: 0x400, firstID: 7, count: 2))
        #expect(ids(try await drain(resumed, 6)) == [3, 4, 5, 6, 7, 8])
        #expect(ids(try await drain(live, 2)) == [7, 8])
    }

    // Audit, session 12: the window's start was Cursor(origin, 0), which is also the cursor of
    // the first change of a transaction committing exactly at the origin (Postgres replays a
    // transaction whose commit is at the slot's position). "After" the start skipped it.
    @Test("A transaction committing exactly at the window's origin reaches a consumer that starts at the window's start, whole")
    func transactionAtTheOrigin() async throws {
        let hub = ChangeHub(limits: .init(maxCount: 1_000), bufferLimit: 100)
        hub.openWindow(origin: LSN(0x200))
        // What ChangeStreamSource.currentCursor gives (and the fan-out starts after) with an empty window.
        let start = try #require(hub.snapshot().window?.oldestResumable)
        #expect(start < Cursor(commitLSN: LSN(0x200), index: 0))
        let fromStart = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: start)))
        _ = hub.deliver(committed(lsn: 0x200, firstID: 1, count: 2))
        _ = hub.deliver(committed(lsn: 0x300, firstID: 3, count: 1))
        // Bounded reads: without the fix only 2 of the 3 come, and an unbounded read waits for good.
        #expect(ids(try await take(3, from: fromStart, timeout: .seconds(5))) == [1, 2, 3])
        // A client given that start as its cursor resumes with it: the same changes, from the window.
        let resumed = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: start)))
        #expect(ids(try await take(3, from: resumed, timeout: .seconds(5))) == [1, 2, 3])
    }

    @Test("A resume from far back reads the window a page at a time: every change once, in order, live ones after, even when they arrive mid-way")
    func pagedResume() async throws {
        let hub = ChangeHub(limits: .init(maxCount: 100_000), bufferLimit: 100)
        hub.openWindow(origin: LSN(0x100))
        // 3,000 changes in 30 transactions: about three pages.
        deliverHundreds(hub, 0..<30)
        let resumed = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: Cursor(commitLSN: LSN(0x100), index: 0))))
        var iterator = resumed.makeAsyncIterator()
        var got: [Int] = []
        for _ in 0..<1_500 { got.append(try await nextID(&iterator)) }
        // Committed while the consumer is half-way through the backlog.
        _ = hub.deliver(committed(lsn: 0x10000, firstID: 3_001, count: 50))
        for _ in 0..<1_550 { got.append(try await nextID(&iterator)) }
        #expect(got == Array(1...3_050))
        _ = hub.deliver(committed(lsn: 0x10100, firstID: 3_051, count: 1))
        #expect(try await nextID(&iterator) == 3_051)
    }

    @Test("A paging resume that the window evicts past gets resync_required, not a gap")
    func pagedResumeEvicted() async throws {
        let hub = ChangeHub(limits: .init(maxCount: 2_000), bufferLimit: 100)
        hub.openWindow(origin: LSN(0x100))
        deliverHundreds(hub, 0..<20)
        let resumed = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: Cursor(commitLSN: LSN(0x100), index: 0))))
        var iterator = resumed.makeAsyncIterator()
        var got: [Int] = []
        for _ in 0..<ChangeHub.pageSize { got.append(try await nextID(&iterator)) }
        // 1,500 more: the window (2,000) now starts past what this consumer has read.
        deliverHundreds(hub, 20..<35)
        do {
            while let event = try await iterator.next() { got.append(id(event)) }
            Issue.record("expected resync_required")
        } catch let error as ResumeWindowError {
            #expect(error.code == .resyncRequired)
        }
        #expect(got == Array(1...got.count), "what arrived before the error has no gap")
    }

    @Test("A replayed transaction (after a reconnect) is neither appended nor delivered again")
    func replay() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 100)
        hub.openWindow(origin: LSN(0x100))
        let live = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        _ = hub.deliver(committed(lsn: 0x200, firstID: 1, count: 2))
        _ = hub.deliver(committed(lsn: 0x200, firstID: 1, count: 2))
        _ = hub.deliver(committed(lsn: 0x300, firstID: 3, count: 1))
        #expect(ids(try await drain(live, 3)) == [1, 2, 3])
        #expect(hub.snapshot().changes == 3)
    }

    @Test("A cursor given before the window opens is checked when it opens: older than the origin ends the iteration with resync_required")
    func pendingCursor() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 100)
        let tooOld = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: Cursor(commitLSN: LSN(0x50), index: 0))))
        let fine = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: Cursor(commitLSN: LSN(0x200), index: 0))))
        // The window opens at the slot's position; the stream replays from there (rebuild).
        hub.openWindow(origin: LSN(0x100))
        _ = hub.deliver(committed(lsn: 0x200, firstID: 1, count: 2))
        _ = hub.deliver(committed(lsn: 0x300, firstID: 3, count: 1))
        await #expect(throws: ResumeWindowError.self) { _ = try await drain(tooOld, 1) }
        // Resumes after index 0 of 0x200: the replayed change at the cursor itself is not repeated.
        #expect(ids(try await drain(fine, 2)) == [2, 3])
    }

    @Test("Retain position: the window's first change, so a restart rebuilds it; it moves as the window evicts")
    func retain() {
        let hub = ChangeHub(limits: .init(maxCount: 3), bufferLimit: 100)
        #expect(hub.openWindow(origin: LSN(0x100)) == LSN(0x100))
        #expect(hub.deliver(committed(lsn: 0x200, firstID: 1, count: 2)) == LSN(0x200))
        #expect(hub.deliver(committed(lsn: 0x300, firstID: 3, count: 2)) == LSN(0x200))  // 4 > 3: id 1 evicted, id 2 left
        #expect(hub.deliver(committed(lsn: 0x400, firstID: 5, count: 1)) == LSN(0x300))
    }

    @Test("A consumer over consumerBufferLimit gets its queue, then consumer_too_slow with its last cursor; others are unaffected")
    func cutOff() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 5)
        hub.openWindow(origin: LSN(0x100))
        let slow = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        let fast = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        var fastIterator = fast.makeAsyncIterator()
        var fastSeen: [ChangeEvent] = []
        for (n, lsn) in [0x200, 0x300, 0x400, 0x500].enumerated() {
            _ = hub.deliver(committed(lsn: UInt64(lsn), firstID: n * 2 + 1, count: 2))
            for _ in 0..<2 { fastSeen.append(try #require(try await fastIterator.next())) }
        }
        #expect(ids(fastSeen) == Array(1...8))
        var got: [ChangeEvent] = []
        do {
            for try await event in slow { got.append(event) }
            Issue.record("expected consumer_too_slow")
        } catch let error as ChangeStreamError {
            #expect(error.code == .consumerTooSlow)
            #expect(error.resumeAfter == got.last?.cursor)
        }
        // Transactions of 2 (at most half the limit, so counted whole), each let in while at most
        // 5 are queued: 2, 4, 6; with 6 queued, the fourth is not.
        #expect(ids(got) == [1, 2, 3, 4, 5, 6])
        #expect(hub.snapshot().cutOff == 1)
    }

    @Test("A transaction larger than consumerBufferLimit reaches a consumer that keeps up whole; one that stops reading is cut off at the next")
    func largeTransaction() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 10)
        hub.openWindow(origin: LSN(0x100))
        let reader = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        let stuck = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        // Both have 3 changes queued when a 25-change transaction commits.
        _ = hub.deliver(committed(lsn: 0x200, firstID: 1, count: 3))
        _ = hub.deliver(committed(lsn: 0x300, firstID: 4, count: 25))
        // The reader is half-way through the big one when more commit: it keeps up.
        #expect(ids(try await drain(reader, 15)) == Array(1...15))
        _ = hub.deliver(committed(lsn: 0x400, firstID: 29, count: 1))
        _ = hub.deliver(committed(lsn: 0x500, firstID: 30, count: 1))
        #expect(ids(try await drain(reader, 15)) == Array(16...30))
        // The stuck one: the big transaction counted as 5 (half the limit), so after 3 + 5 + 1 + 1
        // = 10 queued one more is let in (at most the limit was queued); the next is not.
        _ = hub.deliver(committed(lsn: 0x600, firstID: 31, count: 1))
        _ = hub.deliver(committed(lsn: 0x700, firstID: 32, count: 1))
        #expect(ids(try await drain(reader, 2)) == [31, 32])
        var got: [ChangeEvent] = []
        do {
            for try await event in stuck { got.append(event) }
            Issue.record("expected consumer_too_slow")
        } catch let error as ChangeStreamError {
            #expect(error.code == .consumerTooSlow)
        }
        #expect(ids(got) == Array(1...31))
        #expect(hub.snapshot().cutOff == 1)
    }

    @Test("A consumer reading only part of each big transaction before the next falls behind and is cut off; its queue does not grow without bound")
    func partReaderOfLargeTransactions() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 10)
        hub.openWindow(origin: LSN(0x100))
        let slow = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        var iterator = slow.makeAsyncIterator()
        var read = 0
        var cutOff: ChangeStreamError?
        for t in 0..<20 {
            _ = hub.deliver(committed(lsn: UInt64(0x1000 + t * 0x100), firstID: t * 25 + 1, count: 25))
            if hub.snapshot().cutOff > 0 { break }
            for _ in 0..<5 {
                #expect(try await nextID(&iterator) == read + 1)
                read += 1
            }
        }
        // Each 25-change transaction counts as 5 (half the limit), gives back 1 per 5 read, and
        // is let in while what is queued counts at most 10: 5; 4 + 5; 8 + 5; then 12 > 10, and
        // the fourth is refused.
        #expect(hub.snapshot().cutOff == 1)
        do {
            while let event = try await iterator.next() { #expect(id(event) == read + 1); read += 1 }
        } catch let error as ChangeStreamError {
            cutOff = error
        }
        #expect(cutOff?.code == .consumerTooSlow)
        #expect(read == 75, "it received the three transactions it was given, whole")
        #expect(cutOff?.resumeAfter == Cursor(commitLSN: LSN(0x1200), index: 24), "the last change of the third transaction")
    }

    @Test("A run of large transactions committed back to back (a batched backfill) reaches a consumer still reading the first, whole: it is not cut off")
    func backToBackLargeTransactions() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 10)
        hub.openWindow(origin: LSN(0x100))
        let reader = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        _ = hub.deliver(committed(lsn: 0x1000, firstID: 1, count: 25))
        #expect(ids(try await drain(reader, 3)) == [1, 2, 3])
        _ = hub.deliver(committed(lsn: 0x1100, firstID: 26, count: 25))
        _ = hub.deliver(committed(lsn: 0x1200, firstID: 51, count: 25))
        #expect(hub.snapshot().cutOff == 0)
        #expect(ids(try await drain(reader, 72)) == Array(4...75))
        _ = hub.deliver(committed(lsn: 0x1300, firstID: 76, count: 2))
        #expect(ids(try await drain(reader, 2)) == [76, 77])
        #expect(hub.snapshot().cutOff == 0)
    }

    @Test("Ordinary writes between large transactions count as themselves: two large ones with a write between reach a reader still in the first; a consumer resuming from the window is held to the same limit (its backlog is not counted)")
    func largeTransactionsWithWritesBetween() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 10)
        hub.openWindow(origin: LSN(0x100))
        _ = hub.deliver(committed(lsn: 0x800, firstID: 900, count: 1))   // a change to resume after
        let reader = ChangeSubscription(registration: .init(hub: hub, id: try hub.subscribe(after: Cursor(commitLSN: LSN(0x800), index: 0))))
        _ = hub.deliver(committed(lsn: 0x1000, firstID: 1, count: 25))   // counts 5
        #expect(ids(try await drain(reader, 3)) == [1, 2, 3])
        _ = hub.deliver(committed(lsn: 0x1100, firstID: 26, count: 1))   // 5 + 1
        _ = hub.deliver(committed(lsn: 0x1200, firstID: 27, count: 25))  // 6 <= 10: let in, 11
        #expect(hub.snapshot().cutOff == 0)
        _ = hub.deliver(committed(lsn: 0x1300, firstID: 52, count: 1))   // 11 > 10: cut off
        #expect(hub.snapshot().cutOff == 1)
        var got: [ChangeEvent] = []
        do {
            for try await event in reader { got.append(event) }
        } catch let error as ChangeStreamError {
            #expect(error.code == .consumerTooSlow)
        }
        #expect(ids(got) == Array(4...51))
    }

    @Test("Dropping a subscription unregisters it; close ends consumers after their queue")
    func release() async throws {
        let hub = ChangeHub(limits: .init(), bufferLimit: 10)
        hub.openWindow(origin: LSN(0x100))
        do { _ = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe())) }
        #expect(hub.snapshot().subscribers == 0)
        let kept = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe()))
        _ = hub.deliver(committed(lsn: 0x200, firstID: 1, count: 2))
        hub.close(error: nil)
        var seen: [ChangeEvent] = []
        for try await event in kept { seen.append(event) }
        #expect(ids(seen) == [1, 2])
        #expect(hub.snapshot().subscribers == 0)
        // After close, a new consumer ends at once.
        var late = ChangeSubscription(registration: .init(hub: hub, id: hub.subscribe())).makeAsyncIterator()
        #expect(try await late.next() == nil)
    }
}

@Suite("ChangeStream reconnect backoff")
struct ChangeStreamBackoffTests {
    @Test("Reconnect delays double from reconnectInitialDelay and stop at reconnectMaxDelay")
    func backoff() {
        let delays = (1...8).map { ChangeStream.backoff(failures: $0, initial: .milliseconds(100), max: .seconds(5)) }
        #expect(delays == [.milliseconds(100), .milliseconds(200), .milliseconds(400), .milliseconds(800),
                           .milliseconds(1_600), .milliseconds(3_200), .seconds(5), .seconds(5)])
        #expect(ChangeStream.backoff(failures: 1_000, initial: .milliseconds(100), max: .seconds(5)) == .seconds(5))
    }

    @Test("Connection failures, a slot still held by the old walsender and any failed column-type lookup are retried; setup, protocol, lost-slot and oversized-transaction errors are not")
    func retryable() {
        // A lookup that failed for any reason (here a statement_timeout) reconnects: going on
        // would send a domain over int8 as strings.
        #expect(ChangeStream.isRetryable(TypeLookupFailed(table: "public.t", underlying: PostgresError(code: .server, message: "x", sqlState: "57014"))))
        #expect(ChangeStream.isRetryable(ChangeStream.ServerShuttingDown()))
        #expect(!ChangeStream.isRetryable(ChangeStreamError(.slotLost, "x")))
        #expect(!ChangeStream.isRetryable(ChangeAssemblyError(.transactionTooLarge, "x")))
        #expect(ChangeStream.isRetryable(PostgresError(code: .connectionBroken, message: "x")))
        #expect(ChangeStream.isRetryable(PostgresError(code: .server, message: "x", sqlState: "55006")))
        #expect(ChangeStream.isRetryable(PostgresError(code: .server, message: "x", sqlState: "57P03")))
        #expect(!ChangeStream.isRetryable(PostgresError(code: .server, message: "x", sqlState: "42704")))
        #expect(!ChangeStream.isRetryable(CaptureSetupError(.walLevelNotLogical, "x")))
        // A malformed replication message: another protocol, which no reconnect cures.
        #expect(!ChangeStream.isRetryable(PostgresError(code: .decoding, message: "x")))
    }

    @Test("A reconnect to another cluster, or to a timeline that forked before what the stream delivered, is a gap; a fork after it is not")
    func failoverProblem() {
        func identity(_ system: String = "7301", timeline: Int) -> ReplicationSystemIdentity {
            ReplicationSystemIdentity(systemID: system, timeline: timeline, xlogPosition: 0, databaseName: "db")
        }
        let history2 = "1\t0/5000000\tno recovery target specified\n"
        let history3 = "1\t0/3000000\tno recovery target specified\n2\t0/7000000\tno recovery target specified\n"
        func problem(_ was: ReplicationSystemIdentity, _ now: ReplicationSystemIdentity, _ history: String?, _ delivered: String) -> String? {
            ChangeStream.failoverProblem(was: was, now: now, history: history, deliveredThrough: LSN(delivered)!)
        }
        #expect(problem(identity(timeline: 1), identity(timeline: 1), nil, "0/9000000") == nil)
        #expect(problem(identity(timeline: 1), identity("9999", timeline: 1), nil, "0/1")?.contains("another database cluster") == true)
        // Timeline 2 left timeline 1 at 0/5000000.
        #expect(problem(identity(timeline: 1), identity(timeline: 2), history2, "0/4FFFFFF") == nil)
        #expect(problem(identity(timeline: 1), identity(timeline: 2), history2, "0/5000000") == nil, "delivered exactly up to the fork")
        let lagged = problem(identity(timeline: 1), identity(timeline: 2), history2, "0/5000001")
        #expect(lagged?.contains("left timeline 1 at 0/5000000") == true, "\(String(describing: lagged))")
        // Two failovers: from timeline 2 the switch point is 2's line, not 1's.
        #expect(problem(identity(timeline: 2), identity(timeline: 3), history3, "0/6000000") == nil)
        #expect(problem(identity(timeline: 2), identity(timeline: 3), history3, "0/8000000")?.contains("0/7000000") == true)
        // No history (TIMELINE_HISTORY failed), or one that does not list the old timeline.
        #expect(problem(identity(timeline: 1), identity(timeline: 2), nil, "0/1")?.contains("does not say") == true)
        #expect(problem(identity(timeline: 4), identity(timeline: 5), history3, "0/1")?.contains("does not say") == true)
        // Nothing captured for a while: heartbeats moved the resume position (0/6000000) past the
        // last transaction delivered (0/1000000) and past the fork (0/5000000): commits on the new
        // timeline between the two would be skipped.
        let resumed = ChangeStream.failoverProblem(was: identity(timeline: 1), now: identity(timeline: 2), history: history2,
                                                   deliveredThrough: LSN("0/1000000")!, resumeAt: LSN("0/6000000")!)
        #expect(resumed?.contains("where this stream would resume") == true, "\(String(describing: resumed))")
        #expect(ChangeStream.failoverProblem(was: identity(timeline: 1), now: identity(timeline: 2), history: history2,
                                             deliveredThrough: LSN("0/1000000")!, resumeAt: LSN("0/5000000")!) == nil)
    }
}
