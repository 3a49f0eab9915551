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
