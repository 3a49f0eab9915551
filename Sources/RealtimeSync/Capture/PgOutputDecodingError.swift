/// A pgoutput message could not be decoded. `code` is stable; `message` says what is wrong.
public struct PgOutputDecodingError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Stable error codes.
    public enum Code: String, Sendable, Hashable {
        /// The payload was empty.
        case emptyMessage = "pgoutput_empty_message"
        /// The message ended before a field it must contain.
        case truncated = "pgoutput_truncated"
        /// Bytes were left after the last field of the message.
        case trailingBytes = "pgoutput_trailing_bytes"
        /// The first byte is not a known message type.
        case unknownMessageType = "pgoutput_unknown_message_type"
        /// A streaming (protocol version 2+) message arrived.
        case unsupportedMessageType = "pgoutput_unsupported_message_type"
        /// A row message names a relation OID with no preceding Relation message.
        case unknownRelation = "pgoutput_unknown_relation"
        /// A field holds a value the protocol does not allow.
        case invalidField = "pgoutput_invalid_field"
        /// A tuple's column count differs from its relation's.
        case columnCountMismatch = "pgoutput_column_count_mismatch"
        /// A string field has no terminating zero byte.
        case unterminatedString = "pgoutput_unterminated_string"
    }

    /// Stable code.
    public var code: Code
    /// What is wrong, naming the message type, field and offset.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}
