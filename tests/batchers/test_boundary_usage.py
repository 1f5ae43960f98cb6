"""Boundary usage tracker (spec §9.5): counting, insert vs update, advisory lock, periodic and final flush."""

from __future__ import annotations

import datetime as dt
import uuid

import attrs
import pytest
import trio
import trio.testing

import agentd.testing
from agentd.batchers.boundary_usage import BoundaryUsageTracker, UsageCounter
from agentd.store import Database
from agentd.store.boundary import USAGE_LOCK_KEY, UsageSummary, take_usage_summary
from agentd.store.errors import StoreError
from tests.services.audit_support import T0, FakeNow

W1, W2, W3 = (uuid.UUID(int=i) for i in (1, 2, 3))
U1, U2 = (uuid.UUID(int=i) for i in (11, 12))


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Jumps over idle timers, but only after the loop has been idle for a while in real time, so a
    database round trip in flight (which looks idle to trio) never makes the shutdown deadline expire."""
    return agentd.testing.virtual_clock(0.2)


async def stats(db: Database) -> list[dict[str, object]]:
    return await db.fetchall(
        "SELECT replica_id, unique_workspaces_count AS ws, unique_users_count AS users,"
        " allowed_requests AS allowed, denied_requests AS denied, window_start, updated_at"
        " FROM boundary_usage_stats ORDER BY replica_id"
    )


# --------------------------------------------------------------------------------------------------
# Sans-I/O counter
# --------------------------------------------------------------------------------------------------


def test_counter_take_resets_and_reports_nothing_when_clean() -> None:
    c = UsageCounter()
    assert c.take() is None
    c.track(W1, U1, 2, 1)
    c.track(W1, U1, 0, 1)
    p = c.take()
    assert p is not None
    assert (p.workspaces, p.users, p.allowed, p.denied) == ({W1}, {U1}, 2, 2)
    assert not c.dirty and c.take() is None


def test_counter_failed_flush_puts_everything_back() -> None:
    c = UsageCounter()
    c.track(W1, U1, 1, 0)
    p = c.take()
    assert p is not None
    c.track(W2, U2, 0, 3)  # arrives while the flush is in flight
    c.failed(p)
    again = c.take()
    assert again is not None
    assert (again.workspaces, again.users, again.allowed, again.denied) == ({W1, W2}, {U1, U2}, 1, 3)


def test_counter_period_sets_follow_insert_and_update() -> None:
    c = UsageCounter()
    c.track(W1, U1, 1, 0)
    p = c.take()
    assert p is not None
    c.committed(p, inserted=True)
    c.track(W2, U1, 1, 0)
    p = c.take()
    assert p is not None
    args = c.flush_args(p, uuid.UUID(int=0), T0)
    assert (args.new_workspaces, args.period_workspaces, args.new_users, args.period_users) == (1, 2, 1, 1)
    c.committed(p, inserted=False)
    assert c.period_workspaces == {W1, W2}
    c.track(W3, U2, 1, 0)
    p = c.take()
    assert p is not None
    c.committed(p, inserted=True)  # the row was gone: a new period starts with this flush's ids
    assert (c.period_workspaces, c.period_users) == ({W3}, {U2})


@attrs.define
class CoderTracker:
    """Coder's tracker as spec §9.5 describes it: cumulative sets reset after every flush."""

    cumulative_ws: set[uuid.UUID] = attrs.field(factory=set)
    delta_ws: set[uuid.UUID] = attrs.field(factory=set)
    row: int | None = None

    def track(self, ws: uuid.UUID) -> None:
        self.cumulative_ws.add(ws)
        self.delta_ws.add(ws)

    def flush(self) -> None:
        cumulative, delta = len(self.cumulative_ws), len(self.delta_ws)
        self.delta_ws = set()
        self.row = delta if self.row is None else cumulative
        self.cumulative_ws = set()  # "reset to the ids seen during the DB call" (none here)


# --------------------------------------------------------------------------------------------------
# Against PostgreSQL
# --------------------------------------------------------------------------------------------------


async def test_uniques_cover_the_whole_period_unlike_coder(db: Database) -> None:
    """W1 then W2 in two flushes: the row says 2 workspaces; Coder's tracker would say 1."""
    replica = uuid.uuid4()
    now = FakeNow()
    t = BoundaryUsageTracker(db=db, replica_id=replica, now=now)
    coder = CoderTracker()

    t.track(W1, U1, 5, 1)
    coder.track(W1)
    assert await t.flush() is True
    coder.flush()
    [row] = await stats(db)
    assert (row["ws"], row["users"], row["allowed"], row["denied"]) == (1, 1, 5, 1)
    assert row["window_start"] == T0

    now.advance(minutes=1)
    t.track(W2, U1, 2, 0)
    coder.track(W2)
    await t.flush()
    coder.flush()
    [row] = await stats(db)
    assert (row["ws"], row["users"], row["allowed"], row["denied"]) == (2, 1, 7, 1)
    assert row["window_start"] == T0 and row["updated_at"] == now()
    assert coder.row == 1  # the undercount agentd does not reproduce

    # Seeing W1 again does not inflate the count.
    t.track(W1, U1, 1, 1)
    await t.flush()
    [row] = await stats(db)
    assert (row["ws"], row["users"], row["allowed"], row["denied"]) == (2, 1, 8, 2)


