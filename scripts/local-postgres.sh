#!/usr/bin/env bash
# A PostgreSQL for local runs and benchmarks: wal_level=logical on 127.0.0.1.
#   scripts/local-postgres.sh start   # prints the URL
#   scripts/local-postgres.sh url
#   scripts/local-postgres.sh stop    # stops it and removes its folder
# Settings: PGPORT_LOCAL (default 54329), PGDIR_LOCAL (default /tmp/realtime-sync-local-pg).
set -euo pipefail
port=${PGPORT_LOCAL:-54329}
dir=${PGDIR_LOCAL:-/tmp/realtime-sync-local-pg}
bin=$(dirname "$(readlink -f "$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")")
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
url="postgres://postgres@127.0.0.1:${port}/postgres?sslmode=disable"
case "${1:-}" in
  start)
    if [ ! -d "$dir/data" ]; then
      mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres: "$dir"
      as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
      cat >> "$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
wal_level = logical
max_replication_slots = 40
max_wal_senders = 40
max_connections = 300
fsync = off
full_page_writes = off
shared_buffers = 128MB
CONF
    fi
    if ! as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
    fi
    echo "$url" ;;
  stop)
    [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    rm -rf "$dir" ;;
  url) echo "$url" ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
