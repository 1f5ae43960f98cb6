"""The PostgreSQL coordinator's pure parts (channel payloads, the per-connection diff) and its
clean-up of rows left by long-dead coordinators."""

from __future__ import annotations

import uuid

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agentd.store import Database
from agentd.store.pubsub import MAX_PAYLOAD_BYTES
from agentd.tailnet.coordinator import Kind, Node, PeerUpdate
from agentd.tailnet.pg_coordinator import (
    HandshakeMessage,
    PgCoordinator,
    SyncMessage,
    coordinator_channel,
    decode_message,
    diff_peers,
    encode_handshake,
    encode_sync,
    node_bytes,
    node_from_bytes,
    peer_lock_key,
)

A, B, C = (uuid.UUID(int=i) for i in (1, 2, 3))


def test_sync_payloads_are_chunked_under_the_notify_limit() -> None:
    peers = [uuid.uuid4() for _ in range(1000)]
    payloads = encode_sync("node update", peers)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= MAX_PAYLOAD_BYTES for p in payloads)
    decoded = [decode_message(p) for p in payloads]
    assert all(isinstance(m, SyncMessage) and m.reason == "node update" for m in decoded)
    assert [p for m in decoded for p in m.peers] == peers  # type: ignore[union-attr]
    assert decode_message(encode_handshake(A, B)) == HandshakeMessage(A, B)
    assert len(coordinator_channel(uuid.uuid4())) <= 63
    with pytest.raises(ValueError):
        encode_sync("a|b", [A])


@given(st.text(max_size=200))
def test_decoding_junk_only_raises_value_error(payload: str) -> None:
    try:
        decode_message(payload)
    except ValueError:
        pass


def test_node_bytes_round_trip_and_lock_keys() -> None:
    node = Node(id=7, key=b"k" * 32, preferred_derp=3, derp_latency={"1-v4": 0.5}, addresses=("fd7a::1/128",))
    assert node_from_bytes(node_bytes(node)) == node
    assert peer_lock_key(A) != peer_lock_key(uuid.uuid4())
    assert -(2**63) <= peer_lock_key(uuid.UUID(int=2**128 - 1)) < 2**63


def test_diff_follows_the_dedupe_rules() -> None:
    n1, n2 = Node(id=1), Node(id=2)
    sent: dict[uuid.UUID, Node] = {}
    # Never LOST about a peer never announced; NODE once.
    assert diff_peers(sent, {A: n1, B: None}, "add tunnel") == [PeerUpdate(A, Kind.NODE, n1, "add tunnel")]
    assert diff_peers(sent, {A: n1}, "node update") == []
    assert diff_peers(sent, {A: n2, C: n1}, "node update") == [
        PeerUpdate(A, Kind.NODE, n2, "node update"),
        PeerUpdate(C, Kind.NODE, n1, "node update"),
    ]
    # Lost, then forgotten; gone is DISCONNECTED with the trigger's reason.
    assert diff_peers(sent, {A: None, C: n1}, "lost") == [PeerUpdate(A, Kind.LOST, None, "lost")]
    assert diff_peers(sent, {A: None}, "remove tunnel") == [
        PeerUpdate(C, Kind.DISCONNECTED, None, "remove tunnel")
    ]
    assert sent == {}
    # A coalesced trigger falls back to each kind's plain reason.
    assert diff_peers(sent, {A: n1}, "graceful disconnect") == [PeerUpdate(A, Kind.NODE, n1, "node update")]
    assert diff_peers(sent, {}, "node update") == [PeerUpdate(A, Kind.DISCONNECTED, None, "disconnected")]


async def test_rows_of_long_dead_coordinators_are_deleted(
    db: Database, autojump_clock: trio.testing.MockClock
) -> None:
    dead, alive_peer = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        "INSERT INTO tailnet_coordinators (id, heartbeat_at) VALUES (%s, now() - interval '1 hour')", [dead]
    )
    await db.execute("INSERT INTO tailnet_peers (id, coordinator_id, node) VALUES (%s, %s, '')", [A, dead])
    await db.execute(
        "INSERT INTO tailnet_tunnels (src_id, dst_id, coordinator_id) VALUES (%s, %s, %s)", [B, A, dead]
    )
    coordinator = PgCoordinator(db, refresh_interval=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        await db.execute(
            "INSERT INTO tailnet_peers (id, coordinator_id, node, status, updated_at)"
            " VALUES (%s, %s, '', 'lost', now() - interval '1 hour')",
            [alive_peer, coordinator.id],
        )
        await trio.sleep(2)
        assert await db.fetchval("SELECT count(*) FROM tailnet_coordinators") == 1
        assert await db.fetchval("SELECT count(*) FROM tailnet_peers") == 0
        assert await db.fetchval("SELECT count(*) FROM tailnet_tunnels") == 0
        nursery.cancel_scope.cancel()
