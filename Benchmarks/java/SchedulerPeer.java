// Java peer for scheduler-bench: ScheduledThreadPoolExecutor with 2 threads and
// setRemoveOnCancelPolicy(true). Same scenarios and output format as the Swift
// executable:   java SchedulerPeer lateness|cost|rss [--quick]
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.ScheduledThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

public class SchedulerPeer {
    static final class Samples {
        final long[] values;
        final int[] periods;  // per sample: its period in the window
        final AtomicInteger count = new AtomicInteger();
        final long windowStart, windowEnd, periodNs;
        Samples(int capacity, long windowStart, long windowEnd, long periodNs) {
            values = new long[capacity];
            periods = new int[capacity];
            this.windowStart = windowStart;
            this.windowEnd = windowEnd;
            this.periodNs = periodNs;
        }
        void record(long scheduled, long now) {
            if (scheduled < windowStart || scheduled >= windowEnd) return;
            int i = count.getAndIncrement();
            if (i < values.length) {
                values[i] = now - scheduled;
                periods[i] = (int) ((scheduled - windowStart) / periodNs);
            }
        }
        void report(String scenario, int expected) {
            int n = Math.min(count.get(), values.length);
            // median over periods of each period's latest fire (as scheduler-bench prints)
            java.util.TreeMap<Integer, Long> latest = new java.util.TreeMap<>();
            for (int i = 0; i < n; i++) latest.merge(periods[i], values[i], Math::max);
            long[] spans = latest.values().stream().mapToLong(Long::longValue).sorted().toArray();
            double medianLatest = spans.length == 0 ? Double.NaN : spans[spans.length / 2] / 1000.0;
            long[] v = Arrays.copyOf(values, n);
            Arrays.sort(v);
            System.out.printf("RESULT impl=java scenario=%s p50_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f min_us=%.1f period_max_median_us=%.1f fires=%d expected=%d%n",
                scenario, pct(v, 0.5), pct(v, 0.99), pct(v, 0.999), n == 0 ? Double.NaN : v[n - 1] / 1000.0,
                n == 0 ? Double.NaN : v[0] / 1000.0, medianLatest, count.get(), expected);
        }
        static double pct(long[] v, double p) {
            if (v.length == 0) return Double.NaN;
            return v[Math.min(v.length - 1, (int) (v.length * p))] / 1000.0;
        }
    }

    static ScheduledThreadPoolExecutor executor() {
        ScheduledThreadPoolExecutor e = new ScheduledThreadPoolExecutor(Integer.getInteger("threads", 2));
        e.setRemoveOnCancelPolicy(true);
        return e;
    }

    static void lateness(String name, int jobs, long periodNs, boolean aligned, int periods) throws Exception {
        ScheduledThreadPoolExecutor ex = executor();
        long setup = jobs >= 100_000 ? 700_000_000L : 300_000_000L;
        long base = System.nanoTime() + setup;
        long windowStart = base + periodNs;
        long windowEnd = windowStart + periodNs * periods;
        Samples samples = new Samples(jobs * periods + 16, windowStart, windowEnd, periodNs);
        long step = periodNs / jobs;
        for (int i = 0; i < jobs; i++) {
            final long first = aligned ? base : base + step * i;
            // scheduleAtFixedRate keeps the grid first + k*period
            ex.scheduleAtFixedRate(new Runnable() {
                long k = 0;
                public void run() {
                    long now = System.nanoTime();
                    samples.record(first + periodNs * k, now);
                    k++;
                }
            }, first - System.nanoTime(), periodNs, TimeUnit.NANOSECONDS);
        }
        if (System.nanoTime() > base) System.out.println("WARN java " + name + ": setup overran the first fire");
        long stop = windowEnd + periodNs / 2 + 200_000_000L;
        while (System.nanoTime() < stop) Thread.sleep(Math.max(1, (stop - System.nanoTime()) / 1_000_000));
        ex.shutdownNow();
        ex.awaitTermination(5, TimeUnit.SECONDS);
        samples.report(name, jobs * periods);
    }

