import NIOCore
import Synchronization

/// One socket's outbound side, shared by its reader, its writer and the fan-out:
/// the `OutboundQueue` behind a lock, and the signals that wake the writer and
/// the catch-up reader. Owned by the session (the WebSocket handler's scope).
final class SessionChannel: Sendable {
    let id: FanoutClientID
    /// The socket, to cut it when a close handshake exceeds its deadline.
    let channel: any Channel
    private struct QueueState: Sendable {
        var queue: OutboundQueue<[UInt8]>
        /// The first close code, kept after the queue finished (for metrics and logs).
        var closeCode: WebSocketCloseCode?

        /// Records the queue's close code if closing just began; true then.
        mutating func noteClose() -> Bool {
            guard closeCode == nil, let code = queue.closeCode else { return false }
            closeCode = code
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
    private let wakeContinuation: AsyncStream<Void>.Continuation
    /// Yields when there is something for the writer (only the writer iterates it).
    let wakeups: AsyncStream<Void>
    private let spaceContinuation: AsyncStream<Void>.Continuation
    /// Yields after the writer sent a batch (only the reader's catch-up iterates it).
    let spaceFreed: AsyncStream<Void>

    init(id: FanoutClientID, channel: any Channel, limits: OutboundQueue<[UInt8]>.Limits, closeTimeout: Duration) {
        self.id = id
        self.channel = channel
        self.closeTimeout = TimeAmount(closeTimeout)
        self.queue = Mutex(QueueState(queue: OutboundQueue(limits: limits)))
        (wakeups, wakeContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        (spaceFreed, spaceContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// Queues a frame and wakes the writer.
    @discardableResult
    func enqueue(_ frame: [UInt8]) -> OutboundQueue<[UInt8]>.EnqueueResult {
        let (result, began) = queue.withLock { state in
            let result = state.queue.enqueue(frame, byteCount: frame.count)
            return (result, state.noteClose())
        }
        if result != .closed { wakeContinuation.yield() }
        if began { armWatchdog() }
        return result
    }

    /// Queues a server message.
    @discardableResult
    func enqueue(_ message: ServerMessage) -> OutboundQueue<[UInt8]>.EnqueueResult { enqueue(message.jsonBytes()) }

    /// Flush what is queued, then close with `code` (first close wins).
    func close(_ code: WebSocketCloseCode) {
        let began = queue.withLock { state in
            state.queue.close(code)
            return state.noteClose()
        }
        wakeContinuation.yield()
        if began { armWatchdog() }
    }

    /// Drop what is queued and close with `code` now.
    func closeNow(_ code: WebSocketCloseCode) {
        let began = queue.withLock { state in
            state.queue.closeNow(code)
            return state.noteClose()
        }
        wakeContinuation.yield()
        if began { armWatchdog() }
    }

    /// The writer's next step.
    func next() -> OutboundQueue<[UInt8]>.Next {
        queue.withLock { $0.queue.next() }
    }

    /// Called by the writer after a batch went out.
    func batchWritten() { spaceContinuation.yield() }

    /// Whether the queue still accepts messages.
    var isOpen: Bool { queue.withLock { $0.queue.isOpen } }

    /// The first close code, once closing began (kept after the close frame went out).
    var closeCode: WebSocketCloseCode? { queue.withLock { $0.closeCode } }

    /// Bytes and messages now queued.
    var queued: (bytes: Int, messages: Int) { queue.withLock { ($0.queue.queuedBytes, $0.queue.queuedMessages) } }

    /// Whether the queue is at least half full (the catch-up then waits for the writer).
    var isHalfFull: Bool {
        queue.withLock { state in
            2 * state.queue.queuedMessages >= state.queue.limits.maxMessages || 2 * state.queue.queuedBytes >= state.queue.limits.maxBytes
        }
    }

    /// The code of the first close frame the server sent on this socket (0: none yet), whoever
    /// sent it: the session, Hummingbird (echo, ping timeout) or NIO (frame too large).
    let sentCloseCode = Atomic<UInt16>(0)
    /// Whether the client's close frame arrived (Hummingbird echoes it).
    let clientSentClose = Atomic<Bool>(false)

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
            guard !state.ended else { return false }
            state.timer = timer
            return true
        }
        if !armed { timer.cancel() }
    }

    /// Ends the signals and the close watchdog (the session is over).
    func finishSignals() {
        wakeContinuation.finish()
        spaceContinuation.finish()
        let timer = watchdog.withLock { state -> Scheduled<Void>? in
            state.ended = true
            defer { state.timer = nil }
            return state.timer
        }
        timer?.cancel()
    }
}
