"""CoordinatorCore: every rule of spec/agent-api.md §8.4, driven through its sans-I/O inputs."""

from __future__ import annotations

import uuid

import pytest

from agentd.tailnet.coordinator import (
    CODER_SERVICE_PREFIX,
    ERROR_COORDINATOR_CLOSED,
    ERROR_OVERWRITTEN,
    LEGACY_AGENT_ADDRESS,
    TAILSCALE_SERVICE_PREFIX,
    AgentAuth,
    ClientAuth,
    Close,
    CoordinatorClosedError,
    CoordinatorCore,
    Effect,
    Kind,
    Node,
    PeerRef,
    PeerUpdate,
    Request,
    Response,
    Send,
    Timestamp,
    TrustedAuth,
    authorize,
    parse_prefix,
    service_address,
)

AGENT = uuid.UUID("b3a1c7a2-0d4e-4f00-8a00-00000000a001")
AGENT2 = uuid.UUID("b3a1c7a2-0d4e-4f00-8a00-00000000a002")
CLIENT = uuid.UUID("c1c1c1c1-0000-4000-8000-00000000c001")
CLIENT2 = uuid.UUID("c1c1c1c1-0000-4000-8000-00000000c002")


def agent_node(agent_id: uuid.UUID = AGENT, derp: int = 1) -> Node:
    """A node the way Go prints it: /128 prefixes, zero groups compressed."""
    addr = service_address(TAILSCALE_SERVICE_PREFIX, agent_id)
    return Node(
        id=7,
        as_of=Timestamp(1_700_000_000, 5),
        key=b"k" * 32,
        disco="discokey:abc",
        preferred_derp=derp,
        derp_latency={"1-v4": 0.01},
        derp_forced_websocket={1: "blocked"},
        addresses=(f"{addr}/128",),
        allowed_ips=(f"{addr}/128",),
        endpoints=("192.0.2.1:41641",),
    )


def client_node(client_id: uuid.UUID = CLIENT, derp: int = 1) -> Node:
    addr = service_address(TAILSCALE_SERVICE_PREFIX, client_id)
    return Node(id=9, preferred_derp=derp, addresses=(f"{addr}/128",), allowed_ips=(f"{addr}/128",))


def sends(effects: list[Effect], ref: PeerRef) -> list[Response]:
    return [e.response for e in effects if isinstance(e, Send) and e.peer == ref]


def updates(effects: list[Effect], ref: PeerRef) -> list[PeerUpdate]:
    return [u for r in sends(effects, ref) for u in r.peer_updates]


def closed(effects: list[Effect]) -> list[PeerRef]:
    return [e.peer for e in effects if isinstance(e, Close)]


def deliver_all(core: CoordinatorCore, effects: list[Effect]) -> None:
    for e in effects:
        if isinstance(e, Send):
            core.delivered(e.peer)


@pytest.fixture
def core() -> CoordinatorCore:
    return CoordinatorCore()


def connect_pair(core: CoordinatorCore) -> tuple[PeerRef, PeerRef]:
    """An agent with a node and a client with a node and a tunnel to it."""
    agent, _ = core.register(AGENT, "alice-ws-main", AgentAuth(AGENT))
    client, _ = core.register(CLIENT, "client", ClientAuth({AGENT}))
    core.handle_request(agent, Request(update_self=agent_node()))
    core.handle_request(client, Request(update_self=client_node()))
    core.handle_request(client, Request(add_tunnel=AGENT))
    return agent, client


# ---- addresses -------------------------------------------------------------------------------------


def test_parse_prefix_compares_values_not_text() -> None:
    addr = service_address(TAILSCALE_SERVICE_PREFIX, AGENT)
    expanded = addr.exploded  # every zero group written out
    assert parse_prefix(f"{expanded}/128") == (addr, 128)
    assert parse_prefix(f"{str(addr).upper()}/128") == (addr, 128)