    static void cost(int n, int rounds) throws Exception {
        ScheduledThreadPoolExecutor ex = executor();
        Runnable body = () -> {};
        List<ScheduledFuture<?>> handles = new ArrayList<>(n);
        long bestSchedule = Long.MAX_VALUE, bestCancel = Long.MAX_VALUE;
        for (int round = 0; round < rounds; round++) {
            handles.clear();
            long far = 3600L * 1_000_000_000L;
            long[] delays = new long[n];  // computed before the clock starts, as scheduler-bench does
            // (scheduleAtFixedRate reads System.nanoTime() per call; scheduler-bench's schedule_ns
            // uses the matching call, a first run after a delay)
            for (int i = 0; i < n; i++) delays[i] = far + i * 1000L;
            long t0 = System.nanoTime();
            for (int i = 0; i < n; i++) handles.add(ex.scheduleAtFixedRate(body, delays[i], 1_000_000_000L, TimeUnit.NANOSECONDS));
            long t1 = System.nanoTime();
            for (ScheduledFuture<?> h : handles) h.cancel(false);
            long t2 = System.nanoTime();
            if (ex.getQueue().size() != 0) throw new IllegalStateException("queue not empty");
            if (round >= 2) { // rounds 0-1 warm up the JIT
                bestSchedule = Math.min(bestSchedule, t1 - t0);
                bestCancel = Math.min(bestCancel, t2 - t1);
            }
        }
        System.out.printf("RESULT impl=java metric=schedule_ns value=%.1f%n", (double) bestSchedule / n);
        System.out.printf("RESULT impl=java metric=cancel_ns value=%.1f%n", (double) bestCancel / n);
        System.out.printf("RESULT impl=java metric=cancel_all_ms value=%.2f%n", bestCancel / 1e6);
        ex.shutdownNow();
    }

    static long rssBytes() throws Exception {
        String[] f = new String(Files.readAllBytes(Paths.get("/proc/self/statm"))).trim().split(" ");
        return Long.parseLong(f[1]) * 4096L;
    }

    static void rss(int n) throws Exception {
        ScheduledThreadPoolExecutor ex = executor();
        Runnable body = () -> {};
        List<ScheduledFuture<?>> warm = new ArrayList<>();
        for (int i = 0; i < 1000; i++) warm.add(ex.scheduleAtFixedRate(body, 3600, 1, TimeUnit.SECONDS));
        for (ScheduledFuture<?> h : warm) h.cancel(false);
        List<ScheduledFuture<?>> handles = new ArrayList<>(n);
        System.gc();
        Thread.sleep(200);
        long before = rssBytes();
        long heapBefore = Runtime.getRuntime().totalMemory() - Runtime.getRuntime().freeMemory();
        for (int i = 0; i < n; i++) handles.add(ex.scheduleAtFixedRate(body, 3_600_000_000_000L + i * 1000L, 1_000_000_000L, TimeUnit.NANOSECONDS));
        System.gc();
        Thread.sleep(200);
        long after = rssBytes();
        long heapAfter = Runtime.getRuntime().totalMemory() - Runtime.getRuntime().freeMemory();
        long handleBytes = 4L * n; // the caller's ArrayList slots (compressed oops)
        // The bar's figure is the issue's: RSS delta / jobs, the caller's list included.
        System.out.printf("RESULT impl=java metric=rss_bytes_per_job value=%.1f%n", (double) (after - before) / n);
        System.out.printf("INFO java rss per job without the caller's list: %.1f bytes%n", (double) (after - before - handleBytes) / n);
        System.out.printf("INFO java live heap per job after GC: %.1f bytes%n", (double) (heapAfter - heapBefore - handleBytes) / n);
        for (ScheduledFuture<?> h : handles) h.cancel(false);
        ex.shutdownNow();
    }

    public static void main(String[] args) throws Exception {
        String mode = args.length > 0 ? args[0] : "all";
        boolean quick = Arrays.asList(args).contains("--quick");
        if (mode.equals("lateness") || mode.equals("all")) {
            // SCHEDULER_BENCH_SCENARIO=<name>[,<name>...] runs those scenarios only, as in scheduler-bench
            String env = System.getenv("SCHEDULER_BENCH_SCENARIO");
            java.util.List<String> only = env == null ? null : Arrays.asList(env.split(","));
            if (only == null || only.contains("spread-100k-1s")) lateness("spread-100k-1s", 100_000, 1_000_000_000L, false, quick ? 2 : 4);
            if (only == null || only.contains("spread-10k-100ms")) lateness("spread-10k-100ms", 10_000, 100_000_000L, false, quick ? 10 : 30);
            if (only == null || only.contains("aligned-100k-1s")) lateness("aligned-100k-1s", 100_000, 1_000_000_000L, true, quick ? 2 : 4);
            if (only == null || only.contains("aligned-10k-100ms")) lateness("aligned-10k-100ms", 10_000, 100_000_000L, true, quick ? 10 : 30);
        }
        if (mode.equals("cost") || mode.equals("all")) cost(100_000, 6);
        if (mode.equals("rss")) rss(100_000);
    }
}
