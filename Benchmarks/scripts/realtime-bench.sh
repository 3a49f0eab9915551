#!/usr/bin/env bash
# Issue 7's bars, ours and a hand-written Python peer (Benchmarks/python/realtime_peer.py:
# trigger + pg_notify + psycopg LISTEN + websockets broadcast) in the same run, driven by the
# same client (realtime-bench) with the same scenarios; prints a table with ratios.
#   (a) latency: N clients each subscribed to all, R changes/s: p50 <= 5 ms, p99 <= 25 ms, no loss
#   (b) fan-out throughput: >= 100,000 delivered messages/s
#   (c) idle subscribed sockets: <= 30 KB server RSS each
#   (d) auth on vs off: <= 10 % less fan-out throughput than (b) (ours only; skipped when
#       `realtime-sync token` does not exist yet, or without --auth)
#
#   Benchmarks/scripts/realtime-bench.sh [quick|full] [--auth] [--only ours|peer] [--scenarios abcd]
# quick: small N and 3 s runs (a smoke test, ~1-2 min); full: the issue's scale (1,000 and
# 10,000 sockets; needs ~25k open files, raised below with ulimit -n as root).
# Settings: PGPORT_LOCAL (54343), PGDIR_LOCAL, OURS_PORT (18080), PEER_PORT (18090),
# THREADS (client event-loop threads, default: cores), SCEN_A/SCEN_B/SCEN_C/SCEN_D to override a
# scenario as "sockets rows/s seconds batch" (e.g. SCEN_A="1000 100 10 1").
# Every server is started fresh for each scenario (so RSS per socket is not hidden by memory
# an earlier scenario freed), on an emptied table, and stopped after it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$here/.." && pwd)
mode=quick; auth=0; only=""; scenarios=abcd
while [ $# -gt 0 ]; do
  case "$1" in
    quick|full) mode=$1 ;;
    --auth) auth=1 ;;
    --only) only=$2; shift ;;
    --scenarios) scenarios=$2; shift ;;
    *) echo "usage: $0 [quick|full] [--auth] [--only ours|peer] [--scenarios abcd]" >&2; exit 2 ;;
  esac
  shift
done
export PGPORT_LOCAL=${PGPORT_LOCAL:-54343}
export PGDIR_LOCAL=${PGDIR_LOCAL:-/tmp/realtime-sync-realtime-bench-pg}
ours_port=${OURS_PORT:-18080}
peer_port=${PEER_PORT:-18090}
threads=${THREADS:-$(nproc)}
table=public.bench_rows

# name  sockets  rows/s  seconds  batch(rows per transaction)
if [ "$mode" = full ]; then
  scen_a="1000 1000 10 1"; scen_b="1000 200 10 1"; scen_c="10000 0 0 1"
else
  scen_a="50 200 3 1"; scen_b="100 500 3 5"; scen_c="500 0 0 1"
fi
scen_a=${SCEN_A:-$scen_a}; scen_b=${SCEN_B:-$scen_b}; scen_c=${SCEN_C:-$scen_c}
scen_d=${SCEN_D:-$scen_b}

# Sockets: client and server each need one descriptor per socket (plus slack).
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 12000 ] && [ "$mode" = full ]; then
  echo "realtime-bench: ulimit -n is $(ulimit -n); scenario (c) needs ~12,000 per process: run as root or raise the hard limit (ulimit -Hn)" >&2
fi

# Python peer: a venv beside it (git-ignored) from PyPI, pinned by requirements.txt.
venv="$here/python/.venv"
if ! "$venv/bin/python" -c 'import websockets, psycopg' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/python/requirements.txt"
fi
py="$venv/bin/python"

echo "building realtime-sync and realtime-bench (release)..."
(cd "$root" && nice -n 5 swift build -c release --product realtime-sync >/dev/null)
(cd "$here" && nice -n 5 swift build -c release --product realtime-bench >/dev/null)
server_bin="$root/.build/release/realtime-sync"
bench_bin="$here/.build/release/realtime-bench"

results=$(mktemp); logdir=$(mktemp -d /tmp/realtime-bench-logs.XXXXXX)
server_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
cleanup() { stop_server; "$root/scripts/local-postgres.sh" stop; rm -f "$results"; }
trap cleanup EXIT
url=$("$root/scripts/local-postgres.sh" start)
# The table is recreated, which drops it from any publication of an earlier run on the same
# server: drop that publication too, so the server creates it anew for this table.
psql -q "$url" -v ON_ERROR_STOP=1 -c "DROP TABLE IF EXISTS $table; DROP PUBLICATION IF EXISTS realtime_bench; CREATE TABLE $table (id int8 PRIMARY KEY, client_ts int8 NOT NULL, payload text)"