@pytest.mark.parametrize(
    "text",
    ["fd7a::1", "fd7a::1/", "fd7a::1/x", "fd7a::1/129", "zz::1/128", "fe80::1%eth0/128", "fd7a::1/0128"],
)
def test_parse_prefix_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_prefix(text)


def test_agent_addresses_go_text_forms_accepted() -> None:
    # Go drops leading zeros in each group; the agent id below has zero groups after the prefix.
    agent_id = uuid.UUID("00000000-0000-0000-0000-000000000001")
    for prefix in (TAILSCALE_SERVICE_PREFIX, CODER_SERVICE_PREFIX):
        addr = service_address(prefix, agent_id)
        assert str(addr).endswith("::1")
        node = Node(addresses=(f"{addr}/128",), allowed_ips=(f"{addr.exploded}/128",))
        assert authorize(AgentAuth(agent_id), Request(update_self=node)) is None
    legacy = Node(addresses=(f"{LEGACY_AGENT_ADDRESS}/128",))
    assert authorize(AgentAuth(agent_id), Request(update_self=legacy)) is None


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            Node(addresses=(f"{service_address(TAILSCALE_SERVICE_PREFIX, AGENT2)}/128",)),
            "invalid node address, got",
        ),
        (Node(addresses=(f"{service_address(TAILSCALE_SERVICE_PREFIX, AGENT)}/64",)), "expected 128, got 64"),
        (Node(addresses=("10.0.0.1/32",)), "expected 128, got 32"),
        (Node(addresses=("not-an-ip/128",)), "parse node address"),
        (Node(allowed_ips=(f"{service_address(CODER_SERVICE_PREFIX, AGENT2)}/128",)), "invalid node address"),
    ],
)
def test_agent_may_only_advertise_its_own_addresses(core: CoordinatorCore, node: Node, message: str) -> None:
    agent, _ = core.register(AGENT, "a", AgentAuth(AGENT))
    effects = core.handle_request(agent, Request(update_self=node))
    [response] = sends(effects, agent)
    assert response.error.startswith("authorize request: ")
    assert message in response.error
    assert closed(effects) == [agent]
    assert not core.is_current(agent)


def test_agent_cannot_open_tunnels_and_is_lost(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(agent, Request(add_tunnel=CLIENT))
    assert sends(effects, agent)[0].error == "authorize request: agents cannot open tunnels"
    assert closed(effects) == [agent]
    # The client, which knew the agent's node, is told LOST (not DISCONNECTED).
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.LOST, None, "lost")]


def test_client_tunnel_authorisation(core: CoordinatorCore) -> None:
    client, _ = core.register(CLIENT, "c", ClientAuth({AGENT}))
    effects = core.handle_request(client, Request(add_tunnel=AGENT2))
    assert (
        sends(effects, client)[0].error
        == f"authorize request: invalid agent id, expected {AGENT}, got {AGENT2}"
    )
    assert closed(effects) == [client]

    multi, _ = core.register(CLIENT2, "c2", ClientAuth({AGENT, AGENT2}))
    assert core.handle_request(multi, Request(add_tunnel=AGENT2)) == []
    effects = core.handle_request(multi, Request(add_tunnel=uuid.uuid4()))
    assert "do not have permission" in sends(effects, multi)[0].error


def test_client_addresses_must_be_128_but_any_address(core: CoordinatorCore) -> None:
    client, _ = core.register(CLIENT, "c", ClientAuth({AGENT}))
    assert core.handle_request(client, Request(update_self=Node(addresses=("fd7a:115c:a1e0::99/128",)))) == []
    effects = core.handle_request(client, Request(update_self=Node(addresses=("fd7a:115c:a1e0::/48",))))
    assert sends(effects, client)[0].error == "authorize request: invalid address bits, expected 128, got 48"


