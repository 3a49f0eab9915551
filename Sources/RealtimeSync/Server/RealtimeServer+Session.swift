import HummingbirdWebSocket
import Logging
import NIOCore
import NIOWebSocket
import Synchronization

/// What a session's reader keeps between messages: the ids it has open (joined
/// the hub or catching up) and the iterator the catch-up waits on for queue space.
struct SessionReaderState {
    var openIDs: Set<String> = []
    var spaceFreed: AsyncStream<Void>.Iterator
    let access: TableAccess
}

extension RealtimeServer {

    /// One socket, from upgrade to close: the WebSocket handler's scope owns the
    /// session and runs its reader; everything it holds is
    /// released when this returns, however the socket ended.
    func runSession(inbound: WebSocketInboundStream, channel: any Channel,
                    access: TableAccess, subject: String?, expiry: TokenExpiry? = nil) async {
        let session = openSession(channel: channel)
        var sessionLogger = self.logger
        sessionLogger[metadataKey: "client"] = "\(session.id)"
        if let subject { sessionLogger[metadataKey: "sub"] = "\(subject)" }
        let logger = sessionLogger
        let expiryTimer = armTokenExpiry(expiry, session: session, channel: channel, logger: logger)
        await observeFrameDecoderErrors(channel: channel, session: session)
        logger.debug("session opened")
        // The reader runs in this task; the writer is the session's pump on the event loop and
        // the close watchdog an event-loop timer (SessionChannel): a suspended task per socket
        // holds kilobytes of stack.
        _ = await readLoop(source, session: session, inbound: inbound, access: access, logger: logger)
        expiryTimer?.cancel()
        // The close frame that went out (an echo, when the client closed first), or 1006
        // when none did (reset, vanished client).
        let sent = session.sentCloseCode.load(ordering: .relaxed)
        let code: UInt16 = sent != 0 ? sent : session.clientSentClose.load(ordering: .relaxed) ? 1000 : 1006
        endSession(session, code: code)
        logger.debug("session closed", metadata: ["code": "\(code)"])
    }

    /// Puts a `CloseFrameObserver` right after the frame decoder, and the `AutoPingHandler` after it.
    private func observeFrameDecoderErrors(channel: any Channel, session: SessionChannel) async {
        let interval = TimeAmount(configuration.pingInterval)
        try? await channel.eventLoop.submit {
            let operations = channel.pipeline.syncOperations
            let decoder = try operations.handler(type: ByteToMessageHandler<WebSocketFrameDecoder>.self)
            let observer = CloseFrameObserver(session: session)
            try operations.addHandler(observer, position: .after(decoder))
            try operations.addHandler(AutoPingHandler(interval: interval), position: .after(observer))
            session.setFrameWriter(try? operations.context(handlerType: WebSocketFrameEncoder.self))
        }.get()
    }

    /// Reads frames, assembles messages (64 KiB, UTF-8, text only) and answers them.
    /// Returns nil when the client closed, or the error that ended the connection.
    private func readLoop<Source: ChangeSource>(_ source: Source, session: SessionChannel, inbound: WebSocketInboundStream,
                                                access: TableAccess, logger: Logger) async -> (any Error)? {
        var reader = SessionReaderState(spaceFreed: session.spaceFreed.makeAsyncIterator(), access: access)
        var frames = inbound.makeAsyncIterator()
        var message: [UInt8] = []
        var assembling = false
        let limit = configuration.maxClientMessageBytes
        do {
            while let frame = try await frames.next() {
                guard session.isOpen else { continue }  // closing: wait for the client's close frame
                switch frame.opcode {
                case .binary:
                    session.close(.unsupportedData)
                    continue
                case .text:
                    guard !assembling else { session.close(.protocolError); continue }
                    message.removeAll(keepingCapacity: true)
                    assembling = true
                case .continuation:
                    guard assembling else { session.close(.protocolError); continue }
                }
                guard message.count + frame.data.readableBytes <= limit else {
                    logger.debug("message over maxClientMessageBytes=\(limit); closing with 1009")
                    session.close(.messageTooBig)
                    continue
                }
                message.append(contentsOf: frame.data.readableBytesView)
                guard frame.fin else { continue }
                assembling = false
                guard String(validating: message, as: UTF8.self) != nil else {
                    session.close(.invalidPayload)
                    continue
                }
                await handleMessage(message, source: source, session: session, reader: &reader, logger: logger)
            }
            return nil
        } catch {
            return error
        }
    }

