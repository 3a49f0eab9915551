/// A set of change operations (a subscription's `events`).
public struct ChangeOperationSet: OptionSet, Sendable, Hashable {
    /// Raw bits.
    public var rawValue: UInt8
    /// Creates a set from raw bits.
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// INSERT.
    public static let insert = ChangeOperationSet(rawValue: 1)
    /// UPDATE.
    public static let update = ChangeOperationSet(rawValue: 2)
    /// DELETE.
    public static let delete = ChangeOperationSet(rawValue: 4)
    /// TRUNCATE (an extension: only when asked for; never in the default).
    public static let truncate = ChangeOperationSet(rawValue: 8)
    /// The PROTOCOL.md default: INSERT, UPDATE and DELETE.
    public static let `default`: ChangeOperationSet = [.insert, .update, .delete]

    /// The set holding one operation.
    public init(_ operation: ChangeOperation) {
        switch operation {
        case .insert: self = .insert
        case .update: self = .update
        case .delete: self = .delete
        case .truncate: self = .truncate
        }
    }

    /// Whether the set holds `operation`.
    @inline(__always)
    public func contains(_ operation: ChangeOperation) -> Bool { contains(ChangeOperationSet(operation)) }
}

/// A table name as a client writes it, normalised to `schema.table`.
///
/// `orders` becomes `public.orders`; `sales.orders` stays. Names are taken as
/// written (case-sensitive, no case folding); quoted identifiers (`"My Table"`)
/// and names with more than one dot are not supported and are refused.
public struct TableName: Sendable, Hashable, CustomStringConvertible {
    /// The schema (`public` when the client left it out).
    public let schema: String
    /// The table.
    public let name: String

    /// Creates a name from its parts.
    public init(schema: String, name: String) {
        self.schema = schema
        self.name = name
    }

    /// Parses `table` or `schema.table`; nil when malformed (empty part, more than one dot,
    /// a double quote, whitespace or a control character).
    public init?(parsing text: String) {
        guard !text.isEmpty, text.utf8.count <= 2 * 63 + 1 else { return nil }
        for scalar in text.unicodeScalars {
            if scalar == "\"" || scalar.value < 0x21 || scalar.value == 0x7F { return nil }
        }
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        switch parts.count {
        case 1:
            self.init(schema: "public", name: text)
        case 2 where !parts[0].isEmpty && !parts[1].isEmpty:
            self.init(schema: String(parts[0]), name: String(parts[1]))
        default:
            return nil
        }
    }

    /// `schema.table`, as `ChangeEvent.table` spells it.
    public var description: String { schema + "." + name }
}

/// A `subscribe` message, checked for form (not yet against tables, grants or limits).
public struct SubscribeRequest: Sendable, Hashable {
    /// The client's id for the subscription (1 to 64 characters).
    public var id: String
    /// The table, normalised.
    public var table: TableName
    /// Which operations to deliver (default INSERT, UPDATE, DELETE).
    public var events: ChangeOperationSet
    /// The filter text as sent (empty when none); compiled by `TableCatalog.resolve`.
    public var filter: String
    /// Whether to send the matching rows first.
    public var snapshot: Bool
    /// Resume after this cursor.
    public var since: Cursor?

    /// Creates a request.
    public init(id: String, table: TableName, events: ChangeOperationSet = .default, filter: String = "",
                snapshot: Bool = false, since: Cursor? = nil) {
        self.id = id
        self.table = table
        self.events = events
        self.filter = filter
        self.snapshot = snapshot
        self.since = since
    }
}

/// A message from a client (PROTOCOL.md "Client to server").
public enum ClientMessage: Sendable, Hashable {
    /// `{"type":"subscribe",…}`.
    case subscribe(SubscribeRequest)
    /// `{"type":"unsubscribe","id":…}`.
    case unsubscribe(id: String)

    /// Longest subscription id, in Unicode scalars.
    public static let maxIDLength = 64

