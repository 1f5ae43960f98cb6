"""The group-committed activity bump (agentd.batchers.activity): a lone bump is written at once; bumps
arriving while a statement runs share the next one, each with its own result and NOTIFY; a failed
statement fails every bump it carried; a caller cancelled before its bump was taken writes nothing."""

from __future__ import annotations

import datetime as dt
import json

import trio
import trio.testing

from agentd.batchers.activity import ActivityBumper
from agentd.store import Database, PubSub
from agentd.store.activity import Bump
from tests.services.audit_support import T0, seed
from tests.services.test_stats import deadline, schedule_rules


async def _workspaces(db: Database, n: int) -> list:  # type: ignore[type-arg]
    idents = []
    for _ in range(n):
        ident, _token = await seed(db)
        await schedule_rules(db, ident)  # deadline T0+10 min, bump 1 h
        idents.append(ident)
    return idents


async def test_a_lone_bump_is_one_statement_at_once(db: Database) -> None:
    (ident,) = await _workspaces(db, 1)
    bumper = ActivityBumper(db)
    assert await bumper.bump(Bump(ident.workspace_id, T0, None)) is True
    assert (bumper.statements, bumper.bumps) == (1, 1)
    assert await deadline(db, ident) == T0 + dt.timedelta(hours=1)
    # throttled now (more than 95 % of the bump left): not moved, False
    assert await bumper.bump(Bump(ident.workspace_id, T0 + dt.timedelta(minutes=1), None)) is False
    assert await deadline(db, ident) == T0 + dt.timedelta(hours=1)


async def test_bumps_waiting_on_a_statement_share_the_next_one(db: Database) -> None:
    idents = await _workspaces(db, 8)
    pubsub = PubSub(db)
    bumper = ActivityBumper(db)
    results: dict[int, bool] = {}

    async def bump(i: int, at: dt.datetime) -> None:
        ident = idents[i]
        notice = (f"test_bumps_{ident.workspace_id.hex[:8]}", json.dumps({"i": i}))
        results[i] = await bumper.bump(Bump(ident.workspace_id, at, None), notice)

    async with trio.open_nursery() as outer:
        await outer.start(pubsub.run)
        async with pubsub.subscribe(f"test_bumps_{idents[5].workspace_id.hex[:8]}") as sub:
            async with trio.open_nursery() as nursery, db.transaction() as tx:
                # Hold the first workspace's build: the first statement blocks on it.
                await tx.execute(
                    "SELECT 1 FROM workspace_builds WHERE id = %s FOR UPDATE", [idents[0].build_id]
                )
                nursery.start_soon(bump, 0, T0)
                await _blocked_on_the_lock(db)
                for i in range(1, 8):
                    # the last one is too early: an hour's bump from then moves nothing
                    nursery.start_soon(bump, i, T0 - dt.timedelta(hours=2) if i == 7 else T0)
                await trio.testing.wait_all_tasks_blocked()
                assert (bumper.statements, bumper.bumps) == (0, 0)
                # committed: the lock is released, the first statement ends, the rest share one
            with trio.fail_after(10):
                payload = await sub.__anext__()
        outer.cancel_scope.cancel()
    assert json.loads(payload) == {"i": 5}
    assert (bumper.statements, bumper.bumps) == (2, 8)
    assert results == {i: i != 7 for i in range(8)}
    for ident in idents[:7]:
        assert await deadline(db, ident) == T0 + dt.timedelta(hours=1)
    assert await deadline(db, idents[7]) == T0 + dt.timedelta(minutes=10)


async def test_a_failed_statement_fails_every_bump_it_carried(db: Database) -> None:
    idents = await _workspaces(db, 2)
    bumper = ActivityBumper(db)
    errors: list[BaseException] = []

    async def bump(i: int, notice: tuple[str, str] | None) -> None:
        try:
            await bumper.bump(Bump(idents[i].workspace_id, T0, None), notice)
        except Exception as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        # NOTIFY payloads are limited to 8000 bytes: the statement carrying this one fails
        nursery.start_soon(bump, 0, ("test_bumps_fail", "x" * 9000))
        nursery.start_soon(bump, 1, None)
    assert len(errors) == 2 and bumper.statements == 1
    assert await deadline(db, idents[0]) == T0 + dt.timedelta(minutes=10)
    assert await deadline(db, idents[1]) == T0 + dt.timedelta(minutes=10)


async def test_a_caller_cancelled_before_its_bump_was_taken_writes_nothing(db: Database) -> None:
    idents = await _workspaces(db, 2)
    bumper = ActivityBumper(db)
    waiting = trio.CancelScope()
    async with trio.open_nursery() as nursery, db.transaction() as tx:
        await tx.execute("SELECT 1 FROM workspace_builds WHERE id = %s FOR UPDATE", [idents[0].build_id])
        nursery.start_soon(bumper.bump, Bump(idents[0].workspace_id, T0, None))
        await _blocked_on_the_lock(db)
        nursery.start_soon(_cancelled_while_queued, bumper, Bump(idents[1].workspace_id, T0, None), waiting)
        await trio.testing.wait_all_tasks_blocked()
        waiting.cancel()
        await trio.testing.wait_all_tasks_blocked()
    assert (bumper.statements, bumper.bumps) == (1, 1)
    assert await deadline(db, idents[1]) == T0 + dt.timedelta(minutes=10)
    # the next bump carries only itself
    assert await bumper.bump(Bump(idents[1].workspace_id, T0, None)) is True
    assert (bumper.statements, bumper.bumps) == (2, 2)


async def _cancelled_while_queued(bumper: ActivityBumper, bump: Bump, scope: trio.CancelScope) -> None:
    with scope:
        await bumper.bump(bump)
    assert scope.cancelled_caught


async def _blocked_on_the_lock(db: Database) -> None:
    """Until the bump statement waits for the row lock the test holds."""
    with trio.fail_after(10):
        while not await db.fetchval(  # noqa: ASYNC110 - polling the server, not a trio state
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            ["%WITH req AS%"],  # the head of the bump statement (the view keeps its first 1 KiB)
        ):
            await trio.sleep(0.01)
