import Synchronization

/// Why a change subscription ended with an error.
public struct ChangeStreamError: Error, Sendable, CustomStringConvertible {
    /// Stable error codes.
    public enum Code: String, Sendable, Hashable {
        /// The consumer fell more than `consumerBufferLimit` changes behind and was cut off.
        case consumerTooSlow = "consumer_too_slow"
        /// The stream was stopped before the subscription could be served (a subscription it
        /// was serving ends without an error).
        case streamStopped = "stream_stopped"
        /// The stream failed for good (the message says why: a lost slot, a setup the server
        /// refuses): every subscription ends with this error after what it has queued.
        case streamFailed = "stream_failed"
        /// The replication slot is in use by a running stream (e.g. `dropSlot()` while running).
        case slotActive = "slot_active"
        /// A `ChangeStream.Configuration` field is out of range (the message names it).
        case invalidConfiguration = "invalid_configuration"
        /// At a reconnect, the replication slot was gone (dropped, or a failover to a server
        /// without it), had been moved past the stream's position by someone else or
        /// invalidated, or the server is another cluster or on a timeline that forked before
        /// what the stream delivered: what was committed in between cannot be read, so the
        /// stream fails instead of going on with a gap. A new stream (a restart) creates the slot anew; clients resuming from older
        /// cursors then get `resync_required`.
        case slotLost = "slot_lost"
    }

    /// Stable code.
    public var code: Code
    /// What happened and what to do.
    public var message: String
    /// For `consumerTooSlow`: the cursor of the last change this consumer received; resume
    /// with `changes(after:)` from it (nil when it received none: resume from the cursor it
    /// subscribed with, or use `changes()`).
    public var resumeAfter: Cursor?

    /// Creates an error.
    public init(_ code: Code, _ message: String, resumeAfter: Cursor? = nil) {
        self.code = code
        self.message = message
        self.resumeAfter = resumeAfter
    }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}

/// The resume window and the consumers of one change stream: the fan-out half of
/// `ChangeStream`, with no I/O. Every append to the window and every registration happens
/// under one lock, so a consumer that resumes from a cursor gets the window's changes after
/// it and then live ones with no gap and no duplicate at the seam.
///
/// Buffering policy: each consumer has its own queue, counted against `bufferLimit` beyond
/// the backlog it resumed with (a transaction larger than half the limit counts as half of
/// it). A committed transaction is let in while what is queued counts no more than the limit,
/// so a queue holds at most the limit plus one transaction; past that, the consumer is cut
/// off: it still receives what is queued, then its iteration
/// throws `ChangeStreamError.consumerTooSlow` carrying the cursor of the last change it got,
/// so it can resume with `changes(after:)` (served from the window) without growing memory.
final class ChangeHub: Sendable {
    typealias Window = ResumeWindow<ContinuousClock.Instant>

    struct Subscriber {
        var buffer: [ChangeEvent] = []
        var head = 0
        /// Only changes after this cursor are delivered (resume); nil for "from now".
        var after: Cursor?
        /// Waiting for the window to learn its origin before the cursor can be checked.
        var pendingCursor: Cursor?
        var waiter: CheckedContinuation<ChangeEvent?, any Error>?
        /// Set when no more changes will be queued: nil error is a plain end.
        var ending: (any Error)??
        var lastDelivered: Cursor?
        /// Still reading its resume backlog from the window, a page at a time, after
        /// `pageAfter`; live deliveries skip it meanwhile (they are in the window too).
        var paging = false
        /// What the queue counts against the hub's `bufferLimit`: one per queued change, except that a
        /// transaction larger than half the limit counts as half of it, released in proportion
        /// as the consumer reads through it (see `Charge`).
        var charged = 0
        /// The queue's segments (a backlog page, a transaction) in order, with what each counts.
        var charges = FIFOBuffer<Charge>()
        var pageAfter = Cursor(commitLSN: LSN(0), index: 0)
        var queued: Int { buffer.count - head }
        /// Paging, and its queue ran dry: the next page comes from the window.
        var needsPage: Bool { paging && head == buffer.count }
        /// Takes changes as they are appended: not ended, not waiting for the window, not
        /// reading its backlog from the window.
        var takesLiveChanges: Bool { ending == nil && pendingCursor == nil && !paging }

        mutating func pop() -> ChangeEvent? {
            guard head < buffer.count else { return nil }
            let event = buffer[head]
            head += 1
            if head == buffer.count {
                buffer.removeAll(keepingCapacity: buffer.capacity <= 4096)
                head = 0
            } else if head >= 4096 && head * 2 >= buffer.count {
                buffer.removeFirst(head)
                head = 0
            }
            lastDelivered = event.cursor
            release()
            return event
        }

