/// A message from the server (PROTOCOL.md "Server to client"), other than
/// `change` (see `EncodedChange`). `jsonBytes()` is the text frame.
public enum ServerMessage: Sendable, Hashable {
    /// `{"type":"subscribed","id":…,"cursor":…}`: the subscription's changes follow `cursor`.
    case subscribed(id: String, cursor: Cursor)
    /// `{"type":"snapshot","id":…,"rows":[…],"done":…}`; each row is one JSON object's bytes
    /// (see `ServerMessage.snapshotRow`).
    case snapshot(id: String, rows: [[UInt8]], done: Bool)
    /// `{"type":"unsubscribed","id":…}`.
    case unsubscribed(id: String)
    /// `{"type":"error","id":…,"code":…,"message":…}`; `id` is left out when the message had no usable one.
    case error(id: String?, code: ProtocolErrorCode, message: String)
    /// `{"type":"resync_required","id":…,"message":…}`.
    case resyncRequired(id: String, message: String)

    /// The JSON text frame.
    public func jsonBytes() -> [UInt8] {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(96)
        write(into: &buffer)
        return buffer
    }

    /// Appends the JSON text frame to `buffer`.
    public func write(into buffer: inout [UInt8]) {
        switch self {
        case .subscribed(let id, let cursor):
            buffer.append(contentsOf: #"{"type":"subscribed","id":"#.utf8)
            JSONWriter.writeString(id, into: &buffer)
            buffer.append(contentsOf: #","cursor":""#.utf8)
            cursor.write(into: &buffer)
            buffer.append(contentsOf: #""}"#.utf8)
        case .snapshot(let id, let rows, let done):
            buffer.append(contentsOf: #"{"type":"snapshot","id":"#.utf8)
            JSONWriter.writeString(id, into: &buffer)
            buffer.append(contentsOf: #","rows":["#.utf8)
            for (position, row) in rows.enumerated() {
                if position > 0 { buffer.append(UInt8(ascii: ",")) }
                buffer.append(contentsOf: row)
            }
            buffer.append(contentsOf: #"],"done":"#.utf8)
            buffer.append(contentsOf: (done ? "true" : "false").utf8)
            buffer.append(UInt8(ascii: "}"))
        case .unsubscribed(let id):
            buffer.append(contentsOf: #"{"type":"unsubscribed","id":"#.utf8)
            JSONWriter.writeString(id, into: &buffer)
            buffer.append(UInt8(ascii: "}"))
        case .error(let id, let code, let message):
            buffer.append(contentsOf: #"{"type":"error""#.utf8)
            if let id {
                buffer.append(contentsOf: #","id":"#.utf8)
                JSONWriter.writeString(id, into: &buffer)
            }
            buffer.append(contentsOf: #","code":""#.utf8)
            buffer.append(contentsOf: code.rawValue.utf8)
            buffer.append(contentsOf: #"","message":"#.utf8)
            JSONWriter.writeString(message, into: &buffer)
            buffer.append(UInt8(ascii: "}"))
        case .resyncRequired(let id, let message):
            buffer.append(contentsOf: #"{"type":"resync_required","id":"#.utf8)
            JSONWriter.writeString(id, into: &buffer)
            buffer.append(contentsOf: #","message":"#.utf8)
            JSONWriter.writeString(message, into: &buffer)
            buffer.append(UInt8(ascii: "}"))
        }
    }

    /// One snapshot row as a JSON object, with the same value forms as `change` rows
    /// (`JSONWriter`): `values[i]` is column `i`'s Postgres text form, nil for NULL.
    public static func snapshotRow(columns: [RelationColumn], values: [[UInt8]?]) -> [UInt8] {
        var buffer: [UInt8] = [UInt8(ascii: "{")]
        for (position, column) in columns.enumerated() where position < values.count {
            if position > 0 { buffer.append(UInt8(ascii: ",")) }
            JSONWriter.writeString(column.name, into: &buffer)
            buffer.append(UInt8(ascii: ":"))
            if let value = values[position] {
                JSONWriter.writeValue(text: value, typeOID: column.typeOID, into: &buffer)
            } else {
                buffer.append(contentsOf: "null".utf8)
            }
        }
        buffer.append(UInt8(ascii: "}"))
        return buffer
    }
}
