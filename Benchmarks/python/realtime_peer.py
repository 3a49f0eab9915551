"""A realtime server of the kind people write by hand, as realtime-bench's peer (issue 7).

A row trigger sends each change with pg_notify (the row as JSON, its commit time taken by
clock_timestamp() inside the transaction); one psycopg 3 connection LISTENs on the channel and
the `websockets` library broadcasts each change to every client subscribed to its table. It
speaks enough of realtime-sync's protocol (docs/PROTOCOL.md) for realtime-bench to drive it
unchanged: `subscribe` -> `subscribed`, then `{"type":"change","ids":[...],...,"commit_time":...,
"new":{...}}`; `unsubscribe` -> `unsubscribed`. Filters, auth, resume and snapshots are not
implemented (a filter is accepted and ignored).

    python realtime_peer.py --database-url postgres://... --table public.bench_rows --port 8090
"""
import argparse
import asyncio
import json
import signal
from collections import defaultdict

import psycopg
from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.datastructures import Headers

CHANNEL = "realtime_peer"

SETUP = """
CREATE OR REPLACE FUNCTION realtime_peer_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('realtime_peer', json_build_object(
    'op', TG_OP,
    'table', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
    'xid', txid_current(),
    'commit_time', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'new', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE row_to_json(NEW) END,
    'old', CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE row_to_json(OLD) END)::text);
  RETURN NULL;
END $$;
"""

# websocket -> {table: tuple of subscription ids}
clients: dict = {}
subscriptions: dict = {}
sequence = 0


def qualified(table: str) -> str:
    return table if "." in table else "public." + table


def cursor() -> str:
    return f"{0:016X}.{sequence:08X}"


async def handler(ws):
    by_id = {}
    subscriptions[ws] = by_id
    clients[ws] = {}
    try:
        async for raw in ws:
            try:
                message = json.loads(raw)
            except ValueError:
                await ws.send(json.dumps({"type": "error", "code": "invalid_message", "message": "not JSON"}))
                continue
            kind = message.get("type")
            sub_id = message.get("id")
            if kind == "subscribe":
                by_id[sub_id] = qualified(message.get("table", ""))
            elif kind == "unsubscribe":
                by_id.pop(sub_id, None)
            else:
                await ws.send(json.dumps({"type": "error", "id": sub_id, "code": "unknown_type", "message": str(kind)}))
                continue
            tables = defaultdict(list)
            for i, table in by_id.items():
                tables[table].append(i)
            clients[ws] = {table: tuple(ids) for table, ids in tables.items()}
            reply = {"type": "subscribed", "id": sub_id, "cursor": cursor()} if kind == "subscribe" else {"type": "unsubscribed", "id": sub_id}
            await ws.send(json.dumps(reply, separators=(",", ":")))
    except ConnectionClosed:
        pass  # a client that drops without a close frame is routine here
    finally:
        clients.pop(ws, None)
        subscriptions.pop(ws, None)


async def listen(url: str):
    global sequence
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"LISTEN {CHANNEL}")
        async for note in conn.notifies():
            change = json.loads(note.payload)
            sequence += 1
            table = change["table"]
            groups = defaultdict(list)
            for ws, tables in clients.items():
                ids = tables.get(table)
                if ids:
                    groups[ids].append(ws)
            for ids, members in groups.items():
                message = {"type": "change", "ids": list(ids), "cursor": cursor(), "op": change["op"], "table": table,
                           "xid": change["xid"], "commit_time": change["commit_time"], "new": change["new"], "old": change["old"]}
                broadcast(members, json.dumps(message, separators=(",", ":")))


def process_request(connection, request):
    if request.path.split("?")[0] != "/ws":
        return Response(404, "Not Found", Headers([("Content-Length", "0")]), b"")
    return None


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--table", default="public.bench_rows")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    table = qualified(args.table)
    async with await psycopg.AsyncConnection.connect(args.database_url, autocommit=True) as conn:
        await conn.execute(SETUP)
        await conn.execute(f"CREATE OR REPLACE TRIGGER realtime_peer_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
                           "FOR EACH ROW EXECUTE FUNCTION realtime_peer_notify()")
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(handler, args.host, args.port, process_request=process_request, max_size=65536, backlog=4096):
        print(f"realtime_peer: ws://{args.host}:{args.port}/ws, LISTEN {CHANNEL} on {table}", flush=True)
        listener = asyncio.create_task(listen(args.database_url))
        await asyncio.wait([listener, stop], return_when=asyncio.FIRST_COMPLETED)
        if listener.done():
            listener.result()
        listener.cancel()
    async with await psycopg.AsyncConnection.connect(args.database_url, autocommit=True) as conn:
        await conn.execute(f"DROP TRIGGER IF EXISTS realtime_peer_notify ON {table}")


if __name__ == "__main__":
    asyncio.run(main())
