import NIOCore
import NIOEmbedded
import NIOWebSocket
@testable import RealtimeSync
import Testing

/// The fan-out encodes each frame once (`SessionChannel.textFrame`) and writes the bytes past
/// NIO's frame encoder, so the header must be what a WebSocket client decodes.
@Suite("server: pre-encoded text frames")
struct SessionFrameTests {
    @Test("textFrame decodes with NIO's WebSocketFrameDecoder at every length form (7-bit, 16-bit, 64-bit)",
          arguments: [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
    func decodes(length: Int) throws {
        let payload = (0..<length).map { UInt8(ascii: "a") + UInt8($0 % 26) }
        let frame = SessionChannel.textFrame(payload)
        #expect(SessionChannel.payloadLength(frame) == length)
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: 1 << 20)))
        try channel.writeInbound(frame)
        let decoded = try #require(try channel.readInbound(as: WebSocketFrame.self))
        #expect(decoded.fin)
        #expect(decoded.opcode == .text)
        #expect(decoded.maskKey == nil)
        #expect(Array(decoded.unmaskedData.readableBytesView) == payload)
        #expect(try channel.readInbound(as: WebSocketFrame.self) == nil)
        _ = try channel.finish()
    }
}

/// The session's pump on an `EmbeddedChannel` with NIO's encoder and the `CloseFrameObserver`:
/// what the socket would carry, decoded as a client would.
@Suite("server: the session pump's write paths")
struct SessionPumpTests {
    /// Everything written so far, decoded into frames.
    private func sentFrames(_ channel: EmbeddedChannel) throws -> [WebSocketFrame] {
        var bytes = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { bytes.writeBuffer(&part) }
        let decoder = EmbeddedChannel(handler: ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: 1 << 20)))
        try decoder.writeInbound(bytes)
        var frames: [WebSocketFrame] = []
        while let frame = try decoder.readInbound(as: WebSocketFrame.self) { frames.append(frame) }
        _ = try decoder.finish()
        return frames
    }

    private func text(_ frame: WebSocketFrame) -> String {
        String(decoding: frame.unmaskedData.readableBytesView, as: UTF8.self)
    }

    /// A session over an embedded channel; `direct` wires the pump to the encoder's context.
    private func makeSession(direct: Bool) throws -> (SessionChannel, EmbeddedChannel, Counter) {
        let channel = EmbeddedChannel()
        let counter = Counter()
        let session = SessionChannel(id: FanoutClientID(1), channel: channel, limits: .init(), closeTimeout: .seconds(5),
                                     written: { counter.add($0) })
        try channel.pipeline.syncOperations.addHandler(WebSocketFrameEncoder())
        try channel.pipeline.syncOperations.addHandler(CloseFrameObserver(session: session))
        if direct { session.setFrameWriter(try channel.pipeline.syncOperations.context(handlerType: WebSocketFrameEncoder.self)) }
        return (session, channel, counter)
    }

    final class Counter: @unchecked Sendable {
        var value = 0
        func add(_ n: Int) { value += n }
    }

    @Test("messages go out as whole text frames, in order, on both write paths (encoder context and tail)",
          arguments: [true, false])
    func framesInOrder(direct: Bool) throws {
        let (session, channel, counter) = try makeSession(direct: direct)
        let long = String(repeating: "x", count: 70_000)
        for message in ["a", String(repeating: "y", count: 200), long] { session.enqueue(Array(message.utf8)) }
        channel.embeddedEventLoop.run()
        let frames = try sentFrames(channel)
        #expect(frames.map(\.opcode) == [.text, .text, .text])
        #expect(frames.map(\.fin) == [true, true, true])
        #expect(frames.map(text) == ["a", String(repeating: "y", count: 200), long])
        #expect(counter.value == 3)
        session.close(.normalClosure)
        channel.embeddedEventLoop.run()
        let closing = try sentFrames(channel)
        #expect(closing.map(\.opcode) == [.connectionClose])
        var payload = closing.first?.unmaskedData
        #expect(payload?.readInteger(as: UInt16.self) == 1000)
        #expect(session.sentCloseCode.load(ordering: .relaxed) == 1000)
        _ = try? channel.finish()
    }

    @Test("after a close frame sent by another handler, queued data frames are not written or counted")
    func nothingAfterAnotherClose() throws {
        let (session, channel, counter) = try makeSession(direct: true)
        var code = ByteBuffer()
        code.writeInteger(UInt16(1001))
        // As AutoPingHandler's ping timeout does: a close from the tail, seen by the observer.
        channel.writeAndFlush(WebSocketFrame(fin: true, opcode: .connectionClose, data: code), promise: nil)
        #expect(session.sentCloseCode.load(ordering: .relaxed) == 1001)
        session.enqueue(Array("late".utf8))
        channel.embeddedEventLoop.run()
        let frames = try sentFrames(channel)
        #expect(frames.map(\.opcode) == [.connectionClose], "a data frame followed the close: \(frames.map(\.opcode))")
        #expect(counter.value == 0)
        _ = try? channel.finish()
    }
}

