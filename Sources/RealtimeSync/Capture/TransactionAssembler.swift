/// A committed transaction's changes, in order.
public struct CommittedTransaction: Sendable {
    /// Transaction id.
    public var xid: UInt32
    /// The LSN of the commit record (every change's cursor carries it).
    public var commitLSN: LSN
    /// The end of the transaction's commit record: everything before it has been emitted.
    public var endLSN: LSN
    /// Commit time.
    public var commitTime: PostgresTimestamp
    /// The replication origin's name when the transaction came from one.
    public var origin: String?
    /// The row changes, index 0 first.
    public var changes: [ChangeEvent]
    /// Transactional logical decoding messages, in order.
    public var messages: [LogicalMessage]
}

/// What the assembler hands out.
public enum AssembledOutput: Sendable {
    /// A transaction committed; its changes are contiguous and in order.
    case transaction(CommittedTransaction)
    /// A non-transactional logical decoding message (delivered as soon as written).
    case message(LogicalMessage)
}

/// A decoded message arrived where the protocol does not allow it.
public struct ChangeAssemblyError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Stable error codes.
    public enum Code: String, Sendable, Hashable {
        /// Begin while a transaction is open.
        case nestedBegin = "assembly_nested_begin"
        /// Commit, Origin or a row change outside Begin … Commit.
        case outsideTransaction = "assembly_outside_transaction"
        /// The Commit's LSN differs from its Begin's final LSN.
        case commitMismatch = "assembly_commit_mismatch"
        /// More changes in one transaction than `maxChanges` (`ChangeStream.Configuration.maxTransactionChanges`),
        /// or more bytes than `maxBytes` (`ChangeStream.Configuration.maxTransactionBytes`).
        case transactionTooLarge = "assembly_transaction_too_large"
    }

    /// Stable code.
    public var code: Code
    /// What is wrong.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}

/// A state machine that turns decoded pgoutput messages into committed
/// transactions of `ChangeEvent`s.
///
/// pgoutput v1 sends a transaction only after it committed (rolled-back
/// transactions never appear), and its Begin carries the final LSN, which is the
/// commit LSN; the assembler still buffers from Begin to Commit and emits at
/// Commit, so a consumer never sees part of a transaction whose Commit was not
/// received (e.g. when the connection drops mid-transaction: call
/// `abandonOpenTransaction()`; Postgres resends it on reconnect).
///
/// Transactions whose commit LSN is at or before `skipThrough` are decoded but
/// not emitted: after a reconnect, Postgres replays from the slot's confirmed
/// position and the consumer sees no duplicate.
public struct TransactionAssembler: Sendable {
    private struct Open: Sendable {
        var begin: PgOutputMessage.Begin
        var origin: String?
        var changes: [ChangeEvent] = []
        var messages: [LogicalMessage] = []
        /// `approximateBytes` of `changes`, plus the messages' contents (128 bytes each beside).
        var bytes = 0
        var skipped: Bool
    }

    private var open: Open?

    /// Transactions with a commit LSN at or before this are skipped (already emitted).
    public private(set) var skipThrough: LSN
    /// The end LSN of the last transaction that was emitted or skipped: every change
    /// before it has been handed out, so it may be reported as "flushed" (subject to
    /// the resume window holding the slot further back).
    public private(set) var emittedThrough: LSN
    /// Number of transactions skipped as already emitted.
    public private(set) var skippedTransactions = 0
    /// Most changes one transaction may have (they are held until its Commit); more throw
    /// `assembly_transaction_too_large`, naming this knob.
    public let maxChanges: Int
    /// Most bytes one transaction may hold (`ChangeEvent.approximateBytes` of its changes, plus
    /// its transactional messages' contents); more throw `assembly_transaction_too_large`,
    /// naming this knob. A single change larger than this throws too.
    public let maxBytes: Int
    /// The replication slot the changes come from, named in the advice of that error.
    public let slotName: String
    /// Whether transactional logical messages are kept in the transaction (`messages`); when
    /// false they are dropped as they arrive, held and counted against `maxBytes` by nothing.
    public let keepsMessages: Bool

    /// Creates an assembler.
    /// - Parameters:
    ///   - skipThrough: the commit LSN of the last transaction already
    ///     delivered; transactions at or before it are not emitted again.
    ///   - maxChanges: most changes in one transaction (`ChangeStream.Configuration.maxTransactionChanges`).
    ///   - maxBytes: most bytes one transaction holds (`ChangeStream.Configuration.maxTransactionBytes`).
    ///   - slotName: the slot being read, for the advice on skipping a transaction over either limit.
    ///   - keepsMessages: whether to keep transactional logical messages (see the property).
    public init(skipThrough: LSN = .zero, maxChanges: Int = Int(UInt32.max), maxBytes: Int = .max, slotName: String = "<slot>",
                keepsMessages: Bool = true) {
        self.keepsMessages = keepsMessages
        self.skipThrough = skipThrough
        self.emittedThrough = skipThrough
        self.maxChanges = min(max(1, maxChanges), Int(UInt32.max))
        self.maxBytes = max(1, maxBytes)
        self.slotName = slotName
    }

    /// Whether a Begin was received and its Commit not yet.
    public var isInTransaction: Bool { open != nil }

    /// Drops a transaction whose Commit will never come on this connection.
    public mutating func abandonOpenTransaction() { open = nil }

