import Logging
import NIOCore
import PoolKit

/// A change held for a `snapshot: true` subscription while its snapshot is read.
struct HeldChange: Sendable {
    var xid: UInt32
    var commitLSN: LSN
    var frame: [UInt8]
}

/// A `snapshot: true` subscription between its registration and its join of the fan-out hub
/// (see `RealtimeServer.subscribeWithSnapshot` and docs/PROTOCOL.md "Snapshots").
struct PendingSnapshot: Sendable {
    enum Phase: Sendable {
        /// The snapshot is being read: matching changes are held.
        case reading
        /// The snapshot was sent: changes are delivered unless the snapshot saw their
        /// transaction, until one commits at or after `until`; then the subscription joins the hub.
        case filtering(SnapshotVisibility, until: LSN)
    }

    var subscription: ResolvedSubscription
    var phase = Phase.reading
    var held: [HeldChange] = []
    var heldBytes = 0
}

/// The most recent transactions the fan-out processed: each one's xid and the fan-out's
/// position just before it. A snapshot looks up among them the transactions it does not see
/// that were streamed before it was registered (see `RealtimeServer.lateChanges`).
///
/// An entry older than `maxAge` is left out of every lookup. Its xid is 32 bits, which a
/// snapshot widens within 2^31 of its own `xmax`: right for a transaction that was running
/// when the snapshot was taken, wrong (seen as not yet visible) for one 2^31 xids back, which
/// a quiet publication on a busy cluster can keep in the list for days. No cluster assigns
/// 2^31 xids in an hour (about 600,000 a second), and a transaction that a snapshot does not
/// see was committing while the snapshot was taken: one noted an hour earlier is not one.
struct RecentTransactions: Sendable {
    /// Entries older than this are taken as seen by every snapshot.
    static let maxAge = Duration.seconds(3_600)

    /// How many transactions are kept.
    let capacity: Int
    private var xids: [UInt32] = []
    private var afters: [Cursor] = []
    private var noted: [ContinuousClock.Instant] = []
    private var next = 0

    init(capacity: Int) { self.capacity = max(1, capacity) }

    /// Notes a transaction whose first change follows `after`, processed at `now`.
    mutating func append(xid: UInt32, after: Cursor, now: ContinuousClock.Instant = .now) {
        if xids.count < capacity {
            xids.append(xid)
            afters.append(after)
            noted.append(now)
        } else {
            xids[next] = xid
            afters[next] = after
            noted[next] = now
            next = (next + 1) % capacity
        }
    }

    /// The earliest position before a kept transaction that starts before `cursor`, was noted
    /// within `maxAge` of `now`, and whose xid satisfies `wanted`; nil when there is none.
    func earliest(before cursor: Cursor, now: ContinuousClock.Instant = .now, where wanted: (UInt32) -> Bool) -> Cursor? {
        let oldest = now - Self.maxAge
        var found: Cursor?
        for position in xids.indices where afters[position] < cursor && noted[position] >= oldest && wanted(xids[position]) {
            if found.map({ afters[position] < $0 }) ?? true { found = afters[position] }
        }
        return found
    }
}

/// Why a snapshot stopped before its handoff.
private enum SnapshotEnd: Sendable {
    case handedOver(rows: Int)
    case tooLarge
    case abandoned
}

extension ServerState {
    /// Forgets everything the server holds for one subscription of `client` that has not joined the
    /// hub yet (a snapshot being read or filtered).
    mutating func dropPendingSnapshot(client: FanoutClientID, id: String) {
        guard snapshots[client]?.removeValue(forKey: id) != nil else { return }
        if snapshots[client]?.isEmpty == true { snapshots[client] = nil }
    }

