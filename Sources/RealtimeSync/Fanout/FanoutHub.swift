/// Identifies one connected client (one socket) in a `FanoutHub`.
public struct FanoutClientID: RawRepresentable, Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The raw number (the server hands them out, e.g. from a counter).
    public var rawValue: UInt64
    /// Wraps a raw number.
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Wraps a raw number.
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    /// Orders by the raw number.
    public static func < (lhs: FanoutClientID, rhs: FanoutClientID) -> Bool { lhs.rawValue < rhs.rawValue }
    /// `client-<n>`.
    public var description: String { "client-\(rawValue)" }
}

/// One open subscription as the hub holds it. Immutable, shared by the hub's indexes.
final class FanoutSubscription: Sendable {
    let client: FanoutClientID
    let id: String
    /// Hub-wide order of subscribing: ids are reported in this order.
    let sequence: UInt64
    let table: String
    let events: ChangeOperationSet
    let filter: Filter
    /// The auth token's part of `filter` (`Filter.all` with auth off or an empty grant).
    let mandatory: Filter
    /// `"id"` as a JSON string, escaped once.
    let quotedID: [UInt8]
    /// Where it is indexed: nil for the table's scan list.
    let placement: (column: FanoutColumnKey, keys: [FilterIndexKey])?
    /// See `ResolvedSubscription.schemaAsOf`.
    let schemaAsOf: LSN?

    init(client: FanoutClientID, id: String, sequence: UInt64, table: String, events: ChangeOperationSet, filter: Filter,
         mandatory: Filter = .all, placement: (column: FanoutColumnKey, keys: [FilterIndexKey])?, schemaAsOf: LSN? = nil) {
        self.mandatory = mandatory
        self.schemaAsOf = schemaAsOf
        self.client = client
        self.id = id
        self.sequence = sequence
        self.table = table
        self.events = events
        self.filter = filter
        var quoted: [UInt8] = []
        JSONWriter.writeString(id, into: &quoted)
        self.quotedID = quoted
        self.placement = placement
    }
}

/// A column that equality conditions are indexed on, with the comparison its keys were made for.
struct FanoutColumnKey: Sendable, Hashable {
    var name: String
    var columnClass: ColumnClass
}

/// The subscriptions of one table.
struct FanoutTableIndex: Sendable {
    /// Subscriptions with no indexable equality: checked on every change of the table.
    var scan: [UInt64: FanoutSubscription] = [:]
    /// Subscriptions by (column, value) of their first `eq`/`in` condition.
    var columns: [FanoutColumnKey: FanoutColumnIndex] = [:]
    var count = 0
}

struct FanoutColumnIndex: Sendable {
    /// A condition on the column, used to read a change's value of it (any subscription's will do).
    var probe: FilterCondition
    var buckets: [FilterIndexKey: [UInt64: FanoutSubscription]] = [:]
    var count = 0
}

/// One client's share of a change: the client once, with every subscription of its that the change matches.
public struct FanoutDelivery: Sendable {
    /// The client.
    public let client: FanoutClientID
    /// The first matching subscription in subscription order.
    let first: FanoutSubscription
    /// The other matching subscriptions in subscription order: empty, with no allocation, in
    /// the common case of one (a change to 1,000 clients made 1,000 one-element arrays).
    let rest: [FanoutSubscription]

    /// The matching subscription ids, in the order the client subscribed them.
    public var subscriptionIDs: [String] { [first.id] + rest.map(\.id) }
}

/// Fan-out of changes to subscriptions: who gets which change.
///
/// A pure value (no locks, no I/O): the server keeps one behind a `Mutex` and
/// calls `match` for each change. Subscriptions are indexed by table and by the
/// value of their first equality condition (`status=eq.open`, or each item of an
/// `in` list up to 64 items) under (table, column, value); a change looks up the
/// buckets of its own values, plus the table's scan list of subscriptions
/// without such a condition, so matching never walks every subscription of a
/// table. Subscribing, unsubscribing and removing a client cost O(their subscriptions).
///
/// Order: deliveries are sorted by client id; within one, ids are in subscription order.
public struct FanoutHub: Sendable {
    /// Bounds.
    public struct Limits: Sendable, Hashable {
        /// Open subscriptions one client may hold (`too_many_subscriptions` beyond). Default 100.
        public var maxSubscriptionsPerClient: Int
        /// Longest `in` list that is indexed value by value; longer lists go to the scan list. Default 64.
        public var maxIndexedValues: Int

