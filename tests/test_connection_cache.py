"""The workspace cache refresher (spec §4.3, §4.4) on virtual time."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
import trio

import agentd.testing
from agentd.model import PREBUILDS_USER_ID, WorkspaceIdentity
from agentd.services.base import WorkspaceCache
from agentd.services.workspace_cache import REFRESH_INTERVAL, WorkspaceCacheRefresher
from agentd.store import Database
from agentd.store.sessions import workspace_identities
from agentd.testing import TestAgent, serve_agent
from tests.test_connection import seed


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojump, but only after 0.1 s of real idleness, so database round trips take no virtual time."""
    return agentd.testing.virtual_clock(0.1)


async def start(nursery: trio.Nursery, db: Database, token: uuid.UUID) -> TestAgent:
    agent: TestAgent = await nursery.start(functools.partial(serve_agent, db, token, services=(), role="x"))
    return agent


def test_interval_is_five_minutes() -> None:
    assert REFRESH_INTERVAL == 300


async def test_filled_at_start_and_refreshed_every_five_minutes(
    db: Database, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    ws = await seed(db)
    agent = await start(nursery, db, ws.agents[0].token)
    assert agent.connection.scope is not None
    cache = agent.connection.scope.cache
    assert cache.value is not None
    assert (cache.value.id, cache.value.name, cache.value.owner_username) == (ws.workspace_id, "dev", "alice")
    assert cache.value.template_name == "docker" and cache.value.task_id is None

    await db.execute("UPDATE workspaces SET name = 'renamed' WHERE id = %s", (ws.workspace_id,))
    await trio.sleep(REFRESH_INTERVAL - 10)
    assert cache.value.name == "dev"
    await trio.sleep(20)
    assert cache.value.name == "renamed"


async def test_prebuild_stays_empty_until_claimed_then_fills_without_reconnecting(
    db: Database, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    ws = await seed(db)
    await db.execute(
        "UPDATE workspaces SET owner_id = %s WHERE id = %s", (PREBUILDS_USER_ID, ws.workspace_id)
    )
    agent = await start(nursery, db, ws.agents[0].token)
    assert agent.ident.is_prebuild
    assert agent.connection.scope is not None
    cache = agent.connection.scope.cache
    assert cache.value is None

    await trio.sleep(REFRESH_INTERVAL + 1)
    assert cache.value is None  # still a prebuild: nothing cached

    # The claim: the workspace moves to its new owner (and name), the agent stays connected.
    await db.execute(
        "UPDATE workspaces SET owner_id = %s, name = 'claimed' WHERE id = %s", (ws.owner_id, ws.workspace_id)
    )
    await trio.sleep(REFRESH_INTERVAL)
    assert cache.value is not None
    assert (cache.value.owner_id, cache.value.name) == (ws.owner_id, "claimed")
    assert not agent.session.closed


async def test_read_errors_keep_stale_data(db: Database, clock: trio.testing.MockClock) -> None:
    ws = await seed(db)
    failing = False
    reads = 0

    async def read(workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, WorkspaceIdentity]:
        nonlocal reads
        reads += 1
        if failing:
            # A genuine database error: the statement is wrong on the server.
            await db.fetchval("SELECT no_such_column FROM workspaces")
        return await workspace_identities(db, workspace_ids)

    cache = WorkspaceCache()
    refresher = WorkspaceCacheRefresher(read)
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        entry = await refresher.add(cache, ws.workspace_id)
        before = cache.value
        assert before is not None
        failing = True
        await db.execute("UPDATE workspaces SET name = 'changed' WHERE id = %s", (ws.workspace_id,))
        await trio.sleep(3 * REFRESH_INTERVAL + 1)
        assert reads == 4
        assert cache.value == before  # stale, not cleared
        failing = False
        await trio.sleep(REFRESH_INTERVAL)
        assert cache.value is not None and cache.value.name == "changed"
        refresher.discard(entry)  # the session ends
        nursery.cancel_scope.cancel()
    assert cache.value is None  # cleared on exit


async def test_lives_exactly_as_long_as_the_session(db: Database, clock: trio.testing.MockClock) -> None:
    ws = await seed(db)
    async with trio.open_nursery() as nursery:
        agent = await start(nursery, db, ws.agents[0].token)
        refresher = agent.connection.cache_entry
        assert refresher is not None
        await trio.sleep(2 * REFRESH_INTERVAL + 1)
        assert refresher.refreshes == 3
        assert agent.connection.scope is not None
        cache: Any = agent.connection.scope.cache
        await agent.disconnect()
    assert cache.value is None
    await trio.sleep(3 * REFRESH_INTERVAL)
    assert refresher.refreshes == 3  # no task outlived the session
