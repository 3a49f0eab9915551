/// A `timestamptz` as Postgres sends it on the replication protocol: microseconds
/// since 2000-01-01 00:00:00 UTC.
public struct PostgresTimestamp: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// Microseconds since 2000-01-01 00:00:00 UTC (`Int64.max`/`Int64.min` are ±infinity).
    public var microsecondsSince2000: Int64

    /// Wraps a raw Postgres timestamp.
    public init(microsecondsSince2000: Int64) { self.microsecondsSince2000 = microsecondsSince2000 }

    /// Seconds between 1970-01-01 and 2000-01-01.
    public static let unixEpochOffsetSeconds: Int64 = 946_684_800

    /// Builds a timestamp from microseconds since 1970-01-01 00:00:00 UTC.
    public init(microsecondsSince1970: Int64) {
        self.microsecondsSince2000 = microsecondsSince1970 &- Self.unixEpochOffsetSeconds &* 1_000_000
    }

    /// Microseconds since 1970-01-01 00:00:00 UTC.
    public var microsecondsSince1970: Int64 { microsecondsSince2000 &+ Self.unixEpochOffsetSeconds &* 1_000_000 }

    /// RFC 3339 / ISO 8601 in UTC with microseconds, e.g. `2026-11-26T18:00:00.123456Z`.
    public var description: String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(27)
        writeISO8601(into: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Appends the ISO 8601 form (no quotes) to `buffer`; ±infinity as `infinity`/`-infinity`.
    public func writeISO8601(into buffer: inout [UInt8]) {
        if microsecondsSince2000 == .max { buffer.append(contentsOf: "infinity".utf8); return }
        if microsecondsSince2000 == .min { buffer.append(contentsOf: "-infinity".utf8); return }
        let micros = microsecondsSince1970
        var seconds = micros / 1_000_000
        var fraction = micros % 1_000_000
        if fraction < 0 { fraction += 1_000_000; seconds -= 1 }
        var days = seconds / 86_400
        var secondOfDay = seconds % 86_400
        if secondOfDay < 0 { secondOfDay += 86_400; days -= 1 }
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        let year = yoe + era * 400 + (month <= 2 ? 1 : 0)
        if year < 0 || year > 9999 {
            buffer.append(contentsOf: String(year).utf8)
        } else {
            Self.digits(year, count: 4, into: &buffer)
        }
        buffer.append(UInt8(ascii: "-"))
        Self.digits(month, count: 2, into: &buffer)
        buffer.append(UInt8(ascii: "-"))
        Self.digits(day, count: 2, into: &buffer)
        buffer.append(UInt8(ascii: "T"))
        Self.digits(secondOfDay / 3600, count: 2, into: &buffer)
        buffer.append(UInt8(ascii: ":"))
        Self.digits(secondOfDay / 60 % 60, count: 2, into: &buffer)
        buffer.append(UInt8(ascii: ":"))
        Self.digits(secondOfDay % 60, count: 2, into: &buffer)
        buffer.append(UInt8(ascii: "."))
        Self.digits(fraction, count: 6, into: &buffer)
        buffer.append(UInt8(ascii: "Z"))
    }

    private static func digits(_ value: Int64, count: Int, into buffer: inout [UInt8]) {
        var divisor: Int64 = 1
        for _ in 1..<count { divisor *= 10 }
        var rest = value
        while divisor > 0 {
            buffer.append(UInt8(ascii: "0") &+ UInt8(truncatingIfNeeded: rest / divisor))
            rest %= divisor
            divisor /= 10
        }
    }

    /// Orders timestamps chronologically.
    public static func < (lhs: PostgresTimestamp, rhs: PostgresTimestamp) -> Bool {
        lhs.microsecondsSince2000 < rhs.microsecondsSince2000
    }
}