    private func handleMessage<Source: ChangeSource>(_ bytes: [UInt8], source: Source, session: SessionChannel,
                                                     reader: inout SessionReaderState, logger: Logger) async {
        let message: ClientMessage
        do {
            message = try ClientMessage.parse(bytes)
        } catch {
            session.enqueue(error.serverMessage)
            return
        }
        switch message {
        case .unsubscribe(let id):
            guard reader.openIDs.remove(id) != nil else {
                session.enqueue(ProtocolError(.invalidMessage, id: id, "no open subscription \(quoteForMessage(id)) on this connection").serverMessage)
                return
            }
            state.withLock { state in
                state.hub.unsubscribe(client: session.id, id: id)
                state.dropPendingSnapshot(client: session.id, id: id)
                if state.startAfter[session.id]?.removeValue(forKey: id) != nil, state.startAfter[session.id]?.isEmpty == true {
                    state.startAfter[session.id] = nil
                }
                session.enqueue(.unsubscribed(id: id))
            }
        case .subscribe(let request):
            await subscribe(request, source: source, session: session, reader: &reader, logger: logger)
        }
    }

    private func subscribe<Source: ChangeSource>(_ request: SubscribeRequest, source: Source, session: SessionChannel,
                                                 reader: inout SessionReaderState, logger: Logger) async {
        if reader.openIDs.contains(request.id) {
            session.enqueue(ProtocolError(.duplicateSubscription, id: request.id,
                                          "subscription \(quoteForMessage(request.id)) is already open; unsubscribe it first or choose another id").serverMessage)
            return
        }
        let maximum = configuration.hubLimits.maxSubscriptionsPerClient
        if reader.openIDs.count >= maximum {
            session.enqueue(ProtocolError(.tooManySubscriptions, id: request.id,
                                          "this connection holds \(reader.openIDs.count) subscriptions (maxSubscriptionsPerClient=\(maximum)); unsubscribe some first").serverMessage)
            return
        }
        let subscription: ResolvedSubscription
        do {
            subscription = try source.catalog.resolve(request, access: reader.access)
        } catch {
            session.enqueue(error.serverMessage)
            return
        }
        if subscription.snapshot {
            await subscribeWithSnapshot(subscription, session: session, reader: &reader, logger: logger)
            return
        }
        guard let since = subscription.since else {
            let failure = state.withLock { state -> ProtocolError? in
                do throws(ProtocolError) {
                    try state.hub.subscribe(client: session.id, subscription)
                } catch {
                    return error
                }
                session.enqueue(.subscribed(id: subscription.id, cursor: state.lastDelivered))
                return nil
            }
            if let failure {
                session.enqueue(failure.serverMessage)
            } else {
                reader.openIDs.insert(subscription.id)
            }
            return
        }
        await resume(subscription, after: since, source: source, session: session, reader: &reader, logger: logger)
    }

    /// A `since` subscription: every matching change after `since` from the source's window,
    /// sent by this reader, until it reaches the fan-out's position; then the subscription
    /// joins the hub (in one critical section), so no change is missed or sent twice.
    private func resume<Source: ChangeSource>(_ subscription: ResolvedSubscription, after since: Cursor, source: Source,
                                              session: SessionChannel, reader: inout SessionReaderState, logger: Logger) async {
        let id = subscription.id
        let stream: Source.Changes
        do {
            stream = try await source.changes(after: since)
        } catch let error as ResumeWindowError {
            session.enqueue(.resyncRequired(id: id, message: error.message))
            return
        } catch {
            session.enqueue(ProtocolError(.internal, id: id, "the change stream is unavailable (\(error)); retry later").serverMessage)
            return
        }
        reader.openIDs.insert(id)
        let joinedAtOnce = state.withLock { state -> Bool in
            session.enqueue(.subscribed(id: id, cursor: since))
            guard since >= state.lastDelivered else { return false }
            state.join(subscription, client: session.id, lastCovered: since)
            return true
        }
        if joinedAtOnce { return }
        var lastCovered = since
        var caughtUp = 0
        do {
            for try await event in stream {
                while session.isOpen && session.isHalfFull {
                    guard await reader.spaceFreed.next() != nil else { break }
                }
                guard session.isOpen else { return }
                let covered = lastCovered
                let joined = state.withLock { state -> Bool in
                    let cursor = event.cursor
                    if cursor > state.lastDelivered {
                        state.join(subscription, client: session.id, lastCovered: covered)
                        return true
                    }
                    if event.table == subscription.table && subscription.events.contains(event.operation) && subscription.filter.matches(event) {
                        if session.enqueue(EncodedChange(event).frame(ids: [id])) == .overflow {
                            state.hub.removeClient(session.id)
                            state.startAfter[session.id] = nil
                        }
                        caughtUp += 1
                    }
                    if cursor >= state.lastDelivered {
                        state.join(subscription, client: session.id, lastCovered: cursor)
                        return true
                    }
                    return false
                }
                lastCovered = event.cursor
                if joined {
                    logger.debug("resumed subscription caught up", metadata: ["id": "\(id)", "since": "\(since)", "sent": "\(caughtUp)"])
                    return
                }
            }
            // The source stopped: join at what was covered (the fan-out has stopped too).
            let covered = lastCovered
            state.withLock { $0.join(subscription, client: session.id, lastCovered: covered) }
        } catch let error as ResumeWindowError {
            reader.openIDs.remove(id)
            session.enqueue(.resyncRequired(id: id, message: error.message))
        } catch {
            reader.openIDs.remove(id)
            session.enqueue(ProtocolError(.internal, id: id, "the change stream failed while resuming (\(error)); resubscribe with 'since'").serverMessage)
        }
    }
}

