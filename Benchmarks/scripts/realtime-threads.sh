#!/usr/bin/env bash
# Where the realtime server's CPU goes, per thread, without a profiler attached (perf, even
# without call graphs, distorts scenario (a) on this machine: p50 13-146 ms instead of 7-10).
# Starts the local PostgreSQL and our server, runs realtime-bench for 8 s, and reads every
# server thread's CPU time from /proc/<pid>/task/*/stat over 3 s in the middle of the run.
#
#   Benchmarks/scripts/realtime-threads.sh [sockets (1000)] [rows/s (1000)]
#
# RS_BIN picks the server binary (default .build/release/realtime-sync, built by
# realtime-bench.sh); copy two builds aside and alternate them to compare code versions.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export PGPORT_LOCAL=${PGPORT_LOCAL:-54343} PGDIR_LOCAL=${PGDIR_LOCAL:-/tmp/realtime-sync-realtime-bench-pg}
url=$(scripts/local-postgres.sh start)
psql -q "$url" -c "DROP TABLE IF EXISTS public.bench_rows; DROP PUBLICATION IF EXISTS realtime_bench; CREATE TABLE public.bench_rows (id int8 PRIMARY KEY, client_ts int8 NOT NULL, payload text)" 2>/dev/null
psql -q "$url" -Atc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'realtime_bench'" >/dev/null
"${RS_BIN:-.build/release/realtime-sync}" serve --database-url "$url" --tables public.bench_rows --port 18080 \
  --slot realtime_bench --publication realtime_bench --log-level warning > /tmp/realtime-threads-server.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18080/readyz && break; sleep 0.1; done
Benchmarks/.build/release/realtime-bench --url ws://127.0.0.1:18080/ws --database-url "$url" --sockets "${1:-1000}" \
  --rate "${2:-1000}" --duration 8 --batch 1 --idle 1 --drain 3 2>&1 | grep -E "delivered [0-9]|latency commit" &
bench=$!
sleep 4
snapshot() { for t in /proc/$server/task/*; do echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done | sort; }
snapshot > /tmp/realtime-threads.0; sleep 3; snapshot > /tmp/realtime-threads.1
tick=$(getconf CLK_TCK)
echo "server CPU per thread over 3 s (ms):"
join /tmp/realtime-threads.0 /tmp/realtime-threads.1 | awk -v tick="$tick" '{d=($5-$3)*1000/tick; if (d>0) print "  " $2, d}' | sort -k2 -n -r
join /tmp/realtime-threads.0 /tmp/realtime-threads.1 | awk -v tick="$tick" '{t+=($5-$3)*1000/tick} END {print "  total", t}'
wait $bench
