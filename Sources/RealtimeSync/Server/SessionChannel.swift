import NIOCore
import NIOWebSocket
import Synchronization

/// One socket's outbound side, shared by its reader and the fan-out: the `OutboundQueue`
/// behind a lock, the writer (a pump on the channel's event loop), the close watchdog, and
/// the signal that wakes a catch-up or snapshot waiting for queue space. Owned by the session
/// (its `SessionHandler`, which ends it when the channel goes inactive).
final class SessionChannel: Sendable {
    let id: FanoutClientID
    /// The socket, to cut it when a close handshake exceeds its deadline.
    let channel: any Channel
    /// Which of the server's event loops the socket is on (the fan-out shares a frame only
    /// among sessions of one loop).
    let loopIndex: Int
    private struct QueueState: Sendable {
        var queue: OutboundQueue<ByteBuffer>
        /// Whether closing has begun (noted once, to arm the watchdog once).
        var closeBegan = false
        /// Whether a pump is scheduled or running on the event loop (at most one is).
        var pumpScheduled = false

        /// Marks a pump as needed; true when the caller must schedule it.
        mutating func needsPump() -> Bool {
            guard !pumpScheduled else { return false }
            pumpScheduled = true
            return true
        }

        /// True the first time closing is seen to have begun.
        mutating func noteClose() -> Bool {
            guard !closeBegan, queue.closeCode != nil else { return false }
            closeBegan = true
            return true
        }
    }

    private let queue: Mutex<QueueState>
    /// How long a close may take (queue flush, close frame, the client's answer) before the
    /// connection is dropped (`RealtimeServerConfiguration.closeTimeout`).
    private let closeTimeout: TimeAmount
    /// The close watchdog: an event-loop timer armed when closing begins (not a task per
    /// session: a suspended task costs kilobytes of stack per socket), cancelled at session end.
    private let watchdog = Mutex<(timer: Scheduled<Void>?, ended: Bool)>((nil, false))
    /// Counts messages that went out (the server's delivered counter and metric).
    private let written: @Sendable (Int) -> Void
    private let spaceContinuation: AsyncStream<Void>.Continuation
    /// Yields after the writer sent a batch (only a catch-up or snapshot iterates it).
    let spaceFreed: AsyncStream<Void>
    /// Subscription ids the server ended on its own (a schema change broke their filter),
    /// not yet taken out of the session handler's open ids.
    private let endedIDs = Mutex<Set<String>>([])

    /// Notes that the server ended subscription `id` (see `takeEndedIDs`).
    func noteEndedByServer(_ id: String) { endedIDs.withLock { _ = $0.insert(id) } }

    /// The ids the server ended since the last call: no longer open for the client.
    func takeEndedIDs() -> Set<String> {
        endedIDs.withLock { ids in
            defer { ids = [] }
            return ids
        }
    }

