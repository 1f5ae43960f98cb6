"""TailnetService: handlers called directly with a memory-channel ServerStream, and end to end through
the real DRPC server over a yamux session on a memory stream pair (the agent's view)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from google.protobuf.message import Message

from agentd.client.rpc import RpcClient
from agentd.drpc.errors import UNIMPLEMENTED, RpcError
from agentd.drpc.registry import Registry, method_table
from agentd.drpc.server import serve_session
from agentd.mux import MuxSession
from agentd.proto import tailnet_pb2
from agentd.services.tailnet import TailnetService, stream_name
from agentd.tailnet.convert import (
    node_from_proto,
    node_to_proto,
    request_from_proto,
    request_to_proto,
    response_from_proto,
)
from agentd.tailnet.coordinator import (
    CODER_SERVICE_PREFIX,
    TAILSCALE_SERVICE_PREFIX,
    ClientAuth,
    Kind,
    Node,
    PeerUpdate,
    Request,
    Response,
    service_address,
)
from agentd.tailnet.derpmap import DERPMapSource
from agentd.tailnet.trio_coordinator import Coordinator

AGENT = uuid.UUID("5f0e7c55-8a61-4f0f-9a43-2a3b4c5d6e7f")
CLIENT = uuid.UUID("c0ffee00-1111-4222-8333-444455556666")


def agent_node_pb(agent_id: uuid.UUID = AGENT, derp: int = 1) -> tailnet_pb2.Node:
    tailscale = service_address(TAILSCALE_SERVICE_PREFIX, agent_id)
    coder = service_address(CODER_SERVICE_PREFIX, agent_id)
    node = tailnet_pb2.Node(
        id=42,
        key=b"\x01" * 32,
        disco="discokey:0123",
        preferred_derp=derp,
        derp_latency={"999-v4": 0.002},
        addresses=[f"{tailscale}/128", f"{coder}/128"],
        allowed_ips=[f"{tailscale}/128", f"{coder}/128"],
        endpoints=["198.51.100.7:41641"],
    )
    node.as_of.seconds = 1_764_000_000
    return node


def update_self(node: tailnet_pb2.Node) -> tailnet_pb2.CoordinateRequest:
    request = tailnet_pb2.CoordinateRequest()
    request.update_self.node.CopyFrom(node)
    return request


@attrs.define
class FakeStream:
    """A ServerStream over trio memory channels: the test plays the agent on the other ends."""

    requests: trio.MemoryReceiveChannel[Message]
    responses: trio.MemorySendChannel[Message]

    async def send(self, message: Message) -> None:
        await self.responses.send(message)

    async def receive(self) -> Any:
        return await self.requests.receive()

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.requests.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


@attrs.define
class Agent:
    """The test's side of a FakeStream."""

    requests: trio.MemorySendChannel[Message]
    responses: trio.MemoryReceiveChannel[Message]

    async def receive(self) -> Message:
        """The next message the handler sent; a deadlock fails the test instead of hanging it."""
        with trio.fail_after(60):
            return await self.responses.receive()


def fake_stream() -> tuple[FakeStream, Agent]:
    req_send, req_recv = trio.open_memory_channel[Message](0)
    resp_send, resp_recv = trio.open_memory_channel[Message](0)
    return FakeStream(req_recv, resp_send), Agent(req_send, resp_recv)


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    coord = Coordinator()
    async with trio.open_nursery() as nursery:
        await nursery.start(coord.run)
        yield coord
        nursery.cancel_scope.cancel()


@pytest.fixture
def derp_maps() -> DERPMapSource:
    return DERPMapSource.from_config(access_url="https://coder.example.com")


@pytest.fixture
def service(coordinator: Coordinator, derp_maps: DERPMapSource) -> TailnetService:
    return TailnetService(
        coordinator=coordinator,
        derp_maps=derp_maps,
        agent_id=AGENT,
        peer_name=stream_name("alice", "ws", "main"),
    )


def test_stream_name() -> None:
    assert stream_name("alice", "dev-box", "main") == "alice-dev-box-main"


async def test_handlers_cover_the_tailnet_service(service: TailnetService) -> None:
    tailnet_paths = {p for p in method_table() if p.startswith("/coder.tailnet.v2.Tailnet/")}
    assert set(service.handlers()) == tailnet_paths
    agent_paths = set(method_table()) - tailnet_paths
    Registry.build(handlers=service.handlers(), unimplemented=agent_paths)


# ---- direct handler calls ----------------------------------------------------------------------------


