/// WebSocket close codes the server sends (PROTOCOL.md "Close codes").
public struct WebSocketCloseCode: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    /// The code on the wire.
    public var rawValue: UInt16
    /// Wraps a code.
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// 1000: the client closed; the server echoes.
    public static let normalClosure = WebSocketCloseCode(rawValue: 1000)
    /// 1001: server shutdown.
    public static let goingAway = WebSocketCloseCode(rawValue: 1001)
    /// 1002: protocol error.
    public static let protocolError = WebSocketCloseCode(rawValue: 1002)
    /// 1003: binary frame.
    public static let unsupportedData = WebSocketCloseCode(rawValue: 1003)
    /// 1007: invalid UTF-8.
    public static let invalidPayload = WebSocketCloseCode(rawValue: 1007)
    /// 1008: token expired or policy violation.
    public static let policyViolation = WebSocketCloseCode(rawValue: 1008)
    /// 1009: message too big.
    public static let messageTooBig = WebSocketCloseCode(rawValue: 1009)
    /// 1011: internal error.
    public static let internalError = WebSocketCloseCode(rawValue: 1011)
    /// 1013: slow consumer or server overloaded; retry with `since`.
    public static let tryAgainLater = WebSocketCloseCode(rawValue: 1013)

    /// The number.
    public var description: String { String(rawValue) }
}

/// One socket's send queue: a pure state machine, bounded by messages and bytes.
///
/// The session enqueues frames; its writer asks `next()` for what to do: write a
/// batch, wait (`idle`), send a close frame, or stop (`finished`).
///
/// - Bounds: `enqueue` answers `.overflow` when the message would take the queue
///   past `maxMessages` or `maxBytes`; the queue then drops what it holds and its
///   writer gets `.close(1013)` at once (a slow consumer reconnects with `since`).
///   A queue holding at most a sixteenth of `maxBytes` (a socket that keeps up:
///   empty, or a `subscribed` reply and a few changes) accepts one more message of
///   any size, so a single large change never closes such a socket.
/// - Close: `close(_:)` refuses new messages (`.closed`); what was queued before
///   is still handed out, then `.close(code)` once, then `.finished`. The first
///   close wins; `closeNow(_:)` drops the queue instead of flushing it.
/// - Bytes count from `enqueue` until handed out by `next()`.
public struct OutboundQueue<Element: Sendable>: Sendable {
    /// Bounds.
    public struct Limits: Sendable, Hashable {
        /// Queued messages at most. Default 1,024.
        public var maxMessages: Int
        /// Queued bytes at most. Default 8 MiB.
        public var maxBytes: Int

        /// Creates limits.
        public init(maxMessages: Int = 1_024, maxBytes: Int = 8 << 20) {
            precondition(maxMessages >= 1, "OutboundQueue.Limits.maxMessages must be at least 1, got \(maxMessages)")
            precondition(maxBytes >= 1, "OutboundQueue.Limits.maxBytes must be at least 1, got \(maxBytes)")
            self.maxMessages = maxMessages
            self.maxBytes = maxBytes
        }
    }

    /// The answer to `enqueue`.
    public enum EnqueueResult: Sendable, Hashable {
        /// Queued; the writer should be woken if idle.
        case queued
        /// Over a bound: the queue is now closing with 1013 and has dropped its messages.
        case overflow
        /// The queue is closing or closed: the message was dropped.
        case closed
    }

    /// What the writer does next.
    public enum Next: Sendable {
        /// Send these messages, in order.
        case write([Element])
        /// Nothing to send: wait for `enqueue` or `close`.
        case idle
        /// Everything is sent: send a close frame with this code.
        case close(WebSocketCloseCode)
        /// The close frame was handed out; the writer is done.
        case finished
    }

    private enum State: Sendable, Hashable {
        case open
        case closing(WebSocketCloseCode)
        case finished
    }

