/// A connection the pool can manage.
///
/// The pool owns every connection its factory returns: it is the only one that
/// calls ``close()``, and it calls it exactly once per connection (idle expiry,
/// lifetime, `maxIdle`, broken, failed reset, drain). A conforming type must be
/// safe to call from any task, but the pool lends it to one holder at a time.
public protocol PoolableConnection: AnyObject, Sendable {
    /// True once the connection is known to be unusable (server gone, protocol error).
    ///
    /// Read on every lease and every return, so it must be cheap and must not block
    /// (an atomic flag the driver sets when it sees an error or EOF is ideal).
    var isBroken: Bool { get }
    /// True when a returned connection has something for ``prepareForReuse()`` to clean
    /// (an open transaction, a `LISTEN`, a statement still running).
    ///
    /// Read once on every return, before ``prepareForReuse()``: when it is false the pool
    /// skips that call (and the executor hop an `async` call costs) and returns the
    /// connection in a single lock section. It must be cheap, synchronous and must not
    /// block; when unsure, answer true. The default implementation answers true, so
    /// ``prepareForReuse()`` runs on every return.
    var needsReset: Bool { get }
    /// Makes a returned connection ready for the next holder (e.g. ROLLBACK an open transaction, UNLISTEN *). Throwing means: close it instead.
    ///
    /// Runs in the releasing task before the connection is handed on, only when
    /// ``needsReset`` is true. It should return at once when there is nothing to clean.
    func prepareForReuse() async throws
    /// Asks the server to cancel whatever the connection is running now (used by drain after its deadline). Must not block a cooperative thread.
    func cancelRunningQuery() async
    /// Closes the connection; idempotent.
    ///
    /// Should return promptly: send the goodbye and let the socket close in the background
    /// (`PostgresConnection` calls `PQfinish`, which does not wait). The pool counts a
    /// connection gone when it decides to close it, so while a slow close runs a replacement
    /// may open beside it (more than `maxOpen` sessions on the server for that long), and a
    /// close the pool's timer made (lifetime, idle time) delays its next round of timeouts
    /// and leak checks until it returns.
    func close() async
}

extension PoolableConnection {
    /// Always true: ``prepareForReuse()`` runs on every return. Override it with a cheap check
    /// of the connection's state to let the pool skip the reset on the hot path.
    public var needsReset: Bool { true }
}