async def test_post_telemetry_is_accepted(coordinator: Coordinator, derp_maps: DERPMapSource) -> None:
    seen: list[list[tailnet_pb2.TelemetryEvent]] = []
    service = TailnetService(
        coordinator, derp_maps, AGENT, "a-b-c", telemetry=lambda ev: seen.append(list(ev))
    )
    request = tailnet_pb2.TelemetryRequest(events=[tailnet_pb2.TelemetryEvent(application="ssh")])
    assert await service.post_telemetry(request) == tailnet_pb2.TelemetryResponse()
    assert [e.application for e in seen[0]] == ["ssh"]


async def test_resume_token_and_workspace_updates_are_unimplemented(service: TailnetService) -> None:
    with pytest.raises(RpcError) as info:
        await service.refresh_resume_token(tailnet_pb2.RefreshResumeTokenRequest())
    assert (info.value.code, info.value.message) == (UNIMPLEMENTED, "Unimplemented")
    with pytest.raises(RpcError) as info:
        await service.workspace_updates(tailnet_pb2.WorkspaceUpdatesRequest(), None)
    assert info.value.code == UNIMPLEMENTED


async def test_stream_derp_maps_sends_current_then_changes(
    service: TailnetService, derp_maps: DERPMapSource, autojump_clock: trio.testing.MockClock
) -> None:
    stream, agent = fake_stream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.stream_derp_maps, tailnet_pb2.StreamDERPMapsRequest(), stream)
        first = await agent.receive()
        assert isinstance(first, tailnet_pb2.DERPMap)
        assert first == derp_maps.current() and first.HasField("home_params")
        # Nothing more while the map does not change, however long we wait: the stream stays open.
        await trio.sleep(3600)
        with pytest.raises(trio.WouldBlock):
            agent.responses.receive_nowait()
        assert derp_maps.set(derp_maps.current()) is False
        changed = tailnet_pb2.DERPMap(regions={1: tailnet_pb2.DERPMap.Region(region_id=1, region_code="x")})
        assert derp_maps.set(changed)
        second = await agent.receive()
        assert isinstance(second, tailnet_pb2.DERPMap)
        assert list(second.regions) == [1] and second.HasField("home_params")
        nursery.cancel_scope.cancel()


async def _coordinate(service: TailnetService, stream: FakeStream, done: trio.Event) -> None:
    try:
        await service.coordinate(stream)
    finally:
        done.set()


async def test_coordinate_stores_node_and_stays_open(
    service: TailnetService, coordinator: Coordinator, autojump_clock: trio.testing.MockClock
) -> None:
    stream, agent = fake_stream()
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_coordinate, service, stream, done)
        await agent.requests.send(update_self(agent_node_pb()))
        await trio.testing.wait_all_tasks_blocked()
        node = coordinator.node(AGENT)
        assert node is not None and node.preferred_derp == 1
        assert coordinator.core.name(AGENT) == "alice-ws-main"
        await trio.sleep(3600)
        assert not done.is_set()
        nursery.cancel_scope.cancel()
    # Cancelled (the agent's connection went away): the peer is gone, marked lost.
    assert coordinator.node(AGENT) is None


async def test_coordinate_with_a_client_peer(service: TailnetService, coordinator: Coordinator) -> None:
    stream, agent = fake_stream()
    done = trio.Event()
    client_node = Node(addresses=(f"{service_address(TAILSCALE_SERVICE_PREFIX, CLIENT)}/128",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_coordinate, service, stream, done)
        await agent.requests.send(update_self(agent_node_pb()))
        await trio.testing.wait_all_tasks_blocked()
        async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
            await client.send(Request(update_self=client_node, add_tunnel=AGENT))
            [update] = (await client.receive()).peer_updates
            assert (update.id, update.kind, update.reason) == (AGENT, Kind.NODE, "add tunnel")
            # The agent learns the client's node, then answers ready-for-handshake.
            response = response_from_proto(await agent.receive())  # type: ignore[arg-type]
            assert response == Response(
                peer_updates=(PeerUpdate(CLIENT, Kind.NODE, client_node, "add tunnel"),)
            )
            rfh = tailnet_pb2.CoordinateRequest()
            rfh.ready_for_handshake.add(id=CLIENT.bytes)
            await agent.requests.send(rfh)
            assert await client.receive() == Response(
                peer_updates=(PeerUpdate(AGENT, Kind.READY_FOR_HANDSHAKE),)
            )
            # A node update reaches the client.
            await agent.requests.send(update_self(agent_node_pb(derp=2)))
            [update] = (await client.receive()).peer_updates
            assert update.node is not None and update.node.preferred_derp == 2
            # The agent's CloseSend without disconnect: LOST for the client, the RPC ends cleanly.
            await agent.requests.aclose()
            assert await client.receive() == Response(
                peer_updates=(PeerUpdate(AGENT, Kind.LOST, None, "lost"),)
            )
            with trio.fail_after(60):
                await done.wait()


async def test_ready_for_handshake_unknown_peer_keeps_stream_open(
    service: TailnetService, coordinator: Coordinator
) -> None:
    stream, agent = fake_stream()
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_coordinate, service, stream, done)
        rfh = tailnet_pb2.CoordinateRequest()
        rfh.ready_for_handshake.add(id=CLIENT.bytes)
        await agent.requests.send(rfh)
        response = await agent.receive()
        assert isinstance(response, tailnet_pb2.CoordinateResponse)
        assert response.error == f'ready for handshake error: you do not share a tunnel with "{CLIENT}"'
        await agent.requests.send(update_self(agent_node_pb()))
        await trio.testing.wait_all_tasks_blocked()
        assert coordinator.node(AGENT) is not None and not done.is_set()
        nursery.cancel_scope.cancel()


