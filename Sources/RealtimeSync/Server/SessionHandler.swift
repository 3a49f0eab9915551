import Logging
import NIOCore
import NIOWebSocket

/// A WebSocket session's inbound side, on the socket's event loop: control frames, the
/// close handshake, message assembly (text only, UTF-8, `maxClientMessageBytes`) and the
/// answers to client messages. No task per socket: an idle socket is its channel, its
/// handlers and its `SessionChannel`. A catch-up (`since`) or snapshot runs in a task of
/// its own; the socket's later messages wait for it, in order (reading pauses when more
/// than `pausedReadsAfter` are waiting).
///
/// The session ends when the channel goes inactive: after the running catch-up or
/// snapshot, if any, has returned (it is cancelled), so that nothing it does can follow
/// the session's removal from the fan-out.
///
/// Root of an unstructured task (documented exception to DESIGN.md rule 3): the catch-up
/// or snapshot task. This handler owns it: one at a time, cancelled when the channel goes
/// inactive, and the session (which the server's shutdown waits for) ends only once it has
/// returned, so it cannot outlive the server.
final class SessionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame

    /// Messages held behind a running catch-up or snapshot before reading pauses.
    static let pausedReadsAfter = 8

    private let server: RealtimeServer
    private let session: SessionChannel
    private let grant: SessionGrant
    private let logger: Logger
    private var context: ChannelHandlerContext?
    private var expiryTimer: TokenExpiryTimer?
    /// Subscription ids open on this socket (joined or catching up).
    private var openIDs: Set<String> = []
    private var message: [UInt8] = []
    private var assembling = false
    /// The running catch-up or snapshot, if any.
    private var work: Task<Void, Never>?
    /// Complete messages that arrived while `work` runs.
    /// (A ring: answering them pops from the front, and an array shifted its whole rest per
    /// message, quadratic in the messages one read burst delivers while reads are pausing.)
    private var held = CircularBuffer<[UInt8]>()
    private var readsPaused = false
    private var closeReceived = false
    /// The latest ping that came while the channel was not writable.
    private var unansweredPing: ByteBuffer?
    /// Pongs written in this read batch, flushed together at its end (one `writev` for a
    /// read of thousands of pings, not one each, which held the event loop's other sockets).
    private var pongsUnflushed = false
    private var inactive = false
    private var ended = false

    init(server: RealtimeServer, session: SessionChannel, grant: SessionGrant, logger: Logger) {
        self.server = server
        self.session = session
        self.grant = grant
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        guard context.channel.isActive else {
            // Closed during the upgrade: no channelInactive will come.
            inactive = true
            end()
            context.close(promise: nil)
            return
        }
        expiryTimer = server.armTokenExpiry(grant.expiry, session: session, channel: context.channel, logger: logger)
        logger.debug("session opened")
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !ended else { return }
        let frame = unwrapInboundIn(data)
        // RFC 6455 5.1: a server closes the connection on a frame the client did not mask
        // (NIO's decoder accepts either): 1002, then the TCP connection ends without waiting
        // for the client's close frame, which such a client would not mask either.
        guard frame.maskKey != nil else {
            guard !closeReceived else { return }
            closeReceived = true  // nothing it sends is read any more
            if session.sentCloseCode.load(ordering: .relaxed) != 0 { return context.close(promise: nil) }
            return closeAndEnd(.protocolError, context: context)
        }
        switch frame.opcode {
        case .connectionClose:
            receivedClose(frame, context: context)
        case .ping:
            guard frame.fin, frame.reservedBits.isEmpty else { return session.close(.protocolError) }
            // Answered until the client's close arrives (RFC 6455 5.5.2), also while the server's
            // own close waits behind the queue or a fatal frame came first in this read.
            guard !closeReceived else { return }
            if context.channel.isWritable {
                context.write(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)), promise: nil)
                pongsUnflushed = true
            } else {
                // A client that pings but does not read would otherwise grow NIO's pending
                // writes without bound. RFC 6455 5.5.3 allows answering only the most recent ping.
                unansweredPing = frame.unmaskedData
            }
        case .pong:
            // (the AutoPingHandler saw it already)
            if !frame.fin || !frame.reservedBits.isEmpty { session.close(.protocolError) }
        case .text, .binary, .continuation:
            guard !closeReceived, session.isOpen else { return }  // closing: wait for the client's close frame
            guard frame.reservedBits.isEmpty else { return session.close(.protocolError) }
            dataFrame(frame)
        default:
            session.close(.protocolError)  // a reserved opcode
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if pongsUnflushed {
            pongsUnflushed = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    private func pong(_ payload: ByteBuffer, context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, data: payload)), promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, let payload = unansweredPing {
            unansweredPing = nil
            if !closeReceived { pong(payload, context: context) }
        }
        context.fireChannelWritabilityChanged()
    }

    /// Assembles a message from data frames; answers it when complete.
    private func dataFrame(_ frame: WebSocketFrame) {
        switch frame.opcode {
        case .binary:
            // A new message inside an unfinished one is a protocol error first (1002), then
            // binary is refused (1003).
            return session.close(assembling ? .protocolError : .unsupportedData)
        case .text:
            guard !assembling else { return session.close(.protocolError) }
            message.removeAll(keepingCapacity: true)
            assembling = true
        default:  // continuation
            guard assembling else { return session.close(.protocolError) }
        }
        let limit = server.configuration.maxClientMessageBytes
        guard message.count + frame.length <= limit else {
            logger.debug("message over maxClientMessageBytes=\(limit); closing with 1009")
            return session.close(.messageTooBig)
        }
        message.append(contentsOf: frame.unmaskedData.readableBytesView)
        guard frame.fin else { return }
        assembling = false
        guard String(validating: message, as: UTF8.self) != nil else { return session.close(.invalidPayload) }
        if message.capacity > 4_096 {
            // Keep no large buffer on an idle socket.
            let complete = message
            message = []
            deliver(complete)
        } else {
            deliver(message)
        }
    }

    /// Answers a message now, or holds it behind the running catch-up or snapshot.
    private func deliver(_ bytes: [UInt8]) {
        guard work == nil else {
            held.append(bytes)
            if held.count >= Self.pausedReadsAfter, !readsPaused, let context {
                readsPaused = true
                session.readsPaused.store(true, ordering: .relaxed)
                context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
            }
            return
        }
        answer(bytes)
    }

    private func answer(_ bytes: [UInt8]) {
        guard let next = server.handleMessage(bytes, session: session, openIDs: &openIDs, access: grant.access) else { return }
        guard let context else { return }
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let eventLoop = context.eventLoop
        let (server, session, access, logger, ids) = (server, session, grant.access, logger, openIDs)
        work = Task {
            var reader = SessionReaderState(openIDs: ids, spaceFreed: session.spaceFreed.makeAsyncIterator(), access: access)
            await server.perform(next, session: session, reader: &reader, logger: logger)
            let openIDs = reader.openIDs
            eventLoop.execute { handler.value.workFinished(openIDs: openIDs) }
        }
    }

    /// The catch-up or snapshot returned: the held messages are answered in order.
    private func workFinished(openIDs: Set<String>) {
        work = nil
        self.openIDs = openIDs
        if inactive { return end() }
        // A session closing (token expired, overflow, shutdown) answers nothing more: a held
        // snapshot would still take a pooled connection and run its query for no one.
        if !session.isOpen { held.removeAll() }
        while work == nil, !held.isEmpty {
            answer(held.removeFirst())
        }
        if readsPaused, held.count < Self.pausedReadsAfter, let context {
            readsPaused = false
            session.readsPaused.store(false, ordering: .relaxed)
            context.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
        }
    }

    /// The client's close frame: the answer to ours ends the handshake; otherwise it is
    /// echoed (1000, or 1002 for a malformed one, as RFC 6455 7.4 allows) and the server
    /// closes the connection.
    private func receivedClose(_ frame: WebSocketFrame, context: ChannelHandlerContext) {
        guard !closeReceived else { return }
        closeReceived = true
        if session.sentCloseCode.load(ordering: .relaxed) != 0 {
            context.close(promise: nil)
            return
        }
        session.clientSentClose.store(true, ordering: .relaxed)
        closeAndEnd(Self.echoCode(frame), context: context)
    }

    /// Sends a close frame with `code` and ends the TCP connection once it is written.
    private func closeAndEnd(_ code: WebSocketCloseCode, context: ChannelHandlerContext) {
        var payload = context.channel.allocator.buffer(capacity: 2)
        payload.writeInteger(code.rawValue)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: payload)))
            .whenComplete { _ in channel.close(promise: nil) }
        // Nothing more goes out: the session's queue closes (its close frame is dropped, ours
        // went first), and its close watchdog drops a client that reads nothing before the
        // answer can be written (closeTimeout).
        session.closeNow(code)
    }

    /// The code to answer a client's close frame with: 1000 for a well-formed one; 1002 for
    /// reserved bits, a one-byte payload, a code no endpoint may send (1004-1006, 1015, or
    /// one outside every range), or a reason that is not UTF-8.
    static func echoCode(_ frame: WebSocketFrame) -> WebSocketCloseCode {
        guard frame.reservedBits.isEmpty else { return .protocolError }
        var data = frame.unmaskedData
        if data.readableBytes == 0 { return .normalClosure }
        guard let code = data.readInteger(as: UInt16.self) else { return .protocolError }
        // 1012-1014 are registered with IANA (service restart, try again later, bad gateway):
        // an endpoint may send them (this server sends 1013 itself).
        let sendable = (1000...1003).contains(code) || (1007...1014).contains(code) || (3000...4999).contains(code)
        guard sendable, String(validating: data.readableBytesView, as: UTF8.self) != nil else { return .protocolError }
        return .normalClosure
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            context.close(promise: nil)  // the client half-closed: nothing more can arrive
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("socket error: \(error)")
        // A frame the decoder rejected: NIO's protocol error handler sends 1002 or 1009 and
        // closes once that frame is written, which a client that reads nothing never lets
        // happen: dropped after closeTimeout then. Anything else ends the connection now.
        if error is NIOWebSocketError {
            session.closeSentElsewhere()
            return
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        inactive = true
        if let work {
            work.cancel()  // `workFinished` ends the session
        } else {
            end()
        }
        context.fireChannelInactive()
    }

    /// Releases everything the session held, once.
    private func end() {
        guard !ended else { return }
        ended = true
        expiryTimer?.cancel()
        expiryTimer = nil
        held.removeAll()
        // The close frame that went out (an echo, when the client closed first), or 1006
        // when none did (reset, vanished client).
        let sent = session.sentCloseCode.load(ordering: .relaxed)
        let code: UInt16 = sent != 0 ? sent : session.clientSentClose.load(ordering: .relaxed) ? 1000 : 1006
        server.endSession(session, code: code)
        logger.debug("session closed", metadata: ["code": "\(code)"])
    }
}

@available(*, unavailable)
extension SessionHandler: Sendable {}