/// Notes the first close frame the server sends on a socket, from any sender
/// (see `SessionChannel.sentCloseCode`). Sits right after the frame decoder, so it
/// also sees the close that NIO's protocol error handler writes for a too-large frame.
final class CloseFrameObserver: ChannelDuplexHandler, Sendable {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = WebSocketFrame
    typealias OutboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame
    let session: SessionChannel

    init(session: SessionChannel) { self.session = session }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if unwrapInboundIn(data).opcode == .connectionClose, session.sentCloseCode.load(ordering: .relaxed) == 0 {
            session.clientSentClose.store(true, ordering: .relaxed)
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        // Nothing may follow the server's close frame (RFC 6455 5.5.1): not Hummingbird's echo
        // of the client's close when the session's close went first, nor a late frame from the
        // tail. (The session's data frames skip this handler; its pump checks `sentCloseCode`.)
        guard session.sentCloseCode.load(ordering: .relaxed) == 0 else {
            promise?.succeed(())
            return
        }
        let frame = unwrapOutboundIn(data)
        if frame.opcode == .connectionClose {
            var payload = frame.unmaskedData
            let code = payload.readInteger(as: UInt16.self) ?? 1005
            session.sentCloseCode.store(code, ordering: .relaxed)
        }
        context.write(data, promise: promise)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { session.channelBecameWritable() }
        context.fireChannelWritabilityChanged()
    }
}

/// Pings the client every `interval` and drops the socket (close 1001, "Ping timeout") when
/// the previous ping is still unanswered as the next is due. Replaces Hummingbird's auto-ping,
/// which sleeps with `Task.sleep`: on Linux a cancelled sleep keeps its timer and job allocated
/// until the original deadline, so every closed socket left ~1.5 KB behind for a whole ping
/// interval (issue 6). An event-loop timer is freed as soon as it is cancelled. Sits after the
/// `CloseFrameObserver`, so the close it sends is recorded there; stops once a close frame
/// went either way (nothing may follow the server's close frame).
final class AutoPingHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = WebSocketFrame
    typealias OutboundIn = WebSocketFrame
    typealias OutboundOut = WebSocketFrame
    static let payloadSize = 16
    let interval: TimeAmount
    private var timer: Scheduled<Void>?
    private var unanswered: ByteBuffer?
    private var stopped = false

    init(interval: TimeAmount) { self.interval = interval }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { schedule(context: context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) { stop() }

    func channelInactive(context: ChannelHandlerContext) {
        stop()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .pong:
            if let unanswered, frame.unmaskedData == unanswered { self.unanswered = nil }
        case .connectionClose:
            stop()
        default:
            break
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if unwrapOutboundIn(data).opcode == .connectionClose { stop() }
        context.write(data, promise: promise)
    }

    private func stop() {
        stopped = true
        timer?.cancel()
        timer = nil
    }

    private func schedule(context: ChannelHandlerContext) {
        guard !stopped else { return }
        timer = context.eventLoop.assumeIsolated().scheduleTask(in: interval) { [self] in
            self.tick(context: context)
        }
    }

    private func tick(context: ChannelHandlerContext) {
        timer = nil
        guard !stopped, context.channel.isActive else { return }
        if unanswered != nil {
            stop()
            var payload = context.channel.allocator.buffer(capacity: 2 + 12)
            payload.writeInteger(UInt16(1001))
            payload.writeString("Ping timeout")
            context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: payload)), promise: nil)
            context.close(promise: nil)
            return
        }
        var payload = context.channel.allocator.buffer(capacity: Self.payloadSize)
        for _ in 0..<Self.payloadSize { payload.writeInteger(UInt8.random(in: .min ... .max)) }
        unanswered = payload
        context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .ping, data: payload)), promise: nil)
        schedule(context: context)
    }
}

@available(*, unavailable)
extension AutoPingHandler: Sendable {}
