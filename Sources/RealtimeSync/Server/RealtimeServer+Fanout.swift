import Logging
import NIOCore
import Synchronization

extension RealtimeServer {
    /// The fan-out: reads the source's live stream and hands each change to every
    /// session it matches, until `stop` yields or the stream ends.
    func runFanout(stop: AsyncStream<Void>) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.fanoutLoop(self.source) }
            group.addTask { for await _ in stop { return } }
            await group.next()
            group.cancelAll()
        }
        state.withLock { $0.fanoutEnded = true }
    }

    private func fanoutLoop<Source: ChangeSource>(_ source: Source) async {
        var backoff = Duration.milliseconds(50)
        while !Task.isCancelled {
            let after = state.withLock { $0.lastDelivered }
            do {
                let stream = try await source.changes(after: after)
                for try await event in stream {
                    deliver(event)
                    backoff = .milliseconds(50)
                }
                if !Task.isCancelled {
                    // The last change delivered (`after` is where this stream began).
                    let last = state.withLock { $0.lastDelivered }
                    logger.info("change stream ended; fan-out stopped", metadata: ["cursor": "\(last)"])
                }
                return
            } catch let error as ResumeWindowError {
                // Changes after `after` are gone: every subscribed client would miss them.
                // Each is closed with 1013 after what it has queued; it reconnects with
                // `since` and learns it must resynchronise (resync_required), never a gap.
                let current = source.currentCursor
                let closing = state.withLock { state -> [SessionChannel] in
                    state.lastDelivered = max(state.lastDelivered, current)
                    // Clients in the hub and those with a snapshot pending (whose handoff reads
                    // the window back from before the gap): both miss them.
                    let clients = Set(state.hub.clientIDs).union(state.snapshots.keys)
                    for client in clients { state.dropClient(client) }
                    return clients.compactMap { state.sessions[$0] }
                }
                for session in closing { session.close(.tryAgainLater) }
                logger.error("fan-out fell behind the resume window; subscribed clients closed with 1013 so that they resume with since (older cursors get resync_required); raise the resume window's maxCount, maxBytes or maxAge (--window-max-count, --window-max-bytes, --window-max-age)",
                             metadata: ["error": "\(error)", "cursor": "\(current)", "clients_closed": "\(closing.count)"])
            } catch let error as ChangeStreamError where error.code == .streamFailed {
                // For good: a new stream from it fails the same way at once.
                logger.error("change stream failed for good; fan-out stopped (clients get no more changes: restart the service)",
                             metadata: ["error": "\(error)"])
                return
            } catch {
                if Task.isCancelled { return }
                logger.warning("change stream failed; fan-out retries", metadata: ["error": "\(error)", "retry_in": "\(backoff)"])
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
    }

    /// Matches `event`, encodes it once and queues one frame per matching client, all
    /// under the state lock so that `subscribed`/`unsubscribed` and changes keep their order.
    func deliver(_ event: ChangeEvent) {
        let cursor = event.cursor
        // Sessions whose writer must run, per event loop (`SessionChannel.loopIndex`): one
        // event-loop task per loop and change, started once the lock is released.
        var pumps: [[SessionChannel]] = []
        // Snapshot subscriptions whose held changes went over half the socket's bounds with this change.
        var readingBack: [(FanoutClientID, String)] = []
        // Subscriptions ended because this change's table no longer has a column they filter on.
        var schemaChanges: [(client: FanoutClientID, id: String, column: String, byToken: Bool)] = []
        let overflowed = state.withLock { state -> [FanoutClientID] in
            guard cursor > state.lastDelivered else { return [] }
            if event.index == 0 { state.recentTransactions.append(xid: event.xid, after: state.lastDelivered) }
            state.lastDelivered = cursor
            state.changesProcessed += 1
            var overflowed: [FanoutClientID] = []
            if let seen = state.relations[TableKey(event.table)], seen.relation.json === event.relation.json,
               seen.recheckAt.map({ event.commitLSN < $0 }) ?? true {
                // The description already checked, and no check pending: the common case.
            } else {
                (schemaChanges, overflowed) = state.noteRelation(event.relation, at: event.commitLSN)
            }
            let deliveries = state.hub.match(event)
            var (snapshotIDs, held, hidingOld) = state.snapshots.isEmpty ? ([:], [], []) : state.routeToSnapshots(event)
            if deliveries.isEmpty && snapshotIDs.isEmpty && held.isEmpty { return overflowed }
            let change = EncodedChange(event)
            // For clients whose token's filter the row did not pass before this UPDATE (it moved
            // into their view): the old row withheld. Only an UPDATE with an old row or key can
            // need it; encoded at most once.
            let mayHideOld = event.operation == .update && event.old != nil
            var withoutOld: EncodedChange?
            func encoding(hidingOld hide: Bool) -> EncodedChange {
                guard hide else { return change }
                if let withoutOld { return withoutOld }
                let encoded = EncodedChange(event, hidingOld: true)
                withoutOld = encoded
                return encoded
            }
            // Clients with one matching subscription of the same id get the same bytes (see
            // `SharedFrames`).
            var shared = SharedFrames()
            for delivery in deliveries {
                guard let session = state.sessions[delivery.client] else { continue }
                // Both dictionaries are usually empty: skip hashing the client id for them.
                let extra = snapshotIDs.isEmpty ? [] : snapshotIDs.removeValue(forKey: delivery.client) ?? []
                let hide = mayHideOld && (delivery.first.mandatory.hidesOldRow(of: event) || hidingOld.contains(delivery.client))
                let change = encoding(hidingOld: hide)
                let frame: ByteBuffer
                if !state.startAfter.isEmpty, let starts = state.startAfter[delivery.client] {
                    var ids: [String] = []
                    var remaining = starts
                    for id in delivery.subscriptionIDs {
                        if let start = starts[id], cursor <= start { continue }
                        remaining[id] = nil
                        ids.append(id)
                    }
                    state.startAfter[delivery.client] = remaining.isEmpty ? nil : remaining
                    ids += extra
                    if ids.isEmpty { continue }
                    frame = SessionChannel.textFrame(change.frame(ids: ids))
                } else if !extra.isEmpty {
                    frame = SessionChannel.textFrame(change.frame(ids: delivery.subscriptionIDs + extra))
                } else if delivery.rest.isEmpty && !hide {
                    frame = shared.frame(quotedID: delivery.first.quotedID, loop: session.loopIndex) {
                        SessionChannel.textFrame(change.frame(for: delivery))
                    }
                } else {
                    frame = SessionChannel.textFrame(change.frame(for: delivery))
                }
                let (result, needsPump) = session.enqueueLeavingPump(encodedFrame: frame)
                if needsPump {
                    let loop = session.loopIndex
                    while pumps.count <= loop { pumps.append([]) }
                    pumps[loop].append(session)
                }
                if result == .overflow {
                    state.dropClient(delivery.client)
                    overflowed.append(delivery.client)
                }
            }
            // Snapshot subscriptions of clients the hub did not match, then held changes.
            for (client, ids) in snapshotIDs {
                guard let session = state.sessions[client] else { continue }
                if session.enqueue(encoding(hidingOld: hidingOld.contains(client)).frame(ids: ids)) == .overflow {
                    state.dropClient(client)
                    overflowed.append(client)
                }
            }
            for (client, id) in held where state.hold(encoding(hidingOld: hidingOld.contains(client)).frame(ids: [id]), of: event, client: client, id: id, limits: configuration.queueLimits) {
                // Over the socket's bounds: the handoff reads the changes back from the window.
                readingBack.append((client, id))
            }
            return overflowed
        }
        for sessions in pumps where !sessions.isEmpty { SessionChannel.pumps(sessions) }
        metrics.changesProcessed.increment()
        for (client, id) in readingBack {
            logger.debug("a snapshot's changes went over half the send queue's bounds while its rows are sent; they will be read back from the resume window",
                         metadata: ["client": "\(client)", "id": "\(id)", "cursor": "\(cursor)"])
        }
        for ended in schemaChanges {
            logger.notice("subscription ended: its filter names a column the table no longer has, or has with another type (a schema change)",
                          metadata: ["client": "\(ended.client)", "id": "\(ended.id)", "table": "\(event.table)", "column": "\(ended.column)"])
        }
        for client in overflowed {
            logger.notice("slow consumer closed with 1013 (send queue over maxMessages=\(configuration.queueLimits.maxMessages) or maxBytes=\(configuration.queueLimits.maxBytes))",
                          metadata: ["client": "\(client)", "cursor": "\(cursor)"])
        }
    }
}

/// The frames of one change shared among clients whose one matching subscription has the same
/// id (typically every client subscribed as, say, "orders"): one buffer per id and event loop.
/// One per loop, not one in all: a buffer's reference count is released by every write of it,
/// and two loops releasing the same buffer fight over its cache line; the second loop's copy
/// is a `memcpy` of the first. Found by id in a dictionary, with each loop's last frame tried
/// first: clients with ids of their own (one per user, a UUID) made the list this replaced a
/// scan per client, quadratic in the number of clients under the state lock.
struct SharedFrames {
    /// The last id and frame handed out per loop (index: `SessionChannel.loopIndex`; an empty
    /// id where none was yet). Two arrays, so that the check reads them in place.
    private var recentIDs: [[UInt8]] = []
    private var recentFrames: [ByteBuffer] = []
    /// Every frame made so far, by quoted id, then by loop.
    private var byID: [Key: [ByteBuffer?]] = [:]

    /// A quoted id as a dictionary key, hashed as one block of bytes (an array of bytes is
    /// hashed byte by byte).
    private struct Key: Hashable {
        let bytes: [UInt8]
        func hash(into hasher: inout Hasher) { bytes.withUnsafeBytes { hasher.combine(bytes: $0) } }
    }

    /// The frame for subscription id `quotedID` on event loop `loop`: shared if one was made,
    /// copied from another loop's, or made by `make`.
    @inline(__always)
    mutating func frame(quotedID: [UInt8], loop: Int, make: () -> ByteBuffer) -> ByteBuffer {
        if loop < recentIDs.count, recentIDs[loop] == quotedID { return recentFrames[loop] }
        return lookUp(quotedID: quotedID, loop: loop, make: make)
    }

    private mutating func lookUp(quotedID: [UInt8], loop: Int, make: () -> ByteBuffer) -> ByteBuffer {
        let frame: ByteBuffer
        let key = Key(bytes: quotedID)
        if let known = byID[key] {
            if loop < known.count, let same = known[loop] {
                frame = same
            } else {
                let other = known.lazy.compactMap { $0 }.first!
                var copy = ByteBuffer()
                copy.reserveCapacity(other.readableBytes)
                copy.writeImmutableBuffer(other)
                frame = copy
                byID[key] = Self.storing(copy, at: loop, in: known)
            }
        } else {
            frame = make()
            byID[key] = Self.storing(frame, at: loop, in: [])
        }
        if loop >= recentIDs.count {
            recentIDs += Array(repeating: [], count: loop - recentIDs.count + 1)
            recentFrames += Array(repeating: ByteBuffer(), count: loop - recentFrames.count + 1)
        }
        recentIDs[loop] = quotedID
        recentFrames[loop] = frame
        return frame
    }

    private static func storing(_ frame: ByteBuffer, at loop: Int, in frames: [ByteBuffer?]) -> [ByteBuffer?] {
        var frames = frames
        if loop >= frames.count { frames += Array(repeating: nil, count: loop - frames.count + 1) }
        frames[loop] = frame
        return frames
    }
}

/// The change stream's latest description of a table, as the fan-out saw it.
struct SeenRelation: Sendable {
    var relation: Relation
    /// The commit position of the change that carried it.
    var at: LSN
    /// Where the table's subscriptions are to be checked again: some were checked against a
    /// catalog newer than `at` (`FanoutHub.removeSubscriptions(brokenBy:at:)`).
    var recheckAt: LSN?
}

extension ServerState {
    /// A description of `relation`'s table reached the fan-out with the change committed at
    /// `position` (new, or a check is due). With other columns than the last one, or a check
    /// due, ends the subscriptions whose filter can no longer match it (a column dropped,
    /// renamed or retyped), each with an `invalid_filter` error carrying its id, instead of
    /// leaving them silent for good. Returns them, and the clients whose send queue that error
    /// overflowed (closed with 1013).
    mutating func noteRelation(_ relation: Relation, at position: LSN)
        -> (ended: [(client: FanoutClientID, id: String, column: String, byToken: Bool)], overflowed: [FanoutClientID]) {
        let previous = relations[TableKey(relation.qualifiedName)]
        let recheckDue = previous?.recheckAt.map { position >= $0 } ?? false
        relations[TableKey(relation.qualifiedName)] = SeenRelation(relation: relation, at: position, recheckAt: previous?.recheckAt)
        // The same columns again (re-sent after a cache invalidation or a reconnect): nothing new.
        if let previous, previous.relation.columns == relation.columns, !recheckDue { return ([], []) }
        let (ended, recheckAt) = hub.removeSubscriptions(brokenBy: relation, at: position)
        relations[TableKey(relation.qualifiedName)]!.recheckAt = recheckAt
        let overflowed = ended.filter {
            endForSchemaChange(client: $0.client, id: $0.id, column: $0.column, byToken: $0.byToken, table: relation.qualifiedName)
        }.map(\.client)
        return (ended, overflowed)
    }

    /// Tells a client that the server ended (or would not add) its subscription `id` because a
    /// schema change broke its filter: the `invalid_filter` error, the id freed for the session
    /// handler, no start cursor left for it. True when the error overflowed the client's send
    /// queue (closed with 1013): the client is dropped.
    mutating func endForSchemaChange(client: FanoutClientID, id: String, column: String, byToken: Bool, table: String) -> Bool {
        if startAfter[client]?.removeValue(forKey: id) != nil, startAfter[client]?.isEmpty == true {
            startAfter[client] = nil
        }
        guard let session = sessions[client] else { return false }
        session.noteEndedByServer(id)
        guard session.enqueue(Self.schemaChangeError(id: id, column: column, byToken: byToken, table: table).serverMessage) == .overflow else { return false }
        dropClient(client)
        return true
    }

    /// The column of `subscription`'s filter that the stream's latest description of its table
    /// lacks (or has with another type), if that description is at least as new as the
    /// catalog the filter was checked against; nil otherwise. A description older than the
    /// catalog that would break it marks the table for a check once the stream passes the
    /// catalog's position.
    /// `byToken`: the column is one of the auth token's mandatory filter.
    mutating func schemaBrokenColumn(of subscription: ResolvedSubscription) -> (column: String, byToken: Bool)? {
        guard let seen = relations[TableKey(subscription.table)], let column = subscription.filter.brokenColumn(in: seen.relation) else { return nil }
        if let asOf = subscription.schemaAsOf, seen.at < asOf {
            relations[TableKey(subscription.table)]!.recheckAt = min(seen.recheckAt ?? asOf, asOf)
            return nil
        }
        return (column, subscription.mandatory.brokenColumn(in: seen.relation) != nil)
    }

    /// The error that ends (or refuses) a subscription whose filter a schema change broke:
    /// `invalid_filter` for the client's own filter, `forbidden` for the auth token's (the
    /// client cannot mend that; a token naming the table's current columns can).
    static func schemaChangeError(id: String, column: String, byToken: Bool = false, table: String) -> ProtocolError {
        if byToken {
            return ProtocolError(.forbidden, id: id,
                "the token's filter for \(table) names column '\(column)', which was dropped, renamed or changed type (a schema change): this subscription can no longer match, so it has ended; it needs a new token whose filter names the table's current columns")
        }
        return ProtocolError(.invalidFilter, id: id,
            "column '\(column)' of \(table) was dropped, renamed or changed type (a schema change): this subscription's filter can no longer match, so it has ended; subscribe again with a filter on the table's current columns (a RealtimeService re-reads them every samplingInterval, 10 s by default)")
    }
}
