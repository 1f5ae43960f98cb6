"""Several PostgreSQL coordinators (replicas) on one database behave as one tailnet.

Each replica has its own pool and LISTEN connection, as separate processes would. These run on the
real clock (heartbeats travel through PostgreSQL, which a virtual clock cannot wait for) with a
short heartbeat so that expiry takes ~1.5 s; the killed-process case is in test_pg_serve.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import pytest
import trio

from agentd.store import Database, open_database
from agentd.tailnet.coordinator import AgentAuth, ClientAuth, Kind, PeerUpdate, Request
from agentd.tailnet.pg_coordinator import PgCoordinator
from tests.tailnet.test_coordinators import AGENT, CLIENT, node, updates

HEARTBEAT = 0.5
CLIENT2 = uuid.UUID("0c0c0c0c-2f19-4c55-9a7b-1d1d1d1d0004")


@attrs.define
class Replica:
    coordinator: PgCoordinator
    scope: trio.CancelScope

    def crash(self) -> None:
        """Stop like a killed process: no more heartbeats, nothing marked lost."""
        self.coordinator.mark_lost_on_close = False
        self.scope.cancel()


@asynccontextmanager
async def replica(db_url: str) -> AsyncIterator[Replica]:
    async with open_database(db_url, max_size=3) as db, trio.open_nursery() as nursery:
        # No periodic re-sync: a missed notification must fail a test, not heal after 30 s.
        coordinator = PgCoordinator(db, heartbeat_interval=HEARTBEAT, refresh_interval=3600)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await coordinator.run(task_status=task_status)

        await nursery.start(run)
        yield Replica(coordinator, scope)
        nursery.cancel_scope.cancel()


async def rows_reach(db: Database, want: int, sql: str, params: list[object]) -> None:
    """Until ``sql`` (a count) returns ``want``: the coordinators' writes are in the tables."""
    with trio.fail_after(10):
        while await db.fetchval(sql, params) != want:  # noqa: ASYNC110 - polling the server
            await trio.sleep(0.01)


@pytest.fixture
async def replicas(db_url: str, db: Database) -> AsyncIterator[tuple[Replica, Replica, Replica]]:
    async with replica(db_url) as a, replica(db_url) as b, replica(db_url) as c:
        yield a, b, c


async def test_agent_and_client_on_different_replicas(replicas: tuple[Replica, Replica, Replica]) -> None:
    a, b, _ = replicas
    async with a.coordinator.connect(AGENT, "agent", AgentAuth(AGENT)) as agent:
        await agent.send(Request(update_self=node(AGENT)))
        async with b.coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
            await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
            [got] = await updates(client, 1)
            assert (got.id, got.kind, got.node) == (AGENT, Kind.NODE, node(AGENT))
            [got] = await updates(agent, 1)
            assert (got.id, got.kind, got.node) == (CLIENT, Kind.NODE, node(CLIENT))
            await agent.send(Request(update_self=node(AGENT, 7)))
            assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.NODE, node(AGENT, 7), "node update")]
            await agent.send(Request(ready_for_handshake=[CLIENT]))
            assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.READY_FOR_HANDSHAKE)]
            client.disconnect()
        assert await updates(agent, 1) == [PeerUpdate(CLIENT, Kind.DISCONNECTED, None, "graceful disconnect")]


async def test_tunnel_added_before_the_agent_connects(
    replicas: tuple[Replica, Replica, Replica], db: Database
) -> None:
    a, b, _ = replicas
    async with b.coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
        await rows_reach(
            db, 1, "SELECT count(*) FROM tailnet_tunnels WHERE src_id = %s AND dst_id = %s", [CLIENT, AGENT]
        )
        async with a.coordinator.connect(AGENT, "agent", AgentAuth(AGENT)) as agent:
            [got] = await updates(agent, 1)
            assert (got.id, got.kind, got.node) == (CLIENT, Kind.NODE, node(CLIENT))
            await agent.send(Request(update_self=node(AGENT)))
            [got] = await updates(client, 1)
            assert (got.id, got.kind, got.node) == (AGENT, Kind.NODE, node(AGENT))


