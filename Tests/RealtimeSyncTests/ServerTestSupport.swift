import Foundation
import Logging
import NIOCore
import NIOPosix
import RealtimeSync
import ServiceLifecycle
import Synchronization
import Testing
import TestSupport

/// Errors of the test client.
struct TestClientError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Runs `body` for at most `seconds`.
func withTimeout<T: Sendable>(_ seconds: Double, _ what: String = "operation",
                              _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await cancellableSleep(.milliseconds(Int64(seconds * 1000)))
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else {
            throw TestClientError("\(what) timed out after \(seconds)s")
        }
        return value
    }
}

/// Sleeps for `duration` on an event loop timer that cancellation removes at once. (A cancelled
/// `Task.sleep` returns early, but on Linux its timer and job stay allocated until the original
/// deadline: thousands of short-lived timeouts would look like a leak in the RSS tests.)
func cancellableSleep(_ duration: TimeAmount) async throws {
    let loop = MultiThreadedEventLoopGroup.singleton.any()
    let promise = loop.makePromise(of: Void.self)
    let scheduled = loop.scheduleTask(in: duration) { promise.succeed() }
    try await withTaskCancellationHandler {
        try await promise.futureResult.get()
    } onCancel: {
        scheduled.cancel()
        promise.fail(CancellationError())
    }
}

/// Polls `condition` every 10 ms for at most `seconds`; false when it never held.
func eventually(_ seconds: Double = 5, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int(seconds * 1000)))
    while ContinuousClock.now < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}

/// Collects bytes a connection receives, for the async side to read.
final class ByteCollector: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let continuation: AsyncThrowingStream<ByteBuffer, any Error>.Continuation

    init(_ continuation: AsyncThrowingStream<ByteBuffer, any Error>.Continuation) { self.continuation = continuation }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { continuation.yield(unwrapInboundIn(data)) }
    func channelInactive(context: ChannelHandlerContext) { continuation.finish() }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .some(ChannelEvent.inputClosed) = event as? ChannelEvent { continuation.finish() }
        context.fireUserInboundEventTriggered(event)
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        continuation.finish(throwing: error)
        context.close(promise: nil)
    }
}

/// A WebSocket frame as the test client sees it.
struct TestFrame: Sendable {
    var fin: Bool
    var opcode: UInt8
    var payload: [UInt8]

    var text: String { String(decoding: payload, as: UTF8.self) }
    /// The close code of a close frame.
    var closeCode: UInt16? {
        guard opcode == 0x8, payload.count >= 2 else { return nil }
        return UInt16(payload[0]) << 8 | UInt16(payload[1])
    }
}

/// A raw HTTP/1.1 + WebSocket client over NIO: every byte is the test's to choose.
final class TestConnection: @unchecked Sendable {
    // @unchecked: one test task uses a connection at a time; the channel itself is thread-safe.
    let channel: any Channel
    private var iterator: AsyncThrowingStream<ByteBuffer, any Error>.AsyncIterator
    private var buffer: [UInt8] = []
    /// Whether `receiveFrame` answers pings with pongs (on by default).
    var answersPings = true
    /// Pings seen.
    private(set) var pingsSeen = 0

    private init(channel: any Channel, stream: AsyncThrowingStream<ByteBuffer, any Error>) {
        self.channel = channel
        self.iterator = stream.makeAsyncIterator()
    }