    /// Routes a change to the `snapshot: true` subscriptions that have not joined the hub:
    /// returns the ids that get it now, per client, and the (client, id) pairs that hold it.
    /// A filtering subscription that sees a change committed at or after its `until` joins the
    /// hub here, after the hub matched this change (so it gets it once).
    /// `hidingOld`: the clients among them whose mandatory filter the event's old row does not
    /// pass (`Filter.hidesOldRow`; one filter per client and table, the token's).
    mutating func routeToSnapshots(_ event: ChangeEvent) -> (now: [FanoutClientID: [String]], hold: [(FanoutClientID, String)], hidingOld: Set<FanoutClientID>) {
        var now: [FanoutClientID: [String]] = [:]
        var hold: [(FanoutClientID, String)] = []
        var hidingOld: Set<FanoutClientID> = []
        var joins: [(FanoutClientID, ResolvedSubscription)] = []
        for (client, pending) in snapshots {
            for (id, entry) in pending {
                let subscription = entry.subscription
                let matches = TableKey(event.table) == TableKey(subscription.table) && subscription.events.contains(event.operation)
                    && subscription.filter.matches(event)
                if matches && subscription.mandatory.hidesOldRow(of: event) { hidingOld.insert(client) }
                switch entry.phase {
                case .reading:
                    if matches { hold.append((client, id)) }
                case .filtering(let visibility, let until):
                    let passed = event.commitLSN >= until
                    if matches && (passed || !visibility.isVisible(xid: event.xid)) { now[client, default: []].append(id) }
                    if passed { joins.append((client, subscription)) }
                }
            }
        }
        for (client, subscription) in joins {
            dropPendingSnapshot(client: client, id: subscription.id)
            join(subscription, client: client, lastCovered: lastDelivered)
        }
        return (now, hold, hidingOld)
    }

    /// Holds `frame` for a reading snapshot; false when the held changes would exceed the
    /// socket's send-queue bounds (the caller closes the socket with 1013).
    mutating func hold(_ frame: [UInt8], of event: ChangeEvent, client: FanoutClientID, id: String,
                       limits: OutboundQueue<[UInt8]>.Limits) -> Bool {
        guard snapshots[client]?[id] != nil else { return true }
        // In place: a copy taken out and written back would copy the held changes each time.
        snapshots[client]![id]!.held.append(HeldChange(xid: event.xid, commitLSN: event.commitLSN, frame: frame))
        snapshots[client]![id]!.heldBytes += frame.count
        let (count, bytes) = (snapshots[client]![id]!.held.count, snapshots[client]![id]!.heldBytes)
        return count <= limits.maxMessages && bytes <= limits.maxBytes
    }

    /// Drops everything held for `client` (slow consumer, closed socket).
    mutating func dropClient(_ client: FanoutClientID) {
        hub.removeClient(client)
        startAfter[client] = nil
        snapshots[client] = nil
    }
}

extension Filter {
    /// Three-valued evaluation against a whole row given as Postgres text values (nil for NULL)
    /// in the order of `columns`, as a snapshot reads it: the same comparisons as for a change's
    /// row. A condition whose column is missing or was retyped is `unknown`.
    public func evaluate(row values: [[UInt8]?], columns: [RelationColumn]) -> FilterTruth {
        var result = FilterTruth.true
        for condition in conditions {
            var index = condition.columnIndex
            if index >= columns.count || columns[index].name != condition.column {
                guard let found = columns.firstIndex(where: { $0.name == condition.column }) else { result = .unknown; continue }
                index = found
            }
            guard index < values.count,
                  columns[index].typeOID == condition.typeOID || ColumnClass(typeOID: columns[index].typeOID) == condition.columnClass
            else { result = .unknown; continue }
            let truth: FilterTruth
            if let value = values[index] {
                truth = condition.operator == .is ? (condition.isNull ? .false : .true) : condition.evaluate(text: value[...])
            } else {
                truth = condition.operator == .is && condition.isNull ? .true : .false
            }
            if truth == .false { return .false }
            if truth == .unknown { result = .unknown }
        }
        return result
    }
}