        /// Queues `events` as one segment counting `units` against the limit.
        mutating func push<C: Collection<ChangeEvent>>(_ events: C, units: Int) {
            guard !events.isEmpty else { return }
            buffer.append(contentsOf: events)
            charges.append(Charge(count: events.count, units: units))
            charged += units
        }

        /// One change of the first segment was read: gives back its share of the segment's units.
        private mutating func release() {
            guard let (freed, done) = charges.withFirst({ charge in (charge.read(), charge.remaining == 0) }) else { return }
            charged -= freed
            if done { charges.removeFirst() }
        }
    }

    /// A queued segment's count against the consumer's limit. A transaction larger than
    /// half the limit counts as half of it, and gives that back in proportion to what the
    /// consumer has read of it: a consumer reading a fifth of each big transaction before
    /// the next arrives gains a tenth of the limit each time and is cut off, instead of
    /// being charged only for the part it read first (its queue then grew without bound).
    struct Charge {
        let count: Int
        let units: Int
        var remaining: Int
        var released = 0

        init(count: Int, units: Int) {
            self.count = count
            self.units = units
            self.remaining = count
        }

        /// One change read: the units released by it (all that is left at the segment's end).
        mutating func read() -> Int {
            remaining -= 1
            let due = remaining == 0 ? units : (count - remaining) * units / count
            defer { released = due }
            return due - released
        }
    }

    struct State {
        var window: Window?
        var subscribers: [UInt64: Subscriber] = [:]
        var nextID: UInt64 = 0
        var closed: (any Error)?? = nil
        var transactions = 0
        var changes = 0
        var cutOff = 0

        /// The next change for consumer `id` (see `ChangeHub.take`), paging from the window
        /// when its queue ran dry; the window is only touched then.
        mutating func take(_ id: UInt64) -> Result<ChangeEvent?, any Error>? {
            if subscribers[id]!.needsPage, let window { ChangeHub.nextPage(&subscribers[id]!, from: window) }
            return ChangeHub.take(&subscribers[id]!)
        }
    }

    let bufferLimit: Int
    let limits: Window.Limits
    let state = Mutex(State())
    /// A resuming consumer copies its backlog from the window this many changes at a time
    /// (a copy of the whole window per resuming socket was ~10-20 MB each with 100,000 held).
    static let pageSize = 1_024

    /// Out-of-range values are clamped here; `ChangeStream.run()` refuses them first
    /// (`ChangeStream.Configuration.validate()`), naming the field.
    init(limits: Window.Limits, bufferLimit: Int) {
        var limits = limits
        limits.maxCount = max(1, limits.maxCount)
        limits.maxBytes = max(1, limits.maxBytes)
        limits.maxAge = max(.zero, limits.maxAge)
        self.limits = limits
        self.bufferLimit = max(1, bufferLimit)
    }

    // MARK: Feeding

    /// Creates the window at `origin` (the slot's confirmed position) unless it exists, and
    /// serves the consumers that were waiting to resume. Returns the window's retain position.
    @discardableResult
    func openWindow(origin: LSN) -> LSN {
        var wake: [(CheckedContinuation<ChangeEvent?, any Error>, Result<ChangeEvent?, any Error>)] = []
        let retain = state.withLock { s -> LSN in
            if s.window == nil { s.window = Window(limits: limits, origin: origin) }
            for id in Array(s.subscribers.keys) {
                guard var sub = s.subscribers.removeValue(forKey: id) else { continue }
                defer { s.subscribers[id] = sub }
                guard let cursor = sub.pendingCursor else { continue }
                sub.pendingCursor = nil
                do {
                    try Self.startPaging(&sub, after: cursor, window: s.window!)
                } catch {
                    sub.ending = .some(error)
                }
                if let waiter = sub.waiter, let result = Self.take(&sub) {
                    sub.waiter = nil
                    wake.append((waiter, result))
                }
            }
            return s.window!.retainLSN
        }
        for (waiter, result) in wake { waiter.resume(with: result) }
        return retain
    }

    /// Appends a committed transaction to the window and queues it for every consumer.
    /// Returns where the slot's confirmed position may be (the window's retain position).
    func deliver(_ transaction: CommittedTransaction, now: ContinuousClock.Instant = .now) -> LSN? {
        var wake: [(CheckedContinuation<ChangeEvent?, any Error>, Result<ChangeEvent?, any Error>)] = []
        let retain = state.withLock { s -> LSN? in
            guard s.window != nil else { return nil }
            var kept: [ChangeEvent] = []
            kept.reserveCapacity(transaction.changes.count)
            for event in transaction.changes where s.window!.append(event, at: now) { kept.append(event) }
            if transaction.changes.isEmpty { s.window!.evictExpired(now: now) }
            if !kept.isEmpty {
                s.transactions += 1
                s.changes += kept.count
                // Each consumer in place, through the values' indices: no key array, no hashing,
                // no copy of a queue (removing and re-inserting each one cost two hash
                // operations per consumer and transaction, with the lock held: with hundreds of
                // clients resuming after a restart, the window's rebuild slowed in proportion).
                var index = s.subscribers.values.startIndex
                while index != s.subscribers.values.endIndex {
                    defer { s.subscribers.values.formIndex(after: &index) }
                    guard s.subscribers.values[index].takesLiveChanges else { continue }
                    Self.offer(kept, to: &s.subscribers.values[index], cutOff: &s.cutOff, bufferLimit: bufferLimit, wake: &wake)
                }
            }
            return s.window!.retainLSN
        }
        for (waiter, result) in wake { waiter.resume(with: result) }
        return retain
    }

