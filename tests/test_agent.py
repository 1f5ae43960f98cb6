"""The reference agent against agentd's real server side in-process (handshake, AgentSessions, every
composed service, a real PostgreSQL): startup to ``ready`` with rows, reconnects, fatal errors."""

from __future__ import annotations

import datetime as dt
import math
import tomllib
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import agentd.testing
from agentd.admin import CreatedWorkspace, WorkspaceSpec, create_workspace, validate_workspace_spec
from agentd.agent import AGENT_VERSION, Agent
from agentd.agent.lifecycle import TERMINAL_STARTUP
from agentd.connection import AgentSessions, ServiceTemplate, load_service_builders, start_components
from agentd.daemon import build_components, build_router
from agentd.drpc.errors import RpcError
from agentd.http import HttpApp
from agentd.proto import agent_pb2
from agentd.services.base import ConnectionScope, Settings
from agentd.services.events import Events
from agentd.store import Database, PubSub

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "workspace.toml"
S = agent_pb2.Lifecycle


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Virtual time that first lets PostgreSQL and the scripts' subprocesses answer (CONVENTIONS 18:40).
    return agentd.testing.virtual_clock(threshold=0.1)


def workspace_spec(**agent_overrides: Any) -> WorkspaceSpec:
    """examples/workspace.toml with scripts and metadata a test machine can run."""
    raw = tomllib.loads(EXAMPLE.read_text())
    main = raw["agents"][0]
    main["scripts"] = [
        {"display_name": "hello", "script": "echo hello; echo to-stderr >&2", "run_on_start": True},
        {
            "display_name": "setup",
            "script": "for i in 1 2 3; do echo step $i; done",
            "run_on_start": True,
            "timeout_seconds": 300,
        },
        {"display_name": "backup", "script": "echo backing up", "run_on_stop": True},
    ]
    main["metadata"] = [
        {"key": "greeting", "display_name": "Greeting", "script": "echo hi", "interval": 10, "timeout": 1},
        {"key": "broken", "display_name": "Broken", "script": "echo nope; exit 4", "interval": 60},
    ]
    main.update(agent_overrides)
    raw["agents"] = [main]
    return validate_workspace_spec(raw)


@attrs.define(eq=False)
class Server:
    """agentd's server side: each dial gets a memory stream whose other end goes through the daemon's
    own HTTP app and agent route into AgentSessions."""

    sessions: AgentSessions
    nursery: trio.Nursery
    dials: int = 0
    refuse: bool = False

    async def dial(self) -> trio.abc.Stream:
        self.dials += 1
        if self.refuse:
            raise OSError("connection refused")
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server)
        return client

    async def _serve(self, stream: trio.abc.Stream) -> None:
        app = HttpApp(
            build_router(self.sessions.db, self.sessions, handshake_timeout=math.inf), head_timeout=math.inf
        )
        await app.handle_connection(stream)

    def drop_all(self) -> None:
        """The server ends every live session (as a network failure or a replica restart would)."""
        for connection in list(self.sessions.live):
            connection.close()


@attrs.define(eq=False)
class Lines:
    """What the agent printed; ``wait_for`` a line containing some text."""

    lines: list[str] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def wait_for(self, text: str, count: int = 1) -> None:
        with trio.fail_after(3600):
            while self.count(text) < count:
                await self._changed.wait()


@pytest.fixture
async def server(db: Database, pubsub: PubSub) -> AsyncIterator[Server]:
    """The daemon's own composition: every service, the process-wide batchers and coordinator.

    Agents are told a 2 s stats interval (`agentd serve --agent-stats-refresh-interval 2`): virtual time
    advances in small steps here, so waiting out the 30 s default would cost half a minute of real time.
    """
    settings = Settings(stats_report_interval=dt.timedelta(seconds=2))
    async with trio.open_nursery() as nursery:
        components = build_components(db, pubsub, settings)
        await start_components(components, nursery)
        sessions = AgentSessions(db=db, events=Events(pubsub), settings=settings, components=components)
        yield Server(sessions, nursery)
        nursery.cancel_scope.cancel()


async def seed(db: Database, **overrides: Any) -> CreatedWorkspace:
    return await create_workspace(db, workspace_spec(**overrides))


def make_agent(server: Server, ws: CreatedWorkspace, lines: Lines, **kw: Any) -> Agent:
    return Agent(token=str(ws.agents[0].token), dial=server.dial, where="memory", say=lines, **kw)


