import Foundation
import Logging
import RealtimeSync
import Synchronization
import Testing

/// Signs a token for the tests' secret.
func testToken(_ tables: [String: String], ttl: TimeInterval = 3600, subject: String? = "user-7") async throws -> String {
    let auth = try await JWTAuthenticator(secret: testJWTSecret)
    return try await auth.sign(RealtimeTokenClaims(expiresAt: Date().addingTimeInterval(ttl), subject: subject, tables: tables))
}

/// A WebSocket session opened with `token` in `Authorization: Bearer`.
func connectWebSocket(port: Int, token: String) async throws -> TestConnection {
    let connection = try await TestConnection.open(port: port)
    let response = try await connection.upgrade(extraHeaders: [("Authorization", "Bearer \(token)")])
    guard response.status == 101 else { throw TestClientError("upgrade answered \(response.status): \(response.body)") }
    return connection
}

@Suite("server: JWT auth")
struct ServerAuthTests {
    static let tenantCatalog = TableCatalog(["public.items": itemsColumns, "public.secret": itemsColumns])

    func withAuthServer(source: InMemoryChangeSource = InMemoryChangeSource(catalog: tenantCatalog), logger: Logger? = nil,
                        _ body: @Sendable (TestServer, InMemoryChangeSource) async throws -> Void) async throws {
        let auth = try await JWTAuthenticator(secret: testJWTSecret)
        try await withTestServer(source: source, logger: logger, configure: { $0.auth = auth }) { test in
            try await body(test, source)
        }
    }

    @Test("With auth on, a page from any origin may open /ws with a token (a token is needed anyway), unless allowedOrigins says otherwise")
    func originWithAuth() async throws {
        let token = try await testToken(["public.items": ""])
        try await withAuthServer { test, _ in
            let connection = try await TestConnection.open(port: test.port)
            let response = try await connection.upgrade(extraHeaders: [("Origin", "https://app.example.com"), ("Authorization", "Bearer \(token)")])
            #expect(response.status == 101)
            await connection.close()
        }
        let auth = try await JWTAuthenticator(secret: testJWTSecret)
        try await withTestServer(source: InMemoryChangeSource(catalog: Self.tenantCatalog), configure: {
            $0.auth = auth
            $0.allowedOrigins = ["https://app.example.com"]
        }) { test in
            for (origin, status) in [("https://app.example.com", 101), ("https://other.example", 403)] {
                let connection = try await TestConnection.open(port: test.port)
                let response = try await connection.upgrade(extraHeaders: [("Origin", origin), ("Authorization", "Bearer \(token)")])
                #expect(response.status == status, "\(origin): \(response.body)")
                await connection.close()
            }
            // An allowed origin (the server's own) with a bad token: the token is the reason, 401.
            let connection = try await TestConnection.open(port: test.port)
            let response = try await connection.upgrade(extraHeaders: [("Origin", "http://127.0.0.1"), ("Authorization", "Bearer not.a.jwt")])
            #expect(response.status == 401, "\(response.body)")
            await connection.close()
        }
    }

    @Test("401 unauthorized, no upgrade: missing token, bad signature, expired, malformed, unparsable rt filter; the reason is logged, never sent")
    func refusedUpgrades() async throws {
        let capture = LogCapture()
        let good = try await testToken(["public.items": ""])
        let otherSecret = try await JWTAuthenticator(secret: String(testJWTSecret.reversed()))
        let forged = try await otherSecret.sign(RealtimeTokenClaims(expiresAt: Date().addingTimeInterval(60), tables: ["public.items": ""]))
        let expired = try await testToken(["public.items": ""], ttl: -5)
        let badFilter = try await testToken(["public.items": "tenant_id=like.42"])
        try await withAuthServer(logger: capture.logger()) { test, _ in
            let cases: [(String, [(String, String)], String)] = [
                ("/ws", [], "no token"),
                ("/ws", [("Authorization", "Bearer \(forged)")], "bad signature"),
                ("/ws?access_token=\(forged)", [], "bad signature"),
                ("/ws", [("Authorization", "Bearer \(expired)")], "expired"),
                ("/ws", [("Authorization", "Bearer not.a.jwt")], "malformed"),
                ("/ws", [("Authorization", "Basic \(good)")], "not 'Bearer"),
                ("/ws", [("Authorization", "Bearer \(badFilter)")], "does not parse"),
            ]
            for (target, headers, reason) in cases {
                let connection = try await TestConnection.open(port: test.port)
                let response = try await connection.upgrade(path: target, extraHeaders: headers)
                #expect(response.status == 401, "\(reason)")
                #expect(response.body == #"{"error":"unauthorized"}"#, "\(reason)")
                #expect(response.headers["upgrade"] == nil)
                #expect(!response.body.contains(reason))
                await connection.close()
                let logged = capture.records.withLock { records in
                    records.contains { $0.message.contains("unauthorized") && "\($0.metadata["reason"] ?? "")".contains(reason) }
                }
                #expect(logged, "reason '\(reason)' not logged")
            }
            #expect(test.server.statistics.sessions == 0)
        }
    }

