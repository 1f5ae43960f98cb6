"""`agentd agents`: the operator's list of agents (real PostgreSQL, real sessions), its JSON form and
the live `--watch` updates that arrive through pubsub."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import subprocess
import uuid
from typing import Any

import pytest
import trio

from agentd.admin import CreatedWorkspace, create_workspace
from agentd.agents_cmd import watch_agents
from agentd.cli import main
from agentd.proto import agent_pb2
from agentd.services.base import Settings
from agentd.store import Database, PubSub
from agentd.store.agent_list import connection_status, list_agents
from agentd.store.testing import insert_row
from agentd.testing import TestAgent, serve_agent
from tests.test_connection import workspace_spec

T = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
S = dt.timedelta(seconds=1)


async def seed(db: Database, name: str, username: str, agents: tuple[str, ...]) -> CreatedWorkspace:
    return await create_workspace(db, workspace_spec(name, username=username, agents=agents))


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["agentd", *args], code, out, err)


def test_connection_status_follows_coders_rule() -> None:
    def status(first: Any, last: Any, gone: Any, now: dt.datetime = T) -> str:
        return connection_status(
            now=now, first_connected_at=first, last_connected_at=last, disconnected_at=gone
        )

    assert status(None, None, None) == "connecting"
    assert status(T - 5 * S, T - 5 * S, None) == "connected"
    assert status(T - 60 * S, T - 5 * S, T - 10 * S) == "connected"  # reconnected after a disconnect
    assert status(T - 60 * S, T - 10 * S, T - 5 * S) == "disconnected"
    assert status(T - 60 * S, T - 31 * S, None) == "disconnected"  # silent past the inactivity timeout


async def test_list_shows_each_agent_with_its_workspace_owner_versions_and_connection(
    db: Database, nursery: trio.Nursery
) -> None:
    dev = await seed(db, "dev", "alice", ("main", "side"))
    await seed(db, "ops", "bob", ("bastion",))
    replica = uuid.uuid4()
    main_agent = next(a for a in dev.agents if a.name == "main")
    agent: TestAgent = await nursery.start(
        functools.partial(serve_agent, db, main_agent.token, settings=Settings(replica_id=replica))
    )
    await agent.client.agent.UpdateStartup(
        agent_pb2.UpdateStartupRequest(startup=agent_pb2.Startup(version="v2.18.0"))
    )
    await agent.client.agent.UpdateLifecycle(
        agent_pb2.UpdateLifecycleRequest(lifecycle=agent_pb2.Lifecycle(state=agent_pb2.Lifecycle.STARTING))
    )
    # the agent's Coordinate stream on some replica's tailnet coordinator
    coordinator = uuid.uuid4()
    await insert_row(db, "tailnet_coordinators", {"id": coordinator, "heartbeat_at": dt.datetime.now(dt.UTC)})
    await insert_row(db, "tailnet_peers", {"id": main_agent.id, "coordinator_id": coordinator})

    listing = await list_agents(db)
    rows = {a.name: a for a in listing.agents}
    assert [(a.owner, a.workspace_name, a.name) for a in listing.agents] == [
        ("alice", "dev", "main"),
        ("alice", "dev", "side"),
        ("bob", "ops", "bastion"),
    ]
    main_row = rows["main"]
    assert (main_row.status, main_row.lifecycle, main_row.version, main_row.api_version) == (
        "connected",
        "starting",
        "v2.18.0",
        "2.10",
    )
    assert (main_row.replica_id, main_row.coordinator_id) == (replica, coordinator)
    assert main_row.last_connected_at is not None and main_row.last_connected_at <= listing.now
    side = rows["side"]
    assert (side.status, side.lifecycle, side.replica_id, side.coordinator_id) == (
        "connecting",
        "created",
        None,
        None,
    )
    assert side.last_connected_at is None


def test_cli_table_and_json(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    empty = _main(capsys, "agents", "--postgres-url", db_url)
    assert (empty.returncode, empty.stdout) == (0, "no agents\n")

    async def seed_two() -> CreatedWorkspace:
        from agentd.store import asyncio_loop, open_database

        async with asyncio_loop(), open_database(db_url) as db:
            return await seed(db, "dev", "alice", ("main", "side"))

    created = trio.run(seed_two)
    table = _main(capsys, "agents", "--postgres-url", db_url)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    columns = ["AGENT", "WORKSPACE", "OWNER", "STATUS", "LIFECYCLE", "VERSION", "API", "REPLICA", "COORD"]
    assert header.split() == [*columns, "LAST", "SEEN"]
    assert [line.split() for line in lines] == [
        ["main", "dev", "alice", "connecting", "created", "-", "-", "-", "-", "never"],
        ["side", "dev", "alice", "connecting", "created", "-", "-", "-", "-", "never"],
    ]

    as_json = _main(capsys, "agents", "--json", "--postgres-url", db_url)
    assert as_json.returncode == 0, as_json.stderr
    agents = json.loads(as_json.stdout)
    assert {a["id"] for a in agents} == {str(a.id) for a in created.agents}
    assert agents[0] == {
        "id": str(next(a.id for a in created.agents if a.name == "main")),
        "name": "main",
        "workspace_id": str(created.workspace_id),
        "workspace": "dev",
        "owner_id": agents[0]["owner_id"],
        "owner": "alice",
        "version": "",
        "api_version": "",
        "lifecycle": "created",
        "status": "connecting",
        "replica_id": None,
        "coordinator_id": None,
        "first_connected_at": None,
        "last_seen_at": None,
        "disconnected_at": None,
    }


def test_cli_refuses_an_unmigrated_database(empty_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = _main(capsys, "agents", "--postgres-url", empty_db_url)
    assert result.returncode == 1
    assert result.stderr == (
        "agentd: agents: the database has no agentd schema yet (run `agentd migrate` or `agentd serve`)\n"
    )


class Lines:
    """What the watcher printed, with a way to wait for a line matching a pattern."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = trio.Event()

    def write(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()

    async def wait_for(self, pattern: str) -> str:
        """The first line matching ``pattern`` (taken out of ``lines``); fails after 20 s."""
        with trio.move_on_after(20):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        self.lines.remove(line)
                        return line
                self._changed = trio.Event()
                await self._changed.wait()
        raise AssertionError(f"no line matches {pattern!r}; printed: {self.lines}")


async def test_watch_prints_changes_as_they_happen(db: Database, nursery: trio.Nursery) -> None:
    dev = await seed(db, "dev", "alice", ("main",))
    pubsub = PubSub(db)
    await nursery.start(pubsub.run)
    out = Lines()
    # a long refresh interval: every line below comes from a pubsub event, not from polling
    await nursery.start(functools.partial(watch_agents, db, pubsub, out.write, refresh_interval=3600))
    assert re.fullmatch(r"AGENT .*\nmain +dev +alice +connecting +created .* never", out.lines.pop(0))

    session_scope = trio.CancelScope()

    async def session(task_status: trio.TaskStatus[TestAgent]) -> None:
        with session_scope:
            await serve_agent(db, dev.agents[0].token, task_status=task_status)

    agent: TestAgent = await nursery.start(session)
    await out.wait_for(
        r"changed alice/dev\.main: status connecting -> connected, replica_id - -> [0-9a-f]{8}$"
    )
    await agent.client.agent.UpdateLifecycle(
        agent_pb2.UpdateLifecycleRequest(lifecycle=agent_pb2.Lifecycle(state=agent_pb2.Lifecycle.READY))
    )
    await out.wait_for(r"changed alice/dev\.main: lifecycle created -> ready$")

    # a workspace of a new owner: seen at the next re-read, its events followed from then on
    ops = await seed(db, "ops", "bob", ("bastion",))
    session_scope.cancel()  # the disconnect is an event on alice's channel: the re-read finds bob too
    await out.wait_for(r"changed alice/dev\.main: status connected -> disconnected$")
    await out.wait_for(r"added bob/ops\.bastion \(connecting, created\)")
    bob: TestAgent = await nursery.start(serve_agent, db, ops.agents[0].token)
    await out.wait_for(r"changed bob/ops\.bastion: status connecting -> connected")
    await bob.session.aclose()


async def test_watch_json_is_one_object_per_line(db: Database, nursery: trio.Nursery) -> None:
    dev = await seed(db, "dev", "alice", ("main",))
    pubsub = PubSub(db)
    await nursery.start(pubsub.run)
    out = Lines()
    await nursery.start(
        functools.partial(watch_agents, db, pubsub, out.write, json_output=True, refresh_interval=3600)
    )
    first = json.loads(out.lines.pop(0))
    assert first["event"] == "list" and [a["name"] for a in first["agents"]] == ["main"]
    agent: TestAgent = await nursery.start(serve_agent, db, dev.agents[0].token)
    change = json.loads(await out.wait_for(r'"event":"changed"'))
    assert change["agent"]["status"] == "connected"
    assert change["changes"]["status"] == ["connecting", "connected"]
    assert change["changes"]["replica_id"][0] is None
    await agent.session.aclose()
