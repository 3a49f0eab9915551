/// A snapshot of a pool's counts and counters (see ``ConnectionPool/statistics``).
public struct PoolStatistics: Sendable, Hashable {
    /// Established connections (idle + in use); `open + opening <= maxOpen` always.
    public var open: Int = 0
    /// Connections lent out (including those being reset after return).
    public var inUse: Int = 0
    /// Connections ready in the pool.
    public var idle: Int = 0
    /// Callers waiting for a connection.
    public var waiting: Int = 0
    /// Connects in flight.
    public var opening: Int = 0
    /// Leases granted so far.
    public var leases: Int = 0
    /// Acquires that had to wait (counted when the wait begins), however the wait ended:
    /// served, timed out, cancelled or failed by a drain.
    public var waitCount: Int = 0
    /// Total time those acquires waited, added as each wait ends (waits still going are not in it).
    public var totalWaitTime: Duration = .zero
    /// Acquires that failed with `acquireTimeout`.
    public var timeouts: Int = 0
    /// Acquires refused because `maxWaiters` were waiting.
    public var rejected: Int = 0
    /// Waits ended by task cancellation.
    public var cancelledWaits: Int = 0
    /// Connections closed because more than `maxIdle` were idle.
    public var closedMaxIdle: Int = 0
    /// Connections closed because they were idle longer than `maxIdleTime`.
    public var closedIdleTime: Int = 0
    /// Connections closed because they outlived `maxLifetime`.
    public var closedLifetime: Int = 0
    /// Connections discarded because they were broken or failed `prepareForReuse()`.
    public var closedBroken: Int = 0
    /// Connections closed by drain (idle, returned during drain, or cut off).
    public var closedByDrain: Int = 0
    /// Connections opened successfully.
    public var connectsSucceeded: Int = 0
    /// Connects that failed.
    public var connectFailures: Int = 0
    /// Leases reported as held longer than `leakThreshold`.
    public var leaksReported: Int = 0

    /// Creates an all-zero snapshot.
    public init() {}
}

/// Who holds a connection right now (see ``ConnectionPool/holders()``).
public struct ConnectionHolder: Sendable, Hashable, CustomStringConvertible {
    /// The pool's id of the connection (unique per pool, increasing).
    public var connectionID: UInt64
    /// The label the holder passed to `withConnection`/`lease`, if any.
    public var label: String?
    /// The holder's source file (`#fileID`).
    public var fileID: String
    /// The holder's source line.
    public var line: Int
    /// How long it has been held.
    public var heldFor: Duration

    /// Creates a holder record.
    public init(connectionID: UInt64, label: String?, fileID: String, line: Int, heldFor: Duration) {
        self.connectionID = connectionID
        self.label = label
        self.fileID = fileID
        self.line = line
        self.heldFor = heldFor
    }

    /// `'label' at File.swift:42 for 1.5s (connection #3)`.
    public var description: String {
        let who = label.map { "'\($0)' at " } ?? ""
        return "\(who)\(fileID):\(line) for \(formatDuration(heldFor)) (connection #\(connectionID))"
    }
}

/// What a drain did (see ``ConnectionPool/drain(deadline:)``).
public struct DrainReport: Sendable, Hashable, CustomStringConvertible {
    /// How long the drain took.
    public var duration: Duration = .zero
    /// Waiters failed with ``ConnectionPoolError/Code/shutDown``.
    public var waitersFailed: Int = 0
    /// Idle connections closed at once.
    public var idleClosed: Int = 0
    /// Held connections returned before the deadline (then closed).
    public var returnedInTime: Int = 0
    /// Held connections still out at the deadline: their queries were cancelled and they were closed.
    public var cutOff: [ConnectionHolder] = []
    /// Connects still in flight at the deadline (their connections are closed when they arrive).
    public var connectsAbandoned: Int = 0
    /// Closes still running at the deadline (a close that hangs: a network that drops the
    /// Terminate, a driver that blocks); they go on in the background.
    public var closesUnfinished: Int = 0

    /// Creates an empty report.
    public init() {}

    /// One line for the shutdown log.
    public var description: String {
        var s = "drained in \(formatDuration(duration)): \(idleClosed) idle closed, \(waitersFailed) waiters failed, \(returnedInTime) returned in time, \(cutOff.count) cut off"
        if !cutOff.isEmpty { s += " [" + cutOff.map(\.description).joined(separator: "; ") + "]" }
        if connectsAbandoned > 0 { s += ", \(connectsAbandoned) connects abandoned" }
        if closesUnfinished > 0 { s += ", \(closesUnfinished) closes still running" }
        return s
    }
}
