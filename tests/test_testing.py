"""agentd.testing: the documented example runs as written; refusals, WebSocket, virtual time."""

from __future__ import annotations

import functools
import os
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import agentd.testing
from agentd.client import UNIMPLEMENTED, RpcError
from agentd.proto import agent_pb2
from agentd.store import Database
from agentd.testing import TestAgent, UpgradeError, serve_agent
from tests.test_connection import seed

ROOT = Path(__file__).resolve().parents[1]


def docstring_example() -> str:
    """The code block of agentd.testing's module docstring."""
    doc = agentd.testing.__doc__
    assert doc is not None
    block = doc.split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return agentd.testing.virtual_clock()


async def test_the_docstring_example_runs_as_written(
    db: Database, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    source = docstring_example()
    assert len([line for line in source.splitlines() if line.strip()]) <= 18
    namespace: dict[str, Any] = {}
    exec(compile(source, "agentd/testing.py (docstring)", "exec"), namespace)
    assert isinstance(namespace["clock"].__wrapped__(), trio.testing.MockClock)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the example names examples/workspace.toml relative to the repository
    try:
        await namespace["test_my_agent_connects"](db, nursery, clock)
    finally:
        os.chdir(cwd)


async def test_wrong_token_is_a_401_upgrade_error(db: Database) -> None:
    await seed(db)
    with pytest.raises(UpgradeError) as info:
        await serve_agent(db, uuid.uuid4())
    assert info.value.status == 401
    assert info.value.message == "Workspace agent not authorized."
    with pytest.raises(UpgradeError) as info:
        await serve_agent(db, "not-a-uuid")
    assert (info.value.status, info.value.message) == (401, "Workspace agent token invalid.")


async def test_unsupported_version_is_a_400(db: Database) -> None:
    ws = await seed(db)
    with pytest.raises(UpgradeError) as info:
        await serve_agent(db, ws.agents[0].token, version="2.11")
    assert info.value.status == 400


@pytest.mark.parametrize("websocket", [False, True])
async def test_both_transports(
    db: Database, nursery: trio.Nursery, websocket: bool, autojump_clock: trio.testing.MockClock
) -> None:
    ws = await seed(db)
    agent: TestAgent = await nursery.start(
        functools.partial(serve_agent, db, ws.agents[0].token, websocket=websocket, services=("banners",))
    )
    for _ in range(3):
        await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
    with pytest.raises(RpcError) as info:
        await agent.client.agent.PushContextState(agent_pb2.PushContextStateRequest())
    assert info.value.code == UNIMPLEMENTED
    # answered at once over the in-memory transport (virtual clock), not timed out after 10 s
    assert await agent.session.ping() == 0


async def test_disconnect_ends_serve_agent(db: Database, autojump_clock: trio.testing.MockClock) -> None:
    ws = await seed(db)
    async with trio.open_nursery() as nursery:
        agent: TestAgent = await nursery.start(functools.partial(serve_agent, db, ws.agents[0].token))
        await agent.disconnect()
    # serve_agent returned by itself; the server recorded the disconnect.
    row = await db.fetchone("SELECT disconnected_at FROM workspace_agents WHERE id = %s", (ws.agents[0].id,))
    assert row is not None and row["disconnected_at"] is not None
