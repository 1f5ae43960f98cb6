"""Stats batcher (spec §9.2): 1 s interval, early flush at 80 % of 1024, one multi-row insert, counted
refusals past the bound, and the final flush on shutdown."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid

import pytest
import trio
import trio.lowlevel
import trio.testing

import agentd.testing
from agentd.batchers.stats import StatsBatcher
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.stats import AgentStatsRow, insert_agent_stats
from tests.services.audit_support import T0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump only after real idleness, so database round trips never look like idle time."""
    return agentd.testing.virtual_clock(0.2)


AGENT, WS, TPL, USER = (uuid.uuid4() for _ in range(4))


def row(n: int = 0, **kw: object) -> AgentStatsRow:
    fields: dict[str, object] = dict(
        id=uuid.uuid4(),
        created_at=T0 + dt.timedelta(seconds=n),
        user_id=USER,
        agent_id=AGENT,
        workspace_id=WS,
        template_id=TPL,
        connections_by_proto={"ssh": n, "vscode": 1},
        connection_count=n,
        rx_packets=1,
        rx_bytes=2,
        tx_packets=3,
        tx_bytes=4,
        connection_median_latency_ms=1.5,
        session_count_vscode=5,
        session_count_jetbrains=6,
        session_count_reconnecting_pty=7,
        session_count_ssh=8,
    )
    fields.update(kw)
    return AgentStatsRow(**fields)  # type: ignore[arg-type]


async def count(db: Database) -> int:
    return int(await db.fetchval("SELECT count(*) FROM workspace_agent_stats"))


async def test_insert_writes_every_column(db: Database) -> None:
    r = row(3, connection_median_latency_ms=math.nan, usage=True)
    assert await insert_agent_stats(db, [r, row(4)]) == 2
    got = await db.fetchone("SELECT * FROM workspace_agent_stats WHERE id = %s", [r.id])
    assert got is not None
    assert math.isnan(got.pop("connection_median_latency_ms"))
    assert got == {
        "id": r.id,
        "created_at": T0 + dt.timedelta(seconds=3),
        "user_id": USER,
        "agent_id": AGENT,
        "workspace_id": WS,
        "template_id": TPL,
        "connections_by_proto": {"ssh": 3, "vscode": 1},
        "connection_count": 3,
        "rx_packets": 1,
        "rx_bytes": 2,
        "tx_packets": 3,
        "tx_bytes": 4,
        "session_count_vscode": 5,
        "session_count_jetbrains": 6,
        "session_count_reconnecting_pty": 7,
        "session_count_ssh": 8,
        "usage": True,
    }
    assert json.dumps(got["connections_by_proto"])  # a JSON object per row


async def test_nul_in_a_protocol_name_does_not_fail_the_batch(db: Database) -> None:
    assert await insert_agent_stats(db, [row(1, connections_by_proto={"s\x00sh": 1}), row(2)]) == 2
    assert await db.fetchval(
        "SELECT connections_by_proto FROM workspace_agent_stats WHERE connection_count = 1"
    ) == {"ssh": 1}


async def test_resending_a_batch_is_harmless(db: Database) -> None:
    """A write cancelled at shutdown may have committed; the final flush re-sends it with new rows."""
    first = [row(1), row(2)]
    assert await insert_agent_stats(db, first) == 2
    assert await insert_agent_stats(db, [*first, row(3)]) == 1
    assert await count(db) == 3


