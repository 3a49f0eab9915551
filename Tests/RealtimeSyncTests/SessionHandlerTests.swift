import Foundation
import RealtimeSync
import Testing

/// The session runs on the socket's event loop (`SessionHandler`): control frames, the close
/// handshake, and client messages that arrive while a catch-up runs in its own task.
@Suite("server: the session on the event loop")
struct SessionHandlerTests {
    @Test("A client's ping is answered with a pong carrying its payload")
    func pingAnswered() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            let payload = Array("are you there".utf8)
            try await socket.sendFrame(opcode: 0x9, payload: payload)
            let frame = try await withTimeout(5) { try await socket.receiveFrame() }
            #expect(frame?.opcode == 0xA)
            #expect(frame?.payload == payload)
            // The session still answers messages afterwards.
            try await socket.subscribe("s")
            await socket.close()
        }
    }

    @Test("A malformed close frame, or a frame the client did not mask (RFC 6455 5.1), is answered with 1002", arguments: [
        ("a close with a code no endpoint may send (1005)", maskedFrame(opcode: 0x8, [0x03, 0xED])),
        ("a close with a code outside every range (999)", maskedFrame(opcode: 0x8, [0x03, 0xE7])),
        ("a close with a one-byte payload", maskedFrame(opcode: 0x8, [0x03])),
        ("a close with a reason that is not UTF-8", maskedFrame(opcode: 0x8, [0x03, 0xE8, 0xC3, 0x28])),
        ("an unmasked text message", [UInt8(0x81), 0x02] + Array("{}".utf8)),
        ("an unmasked ping", [UInt8(0x89), 0x01, 0x41]),
        ("an unmasked close", [UInt8(0x88), 0x02, 0x03, 0xE8]),
    ])
    func protocolErrors(_ case: (String, [UInt8])) async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        // A close timeout far beyond the wait below: the server ends the connection after its
        // 1002 without waiting for a close frame from the client.
        try await withTestServer(source: source, configure: { $0.closeTimeout = .seconds(60) }) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("s")
            try await socket.send(`case`.1)
            #expect(try await socket.receiveClose() == 1002, "\(`case`.0)")
            #expect(try await socket.waitForEndOfStream(), "the server closes the connection after its answer")
            #expect(await eventually { test.server.statistics.sessions == 0 && test.server.statistics.subscriptions == 0 })
            #expect(test.server.statistics.closes[1002] == 1)
            await socket.close()
        }
    }

    @Test("A binary frame inside an unfinished text message is answered with 1002; a binary message alone with 1003")
    func binaryInsideText() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let inside = try await connectWebSocket(port: test.port)
            try await inside.send(maskedFrame(opcode: 0x1, Array(#"{"type":"#.utf8), fin: false) + maskedFrame(opcode: 0x2, [1, 2, 3]))
            #expect(try await inside.receiveClose() == 1002)
            let alone = try await connectWebSocket(port: test.port)
            try await alone.send(maskedFrame(opcode: 0x2, [1, 2, 3]))
            #expect(try await alone.receiveClose() == 1003)
            await inside.close()
            await alone.close()
        }
    }

    @Test("A ping or pong with a reserved bit set (no extension was agreed: RFC 6455 5.2) is answered with 1002, like a data frame with one",
          arguments: [0x9, 0xA])
    func reservedBitsOnControlFrames(opcode: Int) async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.send(maskedFrame(opcode: UInt8(opcode), [0x41], rsv: 0x4))
            #expect(try await socket.receiveClose() == 1002)
            await socket.close()
        }
    }

    @Test("A close with a registered code a client may send (1012 service restart, 1013 try again later, 1014 bad gateway, 1000, 4000) is answered with 1000, not 1002",
          arguments: [1000, 1012, 1013, 1014, 4000])
    func registeredCloseCodes(code: Int) async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.send(maskedFrame(opcode: 0x8, [UInt8(code >> 8), UInt8(code & 0xFF)]))
            #expect(try await socket.receiveClose() == 1000, "close \(code)")
            #expect(await eventually { test.server.statistics.sessions == 0 })
            await socket.close()
        }
    }

    @Test("A close frame without a payload is answered with 1000")
    func emptyClose() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.sendFrame(opcode: 0x8, payload: [])
            #expect(try await socket.receiveClose() == 1000)
            #expect(try await socket.waitForEndOfStream())
            #expect(await eventually { test.server.statistics.sessions == 0 })
            await socket.close()
        }
    }

    @Test("Messages sent right behind a resume are answered after its catch-up, in the order sent")
    func messagesHeldBehindCatchUp() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let first = try await connectWebSocket(port: test.port)
            try await first.subscribe("live")
            source.publish(itemInserts(1...1))
            let cursor = try #require(try await first.receiveJSON()["cursor"] as? String)
            source.publish(itemInserts(2...200))
            for _ in 2...200 { _ = try await first.receiveJSON() }

            let socket = try await connectWebSocket(port: test.port)
            // Three messages in one write: a resume with 199 changes to catch up, then two
            // messages that must wait for it.
            var bytes: [UInt8] = []
            for text in [#"{"type":"subscribe","id":"r","table":"items","since":"\#(cursor)"}"#,
                         #"{"type":"subscribe","id":"r","table":"items"}"#,
                         #"{"type":"unsubscribe","id":"r"}"#] {
                bytes += maskedTextFrame(text)
            }
            try await socket.send(bytes)
            var types: [String] = []
            var ids: [Int] = []
            while types.last != "unsubscribed" {
                let message = try await socket.receiveJSON()
                let type = try #require(message["type"] as? String)
                types.append(type)
                if type == "change", let row = message["new"] as? [String: Any], let id = row["id"] as? Int { ids.append(id) }
            }
            #expect(types.first == "subscribed")
            #expect(ids == Array(2...200), "the catch-up sent every change after the cursor, in order")
            // The duplicate subscribe is refused (the resume had opened "r"), then "r" is closed.
            #expect(Array(types.suffix(2)) == ["error", "unsubscribed"])
            #expect(types.count == 1 + 199 + 2)
            #expect(await eventually { test.server.statistics.subscriptions == 1 })
            await socket.close()
            await first.close()
        }
    }

    @Test("A client that resets while its catch-up waits for queue space is released at once")
    func resetDuringCatchUp() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source, alone: true, configure: { configuration in
            configuration.queueLimits = .init(maxMessages: 8, maxBytes: 64 << 10)
            configuration.closeTimeout = .seconds(30)
        }) { test in
            let first = try await connectWebSocket(port: test.port)
            try await first.subscribe("live")
            source.publish(itemInserts(1...1))
            let cursor = try #require(try await first.receiveJSON()["cursor"] as? String)
            await first.close()
            // ~36 MB after the cursor: more than the socket's buffers hold.
            source.publish(itemInserts(2...600, padding: 60_000))
            #expect(await eventually { test.server.statistics.sessions == 0 })

            let socket = try await connectWebSocket(port: test.port)
            try await socket.stopReading()
            try await socket.sendText(#"{"type":"subscribe","id":"r","table":"items","since":"\#(cursor)"}"#)
            // The catch-up fills the kernel's buffers and NIO's, then waits for queue space.
            #expect(await eventually(10) { test.server.statistics.queuedBytes > 0 })
            try await Task.sleep(for: .milliseconds(200))
            #expect(test.server.statistics.sessions == 1)
            await socket.reset()
            // Without the catch-up's cancellation the session would wait for the close
            // timeout (30 s), or forever.
            #expect(await eventually(5) { test.server.statistics.sessions == 0 }, "the session was not released")
            #expect(test.server.statistics.subscriptions == 0)
            #expect(test.server.statistics.queuedBytes == 0)
        }
    }
}