        /// Creates limits.
        public init(maxSubscriptionsPerClient: Int = 100, maxIndexedValues: Int = 64) {
            precondition(maxSubscriptionsPerClient >= 1, "maxSubscriptionsPerClient must be at least 1, got \(maxSubscriptionsPerClient)")
            precondition(maxIndexedValues >= 1, "maxIndexedValues must be at least 1, got \(maxIndexedValues)")
            self.maxSubscriptionsPerClient = maxSubscriptionsPerClient
            self.maxIndexedValues = maxIndexedValues
        }
    }

    /// The bounds in force.
    public let limits: Limits
    private var tables: [TableKey: FanoutTableIndex] = [:]
    private var clients: [FanoutClientID: [String: FanoutSubscription]] = [:]
    private var nextSequence: UInt64 = 0
    /// Open subscriptions in all.
    public private(set) var subscriptionCount = 0
    /// Of them, those in an equality index (the rest are in scan lists).
    public private(set) var indexedSubscriptionCount = 0

    /// Creates an empty hub.
    public init(limits: Limits = Limits()) { self.limits = limits }

    /// Clients holding at least one subscription.
    public var clientCount: Int { clients.count }

    /// The clients holding at least one subscription.
    public var clientIDs: [FanoutClientID] { Array(clients.keys) }

    /// Open subscriptions of `table` (`schema.table`).
    public func subscriptionCount(table: String) -> Int { tables[TableKey(table)]?.count ?? 0 }

    /// The ids of a client's open subscriptions, in the order it subscribed them.
    public func subscriptionIDs(of client: FanoutClientID) -> [String] {
        (clients[client]?.values.sorted { $0.sequence < $1.sequence } ?? []).map(\.id)
    }

    /// Opens a subscription. Throws `duplicate_subscription` when the client already has one
    /// with this id, `too_many_subscriptions` at `limits.maxSubscriptionsPerClient`.
    public mutating func subscribe(client: FanoutClientID, _ subscription: ResolvedSubscription) throws(ProtocolError) {
        let existing = clients[client]
        if existing?[subscription.id] != nil {
            throw ProtocolError(.duplicateSubscription, id: subscription.id,
                                "subscription \(quoteForMessage(subscription.id)) is already open; unsubscribe it first or choose another id")
        }
        if let existing, existing.count >= limits.maxSubscriptionsPerClient {
            throw ProtocolError(.tooManySubscriptions, id: subscription.id,
                                "this connection holds \(existing.count) subscriptions (maxSubscriptionsPerClient=\(limits.maxSubscriptionsPerClient)); unsubscribe some first")
        }
        var placement: (column: FanoutColumnKey, keys: [FilterIndexKey])?
        var probe: FilterCondition?
        if let (condition, keys) = subscription.filter.indexableEquality(maxIndexedValues: limits.maxIndexedValues) {
            placement = (FanoutColumnKey(name: condition.column, columnClass: condition.columnClass), keys)
            probe = condition
        }
        let record = FanoutSubscription(client: client, id: subscription.id, sequence: nextSequence, table: subscription.table,
                                        events: subscription.events, filter: subscription.filter, mandatory: subscription.mandatory,
                                        placement: placement,
                                        schemaAsOf: subscription.schemaAsOf)
        nextSequence += 1
        clients[client, default: [:]][subscription.id] = record
        // Mutated in place (`tables[key, default:]` and the nested subscripts yield their
        // storage): copying an index out and back made every subscribe copy its table's
        // dictionaries, O(n) each, which made connecting 10,000 sockets take 20 s.
        Self.update(&tables[TableKey(subscription.table), default: FanoutTableIndex()]) { table in
            if let placement, let probe {
                Self.update(&table.columns[placement.column, default: FanoutColumnIndex(probe: probe)]) { column in
                    for key in placement.keys { column.buckets[key, default: [:]][record.sequence] = record }
                    column.count += 1
                }
            } else {
                table.scan[record.sequence] = record
            }
            table.count += 1
        }
        if placement != nil { indexedSubscriptionCount += 1 }
        subscriptionCount += 1
    }

    /// Runs `body` on a value in place (a named `inout` for a subscript's storage).
    private static func update<Value>(_ value: inout Value, _ body: (inout Value) -> Void) { body(&value) }

