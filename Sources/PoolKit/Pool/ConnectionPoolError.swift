/// An error thrown by ``ConnectionPool``. Its message names the resource, the
/// limit and the knob to turn; its ``code`` is stable and safe to match on.
public struct ConnectionPoolError: Error, CustomStringConvertible, Sendable {
    /// A stable, machine-readable error code.
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        /// The code as text, e.g. `POOL_ACQUIRE_TIMEOUT`.
        public var rawValue: String
        /// Creates a code from its text.
        public init(rawValue: String) { self.rawValue = rawValue }
        /// The code as text.
        public var description: String { rawValue }

        /// No connection became free within `acquireTimeout` (pool exhausted or database unreachable).
        public static let acquireTimeout = Code(rawValue: "POOL_ACQUIRE_TIMEOUT")
        /// `maxWaiters` callers were already waiting: refused at once (load shedding).
        public static let tooManyWaiters = Code(rawValue: "POOL_TOO_MANY_WAITERS")
        /// The pool is draining or drained: new acquires are refused.
        public static let shutDown = Code(rawValue: "POOL_SHUT_DOWN")
    }

    /// The stable code.
    public var code: Code
    /// A human-readable explanation naming the limit and the knob.
    public var message: String
    /// The last error the connection factory threw, if connects were failing.
    public var lastConnectError: (any Error)?

    /// Creates an error.
    public init(code: Code, message: String, lastConnectError: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.lastConnectError = lastConnectError
    }

    /// `"<message> [<code>]"`.
    public var description: String { "\(message) [\(code)]" }
}

/// Formats a duration the way the pool's messages show it: `5s`, `1.5s`, `150ms`, `20µs`.
func formatDuration(_ d: Duration) -> String {
    let (s, atto) = d.components
    let ns = Double(s) * 1e9 + Double(atto) / 1e9
    func trim(_ v: Double) -> String {
        let rounded = (v * 10).rounded() / 10
        return rounded == rounded.rounded() ? String(Int(rounded)) : String(rounded)
    }
    let absNs = abs(ns)
    if absNs >= 60e9, absNs.truncatingRemainder(dividingBy: 60e9) == 0 { return "\(Int(ns / 60e9))min" }
    if absNs >= 1e9 { return trim(ns / 1e9) + "s" }
    if absNs >= 1e6 { return trim(ns / 1e6) + "ms" }
    if absNs >= 1e3 { return trim(ns / 1e3) + "µs" }
    return trim(ns) + "ns"
}
