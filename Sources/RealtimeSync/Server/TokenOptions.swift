import Foundation

/// What `realtime-sync token` signs, parsed from its flags. In the library so that tests
/// check it without spawning the program; every error names the flag it is about.
public struct TokenOptions: Sendable, Hashable {
    /// The `rt` claim: `schema.table` to mandatory filter (`""`: every row).
    public var tables: [String: String]
    /// How long the token is valid from the moment it is signed. Default 1 h.
    public var ttl: Duration
    /// The `sub` claim; nil leaves it out.
    public var subject: String?

    /// The ttl used when `--ttl` is not given.
    public static let defaultTTL = Duration.seconds(3600)

    /// Parses `--table TABLE=FILTER` values (`public.orders=tenant_id=eq.42`, `public.notes=`),
    /// `--ttl` (`90`, `90s`, `15m`, `1h`, `7d`; nil: `defaultTTL`) and `--sub`.
    public init(tables: [String], ttl: String?, subject: String?) throws(JWTAuthenticatorError) {
        guard !tables.isEmpty else {
            throw JWTAuthenticatorError(.invalidTokenOption, "--table: give at least one TABLE=FILTER (e.g. --table public.orders=tenant_id=eq.42, or public.notes= for every row)")
        }
        var grants: [String: String] = [:]
        for text in tables {
            guard let equals = text.firstIndex(of: "=") else {
                throw JWTAuthenticatorError(.invalidTokenOption, "--table \(text): expected TABLE=FILTER (an empty FILTER grants every row: \(text)=)")
            }
            guard let table = TableName(parsing: String(text[..<equals])) else {
                throw JWTAuthenticatorError(.invalidTokenOption, "--table \(text): \(quoteForMessage(text[..<equals])) is not a table name (schema.table or table)")
            }
            let filter = String(text[text.index(after: equals)...])
            do {
                try Filter.checkSyntax(filter)
            } catch {
                throw JWTAuthenticatorError(.invalidTokenOption, "--table \(text): the filter does not parse: \(error.message)")
            }
            guard grants.updateValue(filter, forKey: table.description) == nil else {
                throw JWTAuthenticatorError(.invalidTokenOption, "--table \(table) is given twice")
            }
        }
        self.tables = grants
        self.ttl = try ttl.map(Self.parseTTL) ?? Self.defaultTTL
        if let subject, subject.isEmpty { throw JWTAuthenticatorError(.invalidTokenOption, "--sub is empty; leave it out for a token without sub") }
        self.subject = subject
    }

    /// Parses a ttl: a positive whole number with an optional unit `s` (default), `m`, `h` or `d`.
    public static func parseTTL(_ text: String) throws(JWTAuthenticatorError) -> Duration {
        let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86_400]
        var digits = Substring(text)
        var unit: Int64 = 1
        if let last = text.last, let factor = units[last] {
            unit = factor
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), let count = Int64(digits), count > 0,
              count <= Int64.max / unit / 1_000_000_000
        else {
            throw JWTAuthenticatorError(.invalidTokenOption, "--ttl \(text): expected a positive whole number with s, m, h or d (e.g. 90s, 15m, 1h, 7d)")
        }
        return .seconds(count * unit)
    }

    /// The claims for a token signed at `now`: `exp` is `now` (whole seconds) plus `ttl`.
    public func claims(now: Date = Date()) -> RealtimeTokenClaims {
        let expiresAt = Date(timeIntervalSince1970: now.timeIntervalSince1970.rounded(.down) + Double(ttl.components.seconds))
        return RealtimeTokenClaims(expiresAt: expiresAt, subject: subject, tables: tables)
    }
}
