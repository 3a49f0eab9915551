#!/usr/bin/env bash
# Runs the scheduler benchmarks: our JobScheduler and the naive Swift baseline
# (scheduler-bench), and Java's ScheduledThreadPoolExecutor peer, in one run,
# then prints every figure with ratios.   Usage: Benchmarks/scripts/scheduler-bench.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK="${1:-}"
OUT=".build/scheduler-bench-results.txt"

nice -n 5 swift build -c release --product scheduler-bench >/dev/null
BIN="$(swift build -c release --show-bin-path)/scheduler-bench"
mkdir -p .build/java-peer
javac -d .build/java-peer java/SchedulerPeer.java
JAVA="java -cp .build/java-peer SchedulerPeer"

: > "$OUT"
run() { echo "+ $*" >&2; "$@" | tee -a "$OUT" | grep -E "^(WARN|INFO)" >&2 || true; }
# one process per implementation: run in one process after the naive
# baseline (100k tasks just torn down), ours measured 2.3x slower on aligned-10k
run "$BIN" lateness ours $QUICK
run "$BIN" lateness naive $QUICK
run $JAVA lateness $QUICK
run "$BIN" cost all
run $JAVA cost
run "$BIN" rss ours
run "$BIN" rss naive
run $JAVA rss

echo
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(swift --version 2>/dev/null | head -1), $(java -version 2>&1 | head -1)"
awk '
/^RESULT/ {
  delete kv
  for (i = 2; i <= NF; i++) { split($i, a, "="); kv[a[1]] = a[2] }
  if ("scenario" in kv) {
    key = kv["scenario"]; scen[key] = 1
    p50[key, kv["impl"]] = kv["p50_us"]; p99[key, kv["impl"]] = kv["p99_us"]
    fires[key, kv["impl"]] = kv["fires"]; expect[key, kv["impl"]] = kv["expected"]
  } else {
    met[kv["metric"]] = 1; val[kv["metric"], kv["impl"]] = kv["value"]
  }
}
function ratio(a, b) { return (b + 0 > 0) ? sprintf("%.2f", a / b) : "-" }
END {
  printf "\n%-18s %12s %12s %12s %10s %10s  %s\n", "lateness p99 (us)", "ours", "naive", "java", "ours/naive", "ours/java", "fires ours/naive/java of expected"
  n = split("spread-100k-1s spread-10k-100ms aligned-100k-1s aligned-10k-100ms", order, " ")
  for (i = 1; i <= n; i++) { s = order[i]; if (!(s in scen)) continue
    printf "%-18s %12s %12s %12s %10s %10s  %s/%s/%s of %s\n", s, p99[s,"ours"], p99[s,"naive"], p99[s,"java"],
      ratio(p99[s,"ours"], p99[s,"naive"]), ratio(p99[s,"ours"], p99[s,"java"]),
      fires[s,"ours"], fires[s,"naive"], fires[s,"java"], expect[s,"ours"] }
  printf "\n%-18s %12s %12s %12s %10s %10s\n", "lateness p50 (us)", "ours", "naive", "java", "ours/naive", "ours/java"
  for (i = 1; i <= n; i++) { s = order[i]; if (!(s in scen)) continue
    printf "%-18s %12s %12s %12s %10s %10s\n", s, p50[s,"ours"], p50[s,"naive"], p50[s,"java"], ratio(p50[s,"ours"], p50[s,"naive"]), ratio(p50[s,"ours"], p50[s,"java"]) }
  printf "\n%-18s %12s %12s %12s %10s %10s\n", "cost", "ours", "naive", "java", "ours/naive", "ours/java"
  m = split("schedule_ns schedule_at_ns cancel_ns cancel_all_ms rss_bytes_per_job", morder, " ")
  for (i = 1; i <= m; i++) { k = morder[i]; if (!(k in met)) continue
    printf "%-18s %12s %12s %12s %10s %10s\n", k, val[k,"ours"], val[k,"naive"], val[k,"java"], ratio(val[k,"ours"], val[k,"naive"]), ratio(val[k,"ours"], val[k,"java"]) }
}' "$OUT"
echo
echo "raw lines: Benchmarks/$OUT"
