import CoreMetrics

/// The knobs of a ``ConnectionPool``. Every knob has a safe default, and every
/// error the pool throws names the knobs that caused it.
///
/// Values are clamped into a consistent range when the pool is created:
/// `1 <= maxOpen`, `0 <= minIdle <= maxIdle <= maxOpen`, `1 <= maxConcurrentConnects`.
public struct ConnectionPoolConfiguration: Sendable, Hashable {
    /// Capped exponential backoff with jitter for failed connects.
    ///
    /// After the n-th consecutive failure the pool opens nothing for
    /// `min(maximum, initial * 2^(n-1))`, shortened by a random fraction of up to
    /// `jitter` (0...1) so that many pools do not retry in lockstep.
    public struct ConnectBackoff: Sendable, Hashable {
        /// Delay after the first failure. Default 100 ms.
        public var initial: Duration
        /// Upper bound of the delay. Default 10 s.
        public var maximum: Duration
        /// Fraction (0...1) of the delay that is randomly removed. Default 0.2.
        public var jitter: Double

        /// Creates a backoff policy.
        public init(initial: Duration = .milliseconds(100), maximum: Duration = .seconds(10), jitter: Double = 0.2) {
            self.initial = initial
            self.maximum = maximum
            self.jitter = jitter
        }
    }

    /// Name used in logs, errors and the `db.client.connection.pool.name` metric attribute. Default `"default"`.
    public var name: String
    /// Hard limit on open connections, counting those being opened; never exceeded. Default 10.
    public var maxOpen: Int
    /// Connections the pool keeps open (idle when the pool is quiet), so the first
    /// requests after a quiet period find a warm connection. Idle expiry never takes
    /// the pool below it. Default 0.
    public var minIdle: Int
    /// Idle connections kept at most; a return beyond this closes the least recently used idle connection. Default 10 (= the default `maxOpen`; clamped to `maxOpen`).
    public var maxIdle: Int
    /// A connection older than its own lifetime (`maxLifetime` minus a random share of
    /// `lifetimeJitter`) is closed when it is idle or returned, never while held, and
    /// replaced as needed. `nil`, zero or negative: no limit. Default 30 min.
    public var maxLifetime: Duration?
    /// Spread of lifetimes so that connections opened together do not expire together. Default 1 min.
    public var lifetimeJitter: Duration
    /// An idle connection unused for this long is closed (but never below `minIdle`). `nil`, zero or negative: never. Default 10 min.
    public var maxIdleTime: Duration?
    /// How long an acquire may wait before it fails with ``ConnectionPoolError/Code/acquireTimeout``. Default 30 s.
    public var acquireTimeout: Duration
    /// Waiters beyond this number are refused at once with ``ConnectionPoolError/Code/tooManyWaiters`` (load shedding). Default 1,000.
    public var maxWaiters: Int
    /// Connects that may run at the same time (no connect storms). Default 2.
    public var maxConcurrentConnects: Int
    /// Retry policy after failed connects. Waiters keep waiting and are told the last connect error if they time out.
    public var connectBackoff: ConnectBackoff
    /// A connection held longer than this (counting a reset on return that hangs) is reported once
    /// (warning log + `db.client.connection.leaks` counter) with its holder's label and source
    /// location. `nil`, zero or negative: off. Default 60 s.
    public var leakThreshold: Duration?
    /// How long `run()` lets holders finish after graceful shutdown before their queries are cancelled and their connections closed. Default 10 s.
    public var drainTimeout: Duration
    /// Keep up to one idle connection per CPU in a CPU-local slot, lent and taken back without
    /// the pool's shared lock while nobody waits (HikariCP keeps a thread-local list for the
    /// same reason). Waiters, `holders()`, `statistics`, leak reports, lifetime and the drain see
    /// these connections as usual; they come back under the shared state within 100 ms. Turn it
    /// off for strict most-recently-used reuse across all CPUs. Default true.
    public var cpuLocalCache: Bool
    /// Where the pool's metrics go; nil (default): the process's `MetricsSystem.factory`, as
    /// the application bootstrapped it. Not part of the configuration's equality.
    public var metricsFactory: (any MetricsFactory)? {
        get { metricsBackend.factory }
        set { metricsBackend = MetricsBackend(factory: newValue) }
    }
    var metricsBackend = MetricsBackend(factory: nil)