    /// Closes a client's subscription; false when it has none with this id.
    @discardableResult
    public mutating func unsubscribe(client: FanoutClientID, id: String) -> Bool {
        guard let record = clients[client]?.removeValue(forKey: id) else { return false }
        if clients[client]?.isEmpty == true { clients[client] = nil }
        unindex(record)
        return true
    }

    /// Closes the subscriptions to `relation`'s table whose filter names a column the table no
    /// longer has, or has with another type (`Filter.brokenColumn(in:)`): after such a schema
    /// change they could never match again. `position` is where the change stream described
    /// the table so: a subscription whose filter was checked against a catalog newer than that
    /// (`schemaAsOf` after it, e.g. while a restarted stream replays changes from before an
    /// ALTER) is left alone. Returns those closed, each with the column, and the earliest
    /// `schemaAsOf` of those left alone that this description would break (check again once
    /// the stream passes it: from there on its description is at least as new as their
    /// catalog). Walks the table's subscriptions: for a new description, not for each change.
    public mutating func removeSubscriptions(brokenBy relation: Relation, at position: LSN)
        -> (ended: [(client: FanoutClientID, id: String, column: String, byToken: Bool)], recheckAt: LSN?) {
        guard let index = tables[TableKey(relation.qualifiedName)] else { return ([], nil) }
        var records = Array(index.scan.values)
        for column in index.columns.values {
            var seen = Set<UInt64>()  // an `in` list puts one subscription in several buckets
            for bucket in column.buckets.values {
                for record in bucket.values where seen.insert(record.sequence).inserted { records.append(record) }
            }
        }
        var broken: [(client: FanoutClientID, id: String, column: String, byToken: Bool)] = []
        var recheckAt: LSN?
        for record in records {
            guard let column = record.filter.brokenColumn(in: relation) else { continue }
            if let asOf = record.schemaAsOf, position < asOf {
                recheckAt = min(recheckAt ?? asOf, asOf)
            } else {
                broken.append((record.client, record.id, column, record.mandatory.brokenColumn(in: relation) != nil))
            }
        }
        for entry in broken { unsubscribe(client: entry.client, id: entry.id) }
        return (broken.sorted { ($0.client, $0.id) < ($1.client, $1.id) }, recheckAt)
    }

    /// Closes every subscription of a client (its socket ended); returns how many.
    @discardableResult
    public mutating func removeClient(_ client: FanoutClientID) -> Int {
        guard let records = clients.removeValue(forKey: client) else { return 0 }
        for record in records.values { unindex(record) }
        return records.count
    }

    private mutating func unindex(_ record: FanoutSubscription) {
        guard tables[TableKey(record.table)] != nil else { return }
        var tableEmpty = false
        Self.update(&tables[TableKey(record.table)]!) { table in
            if let placement = record.placement {
                if table.columns[placement.column] != nil {
                    var columnEmpty = false
                    Self.update(&table.columns[placement.column]!) { column in
                        for key in placement.keys {
                            column.buckets[key]?[record.sequence] = nil
                            if column.buckets[key]?.isEmpty == true { column.buckets[key] = nil }
                        }
                        column.count -= 1
                        columnEmpty = column.count == 0
                    }
                    if columnEmpty { table.columns[placement.column] = nil }
                }
            } else {
                table.scan[record.sequence] = nil
            }
            table.count -= 1
            tableEmpty = table.count == 0
        }
        if tableEmpty { tables[TableKey(record.table)] = nil }
        if record.placement != nil { indexedSubscriptionCount -= 1 }
        subscriptionCount -= 1
    }