    /// Parses one text frame. Never traps, whatever the bytes. Errors:
    /// - `invalid_message`: not a JSON object, or a member missing, of the wrong type,
    ///   malformed (`id`, `table`, `events`, `since`), or unknown;
    /// - `unknown_type`: `type` is a string naming no message.
    ///
    /// The error carries the message's `id` when it had a valid one, so the answer can name it.
    /// Unknown members are refused (a misspelt `filtr` must not silently subscribe to every row);
    /// optional members may be `null`, meaning absent; `snapshot` and `since` cannot be combined.
    public static func parse(_ frame: some Collection<UInt8>) throws(ProtocolError) -> ClientMessage {
        let json: ClientJSON
        do {
            json = try ClientJSONParser.parse(frame)
        } catch {
            throw ProtocolError(.invalidMessage, "message is not valid JSON: \(error.message)")
        }
        guard case .object(let members) = json else {
            throw ProtocolError(.invalidMessage, "message must be a JSON object, got \(json.typeName)")
        }
        func member(_ name: String) -> ClientJSON? {
            members.first { $0.key == name }?.value
        }
        // The id, when usable, so that every later error can answer it.
        var id: String?
        var idError: ProtocolError?
        switch member("id") {
        case nil:
            idError = ProtocolError(.invalidMessage, "missing 'id' (a string of 1 to \(maxIDLength) characters)")
        case .string(let text):
            let length = text.unicodeScalars.count
            if length >= 1 && length <= maxIDLength {
                id = text
            } else {
                idError = ProtocolError(.invalidMessage, "'id' must have 1 to \(maxIDLength) characters, got \(length)")
            }
        case let other?:
            idError = ProtocolError(.invalidMessage, "'id' must be a string, got \(other.typeName)")
        }
        guard let typeValue = member("type") else {
            throw ProtocolError(.invalidMessage, id: id, "missing 'type' (subscribe or unsubscribe)")
        }
        guard case .string(let type) = typeValue else {
            throw ProtocolError(.invalidMessage, id: id, "'type' must be a string, got \(typeValue.typeName)")
        }
        let allowed: Set<String>
        switch type {
        case "subscribe": allowed = ["type", "id", "table", "events", "filter", "snapshot", "since"]
        case "unsubscribe": allowed = ["type", "id"]
        default:
            throw ProtocolError(.unknownType, id: id, "unknown message type \(quoteForMessage(type)); expected subscribe or unsubscribe")
        }
        if let unknown = members.first(where: { !allowed.contains($0.key) }) {
            throw ProtocolError(.invalidMessage, id: id,
                                "unknown member \(quoteForMessage(unknown.key)) in \(type) (allowed: \(allowed.sorted().joined(separator: ", ")))")
        }
        if let idError { throw idError }
        guard let id else { throw ProtocolError(.invalidMessage, "missing 'id'") }
        if type == "unsubscribe" { return .unsubscribe(id: id) }

        // table
        let table: TableName
        switch member("table") {
        case nil, .null?:
            throw ProtocolError(.invalidMessage, id: id, "missing 'table' (schema.table, or table for public)")
        case .string(let text)?:
            if text.contains("\"") {
                throw ProtocolError(.invalidMessage, id: id, "table \(quoteForMessage(text)): quoted identifiers are not supported; write schema.table")
            }
            guard let parsed = TableName(parsing: text) else {
                throw ProtocolError(.invalidMessage, id: id, "table \(quoteForMessage(text)) must be schema.table or table")
            }
            table = parsed
        case let other?:
            throw ProtocolError(.invalidMessage, id: id, "'table' must be a string, got \(other.typeName)")
        }

        // events
        var events = ChangeOperationSet.default
        switch member("events") {
        case nil, .null?:
            break
        case .array(let elements)?:
            guard !elements.isEmpty else {
                throw ProtocolError(.invalidMessage, id: id, "'events' must not be empty (leave it out for INSERT, UPDATE, DELETE)")
            }
            events = []
            for element in elements {
                guard case .string(let name) = element else {
                    throw ProtocolError(.invalidMessage, id: id, "'events' must hold strings, got \(element.typeName)")
                }
                // ASCII case only: Unicode's `uppercased()` maps "ınsert" (dotless i) to INSERT.
                let upper = String(decoding: name.utf8.map { $0 >= 0x61 && $0 <= 0x7A ? $0 - 0x20 : $0 }, as: UTF8.self)
                guard let operation = ChangeOperation(rawValue: upper) else {
                    throw ProtocolError(.invalidMessage, id: id, "unknown event \(quoteForMessage(name)) (expected INSERT, UPDATE, DELETE or TRUNCATE)")
                }
                events.insert(ChangeOperationSet(operation))
            }
        case let other?:
            throw ProtocolError(.invalidMessage, id: id, "'events' must be an array of strings, got \(other.typeName)")
        }

        // filter
        var filter = ""
        switch member("filter") {
        case nil, .null?: break
        case .string(let text)?: filter = text
        case let other?: throw ProtocolError(.invalidMessage, id: id, "'filter' must be a string, got \(other.typeName)")
        }

        // snapshot
        var snapshot = false
        switch member("snapshot") {
        case nil, .null?: break
        case .bool(let value)?: snapshot = value
        case let other?: throw ProtocolError(.invalidMessage, id: id, "'snapshot' must be true or false, got \(other.typeName)")
        }

        // since
        var since: Cursor?
        switch member("since") {
        case nil, .null?:
            break
        case .string(let text)?:
            do {
                since = try Cursor(parsing: text)
            } catch {
                throw ProtocolError(.invalidMessage, id: id, "'since': \(error.message)")
            }
        case let other?:
            throw ProtocolError(.invalidMessage, id: id, "'since' must be a cursor string, got \(other.typeName)")
        }
        if snapshot && since != nil {
            throw ProtocolError(.invalidMessage, id: id, "'snapshot' and 'since' cannot be combined: a snapshot starts from the current rows")
        }
        return .subscribe(SubscribeRequest(id: id, table: table, events: events, filter: filter, snapshot: snapshot, since: since))
    }
}