token=""
token_note=""
if [ "$auth" = 1 ]; then
  # `serve` is the default subcommand, so `token --help` would not fail: look in the subcommand list.
  if "$server_bin" --help 2>/dev/null | sed -n '/SUBCOMMANDS/,$p' | grep -qE '^ +token( |$)'; then
    secret=realtime-bench-secret-0123456789abcdef  # >= 32 bytes (HS256)
    # A mandatory filter that every row passes (so that losses still count), not the empty
    # one: the per-change check of a token's filter is the cost (d) is about.
    token=$("$server_bin" token --secret "$secret" --table "$table=id=gt.0" --ttl 1h | tail -1)
  else
    token_note="scenario (d) skipped: \`realtime-sync token\` does not exist in this build yet (auth lands separately)"
  fi
else
  token_note="scenario (d) skipped: run with --auth to measure auth on vs off"
fi

wait_http() { # port path: until the listener answers at all
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1$2" || true)
    [ "$code" != 000 ] && [ "$code" != 503 ] && return 0
    sleep 0.1
  done
  echo "server on port $1 did not come up; log: $logdir" >&2; return 1
}

start_server() { # which scenario [secret]
  # An emptied table (ids restart at 1) and no trigger left by a peer that did not exit cleanly.
  psql -q "$url" -c "TRUNCATE $table; DROP TRIGGER IF EXISTS realtime_peer_notify ON $table" >/dev/null 2>&1
  case "$1" in
    ours|ours-auth)
      local extra=()
      [ "$1" = ours-auth ] && extra=(--jwt-secret "$secret")
      psql -q "$url" -Atc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'realtime_bench'" >/dev/null
      "$server_bin" serve --database-url "$url" --tables "$table" --port "$ours_port" --slot realtime_bench \
        --publication realtime_bench --log-level warning "${extra[@]}" > "$logdir/$1-$2.log" 2>&1 &
      server_pid=$!
      wait_http "$ours_port" /readyz
      ws="ws://127.0.0.1:$ours_port/ws" ;;
    peer)
      "$py" "$here/python/realtime_peer.py" --database-url "$url" --table "$table" --port "$peer_port" > "$logdir/$1-$2.log" 2>&1 &
      server_pid=$!
      wait_http "$peer_port" /ws
      ws="ws://127.0.0.1:$peer_port/ws" ;;
  esac
}

run_scenario() { # server scenario
  local which=$1 name=$2 spec
  eval "spec=\$scen_$name"
  read -r sockets rate secs batch <<< "$spec"
  start_server "$which" "$name"
  local tok=()
  [ "$which" = ours-auth ] && tok=(--token "$token")
  echo "--- ($name) $which: $sockets sockets, $rate rows/s, ${secs}s; load $(cut -d' ' -f1-3 /proc/loadavg)"
  # The server's CPU time over the run (utime + stime): at a load both servers keep up with,
  # delivered/s is the offered rate, and CPU per delivered message is what differs.
  local cpu0; cpu0=$(awk '{print $14+$15}' "/proc/$server_pid/stat" 2>/dev/null || echo "")
  "$bench_bin" --url "$ws" --database-url "$url" --sockets "$sockets" --rate "$rate" --duration "$secs" --batch "$batch" \
    --server-pid "$server_pid" --threads "$threads" --label "$name/$which" "${tok[@]}" 2>&1 | tee "$logdir/bench-$which-$name.txt" \
    | grep -E '^(connect|server RSS|delivered|latency|losses|sockets closed|first failure|realtime-bench:)' || true
  local cpu1; cpu1=$(awk '{print $14+$15}' "/proc/$server_pid/stat" 2>/dev/null || echo "")
  local cpu_s=nan
  # Only when both readings exist (a server that exited meanwhile has no figure).
  if [ -n "$cpu0" ] && [ -n "$cpu1" ]; then
    cpu_s=$(awk -v a="$cpu0" -v b="$cpu1" -v t="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / t }')
  fi
  echo "server CPU over the run: ${cpu_s} s"
  grep '^RESULT' "$logdir/bench-$which-$name.txt" | sed "s/\$/ server_cpu_s=$cpu_s secs=$secs/" >> "$results" || echo "RESULT label=$name/$which failed=1" >> "$results"
  stop_server
}

echo "realtime-bench.sh $mode: $(swift --version 2>&1 | head -1); $(psql "$url" -Atc 'SHOW server_version'); client threads $threads; logs in $logdir"
echo "load before: $(uptime | sed 's/.*load average: //')"
for name in a b c; do
  case "$scenarios" in *$name*) ;; *) continue ;; esac
  [ "$only" = peer ] || run_scenario ours "$name"
  [ "$only" = ours ] || run_scenario peer "$name"
