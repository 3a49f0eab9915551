/// The cursor is older than the resume window: changes after it were evicted.
public struct ResumeWindowError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Stable error codes.
    public enum Code: String, Sendable, Hashable {
        /// The client must resynchronise (PROTOCOL.md `resync_required`).
        case resyncRequired = "resync_required"
    }

    /// Stable code.
    public var code: Code
    /// The cursor that was asked for.
    public var cursor: Cursor
    /// The oldest cursor the window can still resume after.
    public var oldestResumable: Cursor
    /// What is wrong and what to do.
    public var message: String {
        "cursor \(cursor) is older than the resume window (oldest resumable cursor \(oldestResumable)); resynchronise with a snapshot (the window's bounds: ResumeWindow.Limits.maxAge / maxCount / maxBytes, realtime-sync --window-max-age / --window-max-count / --window-max-bytes)"
    }

    /// Creates the error.
    public init(cursor: Cursor, oldestResumable: Cursor) {
        self.code = .resyncRequired
        self.cursor = cursor
        self.oldestResumable = oldestResumable
    }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}

/// The most recent committed changes, bounded by age, count and bytes (whichever keeps
/// fewest), for clients that resume with a cursor.
///
/// A pure value: time is passed in (`Instant`, e.g. `ContinuousClock.Instant` or
/// a test clock's). Appending and evicting are O(1) amortised (ring buffer);
/// `events(after:)` finds its start by binary search, O(log n).
///
/// Semantics: the window can serve every cursor `c >= oldestResumable`. Initially
/// that is `Cursor.start(at: origin)`, just before `Cursor(commitLSN: origin, index: 0)`:
/// the stream feeding the window starts at `origin` (the slot's confirmed position), so
/// every transaction that commits at or after it, including one committing exactly at it
/// (whose first change is `Cursor(commitLSN: origin, index: 0)`), will be appended. When an event is evicted,
/// `oldestResumable` becomes that event's cursor (a client that saw it misses
/// nothing). `retainLSN` is where the slot's confirmed position must be held so
/// that a restarted server rebuilds the same window from the WAL.
public struct ResumeWindow<Instant: InstantProtocol>: Sendable where Instant.Duration == Duration, Instant: Sendable {
    /// Bounds of the window.
    public struct Limits: Sendable, Hashable {
        /// Events older than this (by append time) are evicted. Default 5 minutes.
        public var maxAge: Duration
        /// At most this many events are kept. Default 100,000.
        public var maxCount: Int
        /// At most about this many bytes of events are kept (`ChangeEvent.approximateBytes`:
        /// their row values and a fixed overhead each), the newest event always. Default 256 MiB:
        /// without it, 100,000 changes of 1 MB rows would be 100 GB.
        public var maxBytes: Int

        /// Creates limits; `maxCount` and `maxBytes` must be at least 1.
        public init(maxAge: Duration = .seconds(300), maxCount: Int = 100_000, maxBytes: Int = 256 << 20) {
            precondition(maxCount >= 1, "ResumeWindow.Limits.maxCount must be at least 1, got \(maxCount)")
            precondition(maxBytes >= 1, "ResumeWindow.Limits.maxBytes must be at least 1, got \(maxBytes)")
            precondition(maxAge >= .zero, "ResumeWindow.Limits.maxAge must not be negative, got \(maxAge)")
            self.maxAge = maxAge
            self.maxCount = maxCount
            self.maxBytes = maxBytes
        }
    }

    private struct Entry: Sendable {
        var event: ChangeEvent
        var appendedAt: Instant
        var bytes: Int
    }

    /// The bounds in force.
    public let limits: Limits
    private var ring = RingBuffer<Entry>()
    /// `ChangeEvent.approximateBytes` of the held events, in all.
    public private(set) var heldBytes = 0
    /// The oldest cursor after which every change is held (or will be appended).
    public private(set) var oldestResumable: Cursor
    /// Number of events evicted so far.
    public private(set) var evictedCount = 0
    /// The furthest position the feeding stream is known to have passed with nothing
    /// held (see `markIdle(through:now:)`); nil until then.
    public private(set) var idleThrough: LSN?
    /// `retainLSN` with nothing held: the origin, then the commit LSN of the last evicted change.
    private var emptyRetainLSN: LSN

    /// Creates an empty window fed by a stream that starts at `origin`.
    public init(limits: Limits = Limits(), origin: LSN) {
        self.limits = limits
        self.oldestResumable = Cursor.start(at: origin)
        self.emptyRetainLSN = origin
    }

    /// Number of events held.
    public var count: Int { ring.count }
    /// Whether no event is held.
    public var isEmpty: Bool { ring.count == 0 }
    /// The oldest event held.
    public var first: ChangeEvent? { ring.count == 0 ? nil : ring[0].event }
    /// The newest event held.
    public var last: ChangeEvent? { ring.count == 0 ? nil : ring[ring.count - 1].event }

    /// Where the replication slot's confirmed position must be held: the commit
    /// LSN of the oldest event held (Postgres replays every transaction that
    /// commits at or after the confirmed position), or, when empty, the position
    /// of `oldestResumable`, or the position the stream has passed idle if that is later
    /// (nothing between them is held, so nothing needs replaying).
    public var retainLSN: LSN {
        if let first { return first.commitLSN }
        guard let idleThrough else { return emptyRetainLSN }
        return max(idleThrough, emptyRetainLSN)
    }