async def test_new_period_after_telemetry_reset_inserts_delta_counts(db: Database) -> None:
    replica = uuid.uuid4()
    now = FakeNow()
    t = BoundaryUsageTracker(db=db, replica_id=replica, now=now)
    t.track(W1, U1, 1, 0)
    t.track(W2, U2, 1, 0)
    await t.flush()
    await db.execute("DELETE FROM boundary_usage_stats")  # telemetry collected the period
    now.advance(minutes=1)
    t.track(W3, U1, 0, 4)
    await t.flush()
    [row] = await stats(db)
    assert (row["ws"], row["users"], row["allowed"], row["denied"]) == (1, 1, 0, 4)
    assert row["window_start"] == now()
    t.track(W1, U1, 0, 1)
    await t.flush()
    [row] = await stats(db)
    assert (row["ws"], row["users"]) == (2, 1)  # W3, W1 in this period


async def test_nothing_tracked_writes_nothing(db: Database) -> None:
    t = BoundaryUsageTracker(db=db, replica_id=uuid.uuid4())
    assert await t.flush() is False
    assert await stats(db) == []


async def test_replicas_have_their_own_rows(db: Database) -> None:
    a, b = (
        BoundaryUsageTracker(db=db, replica_id=uuid.UUID(int=1)),
        BoundaryUsageTracker(db=db, replica_id=uuid.UUID(int=2)),
    )
    a.track(W1, U1, 1, 0)
    b.track(W2, U2, 0, 1)
    await a.flush()
    await b.flush()
    assert [(r["ws"], r["allowed"], r["denied"]) for r in await stats(db)] == [(1, 1, 0), (1, 0, 1)]


async def test_failed_flush_keeps_counts_for_the_next_one(db: Database) -> None:
    t = BoundaryUsageTracker(db=db, replica_id=uuid.uuid4())
    t.track(W1, U1, 3, 0)
    await db.execute("ALTER TABLE boundary_usage_stats RENAME TO boundary_usage_stats_away")
    with pytest.raises(StoreError):
        await t.flush()
    await db.execute("ALTER TABLE boundary_usage_stats_away RENAME TO boundary_usage_stats")
    t.track(W2, U1, 1, 0)
    await t.flush()
    [row] = await stats(db)
    assert (row["ws"], row["users"], row["allowed"]) == (2, 1, 4)


async def test_flush_waits_for_the_advisory_lock(db: Database) -> None:
    t = BoundaryUsageTracker(db=db, replica_id=uuid.uuid4())
    t.track(W1, U1, 1, 0)
    done = trio.Event()

    async def flush() -> None:
        await t.flush()
        done.set()

    async with trio.open_nursery() as nursery:
        async with db.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", [USAGE_LOCK_KEY])
            nursery.start_soon(flush)
            with trio.move_on_after(0.5):
                await done.wait()
            assert not done.is_set()
            assert await stats(db) == []
        await done.wait()
    assert len(await stats(db)) == 1


async def test_run_flushes_every_minute_and_on_shutdown(db: Database, clock: trio.testing.MockClock) -> None:
    t = BoundaryUsageTracker(db=db, replica_id=uuid.uuid4())
    async with trio.open_nursery() as nursery:
        await nursery.start(t.run)
        t.track(W1, U1, 1, 0)
        await trio.sleep(61)
        [row] = await stats(db)
        assert row["allowed"] == 1
        t.track(W2, U2, 0, 1)
        await trio.sleep(1)
        assert (await stats(db))[0]["denied"] == 0  # not yet: next flush is a minute later
        nursery.cancel_scope.cancel()
    [row] = await stats(db)  # the final flush on cancellation wrote the rest
    assert (row["ws"], row["users"], row["allowed"], row["denied"]) == (2, 2, 1, 1)


async def test_telemetry_summary_ends_the_period(db: Database) -> None:
    """Reading the summary deletes the rows; each replica's next flush starts a new period."""
    now = FakeNow()
    a = BoundaryUsageTracker(db=db, replica_id=uuid.UUID(int=1), now=now)
    b = BoundaryUsageTracker(db=db, replica_id=uuid.UUID(int=2), now=now)
    stale = BoundaryUsageTracker(db=db, replica_id=uuid.UUID(int=3), now=lambda: T0 - dt.timedelta(hours=2))
    a.track(W1, U1, 2, 1)
    b.track(W2, U2, 1, 0)
    stale.track(W3, U1, 100, 100)
    for tr in (a, b, stale):
        await tr.flush()
    summary = await take_usage_summary(db, now=now(), stale_after=dt.timedelta(hours=1))
    assert summary == UsageSummary(unique_workspaces=2, unique_users=2, allowed_requests=3, denied_requests=1)
    assert await stats(db) == []
    now.advance(minutes=1)
    a.track(W2, U1, 1, 0)
    await a.flush()
    [row] = await stats(db)
    assert (row["ws"], row["users"], row["allowed"], row["window_start"]) == (1, 1, 1, now())
