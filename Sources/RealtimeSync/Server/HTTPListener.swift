import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Synchronization

/// The HTTP side of a `RealtimeServer`: a Hummingbird application with the routes of
/// PROTOCOL.md and the WebSocket upgrade, run in its own service group.
///
/// Root of an unstructured task (documented exception to DESIGN.md rule 3): the
/// application runs in a `Task.detached` so that it does not inherit the enclosing
/// service group's graceful-shutdown signal. Were it to, Hummingbird would close the
/// listener and cancel its connections' tasks the moment shutdown begins, before the
/// server has stopped admitting (503), drained the fan-out, and sent 1001. (WebSocket
/// sessions run on their event loops, not in Hummingbird's tasks: `RealtimeChildChannel`.) The task is
/// owned by `run()`, which awaits it and forwards cancellation; the server stops it
/// with `stop()` as the last shutdown step, which returns once Hummingbird has finished
/// (so the task is never cancelled mid-quiesce, which Hummingbird logs as errors).
final class HTTPListener: Sendable {
    private let group: ServiceGroup
    private let task = Mutex<Task<Void, any Error>?>(nil)

    init(server: RealtimeServer) throws {
        let configuration = server.configuration
        let router = Router(context: BasicRequestContext.self)
        server.addRoutes(to: router)
        let serverBuilder = HTTPServerBuilder { responder in
            RealtimeChildChannel(server: server, responder: responder)
        }
        let app = Application(
            router: router,
            server: serverBuilder,
            configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: nil,
                                 backlog: min(max(1, configuration.listenBacklog), 65_535)),
            onServerRunning: { channel in
                server.listenerStarted(port: channel.localAddress?.port ?? configuration.port)
            },
            logger: configuration.logger
        )
        group = ServiceGroup(configuration: .init(services: [app], logger: configuration.logger))
    }

    /// Runs the application until `stop()` or cancellation.
    func run() async throws {
        let group = self.group
        let task = Task.detached { try await group.run() }
        self.task.withLock { $0 = task }
        try await withTaskCancellationHandler {
            try await task.value
        } onCancel: {
            task.cancel()
        }
    }

    /// Stops listening (the sockets are closed by then) and returns once the application
    /// has stopped; the caller bounds the wait (`listenerStopDeadline`).
    func stop() async {
        await group.triggerGracefulShutdown()
        guard let task = task.withLock({ $0 }) else { return }
        // Cancellable, so that `listenerStopDeadline` bounds it: cancelling the application
        // cancels its connections' tasks, which close their channels.
        await withTaskCancellationHandler {
            _ = try? await task.value
        } onCancel: {
            task.cancel()
        }
    }
}

extension UpgradeRequest {
    /// From a NIO request head.
    init(_ head: HTTPRequestHead) {
        self.init(target: head.uri, headers: head.headers.map { ($0.name, $0.value) })
    }

    /// From a Hummingbird request.
    init(_ request: HTTPRequest) {
        var headers = request.headerFields.map { ($0.name.canonicalName, $0.value) }
        // HTTPTypes moves HTTP/1's (first) Host into the authority: first again, as the gate saw it.
        if let authority = request.authority { headers.insert(("host", authority), at: 0) }
        self.init(target: request.path ?? "/", headers: headers)
    }
}

/// See `RealtimeChildChannel`. Looks at the first request head only (the upgrade
/// handler, too, only upgrades the first request of a connection). An upgrade that NIO's
/// upgrader would not take (not a GET, no `Sec-WebSocket-Key`, no `Connection: upgrade`) is
/// refused here too, so that the router answers it instead of the redirect that
/// `RealtimeChildChannel` gives an upgrade on a later request of a kept-alive connection.
final class UpgradeGate: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    let admits: @Sendable (HTTPRequestHead) -> Bool

    init(admits: @escaping @Sendable (HTTPRequestHead) -> Bool) { self.admits = admits }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var part = unwrapInboundIn(data)
        if case .head(var head) = part {
            // The mark is the server's to set: one a client sent is dropped.
            head.headers.remove(name: RealtimeServer.refusedUpgradeHeader)
            if head.headers.contains(name: "upgrade") && !(Self.isWellFormedUpgrade(head) && admits(head)) {
                head.headers.remove(name: "upgrade")
                head.headers.add(name: RealtimeServer.refusedUpgradeHeader, value: RealtimeServer.refusedUpgradeMark)
                // The connection ends after the answer: NIO's decoder took the request as an
                // upgrade and parses nothing more on this connection (later bytes would only pile
                // up in its buffer), and a body is not read for the answer either.
                head.headers.replaceOrAdd(name: "connection", value: "close")
            }
            part = .head(head)
        }
        context.fireChannelRead(wrapInboundOut(part))
        if case .head = part {
            // Only the first request can upgrade; after an upgrade the bytes are WebSocket frames.
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    /// A first request that cannot be parsed: NIO's protocol error handler, before this one,
    /// has answered 400; the connection is closed (nothing else would close it before
    /// `firstRequestTimeout`, and the decoder would read and drop all the client sends).
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.fireErrorCaught(error)
        if error is HTTPParserError { context.close(promise: nil) }
    }
}

