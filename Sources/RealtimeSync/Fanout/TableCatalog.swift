/// A `schema.table` name as a dictionary key, equal and hashed by its bytes, as Postgres
/// compares names: Swift's `String` equality equates canonically equivalent spellings (a
/// Kelvin sign and a K, composed and decomposed accents), which would make two tables one
/// (a subscription to one would get the other's changes).
struct TableKey: Hashable, Sendable {
    let name: String

    init(_ name: String) { self.name = name }

    static func == (lhs: TableKey, rhs: TableKey) -> Bool { lhs.name.utf8.elementsEqual(rhs.name.utf8) }

    func hash(into hasher: inout Hasher) {
        var name = name
        name.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
    }
}

/// The tables a server streams, with their columns: what subscriptions are checked against.
public struct TableCatalog: Sendable {
    private var tables: [TableKey: [RelationColumn]]
    /// Each table's row filter in its publication (`CREATE PUBLICATION … WHERE (…)`,
    /// PostgreSQL 15+), as SQL: the stream carries only rows that pass it, so a snapshot
    /// reads only those.
    private var rowFilters: [TableKey: String] = [:]
    /// A WAL position read after the columns were: every schema change the catalog reflects
    /// committed before it (nil: unknown, e.g. a catalog built by hand). A change stream's
    /// table description from before it may be older than the catalog.
    public var asOf: LSN?

    /// Creates a catalog from `schema.table` names and their columns.
    public init(_ tables: [String: [RelationColumn]] = [:]) {
        self.tables = Dictionary(tables.map { (TableKey($0.key), $0.value) }, uniquingKeysWith: { _, last in last })
    }

    /// Creates a catalog from relations (e.g. those the capture has seen).
    public init(relations: [Relation]) {
        self.tables = Dictionary(relations.map { (TableKey($0.qualifiedName), $0.columns) }, uniquingKeysWith: { _, last in last })
    }

    /// Adds or replaces a table: its published columns and, if its publication has one, its
    /// row filter (SQL, as `pg_publication_tables.rowfilter` gives it).
    public mutating func set(_ table: String, columns: [RelationColumn], rowFilter: String? = nil) {
        tables[TableKey(table)] = columns
        rowFilters[TableKey(table)] = rowFilter
    }

    /// The row filter of `table` in its publication (SQL), if it has one.
    public func rowFilter(of table: String) -> String? { rowFilters[TableKey(table)] }

    /// Adds or replaces a table from a relation (after an ALTER TABLE, say).
    public mutating func update(with relation: Relation) { tables[TableKey(relation.qualifiedName)] = relation.columns }

    /// The columns of `table` (`schema.table`), if it is streamed.
    public func columns(of table: String) -> [RelationColumn]? { tables[TableKey(table)] }

    /// The streamed tables' names, sorted.
    public var tableNames: [String] { tables.keys.map(\.name).sorted() }

    /// `dictionary[name]`, but only for a key with the same bytes, as Postgres compares names:
    /// Swift's `String` equality also equates canonically equivalent spellings (a Kelvin sign
    /// and a K, composed and decomposed accents), which would let a grant for one table admit
    /// a request for another.
    static func exactly<Value>(_ name: String, in dictionary: [String: Value]) -> Value? {
        guard let index = dictionary.index(forKey: name), dictionary[index].key.utf8.elementsEqual(name.utf8) else { return nil }
        return dictionary[index].value
    }

    /// Checks a subscribe request against the catalog and the client's grants, and
    /// compiles its filter (the mandatory filter first, ANDed with the client's).
    ///
    /// Order of checks: `forbidden` (table not granted: answered before `unknown_table`
    /// so a restricted client cannot probe which tables exist), `unknown_table`,
    /// `forbidden` when the grant's own filter does not compile (a token problem),
    /// `invalid_filter` for the client's filter. Errors carry the request's id.
    public func resolve(_ request: SubscribeRequest, access: TableAccess = .unrestricted) throws(ProtocolError) -> ResolvedSubscription {
        let table = request.table.description
        var mandatoryText = ""
        if case .restricted(let grants) = access {
            guard let grant = Self.exactly(table, in: grants) else {
                throw ProtocolError(.forbidden, id: request.id, "the token does not grant table \(quoteForMessage(table))")
            }
            mandatoryText = grant
        }
        guard let columns = tables[TableKey(table)] else {
            throw ProtocolError(.unknownTable, id: request.id, "table \(quoteForMessage(table)) is not streamed by this server")
        }
        let mandatory: Filter
        do {
            mandatory = try Filter(parsing: mandatoryText, columns: columns)
        } catch {
            throw ProtocolError(.forbidden, id: request.id, "the token's filter for \(quoteForMessage(table)) is invalid: \(error.message)")
        }
        let own: Filter
        do {
            own = try Filter(parsing: request.filter, columns: columns)
        } catch {
            throw error.answering(request.id)
        }
        var resolved = ResolvedSubscription(id: request.id, table: table, events: request.events, filter: mandatory.and(own),
                                            snapshot: request.snapshot, since: request.since)
        resolved.schemaAsOf = asOf
        resolved.mandatory = mandatory
        return resolved
    }
}

/// What a client may subscribe to.
public enum TableAccess: Sendable, Hashable {
    /// Auth off: every streamed table, every row.
    case unrestricted
    /// Auth on (the token's `rt` claim): only these `schema.table` names, each with a mandatory
    /// filter (`""` for every row) that is ANDed with the client's.
    case restricted([String: String])
}

/// A subscribe request checked against the catalog and grants, ready for `FanoutHub.subscribe`.
public struct ResolvedSubscription: Sendable, Hashable {
    /// The client's id for it.
    public var id: String
    /// `schema.table`.
    public var table: String
    /// Which operations to deliver.
    public var events: ChangeOperationSet
    /// The compiled filter (mandatory AND client's).
    public var filter: Filter
    /// The auth token's mandatory part of `filter` (`Filter.all` when there is none): an
    /// UPDATE's old row that does not pass it is withheld, `old: null` (`Filter.hidesOldRow`).
    public var mandatory: Filter = .all
    /// Whether a snapshot comes first.
    public var snapshot: Bool
    /// Resume after this cursor.
    public var since: Cursor?
    /// The catalog's `asOf` when the filter was checked against it: a table description from
    /// the change stream at or after it is at least as new as the columns the filter names.
    public var schemaAsOf: LSN?

    /// Creates one (tests and callers that compile filters themselves).
    public init(id: String, table: String, events: ChangeOperationSet = .default, filter: Filter = .all,
                snapshot: Bool = false, since: Cursor? = nil) {
        self.id = id
        self.table = table
        self.events = events
        self.filter = filter
        self.snapshot = snapshot
        self.since = since
    }
}
