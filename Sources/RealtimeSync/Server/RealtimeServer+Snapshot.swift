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
        /// The snapshot is being read: matching changes are held (or, once they went over
        /// the socket's bounds, read back from the source's window at the handoff).
        case reading
        /// The snapshot and the changes before the fan-out's position were sent: changes are
        /// delivered unless the snapshot saw their transaction, until one commits at or after
        /// `until`; then the subscription joins the hub.
        case filtering(SnapshotVisibility, until: LSN)
    }

    var subscription: ResolvedSubscription
    var phase = Phase.reading
    var held: [HeldChange] = []
    var heldBytes = 0
    /// The held changes went over the socket's send-queue bounds: they were let go, nothing
    /// more is held, and the handoff reads the changes back from the source's resume window.
    var readsBack = false
}

/// The most recent transactions the fan-out processed: each one's xid and the fan-out's
/// position just before it. A snapshot looks up among them the transactions it does not see
/// that were streamed before it was registered (see `RealtimeServer.subscribeWithSnapshot`, step 2).
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
    /// Every row and the held changes went out; the fan-out has the subscription.
    case handedOver(rows: Int)
    /// Every row went out (the last chunk with `done: true`); the changes are to be read back
    /// from the window (the held ones went over the socket's bounds).
    case sent(rows: Int, handoff: SnapshotHandoff)
    case tooLarge
    case abandoned
}

/// What the handoff after a sent snapshot needs (`RealtimeServer.handOver`).
private struct SnapshotHandoff: Sendable {
    /// Where the changes to send after the rows begin: the fan-out's position when the
    /// subscription was registered, or earlier when a transaction the snapshot does not see
    /// was streamed before it.
    var from: Cursor
    /// Which transactions the snapshot saw.
    var visibility: SnapshotVisibility
    /// The WAL insert position read just after the snapshot was taken: every change that
    /// commits at or after it is one the snapshot did not see.
    var until: LSN
}

extension ServerState {
    /// Forgets everything the server holds for one subscription of `client` that has not joined the
    /// hub yet (a snapshot being read or filtered).
    mutating func dropPendingSnapshot(client: FanoutClientID, id: String) {
        guard snapshots[client]?.removeValue(forKey: id) != nil else { return }
        if snapshots[client]?.isEmpty == true { snapshots[client] = nil }
    }

