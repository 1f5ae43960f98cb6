"""An agent acts only as itself: the identity bound to the connection (from its token) is what the
services authorise against, so another agent's ids are refused, never served."""

from __future__ import annotations

import functools
import uuid

import trio

from agentd.components import Components
from agentd.connection import ServiceBuilder
from agentd.proto import tailnet_pb2
from agentd.services import banners
from agentd.services.base import ConnectionScope
from agentd.services.tailnet import TailnetService
from agentd.store import Database
from agentd.tailnet import Coordinator, DERPMapSource
from agentd.tailnet.coordinator import CODER_SERVICE_PREFIX, TAILSCALE_SERVICE_PREFIX, service_address
from agentd.testing import TestAgent, serve_agent
from tests.test_connection import seed


def tailnet_from_scope(scope: ConnectionScope) -> TailnetService:
    """The ``build(scope)`` agentd.services.tailnet still lacks: the agent coordinates as itself."""
    return TailnetService(
        scope.components.coordinator, scope.components.derp_map, scope.ident.agent_id, scope.ident.peer_name
    )


def node_update(agent_id: uuid.UUID) -> tailnet_pb2.CoordinateRequest:
    addresses = [
        f"{service_address(p, agent_id)}/128" for p in (TAILSCALE_SERVICE_PREFIX, CODER_SERVICE_PREFIX)
    ]
    request = tailnet_pb2.CoordinateRequest()
    node = request.update_self.node
    node.id, node.key, node.disco, node.preferred_derp = 7, b"\x01" * 32, "discokey:01", 999
    node.addresses.extend(addresses)
    node.allowed_ips.extend(addresses)
    return request


async def test_an_agent_cannot_claim_another_agents_addresses(db: Database, nursery: trio.Nursery) -> None:
    first = await seed(db, "one", username="alice")
    second = await seed(db, "two", username="bob")
    a_id, b_id = first.agents[0].id, second.agents[0].id
    coordinator = Coordinator()
    await nursery.start(coordinator.run)
    components = Components(coordinator=coordinator, derp_map=DERPMapSource.from_config())
    builders: dict[str, ServiceBuilder] = {"tailnet": tailnet_from_scope, "banners": banners.build}
    start = functools.partial(serve_agent, components=components, builders=builders)
    a: TestAgent = await nursery.start(functools.partial(start, db, first.agents[0].token))
    b: TestAgent = await nursery.start(functools.partial(start, db, second.agents[0].token))

    # Agent A sends B's node: refused with the coordinator's reason, nothing stored for B.
    async with a.client.tailnet.Coordinate() as coordinate:
        await coordinate.send(node_update(b_id))
        response = await coordinate.receive()
    assert response.error.startswith("authorize request: invalid node address")
    assert coordinator.node(b_id) is None and coordinator.node(a_id) is None

    # Each agent may publish its own node, which lands under its own id only (while coordinating).
    async with a.client.tailnet.Coordinate() as ca, b.client.tailnet.Coordinate() as cb:
        await ca.send(node_update(a_id))
        await cb.send(node_update(b_id))
        with trio.fail_after(10):
            while coordinator.node(a_id) is None or coordinator.node(b_id) is None:  # noqa: ASYNC110
                await trio.sleep(0.01)  # the coordinator offers no event to wait on
        node_a, node_b = coordinator.node(a_id), coordinator.node(b_id)
        assert node_a is not None and node_b is not None and node_a != node_b

    # The DERP map stream works through the per-API task too (and stays open).
    async with a.client.tailnet.StreamDERPMaps(tailnet_pb2.StreamDERPMapsRequest()) as maps:
        assert (await maps.receive()).HasField("home_params")