    /// Creates a configuration; every parameter has the documented default.
    public init(
        name: String = "default",
        maxOpen: Int = 10,
        minIdle: Int = 0,
        maxIdle: Int = 10,
        maxLifetime: Duration? = .seconds(30 * 60),
        lifetimeJitter: Duration = .seconds(60),
        maxIdleTime: Duration? = .seconds(10 * 60),
        acquireTimeout: Duration = .seconds(30),
        maxWaiters: Int = 1_000,
        maxConcurrentConnects: Int = 2,
        connectBackoff: ConnectBackoff = ConnectBackoff(),
        leakThreshold: Duration? = .seconds(60),
        drainTimeout: Duration = .seconds(10),
        cpuLocalCache: Bool = true
    ) {
        self.name = name
        self.maxOpen = maxOpen
        self.minIdle = minIdle
        self.maxIdle = maxIdle
        self.maxLifetime = maxLifetime
        self.lifetimeJitter = lifetimeJitter
        self.maxIdleTime = maxIdleTime
        self.acquireTimeout = acquireTimeout
        self.maxWaiters = maxWaiters
        self.maxConcurrentConnects = maxConcurrentConnects
        self.connectBackoff = connectBackoff
        self.leakThreshold = leakThreshold
        self.drainTimeout = drainTimeout
        self.cpuLocalCache = cpuLocalCache
    }

    /// Holds `metricsFactory` outside the configuration's equality (a factory has none).
    struct MetricsBackend: Sendable, Hashable {
        let factory: (any MetricsFactory)?
        static func == (lhs: Self, rhs: Self) -> Bool { true }
        func hash(into hasher: inout Hasher) {}
    }

    /// The longest time the pool waits for anything: a longer `acquireTimeout`, `drainTimeout`,
    /// lifetime, idle time, leak threshold or backoff means "never" and is cut to this (about
    /// 100 years). Clocks cannot sleep until `.seconds(Int64.max)` from now (the runtime traps).
    public static let longestWait: Duration = .seconds(100 * 365 * 86_400)

    /// The configuration with every value clamped into its valid range.
    var normalized: ConnectionPoolConfiguration {
        var c = self
        // Zero or less means "off", as nil does (as in HikariCP and Go's database/sql). Taken
        // literally, a zero idle time or leak threshold woke the timer without pause for the
        // pool's whole life, and a zero lifetime closed and reopened connections as fast as
        // the server accepted them.
        if let v = c.maxLifetime, v <= .zero { c.maxLifetime = nil }
        if let v = c.maxIdleTime, v <= .zero { c.maxIdleTime = nil }
        if let v = c.leakThreshold, v <= .zero { c.leakThreshold = nil }
        c.acquireTimeout = c.acquireTimeout.sleepable
        c.drainTimeout = c.drainTimeout.sleepable
        c.maxLifetime = c.maxLifetime?.sleepable
        c.lifetimeJitter = c.lifetimeJitter.sleepable
        c.maxIdleTime = c.maxIdleTime?.sleepable
        c.leakThreshold = c.leakThreshold?.sleepable
        c.connectBackoff.maximum = c.connectBackoff.maximum.sleepable
        // A zero first backoff doubles to zero: connects to a dead server in a tight loop.
        c.connectBackoff.initial = max(.milliseconds(1), c.connectBackoff.initial).sleepable
        c.maxOpen = max(1, c.maxOpen)
        c.maxIdle = min(max(0, c.maxIdle), c.maxOpen)
        c.minIdle = min(max(0, c.minIdle), c.maxIdle)
        c.maxWaiters = max(0, c.maxWaiters)
        c.maxConcurrentConnects = max(1, c.maxConcurrentConnects)
        c.lifetimeJitter = max(.zero, c.lifetimeJitter)
        if let lifetime = c.maxLifetime { c.lifetimeJitter = min(c.lifetimeJitter, lifetime) }
        c.connectBackoff.jitter = min(max(0, c.connectBackoff.jitter), 1)
        c.connectBackoff.maximum = max(c.connectBackoff.initial, c.connectBackoff.maximum)
        return c
    }
}

extension Duration {
    /// This duration, or ``ConnectionPoolConfiguration/longestWait`` if longer: what a clock
    /// can sleep (every wait on a configured duration in PoolKit goes through this).
    var sleepable: Duration { min(self, ConnectionPoolConfiguration.longestWait) }
}