    /// Routes a change to the `snapshot: true` subscriptions that have not joined the hub:
    /// returns the ids that get it now, per client, and the (client, id) pairs that hold it
    /// (none for a subscription that reads back from the window).
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
            for (id, entry) in pending where !entry.readsBack {
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

    /// Holds `frame` for a reading snapshot, within half the socket's send-queue bounds: the
    /// change that would go over them lets every held change go instead, and the handoff then reads
    /// them back from the source's window (`PendingSnapshot.readsBack`). Returns true when
    /// that happened with this change.
    @discardableResult
    mutating func hold(_ frame: [UInt8], of event: ChangeEvent, client: FanoutClientID, id: String,
                       limits: OutboundQueue<[UInt8]>.Limits) -> Bool {
        guard let entry = snapshots[client]?[id], !entry.readsBack else { return false }
        // Half the bounds: the handoff queues them behind a queue that may be half full.
        guard entry.held.count < max(1, limits.maxMessages / 2) && entry.heldBytes + frame.count <= max(1, limits.maxBytes / 2) else {
            snapshots[client]![id]!.held = []
            snapshots[client]![id]!.heldBytes = 0
            snapshots[client]![id]!.readsBack = true
            return true
        }
        // In place: a copy taken out and written back would copy the held changes each time.
        snapshots[client]![id]!.held.append(HeldChange(xid: event.xid, commitLSN: event.commitLSN, frame: frame))
        snapshots[client]![id]!.heldBytes += frame.count
        return false
    }

    /// Ends the handoff of a reading snapshot whose changes up to `covered` were sent (the
    /// fan-out's next change comes after it): it joins the hub if `covered` is at or past
    /// `until` (every later change commits after the snapshot), else the fan-out tests each
    /// change's visibility for it until one commits at or after `until`.
    mutating func endHandoff(_ subscription: ResolvedSubscription, client: FanoutClientID, covered: Cursor,
                             visibility: SnapshotVisibility, until: LSN) {
        if covered.commitLSN >= until {
            dropPendingSnapshot(client: client, id: subscription.id)
            join(subscription, client: client, lastCovered: covered)
        } else {
            snapshots[client]?[subscription.id] = PendingSnapshot(subscription: subscription, phase: .filtering(visibility, until: until))
        }
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
    ///    its matching changes are held, up to half the socket's send-queue bounds (past them
    ///    they are let go, and step 4 reads them back from the source's window instead);
    /// 2. on a pooled connection, a repeatable-read transaction takes the snapshot and reads
    ///    `xmin:xmax:xip` and the WAL insert position `until`; transactions the snapshot does
    ///    not see but that the fan-out already passed are fetched from the source's window
    ///    (the earliest of them is `from`, else `start`);
    /// 3. the matching rows are counted (`snapshotMaxRows`, else `snapshot_too_large` and
    ///    nothing is left behind), then `subscribed` and the rows go out in chunks, waiting
    ///    for the writer when the send queue is half full; the transaction ends;
    /// 4. in one critical section: the last chunk (`done: true`), then the late changes and
    ///    every held change whose transaction the snapshot did not see, and the handoff ends
    ///    (`ServerState.endHandoff`): the subscription joins the hub (the fan-out is past
    ///    `until`) or the fan-out keeps testing visibility for it until a change commits at or
    ///    after `until`. When the held changes went over their bound, the last chunk alone; the
    ///    pooled connection and the snapshot turn are given back, and `handOver` reads the
    ///    changes after `from` back from the window with the same test and ends the handoff
    ///    where it reaches the fan-out (`resync_required` if the window no longer has `from`).
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
        // Registered only once it has a turn: its changes are read back from the window from
        // its registration on, so a wait before it would only lengthen that.
        session.waitingForServer.store(true, ordering: .relaxed)
        let admitted = await snapshotGate.enter(within: configuration.snapshotTurnTimeout)
        session.waitingForServer.store(false, ordering: .relaxed)
        guard let admitted else {
            session.enqueue(ProtocolError(.internal, id: id,
                "no snapshot turn within \(configuration.snapshotTurnTimeout): \(configuration.maxConcurrentSnapshots) snapshots run at once (maxConcurrentSnapshots, --max-concurrent-snapshots) and none ended meanwhile (the wait is snapshotTurnTimeout, the service's --pool-acquire-timeout); subscribe again").serverMessage)
            return
        }
        guard admitted else { return }
        // The turn is given back before the handoff (which needs no pooled connection).
        var holdsTurn = true
        defer { if holdsTurn { snapshotGate.leave() } }
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
        case .sent(let rows, let handoff):
            holdsTurn = false
            snapshotGate.leave()
            guard await handOver(source, subscription, handoff, session: session, reader: &reader, logger: logger) else {
                reader.openIDs.remove(id)
                state.withLock { $0.dropPendingSnapshot(client: session.id, id: id) }
                return
            }
            logger.debug("snapshot sent, its changes read back from the window", metadata: ["id": "\(id)", "table": "\(subscription.table)", "rows": "\(rows)",
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
        // The earliest transaction the snapshot does not see that the fan-out passed before `start`.
        let lateFrom = state.withLock { $0.recentTransactions.earliest(before: start) { !visibility.isVisible(xid: $0) } }
        let from = lateFrom.map { min($0, start) } ?? start
        // Its changes, for the handoff from what was held (a handoff that reads back from the
        // window reads them again from `from`).
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
        session.enqueue(.subscribed(id: id, cursor: from))
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
        let lastFrame = ServerMessage.snapshot(id: id, rows: last, done: true).jsonBytes()
        let lateBytes = late.reduce(0) { $0 + $1.count }
        let limits = configuration.queueLimits
        // In one critical section with the fan-out: the last rows, then the changes held for it.
        return state.withLock { state -> SnapshotEnd in
            guard let entry = state.snapshots[session.id]?[id] else { return .abandoned }
            var ok = session.enqueue(lastFrame) == .queued
            // What is held goes out only if it fits beside what the queue holds now (the wait
            // above left it under half full, but the fan-out may have queued more since, and the
            // late changes and the last rows count too); else it is read back with backpressure.
            // (All held ones counted, those the snapshot saw too: an upper bound.)
            let (queuedBytes, queuedMessages) = session.queued
            let frameOverhead = 14  // a text frame's header (at most 10 bytes, `SessionChannel.textFrame`) and a margin
            let fits = queuedMessages + late.count + entry.held.count <= limits.maxMessages
                && queuedBytes + lateBytes + entry.heldBytes + frameOverhead * (late.count + entry.held.count) <= limits.maxBytes
            if ok && (entry.readsBack || !fits) {
                state.snapshots[session.id]?[id]?.held = []
                state.snapshots[session.id]?[id]?.heldBytes = 0
                state.snapshots[session.id]?[id]?.readsBack = true
                return .sent(rows: sent + last.count, handoff: SnapshotHandoff(from: from, visibility: visibility, until: snapshot.walPosition))
            }
            for frame in late where ok { ok = session.enqueue(frame) == .queued }
            for change in entry.held where ok && (change.commitLSN >= snapshot.walPosition || !visibility.isVisible(xid: change.xid)) {
                ok = session.enqueue(change.frame) == .queued
            }
            guard ok else {
                state.dropClient(session.id)
                return .abandoned
            }
            state.endHandoff(subscription, client: session.id, covered: state.lastDelivered, visibility: visibility, until: snapshot.walPosition)
            return .handedOver(rows: sent + last.count)
        }
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

    /// Step 4 of `subscribeWithSnapshot`: sends the changes after `handoff.from` whose
    /// transaction the snapshot did not see, or that commit at or after `until`, read back from
    /// the source's window by the loop of a `since` catch-up (`catchUp`), then hands the
    /// subscription to the fan-out (`ServerState.endHandoff`) in the critical section that finds
    /// the fan-out's position reached. False when it ended otherwise: the client went away or was closed (1013 when
    /// its queue overflowed or the source cut it off), or the window no longer held `from`
    /// (`resync_required`) or the stream failed (`internal`).
    private func handOver<Source: ChangeSource>(_ source: Source, _ subscription: ResolvedSubscription, _ handoff: SnapshotHandoff,
                                                session: SessionChannel, reader: inout SessionReaderState, logger: Logger) async -> Bool {
        let id = subscription.id
        let client = session.id
        // nil: no longer pending (closed meanwhile); true: handed over at once.
        let atOnce = state.withLock { state -> Bool? in
            guard state.snapshots[client]?[id] != nil else { return nil }
            guard handoff.from >= state.lastDelivered else { return false }
            state.endHandoff(subscription, client: client, covered: handoff.from, visibility: handoff.visibility, until: handoff.until)
            return true
        }
        guard let atOnce else { return false }
        if atOnce { return true }
        do {
            let stream = try await source.changes(after: handoff.from)
            let end = try await catchUp(stream, from: handoff.from, session: session, reader: &reader, frame: { event in
                TableKey(event.table) == TableKey(subscription.table) && subscription.events.contains(event.operation)
                    && (event.commitLSN >= handoff.until || !handoff.visibility.isVisible(xid: event.xid)) && subscription.filter.matches(event)
                    ? EncodedChange(event, hidingOld: subscription.mandatory.hidesOldRow(of: event)).frame(ids: [id]) : nil
            }, isWanted: { $0.snapshots[client]?[id] != nil }, handOver: { state, covered in
                state.endHandoff(subscription, client: client, covered: covered, visibility: handoff.visibility, until: handoff.until)
            })
            switch end {
            case .caughtUp:
                return true
            case .overflowed:
                logger.notice("slow consumer closed with 1013 while the changes after its snapshot were sent (send queue over maxMessages=\(configuration.queueLimits.maxMessages) or maxBytes=\(configuration.queueLimits.maxBytes): RealtimeServerConfiguration.queueLimits)",
                              metadata: ["id": "\(id)", "table": "\(subscription.table)"])
                return false
            case .ended:
                return false
            case .streamEnded:
                session.enqueue(ProtocolError(.internal, id: id, "the change stream ended while the changes after the snapshot were read; subscribe again").serverMessage)
                return false
            }
        } catch let error as ResumeWindowError {
            session.enqueue(.resyncRequired(id: id, message:
                "the changes since this snapshot began are no longer in the server's resume window (the snapshot and its delivery took longer than the window keeps changes: \(error.message)); subscribe again with snapshot"))
            logger.notice("a snapshot outlasted the resume window; its client got resync_required", metadata: ["id": "\(id)", "table": "\(subscription.table)", "error": "\(error)"])
            return false
        } catch let error as ChangeStreamError where error.code == .consumerTooSlow {
            // The source cut the read off because the client reads too slowly: a slow consumer.
            state.withLock { $0.dropClient(client) }
            session.closeNow(.tryAgainLater)
            logger.notice("slow consumer closed with 1013 while the changes after its snapshot were sent (the change source cut it off: \(error.message))",
                          metadata: ["id": "\(id)", "table": "\(subscription.table)"])
            return false
        } catch {
            if session.isOpen && session.channel.isActive && !Task.isCancelled && !isDraining {
                session.enqueue(ProtocolError(.internal, id: id, "the change stream failed while the changes after the snapshot of \(quoteForMessage(subscription.table)) were read (\(error)); subscribe again").serverMessage)
            }
            return false
        }
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
