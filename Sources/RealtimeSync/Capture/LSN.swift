/// A PostgreSQL WAL position (`pg_lsn`), printed as Postgres does: `16/B374D848`.
public struct LSN: RawRepresentable, Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The 64-bit byte position in the WAL.
    public var rawValue: UInt64

    /// Wraps a raw 64-bit WAL position.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Wraps a raw 64-bit WAL position.
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    /// The invalid position `0/0`, also used as "from the start".
    public static let zero = LSN(0)

    /// Parses Postgres's `XXXXXXXX/XXXXXXXX` text form; returns nil when malformed.
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        // Hex digits only: `UInt32(_:radix:)` also takes a leading + or -.
        guard parts.count == 2, (1...8).contains(parts[0].count), (1...8).contains(parts[1].count),
              parts.allSatisfy({ $0.allSatisfy(\.isHexDigit) }),
              let high = UInt32(parts[0], radix: 16), let low = UInt32(parts[1], radix: 16)
        else { return nil }
        self.rawValue = UInt64(high) << 32 | UInt64(low)
    }

    /// Postgres's text form, e.g. `16/B374D848`.
    public var description: String {
        String(rawValue >> 32, radix: 16, uppercase: true) + "/" + String(rawValue & 0xFFFF_FFFF, radix: 16, uppercase: true)
    }

    /// Orders positions by their byte offset in the WAL.
    public static func < (lhs: LSN, rhs: LSN) -> Bool { lhs.rawValue < rhs.rawValue }
}
