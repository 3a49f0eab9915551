import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

extension RealtimeServer {
    /// Set by the upgrade gate on an upgrade it refused, so `/ws` answers why.
    static let refusedUpgradeHeader = "x-realtime-refused-upgrade"
    /// The header's value: random per process, so that a client cannot pass for a refused
    /// upgrade (the gate also drops the header from a first request; later requests of a
    /// kept-alive connection do not pass the gate).
    static let refusedUpgradeMark = UUID().uuidString

    /// Whether an upgrade request may proceed to the WebSocket upgrader, and if so what the
    /// session may do. Decided once per upgrade, by the `UpgradeGate` (one token check).
    func upgradeGrant(_ request: UpgradeRequest) -> SessionGrant? {
        guard request.path == "/ws", request.header("sec-websocket-version") == "13" else { return nil }
        guard !isDraining else { return nil }
        guard originAllowed(request) else { return nil }
        guard case .admit(let access, let subject, let expiresAt) = admission(request) else { return nil }
        return SessionGrant(access: access, subject: subject, expiry: expiresAt.map(TokenExpiry.init))
    }

    func addRoutes(to router: Router<BasicRequestContext>) {
        router.get("/ws") { request, _ -> Response in
            self.answerPlainWebSocketRequest(request)
        }
        // Each also answers HEAD (load balancers probe with it).
        let pages: [(String, @Sendable () -> Response)] = [
            ("/healthz", {
                Response(status: .ok, headers: [.contentType: "text/plain; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(string: "ok\n")))
            }),
            ("/readyz", {
                if self.isDraining { return Self.json(.serviceUnavailable, #"{"ready":false,"reason":"shutting_down"}"#) }
                if !self.source.isConnected { return Self.json(.serviceUnavailable, #"{"ready":false,"reason":"change_stream_disconnected"}"#) }
                if !self.source.isCaughtUp { return Self.json(.serviceUnavailable, #"{"ready":false,"reason":"catching_up"}"#) }
                return Self.json(.ok, #"{"ready":true}"#)
            }),
            ("/metrics", {
                let text = self.metrics.exposition(self.statistics)
                return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                                body: .init(byteBuffer: ByteBuffer(bytes: text)))
            }),
            ("/", {
                Response(status: .ok, headers: Self.pageHeaders, body: .init(byteBuffer: ByteBuffer(string: self.configuration.indexHTML)))
            }),
        ]
        for (path, page) in pages {
            router.get(RouterPath(path)) { _, _ -> Response in page() }
            // GET's headers, Content-Length included (RFC 9110 9.3.2), and no body.
            router.head(RouterPath(path)) { _, _ -> Response in page().createHeadResponse() }
        }
    }

    /// `/ws` that reached the router: not an upgrade, or one the gate refused.
    private func answerPlainWebSocketRequest(_ request: Request) -> Response {
        // The router also takes `/ws/` and `//ws` here; the WebSocket lives at `/ws` only.
        guard request.uri.path == "/ws" else { return Response(status: .notFound) }
        if isDraining { return Self.json(.serviceUnavailable, #"{"error":"shutting_down"}"#) }
        let upgrade = UpgradeRequest(request.head)
        let refused = upgrade.header(Self.refusedUpgradeHeader) == Self.refusedUpgradeMark
        if let version = upgrade.header("sec-websocket-version"), version != "13" {
            var response = Self.json(.upgradeRequired, #"{"error":"unsupported_websocket_version","supported":"13"}"#)
            response.headers[.secWebSocketVersion] = "13"
            return response
        }
        if refused, !originAllowed(upgrade) {
            logger.info("websocket upgrade refused: origin not allowed (RealtimeServerConfiguration.allowedOrigins, --allowed-origins)",
                        metadata: ["origin": "\(upgrade.header("origin") ?? "")", "host": "\(upgrade.header("host") ?? "")"])
            return Self.json(.forbidden, #"{"error":"origin_not_allowed"}"#)
        }
        if refused, case .unauthorized(let reason) = admission(upgrade) {
            logger.info("websocket upgrade refused: unauthorized", metadata: ["reason": "\(reason)"])
            return Self.json(.unauthorized, #"{"error":"unauthorized"}"#)
        }
        return Self.json(.badRequest, #"{"error":"websocket_upgrade_required"}"#)
    }

    /// Whether a browser page from the request's `Origin` may open `/ws`
    /// (`RealtimeServerConfiguration.allowedOrigins`).
    func originAllowed(_ request: UpgradeRequest) -> Bool {
        // A browser sends one Origin and one Host: with two, which one a check reads decides
        // it (the server's own origin first, another site's second), so two are refused.
        guard request.headers.count(where: { $0.name == "origin" }) <= 1,
              request.headers.count(where: { $0.name == "host" }) <= 1 else { return false }
        guard let origin = request.header("origin"), !origin.isEmpty else { return true }  // not a browser
        if Self.isSameOrigin(origin, host: request.header("host")) { return true }
        guard let allowed = configuration.allowedOrigins else { return configuration.auth != nil }
        return allowed.contains { $0 == "*" || $0.caseInsensitiveCompare(origin) == .orderedSame }
    }

    /// Whether `origin` (`scheme://host[:port]`) names the host the request was sent to, and
    /// that host is an address or `localhost`. A name is not trusted so: its owner can point it
    /// at this server after their page loaded (DNS rebinding), and their page would then be
    /// "same-origin"; a name must be listed in `allowedOrigins`.
    static func isSameOrigin(_ origin: String, host: String?) -> Bool {
        guard let host, !host.isEmpty, let separator = origin.range(of: "://"),
              origin[separator.upperBound...].caseInsensitiveCompare(host) == .orderedSame else { return false }
        if host.hasPrefix("[") { return true }  // an IPv6 address, [::1]:8080
        let name = host.lastIndex(of: ":").map { host[..<$0] } ?? host[...]
        if name.lowercased() == "localhost" { return true }
        // Four decimal octets, digits only (`UInt8("+4")` would take a sign, and a browser
        // treats such a host as a name).
        let octets = name.split(separator: ".", omittingEmptySubsequences: false)
        return octets.count == 4 && octets.allSatisfy { octet in
            (1...3).contains(octet.count) && octet.allSatisfy { $0.isASCII && $0.isNumber } && UInt8(octet) != nil
        }
    }

    /// The page's headers: HTML, never sniffed as anything else, not cached (a token may be in
    /// the address that loaded it), not framed by another site, and no referrer sent on.
    static let pageHeaders: HTTPFields = [
        .contentType: "text/html; charset=utf-8",
        HTTPField.Name("X-Content-Type-Options")!: "nosniff",
        .cacheControl: "no-store",
        HTTPField.Name("X-Frame-Options")!: "DENY",
        HTTPField.Name("Referrer-Policy")!: "no-referrer",
    ]

    static func json(_ status: HTTPResponse.Status, _ body: String) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: body)))
    }
}
