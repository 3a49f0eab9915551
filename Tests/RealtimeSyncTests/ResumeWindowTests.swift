import RealtimeSync
import Testing

@Suite("resume window")
struct ResumeWindowTests {
    /// Events of `transactions` transactions with `perTransaction` changes each, commit LSNs 0x100, 0x200, …
    func events(transactions: Int, perTransaction: Int, firstLSN: UInt64 = 0x100) -> [ChangeEvent] {
        (0..<transactions).flatMap { transaction in
            (0..<perTransaction).map { index in
                ChangeEvent(operation: .insert, relation: ordersRelation, new: TupleData([t(String(index)), .null, .null, .null]),
                            old: nil, oldKind: nil, xid: UInt32(transaction), commitLSN: LSN(firstLSN + UInt64(transaction) * 0x100),
                            commitTime: fixedTime, index: UInt32(index))
            }
        }
    }

    @Test("events(after:) returns exactly the events strictly after the cursor, in order")
    func after() throws {
        var window = ResumeWindow<TestInstant>(origin: LSN(0x100))
        let all = events(transactions: 10, perTransaction: 3)
        let appended1 = window.append(contentsOf: all, at: .zero)
        #expect(appended1 == 30)
        for (position, event) in all.enumerated() {
            #expect(try window.events(after: event.cursor).map(\.cursor) == all[(position + 1)...].map(\.cursor))
        }
        // The origin itself and a cursor between events.
        #expect(try window.events(after: Cursor(commitLSN: LSN(0x100), index: 0)).count == 29)
        #expect(try window.events(after: Cursor(commitLSN: LSN(0x180), index: 7)).first?.cursor == Cursor(commitLSN: LSN(0x200), index: 0))
        // A cursor past the newest event: nothing yet.
        #expect(try window.events(after: Cursor(commitLSN: LSN(0xFFFF), index: 0)).isEmpty)
        #expect(window.retainLSN == LSN(0x100))
    }

    @Test("maxBytes: wide changes push the oldest out once their bytes pass the bound (the newest always stays); older cursors then need a resync")
    func byteBound() throws {
        // Changes of about 10 KB each (a 10,000-byte value plus the fixed 128 and cell records).
        func wide(_ transaction: Int) -> ChangeEvent {
            ChangeEvent(operation: .insert, relation: ordersRelation,
                        new: TupleData([t(String(repeating: "w", count: 10_000)), .null, .null, .null]),
                        old: nil, oldKind: nil, xid: UInt32(transaction), commitLSN: LSN(0x100 + UInt64(transaction) * 0x100),
                        commitTime: fixedTime, index: 0)
        }
        let all = (0..<10).map(wide)
        let each = all[0].approximateBytes
        #expect(each > 10_000 && each < 10_300, "\(each)")
        var window = ResumeWindow<TestInstant>(limits: .init(maxBytes: 3 * each + each / 2), origin: LSN(0x100))
        window.append(contentsOf: all, at: .zero)
        #expect(window.count == 3, "3.5 changes' worth of bytes holds 3")
        #expect(window.heldBytes == 3 * each)
        #expect(try window.events(after: all[6].cursor).map(\.cursor) == all[7...].map(\.cursor))
        #expect(throws: ResumeWindowError.self) { try window.events(after: all[5].cursor) }
        // One change larger than the bound: it alone stays.
        var tiny = ResumeWindow<TestInstant>(limits: .init(maxBytes: 100), origin: LSN(0x100))
        tiny.append(contentsOf: all[0..<2], at: .zero)
        #expect(tiny.count == 1 && tiny.heldBytes == each)
        #expect(try tiny.events(after: all[0].cursor).map(\.cursor) == [all[1].cursor])
    }

    @Test("markIdle: the retain position moves past an empty window only, never backwards, and held cursors keep resuming")
    func markIdle() throws {
        var window = ResumeWindow<TestInstant>(limits: .init(maxAge: .seconds(10)), origin: LSN(0x100))
        let all = events(transactions: 2, perTransaction: 1)
        window.append(contentsOf: all, at: .zero)
        // Holding events: idle positions change nothing.
        let heldMoved = window.markIdle(through: LSN(0x900), now: TestInstant.zero.advanced(by: .seconds(5)))
        #expect(!heldMoved)
        #expect(window.retainLSN == LSN(0x100))
        // Both expired: the window is empty and the slot may follow the stream.
        let emptyMoved = window.markIdle(through: LSN(0x900), now: TestInstant.zero.advanced(by: .seconds(11)))
        #expect(emptyMoved)
        #expect(window.isEmpty)
        #expect(window.retainLSN == LSN(0x900))
        let backMoved = window.markIdle(through: LSN(0x800), now: TestInstant.zero.advanced(by: .seconds(12)))
        #expect(!backMoved)
        #expect(window.retainLSN == LSN(0x900))
        // The last evicted change's cursor still resumes (nothing happened after it).
        #expect(try window.events(after: all[1].cursor).isEmpty)
        // A new change takes the hold back to itself.
        let later = events(transactions: 1, perTransaction: 1, firstLSN: 0xA00)
        window.append(contentsOf: later, at: TestInstant.zero.advanced(by: .seconds(13)))
        #expect(window.retainLSN == LSN(0xA00))
        #expect(try window.events(after: all[1].cursor).map(\.cursor) == later.map(\.cursor))
    }