done
case "$scenarios" in *d*)
  if [ -n "$token" ]; then run_scenario ours-auth d; else echo "$token_note"; fi ;;
esac
echo "load after: $(uptime | sed 's/.*load average: //')"

python3 - "$results" "$mode" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    scen, server = fields["label"].split("/")
    rows[(scen, server)] = fields
def num(f, k):
    try: return float(f.get(k, "nan"))
    except ValueError: return float("nan")
def fmt(v, d=2):
    return "-" if v != v else (f"{v:,.0f}" if d == 0 else f"{v:,.{d}f}")
print()
print(f"{'scenario':<24}{'server':<10}{'p50 ms':>9}{'p99 ms':>9}{'delivered/s':>13}{'losses':>9}{'closed':>8}{'KB/socket':>11}{'load':>7}")
for scen, title in [("a", "(a) latency"), ("b", "(b) fan-out"), ("c", "(c) idle RSS"), ("d", "(d) auth on")]:
    for server in ["ours", "peer", "ours-auth"]:
        f = rows.get((scen, server))
        if not f: continue
        if f.get("failed"):
            print(f"{title:<24}{server:<10}  failed (see log)"); continue
        print(f"{title:<24}{server:<10}{f['p50_ms']:>9}{f['p99_ms']:>9}{fmt(num(f,'delivered_per_s'),0):>13}{f['losses']:>9}{f['closed']:>8}{f['rss_kb_per_socket']:>11}{f['load']:>7}")
print()
def ratio(scen, key, better_low):
    o, p = rows.get((scen, "ours")), rows.get((scen, "peer"))
    if not o or not p or o.get("failed") or p.get("failed"): return "-"
    a, b = num(o, key), num(p, key)
    if a != a or b != b or a == 0 or b == 0: return "-"
    return f"{(b / a if better_low else a / b):.2f}x"
print("ratios (>1x: ours better): "
      f"(a) p50 {ratio('a','p50_ms',True)}, p99 {ratio('a','p99_ms',True)}; "
      f"(b) delivered/s {ratio('b','delivered_per_s',False)}; (c) KB/socket {ratio('c','rss_kb_per_socket',True)}")
o = rows.get(("a", "ours"))
if o and not o.get("failed"):
    print(f"bar (a) p50 <= 5 ms, p99 <= 25 ms, no loss: {'met' if num(o,'p50_ms') <= 5 and num(o,'p99_ms') <= 25 and o['losses'] == '0' else 'missed'}")
o = rows.get(("b", "ours"))
if o and not o.get("failed"):
    print(f"bar (b) >= 100,000 delivered/s: {'met' if num(o,'delivered_per_s') >= 100000 else 'missed'}" + (" (quick mode: offered load is below the bar)" if sys.argv[2] == "quick" else ""))
o = rows.get(("c", "ours"))
if o and not o.get("failed"):
    print(f"bar (c) <= 30 KB per idle socket: {'met' if num(o,'rss_kb_per_socket') <= 30 else 'missed'}")
d, b = rows.get(("d", "ours-auth")), rows.get(("b", "ours"))
if d and b and not d.get("failed") and not b.get("failed"):
    cost = 1 - num(d, 'delivered_per_s') / num(b, 'delivered_per_s')
    print(f"(d) delivered/s with auth vs without: {cost * 100:.1f} % fewer (both may be capped by the offered rate)")
    # Server CPU per delivered message: its inverse is the fan-out a saturated server reaches.
    # CPU seconds per delivered message: the runs' lengths may differ (SCEN_D).
    cb = num(b, 'server_cpu_s') / (num(b, 'delivered_per_s') * num(b, 'secs'))
    cd = num(d, 'server_cpu_s') / (num(d, 'delivered_per_s') * num(d, 'secs'))
    if cb == cb and cd == cd and cb > 0:
        capacity = 1 - cb / cd
        print(f"bar (d) auth costs <= 10 % of fan-out (server CPU per delivered message, same scenario: "
              f"{num(b, 'server_cpu_s')} s for {fmt(num(b, 'delivered_per_s'), 0)}/s without auth, {num(d, 'server_cpu_s')} s for {fmt(num(d, 'delivered_per_s'), 0)}/s with): "
              f"{capacity * 100:.1f} % less fan-out at saturation -> {'met' if capacity <= 0.10 else 'missed'}")
PY
