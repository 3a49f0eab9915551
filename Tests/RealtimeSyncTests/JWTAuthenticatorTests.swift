import Foundation
import JWTKit
import RealtimeSync
import Testing

/// A secret of the minimum length (32 bytes).
let testJWTSecret = "0123456789abcdef0123456789abcdef"

/// A compact JWT with the given header and payload JSON (any bytes the test chooses), with an
/// HS256 MAC by `secret` (jwt-kit's HMAC) unless `signature` is given.
func handMadeToken(header: String = #"{"alg":"HS256","typ":"JWT"}"#, payload: String, secret: String = testJWTSecret,
                   signature: String? = nil) async throws -> String {
    func base64URL(_ bytes: some Sequence<UInt8>) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }
    let input = base64URL(Array(header.utf8)) + "." + base64URL(Array(payload.utf8))
    if let signature { return input + "." + signature }
    let keys = JWTKeyCollection()
    await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
    return input + "." + base64URL(try await keys.getKey().sign(Array(input.utf8)))
}

@Suite("auth: JWTAuthenticator and TokenOptions")
struct JWTAuthenticatorTests {
    let future = Date().addingTimeInterval(3600)

    func authenticator(now: Date? = nil) async throws -> JWTAuthenticator {
        if let now { return try await JWTAuthenticator(secret: testJWTSecret, now: { now }) }
        return try await JWTAuthenticator(secret: testJWTSecret)
    }

    @Test("A token it signs verifies: sub, exp and rt come back, rt keys normalised to schema.table")
    func signAndVerify() async throws {
        let auth = try await authenticator()
        let token = try await auth.sign(RealtimeTokenClaims(expiresAt: future, subject: "user-7",
                                                            tables: ["orders": "tenant_id=eq.42", "public.notes": ""]))
        let claims = try auth.verify(token)
        #expect(claims.sub?.value == "user-7")
        #expect(claims.rt == ["public.orders": "tenant_id=eq.42", "public.notes": ""])
        #expect(abs(claims.exp.value.timeIntervalSince(future)) < 1)
        let decision = auth.decide(UpgradeRequest(target: "/ws", headers: [("Authorization", "Bearer \(token)")]))
        guard case .admit(let access, let subject, let expiresAt) = decision else {
            Issue.record("expected admit, got \(decision)")
            return
        }
        #expect(access == .restricted(["public.orders": "tenant_id=eq.42", "public.notes": ""]))
        #expect(subject == "user-7")
        #expect(expiresAt != nil)
    }

