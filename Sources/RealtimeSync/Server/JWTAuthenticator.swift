import Foundation
import JWTKit

/// A setup error of auth (not a client's bad token): what is wrong and which knob to change.
public struct JWTAuthenticatorError: Error, Sendable, CustomStringConvertible {
    /// Stable error codes, for programs.
    public enum Code: String, Sendable, Hashable {
        /// The secret is too short for HS256.
        case weakSecret = "AUTH_WEAK_SECRET"
        /// jwt-kit did not hand out the key.
        case keyUnavailable = "AUTH_KEY_UNAVAILABLE"
        /// A `realtime-sync token` option (`--table`, `--ttl`, `--sub`) is invalid.
        case invalidTokenOption = "AUTH_INVALID_TOKEN_OPTION"
    }
    /// The stable code.
    public var code: Code
    /// What went wrong and what to change.
    public var message: String
    /// Creates an error.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    /// The code and the message, e.g. `SERVICE_CAPTURE_FAILED: ...` (searchable in logs).
    public var description: String { "\(code.rawValue): \(message)" }
}

/// Why a token was refused. Logged by the server, never sent to the client (which only
/// gets `401 {"error":"unauthorized"}`).
public struct JWTRejection: Error, Sendable, Hashable, CustomStringConvertible {
    /// What was wrong with the token, e.g. `token expired at 2026-11-26T18:00:00Z`.
    public var reason: String
    /// Creates a rejection.
    public init(_ reason: String) { self.reason = reason }
    /// The reason.
    public var description: String { reason }
}

/// The claims of a realtime-sync token (PROTOCOL.md "Auth"):
/// `{"exp": 1893456000, "sub": "user-7", "rt": {"public.orders": "tenant_id=eq.42", "public.notes": ""}}`.
public struct RealtimeTokenClaims: JWTPayload, Sendable, Equatable {
    /// `exp`, required: the token is refused at and after this moment, and an open socket is
    /// closed with 1008 then.
    public var exp: ExpirationClaim
    /// `sub`, optional: who the token is for; logged with the session.
    public var sub: SubjectClaim?
    /// `nbf`, optional: the token is refused before this moment (RFC 7519 4.1.5).
    public var nbf: NotBeforeClaim?
    /// `rt`, required: `schema.table` (or `table` for `public`) to the mandatory row filter
    /// (`""`: every row). Tables not named here are `forbidden`.
    public var rt: [String: String]

    /// Creates claims.
    public init(expiresAt: Date, subject: String? = nil, tables: [String: String]) {
        self.exp = ExpirationClaim(value: expiresAt)
        self.sub = subject.map { SubjectClaim(value: $0) }
        self.rt = tables
    }

    /// Checks `exp` against the current time (jwt-kit's hook; the authenticator checks `exp`
    /// itself against its injected clock).
    public func verify(using algorithm: some JWTAlgorithm) async throws {
        try exp.verifyNotExpired()
    }
}

/// HS256 JWT auth for `RealtimeServer` (PROTOCOL.md "Auth"), built on jwt-kit.
///
/// The token comes in `Authorization: Bearer <jwt>` or, when that header is absent, in the
/// percent-encoded query parameter `access_token`. A token is accepted when its header says
/// `HS256`, its signature verifies with the secret, `exp` is in the future, and `rt` is an
/// object of table names to filters that parse. Anything else is refused with a reason that is
/// logged, never sent.
///
/// Verification is synchronous: the admission hook runs on the connection's event loop,
/// before the upgrade. jwt-kit's `JWTKeyCollection` is an actor with an async API, so the
/// HS256 algorithm is taken from one once, at `init`, and then used directly with jwt-kit's
/// parser (a constant-time MAC comparison).
public struct JWTAuthenticator: Sendable {
    /// The shortest secret accepted: 32 bytes, the size of the HS256 MAC (RFC 7518 §3.2).
    public static let minimumSecretBytes = 32

    private let algorithm: any JWTAlgorithm
    private let keys: JWTKeyCollection
    private let parser = DefaultJWTParser()
    /// The wall clock `exp` is checked against. Default `Date()`.
    public var now: @Sendable () -> Date

    /// Creates an authenticator for tokens signed (HS256) with `secret`. Throws when the
    /// secret is shorter than `minimumSecretBytes` (the error names the knob).
    public init(secret: String, now: @escaping @Sendable () -> Date = { Date() }) async throws(JWTAuthenticatorError) {
        let length = secret.utf8.count
        guard length >= Self.minimumSecretBytes else {
            throw JWTAuthenticatorError(.weakSecret, "the JWT secret is \(length) bytes; HS256 needs at least \(Self.minimumSecretBytes) (use a longer secret, e.g. from `openssl rand -hex 32`)")
        }
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        do {
            self.algorithm = try await keys.getKey()
        } catch {
            throw JWTAuthenticatorError(.keyUnavailable, "jwt-kit did not hand out the HS256 key: \(error)")
        }
        self.keys = keys
        self.now = now
    }

    // MARK: Tokens

    /// Signs `claims` into a compact HS256 JWT (what `realtime-sync token` prints).
    public func sign(_ claims: RealtimeTokenClaims) async throws -> String {
        var header = JWTHeader()
        header.alg = "HS256"
        header.typ = "JWT"
        return try await keys.sign(claims, header: header)
    }