/// The keep-alive ping: a client whose pong is missing is dropped with 1001, but not while the
/// server itself has paused reading the socket (the pong may be sitting unread).
@Suite("server: ping timeout and paused reads")
struct AutoPingPauseTests {
    final class Flag: @unchecked Sendable {
        var paused = false
    }

    private func sentOpcodes(_ channel: EmbeddedChannel) throws -> [WebSocketOpcode] {
        var opcodes: [WebSocketOpcode] = []
        while let frame = try channel.readOutbound(as: WebSocketFrame.self) { opcodes.append(frame.opcode) }
        return opcodes
    }

    /// A channel with an `AutoPingHandler` (1 s interval) that has sent its first ping.
    private func pingedChannel(paused: Flag, busy: Flag = Flag()) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandler(AutoPingHandler(interval: .seconds(1), readsPaused: { paused.paused }, serverBusy: { busy.paused }))
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try sentOpcodes(channel) == [.ping])
        return channel
    }

    @Test("no pong while reads are paused is not a timeout; once reading resumes, a pong still missing counts as one missed ping, and a second missed one drops the socket")
    func pausedReadsAreNotATimeout() throws {
        let flag = Flag()
        let channel = try pingedChannel(paused: flag)
        flag.paused = true
        channel.embeddedEventLoop.advanceTime(by: .seconds(3))
        #expect(try sentOpcodes(channel).isEmpty, "dropped for a pong it could not read")
        #expect(channel.isActive)
        flag.paused = false
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try sentOpcodes(channel) == [.ping], "one ping missed: asked again")
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try sentOpcodes(channel) == [.connectionClose], "two pings in a row missed")
        _ = try? channel.finish()
    }

    @Test("a drop for a ping timeout is logged at info (1001 alone does not tell it from a shutdown)")
    func pingTimeoutIsLogged() throws {
        let capture = LogCapture()
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandler(AutoPingHandler(interval: .seconds(1), logger: capture.logger()))
        channel.embeddedEventLoop.advanceTime(by: .seconds(2))
        #expect(capture.messages.isEmpty, "nothing before the timeout")
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        let logged = capture.records.withLock { $0 }
        #expect(logged.count == 1 && logged.first?.level == .info, "\(logged)")
        #expect(logged.first?.message.contains("ping timeout") == true && logged.first?.message.contains("pingInterval=") == true, "\(logged)")
        _ = try? channel.finish()
    }

    @Test("a late pong for the ping before the last still counts as an answer")
    func latePongForThePreviousPing() throws {
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandler(AutoPingHandler(interval: .seconds(1)))
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        let first = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(first.opcode == .ping)
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try sentOpcodes(channel) == [.ping], "the first ping unanswered: a second one")
        // The answer to the first ping arrives now (a slow client).
        try channel.writeInbound(WebSocketFrame(fin: true, opcode: .pong, data: first.unmaskedData))
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try sentOpcodes(channel) == [.ping], "answered: pinged again, not dropped")
        #expect(channel.isActive)
        // The late answer was to the first ping only: the second and third are now two missed.
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try sentOpcodes(channel) == [.connectionClose])
        _ = try? channel.finish()
    }

    @Test("paused while the session waits for the server (a snapshot's turn) does not count towards maxPausedIntervals")
    func pausedByTheServer() throws {
        let flag = Flag()
        let busy = Flag()
        let channel = try pingedChannel(paused: flag, busy: busy)
        flag.paused = true
        busy.paused = true
        channel.embeddedEventLoop.advanceTime(by: .seconds(Int64(AutoPingHandler.maxPausedIntervals) * 3))
        #expect(try sentOpcodes(channel).isEmpty, "dropped while waiting for the server's own turn")
        busy.paused = false
        channel.embeddedEventLoop.advanceTime(by: .seconds(Int64(AutoPingHandler.maxPausedIntervals) + 1))
        #expect(try sentOpcodes(channel) == [.connectionClose])
        _ = try? channel.finish()
    }

    @Test("reads paused for more than maxPausedIntervals with a ping unanswered: the socket is dropped anyway (a client that never reads must not hold a snapshot's connection for good)")
    func pausedForGood() throws {
        let flag = Flag()
        let channel = try pingedChannel(paused: flag)
        flag.paused = true
        channel.embeddedEventLoop.advanceTime(by: .seconds(Int64(AutoPingHandler.maxPausedIntervals)))
        #expect(try sentOpcodes(channel).isEmpty)
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(try sentOpcodes(channel) == [.connectionClose])
        _ = try? channel.finish()
    }
}