    @Test("Refused: bad signature, another secret, expired, not yet valid (nbf), alg none/HS512, malformed, missing exp or rt, rt filter that does not parse")
    func refusals() async throws {
        let now = Date(timeIntervalSince1970: 1_800_000_000)
        let auth = try await authenticator(now: now)
        let exp = Int(now.timeIntervalSince1970) + 60
        let good = #"{"exp":\#(exp),"rt":{"public.items":""}}"#

        func reason(_ token: String) -> String {
            do {
                _ = try auth.verify(token)
                return "accepted"
            } catch {
                return error.reason
            }
        }
        func signed(header: String = #"{"alg":"HS256","typ":"JWT"}"#, _ payload: String, secret: String = testJWTSecret,
                    signature: String? = nil) async throws -> String {
            reason(try await handMadeToken(header: header, payload: payload, secret: secret, signature: signature))
        }
        #expect(try await signed(good) == "accepted")
        var tampered = try await handMadeToken(payload: good)
        // Flip the first signature character (the last one partly holds padding bits a decoder ignores).
        let first = tampered.index(after: try #require(tampered.lastIndex(of: ".")))
        tampered.replaceSubrange(first...first, with: tampered[first] == "A" ? "B" : "A")
        #expect(reason(tampered).contains("bad signature"))
        #expect(try await signed(good, secret: String(testJWTSecret.reversed())).contains("bad signature"))
        #expect(try await signed(#"{"exp":\#(exp - 120),"rt":{}}"#).contains("expired"))
        #expect(try await signed(#"{"exp":\#(Int(now.timeIntervalSince1970)),"rt":{}}"#).contains("expired"))
        // nbf: refused before it, admitted at and after it.
        let nowSeconds = Int(now.timeIntervalSince1970)
        #expect(try await signed(#"{"exp":\#(exp),"nbf":\#(nowSeconds + 1),"rt":{}}"#).contains("not valid before"))
        #expect(try await signed(#"{"exp":\#(exp),"nbf":\#(nowSeconds),"rt":{}}"#) == "accepted")
        #expect(try await signed(#"{"exp":\#(exp),"nbf":\#(nowSeconds - 60),"rt":{}}"#) == "accepted")
        #expect(try await signed(header: #"{"alg":"none"}"#, good, signature: "").contains("only HS256"))
        #expect(try await signed(header: #"{"alg":"HS512"}"#, good).contains("only HS256"))
        #expect(reason("not-a-jwt").contains("malformed"))
        #expect(try await signed("[1,2]").contains("malformed"))
        #expect(try await signed(#"{"rt":{}}"#).contains("malformed"))
        #expect(try await signed(#"{"exp":\#(exp)}"#).contains("malformed"))
        #expect(try await signed(#"{"exp":\#(exp),"rt":{"public.items":5}}"#).contains("malformed"))
        #expect(try await signed(#"{"exp":\#(exp),"rt":{"public.items":"tenant_id=like.4"}}"#).contains("does not parse"))
        #expect(try await signed(#"{"exp":\#(exp),"rt":{"a.b.c":""}}"#).contains("not a table name"))
        #expect(try await signed(#"{"exp":\#(exp),"rt":{"items":"","public.items":"id=eq.1"}}"#).contains("twice"))
        // A member named twice, correctly signed: refused (the decoder kept the first, an
        // issuer in JavaScript or Python meant the last; the grant would differ).
        #expect(try await signed(#"{"exp":\#(exp),"rt":{"public.items":"id=eq.1","public.items":""}}"#).contains("duplicate member"))
        #expect(try await signed(#"{"exp":\#(exp - 120),"exp":\#(exp),"rt":{}}"#).contains("duplicate member"))
        #expect(try await signed(header: #"{"alg":"HS256","alg":"HS256","typ":"JWT"}"#, good).contains("header is not strict JSON"))
        // Text from an unverified token quoted in the reason (which is logged) cannot start a line.
        let injected = try await signed(header: #"{"alg":"HS256\n2026 critical FAKE"}"#, good)
        #expect(injected.contains("only HS256") && !injected.contains("\n") && injected.contains(#"HS256\n2026"#), "\(injected)")
    }

    @Test("The token: Bearer header (scheme in any case), else access_token percent-decoded; other Authorization forms refused")
    func tokenExtraction() throws {
        #expect(try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws", headers: [("Authorization", "Bearer abc.def.ghi")])) == "abc.def.ghi")
        #expect(try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws", headers: [("authorization", "bearer  abc")])) == "abc")
        #expect(try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws?x=1&access_token=a%2Eb%2Ec", headers: [])) == "a.b.c")
        // The header wins over the query parameter.
        #expect(try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws?access_token=q", headers: [("Authorization", "Bearer h")])) == "h")
        #expect(throws: JWTRejection.self) { try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws", headers: [])) }
        #expect(throws: JWTRejection.self) { try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws?access_token=", headers: [])) }
        #expect(throws: JWTRejection.self) { try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws?access_token=%zz", headers: [])) }
        #expect(throws: JWTRejection.self) {
            try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws?access_token=q", headers: [("Authorization", "Basic dTpw")]))
        }
        #expect(throws: JWTRejection.self) { try JWTAuthenticator.token(in: UpgradeRequest(target: "/ws", headers: [("Authorization", "Bearer ")])) }
    }

    @Test("A secret shorter than 32 bytes is refused, naming the minimum")
    func shortSecret() async {
        do {
            _ = try await JWTAuthenticator(secret: "short")
            Issue.record("a 5-byte secret was accepted")
        } catch {
            #expect(error.message.contains("5 bytes"))
            #expect(error.message.contains("at least 32"))
        }
    }

    @Test("TokenOptions: --table TABLE=FILTER, --ttl with s/m/h/d, --sub; bad input names the flag")
    func tokenOptions() throws {
        let options = try TokenOptions(tables: ["public.orders=tenant_id=eq.42", "notes="], ttl: "1h", subject: "user-7")
        #expect(options.tables == ["public.orders": "tenant_id=eq.42", "public.notes": ""])
        #expect(options.ttl == .seconds(3600))
        #expect(try TokenOptions(tables: ["a="], ttl: nil, subject: nil).ttl == TokenOptions.defaultTTL)
        #expect(try TokenOptions.parseTTL("90") == .seconds(90))
        #expect(try TokenOptions.parseTTL("90s") == .seconds(90))
        #expect(try TokenOptions.parseTTL("15m") == .seconds(900))
        #expect(try TokenOptions.parseTTL("2d") == .seconds(172_800))
        for bad in ["", "h", "0s", "-1h", "1.5h", "1w", "1 h", "99999999999999999d"] {
            #expect(throws: JWTAuthenticatorError.self, "\(bad)") { try TokenOptions.parseTTL(bad) }
            do { _ = try TokenOptions.parseTTL(bad) } catch { #expect(error.message.hasPrefix("--ttl")) }
        }
        func message(_ tables: [String], ttl: String? = nil, sub: String? = nil) -> String {
            do {
                _ = try TokenOptions(tables: tables, ttl: ttl, subject: sub)
                return "accepted"
            } catch {
                return error.message
            }
        }
        #expect(message([]).hasPrefix("--table"))
        #expect(message(["public.orders"]).hasPrefix("--table public.orders: expected TABLE=FILTER"))
        #expect(message(["a.b.c=x=eq.1"]).hasPrefix("--table"))
        #expect(message(["orders=tenant_id=like.1"]).contains("does not parse"))
        #expect(message(["orders=", "public.orders=id=eq.1"]).contains("twice"))
        #expect(message(["orders="], sub: "").hasPrefix("--sub"))
        let now = Date(timeIntervalSince1970: 1_800_000_000.7)
        let claims = options.claims(now: now)
        #expect(claims.exp.value == Date(timeIntervalSince1970: 1_800_003_600))
        #expect(claims.sub?.value == "user-7")
    }

    @Test("token round trip: what the token command builds and signs, the server's authenticator admits")
    func tokenCommandRoundTrip() async throws {
        let options = try TokenOptions(tables: ["public.orders=tenant_id=eq.42", "public.notes="], ttl: "1h", subject: "user-7")
        let signer = try await JWTAuthenticator(secret: testJWTSecret)
        let token = try await signer.sign(options.claims())
        let server = try await JWTAuthenticator(secret: testJWTSecret)
        let decision = server.decide(UpgradeRequest(target: "/ws?access_token=\(token)", headers: []))
        guard case .admit(let access, let subject, let expiresAt) = decision else {
            Issue.record("expected admit, got \(decision)")
            return
        }
        #expect(access == .restricted(["public.orders": "tenant_id=eq.42", "public.notes": ""]))
        #expect(subject == "user-7")
        let remaining = try #require(expiresAt).timeIntervalSinceNow
        #expect(remaining > 3590 && remaining <= 3600)
        // Another secret does not admit it.
        let other = try await JWTAuthenticator(secret: String(testJWTSecret.reversed()))
        guard case .unauthorized = other.decide(UpgradeRequest(target: "/ws?access_token=\(token)", headers: [])) else {
            Issue.record("a token signed with another secret was admitted")
            return
        }
    }

    @Test("Filter.checkSyntax: grammar only, any column name; compile-time checks stay with the table")
    func filterSyntax() throws {
        try Filter.checkSyntax("")
        try Filter.checkSyntax("tenant_id=eq.42&status=in.(a,\"b,c\")&x=is.null")
        #expect(throws: ProtocolError.self) { try Filter.checkSyntax("tenant_id") }
        #expect(throws: ProtocolError.self) { try Filter.checkSyntax("tenant_id=like.4") }
        #expect(throws: ProtocolError.self) { try Filter.checkSyntax("a=eq.1&") }
        #expect(throws: ProtocolError.self) { try Filter.checkSyntax("a=in.(1") }
        #expect(throws: ProtocolError.self) { try Filter.checkSyntax("a=is.maybe") }
    }
}