    @Test("A valid token is accepted in Authorization: Bearer and, percent-encoded, in access_token; sub is logged with the session")
    func acceptedTokens() async throws {
        let token = try await testToken(["public.items": ""], subject: "user-7")
        try await withAuthServer { test, source in
            let viaHeader = try await connectWebSocket(port: test.port, token: token)
            try await viaHeader.subscribe("h")
            let viaQuery = try await TestConnection.open(port: test.port)
            let encoded = token.replacingOccurrences(of: ".", with: "%2E")
            let response = try await viaQuery.upgrade(path: "/ws?access_token=\(encoded)")
            #expect(response.status == 101)
            try await viaQuery.subscribe("q")
            source.publish(itemInserts([1]))
            #expect(try await viaHeader.receiveJSON()["ids"] as? [String] == ["h"])
            #expect(try await viaQuery.receiveJSON()["ids"] as? [String] == ["q"])
            await viaHeader.close()
            await viaQuery.close()
        }
    }

    @Test("forbidden: a table not in rt, named in the message; the socket stays open")
    func forbiddenTable() async throws {
        let token = try await testToken(["public.items": "tenant_id=eq.42"])
        try await withAuthServer { test, _ in
            let socket = try await connectWebSocket(port: test.port, token: token)
            try await socket.sendText(#"{"type":"subscribe","id":"s","table":"secret"}"#)
            let answer = try await socket.receiveJSON()
            #expect(answer["type"] as? String == "error")
            #expect(answer["code"] as? String == "forbidden")
            #expect(answer["id"] as? String == "s")
            #expect((answer["message"] as? String)?.contains("public.secret") == true)
            try await socket.subscribe("mine")  // still open
            await socket.close()
        }
    }

    @Test("The mandatory filter hides other tenants' rows and is ANDed with the client's filter")
    func mandatoryFilter() async throws {
        let tenant42 = try await testToken(["public.items": "tenant_id=eq.42"])
        let tenant43 = try await testToken(["public.items": "tenant_id=eq.43"])
        try await withAuthServer { test, source in
            let a = try await connectWebSocket(port: test.port, token: tenant42)
            try await a.subscribe("all")
            try await a.subscribe("open", filter: "status=eq.open")
            let b = try await connectWebSocket(port: test.port, token: tenant43)
            try await b.subscribe("all")
            source.publish([
                insertEvent(["id": "1", "tenant_id": "43", "status": "open"], lsn: 0x1001),
                insertEvent(["id": "2", "tenant_id": "42", "status": "closed"], lsn: 0x1002),
                insertEvent(["id": "3", "tenant_id": "42", "status": "open"], lsn: 0x1003),
                insertEvent(["id": "4", "tenant_id": "7", "status": "open"], lsn: 0x1004),
                insertEvent(["id": "5", "tenant_id": "43", "status": "closed"], lsn: 0x1005),
            ])
            func row(_ message: [String: Any]) -> Int { (message["new"] as? [String: Any])?["id"] as? Int ?? -1 }
            let a1 = try await a.receiveJSON()
            let a2 = try await a.receiveJSON()
            #expect(row(a1) == 2 && a1["ids"] as? [String] == ["all"])
            #expect(row(a2) == 3 && a2["ids"] as? [String] == ["all", "open"])
            #expect(row(try await b.receiveJSON()) == 1)
            #expect(row(try await b.receiveJSON()) == 5)
            // Nothing else was queued for them: the next message each gets answers this subscribe.
            try await a.subscribe("later")
            try await b.subscribe("later")
            await a.close()
            await b.close()
        }
    }

    @Test("An open socket is closed with 1008 when its token expires; a socket closed before exp leaves no timer behind")
    func expiryClosesWith1008() async throws {
        let capture = LogCapture()
        try await withAuthServer(logger: capture.logger()) { test, source in
            let expiresAt = Date().addingTimeInterval(2)
            let shortLived = try await JWTAuthenticator(secret: testJWTSecret)
                .sign(RealtimeTokenClaims(expiresAt: expiresAt, tables: ["public.items": ""]))
            let early = try await connectWebSocket(port: test.port, token: shortLived)
            try await early.sendClose()
            #expect(try await early.receiveClose() == 1000)
            await early.close()

            let socket = try await connectWebSocket(port: test.port, token: shortLived)
            try await socket.subscribe("s")
            source.publish(itemInserts([1]))
            #expect(try await socket.receiveJSON()["type"] as? String == "change")
            #expect(try await socket.receiveClose(timeout: 15) == 1008)
            #expect(Date() >= expiresAt.addingTimeInterval(-0.01), "closed before exp")
            try await socket.sendClose(1008)
            #expect(try await socket.waitForEndOfStream())
            #expect(await eventually { test.server.statistics.sessions == 0 })
            #expect(test.server.statistics.closes[1008] == 1)
            // Only the socket that was open at exp was closed by its timer.
            let expiredLogs = capture.messages.filter { $0.contains("token expired") }
            #expect(expiredLogs.count == 1)
            #expect(test.server.statistics.subscriptions == 0)
        }
    }

    @Test("Expiry follows the authenticator's clock, looked at every tokenExpiryCheckInterval: a clock that jumps past exp (a host that was suspended) closes the socket with 1008 at the next look, not an hour of monotonic time later")
    func expiryFollowsTheAuthenticatorsClock() async throws {
        let start = Date(timeIntervalSince1970: 1_900_000_000)
        let clock = Mutex(start)
        let auth = try await JWTAuthenticator(secret: testJWTSecret, now: { clock.withLock { $0 } })
        let token = try await auth.sign(RealtimeTokenClaims(expiresAt: start.addingTimeInterval(3600), tables: ["public.items": ""]))
        try await withTestServer(source: InMemoryChangeSource(catalog: Self.tenantCatalog), configure: {
            $0.auth = auth
            $0.tokenExpiryCheckInterval = .milliseconds(200)
        }) { test in
            let socket = try await connectWebSocket(port: test.port, token: token)
            try await socket.subscribe("s")
            try await Task.sleep(for: .milliseconds(500))  // a few looks at the clock, before exp: still open
            try await socket.subscribe("still-open")
            clock.withLock { $0 = start.addingTimeInterval(3601) }
            #expect(try await socket.receiveClose(timeout: 10) == 1008)
            try await socket.sendClose(1008)
            #expect(await eventually { test.server.statistics.sessions == 0 })
        }
    }

    @Test("A schema change that breaks the token's own filter ends the subscription with forbidden (a new token is needed); one that breaks only the client's filter, with invalid_filter")
    func schemaChangeOfTheTokensColumn() async throws {
        let source = InMemoryChangeSource(catalog: Self.tenantCatalog)
        try await withAuthServer(source: source) { test, _ in
            let tenant = try await connectWebSocket(port: test.port, token: try await testToken(["public.items": "tenant_id=eq.42"]))
            try await tenant.subscribe("mine", filter: "status=eq.open")
            let open = try await connectWebSocket(port: test.port, token: try await testToken(["public.items": ""]))
            try await open.subscribe("ours", filter: "tenant_id=eq.42")
            // ALTER TABLE items RENAME tenant_id TO tenant.
            let altered = itemsRelation(renaming: "tenant_id", to: "tenant")
            source.setCatalog(TableCatalog(relations: [altered]))
            source.publish(insertEvent(["id": "2", "tenant": "42", "status": "open"], relation: altered, lsn: 0x1002))
            let ended = try await tenant.receiveJSON()
            #expect(ended["type"] as? String == "error" && ended["code"] as? String == "forbidden" && ended["id"] as? String == "mine", "\(ended)")
            #expect((ended["message"] as? String)?.contains("the token's filter for public.items names column 'tenant_id'") == true, "\(ended)")
            let own = try await open.receiveJSON()
            #expect(own["type"] as? String == "error" && own["code"] as? String == "invalid_filter" && own["id"] as? String == "ours", "\(own)")
            // A new subscription under the old token is refused the same way.
            try await tenant.sendText(#"{"type":"subscribe","id":"again","table":"items"}"#)
            let refused = try await tenant.receiveJSON()
            #expect(refused["code"] as? String == "forbidden" && refused["id"] as? String == "again", "\(refused)")
            await tenant.close()
            await open.close()
        }
    }

    @Test("Auth on is logged at start; auth off logs a warning and admits everyone to every table")
    func authModeAtStart() async throws {
        let on = LogCapture()
        try await withAuthServer(logger: on.logger()) { _, _ in }
        #expect(on.records.withLock { $0.contains { $0.level == .info && $0.message.contains("JWT auth is on") } })
        #expect(!on.messages.contains { $0.contains("JWT auth is off") })

        let off = LogCapture()
        let source = InMemoryChangeSource(catalog: Self.tenantCatalog)
        try await withTestServer(source: source, logger: off.logger()) { test in
            #expect(off.records.withLock { $0.contains { $0.level == .warning && $0.message.contains("JWT auth is off") } })
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("items")
            try await socket.subscribe("secret", table: "secret")
            source.publish([insertEvent(["id": "1", "tenant_id": "7"], lsn: 0x1001)])
            #expect(try await socket.receiveJSON()["ids"] as? [String] == ["items"])
            await socket.close()
        }
    }
}
