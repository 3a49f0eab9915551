import Foundation
import Logging
import NIOCore

/// When an admitted session's token expires (its `exp`).
struct TokenExpiry: Sendable {
    /// The token's `exp`.
    var at: Date
}

extension RealtimeServer {
    /// Decides a `/ws` upgrade: the JWT authenticator when auth is on, else the `admission` hook.
    func admission(_ request: UpgradeRequest) -> UpgradeDecision {
        if let auth = configuration.auth { return auth.decide(request) }
        return configuration.admission(request)
    }

    /// Logs at start whether auth is on; a warning when it is off (PROTOCOL.md "Auth").
    func logAuthMode() {
        if configuration.auth != nil {
            logger.info("JWT auth is on (HS256): /ws needs a token; subscriptions are limited to the token's rt tables and filters")
        } else {
            logger.warning("JWT auth is off: no secret configured (set --jwt-secret or REALTIME_SYNC_JWT_SECRET); the admission hook alone decides upgrades (by default: every client, every streamed table)")
        }
    }

    /// Arms the close with 1008 at the token's `exp` on the socket's event loop (event-loop
    /// timers, freed as soon as they are cancelled, unlike a cancelled `Task.sleep`; see
    /// `AutoPingHandler`). Time is the authenticator's clock (`JWTAuthenticator.now`, the one
    /// `exp` was checked against at the upgrade), looked at again at least every
    /// `tokenExpiryCheckInterval`: a monotonic timer alone would not count a suspended
    /// host's time, and the socket would outlive `exp` by it. The session's scope owns the
    /// returned timer and cancels it however the socket ends. Nil when there is no expiry.
    func armTokenExpiry(_ expiry: TokenExpiry?, session: SessionChannel, channel: any Channel, logger: Logger) -> TokenExpiryTimer? {
        guard let expiry else { return nil }
        let interval = configuration.tokenExpiryCheckInterval
        var now: @Sendable () -> Date = { Date() }
        if let auth = configuration.auth { now = auth.now }
        let step = Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18
        let timer = TokenExpiryTimer(expiry: expiry, now: now, session: session, loop: channel.eventLoop, logger: logger, step: step)
        timer.arm()
        return timer
    }
}

/// The timer of an open socket's token expiry (`RealtimeServer.armTokenExpiry`), which re-arms
/// itself until `exp` has passed by its clock. Used on the socket's event loop only: armed
/// there, fired there, and cancelled there by the session's handler.
final class TokenExpiryTimer: @unchecked Sendable {
    private let expiry: TokenExpiry
    private let now: @Sendable () -> Date
    private let session: SessionChannel
    private let loop: any EventLoop
    private let logger: Logger
    /// `tokenExpiryCheckInterval`, seconds.
    private let step: Double
    private var current: Scheduled<Void>?
    private var isCancelled = false

    init(expiry: TokenExpiry, now: @escaping @Sendable () -> Date, session: SessionChannel, loop: any EventLoop, logger: Logger, step: Double) {
        self.expiry = expiry
        self.now = now
        self.session = session
        self.loop = loop
        self.logger = logger
        self.step = step
    }

    /// Waits for `exp` or `step`, whichever comes first, then looks at the clock again.
    func arm() {
        guard !isCancelled else { return }
        let seconds = max(0, min(expiry.at.timeIntervalSince(now()), step))
        current = loop.scheduleTask(in: .nanoseconds(Int64(seconds * 1_000_000_000))) { self.fire() }
    }

    private func fire() {
        guard !isCancelled else { return }
        guard expiry.at.timeIntervalSince(now()) <= 0 else { return arm() }
        logger.info("token expired; closing the socket with 1008", metadata: ["exp": "\(expiry.at.formatted(.iso8601))"])
        session.closeNow(.policyViolation)
    }

    /// Cancels the timer; it arms no other.
    func cancel() {
        isCancelled = true
        current?.cancel()
        current = nil
    }
}
