#!/usr/bin/env bash
# Where the realtime server's CPU goes, per thread, without a profiler attached (perf, even
# without call graphs, distorts scenario (a) on this machine: p50 13-146 ms instead of 7-10).
# Starts the local PostgreSQL and our server, runs realtime-bench for 8 s, and reads every
# server thread's CPU time from /proc/<pid>/task/*/stat over 3 s in the middle of the run.
#
#   Benchmarks/scripts/realtime-threads.sh [sockets (1000)] [rows/s (1000)]
#
# CLIENT_ARGS adds realtime-bench options (e.g. "--threads 1").
# BENCH_BIN picks the client binary; RS_PORT the server's port (default 18080).
# RS_BIN picks the server binary (default .build/release/realtime-sync, built by
# realtime-bench.sh); copy two builds aside and alternate them to compare code versions.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export PGPORT_LOCAL=${PGPORT_LOCAL:-54343} PGDIR_LOCAL=${PGDIR_LOCAL:-/tmp/realtime-sync-realtime-bench-pg}
url=$(scripts/local-postgres.sh start)
psql -q "$url" -c "DROP TABLE IF EXISTS public.bench_rows; DROP PUBLICATION IF EXISTS realtime_bench; CREATE TABLE public.bench_rows (id int8 PRIMARY KEY, client_ts int8 NOT NULL, payload text)" 2>/dev/null
psql -q "$url" -Atc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'realtime_bench'" >/dev/null
"${RS_BIN:-.build/release/realtime-sync}" serve --database-url "$url" --tables public.bench_rows --port "${RS_PORT:-18080}" \
  --slot realtime_bench --publication realtime_bench --log-level warning > /tmp/realtime-threads-server.log 2>&1 &
server=$!
# On exit, wait for the server to be gone: the next run binds the same port.
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:${RS_PORT:-18080}/readyz" && break; sleep 0.1; done
"${BENCH_BIN:-Benchmarks/.build/release/realtime-bench}" --url "ws://127.0.0.1:${RS_PORT:-18080}/ws" --database-url "$url" --sockets "${1:-1000}" \
  --rate "${2:-1000}" --duration 8 --batch 1 --idle 1 --drain 3 ${CLIENT_ARGS:-} 2>&1 | grep -E "delivered [0-9]|latency commit" &
bench=$!
sleep 4
snapshot() { for t in /proc/$server/task/*; do echo "$(basename "$t") $(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done | sort; }
# The rest of the machine over the same 3 s: the client, PostgreSQL (every backend) and idle.
client=$(pgrep -n -f -- "--url ws://127.0.0.1:${RS_PORT:-18080}/ws" || true)
others() {
  local c=0 p=0 pid
  [ -n "$client" ] && c=$(awk '{print $14+$15}' "/proc/$client/stat" 2>/dev/null || echo 0)
  for pid in $(pgrep -u postgres postgres); do p=$((p + $(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || echo 0))); done
  echo "$c $p $(awk '/^cpu /{print $5+$6}' /proc/stat)"
}
o0=$(others); snapshot > /tmp/realtime-threads.0; sleep 3; snapshot > /tmp/realtime-threads.1; o1=$(others)
tick=$(getconf CLK_TCK)
read -r c0 p0 i0 <<< "$o0"; read -r c1 p1 i1 <<< "$o1"
echo "rest of the machine over 3 s (ms): client $(( (c1 - c0) * 1000 / tick )), postgres $(( (p1 - p0) * 1000 / tick )), idle (all cores) $(( (i1 - i0) * 1000 / tick ))"
echo "server CPU per thread over 3 s (ms):"
join /tmp/realtime-threads.0 /tmp/realtime-threads.1 | awk -v tick="$tick" '{d=($5-$3)*1000/tick; if (d>0) print "  " $2, d}' | sort -k2 -n -r
join /tmp/realtime-threads.0 /tmp/realtime-threads.1 | awk -v tick="$tick" '{t+=($5-$3)*1000/tick} END {print "  total", t}'
wait $bench
