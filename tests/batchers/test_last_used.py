"""last_used_at tracker (spec §9.2): workspaces marked used are written every 60 s in one statement,
never backwards, and on shutdown."""

from __future__ import annotations

import datetime as dt
import logging

import pytest
import trio
import trio.testing

import agentd.testing
from agentd.batchers.last_used import LastUsedTracker
from agentd.store import Database
from agentd.store.activity import batch_update_last_used_at
from tests.services.audit_support import T0, FakeNow, seed_agent


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump only after real idleness, so database round trips never look like idle time."""
    return agentd.testing.virtual_clock(0.2)


async def last_used(db: Database, workspace_id: object) -> dt.datetime:
    value = await db.fetchval("SELECT last_used_at FROM workspaces WHERE id = %s", [workspace_id])
    assert isinstance(value, dt.datetime)
    return value


ZERO = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


async def test_never_moves_backwards(db: Database) -> None:
    ident = await seed_agent(db)
    assert await batch_update_last_used_at(db, [ident.workspace_id], T0) == 1
    assert await batch_update_last_used_at(db, [ident.workspace_id], T0 - dt.timedelta(hours=1)) == 0
    assert await last_used(db, ident.workspace_id) == T0


async def test_flushes_every_60_s(
    db: Database, clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="agentd.batchers.last_used")
    a, b = await seed_agent(db), await seed_agent(db)
    now = FakeNow()
    tracker = LastUsedTracker(db, now=now)
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        tracker.add(a.workspace_id)
        tracker.add(b.workspace_id)
        tracker.add(a.workspace_id)
        assert tracker.pending == 2
        await trio.sleep(59)
        assert await last_used(db, a.workspace_id) == ZERO
        await trio.sleep(2)
        assert tracker.flushes == 1 and tracker.pending == 0
        flushed = "flush batcher=last_used workspaces=2 duration_ms="
        assert [m for m in caplog.messages if m.startswith(flushed)]  # --log-level debug
        assert await last_used(db, a.workspace_id) == T0 == await last_used(db, b.workspace_id)
        now.advance(minutes=1)
        tracker.add(b.workspace_id)
        await trio.sleep(60)
        assert await last_used(db, a.workspace_id) == T0
        assert await last_used(db, b.workspace_id) == T0 + dt.timedelta(minutes=1)
        nursery.cancel_scope.cancel()


async def test_flush_on_shutdown(db: Database, clock: trio.testing.MockClock) -> None:
    ident = await seed_agent(db)
    tracker = LastUsedTracker(db, now=FakeNow())
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        await trio.sleep(10)
        tracker.add(ident.workspace_id)
        nursery.cancel_scope.cancel()
    assert await last_used(db, ident.workspace_id) == T0
