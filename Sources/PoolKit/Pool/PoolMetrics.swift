import Metrics

/// The pool's swift-metrics instruments, named after OpenTelemetry's database
/// client semantic conventions (`db.client.connection.*`), each with the
/// attribute `db.client.connection.pool.name`.
final class PoolMetrics: Sendable {
    /// `db.client.connection.count{db.client.connection.state=idle}`.
    let idle: Gauge
    /// `db.client.connection.count{db.client.connection.state=used}`.
    let used: Gauge
    /// `db.client.connection.pending_requests`: waiters.
    let pending: Gauge
    /// `db.client.connection.max`: `maxOpen`.
    let max: Gauge
    /// `db.client.connection.idle.max` / `.idle.min`.
    let idleMax: Gauge
    let idleMin: Gauge
    /// `db.client.connection.timeouts`: acquires that hit `acquireTimeout`.
    let timeouts: Counter
    /// `db.client.connection.wait_time`: time to obtain a connection.
    let waitTime: Metrics.Timer
    /// `db.client.connection.use_time`: time between lease and release.
    let useTime: Metrics.Timer
    /// The handlers behind `waitTime` and `useTime`, called directly on the CPU-local fast
    /// path: through the `Timer`, each record retained and released it around the call (two
    /// atomic operations, about a sixth of what the metrics cost a cycle).
    let waitTimeHandler: any TimerHandler
    /// The handler behind `useTime` (see `waitTimeHandler`).
    let useTimeHandler: any TimerHandler
    /// `db.client.connection.create_time`: time to open a connection.
    let createTime: Metrics.Timer
    /// `db.client.connection.leaks` (not an OpenTelemetry name): leases held past `leakThreshold`.
    let leaks: Counter

    /// False when the metrics system was the no-op one when the pool was made: the
    /// instruments above are then no-ops for good (swift-metrics binds each one to the
    /// factory of its creation), so the hot path skips recording into them.
    let enabled: Bool

    init(configuration: ConnectionPoolConfiguration) {
        let factory = configuration.metricsFactory ?? MetricsSystem.factory
        enabled = !(factory is NOOPMetricsHandler)
        let pool = ("db.client.connection.pool.name", configuration.name)
        idle = Gauge(label: "db.client.connection.count", dimensions: [pool, ("db.client.connection.state", "idle")], factory: factory)
        used = Gauge(label: "db.client.connection.count", dimensions: [pool, ("db.client.connection.state", "used")], factory: factory)
        pending = Gauge(label: "db.client.connection.pending_requests", dimensions: [pool], factory: factory)
        max = Gauge(label: "db.client.connection.max", dimensions: [pool], factory: factory)
        idleMax = Gauge(label: "db.client.connection.idle.max", dimensions: [pool], factory: factory)
        idleMin = Gauge(label: "db.client.connection.idle.min", dimensions: [pool], factory: factory)
        timeouts = Counter(label: "db.client.connection.timeouts", dimensions: [pool], factory: factory)
        func timer(_ label: String) -> (Metrics.Timer, any TimerHandler) {
            let handler = factory.makeTimer(label: label, dimensions: [pool])
            handler.preferDisplayUnit(.seconds)
            return (Metrics.Timer(label: label, dimensions: [pool], handler: handler, factory: factory), handler)
        }
        (waitTime, waitTimeHandler) = timer("db.client.connection.wait_time")
        (useTime, useTimeHandler) = timer("db.client.connection.use_time")
        createTime = Metrics.Timer(label: "db.client.connection.create_time", dimensions: [pool], preferredDisplayUnit: .seconds, factory: factory)
        leaks = Counter(label: "db.client.connection.leaks", dimensions: [pool], factory: factory)
        max.record(configuration.maxOpen)
        idleMax.record(configuration.maxIdle)
        idleMin.record(configuration.minIdle)
    }
}

extension PoolMetrics {
    /// Records a lease that did not wait (`wait_time` 0).
    @inline(__always)
    func recordNoWait() {
        waitTimeHandler.recordNanoseconds(0)
    }

    /// Records a use time in nanoseconds.
    @inline(__always)
    func recordUseTime(nanoseconds: Int64) {
        useTimeHandler.recordNanoseconds(nanoseconds)
    }
}

extension Metrics.Timer {
    /// Records a `Duration`.
    func record(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        recordNanoseconds(seconds &* 1_000_000_000 &+ attoseconds / 1_000_000_000)
    }
}
