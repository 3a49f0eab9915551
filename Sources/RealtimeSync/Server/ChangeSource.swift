import Synchronization

/// Where the server's changes come from: the committed change stream with its
/// resume window, and the tables it carries.
///
/// The server reads one live stream for fan-out (`changes(after: currentCursor)`)
/// and, for a `subscribe` with `since`, one stream per resuming subscription.
/// The capture's `ChangeStream` is adapted to this protocol by the composition
/// root; `InMemoryChangeSource` serves tests and demos.
public protocol ChangeSource: Sendable {
    /// The sequence `changes(after:)` returns.
    associatedtype Changes: AsyncSequence<ChangeEvent, any Error>

    /// Every change after `cursor` still in the resume window, oldest first, then every
    /// live change as it commits; `nil` means live changes only, from now. Throws
    /// `ResumeWindowError` (`resync_required`) when `cursor` is older than the window.
    /// The sequence ends when the source stops (capture stopped at shutdown).
    func changes(after cursor: Cursor?) async throws -> Changes

    /// The cursor of the newest change the source holds (or, with none yet, the
    /// position its stream starts at): `changes(after: currentCursor)` misses nothing.
    var currentCursor: Cursor { get }

    /// Whether the source is connected to its database (`/readyz`).
    var isConnected: Bool { get }
    /// Whether the source has read what its database held when it connected (`/readyz`
    /// answers 503 `catching_up` until then). A source that serves at once says true.
    var isCaughtUp: Bool { get }

    /// The streamed tables and their columns (what `subscribe` is checked against).
    var catalog: TableCatalog { get }
}

extension ChangeSource {
    /// See `ChangeSource.isCaughtUp`: a source that serves at once is caught up.
    public var isCaughtUp: Bool { true }
}

/// An in-memory `ChangeSource` backed by a `ResumeWindow`: `publish` appends
/// changes and hands them to every open stream. For tests and demos.
///
/// Streams buffer without bound by default (a consumer that never reads keeps what was
/// published for it); with `streamBufferLimit`, a stream that would hold more than that many
/// unread changes beyond its backlog ends with `ChangeStreamError.consumerTooSlow`, as the
/// capture's hub cuts off a slow consumer. `finish()` ends every stream, as a stopped capture does.
public final class InMemoryChangeSource: ChangeSource {
    /// The sequence `changes(after:)` returns.
    public typealias Changes = AsyncThrowingStream<ChangeEvent, any Error>

    private struct State: Sendable {
        var window: ResumeWindow<ContinuousClock.Instant>
        var catalog: TableCatalog
        var isConnected = true
        var isFinished = false
        var nextStreamID = 0
        var streams: [Int: AsyncThrowingStream<ChangeEvent, any Error>.Continuation] = [:]
    }

    private let state: Mutex<State>
    private let streamBufferLimit: Int?

    /// Creates a source serving `catalog`, whose stream starts at `origin`; `streamBufferLimit`
    /// bounds each stream's unread changes beyond its backlog (nil: no bound).
    public init(catalog: TableCatalog, origin: LSN = LSN(0x100), windowLimits: ResumeWindow<ContinuousClock.Instant>.Limits = .init(),
                streamBufferLimit: Int? = nil) {
        precondition(streamBufferLimit.map { $0 > 0 } ?? true, "streamBufferLimit must be positive")
        state = Mutex(State(window: ResumeWindow(limits: windowLimits, origin: origin), catalog: catalog))
        self.streamBufferLimit = streamBufferLimit
    }

