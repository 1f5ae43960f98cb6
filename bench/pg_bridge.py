"""CPU per query of three ways to drive psycopg from trio (the cost under every database RPC).

* ``agentd Database``   agentd.store's path: `agentd.store.trio_pg` (psycopg's AsyncConnection with
  trio socket waits, a trio pool, a client-side deadline per call); before it, psycopg's async API
  on a trio-asyncio loop (~180-200 us CPU/query on this machine)
* ``asyncio (no trio)`` the same psycopg calls on plain asyncio with a psycopg_pool pool: the floor
  of psycopg itself
* ``trio-native``       the measurement prototype agentd's driver grew from: psycopg's
  AsyncConnection run directly by trio, its socket waits replaced (globally) by
  ``trio.lowlevel.wait_readable/writable``, a trivial free list of connections

Each runs ``SELECT $1::int`` sequentially and with 16 tasks over 10 connections, and reports the
process CPU (time.process_time) per query and queries/s. PostgreSQL runs in its own processes, so
its CPU is not counted. Prototype caveats: no cancellation (a cancelled wait would leave the
connection mid-query), no reconnects, no statement_timeout/enum setup, no deadline — what
agentd's driver adds on top of it.

    python bench/pg_bridge.py [--postgres-url URL] [--queries N]

Measured 2026-12-04 on the shared 2-core machine (load average ~7.5, so every figure is inflated
several-fold; read the ratios), median of 3 runs, µs CPU/query with 1 / 16 tasks:
trio-asyncio Database (main b9bdf57) 1876 / 2186; trio_pg Database 573 / 483; prototype 379 / 345;
plain asyncio + psycopg_pool 707 / 692.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import psycopg.waiting
import psycopg_pool
import trio
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUERY = "SELECT %s::int"
TASKS = 16
CONNS = 10


def _report(label: str, n: int, cpu: float, wall: float) -> None:
    print(f"{label:<34} {1e6 * cpu / n:8.0f} µs CPU/query {n / wall:9.0f} queries/s")


async def _trio_run(label: str, query: Callable[[], Awaitable[Any]], n: int, tasks: int) -> None:
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < n:
            done += 1
            await query()

    for _ in range(200):
        await query()
    c0, t0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    _report(f"{label}, {tasks} task(s)", n, time.process_time() - c0, time.perf_counter() - t0)


async def bench_agentd(url: str, n: int) -> None:
    from agentd.store import open_database

    async with open_database(url, max_size=CONNS) as db:
        for tasks in (1, TASKS):
            await _trio_run("agentd Database (trio_pg)", lambda: db.fetchone(QUERY, [1]), n, tasks)


def bench_asyncio(url: str, n: int) -> None:
    async def main() -> None:
        pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            url, kwargs={"autocommit": True, "row_factory": dict_row}, max_size=CONNS, open=False
        )
        await pool.open(wait=True)

        async def query() -> Any:
            async with pool.connection() as conn:
                return await (await conn.execute(QUERY, [1])).fetchone()

        for tasks in (1, TASKS):
            done = 0

            async def worker() -> None:
                nonlocal done
                while done < n:
                    done += 1
                    await query()

            for _ in range(200):
                await query()
            c0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(tasks)))
            _report(
                f"asyncio (no trio), {tasks} task(s)", n, time.process_time() - c0, time.perf_counter() - t0
            )
        await pool.close()

    asyncio.run(main())


async def _trio_wait(gen: Any, fileno: int, interval: float = 0.0, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - psycopg signature
    try:
        state = next(gen)
        while True:
            if state & psycopg.waiting.WAIT_W:
                await trio.lowlevel.wait_writable(fileno)
                state = gen.send(psycopg.waiting.READY_W)
            else:
                await trio.lowlevel.wait_readable(fileno)
                state = gen.send(psycopg.waiting.READY_R)
    except StopIteration as stop:
        return stop.value


async def bench_native(url: str, n: int) -> None:
    # Runs last: the patch below changes psycopg's global async wait.
    psycopg.waiting.wait_async = _trio_wait  # type: ignore[assignment]
    syncs = [psycopg.connect(url, autocommit=True) for _ in range(CONNS)]
    free: list[psycopg.AsyncConnection[Any]] = []
    for sync in syncs:
        conn: psycopg.AsyncConnection[Any] = psycopg.AsyncConnection(sync.pgconn)
        conn.row_factory = dict_row  # type: ignore[assignment]
        free.append(conn)
    lot = trio.lowlevel.ParkingLot()

    async def query() -> Any:
        while not free:
            await lot.park()
        conn = free.pop()
        try:
            return await (await conn.execute(QUERY, [1])).fetchone()
        finally:
            free.append(conn)
            lot.unpark()

    for tasks in (1, TASKS):
        await _trio_run("trio-native (prototype)", query, n, tasks)
    for sync in syncs:
        sync.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--queries", type=int, default=4000)
    args = parser.parse_args()
    bench_asyncio(args.postgres_url, args.queries)
    trio.run(bench_agentd, args.postgres_url, args.queries)
    trio.run(bench_native, args.postgres_url, args.queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