extension RealtimeServer {
    /// `subscribe` with `snapshot: true` (docs/PROTOCOL.md "Snapshots"):
    ///
    /// 1. the subscription is registered as pending: from the fan-out's position `start` on,
    ///    its matching changes are held (bounded by the socket's send-queue limits);
    /// 2. on a pooled connection, a repeatable-read transaction takes the snapshot and reads
    ///    `xmin:xmax:xip` and the WAL insert position `until`; transactions the snapshot does
    ///    not see but that the fan-out already passed are fetched from the source's window;
    /// 3. the matching rows are counted (`snapshotMaxRows`, else `snapshot_too_large` and
    ///    nothing is left behind), then `subscribed` and the rows go out in chunks, waiting
    ///    for the writer when the send queue is half full;
    /// 4. in one critical section: the last chunk (`done: true`), then every held change whose
    ///    transaction the snapshot did not see; then either the subscription joins the hub (the
    ///    fan-out is past `until`) or the fan-out keeps testing visibility for it until a change
    ///    commits at or after `until`.
    func subscribeWithSnapshot(_ subscription: ResolvedSubscription, session: SessionChannel,
                               reader: inout SessionReaderState, logger: Logger) async {
        let id = subscription.id
        if subscription.since != nil {
            session.enqueue(ProtocolError(.invalidMessage, id: id,
                "'snapshot' and 'since' cannot be combined: use 'since' to resume after a cursor, or 'snapshot' for the current rows followed by changes").serverMessage)
            return
        }
        guard let snapshotReader = configuration.snapshotReader else {
            session.enqueue(ProtocolError(.invalidMessage, id: id,
                "this server has no database pool for snapshots (RealtimeServerConfiguration.snapshotReader); subscribe without 'snapshot'").serverMessage)
            return
        }
        guard let columnsAtSubscribe = source.catalog.columns(of: subscription.table) else {
            session.enqueue(ProtocolError(.unknownTable, id: id, "table \(quoteForMessage(subscription.table)) is not streamed by this server").serverMessage)
            return
        }
        session.wakeReaderOnClose()
        // Wait for a turn before anything is held for this subscription (held changes would
        // pile up in the send queue while it waits).
        session.waitingForServer.store(true, ordering: .relaxed)
        let admitted = await snapshotGate.enter(within: configuration.snapshotTurnTimeout)
        session.waitingForServer.store(false, ordering: .relaxed)
        guard let admitted else {
            session.enqueue(ProtocolError(.internal, id: id,
                "no snapshot turn within \(configuration.snapshotTurnTimeout): \(configuration.maxConcurrentSnapshots) snapshots run at once (maxConcurrentSnapshots, --max-concurrent-snapshots) and none ended meanwhile; subscribe again").serverMessage)
            return
        }
        guard admitted else { return }
        defer { snapshotGate.leave() }
        guard session.isOpen && session.channel.isActive else { return }
        // The table's columns as of now: the catalog may have been re-read while this waited
        // for its turn (a dropped column in the SELECT would fail it).
        let columns = source.catalog.columns(of: subscription.table) ?? columnsAtSubscribe
        let start = state.withLock { state -> Cursor in
            state.snapshots[session.id, default: [:]][id] = PendingSnapshot(subscription: subscription)
            return state.lastDelivered
        }
        reader.openIDs.insert(id)
        let began = ContinuousClock.now
        let end: SnapshotEnd
        do {
            end = try await snapshotReader.withSnapshot(of: subscription.table, columns: columns,
                                                        rowFilter: source.catalog.rowFilter(of: subscription.table),
                                                        prefilter: subscription.filter.snapshotPrefilter(columns: columns)) { snapshot in
                try await self.streamSnapshot(snapshot, subscription: subscription, columns: columns, start: start, session: session)
            }
        } catch {
            reader.openIDs.remove(id)
            state.withLock { $0.dropPendingSnapshot(client: session.id, id: id) }
            // During shutdown the pool is drained under running snapshots (DESIGN's order):
            // the client then gets the 1001 that follows, not an `internal` error first.
            if session.isOpen && session.channel.isActive && !Task.isCancelled && !isDraining {
                logger.warning("snapshot failed", metadata: ["id": "\(id)", "table": "\(subscription.table)", "error": "\(error)"])
                session.enqueue(ProtocolError(.internal, id: id, "the snapshot of \(quoteForMessage(subscription.table)) failed (\(error)); subscribe again").serverMessage)
            }
            return
        }
        switch end {
        case .handedOver(let rows):
            logger.debug("snapshot sent", metadata: ["id": "\(id)", "table": "\(subscription.table)", "rows": "\(rows)",
                                                    "duration": "\(ContinuousClock.now - began)"])
        case .tooLarge:
            reader.openIDs.remove(id)
            state.withLock { $0.dropPendingSnapshot(client: session.id, id: id) }
            let limit = configuration.snapshotMaxRows
            session.enqueue(ProtocolError(.snapshotTooLarge, id: id,
                "more than \(limit) rows of \(quoteForMessage(subscription.table)) match (snapshotMaxRows=\(limit)); narrow the filter, or subscribe without 'snapshot'").serverMessage)
        case .abandoned:
            reader.openIDs.remove(id)
            state.withLock { $0.dropPendingSnapshot(client: session.id, id: id) }
        }
    }