def test_client_may_not_send_ready_for_handshake(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(client, Request(ready_for_handshake=(AGENT,)))
    assert sends(effects, client)[0].error == "authorize request: clients may not send ready_for_handshake"
    assert closed(effects) == [client]
    assert updates(effects, agent) == [PeerUpdate(CLIENT, Kind.LOST, None, "lost")]


# ---- node updates and tunnels -------------------------------------------------------------------------


def test_update_self_without_tunnels_only_stores(core: CoordinatorCore) -> None:
    agent, _ = core.register(AGENT, "a", AgentAuth(AGENT))
    assert core.handle_request(agent, Request(update_self=agent_node())) == []
    assert core.node(AGENT) == agent_node()
    assert core.name(AGENT) == "a"


def test_add_tunnel_exchanges_nodes(core: CoordinatorCore) -> None:
    agent, _ = core.register(AGENT, "a", AgentAuth(AGENT))
    core.handle_request(agent, Request(update_self=agent_node()))
    client, _ = core.register(CLIENT, "c", ClientAuth({AGENT}))
    core.handle_request(client, Request(update_self=client_node()))
    effects = core.handle_request(client, Request(add_tunnel=AGENT))
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.NODE, agent_node(), "add tunnel")]
    assert updates(effects, agent) == [PeerUpdate(CLIENT, Kind.NODE, client_node(), "add tunnel")]
    assert core.tunnels() == [(CLIENT, AGENT)]


def test_add_tunnel_to_offline_agent_then_agent_arrives(core: CoordinatorCore) -> None:
    client, _ = core.register(CLIENT, "c", ClientAuth({AGENT}))
    core.handle_request(client, Request(update_self=client_node()))
    assert core.handle_request(client, Request(add_tunnel=AGENT)) == []
    # The agent's first connection gets the client's node ("init"), and its first node goes to the client.
    agent, effects = core.register(AGENT, "a", AgentAuth(AGENT))
    assert sends(effects, agent) == [
        Response(peer_updates=(PeerUpdate(CLIENT, Kind.NODE, client_node(), "init"),))
    ]
    effects = core.handle_request(agent, Request(update_self=agent_node()))
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.NODE, agent_node(), "node update")]


def test_node_update_reaches_tunnel_peers_once(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    changed = agent_node(derp=2)
    effects = core.handle_request(agent, Request(update_self=changed))
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.NODE, changed, "node update")]
    # An identical node is not resent.
    assert core.handle_request(agent, Request(update_self=agent_node(derp=2))) == []


def test_remove_tunnel_disconnects_both_ends(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(client, Request(remove_tunnel=AGENT))
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.DISCONNECTED, None, "remove tunnel")]
    assert updates(effects, agent) == [PeerUpdate(CLIENT, Kind.DISCONNECTED, None, "remove tunnel")]
    assert core.tunnels() == []
    # Both sides forgot each other: a new tunnel announces the nodes again.
    effects = core.handle_request(client, Request(add_tunnel=AGENT))
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.NODE, agent_node(), "add tunnel")]
    assert updates(effects, agent) == [PeerUpdate(CLIENT, Kind.NODE, client_node(), "add tunnel")]


def test_remove_unknown_tunnel_sends_nothing(core: CoordinatorCore) -> None:
    client, _ = core.register(CLIENT, "c", ClientAuth({AGENT}))
    assert core.handle_request(client, Request(remove_tunnel=AGENT)) == []


def test_graceful_disconnect(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(client, Request(disconnect=True))
    assert updates(effects, agent) == [PeerUpdate(CLIENT, Kind.DISCONNECTED, None, "graceful disconnect")]
    assert closed(effects) == [client]
    assert core.tunnels() == []  # the client was the source
    # The stream ending afterwards changes nothing.
    assert core.lost(client) == []
    assert core.handle_request(client, Request(update_self=client_node())) == []


def test_agent_disconnect_keeps_tunnels_to_it(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(agent, Request(disconnect=True))
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.DISCONNECTED, None, "graceful disconnect")]
    assert core.tunnels() == [(CLIENT, AGENT)]