async def test_disconnect_ends_the_rpc(service: TailnetService, coordinator: Coordinator) -> None:
    stream, agent = fake_stream()
    done = trio.Event()
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        await client.send(Request(add_tunnel=AGENT))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_coordinate, service, stream, done)
            await agent.requests.send(update_self(agent_node_pb()))
            await client.receive()
            disconnect = tailnet_pb2.CoordinateRequest()
            disconnect.disconnect.SetInParent()
            await agent.requests.send(disconnect)
            with trio.fail_after(60):
                await done.wait()
        reason = (await client.receive()).peer_updates[0]
        assert (reason.kind, reason.reason) == (Kind.DISCONNECTED, "graceful disconnect")


@pytest.mark.parametrize(
    "request_",
    [
        # another agent's address
        update_self(agent_node_pb(agent_id=CLIENT)),
        # agents may not open tunnels
        tailnet_pb2.CoordinateRequest(add_tunnel=tailnet_pb2.CoordinateRequest.Tunnel(id=CLIENT.bytes)),
    ],
)
async def test_unauthorised_requests_end_with_an_error_message(
    service: TailnetService, coordinator: Coordinator, request_: tailnet_pb2.CoordinateRequest
) -> None:
    stream, agent = fake_stream()
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_coordinate, service, stream, done)
        await agent.requests.send(request_)
        response = await agent.receive()
        assert isinstance(response, tailnet_pb2.CoordinateResponse)
        assert response.error.startswith("authorize request: ")
        with trio.fail_after(60):
            await done.wait()  # the RPC returned normally (CloseSend), as Go's does
    assert coordinator.core.peer_ids() == []


async def test_coordinate_refused_when_coordinator_is_not_running(derp_maps: DERPMapSource) -> None:
    service = TailnetService(Coordinator(), derp_maps, AGENT, "a-b-c")
    stream, _agent = fake_stream()
    with pytest.raises(RpcError, match="coordinator is closed"):
        await service.coordinate(stream)


# ---- end to end: drpc server over yamux over a memory stream pair --------------------------------------