    /// Steps 2 to 4 of `subscribeWithSnapshot`, inside the snapshot transaction.
    private func streamSnapshot(_ snapshot: TableSnapshot, subscription: ResolvedSubscription, columns: [RelationColumn],
                                start: Cursor, session: SessionChannel) async throws -> SnapshotEnd {
        let id = subscription.id
        let visibility = snapshot.visibility
        // Transactions the snapshot does not see but that the fan-out passed before `start`.
        let lateFrom = state.withLock { $0.recentTransactions.earliest(before: start) { !visibility.isVisible(xid: $0) } }
        var late: [[UInt8]] = []
        if let lateFrom {
            late = try await lateChanges(source, subscription: subscription, visibility: visibility, from: lateFrom, through: start)
        }
        let chunkRows = max(1, configuration.snapshotChunkRows)
        var fetch = SnapshotFetchSizer(maxRows: chunkRows, targetBytes: configuration.snapshotChunkBytes)
        // Count first, so that a too-large snapshot sends nothing.
        var matching = 0
        while true {
            let rows = try await fetch.nextRows(of: snapshot)
            if rows.isEmpty { break }
            for row in rows where subscription.filter.evaluate(row: row, columns: columns) == .true { matching += 1 }
            if matching > configuration.snapshotMaxRows { return .tooLarge }
            guard session.isOpen && session.channel.isActive else { return .abandoned }
        }
        session.enqueue(.subscribed(id: id, cursor: lateFrom.map { min($0, start) } ?? start))
        try await snapshot.rewind()
        var space = session.spaceFreed.makeAsyncIterator()
        var chunk: [[UInt8]] = []
        var chunkBytes = 0
        var sent = 0
        while true {
            let rows = try await fetch.nextRows(of: snapshot)
            if rows.isEmpty { break }
            for row in rows where subscription.filter.evaluate(row: row, columns: columns) == .true {
                let encoded = ServerMessage.snapshotRow(columns: columns, values: row)
                chunk.append(encoded)
                chunkBytes += encoded.count + 1
                let full = chunk.count >= chunkRows || chunkBytes >= configuration.snapshotChunkBytes
                guard full && sent + chunk.count < matching else { continue }
                while session.isOpen && session.channel.isActive && session.isHalfFull {
                    guard await space.next() != nil else { break }
                }
                guard session.isOpen && session.channel.isActive else { return .abandoned }
                if session.enqueue(.snapshot(id: id, rows: chunk, done: false)) != .queued {
                    state.withLock { $0.dropClient(session.id) }
                    return .abandoned
                }
                sent += chunk.count
                chunk.removeAll(keepingCapacity: true)
                chunkBytes = 0
            }
        }
        // Every row is read: the transaction ends before the wait for the client and the
        // handoff (a failure to end it then hands nothing over).
        try await snapshot.finish()
        while session.isOpen && session.channel.isActive && session.isHalfFull {
            guard await space.next() != nil else { break }
        }
        let last = chunk
        let handedOver = state.withLock { state -> Bool in
            guard let entry = state.snapshots[session.id]?[id] else { return false }
            var ok = session.enqueue(.snapshot(id: id, rows: last, done: true)) == .queued
            for frame in late where ok { ok = session.enqueue(frame) == .queued }
            for change in entry.held where ok && (change.commitLSN >= snapshot.walPosition || !visibility.isVisible(xid: change.xid)) {
                ok = session.enqueue(change.frame) == .queued
            }
            guard ok else {
                state.dropClient(session.id)
                return false
            }
            if state.lastDelivered.commitLSN >= snapshot.walPosition {
                state.dropPendingSnapshot(client: session.id, id: id)
                state.join(subscription, client: session.id, lastCovered: state.lastDelivered)
            } else {
                state.snapshots[session.id]?[id] = PendingSnapshot(subscription: subscription,
                                                                   phase: .filtering(visibility, until: snapshot.walPosition))
            }
            return true
        }
        return handedOver ? .handedOver(rows: sent + last.count) : .abandoned
    }