    /// Records that the feeding stream has passed `position` with no transaction half
    /// received (a keepalive, or a heartbeat message on an idle database), after evicting
    /// what has expired by `now`. When nothing is held then, `retainLSN` moves up to
    /// `position`, so the slot's WAL is released on an idle database. Cursors at or after
    /// `oldestResumable` keep resuming in this process; a capture restarted from the
    /// advanced slot starts its window at `position`, so older cursors then get
    /// `resync_required` (never a gap). Returns whether `retainLSN` moved.
    @discardableResult
    public mutating func markIdle(through position: LSN, now: Instant) -> Bool {
        evictExpired(now: now)
        guard ring.count == 0 else { return false }
        let before = retainLSN
        if position > (idleThrough ?? LSN(0)) { idleThrough = position }
        return retainLSN > before
    }

    /// Appends an event committed after every held one, then evicts by count and age.
    /// Returns false (and keeps nothing) when the event is not after the newest
    /// held one or the resumable start, i.e. a replayed duplicate.
    @discardableResult
    public mutating func append(_ event: ChangeEvent, at now: Instant) -> Bool {
        let cursor = event.cursor
        if let last = last, cursor <= last.cursor { evictExpired(now: now); return false }
        if ring.count == 0, evictedCount > 0, cursor <= oldestResumable { evictExpired(now: now); return false }
        let bytes = event.approximateBytes
        ring.append(Entry(event: event, appendedAt: now, bytes: bytes))
        heldBytes += bytes
        while ring.count > limits.maxCount || (heldBytes > limits.maxBytes && ring.count > 1) { evictFirst() }
        evictExpired(now: now)
        return true
    }

    /// Appends the changes of a committed transaction (see `append(_:at:)`); returns how many were kept.
    @discardableResult
    public mutating func append(contentsOf events: some Sequence<ChangeEvent>, at now: Instant) -> Int {
        var kept = 0
        for event in events where append(event, at: now) { kept += 1 }
        return kept
    }

    /// Evicts events appended more than `limits.maxAge` before `now`.
    public mutating func evictExpired(now: Instant) {
        while ring.count > 0, ring[0].appendedAt.duration(to: now) > limits.maxAge { evictFirst() }
    }

    private mutating func evictFirst() {
        let entry = ring.removeFirst()
        heldBytes -= entry.bytes
        oldestResumable = entry.event.cursor
        emptyRetainLSN = entry.event.commitLSN
        evictedCount += 1
    }

    /// Every held event strictly after `cursor`, oldest first; empty when the
    /// cursor is at or past the newest event. Throws `resync_required` when
    /// `cursor < oldestResumable` (changes after it may have been evicted).
    public func events(after cursor: Cursor) throws(ResumeWindowError) -> [ChangeEvent] {
        try events(after: cursor, limit: .max)
    }

    /// At most `limit` of the held events strictly after `cursor`, oldest first (a page of
    /// `events(after:)`); throws as it does.
    public func events(after cursor: Cursor, limit: Int) throws(ResumeWindowError) -> [ChangeEvent] {
        guard cursor >= oldestResumable else {
            throw ResumeWindowError(cursor: cursor, oldestResumable: oldestResumable)
        }
        let start = firstIndex(after: cursor)
        let end = start + min(ring.count - start, max(0, limit))
        var result: [ChangeEvent] = []
        result.reserveCapacity(end - start)
        for position in start..<end { result.append(ring[position].event) }
        return result
    }

    /// Whether `events(after:)` would succeed for `cursor`.
    public func canResume(after cursor: Cursor) -> Bool { cursor >= oldestResumable }

    /// Every held event, oldest first.
    public var events: [ChangeEvent] { (0..<ring.count).map { ring[$0].event } }

    /// Binary search: the position of the first event with a cursor greater than `cursor`.
    private func firstIndex(after cursor: Cursor) -> Int {
        var low = 0
        var high = ring.count
        while low < high {
            let middle = low + (high - low) / 2
            if ring[middle].event.cursor <= cursor { low = middle + 1 } else { high = middle }
        }
        return low
    }
}

/// A growable ring buffer: O(1) amortised append and remove-first, O(1) random access.
struct RingBuffer<Element: Sendable>: Sendable {
    private var storage: [Element?] = []
    private var head = 0
    private(set) var count = 0

    init() {}

    subscript(position: Int) -> Element {
        precondition(position >= 0 && position < count, "RingBuffer index \(position) out of range 0..<\(count)")
        var slot = head + position
        if slot >= storage.count { slot -= storage.count }
        return storage[slot]!
    }

    mutating func append(_ element: Element) {
        if count == storage.count { grow() }
        var slot = head + count
        if slot >= storage.count { slot -= storage.count }
        storage[slot] = element
        count += 1
    }

    mutating func removeFirst() -> Element {
        precondition(count > 0, "RingBuffer.removeFirst on an empty buffer")
        let element = storage[head]!
        storage[head] = nil
        head += 1
        if head == storage.count { head = 0 }
        count -= 1
        return element
    }

    private mutating func grow() {
        let newCapacity = Swift.max(16, storage.count * 2)
        var grown: [Element?] = []
        grown.reserveCapacity(newCapacity)
        for position in 0..<count { grown.append(self[position]) }
        grown.append(contentsOf: repeatElement(nil, count: newCapacity - count))
        storage = grown
        head = 0
    }
}
