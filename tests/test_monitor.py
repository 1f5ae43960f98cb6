"""The connection monitor (spec §2.8): pings, timestamps, build-outdated, events — on autojump time."""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from typing import Any

import attrs
import pytest
import trio

import agentd.testing
from agentd.model import AgentIdentity
from agentd.monitor import (
    BUILD_OUTDATED,
    DISCONNECT,
    PING_TIMEOUT,
    ConnectionMonitor,
    Watch,
    disconnect_timeout_for,
)
from agentd.services.events import AGT_CONNECTION_UPDATE, Events
from agentd.store import Database
from agentd.store.sessions import authenticate_agent
from agentd.testing import serve_agent
from tests.test_connection import RecordingPublisher, add_build, seed

EPOCH = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Autojumping virtual time that jumps only after 0.1 s of real idleness.

    pytest-trio's ``autojump_clock`` jumps as soon as every task waits, which includes waiting for
    PostgreSQL's answer: each query would then "take" seconds of virtual time and shift the timers
    under test. With a small threshold, queries take no virtual time and sleeps still cost nothing.
    """
    return agentd.testing.virtual_clock(0.1)


def virtual_now() -> dt.datetime:
    """Wall time that follows trio's (mock) clock, so timestamps can be asserted exactly."""
    return EPOCH + dt.timedelta(seconds=trio.current_time())


@attrs.define
class Pinger:
    """Answers each ping at once until ``silent`` is set; then never (a peer that stopped reading)."""

    silent: bool = False
    pings: int = 0
    last_heard: float = 0.0

    def send_ping(self) -> None:
        self.pings += 1
        if not self.silent:
            self.last_heard = trio.current_time()