    /// The changes of transactions the snapshot does not see that the fan-out processed after
    /// `from` and at or before `through`, read from the source's window, as frames for
    /// `subscription` alone.
    private func lateChanges<Source: ChangeSource>(_ source: Source, subscription: ResolvedSubscription, visibility: SnapshotVisibility,
                                                   from: Cursor, through: Cursor) async throws -> [[UInt8]] {
        var frames: [[UInt8]] = []
        for try await event in try await source.changes(after: from) {
            if event.cursor > through { break }
            if !visibility.isVisible(xid: event.xid), TableKey(event.table) == TableKey(subscription.table), subscription.events.contains(event.operation),
               subscription.filter.matches(event) {
                frames.append(EncodedChange(event, hidingOld: subscription.mandatory.hidesOldRow(of: event)).frame(ids: [subscription.id]))
            }
            if event.cursor == through { break }
        }
        return frames
    }
}

/// Sizes each snapshot FETCH by the bytes the previous one brought: about `targetBytes` of row
/// text (`snapshotChunkBytes`), never more than `maxRows` rows (`snapshotChunkRows`), and at
/// most twice the rows the previous one kept. A fixed count of wide rows (say 500 rows of 1 MB
/// each) held half a gigabyte per snapshot, twice (libpq's result and the copied values); so
/// did a count sized on narrow rows when wide ones followed (a black-box test: 98 MB to 1.4 GB
/// of RSS for one snapshot of a table with rows of 1 MB after a few small ones). Each FETCH
/// also keeps no more than `targetBytes` of rows (`TableSnapshot.nextRows(_:maxBytes:)` lets the
/// rest go and moves the cursor back), so the memory is bounded whatever the rows turn out to
/// be; the doubling bounds the rows sent twice when the rows widen.
struct SnapshotFetchSizer {
    /// Rows the first FETCH asks for (at most `maxRows`).
    static let firstFetch = 16
    let maxRows: Int
    let targetBytes: Int
    /// What the next FETCH asks for.
    private(set) var nextCount: Int

    init(maxRows: Int, targetBytes: Int) {
        self.maxRows = max(1, maxRows)
        self.targetBytes = max(1, targetBytes)
        nextCount = min(self.maxRows, Self.firstFetch)
    }

    /// Sizes the next FETCH from one that kept `rows` rows of `bytes` bytes of text in all.
    mutating func record(rows: Int, bytes: Int) {
        guard rows > 0 else { return }
        let perRow = max(1, bytes / rows)
        nextCount = max(1, min(maxRows, targetBytes / perRow, 2 * rows))
    }

    /// The next rows of `snapshot`, sized as above.
    mutating func nextRows(of snapshot: TableSnapshot) async throws -> [[[UInt8]?]] {
        let (rows, bytes) = try await snapshot.fetch(nextCount, maxBytes: targetBytes)
        record(rows: rows.count, bytes: bytes)
        return rows
    }
}
