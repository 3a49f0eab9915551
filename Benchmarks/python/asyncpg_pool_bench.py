#!/usr/bin/env python3
"""Issue 3's Python peer: an asyncpg pool (min_size = max_size = 10) with 64 asyncio workers
running `SELECT 1` (asyncpg prepares and caches the statement: extended protocol), warmed up,
then timed; every result is checked.

    asyncpg_pool_bench.py --url URL [--seconds 10] [--warmup 2] [--connections 10] [--workers 64] [--uvloop]

Prints `RESULT asyncpg <queries/s> <queries>` (or `asyncpg-uvloop`), as pool-bench does.
Run it through Benchmarks/scripts/pool-db-bench.sh, which installs asyncpg into a venv.
"""
import argparse
import asyncio
import time

import asyncpg


async def main(args: argparse.Namespace) -> None:
    pool = await asyncpg.create_pool(args.url, min_size=args.connections, max_size=args.connections)
    done = 0
    wrong = 0
    stop = False

    async def worker() -> None:
        nonlocal done, wrong
        while not stop:
            async with pool.acquire() as conn:
                value = await conn.fetchval("SELECT 1")
            if value != 1:
                wrong += 1
            done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(args.workers)]
    await asyncio.sleep(args.warmup)
    before, start = done, time.perf_counter()
    await asyncio.sleep(args.seconds)
    after, elapsed = done, time.perf_counter() - start
    stop = True
    await asyncio.gather(*tasks)
    await pool.close()
    if wrong:
        raise SystemExit(f"{wrong} queries returned something other than 1")
    name = "asyncpg-uvloop" if args.uvloop else "asyncpg"
    print(f"RESULT {name} {(after - before) / elapsed:.0f} {after - before}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (asyncpg's own benchmarks do)")
    a = p.parse_args()
    if a.uvloop:
        import uvloop
        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