@attrs.define
class Closer:
    reasons: list[str] = attrs.field(factory=list)
    closed: trio.Event = attrs.field(factory=trio.Event)

    async def __call__(self, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        self.reasons.append(reason)
        self.closed.set()


async def times(db: Database, agent_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchone(
        "SELECT first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id,"
        " updated_at "
        "FROM workspace_agents WHERE id = %s",
        (agent_id,),
    )
    assert row is not None
    return row


@attrs.define(eq=False)
class MonitoredSession:
    """One session under a process-wide monitor of its own, shaped like agentd.connection's use of it:
    ``run`` starts the monitor and the session (start write, pings); the monitor ends it by
    cancelling; the teardown closes (``close(reason)``) first, then records the disconnect."""

    monitor: ConnectionMonitor
    ident: AgentIdentity
    pinger: Pinger
    close: Closer
    watch: Watch | None = None

    @property
    def reason(self) -> str:
        return self.watch.reason if self.watch is not None else DISCONNECT

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as outer:
            await outer.start(self.monitor.run)
            cancel = trio.CancelScope()
            try:
                with cancel:
                    self.watch = await self.monitor.open(
                        self.ident, end=lambda reason: cancel.cancel(), monitored=True, pinger=self.pinger
                    )
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self.close(self.reason)
                    if self.watch is not None:
                        await self.monitor.close(self.watch)
                outer.cancel_scope.cancel()


async def make_monitor(db: Database, *, pinger: Pinger | None = None) -> tuple[MonitoredSession, Any, Closer]:
    ws = await seed(db)
    ident = await authenticate_agent(db, ws.agents[0].token)
    assert ident is not None
    publisher = RecordingPublisher()
    closer = Closer()
    monitor = MonitoredSession(
        ConnectionMonitor(db=db, events=Events(publisher), replica_id=uuid.UUID(int=7), now=virtual_now),
        ident=ident,
        pinger=pinger or Pinger(),
        close=closer,
    )
    return monitor, (ws, publisher), closer


def connection_events(publisher: RecordingPublisher, ws: Any) -> list[dict[str, str]]:
    out = []
    for channel, payload in publisher.sent:
        assert channel == f"workspace_owner:{ws.owner_id}"
        out.append(json.loads(payload))
    return out


def test_disconnect_timeout_is_twice_the_period_with_a_floor() -> None:
    assert disconnect_timeout_for(15) == 30
    assert disconnect_timeout_for(0.5) == 2


async def test_start_ticks_and_exit(db: Database, clock: trio.testing.MockClock) -> None:
    monitor, (ws, publisher), closer = await make_monitor(db)
    agent_id = ws.agents[0].id
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        start = await times(db, agent_id)
        assert start["first_connected_at"] == start["last_connected_at"] == start["updated_at"]
        assert start["disconnected_at"] is None
        assert start["last_connected_replica_id"] == uuid.UUID(int=7)
        event = {
            "kind": AGT_CONNECTION_UPDATE,
            "workspace_id": str(ws.workspace_id),
            "agent_id": str(agent_id),
        }
        assert connection_events(publisher, ws) == [event]

        await trio.sleep(100)  # six ticks, pings answered
        later = await times(db, agent_id)
        assert later["first_connected_at"] == start["first_connected_at"]
        assert later["last_connected_at"] > start["last_connected_at"] + dt.timedelta(seconds=80)
        assert later["disconnected_at"] is None
        assert monitor.pinger.pings >= 5  # type: ignore[attr-defined]
        assert not closer.reasons
        # A tick that changes nothing about the status publishes nothing (coderd).
        assert len(publisher.sent) == 1
        nursery.cancel_scope.cancel()

    end = await times(db, agent_id)
    assert end["disconnected_at"] is not None and end["disconnected_at"] >= later["last_connected_at"]
    assert end["first_connected_at"] == start["first_connected_at"]
    assert connection_events(publisher, ws) == [event, event]
    assert closer.reasons == ["disconnect"]


async def test_reconnect_keeps_first_connected_and_clears_disconnect(
    db: Database, clock: trio.testing.MockClock
) -> None:
    monitor, (ws, publisher), _closer = await make_monitor(db)
    agent_id = ws.agents[0].id
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        nursery.cancel_scope.cancel()
    first = await times(db, agent_id)
    assert first["disconnected_at"] is not None

    await trio.sleep(60)
    again = attrs.evolve(monitor, close=Closer(), watch=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        row = await times(db, agent_id)
        assert row["first_connected_at"] == first["first_connected_at"]
        assert row["disconnected_at"] == first["disconnected_at"]  # kept until the first tick (coderd)
        sent = len(publisher.sent)
        await trio.sleep(16)
        row = await times(db, agent_id)
        assert row["disconnected_at"] is None
        assert len(publisher.sent) == sent + 1  # the status changed: connected again
        nursery.cancel_scope.cancel()


async def test_silent_peer_is_dropped_after_the_disconnect_timeout(
    db: Database, clock: trio.testing.MockClock
) -> None:
    pinger = Pinger()
    monitor, (ws, _publisher), closer = await make_monitor(db, pinger=pinger)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.sleep(20)  # one answered ping at t=15
        pinger.silent = True
        await closer.closed.wait()
        silent_for = trio.current_time() - pinger.last_heard
    # Last answer at 15 s; the first tick more than 30 s after it (t=60) drops the agent.
    assert pinger.last_heard > 0
    assert 30 < silent_for <= 45 + 1
    assert closer.reasons == [PING_TIMEOUT]
    assert monitor.reason == PING_TIMEOUT
    row = await times(db, ws.agents[0].id)
    assert row["disconnected_at"] is not None


async def test_outdated_build_closes_the_connection(db: Database, clock: trio.testing.MockClock) -> None:
    monitor, (ws, _publisher), closer = await make_monitor(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.sleep(40)
        assert not closer.reasons
        await add_build(db, ws, transition="start", job_done=True)
        await closer.closed.wait()
    assert closer.reasons == [BUILD_OUTDATED]


async def test_monitor_of_a_served_agent_pings_over_yamux(
    db: Database, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    """Through the real connection: yamux pings are answered by the agent's session, so a quiet but
    healthy agent stays connected; a stale build drops it with the reason."""
    ws = await seed(db)
    done = trio.Event()

    async def run(*, task_status: Any) -> None:
        await serve_agent(db, ws.agents[0].token, services=("banners",), task_status=task_status)
        done.set()

    agent = await nursery.start(run)
    await trio.sleep(125)
    assert agent.connection.monitor is not None
    assert agent.connection.monitor.reason == "disconnect"  # still running
    # the monitor's tick sends the server's pings; the session runs no keepalive of its own
    assert agent.connection.monitor.pings_sent >= 3
    assert agent.connection.session is not None
    assert not agent.connection.session.config.enable_keepalive
    row = await times(db, ws.agents[0].id)
    assert row["disconnected_at"] is None
    await add_build(db, ws, transition="start", job_done=True)
    with trio.fail_after(60):
        await done.wait()
    assert agent.connection.monitor.reason == BUILD_OUTDATED
    row = await times(db, ws.agents[0].id)
    assert row["disconnected_at"] is not None


@pytest.mark.parametrize("role", ["agent", ""])
async def test_monitoring_roles(db: Database, nursery: trio.Nursery, role: str) -> None:
    ws = await seed(db)
    agent = await nursery.start(
        functools.partial(serve_agent, db, ws.agents[0].token, role=role, services=())
    )
    assert agent.connection.monitor is not None
    row = await times(db, ws.agents[0].id)
    assert row["first_connected_at"] is not None


async def test_connection_events_reach_pubsub_subscribers(db: Database) -> None:
    """The agt_connection_update events go out on the owner's channel through the store's pubsub."""
    from agentd.store.pubsub import PubSub

    ws = await seed(db)
    pubsub = PubSub(db)
    event = {
        "kind": AGT_CONNECTION_UPDATE,
        "workspace_id": str(ws.workspace_id),
        "agent_id": str(ws.agents[0].id),
    }
    async with trio.open_nursery() as nursery:
        await nursery.start(pubsub.run)
        async with pubsub.subscribe(f"workspace_owner:{ws.owner_id}") as sub:
            async with trio.open_nursery() as agent_nursery:
                agent = await agent_nursery.start(
                    functools.partial(serve_agent, db, ws.agents[0].token, services=(), events=Events(pubsub))
                )
                with trio.fail_after(10):
                    assert json.loads(await sub.__anext__()) == event  # type: ignore[arg-type]
                await agent.disconnect()
            with trio.fail_after(10):
                assert json.loads(await sub.__anext__()) == event  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_websocket_agent_is_told_why_it_was_dropped(
    db: Database, nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    """coderd closes the WebSocket with 1001 (going away) and the monitor's reason."""
    from agentd.websocket import WebSocketByteStream

    ws = await seed(db)
    done = trio.Event()

    async def run(*, task_status: Any) -> None:
        await serve_agent(db, ws.agents[0].token, services=(), websocket=True, task_status=task_status)
        done.set()

    agent = await nursery.start(run)
    await add_build(db, ws, transition="start", job_done=True)
    with trio.fail_after(60):
        await done.wait()
    transport = agent.transport
    assert isinstance(transport, WebSocketByteStream)
    assert (transport.close_code, transport.close_reason) == (1001, BUILD_OUTDATED)
