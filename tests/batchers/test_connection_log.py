"""Connection-log batcher (spec §9.7): in-batch merging, the SQL upsert, size/interval flushes, retries and
the final flush on shutdown."""

from __future__ import annotations

import datetime as dt
import logging
import random
import uuid

import attrs
import pytest
import trio
import trio.testing

import agentd.testing
from agentd.batchers.connection_log import Batch, ConnectionLogBatcher, merge
from agentd.model import AgentIdentity
from agentd.store import Database
from agentd.store.connection_logs import ConnectionLogRow, upsert_connection_logs
from tests.services.audit_support import T0, seed_agent


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump only after real idleness, so database round trips never look like idle time."""
    return agentd.testing.virtual_clock(0.2)


def event(
    ident: AgentIdentity | None,
    cid: uuid.UUID | None,
    *,
    at: dt.datetime,
    disconnect: bool = False,
    code: int | None = None,
    reason: str | None = None,
    ip: str | None = "10.0.0.1",
) -> ConnectionLogRow:
    ws = ident.workspace_id if ident else uuid.UUID(int=1)
    return ConnectionLogRow(
        id=uuid.uuid4(),
        connect_time=at,
        organization_id=ident.organization_id if ident else uuid.UUID(int=2),
        workspace_owner_id=ident.owner_id if ident else uuid.UUID(int=3),
        workspace_id=ws,
        workspace_name=ident.workspace_name if ident else "ws",
        agent_name=ident.agent_name if ident else "main",
        type="ssh",
        code=code if disconnect else None,
        ip=ip,
        user_agent=None,
        user_id=None,
        slug_or_port=None,
        connection_id=cid,
        disconnect_time=at if disconnect else None,
        disconnect_reason=reason,
    )


def t(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


async def rows(db: Database) -> list[dict[str, object]]:
    return await db.fetchall(
        "SELECT connection_id, connect_time, disconnect_time, disconnect_reason, code, host(ip) AS ip,"
        " type::text AS type, workspace_id, workspace_name, agent_name, workspace_owner_id, organization_id"
        " FROM connection_logs ORDER BY connect_time, connection_id"
    )


# --------------------------------------------------------------------------------------------------
# In-memory merging
# --------------------------------------------------------------------------------------------------

C1, C2 = uuid.UUID(int=101), uuid.UUID(int=102)


def test_merge_connect_then_disconnect() -> None:
    m = merge(event(None, C1, at=t(0)), event(None, C1, at=t(9), disconnect=True, code=255, reason="bye"))
    assert (m.connect_time, m.disconnect_time, m.code, m.disconnect_reason) == (t(0), t(9), 255, "bye")


def test_merge_standalone_disconnect_then_earlier_connect() -> None:
    m = merge(event(None, C1, at=t(9), disconnect=True, code=1), event(None, C1, at=t(0)))
    assert (m.connect_time, m.disconnect_time, m.code) == (t(0), t(9), 1)


def test_merge_keeps_earliest_connect_and_first_disconnect() -> None:
    m = merge(event(None, C1, at=t(5)), event(None, C1, at=t(2)))
    assert m.connect_time == t(2)
    first = event(None, C1, at=t(9), disconnect=True, code=1, reason="first")
    second = event(None, C1, at=t(10), disconnect=True, code=2, reason="second")
    m = merge(merge(event(None, C1, at=t(0)), first), second)
    assert (m.disconnect_time, m.code, m.disconnect_reason) == (t(9), 1, "first")


def test_batch_dedupes_by_connection_and_keeps_loose_rows() -> None:
    b = Batch()
    b.add(event(None, C1, at=t(0)))
    b.add(event(None, C1, at=t(1), disconnect=True))
    b.add(event(None, C2, at=t(2)))
    b.add(event(None, None, at=t(3)))
    b.add(event(None, None, at=t(4)))
    assert len(b) == 4
    taken = b.take()
    assert len(taken) == 4 and len(b) == 0
    [c1] = [r for r in taken if r.connection_id == C1]
    assert (c1.connect_time, c1.disconnect_time) == (t(0), t(1))


# --------------------------------------------------------------------------------------------------
# SQL upsert
# --------------------------------------------------------------------------------------------------


async def test_batch_boundaries_do_not_change_the_result(db: Database) -> None:
    """The same events merged in memory or upserted across batches give the same row, wherever the
    batch boundary falls."""
    ident = await seed_agent(db)
    events = [
        event(ident, C1, at=t(9), disconnect=True, code=7, reason="first"),
        event(ident, C1, at=t(1), ip="10.0.0.9"),
        event(ident, C1, at=t(12), disconnect=True, code=8, reason="second"),
        event(ident, C1, at=t(0)),
    ]
    for split in range(len(events) + 1):
        await db.execute("DELETE FROM connection_logs")
        for chunk in (events[:split], events[split:]):
            b = Batch()
            for e in chunk:
                b.add(e)
            await upsert_connection_logs(db, b.take())
        [row] = await rows(db)
        assert (row["connect_time"], row["disconnect_time"], row["code"], row["disconnect_reason"]) == (
            t(0),
            t(9),
            7,
            "first",
        ), f"split at {split}"


async def test_rows_without_connection_id_never_merge(db: Database) -> None:
    ident = await seed_agent(db)
    await upsert_connection_logs(db, [event(ident, None, at=t(0)), event(ident, None, at=t(1))])
    await upsert_connection_logs(db, [event(ident, None, at=t(2))])
    assert len(await rows(db)) == 3


# --------------------------------------------------------------------------------------------------
# The running batcher
# --------------------------------------------------------------------------------------------------


async def test_interval_flush_merges_connect_and_disconnect(
    db: Database, clock: trio.testing.MockClock
) -> None:
    ident = await seed_agent(db)
    batcher = ConnectionLogBatcher(db=db)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await batcher.submit(event(ident, C1, at=t(0)))
        await batcher.submit(event(ident, C1, at=t(3), disconnect=True, code=0, reason="exit"))
        await trio.sleep(1)
        assert await rows(db) == []  # waits for the 5-second tick
        await trio.sleep(5)
        [row] = await rows(db)
        assert (row["connect_time"], row["disconnect_time"], row["disconnect_reason"]) == (t(0), t(3), "exit")
        nursery.cancel_scope.cancel()


async def test_full_batch_is_written_at_once(db: Database, clock: trio.testing.MockClock) -> None:
    ident = await seed_agent(db)
    batcher = ConnectionLogBatcher(db=db, batch_size=3, interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for i in range(3):
            await batcher.submit(event(ident, uuid.UUID(int=i + 1), at=t(i)))
        await trio.sleep(1)  # far below the one-hour interval: only the size trigger can have written
        assert len(await rows(db)) == 3
        nursery.cancel_scope.cancel()


async def test_flush_on_shutdown_writes_everything_held(db: Database) -> None:
    ident = await seed_agent(db)
    batcher = ConnectionLogBatcher(db=db, interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        for i in range(50):
            await batcher.submit(event(ident, uuid.UUID(int=i + 1), at=t(i)))
        await batcher.submit(event(ident, uuid.UUID(int=1), at=t(99), disconnect=True, code=3))
        nursery.cancel_scope.cancel()
    got = await rows(db)
    assert len(got) == 50
    assert (got[0]["disconnect_time"], got[0]["code"]) == (t(99), 3)
    with pytest.raises(trio.ClosedResourceError):
        await batcher.submit(event(ident, C2, at=t(0)))


async def hide_table(db: Database) -> None:
    await db.execute("ALTER TABLE connection_logs RENAME TO connection_logs_away")


async def restore_table(db: Database) -> None:
    await db.execute("ALTER TABLE connection_logs_away RENAME TO connection_logs")


async def test_failed_write_is_retried(
    db: Database, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ident = await seed_agent(db)
    batcher = ConnectionLogBatcher(db=db)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await hide_table(db)
        await batcher.submit(event(ident, C1, at=t(0)))
        await trio.sleep(5.5)  # the tick's write fails and queues a retry
        assert len(batcher.retries) == 1
        await restore_table(db)
        await trio.sleep(1)
        assert len(await rows(db)) == 1
        assert not batcher.retries
        nursery.cancel_scope.cancel()
    assert any("write 1 connection logs; will retry" in r.getMessage() for r in caplog.records)


async def test_retries_give_up_after_three(
    db: Database, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ident = await seed_agent(db)
    batcher = ConnectionLogBatcher(db=db)
    caplog.set_level(logging.ERROR, logger="agentd.connection_log")
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await hide_table(db)
        await batcher.submit(event(ident, C1, at=t(0)))
        await trio.sleep(5.5)
        assert len(batcher.retries) == 1
        await trio.sleep(3.5)
        assert not batcher.retries
        await restore_table(db)
        nursery.cancel_scope.cancel()
    assert await rows(db) == []
    assert any("dropped 1 connection logs after 3 retries" in r.getMessage() for r in caplog.records)


async def test_retry_queue_drops_the_oldest_when_full(
    db: Database, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ident = await seed_agent(db)
    batcher = ConnectionLogBatcher(db=db, batch_size=1, retry_slots=2, retry_delay=3600)
    caplog.set_level(logging.ERROR, logger="agentd.connection_log")
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await hide_table(db)
        for i in range(3):
            await batcher.submit(event(ident, uuid.UUID(int=i + 1), at=t(i)))
        await trio.sleep(1)
        assert len(batcher.retries) == 2
        assert any("retry queue full: dropped 1 logs" in r.getMessage() for r in caplog.records)
        await restore_table(db)
        nursery.cancel_scope.cancel()  # the final flush writes the two queued batches
    assert [r["connection_id"] for r in await rows(db)] == [uuid.UUID(int=2), uuid.UUID(int=3)]


async def test_final_flush_merges_queued_retries_with_the_open_batch(
    db: Database, clock: trio.testing.MockClock
) -> None:
    ident = await seed_agent(db)
    batcher = ConnectionLogBatcher(db=db, retry_delay=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await hide_table(db)
        await batcher.submit(event(ident, C1, at=t(0)))
        await trio.sleep(5.5)
        assert len(batcher.retries) == 1
        await restore_table(db)
        await batcher.submit(event(ident, C1, at=t(4), disconnect=True, code=9))
        nursery.cancel_scope.cancel()
    [row] = await rows(db)
    assert (row["connect_time"], row["disconnect_time"], row["code"]) == (t(0), t(4), 9)


async def test_writes_carry_the_row_fields(db: Database) -> None:
    ident = await seed_agent(db)
    await upsert_connection_logs(db, [attrs.evolve(event(ident, C1, at=t(0)), ip=None)])
    [row] = await rows(db)
    assert row == {
        "connection_id": C1,
        "connect_time": t(0),
        "disconnect_time": None,
        "disconnect_reason": None,
        "code": None,
        "ip": None,
        "type": "ssh",
        "workspace_id": ident.workspace_id,
        "workspace_name": ident.workspace_name,
        "agent_name": ident.agent_name,
        "workspace_owner_id": ident.owner_id,
        "organization_id": ident.organization_id,
    }


async def test_sql_upsert_agrees_with_the_in_memory_merge(db: Database) -> None:
    """Random events of one connection, cut into batches anywhere: the row equals merging them all in
    memory (seeded, so a failure reproduces)."""
    ident = await seed_agent(db)
    rng = random.Random(20261126)
    for case in range(40):
        events = [
            event(
                ident,
                C1,
                at=t(rng.randint(0, 100)),
                disconnect=rng.random() < 0.5,
                code=rng.randint(0, 3),
                reason=rng.choice([None, "a", "b"]),
            )
            for _ in range(rng.randint(1, 6))
        ]
        cuts = sorted(rng.sample(range(1, len(events) + 1), rng.randint(0, min(3, len(events)))))
        await db.execute("DELETE FROM connection_logs")
        start = 0
        for cut in [*cuts, len(events)]:
            b = Batch()
            for e in events[start:cut]:
                b.add(e)
            await upsert_connection_logs(db, b.take())
            start = cut
        expected = events[0]
        for e in events[1:]:
            expected = merge(expected, e)
        [row] = await rows(db)
        got = (row["connect_time"], row["disconnect_time"], row["code"], row["disconnect_reason"])
        want = (expected.connect_time, expected.disconnect_time, expected.code, expected.disconnect_reason)
        assert got == want, f"case {case}: cuts {cuts}"
