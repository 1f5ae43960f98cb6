"""The same coordinator behaviour (spec §8.4) from the in-memory and the PostgreSQL coordinator.

Every test runs against both (``coordinator`` is parametrized). Responses may be batched
differently (the PostgreSQL coordinator sends what one sync found in one response), so tests
compare the flattened peer updates.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from agentd.store import Database
from agentd.tailnet.api import PeerConnection, TailnetCoordinator
from agentd.tailnet.coordinator import (
    ERROR_COORDINATOR_CLOSED,
    ERROR_OVERWRITTEN,
    TAILSCALE_SERVICE_PREFIX,
    AgentAuth,
    ClientAuth,
    CoordinatorCore,
    Kind,
    Node,
    PeerUpdate,
    Request,
    Response,
    service_address,
)
from agentd.tailnet.pg_coordinator import PgCoordinator
from agentd.tailnet.trio_coordinator import Coordinator

AGENT = uuid.UUID("0b7e4d7c-2f19-4c55-9a7b-1d1d1d1d0001")
AGENT2 = uuid.UUID("0b7e4d7c-2f19-4c55-9a7b-1d1d1d1d0003")
CLIENT = uuid.UUID("0c0c0c0c-2f19-4c55-9a7b-1d1d1d1d0002")
WAIT = 30.0


def node(peer_id: uuid.UUID, derp: int = 1) -> Node:
    addr = service_address(TAILSCALE_SERVICE_PREFIX, peer_id)
    return Node(preferred_derp=derp, addresses=(f"{addr}/128",), key=peer_id.bytes)


def make(kind: str, db: Database, response_buffer: int = 512) -> TailnetCoordinator:
    if kind == "memory":
        return Coordinator(core=CoordinatorCore(response_buffer=response_buffer))
    return PgCoordinator(db, response_buffer=response_buffer)


@pytest.fixture(params=["memory", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def coordinator(kind: str, db: Database) -> AsyncIterator[TailnetCoordinator]:
    coord = make(kind, db)
    async with trio.open_nursery() as nursery:
        await nursery.start(coord.run)
        yield coord
        nursery.cancel_scope.cancel()


async def updates(peer: PeerConnection, count: int) -> list[PeerUpdate]:
    """The next ``count`` peer updates, whatever responses they came in."""
    out: list[PeerUpdate] = []
    with trio.fail_after(WAIT):
        while len(out) < count:
            response = await peer.receive()
            assert response.error == "", response
            out.extend(response.peer_updates)
    assert len(out) == count, out
    return out


async def rest(peer: PeerConnection) -> list[Response]:
    """Everything until the coordinator ends this connection's queue."""
    with trio.fail_after(WAIT):
        return [r async for r in peer]


async def quiet(peer: PeerConnection) -> None:
    """Nothing more arrives once every pending write and sync has run."""
    await trio.sleep(5)  # virtual time: the writer and mapper are idle long before
    with pytest.raises(trio.WouldBlock):
        peer.receive_channel.receive_nowait()  # type: ignore[attr-defined]


async def test_nodes_flow_between_tunnel_peers(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        coordinator.connect(AGENT, "alice-ws-main", AgentAuth(AGENT)) as agent,
        coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client,
    ):
        assert await agent.send(Request(update_self=node(AGENT)))
        await trio.sleep(1)
        await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
        assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.NODE, node(AGENT), "add tunnel")]
        assert await updates(agent, 1) == [PeerUpdate(CLIENT, Kind.NODE, node(CLIENT), "add tunnel")]
        assert coordinator.node(AGENT) == node(AGENT)
        # Later node updates reach the other end; an identical node is not sent again.
        await agent.send(Request(update_self=node(AGENT, 2)))
        assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.NODE, node(AGENT, 2), "node update")]
        await agent.send(Request(update_self=node(AGENT, 2)))
        await quiet(client)


async def test_tunnel_added_before_the_agent_connects(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
        await trio.sleep(1)
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
            # The new connection is sent its tunnel peers' nodes at once.
            [init] = await updates(agent, 1)
            assert (init.id, init.kind, init.node) == (CLIENT, Kind.NODE, node(CLIENT))
            await agent.send(Request(update_self=node(AGENT)))
            [got] = await updates(client, 1)
            assert (got.id, got.kind, got.node) == (AGENT, Kind.NODE, node(AGENT))


async def test_leaving_without_disconnect_is_lost(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
            await agent.send(Request(update_self=node(AGENT)))
            await trio.sleep(1)
            await client.send(Request(add_tunnel=AGENT))
            await updates(client, 1)
        assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.LOST, None, "lost")]
        assert coordinator.node(AGENT) is None
        # The agent comes back: its new node reaches the client again.
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
            await agent.send(Request(update_self=node(AGENT, 3)))
            [got] = await updates(client, 1)
            assert (got.id, got.kind, got.node) == (AGENT, Kind.NODE, node(AGENT, 3))


