import Foundation
import Prometheus
@testable import RealtimeSync
import Scheduler
import Logging
import Synchronization
import Testing

@Suite("server: HTTP endpoints")
struct ServerHTTPTests {
    @Test("GET /healthz answers 200 ok")
    func healthz() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let connection = try await TestConnection.open(port: test.port)
            let response = try await connection.request("GET", "/healthz")
            await connection.close()
            #expect(response.status == 200)
            #expect(response.body == "ok\n")
        }
    }

    @Test("A first request that cannot be parsed gets 400 and the connection closed at once, not after firstRequestTimeout")
    func unparsableRequest() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.firstRequestTimeout = .seconds(30) }) { test in
            for garbage in ["GARBAGE\r\n\r\n", "GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "\u{01}\u{02} binary\r\n\r\n"] {
                let connection = try await TestConnection.open(port: test.port)
                try await connection.send(Array(garbage.utf8))
                let answer = try await connection.readToEnd(timeout: 10)
                await connection.close()
                let text = answer.map { String(decoding: $0, as: UTF8.self) }
                #expect(text?.hasPrefix("HTTP/1.1 400 Bad Request\r\n") == true, "\(garbage.debugDescription): \(text ?? "still open after 10 s")")
            }
            // The server still answers.
            let connection = try await TestConnection.open(port: test.port)
            #expect(try await connection.request("GET", "/healthz").status == 200)
            await connection.close()
        }
    }

    @Test("No connection outlives firstRequestTimeout idle: one silent after its first answer, and an upgrade request with a body (which NIO refuses) are closed")
    func idleAfterFirstRequest() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.firstRequestTimeout = .milliseconds(500) }) { test in
            let kept = try await TestConnection.open(port: test.port)
            #expect(try await kept.request("GET", "/healthz").status == 200)
            // Kept alive, then silent.
            #expect(try await kept.waitForEndOfStream(timeout: 5), "an idle kept-alive connection was not closed")
            await kept.close()
            let upgrade = try await TestConnection.open(port: test.port)
            try await upgrade.send(Array(("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 1000000000\r\n\r\nx").utf8))
            #expect(try await upgrade.waitForEndOfStream(timeout: 5), "an upgrade request with a body held its connection")
            await upgrade.close()
            // The server still answers.
            let connection = try await TestConnection.open(port: test.port)
            #expect(try await connection.request("GET", "/healthz").status == 200)
            await connection.close()
        }
    }

    @Test("An upgrade without a Host header, or with a body, is not upgraded: 400, and the one with a body has its connection closed")
    func upgradeWithoutHostOrWithBody() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.firstRequestTimeout = .seconds(30) }) { test in
            let handshake = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            let noHost = try await TestConnection.open(port: test.port)
            try await noHost.send(Array(("GET /ws HTTP/1.1\r\n" + handshake + "\r\n").utf8))
            let noHostAnswer = try await noHost.read(until: "\r\n\r\n", timeout: 10)
            await noHost.close()
            #expect(noHostAnswer.hasPrefix("HTTP/1.1 400 "), "\(noHostAnswer)")
            let body = try await TestConnection.open(port: test.port)
            try await body.send(Array(("GET /ws HTTP/1.1\r\nHost: x\r\n" + handshake + "Content-Length: 5\r\n\r\nhello").utf8))
            let bodyAnswer = try await body.readToEnd(timeout: 10).map { String(decoding: $0, as: UTF8.self) }
            await body.close()
            #expect(bodyAnswer?.hasPrefix("HTTP/1.1 400 ") == true, "\(bodyAnswer ?? "still open after 10 s")")
            #expect(bodyAnswer?.contains("websocket_upgrade_required") == true)
            #expect(test.server.statistics.sessions == 0)
        }
    }

    @Test("Keep-alive follows the request's HTTP version: HTTP/1.0 closes after the answer unless it asks to keep alive; HTTP/1.1 `Connection: Close` closes")
    func keepAliveByVersion() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.firstRequestTimeout = .seconds(30) }) { test in
            func answer(_ request: String) async throws -> String? {
                let connection = try await TestConnection.open(port: test.port)
                defer { Task { await connection.close() } }
                try await connection.send(Array(request.utf8))
                return try await connection.readToEnd(timeout: 3).map { String(decoding: $0, as: UTF8.self) }
            }
            let old = try await answer("GET /healthz HTTP/1.0\r\n\r\n")
            #expect(old?.hasPrefix("HTTP/1.1 200 ") == true && old?.hasSuffix("ok\n") == true, "\(old ?? "still open after 3 s")")
            let capitalised = try await answer("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n")
            #expect(capitalised?.hasPrefix("HTTP/1.1 200 ") == true, "\(capitalised ?? "still open after 3 s")")
            // Controls: asked to keep alive, they stay open.
            #expect(try await answer("GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n") == nil)
            #expect(try await answer("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == nil)
        }
    }

    @Test("A refused upgrade closes its connection after the answer, and a connection whose answer closed it is closed within a second even while the client keeps it open and keeps sending")
    func closedAfterTheLastAnswer() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.firstRequestTimeout = .seconds(30) }) { test in
            // NIO's decoder took it for an upgrade and parses nothing more on this connection.
            let refused = try await TestConnection.open(port: test.port)
            #expect(try await refused.upgrade(version: "8").status == 426)
            #expect(try await refused.waitForEndOfStream(timeout: 5), "a refused upgrade's connection stayed open")
            #expect(await eventually(5) { test.server.statistics.connections == 0 }, "\(test.server.statistics.connections) connections open")
            await refused.close()
            // The client neither closes nor stops sending after a Connection: close answer.
            let chatty = try await TestConnection.open(port: test.port)
            #expect(try await chatty.request("GET", "/healthz", headers: [("Connection", "close")]).status == 200)
            let sending = Task {
                for _ in 0..<40 {
                    try? await chatty.send(Array("junk".utf8))
                    try? await Task.sleep(for: .milliseconds(50))
                }
            }
            #expect(await eventually(5) { test.server.statistics.connections == 0 }, "\(test.server.statistics.connections) connections open")
            sending.cancel()
            await chatty.close()
        }
    }

    @Test("A request that ends its connection (Connection: close, HTTP/1.0) with more bytes behind it in the same write is answered (200), once, and the connection closed; the bytes are dropped")
    func bytesAfterAClosingRequest() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.firstRequestTimeout = .seconds(30) }) { test in
            for request in ["GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                            "GET /healthz HTTP/1.0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n",
                            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\nG"] {
                let connection = try await TestConnection.open(port: test.port)
                try await connection.send(Array(request.utf8))
                let answer = try await connection.readToEnd(timeout: 10).map { String(decoding: $0, as: UTF8.self) }
                await connection.close()
                let text = try #require(answer, "still open after 10 s: \(request.debugDescription)")
                #expect(text.hasPrefix("HTTP/1.1 200 ") && text.hasSuffix("ok\n"), "\(request.debugDescription): \(text)")
                #expect(text.components(separatedBy: "HTTP/1.1 ").count == 2, "one response for \(request.debugDescription), got: \(text)")
            }
        }
    }

    @Test("A request whose chunked body cannot be parsed gets one 400 and its connection closed, also as a later request")
    func badChunkedBody() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.firstRequestTimeout = .seconds(30) }) { test in
            let bad = "GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"
            for first in [true, false] {
                let connection = try await TestConnection.open(port: test.port)
                if !first { #expect(try await connection.request("GET", "/healthz").status == 200) }
                try await connection.send(Array(bad.utf8))
                let answer = try await connection.readToEnd(timeout: 10).map { String(decoding: $0, as: UTF8.self) }
                await connection.close()
                let text = try #require(answer, "still open after 10 s")
                #expect(text.hasPrefix("HTTP/1.1 400 "), "\(text)")
                #expect(text.components(separatedBy: "HTTP/1.1 ").count == 2, "one response, got: \(text)")
            }
        }
    }

    /// The listening socket's accept-queue limit, as `ss -ltn` reports it (Send-Q of a LISTEN socket).
    private func listenBacklog(port: Int) throws -> Int? {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/ss")
        process.arguments = ["-ltnH", "sport = :\(port)"]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        // State Recv-Q Send-Q Local Peer
        let fields = output.split(whereSeparator: \.isWhitespace)
        return fields.count >= 3 ? Int(fields[2]) : nil
    }

    @Test("HEAD /healthz, /readyz, /metrics and / answer as GET does, without a body (load balancers probe with HEAD)")
    func headAnswersLikeGet() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            for path in ["/healthz", "/readyz", "/metrics", "/"] {
                let connection = try await TestConnection.open(port: test.port)
                try await connection.send(Array("HEAD \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
                let answer = String(decoding: try #require(try await connection.readToEnd(timeout: 10)), as: UTF8.self)
                #expect(answer.hasPrefix("HTTP/1.1 200 ") && answer.hasSuffix("\r\n\r\n"), "\(path): \(answer)")
                await connection.close()
                // The Content-Length GET's body has (RFC 9110), never 0 for a page with a body.
                if path != "/metrics" {
                    let get = try await TestConnection.open(port: test.port)
                    let body = try await get.request("GET", path).body
                    await get.close()
                    #expect(answer.lowercased().contains("content-length: \(body.utf8.count)\r\n"), "\(path): \(answer)")
                }
            }
            source.setConnected(false)
            let connection = try await TestConnection.open(port: test.port)
            try await connection.send(Array("HEAD /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8))
            let answer = String(decoding: try #require(try await connection.readToEnd(timeout: 10)), as: UTF8.self)
            #expect(answer.hasPrefix("HTTP/1.1 503 ") && answer.hasSuffix("\r\n\r\n"), "\(answer)")
            await connection.close()
        }
    }

    @Test("at maxConnections open client connections, one more is answered 503 too_many_connections with Retry-After and closed without reading its request (clients cannot take every file the process needs); counted, and a place freed is taken again")
    func maxConnectionsRefusesTheNextOne() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.maxConnections = 2 }) { test in
            let first = try await TestConnection.open(port: test.port)
            let second = try await connectWebSocket(port: test.port)
            #expect(await eventually(10) { test.server.statistics.connections == 2 })
            let refused = try await TestConnection.open(port: test.port)
            // A request sent at once still gets the 503, not a reset.
            try await refused.send(Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
            let answer = try #require(try await refused.readToEnd(timeout: 10), "the refused connection was left open")
            let text = String(decoding: answer, as: UTF8.self)
            #expect(text.hasPrefix("HTTP/1.1 503 ") && text.lowercased().contains("retry-after: 1") && text.hasSuffix(#"{"error":"too_many_connections"}"#), "\(text)")
            #expect(test.server.statistics.connectionsRefused == 1)
            // The WebSocket still works; a closed connection's place is free again.
            #expect(try await second.subscribe("s", filter: nil) == test.server.statistics.fanoutCursor.description)
            await first.close()
            #expect(await eventually(10) { test.server.statistics.connections == 1 }, "the closed ones uncounted")
            let again = try await TestConnection.open(port: test.port)
            let exposition = try await again.request("GET", "/metrics").body
            #expect(exposition.contains("realtime_connections_refused_total 1") && exposition.contains("realtime_connections 2"), "\(exposition)")
            await again.close()
            await second.close()
            await refused.close()
        }
        #expect(throws: RealtimeServerError.self) {
            var configuration = RealtimeServerConfiguration()
            configuration.maxConnections = 0
            try configuration.validate()
        }
        #expect(RealtimeServer.defaultConnectionLimit() >= 1)
    }

    @Test("the listener's accept queue is listenBacklog (default 4,096, capped by net.core.somaxconn), not Hummingbird's 256")
    func listenBacklogIsApplied() async throws {
        let somaxconn = Int(try String(contentsOfFile: "/proc/sys/net/core/somaxconn", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)) ?? 4_096
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let backlog = try listenBacklog(port: test.port)
            #expect(backlog == min(4_096, somaxconn))
        }
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { $0.listenBacklog = 77 }) { test in
            let backlog = try listenBacklog(port: test.port)
            #expect(backlog == min(77, somaxconn))
        }
    }

    // Audit, session 12: with auth off any web page could open /ws through a visitor's browser
    // (browsers send no token but do reach localhost and the intranet) and read every change.
    @Test("With auth off, a page from another origin cannot open /ws (403 origin_not_allowed); the server's own origin, a client sending no Origin, and allowedOrigins can")
    func originCheck() async throws {
        @Sendable func status(_ port: Int, origin: String?, host: String = "127.0.0.1") async throws -> (Int, String) {
            let connection = try await TestConnection.open(port: port)
            let response = try await connection.upgrade(extraHeaders: [("Host", host)] + (origin.map { [("Origin", $0)] } ?? []))
            await connection.close()
            return (response.status, response.body)
        }
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            // The test client sends `Host: 127.0.0.1`.
            let evil = try await status(test.port, origin: "http://evil.example")
            #expect(evil.0 == 403 && evil.1 == #"{"error":"origin_not_allowed"}"#, "\(evil)")
            let r1 = try await status(test.port, origin: "null").0
            #expect(r1 == 403, "a sandboxed or file: page")
            let r2 = try await status(test.port, origin: "http://127.0.0.1").0
            #expect(r2 == 101, "the live page's own origin")
            let r3 = try await status(test.port, origin: nil).0
            #expect(r3 == 101, "not a browser")
            let local = try await status(test.port, origin: "http://localhost:8080", host: "localhost:8080").0
            #expect(local == 101, "localhost is the server's own origin")
            // A name its owner can point at this server (DNS rebinding): their page looks same-origin.
            let rebound = try await status(test.port, origin: "http://evil.example:8080", host: "evil.example:8080").0
            #expect(rebound == 403, "a page under a DNS name is not trusted as same-origin while auth is off")
            let signed = try await status(test.port, origin: "http://1.2.3.+4", host: "1.2.3.+4").0
            #expect(signed == 403, "a name that merely parses as numbers with a sign is not an address")
            // Two Origin (or Host) headers: whichever one a check read decided it. Refused.
            for headers in [[("Host", "127.0.0.1"), ("Origin", "http://127.0.0.1"), ("Origin", "http://evil.example")],
                            [("Host", "127.0.0.1"), ("Host", "evil.example"), ("Origin", "http://127.0.0.1")]] {
                let connection = try await TestConnection.open(port: test.port)
                let twice = try await connection.upgrade(extraHeaders: headers)
                await connection.close()
                #expect(twice.status == 403, "\(headers): \(twice.status)")
            }
        }
        try await withTestServer(source: source, configure: { $0.allowedOrigins = ["https://app.example.com"] }) { test in
            let r4 = try await status(test.port, origin: "https://app.example.com").0
            #expect(r4 == 101)
            let r5 = try await status(test.port, origin: "HTTPS://App.Example.COM").0
            #expect(r5 == 101, "origins compare case-insensitively")
            let r6 = try await status(test.port, origin: "https://app.example.com.evil.example").0
            #expect(r6 == 403)
        }
        try await withTestServer(source: source, configure: { $0.allowedOrigins = ["*"] }) { test in
            let r7 = try await status(test.port, origin: "http://evil.example").0
            #expect(r7 == 101)
        }
        for bad in [["https://app.example.com/"], ["https://app.example.com:443"], ["https://app.example.com?x"], []] {
            var configuration = RealtimeServerConfiguration()
            configuration.allowedOrigins = bad
            #expect(throws: RealtimeServerError.self, "\(bad)") { try configuration.validate() }
        }
    }

    @Test("GET /readyz: 200 while the source is connected, 503 with a reason when not")
    func readyz() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let connection = try await TestConnection.open(port: test.port)
            let ready = try await connection.request("GET", "/readyz")
            #expect(ready.status == 200)
            #expect(ready.body == #"{"ready":true}"#)
            source.setConnected(false)
            let notReady = try await connection.request("GET", "/readyz")
            #expect(notReady.status == 503)
            #expect(notReady.headers["content-type"] == "application/json")
            #expect(notReady.body == #"{"ready":false,"reason":"change_stream_disconnected"}"#)
            await connection.close()
        }
    }

    @Test("GET /ws without an upgrade answers 400 websocket_upgrade_required")
    func wsWithoutUpgrade() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let connection = try await TestConnection.open(port: test.port)
            let response = try await connection.request("GET", "/ws")
            #expect(response.status == 400)
            #expect(response.body == #"{"error":"websocket_upgrade_required"}"#)
            await connection.close()
        }
    }

    /// Malformed upgrades of /ws: what is wrong, the method, the headers.
    static let malformedUpgrades: [(String, String, [(String, String)])] = [
        ("no Sec-WebSocket-Key", "GET", [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]),
        ("no Connection: upgrade", "GET", [("Upgrade", "websocket"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]),
        ("an upgrade to another protocol", "GET", [("Upgrade", "h2c"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]),
        ("a key too short", "GET", [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "abc"), ("Sec-WebSocket-Version", "13")]),
        ("a key that is not base64", "GET", [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "!!!!!!!!!!!!!!!!!!!!!!=="), ("Sec-WebSocket-Version", "13")]),
        ("two keys", "GET", [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                             ("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA=="), ("Sec-WebSocket-Version", "13")]),
        ("two versions", "GET", [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                 ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Version", "13")]),
    ]

    @Test("A malformed upgrade of /ws answers 400 websocket_upgrade_required (not a redirect a client would follow forever)", arguments: Self.malformedUpgrades)
    func malformedUpgrade(_ case: (String, String, [(String, String)])) async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let connection = try await TestConnection.open(port: test.port)
            let response = try await connection.request(`case`.1, "/ws", headers: `case`.2)
            #expect(response.status == 400, "\(`case`.0)")
            #expect(response.body == #"{"error":"websocket_upgrade_required"}"#, "\(`case`.0)")
            await connection.close()
        }
    }

    @Test("The WebSocket lives at /ws only: an upgrade of /ws/ or //ws answers 404, not 400 or 101")
    func wsPathExact() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            for path in ["/ws/", "//ws", "/ws//"] {
                let connection = try await TestConnection.open(port: test.port)
                let response = try await connection.request("GET", path, headers: [
                    ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")])
                #expect(response.status == 404, "\(path)")
                await connection.close()
            }
        }
    }

    @Test("A client cannot pass for a refused upgrade: its own X-Realtime-Refused-Upgrade on a plain GET /ws gets 400, not the refusal's 401 or 403")
    func refusalMarkNotForgeable() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { configuration in
            configuration.admission = { _ in .unauthorized(reason: "no token") }
            configuration.allowedOrigins = ["https://app.example"]
        }) { test in
            let connection = try await TestConnection.open(port: test.port)
            // A first request passes the gate, which drops the header (even one with the mark).
            let first = try await connection.request("GET", "/ws", headers: [("X-Realtime-Refused-Upgrade", RealtimeServer.refusedUpgradeMark)])
            #expect(first.status == 400)
            #expect(first.body == #"{"error":"websocket_upgrade_required"}"#)
            // Later requests of the connection do not pass the gate; they lack the mark.
            let later = try await connection.request("GET", "/ws", headers: [("X-Realtime-Refused-Upgrade", "1")])
            #expect(later.status == 400)
            #expect(later.body == #"{"error":"websocket_upgrade_required"}"#)
            let origin = try await connection.request("GET", "/ws", headers: [("X-Realtime-Refused-Upgrade", "1"), ("Origin", "https://evil.example")])
            #expect(origin.status == 400)
            await connection.close()
        }
    }

    @Test("An HTTP/1.0 upgrade of /ws is not upgraded (RFC 6455 asks for HTTP/1.1 or later)")
    func http10Upgrade() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let connection = try await TestConnection.open(port: test.port)
            try await connection.send(Array("GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".utf8))
            let text = try await connection.read(until: "websocket_upgrade_required", timeout: 10)
            #expect(!text.contains(" 101 ") && text.contains(" 400 ") && text.contains("websocket_upgrade_required"), "\(text)")
            await connection.close()
        }
    }

    @Test("GET /ws with Sec-WebSocket-Version 8 answers 426 with Sec-WebSocket-Version: 13")
    func wsWrongVersion() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let connection = try await TestConnection.open(port: test.port)
            let response = try await connection.upgrade(version: "8")
            #expect(response.status == 426)
            #expect(response.headers["sec-websocket-version"] == "13")
            await connection.close()
        }
    }

    @Test("GET /ws with a valid upgrade answers 101 with the RFC 6455 accept value")
    func wsUpgrade() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let connection = try await TestConnection.open(port: test.port)
            // RFC 6455 section 1.3's example key and accept value.
            let response = try await connection.upgrade(key: "dGhlIHNhbXBsZSBub25jZQ==")
            #expect(response.status == 101)
            #expect(response.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            #expect(response.headers["upgrade"]?.lowercased() == "websocket")
            #expect(await eventually { test.server.statistics.sessions == 1 })
            try await connection.sendClose()
            #expect(try await connection.receiveClose() == 1000)
            #expect(await eventually { test.server.statistics.sessions == 0 })
        }
    }

    @Test("The admission hook refusing an upgrade answers 401 unauthorized without upgrading")
    func wsUnauthorized() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { configuration in
            configuration.admission = { request in
                request.header("authorization") == "Bearer good" ? .admit(.unrestricted, subject: "u1") : .unauthorized(reason: "no token")
            }
        }) { test in
            let refused = try await TestConnection.open(port: test.port)
            let response = try await refused.upgrade()
            #expect(response.status == 401)
            #expect(response.body == #"{"error":"unauthorized"}"#)
            #expect(response.headers["upgrade"] == nil)
            await refused.close()
            let admitted = try await TestConnection.open(port: test.port)
            #expect(try await admitted.upgrade(extraHeaders: [("Authorization", "Bearer good")]).status == 101)
            await admitted.close()
        }
    }

    @Test("An admitted upgrade asks the admission hook (or checks the token) once")
    func admissionCheckedOnce() async throws {
        let calls = Atomic<Int>(0)
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog), configure: { configuration in
            configuration.admission = { _ in
                calls.add(1, ordering: .relaxed)
                return .admit(.unrestricted, subject: "u1")
            }
        }) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("s")
            #expect(calls.load(ordering: .relaxed) == 1)
            await socket.close()
        }
    }

    @Test("GET / serves the page, not sniffed, cached, framed or referred on; unknown paths 404")
    func indexPage() async throws {
        try await withTestServer(source: InMemoryChangeSource(catalog: serverCatalog)) { test in
            let connection = try await TestConnection.open(port: test.port)
            let page = try await connection.request("GET", "/")
            #expect(page.status == 200)
            #expect(page.headers["content-type"]?.hasPrefix("text/html") == true)
            #expect(page.headers["x-content-type-options"] == "nosniff")
            #expect(page.headers["cache-control"] == "no-store")
            #expect(page.headers["x-frame-options"] == "DENY")
            #expect(page.headers["referrer-policy"] == "no-referrer")
            #expect(page.body.contains("/ws"))
            let missing = try await connection.request("GET", "/nope")
            #expect(missing.status == 404)
            await connection.close()
        }
    }

    @Test("The service's jobs have series of their own on /metrics (job_name=<name>) beside the scheduler's shared ones, in one Prometheus family each; no series has a label `job`, which Prometheus sets to the scrape job (and renames ours to exported_job)")
    func jobSeriesOnPrometheus() async throws {
        let registry = PrometheusCollectorRegistry()
        let clock = ManualClock()
        let scheduler = JobScheduler(clock: clock, logger: Logger(label: "test"),
                                     configuration: .init(metricsLabel: "t", metricsFactory: RealtimeService.makeMetricsFactory(registry: registry)))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await scheduler.run() }
            _ = try scheduler.schedule(.every(.seconds(1)), options: .init(name: "slot lag", ownMetrics: true)) { _ in }
            _ = try scheduler.schedule(.every(.seconds(1))) { _ in }
            await scheduler.advance(by: .seconds(1))
            await scheduler.shutdown(deadline: .zero)
            try await group.waitForAll()
        }
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        let lines = String(decoding: buffer, as: UTF8.self).split(separator: "\n")
        #expect(lines.contains { $0.hasPrefix("scheduler_job_runs{") && $0.contains(#"job_name="slot lag""#) && $0.hasSuffix(" 1") }, "\(lines)")
        #expect(!lines.contains { $0.contains("{job=") || $0.contains(",job=") }, "\(lines)")
        #expect(lines.contains { $0 == #"scheduler_job_runs{scheduler="t"} 1"# }, "\(lines)")
        #expect(lines.filter { $0.hasPrefix("# TYPE scheduler_job_runs ") }.count == 1, "\(lines)")
    }

    @Test("The metrics factory's timer buckets resolve sub-millisecond values (the scheduler's 0.5 ms bar, the pool's waits): 300 µs lands at or below 0.5 ms, not in a first bucket of 5 ms")
    func timerBucketsResolveMicroseconds() {
        let registry = PrometheusCollectorRegistry()
        let factory = RealtimeService.makeMetricsFactory(registry: registry)
        let timer = factory.makeTimer(label: "scheduler.job.lateness", dimensions: [("scheduler", "t")])
        timer.recordNanoseconds(300_000)
        var buffer: [UInt8] = []
        registry.emit(into: &buffer)
        let text = String(decoding: buffer, as: UTF8.self)
        let bucket = text.split(separator: "\n").first { $0.hasPrefix("scheduler_job_lateness_bucket") && $0.contains(#"le="0.0005""#) }
        #expect(bucket?.hasSuffix(" 1") == true, "\(text)")
        let below = text.split(separator: "\n").first { $0.hasPrefix("scheduler_job_lateness_bucket") && $0.contains(#"le="0.00025""#) }
        #expect(below?.hasSuffix(" 0") == true, "\(text)")
    }

    @Test("GET /metrics exposes sessions, subscriptions, queued bytes, delivered messages and closes by code")
    func metrics() async throws {
        let source = InMemoryChangeSource(catalog: serverCatalog)
        try await withTestServer(source: source) { test in
            let socket = try await connectWebSocket(port: test.port)
            try await socket.subscribe("s1")
            source.publish(itemInserts([1]))
            #expect(try await socket.receiveJSON()["type"] as? String == "change")
            let http = try await TestConnection.open(port: test.port)
            let live = try await http.request("GET", "/metrics")
            #expect(live.status == 200)
            #expect(live.headers["content-type"]?.hasPrefix("text/plain") == true)
            #expect(live.body.contains("realtime_sessions 1"))
            #expect(live.body.contains("realtime_subscriptions 1"))
            #expect(live.body.contains("realtime_queued_bytes 0"))
            #expect(live.body.contains("realtime_delivered_messages_total 2"))
            try await socket.sendClose()
            #expect(try await socket.receiveClose() == 1000)
            #expect(await eventually { test.server.statistics.sessions == 0 })
            let after = try await http.request("GET", "/metrics")
            #expect(after.body.contains("realtime_sessions 0"))
            #expect(after.body.contains("realtime_subscriptions 0"))
            #expect(after.body.contains(#"realtime_socket_closes_total{code="1000"} 1"#))
            await http.close()
        }
    }
}