def test_disconnect_processed_after_node_update_in_same_request(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(agent, Request(update_self=agent_node(derp=3), disconnect=True))
    assert [u.kind for u in updates(effects, client)] == [Kind.NODE, Kind.DISCONNECTED]


def test_lost_peer(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.lost(agent)
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.LOST, None, "lost")]
    assert closed(effects) == [agent]
    assert core.node(AGENT) is None


def test_lost_with_error_sends_error_first(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.lost(agent, "read: stream reset")
    assert effects[0] == Send(agent, Response(error="read: stream reset"))
    assert closed(effects) == [agent]
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.LOST, None, "lost")]


def test_never_announced_peer_is_not_retracted(core: CoordinatorCore) -> None:
    agent, _ = core.register(AGENT, "a", AgentAuth(AGENT))  # no node yet
    client, _ = core.register(CLIENT, "c", ClientAuth({AGENT}))
    core.handle_request(client, Request(add_tunnel=AGENT))
    effects = core.lost(agent)
    assert sends(effects, client) == []
    assert closed(effects) == [agent]


# ---- ready for handshake --------------------------------------------------------------------------------


def test_ready_for_handshake_is_forwarded(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(agent, Request(ready_for_handshake=(CLIENT,)))
    assert sends(effects, client) == [Response(peer_updates=(PeerUpdate(AGENT, Kind.READY_FOR_HANDSHAKE),))]
    assert sends(effects, agent) == []


def test_ready_for_handshake_unknown_peer_is_an_error_message_only(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    stranger = uuid.UUID("00000000-0000-4000-8000-0000000000ff")
    effects = core.handle_request(agent, Request(ready_for_handshake=(stranger, CLIENT)))
    assert sends(effects, agent) == [
        Response(error=f'ready for handshake error: you do not share a tunnel with "{stranger}"')
    ]
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.READY_FOR_HANDSHAKE)]
    assert closed(effects) == []
    assert core.is_current(agent)


