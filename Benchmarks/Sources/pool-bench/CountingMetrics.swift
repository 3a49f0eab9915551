import CoreMetrics
import Synchronization

/// A metrics backend that keeps what it is given in atomics: enough work per record to stand
/// for a real backend's hot path (no export), so that `POOL_BENCH_METRICS=1` measures the
/// pool with its metrics on.
final class CountingMetrics: MetricsFactory, Sendable {
    final class Handler: CounterHandler, FloatingPointCounterHandler, RecorderHandler, TimerHandler, MeterHandler, Sendable {
        let count = Atomic<Int>(0)
        let last = Atomic<Int64>(0)
        func increment(by amount: Int64) { count.add(Int(amount), ordering: .relaxed) }
        func increment(by amount: Double) { count.add(Int(amount), ordering: .relaxed) }
        func reset() { count.store(0, ordering: .relaxed) }
        func record(_ value: Int64) { last.store(value, ordering: .relaxed); count.add(1, ordering: .relaxed) }
        func record(_ value: Double) { last.store(Int64(value), ordering: .relaxed); count.add(1, ordering: .relaxed) }
        func recordNanoseconds(_ duration: Int64) { last.store(duration, ordering: .relaxed); count.add(1, ordering: .relaxed) }
        func set(_ value: Int64) { last.store(value, ordering: .relaxed) }
        func set(_ value: Double) { last.store(Int64(value), ordering: .relaxed) }
        func decrement(by amount: Double) { count.subtract(Int(amount), ordering: .relaxed) }
    }
    func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler { Handler() }
    func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler { Handler() }
    func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler { Handler() }
    func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler { Handler() }
    func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler { Handler() }
    func destroyCounter(_ handler: any CounterHandler) {}
    func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) {}
    func destroyRecorder(_ handler: any RecorderHandler) {}
    func destroyTimer(_ handler: any TimerHandler) {}
    func destroyMeter(_ handler: any MeterHandler) {}
}