    /// Who gets `event`: each client once, with all its subscriptions that the change
    /// matches (table, `events`, filter). Sorted by client id; ids in subscription order.
    public func match(_ event: ChangeEvent) -> [FanoutDelivery] {
        guard let table = tables[TableKey(event.table)] else { return [] }
        let operation = ChangeOperationSet(event.operation)
        var matched: [FanoutSubscription] = []
        @inline(__always) func consider(_ record: FanoutSubscription) {
            if record.events.contains(operation) && record.filter.matches(event) { matched.append(record) }
        }
        for record in table.scan.values { consider(record) }
        for (key, column) in table.columns {
            guard case .text(let bytes) = column.probe.cell(in: event),
                  let valueKey = FilterIndexKey(rowText: bytes, columnClass: key.columnClass),
                  let bucket = column.buckets[valueKey]
            else { continue }
            for record in bucket.values { consider(record) }
        }
        if matched.isEmpty { return [] }
        // Sort plain keys, not the records: moving class references in a sort costs a retain
        // and a release each (the sort was the largest part of matching 1,000 clients).
        var order: [(client: UInt64, sequence: UInt64, index: Int)] = []
        order.reserveCapacity(matched.count)
        for (index, record) in matched.enumerated() { order.append((record.client.rawValue, record.sequence, index)) }
        order.sort { ($0.client, $0.sequence) < ($1.client, $1.sequence) }
        var deliveries: [FanoutDelivery] = []
        deliveries.reserveCapacity(order.count)
        var start = 0
        while start < order.count {
            var end = start + 1
            while end < order.count, order[end].client == order[start].client { end += 1 }
            let rest = end - start == 1 ? [] : order[(start + 1)..<end].map { matched[$0.index] }
            deliveries.append(FanoutDelivery(client: matched[order[start].index].client, first: matched[order[start].index], rest: rest))
            start = end
        }
        return deliveries
    }

    /// Matches and encodes in one go: the change is encoded once, and each client's frame is
    /// that encoding behind its own `{"type":"change","ids":[…],` prefix. The entry point for
    /// benchmarks and for the server's fan-out loop.
    public func frames(for event: ChangeEvent) -> [(client: FanoutClientID, frame: [UInt8])] {
        let deliveries = match(event)
        if deliveries.isEmpty { return [] }
        let change = EncodedChange(event)
        var withoutOld: EncodedChange?
        return deliveries.map { delivery in
            guard delivery.first.mandatory.hidesOldRow(of: event) else { return (delivery.client, change.frame(for: delivery)) }
            if withoutOld == nil { withoutOld = EncodedChange(event, hidingOld: true) }
            return (delivery.client, withoutOld!.frame(for: delivery))
        }
    }
}

/// A change encoded once for every client: the members of the `change` message
/// after `ids` (`"cursor":…,"op":…,…,"unchanged":[…]`, from `ChangeEvent.writeJSONMembers`).
public struct EncodedChange: Sendable {
    /// The shared members, without braces.
    public let members: [UInt8]

    private static let prefix = Array(#"{"type":"change","ids":["#.utf8)

    /// Encodes the event's members (`old` as null with `hidingOld`, for clients whose
    /// mandatory filter the old row does not pass: `Filter.hidesOldRow`).
    public init(_ event: ChangeEvent, hidingOld: Bool = false) {
        var members: [UInt8] = []
        members.reserveCapacity(256)
        event.writeJSONMembers(into: &members, hidingOld: hidingOld)
        self.members = members
    }

    /// The complete `change` frame for one client: one allocation, one copy of the members.
    public func frame(for delivery: FanoutDelivery) -> [UInt8] {
        var idsLength = delivery.first.quotedID.count + 1
        for record in delivery.rest { idsLength += record.quotedID.count + 1 }
        var frame: [UInt8] = []
        frame.reserveCapacity(Self.prefix.count + idsLength + 2 + members.count + 1)
        frame.append(contentsOf: Self.prefix)
        frame.append(contentsOf: delivery.first.quotedID)
        for record in delivery.rest {
            frame.append(UInt8(ascii: ","))
            frame.append(contentsOf: record.quotedID)
        }
        frame.append(UInt8(ascii: "]"))
        frame.append(UInt8(ascii: ","))
        frame.append(contentsOf: members)
        frame.append(UInt8(ascii: "}"))
        return frame
    }

    /// The complete `change` frame for the given subscription ids (escaped here).
    public func frame(ids: [String]) -> [UInt8] {
        var frame = Self.prefix
        frame.reserveCapacity(Self.prefix.count + members.count + 16 * ids.count + 3)
        for (position, id) in ids.enumerated() {
            if position > 0 { frame.append(UInt8(ascii: ",")) }
            JSONWriter.writeString(id, into: &frame)
        }
        frame.append(UInt8(ascii: "]"))
        frame.append(UInt8(ascii: ","))
        frame.append(contentsOf: members)
        frame.append(UInt8(ascii: "}"))
        return frame
    }
}