    @Test("A cursor before the origin needs a resync")
    func beforeOrigin() {
        var window = ResumeWindow<TestInstant>(origin: LSN(0x100))
        window.append(contentsOf: events(transactions: 1, perTransaction: 1), at: .zero)
        let error = #expect(throws: ResumeWindowError.self) { try window.events(after: Cursor(commitLSN: LSN(0xFF), index: 9)) }
        #expect(error?.code == .resyncRequired)
        #expect(error?.message.contains("older than the resume window") == true)
        #expect(!window.canResume(after: Cursor(commitLSN: LSN(0xFF), index: 9)))
    }

    @Test("Count bound evicts the oldest; a cursor at the last evicted event still resumes, older ones resync")
    func countBound() throws {
        var window = ResumeWindow<TestInstant>(limits: .init(maxCount: 5), origin: LSN(0x100))
        let all = events(transactions: 4, perTransaction: 2)  // 8 events
        window.append(contentsOf: all, at: .zero)
        #expect(window.count == 5)
        #expect(window.evictedCount == 3)
        #expect(window.first?.cursor == all[3].cursor)
        #expect(window.oldestResumable == all[2].cursor)
        // The transaction of the oldest held event is only partly held; the slot is held at its commit.
        #expect(window.retainLSN == all[3].commitLSN)
        #expect(try window.events(after: all[2].cursor).map(\.cursor) == all[3...].map(\.cursor))
        #expect(throws: ResumeWindowError.self) { try window.events(after: all[1].cursor) }
    }

    @Test("Time bound evicts events older than maxAge, with injected time")
    func timeBound() throws {
        var window = ResumeWindow<TestInstant>(limits: .init(maxAge: .seconds(300)), origin: LSN(0x100))
        let all = events(transactions: 3, perTransaction: 1)
        window.append(all[0], at: .zero)
        window.append(all[1], at: TestInstant(offset: .seconds(100)))
        window.append(all[2], at: TestInstant(offset: .seconds(200)))
        window.evictExpired(now: TestInstant(offset: .seconds(300)))
        #expect(window.count == 3)
        window.evictExpired(now: TestInstant(offset: .seconds(301)))
        #expect(window.count == 2)
        #expect(window.oldestResumable == all[0].cursor)
        window.evictExpired(now: TestInstant(offset: .seconds(1000)))
        #expect(window.isEmpty)
        #expect(window.oldestResumable == all[2].cursor)
        #expect(window.retainLSN == all[2].commitLSN)
        #expect(try window.events(after: all[2].cursor).isEmpty)
        #expect(throws: ResumeWindowError.self) { try window.events(after: all[1].cursor) }
    }

    @Test("Duplicates (replayed events at or before the newest) are rejected")
    func duplicates() {
        var window = ResumeWindow<TestInstant>(limits: .init(maxCount: 2), origin: LSN(0x100))
        let all = events(transactions: 3, perTransaction: 1)
        let appended2 = window.append(contentsOf: all, at: .zero)
        #expect(appended2 == 3)
        let appended3 = window.append(all[2], at: .zero)
        #expect(!appended3)
        let appended4 = window.append(all[0], at: .zero)
        #expect(!appended4)
        #expect(window.count == 2)
        window.evictExpired(now: TestInstant(offset: .seconds(301)))
        #expect(window.isEmpty)
        let appended5 = window.append(all[2], at: TestInstant(offset: .seconds(301)))
        #expect(!appended5, "already seen and evicted")
        let appended6 = window.append(events(transactions: 1, perTransaction: 1, firstLSN: 0x900)[0], at: TestInstant(offset: .seconds(302)))
        #expect(appended6)
    }

    @Test("Half of 10,000 changes read, the rest resumed exactly once, across ring growth and wrap-around")
    func resumeHalf() throws {
        var window = ResumeWindow<TestInstant>(limits: .init(maxCount: 6_000), origin: LSN(0x100))
        let all = events(transactions: 100, perTransaction: 100)
        var now = TestInstant.zero
        for chunk in stride(from: 0, to: all.count, by: 100) {
            now = now.advanced(by: .milliseconds(10))
            window.append(contentsOf: all[chunk..<chunk + 100], at: now)
        }
        #expect(window.count == 6_000)
        let lastRead = all[4_999].cursor
        let rest = try window.events(after: lastRead)
        #expect(rest.count == 5_000)
        #expect(rest.map(\.cursor) == all[5_000...].map(\.cursor))
        #expect(Set(rest.map(\.cursor)).count == 5_000)
        #expect(throws: ResumeWindowError.self) { try window.events(after: all[3_998].cursor) }
        #expect(try window.events(after: all[3_999].cursor).count == 6_000)
    }
}
