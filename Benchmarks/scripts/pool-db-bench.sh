#!/usr/bin/env bash
# Issue 3's real-database bar, side by side in one run: 10 connections, 64 concurrent workers
# running `SELECT 1`, queries/s for
#   pgbench -n -M extended -c 10, with its default one thread (-j 1, the issue's literal command)
#   and with -j 2 (10 clients = 10 connections, one query in flight each),
#   PoolKit ConnectionPool<PostgresConnection> (busyPoll default, busyPoll 0, and workers that
#   prefer PostgresConnection.preferredExecutor, the reactor thread),
#   postgres-nio's PostgresClient (10 connections),
#   asyncpg's pool (min=max=10; asyncio, and uvloop),
# back to back for each round on one throwaway server; prints each rate and the ratios.
#   Benchmarks/scripts/pool-db-bench.sh [seconds] [rounds]
# Settings: PGPORT_LOCAL (default 54341 here, so it does not collide with a scripts/local-postgres.sh
# server on its default port), PGDIR_LOCAL, WARMUP (seconds, default 2).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$here/.." && pwd)
secs=${1:-10}
rounds=${2:-3}
warmup=${WARMUP:-2}
export PGPORT_LOCAL=${PGPORT_LOCAL:-54341}
export PGDIR_LOCAL=${PGDIR_LOCAL:-/tmp/realtime-sync-pool-bench-pg}
port=$PGPORT_LOCAL

# asyncpg (and uvloop) from PyPI into a venv next to the script (git-ignored).
venv="$here/python/.venv"
if ! "$venv/bin/python" -c 'import asyncpg, uvloop' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q asyncpg uvloop
fi
py="$venv/bin/python"

(cd "$here" && nice -n 5 swift build -c release --product pool-bench >/dev/null)
bin="$here/.build/release/pool-bench"

script=$(mktemp); printf 'SELECT 1;\n' > "$script"
results=$(mktemp)
trap '"$root/scripts/local-postgres.sh" stop; rm -f "$script" "$results"' EXIT
url=$("$root/scripts/local-postgres.sh" start)

echo "pool-db-bench: ${secs}s timed (+${warmup}s warm-up) per run, 10 connections, 64 workers, SELECT 1, $rounds rounds"
echo "swift: $(swift --version 2>&1 | head -1)"; echo "server: $(psql "$url" -Atc 'SHOW server_version')"
echo "load before: $(uptime | sed 's/.*load average: //')"
for r in $(seq 1 "$rounds"); do
  pg=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -n -M extended -c 10 -j 2 -T "$secs" -f "$script" postgres 2>/dev/null \
       | sed -nE 's/^tps = ([0-9.]+) .*/\1/p')
  echo "$r pgbench $pg" >> "$results"
  pg1=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -n -M extended -c 10 -j 1 -T "$secs" -f "$script" postgres 2>/dev/null \
       | sed -nE 's/^tps = ([0-9.]+) .*/\1/p')
  echo "$r pgbench-j1 $pg1" >> "$results"
  "$bin" postgres --url "$url" --seconds "$secs" --warmup "$warmup" --connections 10 --workers 64 \
    | sed -nE "s/^RESULT ([^ ]+) ([0-9.]+) .*/$r \1 \2/p" >> "$results"
  for loop in "" --uvloop; do
    "$py" "$here/python/asyncpg_pool_bench.py" --url "$url" --seconds "$secs" --warmup "$warmup" $loop \
      | sed -nE "s/^RESULT ([^ ]+) ([0-9.]+) .*/$r \1 \2/p" >> "$results"
  done
  echo "round $r done, load: $(uptime | sed 's/.*load average: //')"
done
python3 - "$results" <<'PY'
import sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, name, rate = line.split()
    rows[int(r)][name] = float(rate)
names = ["pgbench", "pgbench-j1", "ours", "ours-spin0", "ours-reactor", "nio", "asyncpg", "asyncpg-uvloop"]
label = {"pgbench": "pgbench -M extended -c 10 -j 2", "pgbench-j1": "pgbench -M extended -c 10 (-j 1)", "ours": "PoolKit (busyPoll 50us)", "ours-spin0": "PoolKit (busyPoll 0)", "ours-reactor": "PoolKit (workers on reactor)",
         "nio": "postgres-nio PostgresClient", "asyncpg": "asyncpg pool (asyncio)", "asyncpg-uvloop": "asyncpg pool (uvloop)"}
print()
print("queries/s " + "".join(f"{'round ' + str(r):>12}" for r in sorted(rows)) + f"{'median':>12}")
med = {}
for n in names:
    vals = [rows[r].get(n) for r in sorted(rows)]
    got = sorted(v for v in vals if v)
    med[n] = got[len(got) // 2] if got else None
    print(f"{label[n]:<30}" + "".join(f"{v:>12,.0f}" if v else f"{'-':>12}" for v in vals) + (f"{med[n]:>12,.0f}" if med[n] else ""))
print()
for ours in ["ours", "ours-spin0", "ours-reactor"]:
    for peer in ["pgbench", "pgbench-j1", "nio", "asyncpg", "asyncpg-uvloop"]:
        per = [rows[r][ours] / rows[r][peer] for r in sorted(rows) if rows[r].get(ours) and rows[r].get(peer)]
        bar = {"pgbench": " (bar: >= 0.9x)", "pgbench-j1": " (bar: >= 0.9x)", "nio": " (bar: > 1x)", "asyncpg": " (bar: > 1x)"}.get(peer, "")
        print(f"{label[ours]} / {label[peer]:<33}" + "".join(f"{x:>8.2f}x" for x in per) + bar)
PY
echo "load after: $(uptime | sed 's/.*load average: //')"
