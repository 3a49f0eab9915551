/// An error from PostgreSQL or from the libpq connection that talks to it.
///
/// `code` is a stable machine-readable kind; for server errors `sqlState` holds the five-letter
/// SQLSTATE (e.g. `42601` for a syntax error). `isConnectionBroken` tells a dead connection
/// (discard it) apart from a failed statement (the connection is still usable).
public struct PostgresError: Error, Sendable, CustomStringConvertible {
    /// The stable kinds of failure.
    public enum Code: String, Sendable {
        /// The server rejected the statement; the connection is still usable.
        case server
        /// Could not establish a connection (refused, authentication, bad parameters).
        case connectionFailed
        /// The connection did not come up within `connectTimeout`.
        case connectTimeout
        /// The connection is gone (server terminated it, network failure, protocol error).
        case connectionBroken
        /// The connection was closed by its owner.
        case connectionClosed
        /// The connection string could not be understood.
        case invalidConfiguration
        /// A value could not be decoded into the requested Swift type, or a replication protocol
        /// message was malformed.
        case decoding
        /// A result or parameter was not what the caller asked for.
        case invalidUsage
    }

    /// The kind of failure.
    public var code: Code
    /// The SQLSTATE for server errors, e.g. `42601`.
    public var sqlState: String?
    /// The severity as sent by the server (`ERROR`, `FATAL`, `PANIC`), not localized.
    public var severity: String?
    /// The primary message.
    public var message: String
    /// The server's optional detail line.
    public var detail: String?
    /// The server's optional hint.
    public var hint: String?
    /// The 1-based character position in the statement text the error refers to.
    public var position: Int?
    /// The host the connection was for, when known.
    public var host: String?
    /// The port the connection was for, when known.
    public var port: String?

    /// Creates an error; mostly used by PoolKit itself.
    public init(
        code: Code, message: String, sqlState: String? = nil, severity: String? = nil,
        detail: String? = nil, hint: String? = nil, position: Int? = nil,
        host: String? = nil, port: String? = nil
    ) {
        self.code = code
        self.message = message
        self.sqlState = sqlState
        self.severity = severity
        self.detail = detail
        self.hint = hint
        self.position = position
        self.host = host
        self.port = port
    }

    /// True when the connection that raised this error cannot be used again.
    public var isConnectionBroken: Bool {
        switch code {
        case .connectionBroken, .connectionClosed, .connectionFailed, .connectTimeout: return true
        default: return false
        }
    }

    /// A one-line description naming what failed and, where there is one, the knob to turn.
    public var description: String {
        var out = "PostgresError.\(code.rawValue)"
        if let sqlState { out += " [\(sqlState)]" }
        if let severity { out += " \(severity)" }
        out += ": \(message)"
        if let position { out += " (at character \(position))" }
        if let detail { out += "; detail: \(detail)" }
        if let hint { out += "; hint: \(hint)" }
        return out
    }
}