async def test_disconnect_is_disconnected_once(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
            await agent.send(Request(update_self=node(AGENT)))
            await trio.sleep(1)
            await client.send(Request(add_tunnel=AGENT))
            await updates(client, 1)
            agent.disconnect()
            assert not agent.active
            assert await rest(agent) == []
            assert not await agent.send(Request(update_self=node(AGENT, 2)))
        assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.DISCONNECTED, None, "graceful disconnect")]
        await quiet(client)


async def test_remove_tunnel_tells_both_ends(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent,
        coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client,
    ):
        await agent.send(Request(update_self=node(AGENT)))
        await trio.sleep(1)
        await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
        await updates(client, 1)
        await updates(agent, 1)
        await client.send(Request(remove_tunnel=AGENT))
        assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.DISCONNECTED, None, "remove tunnel")]
        assert await updates(agent, 1) == [PeerUpdate(CLIENT, Kind.DISCONNECTED, None, "remove tunnel")]


async def test_ready_for_handshake(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent,
        coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client,
    ):
        await agent.send(Request(update_self=node(AGENT)))
        await trio.sleep(1)
        await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
        await updates(agent, 1)
        await updates(client, 1)
        await agent.send(Request(ready_for_handshake=[CLIENT]))
        assert await updates(client, 1) == [PeerUpdate(AGENT, Kind.READY_FOR_HANDSHAKE)]
        # Not a tunnel peer: only an error message, the connection stays.
        await agent.send(Request(ready_for_handshake=[AGENT2]))
        with trio.fail_after(WAIT):
            response = await agent.receive()
        assert response.error == f'ready for handshake error: you do not share a tunnel with "{AGENT2}"'
        assert agent.active


async def test_unauthorised_requests_end_the_connection(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
        await agent.send(Request(update_self=node(CLIENT)))
        responses = await rest(agent)
        assert len(responses) == 1
        assert responses[0].error.startswith("authorize request: invalid node address")
    async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
        await agent.send(Request(add_tunnel=CLIENT))
        assert await rest(agent) == [Response(error="authorize request: agents cannot open tunnels")]
    async with coordinator.connect(CLIENT, "c", ClientAuth({AGENT})) as client:
        await client.send(Request(ready_for_handshake=[AGENT]))
        assert await rest(client) == [
            Response(error="authorize request: clients may not send ready_for_handshake")
        ]


async def test_overwrite_ends_the_old_connection(
    coordinator: TailnetCoordinator, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client,
        coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as old,
    ):
        await old.send(Request(update_self=node(AGENT)))
        await trio.sleep(1)
        await client.send(Request(add_tunnel=AGENT))
        await updates(client, 1)
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as new:
            assert await rest(old) == [Response(error=ERROR_OVERWRITTEN)]
            assert new.active and not old.active
            await new.send(Request(update_self=node(AGENT, 4)))
            [got] = await updates(client, 1)
            assert (got.kind, got.node) == (Kind.NODE, node(AGENT, 4))


async def test_full_queue_drops_the_slow_receiver(
    kind: str, db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    coordinator = make(kind, db, response_buffer=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        async with (
            coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent,
            coordinator.connect(CLIENT, "c", ClientAuth({AGENT})) as client,
        ):
            await agent.send(Request(update_self=node(AGENT)))
            await trio.sleep(1)
            await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
            await updates(agent, 1)
            for derp in (2, 3, 4):  # the client never reads: more than 2 queued
                await agent.send(Request(update_self=node(AGENT, derp)))
                await trio.sleep(1)
            assert not client.active
            # What was queued is still delivered, then the queue ends.
            assert len(await rest(client)) == 2
            assert await updates(agent, 1) == [PeerUpdate(CLIENT, Kind.DISCONNECTED, None, "failed update")]
        nursery.cancel_scope.cancel()


async def test_shutdown_tells_every_peer(
    kind: str, db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    coordinator = make(kind, db)
    got: list[list[Response]] = []

    async def peer(peer_id: uuid.UUID, task_status: trio.TaskStatus[None]) -> None:
        async with coordinator.connect(peer_id, str(peer_id), AgentAuth(peer_id)) as handle:
            task_status.started()
            got.append([r async for r in handle])

    async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        await outer.start(peer, AGENT)
        await outer.start(peer, AGENT2)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert got == [[Response(error=ERROR_COORDINATOR_CLOSED)]] * 2
    assert not coordinator.running
    with pytest.raises(trio.ClosedResourceError):
        await coordinator.run()
