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

    /// Arms the close with 1008 at the token's `exp` on the socket's event loop (an event-loop
    /// timer, freed as soon as it is cancelled, unlike a cancelled `Task.sleep`; see
    /// `AutoPingHandler`). The session's scope owns the returned timer and cancels it
    /// however the socket ends. Nil when the session has no expiry.
    func armTokenExpiry(_ expiry: TokenExpiry?, session: SessionChannel, channel: any Channel, logger: Logger) -> Scheduled<Void>? {
        guard let expiry else { return nil }
        // Clamped to 100 years so that a far `exp` cannot overflow the nanosecond count.
        let seconds = min(max(0, expiry.at.timeIntervalSinceNow), 100 * 365 * 86_400)
        let delay = TimeAmount.nanoseconds(Int64(seconds * 1_000_000_000))
        return channel.eventLoop.scheduleTask(in: delay) {
            logger.info("token expired; closing the socket with 1008", metadata: ["exp": "\(expiry.at.formatted(.iso8601))"])
            session.closeNow(.policyViolation)
        }
    }
}