async def test_interval_flush_every_second(db: Database, clock: trio.testing.MockClock) -> None:
    b = StatsBatcher(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        b.add(row(1))
        b.add(row(2))
        await trio.sleep(0.5)
        assert await count(db) == 0
        await trio.sleep(1)
        assert await count(db) == 2 and b.flushes == 1
        nursery.cancel_scope.cancel()


async def test_early_flush_at_80_percent(db: Database, clock: trio.testing.MockClock) -> None:
    b = StatsBatcher(db, batch_size=10, interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        for i in range(7):
            b.add(row(i))
        await trio.sleep(1)
        assert await count(db) == 0  # 70 %: waits for the interval
        b.add(row(7))  # 80 %
        await trio.sleep(1)
        assert await count(db) == 8 and b.pending == 0
        nursery.cancel_scope.cancel()


async def test_rows_past_the_bound_are_refused_and_counted(db: Database) -> None:
    b = StatsBatcher(db, batch_size=4, max_buffered=5)
    assert [b.add(row(i)) for i in range(7)] == [True] * 5 + [False] * 2
    assert b.dropped == 2 and b.pending == 5


async def test_flush_on_shutdown_loses_nothing(db: Database, clock: trio.testing.MockClock) -> None:
    b = StatsBatcher(db, batch_size=1024, interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        for i in range(1500):  # past the early-flush mark: one write in flight, the rest buffered
            b.add(row(i))
        await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert await count(db) == 1500
    assert not b.add(row(0)) and b.dropped == 1  # stopped


async def test_a_failed_insert_is_logged_and_counted_lost(
    db: Database, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    b = StatsBatcher(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        b.add(row(1, connection_count=2**70))  # out of bigint range: the server refuses the batch
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert await count(db) == 0 and b.pending == 0 and b.lost == 1
    assert any("writing 1 agent stats rows failed" in r.getMessage() for r in caplog.records)


async def _held_back(db: Database, locked: trio.Event, release: trio.Event) -> None:
    """Hold a lock that makes every insert into workspace_agent_stats wait."""
    async with db.transaction() as tx:
        await tx.execute("LOCK TABLE workspace_agent_stats IN EXCLUSIVE MODE")
        locked.set()
        await release.wait()


async def _waiting_insert_pid(db: Database) -> int:
    while True:
        pid = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO workspace_agent_stats%'"
        )
        if pid is not None:
            return int(pid)
        await trio.sleep(0.02)


async def test_shutdown_flush_retries_a_failed_write(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    """Acknowledged rows are retried at shutdown: the first write dies with its connection, the
    retry (on a new one) lands once the table is free again."""
    locked, release = trio.Event(), trio.Event()
    b = StatsBatcher(db, interval=3600)

    async def break_the_first_write() -> None:
        first = await _waiting_insert_pid(db)
        await db.execute("SELECT pg_terminate_backend(%s)", (first,))
        while await _waiting_insert_pid(db) == first:  # noqa: ASYNC110 - PostgreSQL has no event
            await trio.sleep(0.02)
        release.set()  # the retry is waiting, on a new connection: let it through

    async with trio.open_nursery() as outer:
        outer.start_soon(_held_back, db, locked, release)
        await locked.wait()
        outer.start_soon(break_the_first_write)
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            for i in range(5):
                b.add(row(i))
            nursery.cancel_scope.cancel()  # the final flush starts and waits for the lock
    assert await count(db) == 5 and b.lost == 0
    assert any("(will retry)" in r.getMessage() for r in caplog.records)


async def test_shutdown_flush_ends_at_the_cleanup_deadline_and_counts_the_rest(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    locked, release = trio.Event(), trio.Event()
    cleanup = CleanupDeadline()
    b = StatsBatcher(db, interval=3600, cleanup=cleanup)
    async with trio.open_nursery() as outer:
        outer.start_soon(_held_back, db, locked, release)
        await locked.wait()
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            for i in range(7):
                b.add(row(i))
            cleanup.move_to(trio.current_time() + 0.5)
            nursery.cancel_scope.cancel()
        release.set()
    assert await count(db) == 0 and b.lost == 7 and b.pending == 0
    assert any("7 acknowledged agent stats rows not written" in r.getMessage() for r in caplog.records)


async def test_expiring_the_cleanup_deadline_cuts_the_shutdown_flush_at_once(db: Database) -> None:
    """A second signal: the shielded final write stops now, not at its own 15 s timeout."""
    locked, release = trio.Event(), trio.Event()
    cleanup = CleanupDeadline()
    b = StatsBatcher(db, interval=3600, cleanup=cleanup)
    async with trio.open_nursery() as outer:
        outer.start_soon(_held_back, db, locked, release)
        await locked.wait()
        expired: list[float] = []

        async def second_signal() -> None:
            await _waiting_insert_pid(db)
            expired.append(trio.current_time())
            cleanup.expire()

        outer.start_soon(second_signal)
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run)
            b.add(row(1))
            nursery.cancel_scope.cancel()
        assert trio.current_time() - expired[0] < 5
        release.set()
    assert b.lost == 1
