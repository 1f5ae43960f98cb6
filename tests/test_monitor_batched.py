"""The process-wide connection monitor and cache refresher: one statement per tick for every session,
sessions that lose their authorisation end within one tick (every role), the teardown order, and the
connect path's single lookup query."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
import trio

from agentd.components import Components
from agentd.model import PREBUILDS_USER_ID, WorkspaceIdentity
from agentd.monitor import (
    AGENT_DELETED,
    BUILD_OUTDATED,
    DEFAULT_PING_PERIOD,
    WORKSPACE_DELETED,
    ConnectionMonitor,
    Watch,
)
from agentd.services.base import WorkspaceCache
from agentd.services.events import AGT_CONNECTION_UPDATE, Events
from agentd.services.workspace_cache import REFRESH_INTERVAL, WorkspaceCacheRefresher
from agentd.store import Database
from agentd.store import monitors as monitor_rows
from agentd.store.sessions import (
    authenticate_agent,
    authenticate_connection,
    workspace_identities,
    workspace_identity,
)
from agentd.testing import TestAgent, serve_agent, virtual_clock
from tests.test_connection import RecordingPublisher, add_build, seed

clock = pytest.fixture(virtual_clock)


@attrs.define(eq=False)
class CountingDatabase:
    """The real database, counting the statements sent through it (by their first word)."""

    db: Database
    statements: list[str] = attrs.field(factory=list)

    def _count(self, sql: Any) -> None:
        text = sql if isinstance(sql, str) else sql.as_string()
        self.statements.append(text.split(None, 1)[0].upper())

    async def execute(self, sql: Any, params: Any = ()) -> int:
        self._count(sql)
        return await self.db.execute(sql, params)

    async def fetchone(self, sql: Any, params: Any = ()) -> dict[str, Any] | None:
        self._count(sql)
        return await self.db.fetchone(sql, params)

    async def fetchall(self, sql: Any, params: Any = ()) -> list[dict[str, Any]]:
        self._count(sql)
        return await self.db.fetchall(sql, params)

    async def fetchval(self, sql: Any, params: Any = ()) -> Any:
        self._count(sql)
        return await self.db.fetchval(sql, params)


@attrs.define
class Pinger:
    """A peer that says nothing unless pinged; it answers every ping at once unless ``silent``."""

    silent: bool = False
    last_heard: float = 0.0
    pings: int = 0

    def send_ping(self) -> None:
        self.pings += 1
        if not self.silent:
            self.last_heard = trio.current_time()


async def agent_row(db: Database, agent_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchone(
        "SELECT first_connected_at, last_connected_at, disconnected_at, updated_at"
        " FROM workspace_agents WHERE id = %s",
        (agent_id,),
    )
    assert row is not None
    return row


# ---- one statement per tick ----------------------------------------------------------------------


async def test_one_update_and_one_check_per_tick_for_all_sessions(db: Database) -> None:
    """Six sessions (five monitored agents, one other role): a tick is two statements in all — the
    UPDATE of every monitored agent and the authorisation query of every session."""
    counting = CountingDatabase(db)
    publisher = RecordingPublisher()
    ticks = [dt.datetime(2030, 1, 1, tzinfo=dt.UTC)]
    monitor = ConnectionMonitor(
        db=counting, events=Events(publisher), replica_id=uuid.UUID(int=7), now=lambda: ticks[-1]
    )
    workspaces = [await seed(db, f"w{i}", username=f"u{i}") for i in range(5)]
    ended: list[str] = []
    watches: list[Watch] = []
    for ws in workspaces:
        ident = await authenticate_agent(db, ws.agents[0].token)
        assert ident is not None
        watches.append(await monitor.open(ident, end=ended.append, monitored=True, pinger=Pinger()))
    other = await authenticate_agent(db, workspaces[0].agents[0].token)
    assert other is not None
    watches.append(await monitor.open(other, end=ended.append, monitored=False))
    assert counting.statements == ["UPDATE"] * 5  # the five start writes, one statement each
    assert len(publisher.sent) == 5

    for n in range(1, 4):
        counting.statements.clear()
        ticks.append(ticks[0] + dt.timedelta(seconds=15 * n))
        await monitor.tick()
        assert counting.statements == ["UPDATE", "SELECT"]
        for ws in workspaces:
            row = await agent_row(db, ws.agents[0].id)
            assert row["last_connected_at"] == row["updated_at"] == ticks[-1]
            assert row["first_connected_at"] == ticks[0]
            assert row["disconnected_at"] is None
    assert not ended
    assert len(publisher.sent) == 5  # no status changed: no events

    # A recorded disconnect is cleared by the next tick, with its event.
    await db.execute(
        "UPDATE workspace_agents SET disconnected_at = now() WHERE id = %s", (workspaces[2].agents[0].id,)
    )
    await monitor.tick()
    assert (await agent_row(db, workspaces[2].agents[0].id))["disconnected_at"] is None
    assert len(publisher.sent) == 6 and str(workspaces[2].agents[0].id) in publisher.sent[-1][1]

    # A row locked elsewhere (a stuck transaction) is skipped; every other agent's tick goes on.
    stuck = workspaces[0].agents[0].id
    async with db.transaction() as tx:
        await tx.execute("SELECT 1 FROM workspace_agents WHERE id = %s FOR UPDATE", (stuck,))
        ticks.append(ticks[-1] + dt.timedelta(seconds=15))
        with trio.fail_after(5):
            await monitor.tick()
    assert (await agent_row(db, stuck))["last_connected_at"] < ticks[-1]
    assert (await agent_row(db, workspaces[1].agents[0].id))["last_connected_at"] == ticks[-1]

    for watch in watches:
        await monitor.close(watch)
    assert not monitor.watches


@attrs.define
class BatchPublisher(RecordingPublisher):
    """A publisher with publish_many (as agentd.store.pubsub.PubSub): records each batch."""

    batches: list[int] = attrs.field(factory=list)

    async def publish_many(self, messages: Sequence[tuple[str, str]]) -> None:
        self.batches.append(len(messages))
        for channel, payload in messages:
            await self.publish(channel, payload)


async def test_the_disconnects_one_tick_clears_are_published_in_one_batch(db: Database) -> None:
    publisher = BatchPublisher()
    monitor = ConnectionMonitor(db=db, events=Events(publisher), replica_id=uuid.UUID(int=7))
    workspaces = [await seed(db, f"w{i}", username=f"u{i}") for i in range(3)]
    await db.execute("UPDATE workspace_agents SET disconnected_at = now()")  # all were disconnected
    for ws in workspaces:
        ident = await authenticate_agent(db, ws.agents[0].token)
        assert ident is not None
        await monitor.open(ident, end=lambda reason: None, monitored=True, pinger=Pinger())
    assert len(publisher.sent) == 3  # the start events
    publisher.batches.clear()
    await monitor.tick()
    assert publisher.batches == [3]
    assert sorted(publisher.sent[3:]) == sorted(
        (
            f"workspace_owner:{ws.owner_id}",
            f'{{"kind":"{AGT_CONNECTION_UPDATE}","workspace_id":'
            f'"{ws.workspace_id}","agent_id":"{ws.agents[0].id}"}}',
        )
        for ws in workspaces
    )
    await monitor.tick()
    assert publisher.batches == [3]  # nothing changed since


async def test_publish_many_delivers_in_order(db: Database, pubsub: Any) -> None:
    async with pubsub.subscribe("workspace_owner:x") as sub:
        await pubsub.publish_many([("workspace_owner:x", f"m{i}") for i in range(5)])
        with trio.fail_after(10):
            assert [await sub.__anext__() for _ in range(5)] == [f"m{i}" for i in range(5)]


async def test_sessions_starting_together_share_their_start_write(db: Database) -> None:
    """Ten connects at once: the start writes and their events go out in at most two batches, and
    every row and event is as if each had its own."""
    counting = CountingDatabase(db)
    publisher = BatchPublisher()
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    monitor = ConnectionMonitor(
        db=counting, events=Events(publisher), replica_id=uuid.UUID(int=7), now=lambda: now
    )
    workspaces = [await seed(db, f"w{i}", username=f"u{i}") for i in range(10)]
    idents = [await authenticate_agent(db, ws.agents[0].token) for ws in workspaces]
    watches: list[Watch] = []

    async def open_one(ident: Any) -> None:
        watches.append(await monitor.open(ident, end=lambda reason: None, monitored=True, pinger=Pinger()))

    async with trio.open_nursery() as nursery:
        for ident in idents:
            nursery.start_soon(open_one, ident)
    assert len(watches) == 10
    assert counting.statements.count("UPDATE") <= 2 and sum(publisher.batches) == 10
    assert len(publisher.batches) == counting.statements.count("UPDATE")
    for ws in workspaces:
        row = await agent_row(db, ws.agents[0].id)
        assert row["first_connected_at"] == row["last_connected_at"] == row["updated_at"] == now
    assert sorted(p for _, p in publisher.sent) == sorted(
        f'{{"kind":"{AGT_CONNECTION_UPDATE}","workspace_id":"{ws.workspace_id}","agent_id":"{ws.agents[0].id}"}}'
        for ws in workspaces
    )


async def test_a_start_write_for_a_missing_agent_refuses_that_session_only(db: Database) -> None:
    monitor = ConnectionMonitor(db=db, events=Events(RecordingPublisher()), replica_id=uuid.UUID(int=7))
    ws = await seed(db)
    ident = await authenticate_agent(db, ws.agents[0].token)
    assert ident is not None
    ghost = attrs.evolve(ident, agent_id=uuid.uuid4())
    with pytest.raises(LookupError, match="start write failed"):
        await monitor.open(ghost, end=lambda reason: None, monitored=True)
    watch = await monitor.open(ident, end=lambda reason: None, monitored=True)
    assert watch in monitor.watches and len(monitor.watches) == 1


async def test_silent_sessions_are_dropped_on_the_shared_tick(db: Database, clock: Any) -> None:
    monitor = ConnectionMonitor(db=db, events=Events(RecordingPublisher()), replica_id=uuid.UUID(int=7))
    ws = await seed(db)
    ident = await authenticate_agent(db, ws.agents[0].token)
    assert ident is not None
    ended: list[str] = []
    pinger = Pinger(silent=True)
    watch = await monitor.open(ident, end=ended.append, monitored=True, pinger=pinger)
    await trio.sleep(monitor.disconnect_timeout - 1)
    await monitor.tick()
    assert not ended and pinger.pings == 1
    await trio.sleep(2)  # no ping answered for more than the disconnect timeout
    await monitor.tick()
    assert ended == ["ping timeout"] and watch.reason == "ping timeout"


async def test_a_session_heard_from_within_half_a_period_is_not_pinged(db: Database, clock: Any) -> None:
    """Any frame from the agent (its own keepalive pings included) shows it alive: the tick pings
    only sessions quiet for half a period or more, and drops none that keep talking."""
    monitor = ConnectionMonitor(db=db, events=Events(RecordingPublisher()), replica_id=uuid.UUID(int=7))
    ws = await seed(db)
    ident = await authenticate_agent(db, ws.agents[0].token)
    assert ident is not None
    ended: list[str] = []
    pinger = Pinger(silent=True)
    await monitor.open(ident, end=ended.append, monitored=True, pinger=pinger)
    for _ in range(6):
        await trio.sleep(monitor.ping_period)
        pinger.last_heard = trio.current_time() - monitor.ping_period / 2 + 1  # the agent's traffic
        await monitor.tick()
    assert pinger.pings == 0 and not ended
    await trio.sleep(monitor.ping_period)
    await monitor.tick()
    assert pinger.pings == 1 and not ended


# ---- authorisation re-checked on the tick, every role --------------------------------------------


async def outdate_build(db: Database, ws: Any) -> None:
    await add_build(db, ws, transition="start", job_done=True)


async def delete_workspace(db: Database, ws: Any) -> None:
    await db.execute("UPDATE workspaces SET deleted = true WHERE id = %s", (ws.workspace_id,))


async def delete_agent(db: Database, ws: Any) -> None:
    await db.execute("UPDATE workspace_agents SET deleted = true WHERE id = %s", (ws.agents[0].id,))


@pytest.mark.parametrize("role", ["agent", "log-sidecar"])
@pytest.mark.parametrize(
    ("change", "reason"),
    [(outdate_build, BUILD_OUTDATED), (delete_workspace, WORKSPACE_DELETED), (delete_agent, AGENT_DELETED)],
)
async def test_a_session_that_lost_its_authorisation_ends_within_one_tick(
    db: Database, nursery: trio.Nursery, clock: Any, role: str, change: Any, reason: str
) -> None:
    ws = await seed(db)
    done = trio.Event()

    async def run(*, task_status: Any) -> None:
        await serve_agent(db, ws.agents[0].token, role=role, services=("logs",), task_status=task_status)
        done.set()

    agent: TestAgent = await nursery.start(run)
    await trio.sleep(40)  # a few ticks: nothing changed, the session goes on
    assert not done.is_set()
    await change(db, ws)
    changed_at = trio.current_time()
    with trio.fail_after(DEFAULT_PING_PERIOD + 1):
        await done.wait()
    assert trio.current_time() - changed_at <= DEFAULT_PING_PERIOD + 0.5
    watch = agent.connection.watch
    assert watch is not None and watch.reason == reason
    assert (agent.connection.monitor is not None) == (role == "agent")


# ---- the end of a session -------------------------------------------------------------------------


async def test_disconnect_is_written_at_once_when_the_session_ends(
    db: Database, nursery: trio.Nursery, clock: Any
) -> None:
    ws = await seed(db)
    done = trio.Event()

    async def run(*, task_status: Any) -> None:
        await serve_agent(db, ws.agents[0].token, services=(), task_status=task_status)
        done.set()

    agent: TestAgent = await nursery.start(run)
    await trio.sleep(100)
    assert (await agent_row(db, ws.agents[0].id))["disconnected_at"] is None
    dropped_at = trio.current_time()
    await agent.disconnect()
    await done.wait()
    assert trio.current_time() - dropped_at < 1  # not on a later tick
    assert (await agent_row(db, ws.agents[0].id))["disconnected_at"] is not None


async def test_transport_is_closed_before_the_disconnect_write_which_a_hung_database_cannot_hold(
    db: Database, nursery: trio.Nursery
) -> None:
    """Real time. Another connection holds the agent row's lock, so the disconnect write blocks: the
    agent still sees its session closed at once, and the session ends within the close bound."""
    ws = await seed(db)
    publisher = RecordingPublisher()
    components = Components(
        connection_monitor=ConnectionMonitor(
            db=db, events=Events(publisher), replica_id=uuid.UUID(int=7), close_timeout=1.0
        ),
        workspace_cache=WorkspaceCacheRefresher(functools.partial(workspace_identities, db)),
    )
    done = trio.Event()

    async def run(*, task_status: Any) -> None:
        await serve_agent(
            db,
            ws.agents[0].token,
            services=(),
            components=components,
            events=Events(publisher),
            task_status=task_status,
        )
        done.set()

    agent: TestAgent = await nursery.start(run)
    assert len(publisher.sent) == 1
    async with db.transaction() as tx:
        await tx.execute("SELECT 1 FROM workspace_agents WHERE id = %s FOR UPDATE", (ws.agents[0].id,))
        started = trio.current_time()
        agent.connection.close()  # e.g. shutdown: the session ends
        with trio.fail_after(5):
            with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                await agent.session.accept_stream()  # the agent sees the close while the row is locked
        closed_after = trio.current_time() - started
        with trio.fail_after(5):
            await done.wait()
        ended_after = trio.current_time() - started
        assert closed_after < 0.9  # before the bounded write gave up
        assert 0.9 <= ended_after < 3
        # The abandoned statement is cancelled on the server too (a cancel request sent in the
        # background): wait until no backend still waits for this row's lock, then release it.
        waiting = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
        with trio.fail_after(5):
            while await db.fetchval(waiting):  # noqa: ASYNC110 - polling the server's view
                await trio.sleep(0.02)
    row = await agent_row(db, ws.agents[0].id)
    assert row["disconnected_at"] is None  # the write was abandoned, not left hanging


# ---- the cache refresher --------------------------------------------------------------------------


async def test_cache_refresh_of_many_sessions_is_one_query_and_shows_a_claim(
    db: Database, clock: Any
) -> None:
    workspaces = [await seed(db, f"w{i}", username=f"u{i}") for i in range(5)]
    claimed = workspaces[4]
    await db.execute(
        "UPDATE workspaces SET owner_id = %s WHERE id = %s", (PREBUILDS_USER_ID, claimed.workspace_id)
    )
    counting = CountingDatabase(db)
    reads: list[int] = []

    async def read(ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, WorkspaceIdentity]:
        reads.append(len(ids))
        return await workspace_identities(counting, ids)  # type: ignore[arg-type]

    refresher = WorkspaceCacheRefresher(read)
    caches = [WorkspaceCache() for _ in workspaces]
    async with trio.open_nursery() as nursery:
        await nursery.start(refresher.run)
        for cache, ws in zip(caches, workspaces, strict=True):
            identity = await workspace_identity(db, ws.workspace_id)
            await refresher.add(cache, ws.workspace_id, identity)  # filled from the connect query
        assert not reads
        assert [c.value is not None for c in caches] == [True] * 4 + [False]  # the prebuild stays empty

        await db.execute("UPDATE workspaces SET name = name || '-renamed'")
        await db.execute(
            "UPDATE workspaces SET owner_id = %s WHERE id = %s",
            (workspaces[0].owner_id, claimed.workspace_id),
        )
        await trio.sleep(REFRESH_INTERVAL + 1)
        assert reads == [5] and counting.statements == ["SELECT"]
        for cache, ws in zip(caches, workspaces, strict=True):
            assert cache.value is not None and cache.value.name == ws.workspace_name + "-renamed"
        assert caches[4].value is not None and caches[4].value.owner_id == workspaces[0].owner_id
        nursery.cancel_scope.cancel()


# ---- connect ---------------------------------------------------------------------------------------


async def test_connect_query_returns_identity_cache_and_monitors(db: Database) -> None:
    ws = await seed(db)
    agent_id = ws.agents[0].id
    await db.execute(
        "INSERT INTO workspace_agent_memory_resource_monitors (agent_id, enabled, threshold, created_at)"
        " VALUES (%s, true, 80, now())",
        (agent_id,),
    )
    for path in ("/home", "/"):
        await db.execute(
            "INSERT INTO workspace_agent_volume_resource_monitors"
            " (agent_id, enabled, threshold, path, created_at) VALUES (%s, true, 90, %s, now())",
            (agent_id, path),
        )
    auth = await authenticate_connection(db, ws.agents[0].token)
    assert auth is not None
    assert auth.ident == await authenticate_agent(db, ws.agents[0].token)
    assert auth.workspace == await workspace_identity(db, ws.workspace_id)
    assert auth.preload.memory_monitor == await monitor_rows.fetch_memory_monitor(db, agent_id)
    assert list(auth.preload.volume_monitors) == await monitor_rows.fetch_volume_monitors(db, agent_id)
    assert [v.path for v in auth.preload.volume_monitors] == ["/", "/home"]
    assert await authenticate_connection(db, uuid.uuid4()) is None


async def test_a_connect_costs_three_statements(db: Database, nursery: trio.Nursery) -> None:
    """Token lookup (identity, cache, monitors), the start write, the event — whatever is composed."""
    ws = await seed(db)
    counting = CountingDatabase(db)
    publisher = RecordingPublisher()
    agent: TestAgent = await nursery.start(
        functools.partial(serve_agent, counting, ws.agents[0].token, events=Events(publisher))  # type: ignore[arg-type]
    )
    assert counting.statements == ["WITH", "UPDATE"]  # lookup, start write; the event: the publisher
    assert [p for _, p in publisher.sent] == [
        f'{{"kind":"{AGT_CONNECTION_UPDATE}","workspace_id":"{ws.workspace_id}","agent_id":"{ws.agents[0].id}"}}'
    ]
    assert agent.connection.scope is not None and agent.connection.scope.cache.value is not None
    await agent.disconnect()
