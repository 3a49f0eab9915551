import HTTPTypes
import Hummingbird
import NIOCore

extension RealtimeServer {
    /// Set by the upgrade gate on an upgrade it refused, so `/ws` answers why.
    static let refusedUpgradeHeader = "x-realtime-refused-upgrade"

    /// Whether an upgrade request may proceed to the WebSocket upgrader, and if so what the
    /// session may do. Decided once per upgrade, by the `UpgradeGate` (one token check).
    func upgradeGrant(_ request: UpgradeRequest) -> SessionGrant? {
        guard request.path == "/ws", request.header("sec-websocket-version") == "13" else { return nil }
        guard !isDraining else { return nil }
        guard case .admit(let access, let subject, let expiresAt) = admission(request) else { return nil }
        return SessionGrant(access: access, subject: subject, expiry: expiresAt.map(TokenExpiry.init))
    }

    func addRoutes(to router: Router<BasicRequestContext>) {
        router.get("/ws") { request, _ -> Response in
            self.answerPlainWebSocketRequest(request)
        }
        router.get("/healthz") { _, _ -> Response in
            Response(status: .ok, headers: [.contentType: "text/plain; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(string: "ok\n")))
        }
        router.get("/readyz") { _, _ -> Response in
            if self.isDraining { return Self.json(.serviceUnavailable, #"{"ready":false,"reason":"shutting_down"}"#) }
            if !self.source.isConnected { return Self.json(.serviceUnavailable, #"{"ready":false,"reason":"change_stream_disconnected"}"#) }
            return Self.json(.ok, #"{"ready":true}"#)
        }
        router.get("/metrics") { _, _ -> Response in
            let text = self.metrics.exposition(self.statistics)
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                            body: .init(byteBuffer: ByteBuffer(bytes: text)))
        }
        router.get("/") { _, _ -> Response in
            Response(status: .ok, headers: [.contentType: "text/html; charset=utf-8"],
                     body: .init(byteBuffer: ByteBuffer(string: self.configuration.indexHTML)))
        }
    }

    /// `/ws` that reached the router: not an upgrade, or one the gate refused.
    private func answerPlainWebSocketRequest(_ request: Request) -> Response {
        if isDraining { return Self.json(.serviceUnavailable, #"{"error":"shutting_down"}"#) }
        let upgrade = UpgradeRequest(request.head)
        if let version = upgrade.header("sec-websocket-version"), version != "13" {
            var response = Self.json(.upgradeRequired, #"{"error":"unsupported_websocket_version","supported":"13"}"#)
            response.headers[.secWebSocketVersion] = "13"
            return response
        }
        if upgrade.header(Self.refusedUpgradeHeader) != nil, case .unauthorized(let reason) = admission(upgrade) {
            logger.info("websocket upgrade refused: unauthorized", metadata: ["reason": "\(reason)"])
            return Self.json(.unauthorized, #"{"error":"unauthorized"}"#)
        }
        return Self.json(.badRequest, #"{"error":"websocket_upgrade_required"}"#)
    }

    static func json(_ status: HTTPResponse.Status, _ body: String) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: body)))
    }
}
