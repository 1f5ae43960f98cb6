"""CoordinatorCore under random operation sequences: queue bounds, dedupe and ordering invariants."""

from __future__ import annotations

import uuid

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agentd.tailnet.coordinator import (
    TAILSCALE_SERVICE_PREFIX,
    AgentAuth,
    ClientAuth,
    Close,
    CoordinatorCore,
    Effect,
    Kind,
    Node,
    PeerRef,
    Request,
    Send,
    TrustedAuth,
    service_address,
)

AGENTS = [uuid.UUID(int=0xA0 + i) for i in range(2)]
CLIENTS = [uuid.UUID(int=0xC0 + i) for i in range(3)]
BUFFER = 4


def node_for(peer_id: uuid.UUID, derp: int) -> Node:
    addr = service_address(TAILSCALE_SERVICE_PREFIX, peer_id)
    return Node(preferred_derp=derp, addresses=(f"{addr}/128",))


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = CoordinatorCore(response_buffer=BUFFER, init_batch=2)
        self.refs: dict[uuid.UUID, PeerRef] = {}
        self.undelivered: dict[PeerRef, int] = {}
        self.closed_refs: set[PeerRef] = set()
        #: per connection: what it currently believes about each other peer (last NODE, or absent)
        self.view: dict[PeerRef, dict[uuid.UUID, Node]] = {}

    # ---- effect bookkeeping: every effect must be consistent with what the connection saw --------

    def observe(self, effects: list[Effect]) -> None:
        for effect in effects:
            assert effect.peer not in self.closed_refs, f"effect after close: {effect}"
            if isinstance(effect, Close):
                self.closed_refs.add(effect.peer)
                assert not self.core.is_current(effect.peer)
                continue
            assert isinstance(effect, Send)
            count = self.undelivered.get(effect.peer, 0) + 1
            assert count <= BUFFER, "queue bound exceeded"
            self.undelivered[effect.peer] = count
            view = self.view.setdefault(effect.peer, {})
            for update in effect.response.peer_updates:
                assert update.id != effect.peer.id
                if update.kind == Kind.NODE:
                    assert update.node is not None
                    assert view.get(update.id) != update.node, "identical node resent"
                    view[update.id] = update.node
                elif update.kind in (Kind.LOST, Kind.DISCONNECTED):
                    assert update.id in view, "retracted a peer that was never announced"
                    del view[update.id]
                else:
                    assert update.kind == Kind.READY_FOR_HANDSHAKE
                    assert update.node is None

    def current(self, peer_id: uuid.UUID) -> PeerRef | None:
        ref = self.refs.get(peer_id)
        return ref if ref is not None and self.core.is_current(ref) else None

    # ---- rules ------------------------------------------------------------------------------------

    @initialize(with_nodes=st.booleans())
    def everyone_connected(self, with_nodes: bool) -> None:
        for peer in AGENTS + CLIENTS:
            self.register(peer)
            if with_nodes:
                self.update_self(peer, 1)

    @rule(peer=st.sampled_from(AGENTS + CLIENTS))
    def connect(self, peer: uuid.UUID) -> None:
        if self.current(peer) is None:
            self.register(peer)

    @rule(peer=st.sampled_from(AGENTS + CLIENTS))
    def overwrite(self, peer: uuid.UUID) -> None:
        if self.current(peer) is not None:
            self.register(peer)

    def register(self, peer: uuid.UUID) -> None:
        auth = (
            AgentAuth(peer)
            if peer in AGENTS
            else (TrustedAuth() if peer == CLIENTS[0] else ClientAuth(AGENTS))
        )
        ref, effects = self.core.register(peer, str(peer), auth)
        self.refs[peer] = ref
        self.observe(effects)

    @rule(peer=st.sampled_from(AGENTS + CLIENTS), derp=st.integers(1, 3))
    def update_self(self, peer: uuid.UUID, derp: int) -> None:
        ref = self.current(peer)
        if ref is not None:
            self.observe(self.core.handle_request(ref, Request(update_self=node_for(peer, derp))))

    @rule(client=st.sampled_from(CLIENTS), agent=st.sampled_from(AGENTS), add=st.booleans())
    def tunnel(self, client: uuid.UUID, agent: uuid.UUID, add: bool) -> None:
        ref = self.current(client)
        if ref is not None:
            request = Request(add_tunnel=agent) if add else Request(remove_tunnel=agent)
            self.observe(self.core.handle_request(ref, request))

    @rule(agent=st.sampled_from(AGENTS), other=st.sampled_from(CLIENTS))
    def ready_for_handshake(self, agent: uuid.UUID, other: uuid.UUID) -> None:
        ref = self.current(agent)
        if ref is not None:
            self.observe(self.core.handle_request(ref, Request(ready_for_handshake=(other,))))

    @rule(peer=st.sampled_from(AGENTS + CLIENTS), graceful=st.booleans())
    def leave(self, peer: uuid.UUID, graceful: bool) -> None:
        ref = self.refs.get(peer)
        if ref is None:
            return
        effects = self.core.handle_request(ref, Request(disconnect=True)) if graceful else self.core.lost(ref)
        self.observe(effects)

    @rule(peer=st.sampled_from(AGENTS + CLIENTS), count=st.integers(1, BUFFER))
    def deliver(self, peer: uuid.UUID, count: int) -> None:
        ref = self.refs.get(peer)
        if ref is None:
            return
        taken = min(count, self.undelivered.get(ref, 0))
        self.undelivered[ref] = self.undelivered.get(ref, 0) - taken
        self.core.delivered(ref, taken)

    @invariant()
    def accounting_matches(self) -> None:
        for ref, count in self.undelivered.items():
            if self.core.is_current(ref):
                assert self.core.queued(ref) == count

    @invariant()
    def tunnels_have_a_live_source(self) -> None:
        for src, _dst in self.core.tunnels():
            assert src in self.core.peer_ids()

    def teardown(self) -> None:
        self.observe(self.core.close())
        assert all(ref in self.closed_refs for ref in self.refs.values())


CoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
TestCoreMachine = CoreMachine.TestCase
