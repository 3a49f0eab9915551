import RealtimeSync
import Testing

@Suite("outbound queue")
struct OutboundQueueTests {
    typealias Queue = OutboundQueue<Int>

    func written(_ next: Queue.Next) -> [Int]? {
        if case .write(let batch) = next { return batch }
        return nil
    }

    func isIdle(_ next: Queue.Next) -> Bool { if case .idle = next { true } else { false } }
    func isFinished(_ next: Queue.Next) -> Bool { if case .finished = next { true } else { false } }
    func closeCode(_ next: Queue.Next) -> WebSocketCloseCode? { if case .close(let code) = next { code } else { nil } }

    @Test("Defaults are 1,024 messages and 8 MiB")
    func defaults() {
        let limits = Queue.Limits()
        #expect(limits.maxMessages == 1_024)
        #expect(limits.maxBytes == 8 * 1_024 * 1_024)
        #expect(WebSocketCloseCode.tryAgainLater.rawValue == 1013)
        #expect(WebSocketCloseCode.goingAway.rawValue == 1001)
    }

    @Test("Messages come out in order, in batches bounded by count and bytes, with counts kept")
    func fifoAndBatches() {
        var queue = Queue()
        let r1 = queue.next()
        #expect(isIdle(r1))
        for value in 0..<10 { let r2 = queue.enqueue(value, byteCount: 100); #expect(r2 == .queued) }
        #expect(queue.queuedMessages == 10)
        #expect(queue.queuedBytes == 1_000)
        let r3 = queue.next(maxMessages: 4)
        #expect(written(r3) == [0, 1, 2, 3])
        let r4 = queue.next(maxMessages: 64, maxBytes: 250)
        #expect(written(r4) == [4, 5])
        let r5 = queue.next(maxMessages: 64, maxBytes: 10)
        #expect(written(r5) == [6])  // at least one, however big
        #expect(queue.queuedBytes == 300)
        let r6 = queue.next()
        #expect(written(r6) == [7, 8, 9])
        let r7 = queue.next()
        #expect(isIdle(r7))
        #expect(queue.enqueuedCount == 10)
        #expect(queue.dequeuedCount == 10)
        #expect(queue.queuedBytes == 0)
    }

    @Test("Past the message bound: overflow, the queue drops its messages and closes with 1013 at once")
    func messageBound() {
        var queue = Queue(limits: .init(maxMessages: 3, maxBytes: 1_000))
        for value in 0..<3 { let r8 = queue.enqueue(value, byteCount: 1); #expect(r8 == .queued) }
        let r9 = queue.enqueue(3, byteCount: 1)
        #expect(r9 == .overflow)
        #expect(!queue.isOpen)
        #expect(queue.closeCode == .tryAgainLater)
        #expect(queue.queuedMessages == 0)
        #expect(queue.queuedBytes == 0)
        #expect(queue.droppedCount == 4)
        let r10 = queue.next()
        #expect(closeCode(r10) == .tryAgainLater)
        let r11 = queue.next()
        #expect(isFinished(r11))
        let r12 = queue.enqueue(4, byteCount: 1)
        #expect(r12 == .closed)
    }

    @Test("Past the byte bound: overflow; exactly at it: queued; an empty or nearly empty queue takes one message of any size")
    func byteBound() {
        var queue = Queue(limits: .init(maxMessages: 100, maxBytes: 1_000))
        let r13 = queue.enqueue(0, byteCount: 600)
        #expect(r13 == .queued)
        let r14 = queue.enqueue(1, byteCount: 400)
        #expect(r14 == .queued)
        #expect(queue.queuedBytes == 1_000)
        let r15 = queue.next()
        #expect(written(r15) == [0, 1])
        let r16 = queue.enqueue(2, byteCount: 5_000)
        #expect(r16 == .queued)  // alone: allowed
        let r17 = queue.enqueue(3, byteCount: 1)
        #expect(r17 == .overflow)
        let r18 = queue.next()
        #expect(closeCode(r18) == .tryAgainLater)

        // A queue holding a little (at most maxBytes / 16: a `subscribed` reply before a
        // catch-up's first change) still takes one large message; one holding more does not.
        var keepingUp = Queue(limits: .init(maxMessages: 100, maxBytes: 1_000))
        #expect(keepingUp.enqueue(0, byteCount: 50) == .queued)
        #expect(keepingUp.enqueue(1, byteCount: 5_000) == .queued)
        #expect(keepingUp.enqueue(2, byteCount: 5_000) == .overflow)
        var behind = Queue(limits: .init(maxMessages: 100, maxBytes: 1_000))
        #expect(behind.enqueue(0, byteCount: 100) == .queued)
        #expect(behind.enqueue(1, byteCount: 5_000) == .overflow)

        var draining = Queue(limits: .init(maxMessages: 100, maxBytes: 1_000))
        let r19 = draining.enqueue(0, byteCount: 900)
        #expect(r19 == .queued)
        let r20 = draining.next()
        #expect(written(r20) == [0])  // the writer keeps up: room again
        let r21 = draining.enqueue(1, byteCount: 900)
        #expect(r21 == .queued)
    }

    @Test("close flushes what was queued before it, then sends the close frame once; later messages are refused")
    func flushOnClose() {
        var queue = Queue()
        for value in 0..<5 { _ = queue.enqueue(value, byteCount: 10) }
        queue.close(.goingAway)
        queue.close(.normalClosure)  // the first close wins
        let r22 = queue.enqueue(99, byteCount: 10)
        #expect(r22 == .closed)
        #expect(queue.closeCode == .goingAway)
        let r23 = queue.next(maxMessages: 3)
        #expect(written(r23) == [0, 1, 2])
        let r24 = queue.next(maxMessages: 3)
        #expect(written(r24) == [3, 4])
        let r25 = queue.next()
        #expect(closeCode(r25) == .goingAway)
        let r26 = queue.next()
        #expect(isFinished(r26))
        let r27 = queue.next()
        #expect(isFinished(r27))
        #expect(queue.droppedCount == 1)
    }

    @Test("closeNow drops the queue and closes at once")
    func closeNow() {
        var queue = Queue()
        for value in 0..<5 { _ = queue.enqueue(value, byteCount: 10) }
        queue.closeNow(.policyViolation)
        #expect(queue.queuedBytes == 0)
        let r28 = queue.next()
        #expect(closeCode(r28) == .policyViolation)
        let r29 = queue.next()
        #expect(isFinished(r29))
        #expect(queue.droppedCount == 5)
    }

    @Test("A long run through a small queue keeps order and returns to zero bytes")
    func longRun() async {
        var queue = Queue(limits: .init(maxMessages: 50, maxBytes: 10_000))
        var rng = SplitMix64(seed: 3)
        var next = 0
        var received: [Int] = []
        for iteration in 0..<5_000 {
            // Long CPU-bound loops give the cooperative pool back now and then: timing tests share it.
            if iteration % 256 == 255 { await Task.yield() }
            for _ in 0..<Int.random(in: 0...5, using: &rng) where queue.queuedMessages < 40 {
                let r30 = queue.enqueue(next, byteCount: Int.random(in: 1...200, using: &rng))
                #expect(r30 == .queued)
                next += 1
            }
            if let batch = written(queue.next(maxMessages: Int.random(in: 1...8, using: &rng))) { received += batch }
        }
        queue.close(.goingAway)
        // Keep the value that ends the loop: after the flush it must be the close itself.
        var last = queue.next()
        while let batch = written(last) {
            received += batch
            last = queue.next()
        }
        #expect(closeCode(last) == .goingAway, "the flush did not end with the close: \(last)")
        #expect(received == Array(0..<next))
        #expect(queue.queuedBytes == 0)
        #expect(queue.queuedMessages == 0)
        let r31 = queue.next()
        #expect(isFinished(r31), "the close was handed out once; finished after it: \(r31)")
        #expect(!queue.isOpen && queue.closeCode == nil)
    }
}

@Suite("server messages")
struct ServerMessageTests {
    @Test("Each message is exactly the spec's JSON", arguments: [
        (ServerMessage.subscribed(id: "s1", cursor: Cursor(commitLSN: LSN(0x16B3748), index: 3)),
         #"{"type":"subscribed","id":"s1","cursor":"00000000016B3748.00000003"}"#),
        (.snapshot(id: "s1", rows: [utf8(#"{"id":1,"status":"open"}"#)], done: false),
         #"{"type":"snapshot","id":"s1","rows":[{"id":1,"status":"open"}],"done":false}"#),
        (.snapshot(id: "s1", rows: [], done: true), #"{"type":"snapshot","id":"s1","rows":[],"done":true}"#),
        (.snapshot(id: "s1", rows: [utf8("{}"), utf8("{}")], done: true), #"{"type":"snapshot","id":"s1","rows":[{},{}],"done":true}"#),
        (.unsubscribed(id: "s1"), #"{"type":"unsubscribed","id":"s1"}"#),
        (.error(id: "s1", code: .invalidFilter, message: "unknown column 'stauts'"),
         #"{"type":"error","id":"s1","code":"invalid_filter","message":"unknown column 'stauts'"}"#),
        (.error(id: nil, code: .invalidMessage, message: "message is not valid JSON"),
         #"{"type":"error","code":"invalid_message","message":"message is not valid JSON"}"#),
        (.resyncRequired(id: "s1", message: "cursor is older than the resume window"),
         #"{"type":"resync_required","id":"s1","message":"cursor is older than the resume window"}"#),
        (.unsubscribed(id: "a\"b\\c\n\u{01}é😀"), #"{"type":"unsubscribed","id":"a\"b\\c\n\u0001é😀"}"#),
        (.error(id: "x", code: .internal, message: "tab\there"), #"{"type":"error","id":"x","code":"internal","message":"tab\there"}"#),
    ])
    func exact(message: ServerMessage, expected: String) {
        #expect(text(message.jsonBytes()) == expected)
    }

    @Test("Every error code has its wire string")
    func codes() {
        #expect(ProtocolErrorCode.allCases.map(\.rawValue) == [
            "invalid_message", "unknown_type", "invalid_filter", "unknown_table", "forbidden", "duplicate_subscription",
            "too_many_subscriptions", "snapshot_too_large", "rate_limited", "internal",
        ])
        for code in ProtocolErrorCode.allCases {
            #expect(text(ServerMessage.error(id: "s", code: code, message: "m").jsonBytes())
                == #"{"type":"error","id":"s","code":""# + code.rawValue + #"","message":"m"}"#)
        }
    }

    @Test("Snapshot rows use the change value forms")
    func snapshotRow() {
        let row = ServerMessage.snapshotRow(columns: itemsColumns, values: [utf8("1"), utf8("open \"x\""), utf8("1.50"), utf8("NaN"), nil, utf8("t")])
        #expect(text(row) == #"{"id":1,"status":"open \"x\"","amount":"1.50","price":"NaN","qty":null,"paid":true}"#)
    }
}