    /// Verifies a compact JWT: header `alg` HS256, signature, `exp` in the future, `rt`
    /// table names and filter grammar. Returns the claims with `rt` keys normalised to
    /// `schema.table`.
    public func verify(_ token: String) throws(JWTRejection) -> RealtimeTokenClaims {
        let bytes = Array(token.utf8)
        let parts: (header: ArraySlice<UInt8>, payload: ArraySlice<UInt8>, signature: ArraySlice<UInt8>)
        let parsed: (header: JWTHeader, payload: RealtimeTokenClaims, signature: Data)
        do {
            parts = try parser.getTokenParts(bytes)
            parsed = try parser.parse(bytes, as: RealtimeTokenClaims.self)
        } catch {
            throw JWTRejection("malformed token: \(Self.describe(error))")
        }
        guard parsed.header.alg == "HS256" else {
            throw JWTRejection("token algorithm is \(parsed.header.alg.map { quoteForMessage($0) } ?? "missing"); only HS256 is accepted")
        }
        let signingInput = Array(parts.header) + [UInt8(ascii: ".")] + Array(parts.payload)
        let valid: Bool
        do {
            valid = try algorithm.verify(parsed.signature, signs: signingInput)
        } catch {
            throw JWTRejection("signature check failed: \(Self.describe(error))")
        }
        guard valid else { throw JWTRejection("bad signature (not signed with this server's secret)") }
        // A member named twice (`"rt"`, `"exp"`): the JSON decoder keeps one, the issuer's
        // library may have meant the other (RFC 7519 4: reject or take the last; issuers in
        // JavaScript and Python take the last). Refused, so the two cannot disagree.
        for (part, name) in [(parts.header, "header"), (parts.payload, "payload")] {
            guard let json = Self.base64URLDecoded(part) else { throw JWTRejection("malformed token: its \(name) is not base64url") }
            do {
                _ = try ClientJSONParser.parse(json)
            } catch {
                throw JWTRejection("malformed token: its \(name) is not strict JSON (\(error.message))")
            }
        }
        var claims = parsed.payload
        let current = now()
        do {
            try claims.exp.verifyNotExpired(currentDate: current)
        } catch {
            throw JWTRejection("token expired at \(claims.exp.value.formatted(.iso8601))")
        }
        if let notBefore = claims.nbf, current < notBefore.value {
            throw JWTRejection("token not valid before \(notBefore.value.formatted(.iso8601)) (nbf)")
        }
        var tables: [String: String] = [:]
        for (name, filter) in claims.rt {
            guard let table = TableName(parsing: name) else {
                throw JWTRejection("rt names \(quoteForMessage(name)), which is not a table name (schema.table)")
            }
            guard tables.updateValue(filter, forKey: table.description) == nil else {
                throw JWTRejection("rt names table \(table) twice")
            }
            do {
                try Filter.checkSyntax(filter)
            } catch {
                throw JWTRejection("rt filter for \(table) does not parse: \(error.message)")
            }
        }
        claims.rt = tables
        return claims
    }

    /// The bytes of base64url text without padding (RFC 7515 2), nil if it is not that.
    static func base64URLDecoded(_ text: ArraySlice<UInt8>) -> [UInt8]? {
        var standard = text.map { c -> UInt8 in
            switch c {
            case UInt8(ascii: "-"): UInt8(ascii: "+")
            case UInt8(ascii: "_"): UInt8(ascii: "/")
            default: c
            }
        }
        while standard.count % 4 != 0 { standard.append(UInt8(ascii: "=")) }
        return Data(base64Encoded: Data(standard)).map(Array.init)
    }

    // MARK: Admission

    /// The token of an upgrade request: `Authorization: Bearer <jwt>` (scheme
    /// case-insensitive), else the percent-decoded `access_token` query parameter. An
    /// `Authorization` header of another form is refused rather than skipped.
    public static func token(in request: UpgradeRequest) throws(JWTRejection) -> String {
        if let authorization = request.header("authorization") {
            let trimmed = authorization.trimmingCharacters(in: .whitespaces)
            let scheme = trimmed.prefix { $0 != " " }
            let token = trimmed.dropFirst(scheme.count).trimmingCharacters(in: .whitespaces)
            guard scheme.lowercased() == "bearer", !token.isEmpty else {
                throw JWTRejection("Authorization header is not 'Bearer <token>'")
            }
            return token
        }
        guard let raw = request.queryParameter("access_token") else {
            throw JWTRejection("no token (neither an Authorization: Bearer header nor an access_token query parameter)")
        }
        guard let token = raw.removingPercentEncoding else {
            throw JWTRejection("access_token is not valid percent-encoding")
        }
        guard !token.isEmpty else { throw JWTRejection("access_token is empty") }
        return token
    }

    /// Decides an upgrade: `.admit` with the token's `rt` as `TableAccess.restricted`, its
    /// `sub` and `exp`, or `.unauthorized` with the reason.
    public func decide(_ request: UpgradeRequest) -> UpgradeDecision {
        do throws(JWTRejection) {
            let claims = try verify(try Self.token(in: request))
            return .admit(.restricted(claims.rt), subject: claims.sub?.value, expiresAt: claims.exp.value)
        } catch {
            return .unauthorized(reason: error.reason)
        }
    }

    private static func describe(_ error: any Error) -> String {
        if let error = error as? JWTError, let reason = error.reason { return reason }
        return "\(error)"
    }
}