    /// Feeds one decoded message; returns a committed transaction at Commit, a
    /// non-transactional logical message, or nil.
    public mutating func apply(_ message: PgOutputMessage) throws(ChangeAssemblyError) -> AssembledOutput? {
        switch message {
        case .begin(let begin):
            if let open {
                throw ChangeAssemblyError(.nestedBegin,
                    "Begin of xid \(begin.xid) (final LSN \(begin.finalLSN)) while xid \(open.begin.xid) is still open")
            }
            open = Open(begin: begin, skipped: begin.finalLSN <= skipThrough)
            return nil
        case .commit(let commit):
            guard let current = open else {
                throw ChangeAssemblyError(.outsideTransaction, "Commit at \(commit.commitLSN) without a Begin")
            }
            guard current.begin.finalLSN == commit.commitLSN else {
                throw ChangeAssemblyError(.commitMismatch,
                    "Commit LSN \(commit.commitLSN) differs from the final LSN \(current.begin.finalLSN) of xid \(current.begin.xid)'s Begin")
            }
            open = nil
            emittedThrough = max(emittedThrough, commit.endLSN)
            if current.skipped {
                skippedTransactions += 1
                return nil
            }
            skipThrough = commit.commitLSN
            return .transaction(CommittedTransaction(
                xid: current.begin.xid, commitLSN: commit.commitLSN, endLSN: commit.endLSN,
                commitTime: current.begin.commitTime, origin: current.origin,
                changes: current.changes, messages: current.messages))
        case .origin(let origin):
            guard open != nil else {
                throw ChangeAssemblyError(.outsideTransaction, "Origin '\(origin.name)' outside a transaction")
            }
            open!.origin = origin.name
            return nil
        case .relation, .type:
            return nil
        case .message(let logical):
            if !logical.isTransactional { return .message(logical) }
            guard open != nil else {
                throw ChangeAssemblyError(.outsideTransaction, "transactional Message '\(logical.prefix)' outside a transaction")
            }
            if !open!.skipped && keepsMessages {
                try hold(bytes: 128 + logical.content.count)
                open!.messages.append(logical)
            }
            return nil
        case .insert(let insert):
            try add(.insert, insert.relation, new: insert.new, old: nil, oldKind: nil)
            return nil
        case .update(let update):
            var old = update.old?.tuple
            var kind = update.old?.kind
            if old == nil && !update.relation.keyColumnIndices.isEmpty {
                // The key did not change, so the new row carries it.
                old = update.new
                kind = .key
            }
            try add(.update, update.relation, new: update.new, old: old, oldKind: kind)
            return nil
        case .delete(let delete):
            try add(.delete, delete.relation, new: nil, old: delete.old.tuple, oldKind: delete.old.kind)
            return nil
        case .truncate(let truncate):
            for relation in truncate.relations {
                try add(.truncate, relation, new: nil, old: nil, oldKind: nil, truncateOptions: truncate.options)
            }
            return nil
        }
    }

    private mutating func add(_ operation: ChangeOperation, _ relation: Relation, new: TupleData?, old: TupleData?,
                              oldKind: OldRowKind?, truncateOptions: TruncateOptions = []) throws(ChangeAssemblyError) {
        guard open != nil else {
            throw ChangeAssemblyError(.outsideTransaction, "\(operation.rawValue) on \(relation.qualifiedName) outside a transaction")
        }
        if open!.skipped { return }
        let count = open!.changes.count
        guard count < maxChanges else {
            throw tooLarge("more than \(maxChanges) changes",
                           knob: "ChangeStream.Configuration.maxTransactionChanges, realtime-sync --max-transaction-changes",
                           size: "about 250 bytes per change of a small row")
        }
        let begin = open!.begin
        let event = ChangeEvent(
            operation: operation, relation: relation, new: new, old: old, oldKind: oldKind,
            xid: begin.xid, commitLSN: begin.finalLSN, commitTime: begin.commitTime, index: UInt32(count),
            truncateOptions: truncateOptions)
        try hold(bytes: event.approximateBytes)
        open!.changes.append(event)
    }

    /// Counts `bytes` more into the open transaction, or throws if that takes it over `maxBytes`.
    private mutating func hold(bytes: Int) throws(ChangeAssemblyError) {
        let total = open!.bytes + bytes
        guard total <= maxBytes else {
            throw tooLarge("more than \(maxBytes) bytes (\(total) at its change or message \(open!.changes.count + open!.messages.count + 1), counting each change's decoded message plus 128 bytes)",
                           knob: "ChangeStream.Configuration.maxTransactionBytes, realtime-sync --max-transaction-bytes",
                           size: "the process holds these bytes, and more while clients are sent the transaction")
        }
        open!.bytes = total
    }

    /// `assembly_transaction_too_large` for the open transaction: what it exceeds, the knob
    /// that sets that limit, and the way past it (raise the knob, or skip the transaction).
    private func tooLarge(_ what: String, knob: String, size: String) -> ChangeAssemblyError {
        let begin = open!.begin
        return ChangeAssemblyError(.transactionTooLarge,
            "transaction xid \(begin.xid) (commit LSN \(begin.finalLSN)) has \(what), the most held in memory until its commit (\(knob)). Raise the limit if memory allows (\(size)), or, with the service stopped, skip the transaction with SELECT pg_replication_slot_advance('\(slotName)', '\(LSN(begin.finalLSN.rawValue &+ 1))') (its changes then reach no client; clients resuming from before it get resync_required)")
    }
}
