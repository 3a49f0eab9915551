import PoolKit
/// How a column's Postgres text form becomes JSON, chosen once per column from its type OID.
enum JSONValueKind: Sendable, Hashable {
    /// int2, int4, int8, oid: the text is a JSON number.
    case integer
    /// float4, float8: a JSON number, or a string for NaN/Infinity.
    case float
    /// bool: `t`/`f` to true/false.
    case bool
    /// json, jsonb: the text is spliced in as JSON.
    case json
    /// Everything else (numeric included): a JSON string of the text form.
    case string

    init(typeOID: UInt32) {
        switch typeOID {
        case PostgresTypeOID.int2, PostgresTypeOID.int4, PostgresTypeOID.int8, PostgresTypeOID.oid: self = .integer
        case PostgresTypeOID.float4, PostgresTypeOID.float8: self = .float
        case PostgresTypeOID.bool: self = .bool
        case PostgresTypeOID.json, PostgresTypeOID.jsonb: self = .json
        default: self = .string
        }
    }
}

/// Writes JSON straight into a byte buffer: the hot path of change fan-out, with
/// no Foundation and no intermediate values.
///
/// Value forms (PROTOCOL.md): int2/int4/int8/oid and float4/float8 as numbers
/// (float NaN/Infinity/-Infinity as strings), numeric as a string, bool as
/// true/false, json/jsonb spliced in as JSON, SQL NULL as null, anything else as
/// a string of its Postgres text form.
public enum JSONWriter {
    /// Appends the JSON form of a column value in Postgres text format with type `typeOID`.
    public static func writeValue(text: some Collection<UInt8>, typeOID: UInt32, into buffer: inout [UInt8]) {
        writeValue(text: text, kind: JSONValueKind(typeOID: typeOID), into: &buffer)
    }

    /// Appends the JSON form of one tuple value of a column with type `typeOID`
    /// (`null` for SQL NULL; unchanged TOAST values are also written as null here,
    /// callers that know better leave them out).
    public static func writeValue(_ value: TupleValue, typeOID: UInt32, into buffer: inout [UInt8]) {
        switch value {
        case .null, .unchanged: buffer.append(contentsOf: "null".utf8)
        case .text(let bytes): writeValue(text: bytes, typeOID: typeOID, into: &buffer)
        case .binary(let bytes): writeByteaHex(bytes, into: &buffer)
        }
    }

    @inline(__always)
    static func writeValue(text: some Collection<UInt8>, kind: JSONValueKind, into buffer: inout [UInt8]) {
        switch kind {
        case .integer:
            if isJSONNumber(text) { buffer.append(contentsOf: text) } else { writeString(text, into: &buffer) }
        case .float:
            if isJSONNumber(text) { buffer.append(contentsOf: text) } else { writeString(text, into: &buffer) }
        case .bool:
            if text.count == 1, let first = text.first, first == UInt8(ascii: "t") {
                buffer.append(contentsOf: "true".utf8)
            } else if text.count == 1, let first = text.first, first == UInt8(ascii: "f") {
                buffer.append(contentsOf: "false".utf8)
            } else {
                writeString(text, into: &buffer)
            }
        case .json:
            if text.isEmpty {
                buffer.append(contentsOf: "null".utf8)
            } else if text.contains(where: { $0 >= 0x80 }) && String(validating: text, as: UTF8.self) == nil {
                // Only a non-UTF-8 database (SQL_ASCII) gives this; copied as is it would make
                // the whole frame invalid UTF-8 (the client closes with 1007). A string with
                // the bad bytes replaced keeps the frame valid.
                writeString(text, into: &buffer)
            } else {
                buffer.append(contentsOf: text)
            }
        case .string:
            writeString(text, into: &buffer)
        }
    }

