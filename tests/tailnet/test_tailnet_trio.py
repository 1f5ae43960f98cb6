"""The trio Coordinator: peers over bounded memory channels, lost vs disconnected, shutdown."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

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
from agentd.tailnet.trio_coordinator import Coordinator, PeerHandle

AGENT = uuid.UUID("0b7e4d7c-2f19-4c55-9a7b-1d1d1d1d0001")
CLIENT = uuid.UUID("0c0c0c0c-2f19-4c55-9a7b-1d1d1d1d0002")


def node(peer_id: uuid.UUID, derp: int = 1) -> Node:
    addr = service_address(TAILSCALE_SERVICE_PREFIX, peer_id)
    return Node(preferred_derp=derp, addresses=(f"{addr}/128",))


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    coord = Coordinator()
    async with trio.open_nursery() as nursery:
        await nursery.start(coord.run)
        yield coord
        nursery.cancel_scope.cancel()


async def drain(peer: PeerHandle) -> list[Response]:
    out: list[Response] = []
    while True:
        try:
            out.append(peer.receive_channel.receive_nowait())
        except trio.WouldBlock:
            return out
        peer.coordinator.core.delivered(peer.ref)


async def test_connect_requires_run() -> None:
    with pytest.raises(trio.ClosedResourceError):
        async with Coordinator().connect(AGENT, "a", AgentAuth(AGENT)):
            pass  # pragma: no cover


async def test_nodes_flow_between_tunnel_peers(coordinator: Coordinator) -> None:
    async with (
        coordinator.connect(AGENT, "alice-ws-main", AgentAuth(AGENT)) as agent,
        coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client,
    ):
        assert await agent.send(Request(update_self=node(AGENT)))
        await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
        assert await client.receive() == Response(
            peer_updates=(PeerUpdate(AGENT, Kind.NODE, node(AGENT), "add tunnel"),)
        )
        assert await agent.receive() == Response(
            peer_updates=(PeerUpdate(CLIENT, Kind.NODE, node(CLIENT), "add tunnel"),)
        )
        assert coordinator.node(AGENT) == node(AGENT)
        assert coordinator.core.queued(client.ref) == 0  # receive acknowledged


async def test_leaving_without_disconnect_is_lost(coordinator: Coordinator) -> None:
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
            await agent.send(Request(update_self=node(AGENT)))
            await client.send(Request(add_tunnel=AGENT))
            await drain(client)
        assert await client.receive() == Response(peer_updates=(PeerUpdate(AGENT, Kind.LOST, None, "lost"),))
        assert coordinator.node(AGENT) is None


async def test_disconnect_then_leave_is_disconnected_once(coordinator: Coordinator) -> None:
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
            await agent.send(Request(update_self=node(AGENT)))
            await client.send(Request(add_tunnel=AGENT))
            await drain(client)
            agent.disconnect()
            assert not agent.active
            # The agent's own queue ends.
            assert [r async for r in agent] == []
            assert not await agent.send(Request(update_self=node(AGENT, 2)))
        assert await drain(client) == [
            Response(peer_updates=(PeerUpdate(AGENT, Kind.DISCONNECTED, None, "graceful disconnect"),))
        ]


async def test_unauthorised_request_ends_the_queue_with_an_error(coordinator: Coordinator) -> None:
    async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent:
        await agent.send(Request(update_self=node(CLIENT)))
        responses = [r async for r in agent]
        assert len(responses) == 1 and responses[0].error.startswith(
            "authorize request: invalid node address"
        )


async def test_overwrite_ends_the_old_handle(coordinator: Coordinator) -> None:
    async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as old:
        async with coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as new:
            assert [r async for r in old] == [Response(error=ERROR_OVERWRITTEN)]
            assert new.active and not old.active
        assert coordinator.core.peer_ids() == []


async def test_full_channel_drops_the_slow_receiver() -> None:
    coordinator = Coordinator(core=CoordinatorCore(response_buffer=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        async with (
            coordinator.connect(AGENT, "a", AgentAuth(AGENT)) as agent,
            coordinator.connect(CLIENT, "c", ClientAuth({AGENT})) as client,
        ):
            await agent.send(Request(update_self=node(AGENT)))
            await client.send(Request(update_self=node(CLIENT), add_tunnel=AGENT))
            await drain(agent)
            for derp in (2, 3):  # the client never reads: 1 + 2 > 2
                await agent.send(Request(update_self=node(AGENT, derp)))
            assert not client.active
            # What was queued is still delivered, then the queue ends.
            assert len([r async for r in client]) == 2
            assert await drain(agent) == [
                Response(peer_updates=(PeerUpdate(CLIENT, Kind.DISCONNECTED, None, "failed update"),))
            ]
        nursery.cancel_scope.cancel()


async def test_shutdown_tells_every_peer(autojump_clock: trio.testing.MockClock) -> None:
    coordinator = Coordinator()
    got: list[list[Response]] = []

    async def peer(peer_id: uuid.UUID) -> None:
        async with coordinator.connect(peer_id, str(peer_id), AgentAuth(peer_id)) as handle:
            got.append([r async for r in handle])

    async with trio.open_nursery() as outer, trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        outer.start_soon(peer, AGENT)
        outer.start_soon(peer, CLIENT)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert got == [[Response(error=ERROR_COORDINATOR_CLOSED)]] * 2
    assert not coordinator.running
    with pytest.raises(trio.ClosedResourceError):
        await coordinator.run()
