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

/// A subscription step that cannot finish on the event loop: it waits for the change
/// source or the database. `SessionHandler` runs it in a task and holds the socket's
/// later messages until it is done.
enum SessionWork: Sendable {
    /// `snapshot: true`: the rows, then the stream.
    case snapshot(ResolvedSubscription)
    /// `since`: the changes after the cursor, then the stream.
    case resume(ResolvedSubscription, after: Cursor)
}

extension RealtimeServer {

    /// Opens a session on a channel just upgraded (on its event loop) and installs its
    /// handlers after NIO's frame decoder: the `CloseFrameObserver`, the `AutoPingHandler`,
    /// and the `SessionHandler` that reads the socket. Everything the session holds is
    /// released when the channel goes inactive (`SessionHandler`).
    func startSession(on channel: any Channel, grant: SessionGrant) throws {
        let session = openSession(channel: channel)
        var logger = self.logger
        logger[metadataKey: "client"] = "\(session.id)"
        if let subject = grant.subject { logger[metadataKey: "sub"] = "\(subject)" }
        do {
            let operations = channel.pipeline.syncOperations
            let decoder = try operations.handler(type: ByteToMessageHandler<WebSocketFrameDecoder>.self)
            let observer = CloseFrameObserver(session: session)
            try operations.addHandler(observer, position: .after(decoder))
            try operations.addHandler(AutoPingHandler(interval: TimeAmount(configuration.pingInterval),
                                                      readsPaused: { [session] in session.readsPaused.load(ordering: .relaxed) },
                                                      serverBusy: { [session] in session.waitingForServer.load(ordering: .relaxed) },
                                                      logger: logger),
                                      position: .after(observer))
            session.setFrameWriter(try? operations.context(handlerType: WebSocketFrameEncoder.self))
            try operations.addHandler(SessionHandler(server: self, session: session, grant: grant, logger: logger))
        } catch {
            endSession(session, code: 1006)
            channel.close(promise: nil)
            throw error
        }
    }

    /// Answers one client message. What can be answered at once is (the reply is queued
    /// on the session); a catch-up or snapshot is returned, for the caller to run.
    func handleMessage(_ bytes: [UInt8], session: SessionChannel, openIDs: inout Set<String>, access: TableAccess) -> SessionWork? {
        // Subscriptions the fan-out ended (a schema change broke their filter) are not open.
        openIDs.subtract(session.takeEndedIDs())
        let message: ClientMessage
        do {
            message = try ClientMessage.parse(bytes)
        } catch {
            session.enqueue(error.serverMessage)
            return nil
        }
        switch message {
        case .unsubscribe(let id):
            guard openIDs.remove(id) != nil else {
                session.enqueue(ProtocolError(.invalidMessage, id: id, "no open subscription \(quoteForMessage(id)) on this connection").serverMessage)
                return nil
            }
            state.withLock { state in
                state.hub.unsubscribe(client: session.id, id: id)
                state.dropPendingSnapshot(client: session.id, id: id)
                if state.startAfter[session.id]?.removeValue(forKey: id) != nil, state.startAfter[session.id]?.isEmpty == true {
                    state.startAfter[session.id] = nil
                }
                session.enqueue(.unsubscribed(id: id))
            }
            return nil
        case .subscribe(let request):
            return subscribe(request, session: session, openIDs: &openIDs, access: access)
        }
    }

    /// Runs a catch-up or a snapshot (in the session's task for it).
    func perform(_ work: SessionWork, session: SessionChannel, reader: inout SessionReaderState, logger: Logger) async {
        switch work {
        case .snapshot(let subscription):
            await subscribeWithSnapshot(subscription, session: session, reader: &reader, logger: logger)
        case .resume(let subscription, let since):
            await resume(subscription, after: since, source: source, session: session, reader: &reader, logger: logger)
        }
    }