    /// Queues `kept` (one transaction's changes) for `sub`, or cuts it off; wakes its waiter.
    private static func offer(
        _ kept: [ChangeEvent], to sub: inout Subscriber, cutOff: inout Int, bufferLimit: Int,
        wake: inout [(CheckedContinuation<ChangeEvent?, any Error>, Result<ChangeEvent?, any Error>)]
    ) {
        var batch = kept[...]
        if let after = sub.after {
            batch = batch.drop(while: { $0.cursor <= after })
            if batch.isEmpty { return }
        }
        // A transaction is never split: one is let in while what is queued counts no
        // more than the limit, so a queue holds at most the limit plus one transaction.
        // One larger than half the limit (an UPDATE of 150,000 rows) counts as half of
        // it, given back as the consumer reads through it: a consumer that keeps up
        // gets it whole, and up to three of them committed back to back (a batched
        // backfill) while it reads the first; one that stops reading is cut off at the
        // fourth, and one that reads less of each than arrives, later.
        let counted = min(batch.count, max(1, bufferLimit / 2))
        if sub.charged > bufferLimit {
            cutOff += 1
            let last = sub.buffer.last?.cursor ?? sub.lastDelivered
            sub.ending = .some(ChangeStreamError(.consumerTooSlow,
                "consumer fell more than \(bufferLimit) changes behind (consumerBufferLimit=\(bufferLimit)); resume with changes(after: \(last.map { "\($0)" } ?? "its last cursor"))",
                resumeAfter: last))
        } else {
            sub.push(batch, units: counted)
        }
        if let waiter = sub.waiter, let result = Self.take(&sub) {
            sub.waiter = nil
            wake.append((waiter, result))
        }
    }

    /// The stream passed `position` with no transaction half received (see
    /// `ResumeWindow.markIdle(through:now:)`). Returns the window's retain position when it
    /// moved, else nil.
    func idle(through position: LSN, now: ContinuousClock.Instant = .now) -> LSN? {
        state.withLock { s -> LSN? in
            guard s.window != nil, s.window!.markIdle(through: position, now: now) else { return nil }
            return s.window!.retainLSN
        }
    }

    /// Ends every consumer (after what it has queued) and refuses new ones; `error` nil is a
    /// plain end of stream.
    func close(error: (any Error)?) {
        var wake: [(CheckedContinuation<ChangeEvent?, any Error>, Result<ChangeEvent?, any Error>)] = []
        state.withLock { s in
            if s.closed == nil { s.closed = .some(error) }
            for id in Array(s.subscribers.keys) {
                guard var sub = s.subscribers.removeValue(forKey: id) else { continue }
                defer { s.subscribers[id] = sub }
                if sub.ending == nil {
                    // A failure says why; a plain stop ends a served subscription quietly, and
                    // one whose cursor was never served with stream_stopped.
                    sub.ending = .some(error ?? (sub.pendingCursor.map {
                        ChangeStreamError(.streamStopped, "the change stream stopped before it could serve the cursor \($0)")
                    }))
                }
                if sub.needsPage, let window = s.window { Self.nextPage(&sub, from: window) }
                if let waiter = sub.waiter, let result = Self.take(&sub) {
                    sub.waiter = nil
                    wake.append((waiter, result))
                }
            }
        }
        for (waiter, result) in wake { waiter.resume(with: result) }
    }

    // MARK: Consumers

    /// Registers a consumer of every change appended from now on.
    func subscribe() -> UInt64 {
        state.withLock { s in
            s.nextID += 1
            var sub = Subscriber()
            sub.after = s.window?.last?.cursor
            if let closed = s.closed { sub.ending = .some(closed) }
            s.subscribers[s.nextID] = sub
            return s.nextID
        }
    }

