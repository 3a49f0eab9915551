#!/usr/bin/env bash
# Issue 2's bar: SELECT $1::int round trips on one PostgresConnection vs pgbench -M extended -c 1,
# same statement, same server, back to back. Prints both rates and the ratio.
#   Benchmarks/scripts/pg-roundtrip.sh [seconds] [rounds]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$here/.." && pwd)
secs=${1:-10}
rounds=${2:-3}
(cd "$here" && swift build -c release --product pg-roundtrip >/dev/null)
bin="$here/.build/release/pg-roundtrip"
url=$("$root/scripts/local-postgres.sh" start)
trap '"$root/scripts/local-postgres.sh" stop' EXIT
port=${PGPORT_LOCAL:-54329}
script=$(mktemp); printf '\\set x random(1, 1000000)\nSELECT :x::int;\n' > "$script"
for r in $(seq 1 "$rounds"); do
  ours=$("$bin" "$url" "$secs" | sed -E 's/.*= ([0-9]+) per second/\1/')
  ours0=$("$bin" "$url" "$secs" 0 | sed -E 's/.*= ([0-9]+) per second/\1/')
  oursR=$("$bin" "$url" "$secs" 0 reactor | sed -E 's/.*= ([0-9]+) per second/\1/')
  theirs=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -n -M extended -c 1 -T "$secs" -f "$script" postgres 2>/dev/null \
           | sed -nE 's/^tps = ([0-9.]+) .*/\1/p')
  python3 -c "p=float($theirs); print(f'round $r (load $(cut -d' ' -f1 /proc/loadavg)): pgbench {p:,.0f}/s | PostgresConnection default {float($ours):,.0f}/s {float($ours)/p:.3f}x | busyPoll 0 {float($ours0):,.0f}/s {float($ours0)/p:.3f}x | on reactor executor {float($oursR):,.0f}/s {float($oursR)/p:.3f}x')"
done
rm -f "$script"