    private func subscribe(_ request: SubscribeRequest, session: SessionChannel, openIDs: inout Set<String>,
                           access: TableAccess) -> SessionWork? {
        if openIDs.contains(request.id) {
            session.enqueue(ProtocolError(.duplicateSubscription, id: request.id,
                                          "subscription \(quoteForMessage(request.id)) is already open; unsubscribe it first or choose another id").serverMessage)
            return nil
        }
        let maximum = configuration.hubLimits.maxSubscriptionsPerClient
        if openIDs.count >= maximum {
            session.enqueue(ProtocolError(.tooManySubscriptions, id: request.id,
                                          "this connection holds \(openIDs.count) subscriptions (maxSubscriptionsPerClient=\(maximum)); unsubscribe some first").serverMessage)
            return nil
        }
        let subscription: ResolvedSubscription
        do {
            subscription = try source.catalog.resolve(request, access: access)
        } catch {
            session.enqueue(error.serverMessage)
            return nil
        }
        if subscription.snapshot { return .snapshot(subscription) }
        guard let since = subscription.since else {
            let failure = state.withLock { state -> ProtocolError? in
                if let broken = state.schemaBrokenColumn(of: subscription) {
                    // Checked against a catalog older than the stream's view of the table.
                    return ServerState.schemaChangeError(id: subscription.id, column: broken.column, byToken: broken.byToken, table: subscription.table)
                }
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
                openIDs.insert(subscription.id)
            }
            return nil
        }
        return .resume(subscription, after: since)
    }

    /// A `since` subscription: every matching change after `since` from the source's window,
    /// sent by this reader, until it reaches the fan-out's position; then the subscription
    /// joins the hub (in one critical section), so no change is missed or sent twice.
    private func resume<Source: ChangeSource>(_ subscription: ResolvedSubscription, after since: Cursor, source: Source,
                                              session: SessionChannel, reader: inout SessionReaderState, logger: Logger) async {
        let id = subscription.id
        if since > source.currentCursor, let walPosition = configuration.walPosition {
            // Ahead of this server's stream: a lagging instance's normal case, unless the
            // cursor is ahead of the database itself. The question takes a pooled connection,
            // one query at a time shared by the callers (`WALCheck`: the highest answer seen
            // settles every cursor below it, so a burst of resumes after a restart asks once),
            // on a turn of its own, not behind a snapshot.
            // Waiting for the server, not the client: the ping timeout does not count it (as
            // for a snapshot's turn).
            session.waitingForServer.store(true, ordering: .relaxed)
            defer { session.waitingForServer.store(false, ordering: .relaxed) }
            let wal: LSN
            do {
                wal = try await walCheck.position(reaching: since.commitLSN, ask: walPosition)
            } catch {
                // Unchecked, a foreign cursor would be taken and stay silent until the stream
                // passed it, then skip what lay before it: refused, and the client retries.
                session.enqueue(ProtocolError(.internal, id: id,
                    "since \(since) is ahead of this server's stream, and the database could not be asked whether it issued it (\(error)); retry later").serverMessage)
                return
            }
            guard session.isOpen else { return }
            if since.commitLSN > wal {
                session.enqueue(ProtocolError(.invalidMessage, id: id,
                    "since \(since) is ahead of this database's WAL (\(Cursor(commitLSN: wal, index: 0))): the cursor was not issued by this database (another one, or one restored from a backup); subscribe without since, or with snapshot").serverMessage)
                return
            }
        }
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
        do {
            let end = try await catchUp(stream, from: since, session: session, reader: &reader, frame: { event in
                TableKey(event.table) == TableKey(subscription.table) && subscription.events.contains(event.operation) && subscription.filter.matches(event)
                    ? EncodedChange(event, hidingOld: subscription.mandatory.hidesOldRow(of: event)).frame(ids: [id]) : nil
            }, isWanted: { _ in true }, handOver: { state, covered in
                state.join(subscription, client: session.id, lastCovered: covered)
            })
            switch end {
            case .caughtUp(let sent):
                logger.debug("resumed subscription caught up", metadata: ["id": "\(id)", "since": "\(since)", "sent": "\(sent)"])
            case .overflowed:
                logger.notice("slow consumer closed with 1013 during a since catch-up (send queue over maxMessages=\(configuration.queueLimits.maxMessages) or maxBytes=\(configuration.queueLimits.maxBytes): RealtimeServerConfiguration.queueLimits)",
                              metadata: ["id": "\(id)", "since": "\(since)"])
            case .ended:
                break  // the session is ending
            case .streamEnded:
                // Not joined: the id is free again, and the client is told (a no-op if the
                // session is already closing, as it is at shutdown).
                reader.openIDs.remove(id)
                session.enqueue(ProtocolError(.internal, id: id, "the change stream ended while resuming; resubscribe with 'since'").serverMessage)
            }
        } catch let error as ResumeWindowError {
            reader.openIDs.remove(id)
            session.enqueue(.resyncRequired(id: id, message: error.message))
        } catch let error as ChangeStreamError where error.code == .consumerTooSlow {
            // The source cut this catch-up off because the client reads too slowly (the reader
            // waits for its send queue): a slow consumer, closed with 1013 like one the fan-out
            // finds, with none of its subscriptions left behind; it resumes with `since`.
            reader.openIDs.remove(id)
            state.withLock { $0.dropClient(session.id) }
            session.closeNow(.tryAgainLater)
            logger.notice("slow consumer closed with 1013 during a since catch-up (the change source cut it off: \(error.message))",
                          metadata: ["id": "\(id)", "since": "\(since)"])
        } catch {
            reader.openIDs.remove(id)
            session.enqueue(ProtocolError(.internal, id: id, "the change stream failed while resuming (\(error)); resubscribe with 'since'").serverMessage)
        }
    }
}

