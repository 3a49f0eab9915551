import Foundation
import Synchronization
import RealtimeSync
import Testing

@Suite("server: close codes")
struct ServerCloseTests {
    /// Opens a socket with one subscription, runs `provoke`, and returns the close code the client got.
    func closeCode(alone: Bool = false, configure: (inout RealtimeServerConfiguration) -> Void = { _ in },
                   _ provoke: @escaping @Sendable (TestConnection, InMemoryChangeSource, TestServer) async throws -> UInt16?) async throws
        -> (code: UInt16?, statistics: RealtimeServerStatistics) {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        let result = Mutex<(UInt16?, RealtimeServerStatistics?)>((nil, nil))
        try await withTestServer(source: source, alone: alone, configure: configure) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("s")
            let code = try await provoke(socket, source, test)
            #expect(await eventually { test.server.statistics.sessions == 0 })
            result.withLock { $0 = (code, test.server.statistics) }
            await socket.close()
        }
        let (code, statistics) = result.withLock { $0 }
        return (code, try #require(statistics))
    }

    @Test("1000: the server echoes the client's close")
    func normalClosure() async throws {
        let (code, statistics) = try await closeCode { socket, _, _ in
            try await socket.sendClose(1000)
            return try await socket.receiveClose()
        }
        #expect(code == 1000)
        #expect(statistics.closes[1000] == 1)
        #expect(statistics.subscriptions == 0)
    }

    @Test("1003: a binary frame")
    func binaryFrame() async throws {
        let (code, statistics) = try await closeCode { socket, _, _ in
            try await socket.sendFrame(opcode: 0x2, payload: [1, 2, 3])
            let code = try await socket.receiveClose()
            try await socket.sendClose(1000)
            return code
        }
        #expect(code == 1003)
        #expect(statistics.closes[1003] == 1)
    }

    @Test("A ping read after a fatal frame, before the server's close went out, is still answered (RFC 6455 5.5.2: until a close is received), then the 1003 close; a ping before it too")
    func pongBeforeTheClose() async throws {
        let binary = TestConnection.frameBytes(opcode: 0x2, payload: [1, 2, 3])
        let ping = TestConnection.frameBytes(opcode: 0x9, payload: [7])
        for (order, bytes) in [("binary, then ping", binary + ping), ("ping, then binary", ping + binary)] {
            // In one write, so that the server reads both at once.
            let (code, _) = try await closeCode { socket, _, _ in
                try await socket.send(bytes)
                let first = try await withTimeout(5, "a frame") { try await socket.receiveFrame() }
                let code = try await socket.receiveClose()
                try await socket.sendClose(1000)
                return first?.opcode == 0xA ? code : nil
            }
            #expect(code == 1003, "\(order): a pong, then the 1003 close")
        }
    }

