import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOWebSocket
import ServiceLifecycle

/// One accepted connection: HTTP/1 for the routes of PROTOCOL.md, and the upgrade of
/// `/ws` to a WebSocket whose session runs on the channel's event loop.
///
/// Hummingbird's own WebSocket channel runs every socket in a suspended task (its
/// WebSocket handler's, with the server's per-connection task under it) for the socket's
/// whole life; those tasks' stack slabs were two thirds of an idle socket's memory
/// (docs/bench-notes/realtime.md). Here the upgrade installs `SessionHandler`, which reads
/// frames on the event loop and starts a task only while a subscription's catch-up or
/// snapshot runs; the per-connection task returns as soon as the upgrade is done. Plain
/// HTTP requests still go through Hummingbird's responder.
///
/// An upgrade that the server does not admit (draining, refused by the admission hook or
/// the JWT check, a version other than 13) has its `Upgrade` header removed by the
/// `UpgradeGate` before the upgrader sees it, so it reaches the router as a plain request,
/// which answers it (503, 401, 426) with a JSON body.
struct RealtimeChildChannel: ServerChildChannel, HTTPChannelHandler {
    /// The upgrade's outcome.
    enum UpgradeResult: Sendable {
        /// Upgraded: the session's handlers run the socket.
        case websocket
        /// A plain HTTP connection.
        case notUpgraded(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
        /// NIO's upgrader refused a request that the gate passed (not expected: the gate passes
        /// only well-formed, admitted upgrades).
        case failedUpgrade(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
        /// Refused at `maxConnections`: answered 503 and closed by `RefusedConnection`.
        case refused
    }

    /// What `setup` hands to `handle`.
    struct Value: ServerChildChannelValue {
        let upgradeResult: EventLoopFuture<UpgradeResult>
        let channel: any Channel
    }

    let server: RealtimeServer
    let responder: HTTPChannelHandler.Responder

    init(server: RealtimeServer, responder: @escaping HTTPChannelHandler.Responder) {
        self.server = server
        self.responder = Self.upgradeResponder(responder)
    }

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        let admitted = server.admitConnection()
        channel.closeFuture.whenComplete { [server] _ in server.connectionClosed() }
        if !admitted {
            return channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(RefusedConnection())
                return Value(upgradeResult: channel.eventLoop.makeSucceededFuture(.refused), channel: channel)
            }
        }
        // Each channel keeps its receive buffer between reads; NIO's default starts at 2 KiB,
        // which was 7 % of an idle socket's memory. Clients send little (an upgrade request,
        // subscribe messages); the adaptive allocator still grows for larger reads.
        try? channel.syncOptions?.setOption(
            ChannelOptions.recvAllocator,
            value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 512, maximum: 65_536)
        )
        let server = self.server
        let idleTimeout = server.configuration.firstRequestTimeout
        return channel.eventLoop.makeCompletedFuture {
            let upgradeAttempted = NIOLoopBoundBox(false, eventLoop: channel.eventLoop)
            // The gate's decision on the first request, which the upgrader then acts on.
            let grant = NIOLoopBoundBox<SessionGrant?>(nil, eventLoop: channel.eventLoop)
            let upgrader = NIOTypedWebSocketServerUpgrader<UpgradeResult>(
                maxFrameSize: server.configuration.maxClientMessageBytes,
                shouldUpgrade: { channel, head in
                    upgradeAttempted.value = true
                    return channel.eventLoop.makeSucceededFuture(grant.value == nil ? nil : HTTPHeaders())
                },
                upgradePipelineHandler: { channel, _ in
                    channel.eventLoop.makeCompletedFuture {
                        guard let admitted = grant.value else { throw ChannelError.inappropriateOperationForState }
                        grant.value = nil
                        // Inert on a WebSocket (it sees HTTP errors only): not kept on every socket.
                        let operations = channel.pipeline.syncOperations
                        if let filter = try? operations.handler(type: BytesAfterCloseFilter.self) { operations.removeHandler(filter, promise: nil) }
                        try server.startSession(on: channel, grant: admitted)
                        return .websocket
                    }
                }
            )
            let upgradeConfiguration = NIOTypedHTTPServerUpgradeConfiguration(
                upgraders: [upgrader],
                notUpgradingCompletionHandler: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let operations = channel.pipeline.syncOperations
                        try operations.addHandler(HTTP1ConnectionGuard())
                        try operations.addHandler(HTTP1ToHTTPServerCodec(secure: false))
                        // A kept-alive connection idle between requests for `firstRequestTimeout`
                        // is closed (without it, one left silent after its first answer was
                        // held, with its descriptor and task, for good).
                        try operations.addHandler(HTTPConnectionStateHandler(idleTimeout: idleTimeout, logger: logger))
                        let asyncChannel = try NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(isOutboundHalfClosureEnabled: true)
                        )
                        return upgradeAttempted.value ? .failedUpgrade(asyncChannel) : .notUpgraded(asyncChannel)
                    }
                }
            )
            var pipeline = NIOUpgradableHTTPServerPipelineConfiguration<UpgradeResult>(upgradeConfiguration: upgradeConfiguration)
            pipeline.enablePipelining = false  // NIOAsyncChannel serializes HTTP requests
            // NIO's protocol error handler answers a request it cannot parse with 400 and closes.
            // Without it, the first request's parse error went unanswered: the connection stayed
            // open until `firstRequestTimeout` while the decoder read and threw away whatever the
            // client kept sending (a black-box test: 1.7 GB per connection in those 10 s). It is
            // removed with the other HTTP handlers when the connection upgrades.
            pipeline.enableErrorHandling = true
            pipeline.enableResponseHeaderValidation = false  // HTTPTypes validates
            // Hummingbird's request limits (NIO's own allow 65,534 header fields).
            let limits = HTTP1Channel.Configuration().httpDecoder
            pipeline.decoderConfiguration.maxHeaderFieldSize = limits.maxHeaderFieldSize
            pipeline.decoderConfiguration.maxHeaderListSize = limits.maxHeaderListSize
            pipeline.decoderConfiguration.maxHeaderFieldCount = limits.maxHeaderFieldCount
            let result = try channel.pipeline.syncOperations.configureUpgradableHTTPServerPipeline(configuration: pipeline)
            let operations = channel.pipeline.syncOperations
            let upgradeHandler = try operations.handler(type: NIOTypedHTTPServerUpgradeHandler<UpgradeResult>.self)
            try operations.addHandler(BytesAfterCloseFilter(), position: .before(try operations.handler(type: HTTPServerProtocolErrorHandler.self)))
            let gate = UpgradeGate { head in
                grant.value = server.upgradeGrant(UpgradeRequest(head))
                return grant.value != nil
            }
            try operations.addHandler(gate, position: .before(upgradeHandler))
            // A connection that has not completed its first request head within
            // `firstRequestTimeout` is closed (an idle probe, a slow-loris client: nothing
            // else would ever end it, and each holds a descriptor and a task).
            let timeout = idleTimeout
            let timer = channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout.components.seconds) * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000)) {
                channel.close(promise: nil)
            }
            result.whenComplete { _ in timer.cancel() }
            return Value(upgradeResult: result, channel: channel)
        }
    }

    /// Serves a plain HTTP connection; an upgraded one is already running on its event loop.
    func handle(value: Value, logger: Logger) async {
        do {
            // Waiting for the first request is not a request in progress: on shutdown (or
            // cancellation) such a connection is closed, or the listener would wait for it.
            let channel = value.channel
            let upgradeResult = try await withTaskCancellationOrGracefulShutdownHandler {
                try await value.upgradeResult.get()
            } onCancelOrGracefulShutdown: {
                // Only runs while the first request is awaited: an upgraded socket's handle()
                // has returned by then (and sockets are closed before the listener stops).
                channel.close(promise: nil)
            }
            switch upgradeResult {
            case .websocket, .refused:
                return
            case .notUpgraded(let http1):
                await handleHTTP(asyncChannel: http1, logger: logger)
            case .failedUpgrade(let http1):
                logger.debug("websocket upgrade refused by the upgrader")
                try await http1.executeThenClose { _, outbound in
                    let head = HTTPResponse(status: .badRequest, headerFields: [.connection: "close", .contentLength: "0"])
                    try await outbound.write(contentsOf: [.head(head), .end(nil)])
                }
            }
        } catch let error as ChannelError where error == .inputClosed {
            logger.trace("connection closed before its first request")
            value.channel.close(promise: nil)
        } catch {
            // E.g. the upgrader failing (the gate passes no upgrade with a body, which it would
            // refuse): nothing owns the socket any more, and the first-request timer is gone.
            logger.debug("connection ended during the upgrade: \(error)")
            value.channel.close(promise: nil)
        }
    }

    /// NIO upgrades only a connection's first request. A later request on a kept-alive
    /// connection that asks for an upgrade is redirected to the same target with the
    /// connection closed, so the client retries on a new connection (as Hummingbird does).
    private static func upgradeResponder(_ responder: @escaping HTTPChannelHandler.Responder) -> HTTPChannelHandler.Responder {
        struct RedirectClose: Error {}
        return { request, writer, channel in
            guard request.headers[.upgrade]?.lowercased() == "websocket" else {
                return try await responder(request, writer, channel)
            }
            var target = request.uri.path
            if let query = request.uri.query { target += "?\(query)" }
            try await writer.writeResponse(HTTPResponse(status: .temporaryRedirect, headerFields: [.connection: "close", .location: target]))
            throw RedirectClose()
        }
    }
}

/// What an admitted upgrade grants the session: its tables and filters, the token's
/// subject (logged) and expiry.
struct SessionGrant: Sendable {
    let access: TableAccess
    let subject: String?
    let expiry: TokenExpiry?
}

/// A connection over `maxConnections`: answered 503 (with `Retry-After`) before its request is
/// looked at (what it sends is dropped), and closed.
final class RefusedConnection: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private static let body = #"{"error":"too_many_connections"}"#
    private static let answer = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: \(body.utf8.count)\r\n\r\n" + body

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { refuse(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        refuse(context: context)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    private func refuse(context: ChannelHandlerContext) {
        let buffer = context.channel.allocator.buffer(string: Self.answer)
        let channel = context.channel
        // Output closed first, what the client still sends read and dropped for 100 ms: a full
        // close with its request unread would answer it with a reset, which can reach the
        // client before the 503 does. (Not longer: at the limit, each refused connection holds
        // a descriptor meanwhile, out of the reserve kept below the open-file limit.)
        context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in
            channel.close(mode: .output, promise: nil)
            channel.eventLoop.scheduleTask(in: .milliseconds(100)) { channel.close(promise: nil) }
        }
    }
}

@available(*, unavailable)
extension RefusedConnection: Sendable {}
