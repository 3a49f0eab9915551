/// The error codes of PROTOCOL.md's `error` message. The raw values are the wire
/// strings and never change.
public enum ProtocolErrorCode: String, Sendable, Hashable, CaseIterable {
    /// The frame is not a well-formed message (bad JSON, wrong member type, bad value).
    case invalidMessage = "invalid_message"
    /// `type` names no known message.
    case unknownType = "unknown_type"
    /// The `filter` does not parse, or names a column the table lacks, or a value of the wrong type.
    case invalidFilter = "invalid_filter"
    /// The `table` is not one the server streams.
    case unknownTable = "unknown_table"
    /// The client's token does not grant the table.
    case forbidden = "forbidden"
    /// The client already has an open subscription with this `id`.
    case duplicateSubscription = "duplicate_subscription"
    /// The client holds as many subscriptions as allowed.
    case tooManySubscriptions = "too_many_subscriptions"
    /// The snapshot has more rows than allowed.
    case snapshotTooLarge = "snapshot_too_large"
    /// The client sends messages too fast.
    case rateLimited = "rate_limited"
    /// The server failed; the message may be retried.
    case `internal` = "internal"
}

/// An answer to a client message that could not be carried out: becomes the
/// `error` server message (`ServerMessage.error`). The socket stays open.
public struct ProtocolError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Stable code (the wire string).
    public var code: ProtocolErrorCode
    /// The subscription id of the message that caused it, when the message had a usable one.
    public var id: String?
    /// What is wrong, naming the bad part (e.g. `unknown column 'stauts'`).
    public var message: String

    /// Creates an error.
    public init(_ code: ProtocolErrorCode, id: String? = nil, _ message: String) {
        self.code = code
        self.id = id
        self.message = message
    }

    /// The same error answering subscription `id` (keeps an id already set).
    public func answering(_ id: String?) -> ProtocolError {
        var copy = self
        if copy.id == nil { copy.id = id }
        return copy
    }

    /// The `error` frame for this error.
    public var serverMessage: ServerMessage { .error(id: id, code: code, message: message) }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}

/// Quotes a client-supplied fragment for an error message, cut to a readable length.
@usableFromInline
func quoteForMessage(_ text: some StringProtocol, limit: Int = 60) -> String {
    let shown = text.count > limit ? String(text.prefix(limit)) + "…" : String(text)
    // Control characters escaped: client text quoted into a log line (a token's alg, a
    // table name) must not start a line of its own.
    var quoted = "'"
    for scalar in shown.unicodeScalars {
        switch scalar {
        case "\n": quoted += "\\n"
        case "\r": quoted += "\\r"
        case "\t": quoted += "\\t"
        case _ where scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) || scalar == "\u{2028}" || scalar == "\u{2029}":
            quoted += "\\u{" + String(scalar.value, radix: 16) + "}"
        default: quoted.unicodeScalars.append(scalar)
        }
    }
    return quoted + "'"
}