    /// The bounds in force.
    public let limits: Limits
    private var buffer = FIFOBuffer<(element: Element, bytes: Int)>()
    private var state = State.open
    /// Bytes now queued.
    public private(set) var queuedBytes = 0
    /// Messages accepted so far.
    public private(set) var enqueuedCount = 0
    /// Messages handed to the writer so far.
    public private(set) var dequeuedCount = 0
    /// Messages dropped by an overflow or `closeNow` (and refused after close).
    public private(set) var droppedCount = 0

    /// Creates an open, empty queue.
    public init(limits: Limits = Limits()) { self.limits = limits }

    /// Messages now queued.
    public var queuedMessages: Int { buffer.count }

    /// Whether the queue still accepts messages.
    public var isOpen: Bool { state == .open }

    /// The close code once closing began.
    public var closeCode: WebSocketCloseCode? {
        switch state {
        case .open: nil
        case .closing(let code): code
        case .finished: nil
        }
    }

    /// Queues a message of `byteCount` bytes (see the type's documentation for bounds).
    public mutating func enqueue(_ element: Element, byteCount: Int) -> EnqueueResult {
        guard state == .open else { droppedCount += 1; return .closed }
        let bytes = max(0, byteCount)
        let overBytes = queuedBytes + bytes > limits.maxBytes && queuedBytes > limits.maxBytes / 16
        if !buffer.isEmpty && (buffer.count + 1 > limits.maxMessages || overBytes) {
            droppedCount += 1
            closeNow(.tryAgainLater)
            return .overflow
        }
        buffer.append((element, bytes))
        queuedBytes += bytes
        enqueuedCount += 1
        return .queued
    }

    /// Begins closing after flushing: what is queued is still sent, then a close frame with `code`.
    /// Idempotent; the first close's code wins.
    public mutating func close(_ code: WebSocketCloseCode) {
        guard state == .open else { return }
        state = .closing(code)
    }

    /// Closes without flushing: drops what is queued; the next `next()` is `.close(code)`.
    /// A close already begun keeps its code but still drops the queue.
    public mutating func closeNow(_ code: WebSocketCloseCode) {
        if state == .open { state = .closing(code) }
        droppedCount += buffer.count
        buffer.removeAll()
        queuedBytes = 0
    }

    /// What the writer does next: up to `maxMessages` messages and about `maxBytes`
    /// bytes (at least one message), or idle, close, finished.
    public mutating func next(maxMessages: Int = 64, maxBytes: Int = 1 << 20) -> Next {
        if !buffer.isEmpty {
            var batch: [Element] = []
            var bytes = 0
            while let first = buffer.first, batch.count < max(1, maxMessages), batch.isEmpty || bytes + first.bytes <= maxBytes {
                buffer.removeFirst()
                batch.append(first.element)
                bytes += first.bytes
            }
            queuedBytes -= bytes
            dequeuedCount += batch.count
            return .write(batch)
        }
        switch state {
        case .open: return .idle
        case .closing(let code):
            state = .finished
            return .close(code)
        case .finished: return .finished
        }
    }
}

/// A first-in first-out buffer: an array with a moving head, compacted when half is spent;
/// a removed element is released at once.
struct FIFOBuffer<Element: Sendable>: Sendable {
    private var storage: [Element?] = []
    private var head = 0

    var count: Int { storage.count - head }
    var isEmpty: Bool { head == storage.count }
    var first: Element? { isEmpty ? nil : storage[head] }

    mutating func append(_ element: Element) { storage.append(element) }

    /// Changes the first element in place (nil when empty).
    mutating func withFirst<R>(_ body: (inout Element) -> R) -> R? {
        guard !isEmpty else { return nil }
        return body(&storage[head]!)
    }

    mutating func removeFirst() {
        guard !isEmpty else { return }
        storage[head] = nil
        head += 1
        if head == storage.count {
            storage.removeAll(keepingCapacity: storage.count <= 1_024)
            head = 0
        } else if head >= 64 && head * 2 >= storage.count {
            storage.removeFirst(head)
            head = 0
        }
    }

    mutating func removeAll() {
        storage = []
        head = 0
    }
}