@pytest.fixture
async def client(service: TailnetService) -> AsyncIterator[RpcClient]:
    agent_paths = {p for p in method_table() if not p.startswith("/coder.tailnet.v2.Tailnet/")}
    registry = Registry.build(handlers=service.handlers(), unimplemented=agent_paths)
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = MuxSession(server_transport, is_client=False)
    agent_session = MuxSession(client_transport, is_client=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await nursery.start(agent_session.run)
        await nursery.start(serve_session, server, registry)
        yield RpcClient(agent_session)
        nursery.cancel_scope.cancel()


async def test_e2e_derp_maps_and_coordinate(
    client: RpcClient, coordinator: Coordinator, derp_maps: DERPMapSource
) -> None:
    async with client.tailnet.StreamDERPMaps(tailnet_pb2.StreamDERPMapsRequest()) as derp_stream:
        first = await derp_stream.receive()
        assert first.HasField("home_params") and list(first.regions) == [999]
        async with client.tailnet.Coordinate() as coordinate:
            await coordinate.send(update_self(agent_node_pb()))
            await trio.testing.wait_all_tasks_blocked()
            assert coordinator.node(AGENT) is not None
            async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as peer:
                await peer.send(Request(add_tunnel=AGENT))
                assert (await peer.receive()).peer_updates[0].kind == Kind.NODE
                # The unknown-peer error arrives as a message and the stream carries on.
                rfh = tailnet_pb2.CoordinateRequest()
                rfh.ready_for_handshake.add(id=uuid.UUID(int=1).bytes)
                await coordinate.send(rfh)
                assert "you do not share a tunnel" in (await coordinate.receive()).error
                rfh = tailnet_pb2.CoordinateRequest()
                rfh.ready_for_handshake.add(id=CLIENT.bytes)
                await coordinate.send(rfh)
                assert await peer.receive() == Response(
                    peer_updates=(PeerUpdate(AGENT, Kind.READY_FOR_HANDSHAKE),)
                )
                # A DERP map change reaches the agent while Coordinate runs.
                derp_maps.set(tailnet_pb2.DERPMap(regions={2: tailnet_pb2.DERPMap.Region(region_id=2)}))
                assert list((await derp_stream.receive()).regions) == [2]
                # Graceful disconnect (`12 00`, then CloseSend): DISCONNECTED, and the server ends the RPC.
                disconnect = tailnet_pb2.CoordinateRequest()
                disconnect.disconnect.SetInParent()
                await coordinate.send(disconnect)
                await coordinate.close_send()
                with pytest.raises(trio.EndOfChannel):
                    await coordinate.receive()
                update = (await peer.receive()).peer_updates[0]
                assert (update.kind, update.reason) == (Kind.DISCONNECTED, "graceful disconnect")


async def test_e2e_cancelled_coordinate_is_lost(client: RpcClient, coordinator: Coordinator) -> None:
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as peer:
        await peer.send(Request(add_tunnel=AGENT))
        with trio.CancelScope() as scope:
            async with client.tailnet.Coordinate() as coordinate:
                await coordinate.send(update_self(agent_node_pb()))
                assert (await peer.receive()).peer_updates[0].kind == Kind.NODE
                scope.cancel()  # the agent drops the call: FIN, no packet
                await trio.sleep_forever()
        with trio.fail_after(5):
            update = (await peer.receive()).peer_updates[0]
        assert (update.id, update.kind, update.reason) == (AGENT, Kind.LOST, "lost")


async def test_e2e_unimplemented_and_telemetry(client: RpcClient) -> None:
    assert (
        await client.tailnet.PostTelemetry(tailnet_pb2.TelemetryRequest()) == tailnet_pb2.TelemetryResponse()
    )
    with pytest.raises(RpcError) as info:
        await client.tailnet.RefreshResumeToken(tailnet_pb2.RefreshResumeTokenRequest())
    assert info.value.code == UNIMPLEMENTED
    async with client.tailnet.WorkspaceUpdates(tailnet_pb2.WorkspaceUpdatesRequest()) as updates:
        with pytest.raises(RpcError) as info:
            await updates.receive()
    assert info.value.code == UNIMPLEMENTED


def test_node_wire_round_trip() -> None:
    node = agent_node_pb()
    assert node_to_proto(node_from_proto(node)) == node
    request = update_self(node)
    request.ready_for_handshake.add(id=CLIENT.bytes)
    request.disconnect.SetInParent()
    assert request_to_proto(request_from_proto(request)) == request
    # Go's address text (zero groups dropped) survives untouched: it is compared parsed, never rewritten.
    assert request_from_proto(request).update_self.addresses == tuple(node.addresses)  # type: ignore[union-attr]


async def test_broken_response_stream_ends_quietly_as_lost(
    service: TailnetService, coordinator: Coordinator
) -> None:
    stream, agent = fake_stream()
    await agent.responses.aclose()  # the agent is gone: every send fails
    async with coordinator.connect(CLIENT, "client", ClientAuth({AGENT})) as client:
        await client.send(Request(add_tunnel=AGENT))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.coordinate, stream)
            await agent.requests.send(update_self(agent_node_pb()))
            await client.receive()  # the agent's node
            # The client's node goes to the agent, whose stream is broken: the RPC ends without error.
            await client.send(Request(update_self=Node()))
        with trio.fail_after(60):
            lost = (await client.receive()).peer_updates[0]
        assert (lost.kind, lost.reason) == (Kind.LOST, "lost")


async def test_e2e_streams_stay_open_for_hours(
    client: RpcClient,
    coordinator: Coordinator,
    derp_maps: DERPMapSource,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        client.tailnet.StreamDERPMaps(tailnet_pb2.StreamDERPMapsRequest()) as derp_stream,
        client.tailnet.Coordinate() as coordinate,
    ):
        assert (await derp_stream.receive()).HasField("home_params")
        await coordinate.send(update_self(agent_node_pb()))
        await trio.sleep(2 * 3600)  # yamux keepalives run meanwhile
        assert coordinator.node(AGENT) is not None
        # Both calls are still live: a new node still arrives, a map change still streams.
        await coordinate.send(update_self(agent_node_pb(derp=9)))
        await trio.testing.wait_all_tasks_blocked()
        node = coordinator.node(AGENT)
        assert node is not None and node.preferred_derp == 9
        derp_maps.set(tailnet_pb2.DERPMap(regions={4: tailnet_pb2.DERPMap.Region(region_id=4)}))
        assert list((await derp_stream.receive()).regions) == [4]