/// How `RealtimeServer.catchUp` ended.
enum CatchUpEnd: Sendable {
    /// It reached the fan-out's position and handed the subscription over; `sent` frames were queued.
    case caughtUp(sent: Int)
    /// The socket's send queue overflowed: it is closing with 1013, and the client was dropped.
    case overflowed
    /// The socket closed, or the subscription is no longer wanted: nothing was handed over.
    case ended
    /// The stream ended (the source stopped) short of the fan-out's position, or by this task's
    /// cancellation: nothing was handed over, and the subscription is not live.
    case streamEnded
}

extension RealtimeServer {
    /// The shared loop of a `since` catch-up and of a snapshot's read-back: queues the frame
    /// `frame` makes of each change of `stream` (a window read after `from`), waiting while the
    /// send queue is half full, until a change reaches the fan-out's position; in that critical
    /// section `handOver` gets the last cursor covered and the fan-out takes the subscription
    /// over (it delivers what comes after). `isWanted` is asked in every critical section (false:
    /// the subscription was dropped meanwhile). The stream's errors are thrown.
    func catchUp<Changes: AsyncSequence>(_ stream: Changes, from: Cursor, session: SessionChannel, reader: inout SessionReaderState,
                                         frame: (ChangeEvent) -> [UInt8]?, isWanted: (ServerState) -> Bool,
                                         handOver: (inout ServerState, Cursor) -> Void) async throws -> CatchUpEnd where Changes.Element == ChangeEvent {
        var lastCovered = from
        var sent = 0
        var read = 0
        for try await event in stream {
            while session.isOpen && session.channel.isActive && session.isHalfFull {
                guard await reader.spaceFreed.next() != nil else { break }
            }
            guard session.isOpen && session.channel.isActive else { return .ended }
            // Matched and encoded before the state lock, which the fan-out and every other
            // socket share (a thousand clients catching up after a restart held it for every
            // change of their windows, encoding included).
            let encoded = frame(event)
            let covered = lastCovered
            let outcome = state.withLock { state -> CatchUpEnd? in
                guard isWanted(state) else { return .ended }
                if event.cursor > state.lastDelivered {
                    // The window is ahead of the fan-out: it delivers this change itself.
                    handOver(&state, covered)
                    return .caughtUp(sent: sent)
                }
                if let encoded {
                    switch session.enqueue(encoded) {
                    case .queued: sent += 1
                    case .overflow:
                        state.dropClient(session.id)
                        return .overflowed
                    case .closed: return .ended
                    }
                }
                if event.cursor >= state.lastDelivered {
                    handOver(&state, event.cursor)
                    return .caughtUp(sent: sent)
                }
                return nil
            }
            if let outcome { return outcome }
            lastCovered = event.cursor
            // A window read from memory never suspends: every 64 changes the thread is
            // offered to other tasks (HTTP answers, /readyz, other catch-ups), or hundreds
            // of clients resuming after a restart held the few cooperative threads for
            // seconds at a time.
            read &+= 1
            if read & 63 == 0 { await Task.yield() }
        }
        // The source stopped (so has the fan-out): hand over at what was covered if that is
        // where the fan-out stopped; a stream that ended short of it, or ended by this task's
        // cancellation, hands over nothing (the session is ending).
        let covered = lastCovered
        return state.withLock { state -> CatchUpEnd in
            guard isWanted(state) else { return .ended }
            guard covered >= state.lastDelivered, !Task.isCancelled else { return .streamEnded }
            handOver(&state, covered)
            return .caughtUp(sent: sent)
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

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        // Nothing may follow the server's close frame (RFC 6455 5.5.1): not the `SessionHandler`'s echo
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

/// Pings the client every `interval` and drops the socket (close 1001, "Ping timeout") after
/// two missed pings: when neither of the last two pings was answered as the next is due (so
/// after two to three intervals of silence), as PROTOCOL.md specifies. Replaces Hummingbird's auto-ping,
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
    /// The ping before `unanswered`, also unanswered (a late pong for it still counts).
    private var previousUnanswered: ByteBuffer?
    private var stopped = false
    /// Ticks that found the ping unanswered while reads were paused, in a row.
    private var pausedTicks = 0
    /// Reads paused for this many intervals with a ping unanswered end the socket anyway: reads
    /// resume once the client reads what a catch-up or snapshot sends, and one that never does
    /// would otherwise hold the snapshot's pooled connection (and its open transaction) for good.
    static let maxPausedIntervals = 4

    /// Whether the session has paused reading (its messages wait behind a catch-up or
    /// snapshot): the client's pong may then sit unread, which is no reason to drop it.
    private let readsPaused: () -> Bool
    /// Whether the session waits for the server (a snapshot's turn under maxConcurrentSnapshots, or the WAL question of a since ahead of the stream): paused reads are then
    /// the server's doing, and do not count towards `maxPausedIntervals`.
    private let serverBusy: () -> Bool

    /// Where a drop for a ping timeout is logged (at info: the close code alone, 1001, does
    /// not tell it from a shutdown).
    private let logger: Logger?

    init(interval: TimeAmount, readsPaused: @escaping () -> Bool = { false }, serverBusy: @escaping () -> Bool = { false },
         logger: Logger? = nil) {
        self.interval = interval
        self.readsPaused = readsPaused
        self.serverBusy = serverBusy
        self.logger = logger
    }

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
            let data = frame.unmaskedData
            if data == unanswered {
                unanswered = nil
                previousUnanswered = nil
            } else if data == previousUnanswered {
                // A late answer to the ping before: the latest one is still unanswered.
                previousUnanswered = nil
            }
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
        if unanswered != nil && readsPaused() && pausedTicks < Self.maxPausedIntervals {
            // Not read yet, not unanswered: ask again once reading resumes.
            if !serverBusy() { pausedTicks += 1 }
            schedule(context: context)
            return
        }
        // Reads paused for `maxPausedIntervals` with a ping unanswered end it at once.
        let pausedTooLong = pausedTicks >= Self.maxPausedIntervals && readsPaused()
        pausedTicks = 0
        if unanswered != nil && (previousUnanswered != nil || pausedTooLong) {
            // Two pings in a row missed.
            stop()
            logger?.info("socket dropped with 1001: ping timeout (no pong to two pings in a row\(pausedTooLong ? ", or to one while its reads stayed paused behind a catch-up or snapshot it did not read" : ""); pingInterval=\(interval))")
            var payload = context.channel.allocator.buffer(capacity: 2 + 12)
            payload.writeInteger(UInt16(1001))
            payload.writeString("Ping timeout")
            context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: payload)), promise: nil)
            context.close(promise: nil)
            return
        }
        var payload = context.channel.allocator.buffer(capacity: Self.payloadSize)
        for _ in 0..<Self.payloadSize { payload.writeInteger(UInt8.random(in: .min ... .max)) }
        previousUnanswered = unanswered
        unanswered = payload
        context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .ping, data: payload)), promise: nil)
        schedule(context: context)
    }
}

@available(*, unavailable)
extension AutoPingHandler: Sendable {}