/// Every request of a plain HTTP connection, after NIO's decoder: the keep-alive rule of the
/// request's own HTTP version is made explicit for Hummingbird, which ends a connection only
/// for a `Connection` header that is exactly `close` (an HTTP/1.0 request without keep-alive,
/// or `Connection: Close`, kept its connection open until the idle timeout); and a request
/// that cannot be parsed (a bad chunk in a body, a later request) ends the connection after
/// NIO's 400, instead of the route's answer and Hummingbird's own 400 following it. Once the
/// server's side is closed (Hummingbird half-closes after the last answer), the connection is
/// closed `closeGrace` later however the client behaves: until then what it sends is read and
/// dropped, so that the answer is not lost to a reset, but a client that keeps sending (bytes
/// after `Connection: close`, after a refused upgrade) is not read for the idle timeout.
final class HTTP1ConnectionGuard: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    /// How long a connection whose server side is closed stays open for the client's side.
    static let closeGrace = TimeAmount.milliseconds(500)

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.outputClosed = event {
            let channel = context.channel
            context.eventLoop.scheduleTask(in: Self.closeGrace) { channel.close(promise: nil) }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(var head) = unwrapInboundIn(data), !head.isKeepAlive {
            head.headers.replaceOrAdd(name: "connection", value: "close")
            context.fireChannelRead(wrapInboundOut(.head(head)))
            return
        }
        context.fireChannelRead(data)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.fireErrorCaught(error)
        if error is HTTPParserError { context.close(promise: nil) }
    }
}

/// Between NIO's request decoder and its protocol error handler: bytes that follow a request
/// ending its connection (`Connection: close`, HTTP/1.0 without keep-alive) in the same read
/// are not a malformed request. The decoder reports them as `closedConnection` (and any bytes
/// after as data in its error state), on which the error handler answered 400 in place of the
/// request's own answer, and the connection was closed before that answer (a client that
/// pipelines, or sends a stray byte, got a 400 for a valid request). The request is answered
/// and the connection ends after it, as its `Connection` asked; the bytes are dropped. Only
/// `errorCaught` is overridden, so it passes any message through (it stays, inert, after an
/// upgrade).
final class BytesAfterCloseFilter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Any

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case HTTPParserError.closedConnection = error { return }
        if case ByteToMessageDecoderError.dataReceivedInErrorState(let cause, _) = error,
           case HTTPParserError.closedConnection = cause { return }
        context.fireErrorCaught(error)
    }
}

extension UpgradeGate {
    /// Whether NIO's WebSocket upgrader would take `head` (RFC 6455 4.2.1), the version aside
    /// (the router answers a wrong version with 426).
    static func isWellFormedUpgrade(_ head: HTTPRequestHead) -> Bool {
        guard head.method == .GET, (head.version.major, head.version.minor) >= (1, 1) else { return false }
        // One Host (RFC 9112 3.2: an HTTP/1.1 request without one is answered 400), and no
        // body (RFC 6455 4.1's handshake has none; NIO's upgrader fails on a body part, and
        // the connection ended unanswered): otherwise the router answers it.
        guard head.headers["host"].count == 1, !hasBody(head) else { return false }
        guard head.headers[canonicalForm: "upgrade"].contains(where: { $0.lowercased() == "websocket" }) else { return false }
        guard head.headers[canonicalForm: "connection"].contains(where: { $0.lowercased() == "upgrade" }) else { return false }
        // Exactly one key, the base64 of 16 bytes (RFC 6455 4.2.1 item 5); NIO's upgrader
        // takes any non-empty value, and with two keys it closed the connection unanswered.
        let keys = head.headers["sec-websocket-key"]
        guard keys.count == 1, let key = keys.first?.trimmingCharacters(in: .whitespaces) else { return false }
        // Exactly one version too (NIO's upgrader refuses two, and the gate, reading the first,
        // let them through: the request then reached the redirect of a later request's upgrade,
        // which a client follows for ever). Its value is the router's to judge (426 if not 13).
        guard head.headers[canonicalForm: "sec-websocket-version"].count == 1 else { return false }
        return Self.isWebSocketKey(key)
    }

    /// Whether `head` announces a body (a chunked one, or a Content-Length other than 0).
    static func hasBody(_ head: HTTPRequestHead) -> Bool {
        if head.headers.contains(name: "transfer-encoding") { return true }
        return head.headers["content-length"].contains { $0.trimmingCharacters(in: .whitespaces) != "0" }
    }

    /// Whether `key` is 24 characters of base64 that decode to 16 bytes (the last two `=`).
    static func isWebSocketKey(_ key: String) -> Bool {
        let bytes = Array(key.utf8)
        guard bytes.count == 24, bytes[22] == UInt8(ascii: "="), bytes[23] == UInt8(ascii: "=") else { return false }
        func isBase64(_ c: UInt8) -> Bool {
            (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || (c >= 48 && c <= 57) || c == 43 || c == 47
        }
        return bytes[0..<22].allSatisfy(isBase64)
    }
}

@available(*, unavailable)
extension UpgradeGate: Sendable {}