    /// Opens a TCP connection to 127.0.0.1:`port`.
    /// Connects to the server on `port`. `receiveBuffer` fixes the socket's receive buffer
    /// (SO_RCVBUF, set before the connect): the kernel then does not grow it, up to
    /// `tcp_rmem`'s maximum (32 MB on the project's machine), while the test reads nothing.
    static func open(port: Int, receiveBuffer: Int? = nil) async throws -> TestConnection {
        let (stream, continuation) = AsyncThrowingStream.makeStream(of: ByteBuffer.self)
        var bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        if let receiveBuffer { bootstrap = bootstrap.channelOption(.socketOption(.so_rcvbuf), value: SocketOptionValue(receiveBuffer)) }
        let channel = try await bootstrap
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ByteCollector(continuation)) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return TestConnection(channel: channel, stream: stream)
    }

    func send(_ bytes: [UInt8]) async throws {
        try await channel.writeAndFlush(ByteBuffer(bytes: bytes)).get()
    }

    /// Everything the server sends until it closes the connection, or nil if it is still open
    /// after `timeout` seconds.
    func readToEnd(timeout: Double) async throws -> [UInt8]? {
        try? await withTimeout(timeout, "waiting for the server to close") {
            while try await self.fill() {}
            defer { self.buffer.removeAll() }
            return self.buffer
        }
    }

    /// What the server sent until `text` appears in it (then taken from the buffer), or what
    /// came before the end of the stream or `timeout` seconds.
    func read(until text: String, timeout: Double) async throws -> String {
        let marker = Array(text.utf8)
        _ = try? await withTimeout(timeout, "waiting for \(text)") {
            while self.buffer.firstRange(of: marker) == nil, try await self.fill() {}
        }
        defer { buffer.removeAll() }
        return String(decoding: buffer, as: UTF8.self)
    }

    /// More bytes, or false at end of stream.
    private func fill() async throws -> Bool {
        guard let chunk = try await iterator.next() else { return false }
        buffer.append(contentsOf: chunk.readableBytesView)
        return true
    }

    /// Sends an HTTP request and reads the response head (and a body of Content-Length bytes).
    func request(_ method: String = "GET", _ target: String, headers: [(String, String)] = []) async throws
        -> (status: Int, headers: [String: String], body: String) {
        // `Host: 127.0.0.1` unless the caller gives one.
        var text = "\(method) \(target) HTTP/1.1\r\n"
        if !headers.contains(where: { $0.0.lowercased() == "host" }) { text += "Host: 127.0.0.1\r\n" }
        for (name, value) in headers { text += "\(name): \(value)\r\n" }
        text += "\r\n"
        try await send(Array(text.utf8))
        let separator: [UInt8] = [13, 10, 13, 10]
        var headEnd: Int?
        while headEnd == nil {
            if let range = buffer.firstRange(of: separator) { headEnd = range.lowerBound; break }
            guard try await fill() else { throw TestClientError("connection closed before the response head") }
        }
        let head = String(decoding: buffer[..<headEnd!], as: UTF8.self)
        buffer.removeFirst(headEnd! + 4)
        var lines = head.components(separatedBy: "\r\n")
        let statusLine = lines.removeFirst().split(separator: " ")
        let status = Int(statusLine[1]) ?? 0
        var fields: [String: String] = [:]
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = ""
        if let length = fields["content-length"].flatMap(Int.init), length > 0 {
            while buffer.count < length {
                guard try await fill() else { break }
            }
            body = String(decoding: buffer.prefix(length), as: UTF8.self)
            buffer.removeFirst(min(length, buffer.count))
        }
        return (status, fields, body)
    }

    /// A WebSocket upgrade request; `key` is the `Sec-WebSocket-Key`.
    func upgrade(path: String = "/ws", version: String = "13", key: String = "dGhlIHNhbXBsZSBub25jZQ==",
                 extraHeaders: [(String, String)] = []) async throws -> (status: Int, headers: [String: String], body: String) {
        try await request("GET", path, headers: [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", version),
        ] + extraHeaders)
    }

    /// Sends one masked frame.
    func sendFrame(opcode: UInt8, payload: [UInt8], fin: Bool = true) async throws {
        try await send(Self.frameBytes(opcode: opcode, payload: payload, fin: fin))
    }

    /// One masked frame's bytes (several can go out in one `send`, so the server reads them at once).
    static func frameBytes(opcode: UInt8, payload: [UInt8], fin: Bool = true) -> [UInt8] {
        var frame: [UInt8] = [(fin ? 0x80 : 0) | opcode]
        if payload.count < 126 {
            frame.append(0x80 | UInt8(payload.count))
        } else if payload.count <= 0xFFFF {
            frame.append(0x80 | 126)
            frame.append(UInt8(payload.count >> 8))
            frame.append(UInt8(payload.count & 0xFF))
        } else {
            frame.append(0x80 | 127)
            for shift in stride(from: 56, through: 0, by: -8) { frame.append(UInt8((payload.count >> shift) & 0xFF)) }
        }
        let mask: [UInt8] = [0x12, 0x34, 0x56, 0x78]
        frame.append(contentsOf: mask)
        for (position, byte) in payload.enumerated() { frame.append(byte ^ mask[position % 4]) }
        return frame
    }

    /// Sends a text frame.
    func sendText(_ text: String) async throws { try await sendFrame(opcode: 0x1, payload: Array(text.utf8)) }

    /// Sends a close frame with `code`.
    func sendClose(_ code: UInt16 = 1000) async throws {
        try await sendFrame(opcode: 0x8, payload: [UInt8(code >> 8), UInt8(code & 0xFF)])
    }

    /// The next frame (pings answered when `answersPings`); nil at end of stream.
    func receiveFrame() async throws -> TestFrame? {
        while true {
            if let frame = parseFrame() {
                if frame.opcode == 0x9 {
                    pingsSeen += 1
                    if answersPings { try await sendFrame(opcode: 0xA, payload: frame.payload) }
                    continue
                }
                return frame
            }
            guard try await fill() else { return nil }
        }
    }

    private func parseFrame() -> TestFrame? {
        guard buffer.count >= 2 else { return nil }
        var length = Int(buffer[1] & 0x7F)
        var offset = 2
        if length == 126 {
            guard buffer.count >= 4 else { return nil }
            length = Int(buffer[2]) << 8 | Int(buffer[3])
            offset = 4
        } else if length == 127 {
            guard buffer.count >= 10 else { return nil }
            length = 0
            for position in 2..<10 { length = length << 8 | Int(buffer[position]) }
            offset = 10
        }
        guard buffer.count >= offset + length else { return nil }
        let frame = TestFrame(fin: buffer[0] & 0x80 != 0, opcode: buffer[0] & 0x0F, payload: Array(buffer[offset..<offset + length]))
        buffer.removeFirst(offset + length)
        return frame
    }

    /// The next text message as a JSON object; throws on a close frame or end of stream.
    func receiveJSON(timeout: Double = 5) async throws -> [String: Any] {
        let frame = try await withTimeout(timeout, "receiving a message") { try await self.receiveFrame() }
        guard let frame else { throw TestClientError("connection ended while waiting for a message") }
        guard frame.opcode == 0x1 else {
            throw TestClientError("expected a text frame, got opcode \(frame.opcode) (close code \(frame.closeCode.map(String.init) ?? "-"))")
        }
        guard let object = try JSONSerialization.jsonObject(with: Data(frame.payload)) as? [String: Any] else {
            throw TestClientError("not a JSON object: \(frame.text)")
        }
        return object
    }

    /// Reads until a close frame and returns its code (skipping data frames); nil when the stream ended first.
    func receiveClose(timeout: Double = 5) async throws -> UInt16? {
        try await withTimeout(timeout, "waiting for a close frame") {
            while let frame = try await self.receiveFrame() {
                if frame.opcode == 0x8 { return frame.closeCode ?? 1005 }
            }
            return nil
        }
    }

    /// Whether the server closed the TCP connection within `timeout` (data is skipped).
    /// True once the server has closed the connection, by an orderly end of stream or by a
    /// reset (ECONNRESET: a connection still in the listen queue when the listening socket
    /// closes is reset by the kernel); false if it is still open after `timeout` seconds.
    /// (A reset used to count as "still open", which made a test beside a heavy one fail
    /// although its socket had been closed.)
    func waitForEndOfStream(timeout: Double = 5) async throws -> Bool {
        (try? await withTimeout(timeout, "waiting for the end of the stream") {
            do {
                while try await self.receiveFrame() != nil {}
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                // The socket failed (a reset): closed all the same.
            }
            return true
        }) ?? false
    }

    /// Closes the socket with a TCP reset (SO_LINGER 0).
    func reset() async {
        if let provider = channel as? any SocketOptionProvider {
            try? await provider.setSoLinger(linger(l_onoff: 1, l_linger: 0)).get()
        }
        try? await channel.close().get()
    }

    /// Stops reading from the socket (NIO's autoRead off): the kernel's buffers fill and the
    /// server sees a client that does not read.
    func stopReading() async throws {
        try await channel.setOption(ChannelOptions.autoRead, value: false).get()
    }

    /// Reads from the socket again (after `stopReading`).
    func startReading() async throws {
        try await channel.setOption(ChannelOptions.autoRead, value: true).get()
        channel.read()
    }

    /// Closes the socket.
    func close() async { try? await channel.close().get() }
}

