import Metrics

/// The per-run instruments of a scheduler: its shared ones (dimension `scheduler`), or those
/// of a job with series of its own (`JobOptions.ownMetrics`: `scheduler` and `job_name`).
final class JobSeries: Sendable {
    let runs: Counter
    let failures: Counter
    let skipped: Counter
    let missed: Counter
    let coalesced: Counter
    let lateness: Metrics.Timer

    init(dimensions dims: [(String, String)], factory: any MetricsFactory) {
        runs = Counter(label: "scheduler.job.runs", dimensions: dims, factory: factory)
        failures = Counter(label: "scheduler.job.failures", dimensions: dims, factory: factory)
        skipped = Counter(label: "scheduler.job.skipped_overlaps", dimensions: dims, factory: factory)
        missed = Counter(label: "scheduler.job.missed_runs", dimensions: dims, factory: factory)
        coalesced = Counter(label: "scheduler.job.coalesced_runs", dimensions: dims, factory: factory)
        lateness = Metrics.Timer(label: "scheduler.job.lateness", dimensions: dims, factory: factory)
    }
}

/// Skipped, missed and coalesced runs of one job with series of its own, counted by the
/// state machine for the shell to record (the scheduler's shared series leave them out).
struct OwnSeriesCount: Sendable {
    let series: JobSeries
    var skipped: UInt64 = 0
    var missed: UInt64 = 0
    var coalesced: UInt64 = 0
}