async def agent_row(db: Database, agent_id: uuid.UUID) -> Mapping[str, Any]:
    row = await db.fetchone(
        "SELECT lifecycle_state::text AS state, started_at, ready_at, version, expanded_directory, "
        "api_version, logs_length FROM workspace_agents WHERE id = %s",
        (agent_id,),
    )
    assert row is not None
    return row


async def poll(db: Database, sql: str, params: tuple[Any, ...], want: int) -> list[dict[str, Any]]:
    """Rows another task (a batcher) writes: poll in virtual time until ``want`` of them exist."""
    with trio.fail_after(600):
        while len(rows := await db.fetchall(sql, params)) < want:  # noqa: ASYNC110 - another task writes
            await trio.sleep(1)
    return rows


async def test_agent_reaches_ready_with_logs_timings_metadata_and_stats(
    db: Database, server: Server, clock: trio.testing.MockClock
) -> None:
    ws = await seed(db)
    agent_id = ws.agents[0].id
    lines = Lines()
    agent = make_agent(server, ws, lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert await agent.lifecycle.wait_reported(TERMINAL_STARTUP) == S.READY
        await agent.logs.wait_drained()
        await agent.wait_timings_sent()
        await lines.wait_for("greeting")
        await lines.wait_for("broken")
        await lines.wait_for("stats sent")
        await lines.wait_for("DERP map")
        await lines.wait_for("coordinator: sent node")

        row = await agent_row(db, agent_id)
        assert row["state"] == "ready" and row["ready_at"] is not None and row["started_at"] is not None
        assert row["version"] == AGENT_VERSION and row["api_version"] == "2.10"
        assert row["expanded_directory"] == "/home/coder"  # reported expanded, even if missing here

        logs = await db.fetchall(
            "SELECT l.output, s.display_name FROM workspace_agent_logs l "
            "JOIN workspace_agent_log_sources s "
            "ON s.id = l.log_source_id AND s.workspace_agent_id = l.agent_id "
            "WHERE l.agent_id = %s ORDER BY l.id",
            (agent_id,),
        )
        by_source: dict[str, list[str]] = {}
        for log in logs:
            by_source.setdefault(log["display_name"], []).append(log["output"])
        assert by_source == {"hello": ["hello", "to-stderr"], "setup": ["step 1", "step 2", "step 3"]}
        assert row["logs_length"] == sum(len(o) for outputs in by_source.values() for o in outputs)

        timings = await db.fetchall(
            "SELECT s.display_name, t.stage::text, t.status::text, t.exit_code, "
            "t.ended_at >= t.started_at AS ok FROM workspace_agent_script_timings t "
            "JOIN workspace_agent_scripts s ON s.id = t.script_id "
            "WHERE s.workspace_agent_id = %s ORDER BY s.display_name",
            (agent_id,),
        )
        assert [tuple(t.values()) for t in timings] == [
            ("hello", "start", "ok", 0, True),
            ("setup", "start", "ok", 0, True),
        ]

        metadata = await poll(  # the metadata batcher writes them (5 s flushes)
            db,
            "SELECT key, value, error FROM workspace_agent_metadata "
            "WHERE workspace_agent_id = %s AND collected_at > '2000-01-01' ORDER BY key",
            (agent_id,),
            2,
        )
        assert [tuple(m.values()) for m in metadata] == [
            ("broken", "nope", "exit status 4"),
            ("greeting", "hi", ""),
        ]

        stats = await poll(
            db, "SELECT rx_bytes, tx_bytes FROM workspace_agent_stats WHERE agent_id = %s", (agent_id,), 1
        )
        assert stats[0]["rx_bytes"] > 0 and stats[0]["tx_bytes"] > 0

        # The startup scripts ran once; the states went out in order.
        assert lines.count('script "echo hello; echo to-stderr >&2" exited 0 (2 lines logged)') == 1
        states = [line for line in lines.lines if line.startswith("lifecycle ")]
        assert states == ["lifecycle created", "lifecycle starting", "lifecycle ready"]
        assert lines.lines[0] == "connected (yamux over memory)"
        nursery.cancel_scope.cancel()


async def test_reconnect_resends_unsent_states_and_does_not_rerun_scripts(
    db: Database, server: Server, clock: trio.testing.MockClock
) -> None:
    # A slow start script: the connection drops while it runs, so "ready" is entered while disconnected.
    ws = await seed(
        db,
        scripts=[{"display_name": "slow", "script": "sleep 0.5; echo slept", "run_on_start": True}],
        metadata=[],
    )
    lines = Lines()
    agent = make_agent(server, ws, lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await lines.wait_for("lifecycle starting")
        server.refuse = True  # the next dials fail until the script is done
        server.drop_all()
        await lines.wait_for("connection lost")
        await lines.wait_for('script "sleep 0.5; echo slept" exited 0')
        while agent.lifecycle.current != S.READY:
            await agent.lifecycle.wait_changed()
        assert agent.lifecycle.was_reported(TERMINAL_STARTUP) is None
        server.refuse = False
        assert await agent.lifecycle.wait_reported(TERMINAL_STARTUP) == S.READY
        await agent.logs.wait_drained()
        await agent.wait_timings_sent()
        assert (await agent_row(db, ws.agents[0].id))["state"] == "ready"
        assert agent.connections >= 2 and server.dials >= 3
        assert lines.count("reconnecting in") >= 2
        assert lines.count('script "sleep 0.5; echo slept"') == 1  # a reconnect does not re-run startup
        assert lines.count("manifest:") == agent.connections
        states = [line for line in lines.lines if line.startswith("lifecycle ")]
        assert states == ["lifecycle created", "lifecycle starting", "lifecycle ready"]
        # The script's completion waited for the new connection and was recorded once.
        timings = await db.fetchall(
            "SELECT t.status::text FROM workspace_agent_script_timings t "
            "JOIN workspace_agent_scripts s ON s.id = t.script_id WHERE s.workspace_agent_id = %s",
            (ws.agents[0].id,),
        )
        assert timings == [{"status": "ok"}]
        logs = await db.fetchall(
            "SELECT output FROM workspace_agent_logs WHERE agent_id = %s", (ws.agents[0].id,)
        )
        assert logs == [{"output": "slept"}]
        nursery.cancel_scope.cancel()


async def test_a_failing_start_script_ends_in_start_error_and_stop_reports_shutdown(
    db: Database, server: Server, clock: trio.testing.MockClock
) -> None:
    ws = await seed(
        db,
        scripts=[
            {"display_name": "bad", "script": "echo failing; exit 7", "run_on_start": True},
            {"display_name": "bye", "script": "echo bye", "run_on_stop": True},
        ],
        metadata=[],
    )
    lines = Lines()
    agent = make_agent(server, ws, lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert await agent.lifecycle.wait_reported(TERMINAL_STARTUP) == S.START_ERROR
        agent.stop()  # what the first Ctrl-C does
    # run() returned by itself after the stop scripts and the final state reached the server.
    assert (await agent_row(db, ws.agents[0].id))["state"] == "off"
    assert (
        lines.count('script "echo failing; exit 7" failed (exit 7)') == 1
        and lines.count('script "echo bye" exited 0') == 1
    )
    stages = await db.fetchall(
        "SELECT s.display_name, t.stage::text, t.status::text, t.exit_code "
        "FROM workspace_agent_script_timings t "
        "JOIN workspace_agent_scripts s ON s.id = t.script_id "
        "WHERE s.workspace_agent_id = %s ORDER BY s.display_name",
        (ws.agents[0].id,),
    )
    assert [tuple(r.values()) for r in stages] == [
        ("bad", "start", "exit_failure", 7),
        ("bye", "stop", "ok", 0),
    ]


def failing_metadata_builder(scope: ConnectionScope) -> Any:
    """A metadata service that fails the first BatchUpdateMetadata of the process (spec §11: fatal)."""
    real = load_service_builders()["metadata"](scope)
    path = "/coder.agent.v2.Agent/BatchUpdateMetadata"

    class Failing:
        def handlers(self) -> dict[str, Any]:
            handlers = dict(real.handlers())
            inner = handlers[path]

            async def handler(request: agent_pb2.BatchUpdateMetadataRequest) -> Any:
                if not FAILED:
                    FAILED.append(True)
                    raise RpcError("metadata keys of 7000 bytes exceeded 6144 bytes")
                return await inner(request)

            handlers[path] = handler
            return handlers

    return Failing()


FAILED: list[bool] = []


async def test_a_fatal_rpc_error_tears_down_the_connection_and_the_agent_redials(
    db: Database, server: Server, clock: trio.testing.MockClock
) -> None:
    FAILED.clear()
    server.sessions.template = ServiceTemplate(
        {**server.sessions.template.builders, "metadata": failing_metadata_builder}
    )
    ws = await seed(db)
    lines = Lines()
    agent = make_agent(server, ws, lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await lines.wait_for("connection lost: RPC error: metadata keys of 7000 bytes exceeded 6144 bytes")
        assert await agent.lifecycle.wait_reported(TERMINAL_STARTUP) == S.READY
        rows = await poll(
            db,
            "SELECT value FROM workspace_agent_metadata "
            "WHERE workspace_agent_id = %s AND key = 'greeting' AND value <> ''",
            (ws.agents[0].id,),
            1,
        )
        assert agent.connections == 2 and lines.count("lifecycle ready") == 1
        assert rows == [{"value": "hi"}]
        nursery.cancel_scope.cancel()


async def test_a_rejected_token_is_retried_with_growing_backoff(
    db: Database, server: Server, clock: trio.testing.MockClock
) -> None:
    lines = Lines()
    agent = Agent(token=str(uuid.uuid4()), dial=server.dial, where="memory", say=lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await lines.wait_for("reconnecting in", 6)
        nursery.cancel_scope.cancel()
    assert lines.lines[0].startswith(
        "could not connect: UpgradeError: HTTP 401: Workspace agent not authorized."
    )
    delays = [float(line.split()[-1].rstrip("s")) for line in lines.lines if line.startswith("reconnecting")]
    assert delays[-1] > delays[0] and all(d <= 10 for d in delays)


async def test_exit_after_ready(db: Database, server: Server, clock: trio.testing.MockClock) -> None:
    ws = await seed(db, metadata=[])
    lines = Lines()
    agent = make_agent(server, ws, lines, exit_after_ready=True)
    await agent.run()
    assert agent.exit_status == 0 and lines.lines[-1] == "exiting after startup (ready)"
    assert (await agent_row(db, ws.agents[0].id))["state"] == "ready"


async def test_boundary_logs_land_under_one_session(
    db: Database, server: Server, clock: trio.testing.MockClock
) -> None:
    ws = await seed(db, metadata=[])
    lines = Lines()
    agent = make_agent(server, ws, lines, boundary_logs=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await lines.wait_for("boundary: 5 logs reported", 2)
        nursery.cancel_scope.cancel()
    session = await db.fetchone(
        "SELECT workspace_agent_id, confined_process_name FROM boundary_sessions WHERE id = %s",
        (agent.boundary_session,),
    )
    assert session == {"workspace_agent_id": ws.agents[0].id, "confined_process_name": "claude"}
    rows = await db.fetchall(
        "SELECT sequence_number, method, detail, matched_rule FROM boundary_logs "
        "WHERE session_id = %s ORDER BY sequence_number",
        (agent.boundary_session,),
    )
    assert [r["sequence_number"] for r in rows] == list(range(10))
    denied = [r for r in rows if "evil.example.net" in r["detail"]]
    assert denied and all(r["matched_rule"] is None for r in denied)
    assert rows[1] == {
        "sequence_number": 1,
        "method": "GET",
        "detail": "https://github.com/v1/item/1",
        "matched_rule": "domain=github.com",
    }


async def test_log_limit_exceeded_stops_log_sending_but_not_the_agent(
    db: Database, server: Server, clock: trio.testing.MockClock
) -> None:
    # 1100 lines of 1000 bytes: more than the agent's 1 MiB logs_length budget (spec §7.9).
    flood = "head -c 1100000 /dev/zero | tr '\\0' x | fold -w 1000; echo after"
    ws = await seed(
        db, scripts=[{"display_name": "flood", "script": flood, "run_on_start": True}], metadata=[]
    )
    lines = Lines()
    agent = make_agent(server, ws, lines)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        assert await agent.lifecycle.wait_reported(TERMINAL_STARTUP) == S.READY
        await agent.logs.wait_drained()
        await lines.wait_for("log limit exceeded: no more script output is sent")
        assert agent.logs.limit_exceeded and agent.logs.dropped > 0 and agent.connections == 1
        nursery.cancel_scope.cancel()
    row = await db.fetchone(
        "SELECT logs_overflowed, logs_length FROM workspace_agents WHERE id = %s", (ws.agents[0].id,)
    )
    assert row is not None and row["logs_overflowed"] and row["logs_length"] <= 1 << 20
    stored = await db.fetchval(
        "SELECT count(*) FROM workspace_agent_logs WHERE agent_id = %s", (ws.agents[0].id,)
    )
    assert 0 < stored < 1100


async def test_stop_before_any_connection_exits_at_once(
    server: Server, clock: trio.testing.MockClock
) -> None:
    server.refuse = True
    lines = Lines()
    agent = Agent(token=str(uuid.uuid4()), dial=server.dial, where="memory", say=lines)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await lines.wait_for("could not connect: OSError: connection refused")
        agent.stop()
    assert trio.current_time() - start < 1
    assert lines.lines[-1] == "stopping (Ctrl-C again to exit now)"