/// A WebSocket session opened by `TestConnection.open` + upgrade.
func connectWebSocket(port: Int, receiveBuffer: Int? = nil) async throws -> TestConnection {
    let connection = try await TestConnection.open(port: port, receiveBuffer: receiveBuffer)
    let response = try await connection.upgrade()
    guard response.status == 101 else { throw TestClientError("upgrade answered \(response.status): \(response.body)") }
    return connection
}

extension TestConnection {
    /// Subscribes and returns the `subscribed` cursor.
    @discardableResult
    func subscribe(_ id: String, table: String = "items", filter: String? = nil, since: String? = nil) async throws -> String {
        var message: [String: Any] = ["type": "subscribe", "id": id, "table": table]
        if let filter { message["filter"] = filter }
        if let since { message["since"] = since }
        try await sendText(String(decoding: try JSONSerialization.data(withJSONObject: message), as: UTF8.self))
        let answer = try await receiveJSON()
        guard answer["type"] as? String == "subscribed", answer["id"] as? String == id, let cursor = answer["cursor"] as? String else {
            throw TestClientError("expected subscribed for \(id), got \(answer)")
        }
        return cursor
    }
}

/// Keeps every log record, for tests of what the server logs.
final class LogCapture: Sendable {
    let records = Mutex<[(level: Logger.Level, message: String, metadata: Logger.Metadata)]>([])

