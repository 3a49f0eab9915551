#if os(Linux) && canImport(Glibc)
import CLibPQ
import Glibc
#endif

/// The CPU's time-stamp counter as a clock, for timing a connection's use
/// (`db.client.connection.use_time`) on the CPU-local fast path when metrics are on.
///
/// `clock_gettime` is the counter read plus the kernel's conversion (about 21 ns against 9 ns
/// for the bare read on this project's machines); two reads per lease+release were a third of
/// what the metrics cost a cycle. The counter is used only where the kernel itself keeps time by
/// it (clock source `tsc`: constant rate, synchronised across CPUs, which the kernel checks before
/// it picks it, and keeps checking); elsewhere, and off Linux on x86-64, the pool reads
/// `clock_gettime` as before.
enum TickClock {
    /// Nanoseconds per tick, measured once per process against `CLOCK_MONOTONIC_RAW` (which NTP
    /// does not slew) over 2 ms; nil where the counter is not the kernel's clock source.
    static let nanosecondsPerTick: Double? = calibrate()

    /// The counter now (0 off x86-64).
    @inline(__always)
    static func read() -> Int64 {
        #if os(Linux) && canImport(Glibc)
        Int64(bitPattern: UInt64(clibpq_ticks()))
        #else
        0
        #endif
    }

    /// The kernel's current clock source (`tsc`, `kvm-clock`, `hpet`, ...), nil if unknown.
    static func kernelClockSource() -> String? {
        #if os(Linux) && canImport(Glibc)
        let fd = open("/sys/devices/system/clocksource/clocksource0/current_clocksource", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        var text = Substring(String(decoding: buffer[..<count], as: UTF8.self))
        while let last = text.last, last.isWhitespace { text.removeLast() }
        return String(text)
        #else
        return nil
        #endif
    }

    /// `CLOCK_MONOTONIC_RAW` in nanoseconds, nil if it cannot be read.
    static func rawNanoseconds() -> Int64? {
        #if os(Linux) && canImport(Glibc)
        nanoseconds(of: CLOCK_MONOTONIC_RAW)
        #else
        nil
        #endif
    }

    #if os(Linux) && canImport(Glibc)
    /// `clock_gettime(clock)` in nanoseconds, nil if it fails.
    @inline(__always)
    static func nanoseconds(of clock: clockid_t) -> Int64? {
        var ts = timespec()
        guard clock_gettime(clock, &ts) == 0 else { return nil }
        return Int64(ts.tv_sec) &* 1_000_000_000 &+ Int64(ts.tv_nsec)
    }
    #endif

    /// `inner` read between two reads of `outer`, as one moment: the middle of the two `outer`
    /// reads and the `inner` one, the tightest of `tries` tries (a preemption between the reads
    /// would skew it); nil if `inner` cannot be read.
    static func bracket(tries: Int, outer: () -> Int64, inner: () -> Int64?) -> (outer: Int64, inner: Int64)? {
        var best: (outer: Int64, inner: Int64, spread: Int64)?
        for _ in 0..<tries {
            let before = outer()
            guard let value = inner() else { return nil }
            let spread = outer() &- before
            if best == nil || spread < best!.spread { best = (before &+ spread / 2, value, spread) }
        }
        return best.map { ($0.outer, $0.inner) }
    }

    /// Measures the counter's rate over 2 ms of `CLOCK_MONOTONIC_RAW` where the kernel keeps
    /// time by it (x86-64 Linux, clock source `tsc`); nil elsewhere or if the result is absurd.
    static func calibrate() -> Double? {
        #if os(Linux) && canImport(Glibc) && arch(x86_64)
        func pair() -> (ticks: Int64, nanoseconds: Int64)? {
            bracket(tries: 5, outer: read, inner: rawNanoseconds).map { ($0.outer, $0.inner) }
        }
        guard kernelClockSource() == "tsc", let start = pair() else { return nil }
        // At most about 2 ms; bounded in reads too, should the clock stand still.
        var spins = 0
        while let now = rawNanoseconds(), now &- start.nanoseconds < 2_000_000, spins < 10_000_000 { spins += 1 }
        guard let end = pair() else { return nil }
        let ticks = end.ticks &- start.ticks, nanoseconds = end.nanoseconds &- start.nanoseconds
        guard ticks > 0, nanoseconds >= 1_000_000 else { return nil }
        let perTick = Double(nanoseconds) / Double(ticks)
        // Between 10 MHz and 100 GHz, or something is wrong with the counter: not used.
        guard perTick.isFinite, perTick > 0.01, perTick < 100 else { return nil }
        return perTick
        #else
        return nil
        #endif
    }
}