    init(id: FanoutClientID, channel: any Channel, loopIndex: Int = 0, limits: OutboundQueue<[UInt8]>.Limits, closeTimeout: Duration,
         written: @escaping @Sendable (Int) -> Void) {
        self.written = written
        self.id = id
        self.channel = channel
        self.loopIndex = loopIndex
        self.closeTimeout = TimeAmount(closeTimeout)
        self.frameWriter = NIOLoopBoundBox.makeEmptyBox(valueType: ChannelHandlerContext.self, eventLoop: channel.eventLoop)
        self.queue = Mutex(QueueState(queue: OutboundQueue(limits: .init(maxMessages: limits.maxMessages, maxBytes: limits.maxBytes))))
        (spaceFreed, spaceContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// A complete server-to-client text frame (unmasked, FIN) around `payload`: what the queue
    /// holds and the pump writes as it is. Encoding once lets the fan-out share one frame
    /// among every client that gets the same bytes, and lets the pump skip the frame encoder.
    static func textFrame(_ payload: [UInt8]) -> ByteBuffer {
        var frame = ByteBuffer()
        frame.reserveCapacity(payload.count + 10)
        frame.writeInteger(UInt8(0x81))  // FIN, opcode text
        if payload.count < 126 {
            frame.writeInteger(UInt8(payload.count))
        } else if payload.count <= Int(UInt16.max) {
            frame.writeInteger(UInt8(126))
            frame.writeInteger(UInt16(payload.count))
        } else {
            frame.writeInteger(UInt8(127))
            frame.writeInteger(UInt64(payload.count))
        }
        frame.writeBytes(payload)
        return frame
    }

    /// The payload length of a frame made by `textFrame`.
    static func payloadLength(_ frame: ByteBuffer) -> Int {
        switch frame.getInteger(at: frame.readerIndex + 1, as: UInt8.self) ?? 0 {
        case 126: return Int(frame.getInteger(at: frame.readerIndex + 2, as: UInt16.self) ?? 0)
        case 127: return Int(frame.getInteger(at: frame.readerIndex + 2, as: UInt64.self) ?? 0)
        case let n: return Int(n)
        }
    }

    /// Queues a text message and schedules the writer.
    @discardableResult
    func enqueue(_ payload: [UInt8]) -> OutboundQueue<ByteBuffer>.EnqueueResult { enqueue(encodedFrame: Self.textFrame(payload)) }

    /// Queues a frame made by `textFrame` and schedules the writer. The fan-out passes one
    /// buffer to every client whose frame is the same (ByteBuffer is copy-on-write; the writes
    /// only read it).
    @discardableResult
    func enqueue(encodedFrame frame: ByteBuffer) -> OutboundQueue<ByteBuffer>.EnqueueResult {
        let (result, pump) = enqueueLeavingPump(encodedFrame: frame)
        if pump { schedulePump() }
        return result
    }

    /// Queues a frame made by `textFrame` like `enqueue(encodedFrame:)`, but leaves the
    /// writer to the caller: true when it must run `pumps` for this session on its event loop.
    /// The fan-out queues one change for hundreds of sessions of a loop; one event-loop task
    /// that runs all their writers costs less than a task per session (an allocation and a
    /// lock round on the loop's task queue each, against the loop that is the bottleneck).
    func enqueueLeavingPump(encodedFrame frame: ByteBuffer) -> (result: OutboundQueue<ByteBuffer>.EnqueueResult, needsPump: Bool) {
        let (result, began, pump) = queue.withLock { state in
            let result = state.queue.enqueue(frame, byteCount: frame.readableBytes)
            return (result, state.noteClose(), result != .closed && state.needsPump())
        }
        if began { armWatchdog() }
        return (result, pump)
    }

    /// Runs the writers of `sessions`, all of one event loop, in one task on that loop
    /// (`enqueueLeavingPump`).
    static func pumps(_ sessions: [SessionChannel]) {
        guard let loop = sessions.first?.channel.eventLoop else { return }
        loop.execute { for session in sessions { session.pump() } }
    }

    /// Queues a server message.
    @discardableResult
    func enqueue(_ message: ServerMessage) -> OutboundQueue<ByteBuffer>.EnqueueResult { enqueue(message.jsonBytes()) }

    /// Flush what is queued, then close with `code` (first close wins).
    func close(_ code: WebSocketCloseCode) {
        let (began, pump) = queue.withLock { state in
            state.queue.close(code)
            return (state.noteClose(), state.needsPump())
        }
        if pump { schedulePump() }
        if began { armWatchdog() }
    }

    /// Drop what is queued and close with `code` now.
    func closeNow(_ code: WebSocketCloseCode) {
        let (began, pump) = queue.withLock { state in
            state.queue.closeNow(code)
            return (state.noteClose(), state.needsPump())
        }
        if pump { schedulePump() }
        if began { armWatchdog() }
    }

    // MARK: The writer, on the channel's event loop

    private func schedulePump() {
        channel.eventLoop.execute { self.pump() }
    }

    /// Where the pump writes encoded frames: the context of NIO's `WebSocketFrameEncoder`, so
    /// that they go straight to the socket's pending writes instead of through every outbound
    /// handler from the pipeline's tail and the encoder (per socket and change, that walk was
    /// most of the server's fan-out CPU). Set on the event loop when the session starts; nil
    /// (frames then go from the tail as `WebSocketFrame`s) if the encoder is not found.
    private let frameWriter: NIOLoopBoundBox<ChannelHandlerContext?>

    /// Records the encoder's context (on the event loop, when the session's handlers are added).
    func setFrameWriter(_ context: ChannelHandlerContext?) {
        frameWriter.value = context
    }

    /// The channel became writable again (from the `CloseFrameObserver`, on the event loop).
    func channelBecameWritable() {
        if queue.withLock({ $0.needsPump() }) { pump() }
    }

    /// The writer: on the event loop, writes what the queue hands out, one flush per batch,
    /// while the channel is writable (NIO's watermarks); then the close frame. No task per
    /// socket: a suspended writer task held kilobytes of stack per idle socket, and waking it
    /// per message cost a task switch. A client that does not read stops the pump at the
    /// high watermark, so the session's bounded queue, not NIO's buffer, grows (1013).
    /// Data frames are already encoded (`textFrame`) and go in at the frame encoder's context
    /// (`frameWriter`); the close frame goes from the tail, so that `CloseFrameObserver` and
    /// `AutoPingHandler` see it. The `SessionHandler`'s own frames (pongs, dropped by
    /// `CloseFrameObserver` once ours went; its answer to a client's close) also come from
    /// the tail, as whole frames.
    private func pump() {
        while true {
            let writable = channel.isWritable
            let next = queue.withLock { state -> OutboundQueue<ByteBuffer>.Next? in
                if state.queue.queuedMessages > 0 && !writable {
                    state.pumpScheduled = false  // channelBecameWritable resumes
                    return nil
                }
                let next = state.queue.next()
                if case .write = next {} else { state.pumpScheduled = false }
                return next
            }
            switch next {
            case .write(let batch)?:
                if sentCloseCode.load(ordering: .relaxed) != 0 {
                    // Another close went out first (ping timeout, a protocol error): nothing may
                    // follow it, as `CloseFrameObserver` enforces for frames from the tail.
                    // Nothing is sent, so nothing is counted.
                } else if let writer = frameWriter.value {
                    if batch.count == 1 {
                        writer.write(NIOAny(IOData.byteBuffer(batch[0])), promise: nil)
                    } else {
                        // One buffer for the batch: one pending write and one iovec instead of
                        // one per frame (frames are small; copying them is cheaper than NIO's
                        // bookkeeping per write), and each shared frame is released here at once.
                        var total = 0
                        for frame in batch { total += frame.readableBytes }
                        var joined = channel.allocator.buffer(capacity: total)
                        for frame in batch { joined.writeImmutableBuffer(frame) }
                        writer.write(NIOAny(IOData.byteBuffer(joined)), promise: nil)
                    }
                    writer.flush()
                    written(batch.count)
                } else {
                    for var frame in batch {
                        // Strip the header `textFrame` added; the encoder writes its own.
                        let header = frame.readableBytes - Self.payloadLength(frame)
                        frame.moveReaderIndex(forwardBy: header)
                        channel.write(WebSocketFrame(fin: true, opcode: .text, data: frame), promise: nil)
                    }
                    channel.flush()
                    written(batch.count)
                }
                spaceContinuation.yield()
            case .close(let code)?:
                var payload = channel.allocator.buffer(capacity: 2)
                payload.writeInteger(code.rawValue)
                channel.writeAndFlush(WebSocketFrame(fin: true, opcode: .connectionClose, data: payload), promise: nil)
                return
            case .idle?, .finished?, nil:
                return
            }
        }
    }

    /// Whether the queue still accepts messages.
    var isOpen: Bool { queue.withLock { $0.queue.isOpen } }

    /// Bytes and messages now queued.
    var queued: (bytes: Int, messages: Int) { queue.withLock { ($0.queue.queuedBytes, $0.queue.queuedMessages) } }

    /// Whether the queue is at least half full (the catch-up then waits for the writer).
    var isHalfFull: Bool {
        queue.withLock { state in
            2 * state.queue.queuedMessages >= state.queue.limits.maxMessages || 2 * state.queue.queuedBytes >= state.queue.limits.maxBytes
        }
    }

    /// The code of the first close frame the server sent on this socket (0: none yet), whoever
    /// sent it: the session's queue, the `SessionHandler` (echo), the `AutoPingHandler` (ping
    /// timeout) or NIO (frame too large).
    let sentCloseCode = Atomic<UInt16>(0)
    /// Whether the client's close frame arrived (the `SessionHandler` echoes it).
    let clientSentClose = Atomic<Bool>(false)
    /// Whether the `SessionHandler` paused reading the socket (messages held behind a
    /// catch-up or snapshot); the `AutoPingHandler` then does not count a pong as missing.
    let readsPaused = Atomic<Bool>(false)
    /// Whether the session's work waits for the server itself (its turn for a snapshot), not
    /// for the client to read: paused reads then do not count against the ping timeout.
    let waitingForServer = Atomic<Bool>(false)

    private let closeWakesReader = Atomic<Bool>(false)

    /// Makes the socket's close wake a reader waiting on `spaceFreed` (a snapshot waiting for
    /// queue space while the writer has stopped). Registers once per session.
    func wakeReaderOnClose() {
        guard closeWakesReader.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        let continuation = spaceContinuation
        channel.closeFuture.whenComplete { _ in continuation.yield() }
    }

    /// Closing began: unless the session ends first, the connection is dropped after `closeTimeout`.
    private func armWatchdog() {
        let channel = self.channel
        let timer = channel.eventLoop.scheduleTask(in: closeTimeout) { channel.close(promise: nil) }
        let armed = watchdog.withLock { state -> Bool in
            guard !state.ended, state.timer == nil else { return false }
            state.timer = timer
            return true
        }
        if !armed { timer.cancel() }
    }

    /// A close frame went out that this session's queue did not send (NIO's answer to a frame
    /// its decoder rejected, which closes the connection only once that frame is written): the
    /// connection is dropped after `closeTimeout` all the same, also when the client reads
    /// nothing and the frame is never written.
    func closeSentElsewhere() { armWatchdog() }

    /// Ends the signals and the close watchdog (the session is over).
    func finishSignals() {
        spaceContinuation.finish()
        let timer = watchdog.withLock { state -> Scheduled<Void>? in
            state.ended = true
            defer { state.timer = nil }
            return state.timer
        }
        timer?.cancel()
        // Drop the encoder's context (it references the pipeline, which references the
        // observer holding this session) rather than wait for the pipeline's teardown.
        let writer = frameWriter
        channel.eventLoop.execute { writer.value = nil }
    }
}