    /// Whether `text` matches the JSON number grammar (`-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?`).
    public static func isJSONNumber(_ text: some Collection<UInt8>) -> Bool {
        var i = text.startIndex
        let end = text.endIndex
        guard i != end else { return false }
        if text[i] == UInt8(ascii: "-") { i = text.index(after: i); guard i != end else { return false } }
        if text[i] == UInt8(ascii: "0") {
            i = text.index(after: i)
        } else if (UInt8(ascii: "1")...UInt8(ascii: "9")).contains(text[i]) {
            while i != end, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[i]) { i = text.index(after: i) }
        } else {
            return false
        }
        if i != end, text[i] == UInt8(ascii: ".") {
            i = text.index(after: i)
            guard i != end, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[i]) else { return false }
            while i != end, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[i]) { i = text.index(after: i) }
        }
        if i != end, text[i] == UInt8(ascii: "e") || text[i] == UInt8(ascii: "E") {
            i = text.index(after: i)
            if i != end, text[i] == UInt8(ascii: "+") || text[i] == UInt8(ascii: "-") { i = text.index(after: i) }
            guard i != end, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[i]) else { return false }
            while i != end, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(text[i]) { i = text.index(after: i) }
        }
        return i == end
    }

    /// Appends `string` as a quoted, escaped JSON string.
    public static func writeString(_ string: String, into buffer: inout [UInt8]) {
        var string = string
        string.withUTF8 { writeEscaped($0, into: &buffer) }
    }

    /// Appends UTF-8 `bytes` as a quoted JSON string: `"` `\` and control characters
    /// are escaped, other characters (non-BMP included) are kept as UTF-8, and
    /// invalid UTF-8 sequences become U+FFFD so the output is always valid.
    public static func writeString(_ bytes: some Collection<UInt8>, into buffer: inout [UInt8]) {
        let done: Void? = bytes.withContiguousStorageIfAvailable { (pointer: UnsafeBufferPointer<UInt8>) -> Void in
            writeEscaped(pointer, into: &buffer)
        }
        if done == nil {
            let copy = Array(bytes)
            copy.withUnsafeBufferPointer { writeEscaped($0, into: &buffer) }
        }
    }

    private static let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

    static func writeEscaped(_ bytes: UnsafeBufferPointer<UInt8>, into buffer: inout [UInt8]) {
        buffer.append(UInt8(ascii: "\""))
        var runStart = 0
        var i = 0
        let count = bytes.count
        @inline(__always) func flush(_ upTo: Int) {
            if upTo > runStart { buffer.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[runStart..<upTo])) }
        }
        while i < count {
            let byte = bytes[i]
            if byte >= 0x20 && byte < 0x80 {
                if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") {
                    flush(i)
                    buffer.append(UInt8(ascii: "\\"))
                    buffer.append(byte)
                    runStart = i + 1
                }
                i += 1
                continue
            }
            if byte < 0x20 {
                flush(i)
                buffer.append(UInt8(ascii: "\\"))
                switch byte {
                case 0x08: buffer.append(UInt8(ascii: "b"))
                case 0x09: buffer.append(UInt8(ascii: "t"))
                case 0x0A: buffer.append(UInt8(ascii: "n"))
                case 0x0C: buffer.append(UInt8(ascii: "f"))
                case 0x0D: buffer.append(UInt8(ascii: "r"))
                default:
                    buffer.append(contentsOf: "u00".utf8)
                    buffer.append(hexDigits[Int(byte >> 4)])
                    buffer.append(hexDigits[Int(byte & 0xF)])
                }
                i += 1
                runStart = i
                continue
            }
            // Non-ASCII: keep a valid UTF-8 sequence as is, replace an invalid one.
            let length = validUTF8SequenceLength(bytes, at: i)
            if length == 0 {
                flush(i)
                buffer.append(contentsOf: [0xEF, 0xBF, 0xBD])
                i += 1
                runStart = i
            } else {
                i += length
            }
        }
        flush(count)
        buffer.append(UInt8(ascii: "\""))
    }

    /// The length of the well-formed UTF-8 sequence starting at `i`, or 0 (RFC 3629 table).
    @inline(__always)
    static func validUTF8SequenceLength(_ bytes: UnsafeBufferPointer<UInt8>, at i: Int) -> Int {
        let b0 = bytes[i]
        let count = bytes.count
        @inline(__always) func cont(_ j: Int, _ low: UInt8 = 0x80, _ high: UInt8 = 0xBF) -> Bool {
            j < count && bytes[j] >= low && bytes[j] <= high
        }
        switch b0 {
        case 0xC2...0xDF: return cont(i + 1) ? 2 : 0
        case 0xE0: return cont(i + 1, 0xA0) && cont(i + 2) ? 3 : 0
        case 0xE1...0xEC, 0xEE...0xEF: return cont(i + 1) && cont(i + 2) ? 3 : 0
        case 0xED: return cont(i + 1, 0x80, 0x9F) && cont(i + 2) ? 3 : 0
        case 0xF0: return cont(i + 1, 0x90) && cont(i + 2) && cont(i + 3) ? 4 : 0
        case 0xF1...0xF3: return cont(i + 1) && cont(i + 2) && cont(i + 3) ? 4 : 0
        case 0xF4: return cont(i + 1, 0x80, 0x8F) && cont(i + 2) && cont(i + 3) ? 4 : 0
        default: return 0
        }
    }

    /// Appends bytes as a bytea-style hex JSON string (`"\\xdeadbeef"`), used for binary-format values.
    public static func writeByteaHex(_ bytes: some Collection<UInt8>, into buffer: inout [UInt8]) {
        buffer.append(contentsOf: "\"\\\\x".utf8)
        for byte in bytes {
            buffer.append(hexDigits[Int(byte >> 4)])
            buffer.append(hexDigits[Int(byte & 0xF)])
        }
        buffer.append(UInt8(ascii: "\""))
    }
}
