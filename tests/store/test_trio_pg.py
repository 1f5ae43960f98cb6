"""The trio-native psycopg driver and pool (agentd.store.trio_pg), against the real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest
import trio
import trio.testing

from agentd.store import trio_pg


async def _noop(conn: trio_pg.TrioConnection) -> None:
    pass


@asynccontextmanager
async def running_pool(url: str, **kwargs: object) -> AsyncIterator[trio_pg.TrioPool]:
    pool = trio_pg.TrioPool(trio_pg.keepalive_conninfo(url), _noop, **kwargs)  # type: ignore[arg-type]
    await pool.open()
    async with trio.open_nursery() as nursery:
        pool.attach(nursery)
        try:
            yield pool
        finally:
            pool.close()
            nursery.cancel_scope.cancel()


async def _val(conn: trio_pg.TrioConnection, sql: str) -> object:
    cur = await conn.execute(sql)  # type: ignore[arg-type]
    row = await cur.fetchone()
    assert row is not None
    return next(iter(row.values()))


async def test_keepalive_conninfo_keeps_what_the_url_sets() -> None:
    info = psycopg.conninfo.conninfo_to_dict(
        trio_pg.keepalive_conninfo("postgresql://u@h/db?keepalives_idle=60", application_name="x")
    )
    assert info["keepalives"] == "1"
    assert info["keepalives_idle"] == "60"
    assert info["tcp_user_timeout"] == "5000"
    assert info["application_name"] == "x"


async def test_connection_runs_queries_and_copy(db_url: str) -> None:
    conn = await trio_pg.connect(trio_pg.keepalive_conninfo(db_url))
    try:
        assert conn.autocommit
        assert await _val(conn, "SELECT 41 + 1") == 42
        await conn.execute("CREATE TEMP TABLE t (x int)")
        async with conn.cursor() as cur, cur.copy("COPY t (x) FROM STDIN") as copy:
            for i in range(1000):
                await copy.write_row((i,))
        assert await _val(conn, "SELECT sum(x) FROM t") == sum(range(1000))
        keepalives = await _val(conn, "SELECT 1")  # still usable after COPY
        assert keepalives == 1
    finally:
        await conn.close()


async def test_refused_parameter_keeps_the_connection(db_url: str) -> None:
    conn = await trio_pg.connect(db_url)
    try:
        pid = conn.pgconn.backend_pid
        with pytest.raises(psycopg.DataError):
            await conn.execute("SELECT %s::text", ["a\x00b"])
        assert not conn.lost
        assert await _val(conn, "SELECT pg_backend_pid()") == pid
    finally:
        await conn.close()


async def test_cancelled_statement_closes_connection_and_stops_on_server(db_url: str) -> None:
    async with running_pool(db_url, min_size=1, max_size=1) as pool:
        conn = await pool.acquire()
        pid = conn.pgconn.backend_pid
        with trio.move_on_after(0.2):
            await conn.execute("SELECT pg_sleep(30)")
        assert conn.lost and conn.closed
        pool.release(conn)
        assert pool.size == 0
        other = await pool.acquire()
        try:
            assert other.pgconn.backend_pid != pid
            alive = True
            with trio.move_on_after(5):
                while alive:
                    alive = bool(
                        await _val(other, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")
                    )
                    await trio.sleep(0.05)
            assert not alive  # cancelled, then gone with its closed socket
        finally:
            pool.release(other)


async def test_pool_bounds_and_bounded_wait(db_url: str) -> None:
    async with running_pool(db_url, min_size=0, max_size=2) as pool:
        a = await pool.acquire()
        b = await pool.acquire()
        assert pool.size == 2
        with pytest.raises(trio_pg.PoolTimeout, match="2 of 2"):
            await pool.acquire(timeout=0.1)
        got: list[trio_pg.TrioConnection] = []

        async def waiter() -> None:
            got.append(await pool.acquire(timeout=5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()  # the waiter is parked in acquire
            pool.release(a)
        assert got == [a]  # handed over to the waiter, not parked idle
        # A lost connection frees its slot for a waiter, which opens a fresh one.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            b._interrupted()
            pool.release(b)
        assert len(got) == 2 and got[1] is not b and not got[1].lost
        assert await _val(got[1], "SELECT 1") == 1
        pool.release(got[0])
        pool.release(got[1])
        assert pool.size == 2 and pool.idle == 2


async def test_pool_skips_connections_the_server_closed(db_url: str) -> None:
    async with running_pool(db_url, min_size=2, max_size=2) as pool:
        a = await pool.acquire()
        b = await pool.acquire()
        victim = b.pgconn.backend_pid
        pool.release(b)
        assert await _val(a, f"SELECT pg_terminate_backend({victim})") is True
        # the backend is gone once its FATAL message and EOF are on the idle socket
        with trio.fail_after(10):
            while await _val(a, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {victim}"):  # noqa: ASYNC110
                await trio.sleep(0.01)
        c = await pool.acquire()
        assert c is not b and c.pgconn.backend_pid != victim
        assert await _val(c, "SELECT 1") == 1
        pool.release(a)
        pool.release(c)


async def test_drain_replaces_connections(db_url: str) -> None:
    async with running_pool(db_url, min_size=1, max_size=2) as pool:
        a = await pool.acquire()
        pool.drain()
        pool.release(a)  # from the old generation: closed, not reused
        assert a.closed and pool.size == 0
        b = await pool.acquire()
        assert b is not a
        pool.release(b)


async def test_closed_pool_refuses(db_url: str) -> None:
    async with running_pool(db_url, min_size=1, max_size=1) as pool:
        a = await pool.acquire()
        pool.close()
        with pytest.raises(trio_pg.PoolClosed):
            await pool.acquire()
        pool.release(a)
        assert a.closed


async def test_notifies(db_url: str) -> None:
    listener = await trio_pg.connect(db_url)
    sender = await trio_pg.connect(db_url)
    try:
        await listener.execute("LISTEN ch")
        # Cancelling the wait leaves the listener usable.
        with trio.move_on_after(0.05):
            await trio_pg.wait_notifies(listener)
        assert not listener.lost
        await sender.execute("SELECT pg_notify('ch', 'hello')")
        notes: list[psycopg.Notify] = []
        with trio.fail_after(5):
            while not notes:
                notes = await trio_pg.wait_notifies(listener)
        assert [(n.channel, n.payload) for n in notes] == [("ch", "hello")]
        assert await _val(listener, "SELECT 2") == 2
    finally:
        await listener.close()
        await sender.close()


async def test_unreachable_server_fails_within_timeout() -> None:
    with trio.fail_after(5), pytest.raises(psycopg.OperationalError):
        await trio_pg.connect("postgresql://nobody@127.0.0.1:1/nowhere", timeout=2)
