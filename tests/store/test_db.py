"""Database: queries, transactions, COPY, cancellation, timeouts, error translation."""

from __future__ import annotations

import uuid

import pytest
import trio

from agentd.store import Database, errors, open_database


async def test_fetch_helpers(db: Database) -> None:
    assert await db.fetchall("SELECT g AS n FROM generate_series(1, 3) g") == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert await db.fetchone("SELECT %(a)s::int AS a, %(b)s::text AS b", {"a": 7, "b": "x"}) == {
        "a": 7,
        "b": "x",
    }
    assert await db.fetchone("SELECT 1 WHERE false") is None
    assert await db.fetchval("SELECT %s::int + 1", [41]) == 42
    assert await db.fetchval("SELECT 1 WHERE false") is None


async def test_execute_returns_rowcount(db: Database) -> None:
    async with db.transaction() as tx:
        await tx.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
        assert await tx.execute("INSERT INTO t SELECT generate_series(1, 5)") == 5
        assert await tx.execute("UPDATE t SET x = x + 1 WHERE x > 3") == 2


async def test_transaction_commits_and_rolls_back(db: Database) -> None:
    await db.execute("CREATE TABLE kv (k text PRIMARY KEY, v int)")
    async with db.transaction() as tx:
        await tx.execute("INSERT INTO kv VALUES ('a', 1)")
    assert await db.fetchval("SELECT v FROM kv WHERE k = 'a'") == 1

    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO kv VALUES ('b', 2)")
            raise RuntimeError("boom")
    assert await db.fetchval("SELECT count(*) FROM kv WHERE k = 'b'") == 0

    with pytest.raises(errors.UniqueViolation) as info:
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO kv VALUES ('c', 3)")
            await tx.execute("INSERT INTO kv VALUES ('a', 9)")
    assert info.value.sqlstate == "23505"
    assert info.value.constraint == "kv_pkey"
    assert await db.fetchval("SELECT count(*) FROM kv") == 1


async def test_transaction_isolation(db: Database) -> None:
    async with db.transaction("repeatable read") as tx:
        assert await tx.fetchval("SHOW transaction_isolation") == "repeatable read"
    async with db.transaction("SERIALIZABLE") as tx:
        assert await tx.fetchval("SHOW transaction_isolation") == "serializable"
    with pytest.raises(ValueError, match="isolation"):
        async with db.transaction("chaos"):
            pass


async def test_copy_rows(db: Database) -> None:
    await db.execute("CREATE TABLE c (id uuid, n int, tags text[], note text)")
    rows = [(uuid.uuid4(), i, ["a", "b"], None if i % 2 else f"n{i}") for i in range(100)]
    assert await db.copy_rows("c", ["id", "n", "tags", "note"], rows) == 100
    assert await db.fetchval("SELECT sum(n) FROM c") == sum(range(100))
    assert await db.fetchval("SELECT tags FROM c LIMIT 1") == ["a", "b"]
    async with db.transaction() as tx:
        assert await tx.copy_rows("public.c", ["n"], [(1,), (2,)]) == 2
    assert await db.fetchval("SELECT count(*) FROM c") == 102


async def test_cancel_cancels_query_on_server(db_url: str) -> None:
    async with open_database(db_url, min_size=1, max_size=1) as db:
        backend = await db.fetchval("SELECT pg_backend_pid()")
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await db.execute("SELECT pg_sleep(30)")
        elapsed = trio.current_time() - start
        assert scope.cancelled_caught
        assert elapsed < 1.0
        # The interrupted connection was closed (never reused mid-protocol); the pool of one
        # opens a replacement, and the cancel request sent in the background stops the sleep.
        assert await db.fetchval("SELECT pg_backend_pid()") != backend
        sleeping = None
        with trio.move_on_after(5):
            while sleeping != 0:
                sleeping = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(30)%%'"
                )
                await trio.sleep(0.05)
        assert sleeping == 0


async def test_cancel_inside_transaction_rolls_back(db: Database) -> None:
    await db.execute("CREATE TABLE r (x int)")
    with trio.move_on_after(0.2):
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO r VALUES (1)")
            await tx.execute("SELECT pg_sleep(30)")
    assert await db.fetchval("SELECT count(*) FROM r") == 0
    assert await db.fetchval("SELECT 1") == 1


async def test_statement_timeout(db_url: str) -> None:
    async with open_database(db_url, statement_timeout_ms=100) as db:
        assert await db.fetchval("SHOW statement_timeout") == "100ms"
        with pytest.raises(errors.QueryCanceled):
            await db.execute("SELECT pg_sleep(5)")
        assert await db.fetchval("SELECT 2") == 2


async def test_default_statement_timeout(db: Database) -> None:
    assert await db.fetchval("SHOW statement_timeout") == "30s"


async def test_error_translation(db: Database) -> None:
    await db.execute("CREATE TABLE e (x int CONSTRAINT small CHECK (x < 10) NOT NULL)")
    with pytest.raises(errors.CheckViolation) as check:
        await db.execute("INSERT INTO e VALUES (11)")
    assert check.value.constraint == "small"
    with pytest.raises(errors.NotNullViolation):
        await db.execute("INSERT INTO e VALUES (NULL)")
    with pytest.raises(errors.DataError):
        await db.execute("SELECT 'nope'::int")
    with pytest.raises(errors.StoreError):
        await db.execute("SELEC 1")


async def test_unreachable_database_is_one_clear_line() -> None:
    with pytest.raises(errors.DatabaseUnavailable) as info:
        async with open_database("postgresql://nobody@127.0.0.1:1/nowhere", connect_timeout_s=2):
            pass
    message = str(info.value)
    assert "\n" not in message
    assert "127.0.0.1:1/nowhere" in message
    assert message.startswith("cannot connect to PostgreSQL")


async def test_concurrent_queries_share_pool(db: Database) -> None:
    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await db.fetchval("SELECT %s::int FROM pg_sleep(0.05)", [i]))

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(12))


async def test_enum_arrays_load_as_lists(db: Database) -> None:
    assert await db.fetchval("SELECT '{envbox,exectrace}'::workspace_agent_subsystem[]") == [
        "envbox",
        "exectrace",
    ]
    assert await db.fetchval("SELECT 'ready'::workspace_agent_lifecycle_state") == "ready"
    assert await db.fetchval("SELECT '{}'::display_app[]") == []


async def test_large_parameters_and_results(db: Database) -> None:
    """trio's socket waits carry results spanning many socket reads and writes (a large parameter
    out, a large result back)."""
    big = "x" * 1_000_000
    assert await db.fetchval("SELECT length(%s::text)", [big]) == 1_000_000
    rows = await db.fetchall("SELECT g, repeat('y', 100) AS pad FROM generate_series(1, 20000) AS g")
    assert len(rows) == 20000 and rows[-1]["g"] == 20000