    @Test("1007: a text frame that is not UTF-8")
    func invalidUTF8() async throws {
        let (code, statistics) = try await closeCode { socket, _, _ in
            try await socket.sendFrame(opcode: 0x1, payload: Array(#"{"type":"unsubscribe","id":""#.utf8) + [0xC3, 0x28] + Array(#""}"#.utf8))
            let code = try await socket.receiveClose()
            try await socket.sendClose(1000)
            return code
        }
        #expect(code == 1007)
        #expect(statistics.closes[1007] == 1)
    }

    @Test("1009: one frame over 64 KiB")
    func frameTooBig() async throws {
        let (code, statistics) = try await closeCode { socket, _, _ in
            try await socket.sendFrame(opcode: 0x1, payload: Array(repeating: UInt8(ascii: " "), count: (64 << 10) + 1))
            return try await socket.receiveClose()
        }
        #expect(code == 1009)
        #expect(statistics.closes[1009] == 1, "\(statistics.closes)")
    }

    @Test("1009: a message of several frames over 64 KiB")
    func messageTooBig() async throws {
        let (code, statistics) = try await closeCode { socket, _, _ in
            let half = Array(repeating: UInt8(ascii: " "), count: 40 << 10)
            try await socket.sendFrame(opcode: 0x1, payload: half, fin: false)
            try await socket.sendFrame(opcode: 0x0, payload: half, fin: true)
            let code = try await socket.receiveClose()
            try await socket.sendClose(1000)
            return code
        }
        #expect(code == 1009)
        #expect(statistics.closes[1009] == 1, "\(statistics.closes)")
    }

    @Test("A message of several frames within 64 KiB is assembled and answered")
    func fragmentedMessage() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            let text = Array(#"{"type":"subscribe","id":"f","table":"items"}"#.utf8)
            try await socket.sendFrame(opcode: 0x1, payload: Array(text[..<10]), fin: false)
            try await socket.sendFrame(opcode: 0x0, payload: Array(text[10...]), fin: true)
            #expect(try await socket.receiveJSON()["type"] as? String == "subscribed")
            await socket.close()
        }
    }

    @Test("1002: a continuation frame with no message started")
    func protocolError() async throws {
        let (code, statistics) = try await closeCode { socket, _, _ in
            try await socket.sendFrame(opcode: 0x0, payload: Array("orphan".utf8))
            let code = try await socket.receiveClose()
            try await socket.sendClose(1000)
            return code
        }
        #expect(code == 1002)
        #expect(statistics.closes[1002] == 1)
        #expect(statistics.subscriptions == 0)
    }

    @Test("1013: when the fan-out falls behind the resume window, subscribed clients get what was queued, then 1013; resuming then answers resync_required, never a silent gap")
    func fanoutBehindWindow() async throws {
        struct CutOff: Error {}
        let source = InMemoryChangeSource(catalog: serverCatalog, windowLimits: .init(maxCount: 5))
        try await withTestServer(source: source) { test in
            let subscribed = try await connectWebSocket(port: test.port)
            try await subscribed.subscribe("s")
            let idle = try await connectWebSocket(port: test.port)
            source.publish(itemInserts(1...1))
            let first = try await subscribed.receiveJSON()
            let cursor = try #require(first["cursor"] as? String)
            // The fan-out's reader is cut off, and the window moves on by more than it holds.
            source.failStreams(with: CutOff())
            source.publish(itemInserts(2...20))
            #expect(try await subscribed.receiveClose(timeout: 10) == 1013)
            try await subscribed.sendClose(1000)
            #expect(await eventually { test.server.statistics.subscriptions == 0 })
            // A socket without subscriptions lost nothing and stays open.
            try await idle.sendText(#"{"type":"unsubscribe","id":"none"}"#)
            #expect(try await idle.receiveJSON()["type"] as? String == "error")
            let again = try await connectWebSocket(port: test.port)
            try await again.sendText(#"{"type":"subscribe","id":"s","table":"public.items","since":"\#(cursor)"}"#)
            #expect(try await again.receiveJSON()["type"] as? String == "resync_required")
            await again.close()
            await idle.close()
            await subscribed.close()
        }
    }

    @Test("1013: a client beyond its send queue is closed and everything it held is freed")
    func slowConsumer() async throws {
        let (code, statistics) = try await closeCode(alone: true, configure: { configuration in
            configuration.queueLimits = .init(maxMessages: 8, maxBytes: 64 << 10)
            configuration.closeTimeout = .seconds(10)
        }) { socket, source, test in
            // The client reads nothing while ~36 MB of changes arrive: the kernel's socket
            // buffers fill (here tcp_wmem allows up to 4 MB sent, tcp_rmem 128 KB received, which
            // does not grow while nothing is read), then NIO's, then the queue.
            try await socket.stopReading()
            source.publish(itemInserts(1...600, padding: 60_000))
            #expect(await eventually(20) { test.server.statistics.subscriptions == 0 })
            try await socket.startReading()
            let code = try await socket.receiveClose(timeout: 30)
            try await socket.sendClose(1000)
            #expect(await eventually { test.server.statistics.sessions == 0 })
            return code
        }
        #expect(code == 1013)
        #expect(statistics.closes[1013] == 1)
        #expect(statistics.queuedBytes == 0)
    }

    @Test("1013: a since catch-up that the source cuts off because the client reads too slowly closes the socket with 1013 and leaves nothing behind; other clients keep their stream")
    func slowCatchUp() async throws {
        // Each stream may hold 100 unread changes beyond its backlog, as the capture's hub
        // (`consumerBufferLimit`) cuts off a reader that falls further behind.
        let source = InMemoryChangeSource(catalog: serverCatalog, streamBufferLimit: 100)
        try await withTestServer(source: source, alone: true, configure: { configuration in
            configuration.queueLimits = .init(maxMessages: 8, maxBytes: 1 << 20)
            configuration.closeTimeout = .seconds(10)
        }) { test in
            let live = try await connectWebSocket(port: test.port)
            try await live.subscribe("l")
            // Four at a time, each read before the next: the live client stays within its queue.
            func publishAndRead(_ ids: ClosedRange<Int>) async throws {
                for first in stride(from: ids.lowerBound, through: ids.upperBound, by: 4) {
                    let batch = first...min(first + 3, ids.upperBound)
                    source.publish(itemInserts(batch, padding: 4_000))
                    for id in batch { #expect((try await live.receiveJSON(timeout: 20)["new"] as? [String: Any])?["id"] as? Int == id) }
                }
            }
            try await publishAndRead(1...300)  // 1.2 MB in the window
            // A client that reads nothing resumes from the first change: its catch-up stops once
            // about 200 KB fill its send queue and the fixed socket buffers.
            let slow = try await connectWebSocket(port: test.port, receiveBuffer: 64 * 1024)
            let port = try #require(slow.channel.localAddress?.port)
            try #require(await eventually(10) { setServerSendBuffer(serverPort: test.port, clientPort: port, bytes: 32 * 1024) },
                         "could not set the send buffer of the server's end of the connection")
            try await slow.subscribe("other", filter: "status=eq.none")
            try await slow.stopReading()
            let since = itemInserts([1])[0].cursor.description
            try await slow.sendText(#"{"type":"subscribe","id":"s","table":"items","since":"\#(since)"}"#)
            #expect(await eventually(10) { source.openStreamCount == 2 }, "the catch-up did not open its stream")
            // 200 live changes: more than the catch-up's stream may hold unread (the reader took
            // about 50 of its backlog before it waited).
            try await publishAndRead(301...500)
            // The reader, waiting for the client, learns of the cut-off once the client reads
            // the changes sent and queued before it: then the close.
            try await slow.startReading()
            #expect(try await slow.receiveClose(timeout: 30) == 1013)
            // Answered, as a client does: otherwise the session ends only at closeTimeout (10 s here).
            try await slow.sendClose(1000)
            #expect(await eventually(10) { test.server.statistics.sessions == 1 }, "the slow client's session was not released")
            let statistics = test.server.statistics
            #expect(statistics.closes[1013] == 1)
            #expect(statistics.subscriptions == 1)  // the live client's; nothing of the slow one's
            #expect(await eventually { source.openStreamCount == 1 })  // only the fan-out's
            try await publishAndRead(501...501)
            await slow.close()
            await live.close()
        }
    }

    @Test("Close watchdog: a client that reads nothing while the server closes it is dropped after closeTimeout, and the session is released")
    func closeWatchdog() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source, alone: true, configure: { configuration in
            configuration.queueLimits = .init(maxMessages: 8, maxBytes: 64 << 10)
            configuration.closeTimeout = .seconds(1)
        }) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("s")
            // The client reads nothing: the socket's buffers fill, the writer waits for them,
            // the queue overflows (1013, nothing more can be written), and only the watchdog ends it.
            try await socket.stopReading()
            source.publish(itemInserts(1...600, padding: 60_000))
            #expect(await eventually(20) { test.server.statistics.subscriptions == 0 })
            #expect(await eventually(15) { test.server.statistics.sessions == 0 }, "the session was not released")
            #expect(test.server.statistics.closes[1013] == 1)
            await socket.close()
        }
    }

    @Test("A client that misses two pings in a row is dropped (not after one); one that answers stays")
    func pingTimeout() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source, configure: { $0.pingInterval = .milliseconds(500) }) { test in
            let connected = ContinuousClock.now
            let silent = try await connectWebSocket(port: test.port)
            silent.answersPings = false
            try await silent.subscribe("s")
            let answering = try await connectWebSocket(port: test.port)
            try await answering.subscribe("s")
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    // Reads (and so answers pings) until the change arrives.
                    let change = try await answering.receiveJSON(timeout: 10)
                    #expect(change["type"] as? String == "change")
                }
                #expect(try await silent.waitForEndOfStream(timeout: 5))
                // PROTOCOL.md: dropped after two missed pings, so not before the third is due.
                #expect(silent.pingsSeen == 2)
                #expect(connected.duration(to: .now) >= .milliseconds(1_400))
                #expect(await eventually { test.server.statistics.sessions == 1 && test.server.statistics.subscriptions == 1 })
                // The answering client is still served after several intervals.
                try await Task.sleep(for: .milliseconds(1_600))
                source.publish(itemInserts([1]))
                try await group.waitForAll()
            }
            #expect(answering.pingsSeen >= 3)
            #expect(test.server.statistics.closes[1001] == 1)
            await answering.close()
        }
    }
}