def test_ready_for_handshake_after_peer_left_is_an_error(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    core.handle_request(client, Request(disconnect=True))
    # The client left and took its tunnel with it: now it is an unknown peer.
    effects = core.handle_request(agent, Request(ready_for_handshake=(CLIENT,)))
    assert "you do not share a tunnel" in sends(effects, agent)[0].error


def test_ready_for_handshake_to_offline_tunnel_peer_is_dropped(core: CoordinatorCore) -> None:
    coderd, _ = core.register(CLIENT, "coderd", TrustedAuth())
    core.handle_request(coderd, Request(add_tunnel=AGENT))  # the agent is not connected
    assert core.handle_request(coderd, Request(ready_for_handshake=(AGENT,))) == []
    assert core.is_current(coderd)


def test_malformed_ids_end_the_stream(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    effects = core.handle_request(agent, Request(ready_for_handshake=(b"short",)))
    assert "unable to convert bytes to UUID" in sends(effects, agent)[0].error
    assert closed(effects) == [agent]
    trusted, _ = core.register(CLIENT2, "coderd", TrustedAuth())
    effects = core.handle_request(trusted, Request(add_tunnel=b"\x01" * 15))
    assert "unable to convert bytes to UUID" in sends(effects, trusted)[0].error
    effects2 = core.handle_request(client, Request(remove_tunnel=b""))
    assert "unable to convert bytes to UUID" in sends(effects2, client)[0].error


# ---- connections ---------------------------------------------------------------------------------------


def test_new_connection_overwrites_old(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    new, effects = core.register(AGENT, "a", AgentAuth(AGENT))
    assert sends(effects, agent) == [Response(error=ERROR_OVERWRITTEN)]
    assert closed(effects) == [agent]
    assert sends(effects, client) == []  # tunnel peers keep the node they have
    assert sends(effects, new) == [
        Response(peer_updates=(PeerUpdate(CLIENT, Kind.NODE, client_node(), "init"),))
    ]
    assert core.is_current(new) and not core.is_current(agent)
    # The old connection's requests and its end are ignored: the client hears nothing.
    assert core.handle_request(agent, Request(update_self=agent_node(derp=5))) == []
    assert core.lost(agent) == []
    # The new connection publishes the same node: the client already has it.
    assert core.handle_request(new, Request(update_self=agent_node())) == []


def test_reconnect_after_lost_reannounces(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    core.lost(agent)
    new, _ = core.register(AGENT, "a", AgentAuth(AGENT))
    effects = core.handle_request(new, Request(update_self=agent_node()))
    assert updates(effects, client) == [PeerUpdate(AGENT, Kind.NODE, agent_node(), "node update")]


def test_init_batches_are_chunked() -> None:
    core = CoordinatorCore(init_batch=2)
    for i in range(5):
        cid = uuid.UUID(int=i + 1)
        ref, _ = core.register(cid, f"c{i}", ClientAuth({AGENT}))
        core.handle_request(ref, Request(update_self=client_node(cid), add_tunnel=AGENT))
    agent, effects = core.register(AGENT, "a", AgentAuth(AGENT))
    batches = sends(effects, agent)
    assert [len(b.peer_updates) for b in batches] == [2, 2, 1]
    assert {u.id for b in batches for u in b.peer_updates} == {uuid.UUID(int=i + 1) for i in range(5)}
    assert all(u.reason == "init" and u.kind == Kind.NODE for b in batches for u in b.peer_updates)


# ---- bounded queues ------------------------------------------------------------------------------------


def test_full_queue_drops_the_receiver() -> None:
    core = CoordinatorCore(response_buffer=3)
    agent, client = connect_pair(core)
    # client has 1 queued (agent node on add tunnel); the agent has 1 (client's node).
    assert core.queued(client) == 1
    core.handle_request(agent, Request(update_self=agent_node(derp=2)))
    core.handle_request(agent, Request(update_self=agent_node(derp=3)))
    assert core.queued(client) == 3
    effects = core.handle_request(agent, Request(update_self=agent_node(derp=4)))
    # The client could not take the update: it is dropped and the agent is told DISCONNECTED.
    assert closed(effects) == [client]
    assert updates(effects, agent) == [PeerUpdate(CLIENT, Kind.DISCONNECTED, None, "failed update")]
    assert core.tunnels() == []
    assert core.is_current(agent)


def test_delivered_makes_room() -> None:
    core = CoordinatorCore(response_buffer=2)
    agent, client = connect_pair(core)
    core.delivered(client)
    core.delivered(client)
    for derp in range(2, 10):
        effects = core.handle_request(agent, Request(update_self=agent_node(derp=derp)))
        assert closed(effects) == []
        deliver_all(core, effects)
    assert core.queued(client) == 0
    core.delivered(client, 5)  # over-acknowledging never goes negative
    assert core.queued(client) == 0


def test_ready_for_handshake_error_to_full_queue_ends_sender() -> None:
    core = CoordinatorCore(response_buffer=1)
    agent, _ = core.register(AGENT, "a", AgentAuth(AGENT))
    core.handle_request(agent, Request(ready_for_handshake=(CLIENT,)))  # fills the one slot
    effects = core.handle_request(agent, Request(ready_for_handshake=(CLIENT,)))
    assert closed(effects) == [agent]


# ---- shutdown ------------------------------------------------------------------------------------------


def test_close_tells_every_peer(core: CoordinatorCore) -> None:
    agent, client = connect_pair(core)
    deliver_all(core, [])
    effects = core.close()
    assert Response(error=ERROR_COORDINATOR_CLOSED) in sends(effects, agent)
    assert Response(error=ERROR_COORDINATOR_CLOSED) in sends(effects, client)
    assert set(closed(effects)) == {agent, client}
    assert core.closed
    assert core.close() == []
    assert core.handle_request(agent, Request(disconnect=True)) == []
    with pytest.raises(CoordinatorClosedError):
        core.register(AGENT2, "x", AgentAuth(AGENT2))