/// A masked, final text frame (as a client sends it).
func maskedTextFrame(_ text: String) -> [UInt8] { maskedFrame(opcode: 0x1, Array(text.utf8)) }

@Suite("server: a client that pings but does not read")
struct PingFloodTests {
    /// Sends `count` pings of 125 bytes (the payload starts with the ping's index), in writes of about 1 MB.
    func flood(_ socket: TestConnection, count: Int) async throws {
        var batch: [UInt8] = []
        for index in 0..<count {
            var payload = Array(repeating: UInt8(ascii: "p"), count: 125)
            withUnsafeBytes(of: UInt32(index).bigEndian) { payload.replaceSubrange(0..<4, with: $0) }
            batch += maskedFrame(opcode: 0x9, payload)
            if batch.count > 1 << 20 || index == count - 1 {
                try await socket.send(batch)
                batch.removeAll(keepingCapacity: true)
            }
        }
    }

    /// A subscribed client that reads nothing, with the way back filled by 2.6 MB of pongs
    /// against about 200 KB of buffers (the server's send buffer fixed, see `pingFlood`), read
    /// by the server: nothing the server writes to it now goes out.
    func stuckClient(_ test: TestServer) async throws -> TestConnection {
        let socket = try await connectWebSocket(port: test.port, receiveBuffer: 64 * 1024)
        try await socket.subscribe("s")
        try await socket.stopReading()
        let port = try #require(socket.channel.localAddress?.port)
        try #require(await eventually(10) { setServerSendBuffer(serverPort: test.port, clientPort: port, bytes: 32 * 1024) },
                     "could not set the send buffer of the server's end of the connection: /proc/net/tcp has \(serverSocketFields(serverPort: test.port, clientPort: port).map { $0.joined(separator: " ") } ?? "no established entry")")
        try await flood(socket, count: 20_000)
        let drained = await eventually(120) { serverReceiveQueue(serverPort: test.port, clientPort: port) == 0 }
        #expect(drained, "the server did not read the pings")
        return socket
    }

    @Test("A frame the decoder rejects while the client reads nothing: the server's 1009 cannot be written, and the connection is dropped after closeTimeout all the same")
    func rejectedFrameWhileNotReading() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source, alone: true, configure: { $0.closeTimeout = .seconds(1); $0.pingInterval = .seconds(600) }) { test in
            let socket = try await stuckClient(test)
            // A text frame announcing 1 MiB, over maxClientMessageBytes: NIO's decoder rejects it,
            // and its error handler closes only once its 1009 is written, which never happens.
            var header: [UInt8] = [0x81, 0x80 | 127]
            for shift in stride(from: 56, through: 0, by: -8) { header.append(UInt8(((1 << 20) >> shift) & 0xFF)) }
            try await socket.send(header + [0xA1, 0x5C, 0x03, 0x7E])
            #expect(await eventually(15) { test.server.statistics.sessions == 0 }, "the session was not released")
            #expect(test.server.statistics.subscriptions == 0)
            await socket.close()
        }
    }

    @Test("A client that sends its close while reading nothing is dropped after closeTimeout")
    func closeWhileNotReading() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source, alone: true, configure: { $0.closeTimeout = .seconds(1); $0.pingInterval = .seconds(600) }) { test in
            let socket = try await stuckClient(test)
            try await socket.sendClose(1000)
            #expect(await eventually(10) { test.server.statistics.sessions == 0 }, "the session was not released")
            #expect(test.server.statistics.subscriptions == 0)
            await socket.close()
        }
    }

    @Test("Pings from a client that reads nothing do not pile up pongs: only the latest is answered once the socket drains")
    func pingFlood() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        // A ping interval longer than the test: a client that reads nothing never answers the
        // server's pings, and in a slow full-suite run the flood alone took over a minute, so
        // the default (30 s, dropped after two) closed the socket mid-test.
        try await withTestServer(source: source, alone: true, configure: { $0.pingInterval = .seconds(600) }) { test in
            // A fixed 64 KB receive buffer, and the server's send buffer fixed at 32 KB (the
            // kernel doubles it): otherwise it grows up to tcp_wmem's 4 MB, and a flood large
            // enough to overflow it took minutes in a loaded full-suite run of this debug build.
            let socket = try await connectWebSocket(port: test.port, receiveBuffer: 64 * 1024)
            try await socket.stopReading()
            let port = try #require(socket.channel.localAddress?.port)
            try #require(await eventually(10) { setServerSendBuffer(serverPort: test.port, clientPort: port, bytes: 32 * 1024) },
                         "could not set the send buffer of the server's end of the connection: /proc/net/tcp has \(serverSocketFields(serverPort: test.port, clientPort: port).map { $0.joined(separator: " ") } ?? "no established entry")")
            // 20,000 pings of 125 bytes: 2.6 MB of pongs, several times what the buffers between
            // server and client hold (about 64 + 64 KB, and NIO's 64 KB before it stops writing).
            let count = 20_000
            try await flood(socket, count: count)
            // Until the server has read every ping: the pings can all sit in its receive buffer
            // (tcp_rmem allows 32 MB here), and in a full-suite run it had answered too few
            // after a fixed 500 ms for its socket to have filled (every ping then got a pong).
            let drained = await eventually(120) { serverReceiveQueue(serverPort: test.port, clientPort: port) == 0 }
            #expect(drained, "the server did not read the pings within 120 s: \(serverReceiveQueue(serverPort: test.port, clientPort: port).map { "\($0) bytes left" } ?? "its socket is gone")")
            try await Task.sleep(for: .milliseconds(300))
            try await socket.startReading()
            // `statistics.queuedBytes` cannot show pongs piling up: it counts the sessions'
            // message queues (OutboundQueue), not NIO's pending writes, where pongs go; it stays
            // 0 either way. Asserted instead, from the pongs themselves: each carries a ping's
            // whole payload; they come in the order of the pings, each ping answered at most
            // once and never after a later one (the one kept while the socket was not writable
            // is the latest); the first ping, sent while the socket was writable, is answered;
            // at least one run of pings was collapsed (pongs < pings); the last pong answers the
            // last ping, and no pong follows it (`subscribe` below needs `subscribed` next).
            let fill = Array(repeating: UInt8(ascii: "p"), count: 121)
            var pongs = 0
            var previous = -1
            var skips = 0
            while previous != count - 1 {
                let frame = try #require(try await withTimeout(10) { try await socket.receiveFrame() })
                try #require(frame.opcode == 0xA, "expected a pong, got opcode \(frame.opcode)")
                try #require(frame.payload.count == 125 && Array(frame.payload[4...]) == fill, "pong \(pongs) does not carry a ping's payload")
                let index = frame.payload.prefix(4).reduce(0) { (value: Int, byte: UInt8) -> Int in value << 8 | Int(byte) }
                if pongs == 0 { #expect(index == 0, "the first ping came while the socket was writable: it must be answered") }
                try #require(index > previous, "the pong for ping \(index) came after the pong for ping \(previous): out of order or answered twice")
                if index != previous + 1 { skips += 1 }
                previous = index
                pongs += 1
            }
            #expect(pongs < count, "every ping was answered: pongs piled up in the server while the client read nothing")
            #expect(skips >= 1, "no ping was left unanswered")
            // The session is still served.
            try await socket.subscribe("s")
            await socket.close()
        }
    }
}