    var messages: [String] { records.withLock { $0.map(\.message) } }

    func logger(label: String = "test") -> Logger {
        Logger(label: label) { _ in CapturingHandler(capture: self) }
    }

    struct CapturingHandler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            var merged = metadata
            if let extra = event.metadata { merged.merge(extra) { _, new in new } }
            capture.records.withLock { $0.append((event.level, "\(event.message)", merged)) }
        }
    }
}

/// A running server on an ephemeral port, in its own service group.
struct TestServer: Sendable {
    let server: RealtimeServer
    let group: ServiceGroup
    let port: Int
}

/// Runs a server over `source` on 127.0.0.1:0 for the duration of `body`, then shuts it down.
/// Holds the test database's shared lock (without using the database) so that tests that
/// count the process's file descriptors alone do not see these sockets; `alone` takes it
/// exclusively (for CPU-heavy tests, so that timing tests do not run beside them).
func withTestServer(source: InMemoryChangeSource, logger: Logger? = nil, alone: Bool = false,
                    configure: (inout RealtimeServerConfiguration) -> Void = { _ in },
                    _ body: @Sendable (TestServer) async throws -> Void) async throws {
    var configuration = RealtimeServerConfiguration(host: "127.0.0.1", port: 0, logger: logger ?? Logger(label: "test.server") { _ in SwiftLogNoOpLogHandler() })
    configuration.closeTimeout = .seconds(2)
    configure(&configuration)
    let settings = configuration
    if alone {
        try await TestDatabase.withDatabaseAlone { _ in try await runTestServer(source: source, configuration: settings, body) }
    } else {
        try await TestDatabase.withDatabase { _ in try await runTestServer(source: source, configuration: settings, body) }
    }
}

private func runTestServer(source: InMemoryChangeSource, configuration: RealtimeServerConfiguration,
                           _ body: @Sendable (TestServer) async throws -> Void) async throws {
    let server = RealtimeServer(source: source, configuration: configuration)
    try await withRunningServices([server], start: {
        try await withTimeout(30, "server start") { try await server.waitUntilListening() }
    }) { port, group in
        try await body(TestServer(server: server, group: group, port: port))
    }
}

/// Runs `services` in a `ServiceGroup`; `start` waits until they serve and returns what `body`
/// needs. The group is shut down gracefully after `body`, also when `start` or `body` throws (a
/// start that failed while the group ran used to leave the test waiting on the group for good).
func withRunningServices<Started>(_ services: [any Service], start: () async throws -> Started,
                                  _ body: (Started, ServiceGroup) async throws -> Void) async throws {
    let group = ServiceGroup(configuration: .init(services: services, logger: Logger(label: "test.group") { _ in SwiftLogNoOpLogHandler() }))
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try await group.run() }
        do {
            try await body(try await start(), group)
        } catch {
            await group.triggerGracefulShutdown()
            try? await tasks.waitForAll()
            throw error
        }
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
    }
}

/// The catalog of the server tests: public.items (see FanoutTestSupport).
let serverCatalog = TableCatalog(["public.items": itemsColumns])

/// INSERTs into public.items with ids `ids`, one transaction each, at LSN 0x1000 + id.
func itemInserts(_ ids: some Sequence<Int>, status: String = "open", padding: Int = 0) -> [ChangeEvent] {
    ids.map { id in
        var values: [String: String?] = ["id": String(id), "status": status, "qty": String(id)]
        if padding > 0 { values["status"] = status + String(repeating: "x", count: padding) }
        return insertEvent(values, lsn: 0x1000 + UInt64(id))
    }
}
