#!/usr/bin/env bash
# Issue 5's bar: ChangeStream decodes a 200,000-row backlog (transactions of 100 rows) into
# ChangeEvents at >= 40,000 changes/s and >= 0.5x the rate pg_recvlogical (pgoutput, same
# publication) receives the same backlog, in the same run. Prints both rates and the ratio.
#   Benchmarks/scripts/capture-bench.sh [rows] [rowsPerTransaction] [rounds]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$here/.." && pwd)
rows=${1:-200000}
per=${2:-100}
rounds=${3:-3}
(cd "$here" && nice -n 5 swift build -c release --product capture-bench >/dev/null)
bin="$here/.build/release/capture-bench"
# A private server (own port and folder) so other benchmarks on this machine are not disturbed.
export PGPORT_LOCAL=${PGPORT_LOCAL:-54339}
export PGDIR_LOCAL=${PGDIR_LOCAL:-/tmp/realtime-sync-capture-bench-pg}
url=$("$root/scripts/local-postgres.sh" start)
trap '"$root/scripts/local-postgres.sh" stop' EXIT
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
  echo "round $r:"
  # Alternate who reads the backlog first, so neither always gets the warmer cache.
  if [ $((r % 2)) = 1 ]; then order=ours-first; else order=recv-first; fi
  "$bin" "$url" "$rows" "$per" "$order"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