/// A masked frame (as a client sends it) with every header field chosen by the caller.
func maskedFrame(opcode: UInt8, _ payload: [UInt8], fin: Bool = true, rsv: UInt8 = 0) -> [UInt8] {
    var frame: [UInt8] = [(fin ? 0x80 : 0) | (rsv & 0x7) << 4 | (opcode & 0xF)]
    if payload.count < 126 {
        frame.append(0x80 | UInt8(payload.count))
    } else if payload.count <= 0xFFFF {
        frame += [0x80 | 126, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
    } else {
        frame.append(0x80 | 127)
        for shift in stride(from: 56, through: 0, by: -8) { frame.append(UInt8((payload.count >> shift) & 0xFF)) }
    }
    let mask: [UInt8] = [0xA1, 0x5C, 0x03, 0x7E]
    frame += mask
    for (index, byte) in payload.enumerated() { frame.append(byte ^ mask[index % 4]) }
    return frame
}

@Suite("server: random frames on real sockets")
struct SessionWireFuzzTests {
    /// A payload: random bytes, or a message that is nearly or fully valid.
    func payload(_ rng: inout SplitMix64) -> [UInt8] {
        let messages = [
            #"{"type":"subscribe","id":"a","table":"items"}"#,
            #"{"type":"subscribe","id":"b","table":"items","filter":"status=eq.open"}"#,
            #"{"type":"subscribe","id":"c","table":"items","since":"0000000000000001.00000000"}"#,
            #"{"type":"subscribe","id":"d","table":"nope"}"#,
            #"{"type":"unsubscribe","id":"a"}"#,
            #"{"type":"unsubscribe","id":"zz"}"#,
            #"{"type":"subscribe","id":"e","table":"items","filter":"id=in.(1,2,"}"#,
            #"{"type":42}"#,
        ]
        switch rng.next() % 6 {
        case 0: return []
        case 1: return (0..<Int(rng.next() % 200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        case 2: return Array(repeating: UInt8(ascii: "x"), count: Int(rng.next() % 3) == 0 ? 70_000 : Int(rng.next() % 2_000))
        default:
            var bytes = Array(messages[Int(rng.next() % UInt64(messages.count))].utf8)
            if rng.next() % 4 == 0, !bytes.isEmpty { bytes.removeLast(Int(rng.next() % UInt64(bytes.count))) }
            return bytes
        }
    }

    @Test("60 clients send random frame sequences (every opcode, fragments, reserved bits, oversized, half messages) and leave in random ways: nothing leaks and the server still serves")
    func randomFrames() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source, alone: true, configure: { $0.closeTimeout = .seconds(1) }) { test in
            // REALTIME_FUZZ_SEED=<n> replays or explores another seed.
            let seed = ProcessInfo.processInfo.environment["REALTIME_FUZZ_SEED"].flatMap { UInt64($0) } ?? 20_261_127
            try await withThrowingTaskGroup(of: Void.self) { group in
                for client in 0..<60 {
                    group.addTask {
                        var rng = SplitMix64(seed: seed &+ UInt64(client))
                        let socket = try await connectWebSocket(port: test.port)
                        var bytes: [UInt8] = []
                        for _ in 0..<(1 + Int(rng.next() % 30)) {
                            let opcodes: [UInt8] = [0, 1, 1, 1, 2, 8, 9, 9, 10, 3, 7, 11, 15]
                            let opcode = opcodes[Int(rng.next() % UInt64(opcodes.count))]
                            var body = payload(&rng)
                            if opcode >= 8 { body = Array(body.prefix(rng.next() % 8 == 0 ? 200 : 125)) }  // sometimes an oversized control frame
                            bytes += maskedFrame(opcode: opcode, body, fin: rng.next() % 5 != 0,
                                               rsv: rng.next() % 12 == 0 ? UInt8(rng.next() % 8) : 0)
                        }
                        if rng.next() % 4 == 0 { bytes += [0x81, 0xFE] }  // a header cut short
                        // Arbitrary TCP segmentation.
                        var offset = 0
                        while offset < bytes.count {
                            let size = min(bytes.count - offset, 1 + Int(rng.next() % 5_000))
                            try? await socket.send(Array(bytes[offset..<offset + size]))
                            offset += size
                        }
                        _ = try? await withTimeout(0.5) { while try await socket.receiveFrame() != nil {} }
                        switch rng.next() % 3 {
                        case 0: try? await socket.sendClose(1000)
                        case 1: await socket.reset()
                        default: break
                        }
                        await socket.close()
                    }
                }
                try await group.waitForAll()
            }
            #expect(await eventually(10) { test.server.statistics.sessions == 0 }, "sessions left: \(test.server.statistics.sessions)")
            #expect(test.server.statistics.subscriptions == 0)
            #expect(test.server.statistics.queuedBytes == 0)
            // Still serving.
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("after")
            source.publish(itemInserts(1...1))
            #expect(try await socket.receiveJSON()["type"] as? String == "change")
            await socket.close()
        }
    }
}

/// Bytes the server has not yet read from the connection of local `clientPort` to
/// 127.0.0.1:`serverPort` (its socket's receive queue in /proc/net/tcp), or nil if not found.
func serverReceiveQueue(serverPort: Int, clientPort: Int) -> Int? {
    serverSocketFields(serverPort: serverPort, clientPort: clientPort).flatMap { fields in
        fields[4].split(separator: ":").last.flatMap { Int($0, radix: 16) }
    }
}

/// The /proc/net/tcp fields of the server's end of the established connection from local `clientPort` to
/// 127.0.0.1:`serverPort` (sl, local_address, rem_address, st, tx_queue:rx_queue, tr, retrnsmt,
/// uid, timeout, inode, ...), or nil if not found.
func serverSocketFields(serverPort: Int, clientPort: Int) -> [Substring]? {
    // Read to the end: /proc files report size 0, and a reader that trusts the size can stop
    // after the first page (a long full-suite run has more sockets than a page lists).
    guard let data = FileHandle(forReadingAtPath: "/proc/net/tcp")?.readDataToEndOfFile() else { return nil }
    let table = String(decoding: data, as: UTF8.self)
    let local = String(format: "0100007F:%04X", serverPort)
    let remote = String(format: "0100007F:%04X", clientPort)
    for line in table.split(separator: "\n").dropFirst() {
        let fields = line.split(separator: " ")
        // Established (01) only: an earlier connection between the same two ports can linger
        // in TIME_WAIT, with no socket (inode 0), in a long run that reuses ports.
        guard fields.count > 9, fields[1] == local, fields[2] == remote, fields[3] == "01", fields[9] != "0" else { continue }
        return fields
    }
    return nil
}

/// Fixes the send buffer of the server's end of that connection (the server runs in this
/// process: its descriptor is found by the socket's inode), so that how much the kernel holds
/// for a client that reads nothing does not depend on the kernel's autotuning. True if set.
func setServerSendBuffer(serverPort: Int, clientPort: Int, bytes: Int32) -> Bool {
    guard let fields = serverSocketFields(serverPort: serverPort, clientPort: clientPort) else { return false }
    let target = "socket:[\(fields[9])]"
    guard let descriptors = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return false }
    for name in descriptors {
        guard let fd = Int32(name),
              (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)")) == target else { continue }
        var size = bytes
        return setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size)) == 0
    }
    return false
}
