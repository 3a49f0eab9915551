import CLibPQ
import Glibc

/// The CPU's time-stamp counter as a clock, for timing a connection's use
/// (`db.client.connection.use_time`) on the CPU-local fast path when metrics are on.
///
/// `clock_gettime` is the counter read plus the kernel's conversion (about 21 ns against 9 ns
/// for the bare read on this project's machines); two reads per lease+release were a third of
/// what the metrics cost a cycle. The counter is used only where the kernel itself keeps time by
/// it (clock source `tsc`: constant rate, synchronised across CPUs, which the kernel checks before
/// it picks it); elsewhere, and off x86-64, the pool reads `clock_gettime` as before.
enum TickClock {
    /// Nanoseconds per tick, measured once per process against `CLOCK_MONOTONIC` over 2 ms; nil
    /// where the counter is not the kernel's clock source.
    static let nanosecondsPerTick: Double? = calibrate()

    /// The counter now (0 off x86-64).
    @inline(__always)
    static func read() -> Int64 {
        Int64(bitPattern: UInt64(clibpq_ticks()))
    }

    /// The kernel's current clock source (`tsc`, `kvm-clock`, `hpet`, ...), nil if unknown.
    static func kernelClockSource() -> String? {
        let fd = open("/sys/devices/system/clocksource/clocksource0/current_clocksource", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        return String(decoding: buffer[..<count], as: UTF8.self).trimmingWhitespace()
    }

    /// `CLOCK_MONOTONIC` in nanoseconds.
    @inline(__always)
    static func monotonicNanoseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) &* 1_000_000_000 &+ Int64(ts.tv_nsec)
    }

    /// A clock reading and the counter at the same moment: the middle of two counter reads
    /// around it, the tightest of a few tries (a preemption between the reads would skew it).
    static func pair() -> (ticks: Int64, nanoseconds: Int64) {
        var best: (ticks: Int64, nanoseconds: Int64, spread: Int64)?
        for _ in 0..<5 {
            let before = read()
            let nanoseconds = monotonicNanoseconds()
            let after = read()
            let spread = after &- before
            if best == nil || spread < best!.spread { best = (before &+ spread / 2, nanoseconds, spread) }
        }
        return (best!.ticks, best!.nanoseconds)
    }

    static func calibrate() -> Double? {
        #if os(Linux) && arch(x86_64)
        guard kernelClockSource() == "tsc" else { return nil }
        let start = pair()
        while monotonicNanoseconds() &- start.nanoseconds < 2_000_000 {}
        let end = pair()
        let ticks = end.ticks &- start.ticks
        guard ticks > 0 else { return nil }
        let perTick = Double(end.nanoseconds &- start.nanoseconds) / Double(ticks)
        // Between 10 MHz and 100 GHz, or something is wrong with the counter: not used.
        guard perTick.isFinite, perTick > 0.01, perTick < 100 else { return nil }
        return perTick
        #else
        return nil
        #endif
    }
}

extension String {
    fileprivate func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}