    /// Appends committed changes (in stream order, after every earlier one) and delivers
    /// them to every open stream. Changes not after the newest held one are ignored.
    public func publish(_ events: [ChangeEvent]) {
        let now = ContinuousClock.now
        let cutOff = state.withLock { state -> [AsyncThrowingStream<ChangeEvent, any Error>.Continuation] in
            guard !state.isFinished else { return [] }
            var cutOff: [AsyncThrowingStream<ChangeEvent, any Error>.Continuation] = []
            for event in events where state.window.append(event, at: now) {
                for (id, continuation) in state.streams {
                    guard case .dropped = continuation.yield(event) else { continue }
                    state.streams[id] = nil
                    cutOff.append(continuation)
                }
            }
            return cutOff
        }
        // Outside the lock: finishing runs the stream's termination handler, which takes it.
        for continuation in cutOff {
            continuation.finish(throwing: ChangeStreamError(.consumerTooSlow,
                "consumer fell more than \(streamBufferLimit ?? 0) changes behind (streamBufferLimit)"))
        }
    }

    /// Appends one committed change (see `publish(_:)`).
    public func publish(_ event: ChangeEvent) { publish([event]) }

    /// Sets what `isConnected` reports (a test's stand-in for a lost replication connection).
    public func setConnected(_ connected: Bool) { state.withLock { $0.isConnected = connected } }

    /// Replaces the catalog (a table added to the publication, say).
    public func setCatalog(_ catalog: TableCatalog) { state.withLock { $0.catalog = catalog } }

    /// Ends every stream, and every later one at once: the source has stopped.
    public func finish() {
        let continuations = state.withLock { state -> [AsyncThrowingStream<ChangeEvent, any Error>.Continuation] in
            state.isFinished = true
            defer { state.streams.removeAll() }
            return Array(state.streams.values)
        }
        for continuation in continuations { continuation.finish() }
    }

    /// Ends every open stream with `error` (a test's stand-in for a reader cut off as too
    /// slow); later `changes(after:)` calls work as before.
    public func failStreams(with error: any Error) {
        let continuations = state.withLock { state -> [AsyncThrowingStream<ChangeEvent, any Error>.Continuation] in
            defer { state.streams.removeAll() }
            return Array(state.streams.values)
        }
        for continuation in continuations { continuation.finish(throwing: error) }
    }

    /// Open streams (tests check that ended readers release theirs).
    public var openStreamCount: Int { state.withLock { $0.streams.count } }

    /// The events held in the window, oldest first.
    public var windowEvents: [ChangeEvent] { state.withLock { $0.window.events } }

    /// See `ChangeSource.changes(after:)`.
    public func changes(after cursor: Cursor?) async throws -> Changes {
        let limit = streamBufferLimit
        let (stream, continuation, id) = try state.withLock { state throws(ResumeWindowError) in
            let backlog = try cursor.map { cursor throws(ResumeWindowError) in try state.window.events(after: cursor) } ?? []
            let (stream, continuation) = AsyncThrowingStream<ChangeEvent, any Error>.makeStream(
                bufferingPolicy: limit.map { .bufferingOldest(backlog.count + $0) } ?? .unbounded)
            let id = Self.register(backlog, continuation, in: &state)
            return (stream, continuation, id)
        }
        guard let id else {
            continuation.finish()
            return stream
        }
        continuation.onTermination = { [weak self] _ in
            _ = self?.state.withLock { $0.streams.removeValue(forKey: id) }
        }
        return stream
    }

    private static func register(_ backlog: [ChangeEvent], _ continuation: AsyncThrowingStream<ChangeEvent, any Error>.Continuation,
                                 in state: inout State) -> Int? {
        for event in backlog { continuation.yield(event) }
        if state.isFinished { return nil }
        let id = state.nextStreamID
        state.nextStreamID += 1
        state.streams[id] = continuation
        return id
    }

    /// See `ChangeSource.currentCursor`.
    public var currentCursor: Cursor {
        state.withLock { $0.window.last?.cursor ?? $0.window.oldestResumable }
    }

    /// See `ChangeSource.isConnected`.
    public var isConnected: Bool { state.withLock { $0.isConnected && !$0.isFinished } }

    /// See `ChangeSource.catalog`.
    public var catalog: TableCatalog { state.withLock { $0.catalog } }
}