    /// Registers a consumer of every change after `cursor`: the window's, then live ones.
    /// Throws `ResumeWindowError` when the window is open and the cursor is older than it;
    /// before the window is open the check is made when it opens (the iteration throws).
    func subscribe(after cursor: Cursor) throws -> UInt64 {
        try state.withLock { s in
            var sub = Subscriber()
            sub.after = cursor
            if let window = s.window {
                try Self.startPaging(&sub, after: cursor, window: window)
            } else {
                sub.pendingCursor = cursor
            }
            if let closed = s.closed, sub.ending == nil {
                sub.ending = .some(closed ?? (sub.pendingCursor != nil
                    ? ChangeStreamError(.streamStopped, "the change stream is stopped; cannot serve the cursor \(cursor)")
                    : nil))
            }
            s.nextID += 1
            s.subscribers[s.nextID] = sub
            return s.nextID
        }
    }

    /// Forgets a consumer (its sequence went away); a pending wait ends with nil.
    func unsubscribe(_ id: UInt64) {
        let waiter = state.withLock { s in s.subscribers.removeValue(forKey: id)?.waiter }
        waiter?.resume(returning: nil)
    }

    /// The next change for consumer `id`; nil at the end or when the task is cancelled.
    func next(_ id: UInt64) async throws -> ChangeEvent? {
        let immediate: Result<ChangeEvent?, any Error>? = state.withLock { s in
            guard s.subscribers[id] != nil else { return .success(nil) }
            let result = s.take(id)
            switch result {
            case .success(nil)?, .failure?: s.subscribers[id] = nil
            default: break
            }
            return result
        }
        if let immediate { return try immediate.get() }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<ChangeEvent?, any Error>) in
                let now: Result<ChangeEvent?, any Error>? = state.withLock { s in
                    guard s.subscribers[id] != nil else { return .success(nil) }
                    if Task.isCancelled { s.subscribers[id] = nil; return .success(nil) }
                    if let result = s.take(id) { return result }
                    s.subscribers[id]!.waiter = cont
                    return nil
                }
                if let now { cont.resume(with: now) }
            }
        } onCancel: {
            self.unsubscribe(id)
        }
    }

    /// Queues the first page of a resuming consumer's backlog; it reads the rest from the
    /// window page by page (`take`) and goes live once a page reaches the window's end.
    private static func startPaging(_ sub: inout Subscriber, after cursor: Cursor, window: Window) throws(ResumeWindowError) {
        let page = try window.events(after: cursor, limit: pageSize)
        // The backlog a consumer resumes with is not counted against its limit (it is read from
        // the window a page at a time): only what arrives live is.
        sub.push(page, units: 0)
        sub.paging = page.count == pageSize
        if let last = page.last { sub.pageAfter = last.cursor }
    }

    /// Queues a paging consumer's next page from the window (under the same lock as every
    /// append: no gap, no duplicate when it goes live).
    fileprivate static func nextPage(_ sub: inout Subscriber, from window: Window) {
        do {
            let page = try window.events(after: sub.pageAfter, limit: pageSize)
            sub.push(page, units: 0)
            sub.paging = page.count == pageSize
            if let last = page.last { sub.pageAfter = last.cursor }
        } catch {
            // The window moved past this consumer while it read: resync_required.
            sub.paging = false
            if sub.ending == nil { sub.ending = .some(error) }
        }
    }

    /// A queued change, the end (nil / error), or nil when the consumer must wait.
    fileprivate static func take(_ sub: inout Subscriber) -> Result<ChangeEvent?, any Error>? {
        if let event = sub.pop() { return .success(event) }
        if let ending = sub.ending {
            if let error = ending { return .failure(error) }
            return .success(nil)
        }
        return nil
    }

    // MARK: Introspection

    /// A snapshot of the window and consumer counters.
    func snapshot() -> (window: Window?, subscribers: Int, transactions: Int, changes: Int, cutOff: Int) {
        state.withLock { s in (s.window, s.subscribers.count, s.transactions, s.changes, s.cutOff) }
    }
}

/// The changes for one consumer, in commit order, as an `AsyncSequence`.
///
/// Iterate from one task. Iteration ends (nil) when the stream stops or the task is
/// cancelled; it throws `ChangeStreamError.consumerTooSlow` when the consumer fell too far
/// behind, and `ResumeWindowError` (`resync_required`) when a resume cursor turned out to be
/// older than the window. Dropping the sequence and its iterator releases the consumer's queue.
public struct ChangeSubscription: AsyncSequence, Sendable {
    /// Elements are committed changes.
    public typealias Element = ChangeEvent

    final class Registration: Sendable {
        let hub: ChangeHub
        let id: UInt64
        init(hub: ChangeHub, id: UInt64) {
            self.hub = hub
            self.id = id
        }
        deinit { hub.unsubscribe(id) }
    }

    let registration: Registration

    /// Makes the iterator.
    public func makeAsyncIterator() -> Iterator { Iterator(registration: registration) }

    /// Waits for the next change.
    public struct Iterator: AsyncIteratorProtocol {
        let registration: Registration

        /// The next change in commit order; nil at the end.
        public mutating func next() async throws -> ChangeEvent? {
            try await registration.hub.next(registration.id)
        }
    }
}