async def test_lost_connection_and_stopped_replica(replicas: tuple[Replica, Replica, Replica]) -> None:
    a, b, c = replicas
    async with a.coordinator.connect(AGENT, "agent", AgentAuth(AGENT)) as agent:
        await agent.send(Request(update_self=node(AGENT)))
        async with b.coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
            await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
            await updates(agent, 1)
        # The client's connection ended without disconnect: LOST on the other replica.
        assert await updates(agent, 1) == [PeerUpdate(CLIENT, Kind.LOST, None, "lost")]
        async with c.coordinator.connect(CLIENT2, "client2", ClientAuth({AGENT})) as client2:
            await client2.send(Request(update_self=node(CLIENT2), add_tunnel=AGENT))
            await updates(agent, 1)
            # A replica that stops cleanly marks its peers lost at once (no heartbeat wait).
            c.scope.cancel()
            with trio.fail_after(HEARTBEAT):
                assert await updates(agent, 1) == [PeerUpdate(CLIENT2, Kind.LOST, None, "coordinator close")]


async def test_crashed_replica_is_lost_within_the_heartbeat_bound(
    replicas: tuple[Replica, Replica, Replica],
) -> None:
    a, b, c = replicas
    async with (
        a.coordinator.connect(AGENT, "agent", AgentAuth(AGENT)) as agent,
        b.coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client,
        c.coordinator.connect(CLIENT2, "client2", ClientAuth({AGENT})) as client2,
    ):
        await agent.send(Request(update_self=node(AGENT)))
        for peer, peer_id in ((client, CLIENT), (client2, CLIENT2)):
            await peer.send(Request(update_self=node(peer_id), add_tunnel=AGENT))
            await updates(peer, 1)
        assert {u.id for u in await updates(agent, 2)} == {CLIENT, CLIENT2}
        crashed = trio.current_time()
        b.crash()
        [lost] = await updates(agent, 1)
        elapsed = trio.current_time() - crashed
        assert lost == PeerUpdate(CLIENT, Kind.LOST, None, "lost")
        # The bound: 3 missed heartbeats after the last one received (+ one sync, and slack for a
        # loaded machine); never before 2 periods have passed.
        assert 2 * HEARTBEAT <= elapsed <= a.coordinator.expiry + 1.5, elapsed
        # The other replicas keep working.
        await agent.send(Request(update_self=node(AGENT, 9)))
        [got] = await updates(client2, 1)
        assert (got.kind, got.node) == (Kind.NODE, node(AGENT, 9))
        # The client redials another replica: the agent hears of it again.
        async with c.coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as again:
            await again.send(Request(update_self=node(CLIENT, 5), add_tunnel=AGENT))
            [got] = await updates(agent, 1)
            assert (got.id, got.kind, got.node) == (CLIENT, Kind.NODE, node(CLIENT, 5))


async def test_concurrent_node_and_tunnel_writes_are_not_missed(
    replicas: tuple[Replica, Replica, Replica], db: Database
) -> None:
    """A node update on A racing a tunnel to it from B: whichever commits second tells the other side."""
    a, b, _ = replicas
    pairs = [(uuid.uuid4(), uuid.uuid4()) for _ in range(30)]
    async with AsyncExitStack() as stack:
        handles = []
        for agent_id, client_id in pairs:
            agent = await stack.enter_async_context(a.coordinator.connect(agent_id, "a", AgentAuth(agent_id)))
            client = await stack.enter_async_context(
                b.coordinator.connect(client_id, "c", ClientAuth({agent_id}))
            )
            handles.append((agent, client))
        # every peer bound to its replica before the race starts
        ids = [peer for pair in pairs for peer in pair]
        await rows_reach(db, len(ids), "SELECT count(*) FROM tailnet_peers WHERE id = ANY(%s)", [ids])
        async with trio.open_nursery() as nursery:
            for (agent_id, client_id), (agent, client) in zip(pairs, handles, strict=True):
                nursery.start_soon(agent.send, Request(update_self=node(agent_id)))
                nursery.start_soon(client.send, Request(update_self=node(client_id), add_tunnel=agent_id))
        with trio.fail_after(10):
            for (agent_id, client_id), (agent, client) in zip(pairs, handles, strict=True):
                [got] = await updates(client, 1)
                assert (got.id, got.node) == (agent_id, node(agent_id))
                [got] = await updates(agent, 1)
                assert (got.id, got.node) == (client_id, node(client_id))
