/// A position in the change stream: the commit LSN of a change's transaction and
/// the change's index in it. Its text form (PROTOCOL.md) is 16 uppercase hex
/// digits of the LSN, a dot, and 8 uppercase hex digits of the index, e.g.
/// `00000000016B3748.00000003`, so plain string order is stream order.
public struct Cursor: Sendable, Hashable, Comparable, CustomStringConvertible, LosslessStringConvertible {
    /// The commit LSN of the change's transaction.
    public var commitLSN: LSN
    /// The change's 0-based index in its transaction.
    public var index: UInt32

    /// Creates a cursor.
    public init(commitLSN: LSN, index: UInt32) {
        self.commitLSN = commitLSN
        self.index = index
    }

    /// The cursor just before every change of a transaction that commits at `lsn` or later
    /// (the greatest cursor of the position before it): the start of a stream that begins at
    /// `lsn`. Not `Cursor(commitLSN: lsn, index: 0)`, which is the first change of a
    /// transaction committing exactly at `lsn`: "after" that one would skip it.
    public static func start(at lsn: LSN) -> Cursor {
        lsn.rawValue == 0 ? Cursor(commitLSN: .zero, index: 0) : Cursor(commitLSN: LSN(lsn.rawValue - 1), index: .max)
    }

    /// The length of the text form: 16 + 1 + 8.
    public static let textLength = 25

    /// Parses the text form; hex digits may be upper or lower case.
    /// Throws `CursorError` saying what is wrong.
    public init(parsing text: some StringProtocol) throws(CursorError) {
        let utf8 = Array(text.utf8)
        guard utf8.count == Self.textLength else {
            throw CursorError(.invalidLength,
                "cursor \(Self.quote(text)) has \(utf8.count) characters; expected 25: 16 hex digits, '.', 8 hex digits (e.g. 00000000016B3748.00000003)")
        }
        guard utf8[16] == UInt8(ascii: ".") else {
            throw CursorError(.missingSeparator,
                "cursor \(Self.quote(text)) must have '.' after its 16 hex digits (e.g. 00000000016B3748.00000003)")
        }
        var lsn: UInt64 = 0
        for position in 0..<16 {
            guard let digit = Self.hexValue(utf8[position]) else {
                throw CursorError(.invalidHexDigit, "cursor \(Self.quote(text)) has a non-hex character at position \(position + 1)")
            }
            lsn = lsn << 4 | UInt64(digit)
        }
        var index: UInt32 = 0
        for position in 17..<25 {
            guard let digit = Self.hexValue(utf8[position]) else {
                throw CursorError(.invalidHexDigit, "cursor \(Self.quote(text)) has a non-hex character at position \(position + 1)")
            }
            index = index << 4 | UInt32(digit)
        }
        self.init(commitLSN: LSN(lsn), index: index)
    }

    /// Parses the text form; nil when malformed (use `init(parsing:)` for the reason).
    public init?(_ description: String) {
        guard let cursor = try? Cursor(parsing: description) else { return nil }
        self = cursor
    }

    /// The text form, e.g. `00000000016B3748.00000003`.
    public var description: String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Self.textLength)
        write(into: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Appends the 25-byte text form (no quotes) to `buffer`.
    @inlinable
    public func write(into buffer: inout [UInt8]) {
        let lsn = commitLSN.rawValue
        var shift = 60
        while shift >= 0 {
            buffer.append(Self.hexDigit(UInt8(truncatingIfNeeded: lsn >> UInt64(shift)) & 0xF))
            shift -= 4
        }
        buffer.append(UInt8(ascii: "."))
        shift = 28
        while shift >= 0 {
            buffer.append(Self.hexDigit(UInt8(truncatingIfNeeded: index >> UInt32(shift)) & 0xF))
            shift -= 4
        }
    }

    @usableFromInline
    static func hexDigit(_ value: UInt8) -> UInt8 {
        value < 10 ? UInt8(ascii: "0") + value : UInt8(ascii: "A") + value - 10
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        default: nil
        }
    }

    private static func quote(_ text: some StringProtocol) -> String {
        let shown = text.count > 40 ? String(text.prefix(40)) + "…" : String(text)
        return "\"" + shown + "\""
    }

    /// Stream order: by commit LSN, then index.
    public static func < (lhs: Cursor, rhs: Cursor) -> Bool {
        (lhs.commitLSN, lhs.index) < (rhs.commitLSN, rhs.index)
    }
}

/// A cursor string could not be parsed. `code` is stable; `message` says what is wrong.
public struct CursorError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Stable error codes.
    public enum Code: String, Sendable, Hashable {
        /// Not 25 characters long.
        case invalidLength = "cursor_invalid_length"
        /// No `.` at position 17.
        case missingSeparator = "cursor_missing_separator"
        /// A character that is not a hex digit.
        case invalidHexDigit = "cursor_invalid_hex_digit"
    }

    /// Stable code.
    public var code: Code
    /// What is wrong with the given cursor.
    public var message: String

    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `code: message`.
    public var description: String { "\(code.rawValue): \(message)" }
}
