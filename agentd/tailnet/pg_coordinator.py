"""PostgreSQL-backed tailnet coordinator: every replica on one database is one tailnet (spec §8.4).

Model (after Coder's enterprise pgcoord, written for agentd): the shared state is three tables of
schema.sql — ``tailnet_coordinators`` (one row per running coordinator, a heartbeat),
``tailnet_peers`` (peer id → coordinator of its current connection, node bytes, status ok/lost)
and ``tailnet_tunnels`` (src → dst). Each replica keeps only its own connections in memory: their
response queues and, per connection, what it was last told about each tunnel peer (the dedupe
map of §8.4).

* Writes: requests become ops on one writer task; a batch of ops (everything queued while the
  previous batch ran) is one transaction, consecutive ops of one kind one multi-row statement
  (node updates coalesced per peer). Each statement returns the peers that must hear about the
  change (the other ends of the tunnels, with their coordinator); the transaction ends with one
  ``pg_notify`` per (coordinator, reason) naming those peers on that coordinator's channel
  ``tailnet_c_<id>``. Peers on this replica are marked for a sync directly after the commit.
  A write transaction first takes the advisory locks of the peers it touches (ascending), so
  of two racing writes about one peer the later sees the earlier and tells the other side.
* Syncs: a mapper task reads, for all marked local peers at once, the rows of every tunnel peer
  and diffs them against what each was told: NODE for a live node not sent yet, LOST for a lost
  peer or one whose coordinator stopped beating, DISCONNECTED for a peer that is gone.
* Heartbeats: every ``heartbeat_interval`` (2 s) the row is advanced and ``tailnet_heartbeat``
  notified. A coordinator not heard from for ``missed_heartbeats`` intervals (3 → 6 s) is expired:
  its peers count as LOST and every local peer is re-synced, so the other ends of its tunnels
  are told within 6 s of its last heartbeat (plus one sync, milliseconds). Liveness is judged on
  this replica's clock from received heartbeats, never by comparing hosts' clocks.
* Rules kept from the in-memory core: address authorisation (``authorize``), ready-for-handshake
  only between tunnel peers (else a non-fatal error), LOST (connection ended) vs DISCONNECTED
  (``disconnect``, ``remove_tunnel``), a bounded response queue per connection (full → the
  receiver is dropped, ``failed update``) and at most ``REQUEST_BUFFER_SIZE`` unwritten requests
  per connection (``send`` waits beyond that).

Deviation from Coder: a peer id has one row (its latest connection wins) instead of one per
coordinator; an older connection elsewhere can no longer change it.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import trio

from agentd.proto import tailnet_pb2
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.db import Transaction
from agentd.store.errors import StoreError
from agentd.store.pubsub import MAX_PAYLOAD_BYTES, Missed, PubSub
from agentd.tailnet.convert import node_from_proto, node_to_proto
from agentd.tailnet.coordinator import (
    ERROR_COORDINATOR_CLOSED,
    ERROR_OVERWRITTEN,
    INIT_BATCH_SIZE,
    READY_FOR_HANDSHAKE_ERROR,
    REASON_ADD_TUNNEL,
    REASON_COORDINATOR_CLOSE,
    REASON_FAILED_UPDATE,
    REASON_GRACEFUL_DISCONNECT,
    REASON_INIT,
    REASON_LOST,
    REASON_NODE_UPDATE,
    REASON_REMOVE_TUNNEL,
    REQUEST_BUFFER_SIZE,
    RESPONSE_BUFFER_SIZE,
    Auth,
    Kind,
    Node,
    PeerRef,
    PeerUpdate,
    Request,
    Response,
    _parse_id,
    _RequestError,
    authorize,
)

__all__ = [
    "HEARTBEAT_CHANNEL",
    "PgCoordinator",
    "PgPeerHandle",
    "coordinator_channel",
    "decode_message",
    "diff_peers",
    "encode_handshake",
    "encode_sync",
]

log = logging.getLogger("agentd.tailnet.pg")

HEARTBEAT_INTERVAL: Final = 2.0
MISSED_HEARTBEATS: Final = 3
#: Every local peer is re-synced this often, whatever NOTIFY said (a safety net, like Coder's 30 s).
REFRESH_INTERVAL: Final = 30.0
#: Rows of coordinators silent this long, and lost peers untouched this long, are deleted.
RETENTION_SECONDS: Final = 600.0
CLEANUP_INTERVAL: Final = 60.0
#: Local peers per mapping query and ops per write transaction.
MAX_BATCH: Final = 1000
HEARTBEAT_CHANNEL: Final = "tailnet_heartbeat"
ERROR_UNHEALTHY: Final = "coordinator unhealthy"
REASON_DISCONNECTED: Final = "disconnected"
SHUTDOWN_TIMEOUT: Final = 5.0


def coordinator_channel(coordinator_id: uuid.UUID) -> str:
    """The NOTIFY channel of one coordinator (42 bytes, within PostgreSQL's 63)."""
    return "tailnet_c_" + coordinator_id.hex


# --------------------------------------------------------------------------------------------------
# Sans-I/O: channel payloads and the per-connection diff


@attrs.frozen
class SyncMessage:
    """Re-read the tunnel peers of these local peers (something about them changed)."""

    reason: str
    peers: tuple[uuid.UUID, ...]


@attrs.frozen
class HandshakeMessage:
    """Forward READY_FOR_HANDSHAKE from ``src`` to the local peer ``dst``."""

    dst: uuid.UUID
    src: uuid.UUID


def encode_sync(reason: str, peers: Sequence[uuid.UUID]) -> list[str]:
    """``s|<reason>|<id>,<id>…`` payloads, each under the NOTIFY limit (≈ 215 ids per payload)."""
    if "|" in reason:
        raise ValueError(f"reason {reason!r} contains '|'")
    head = f"s|{reason}|"
    per = max(1, (MAX_PAYLOAD_BYTES - len(head.encode())) // 37)
    return [head + ",".join(str(p) for p in peers[i : i + per]) for i in range(0, len(peers), per)]


def encode_handshake(dst: uuid.UUID, src: uuid.UUID) -> str:
    return f"h|{dst}|{src}"


def decode_message(payload: str) -> SyncMessage | HandshakeMessage:
    """Parse a coordinator-channel payload; ValueError for anything else."""
    kind, sep, rest = payload.partition("|")
    first, sep2, second = rest.partition("|")
    if not sep or not sep2:
        raise ValueError(f"malformed coordinator message {payload[:80]!r}")
    if kind == "s":
        return SyncMessage(first, tuple(uuid.UUID(p) for p in second.split(",") if p))
    if kind == "h":
        return HandshakeMessage(uuid.UUID(first), uuid.UUID(second))
    raise ValueError(f"unknown coordinator message kind {kind!r}")


def _reason_for(kind: Kind, trigger: str) -> str:
    """The reason text of an update of ``kind`` found by a sync that ``trigger`` caused.

    Matches the in-memory coordinator's reasons when one event caused the sync; a coalesced or
    periodic sync falls back to the plain reason of the kind.
    """
    if kind == Kind.NODE:
        return (
            trigger if trigger in (REASON_NODE_UPDATE, REASON_ADD_TUNNEL, REASON_INIT) else REASON_NODE_UPDATE
        )
    if kind == Kind.LOST:
        return trigger if trigger == REASON_COORDINATOR_CLOSE else REASON_LOST
    if trigger in (REASON_GRACEFUL_DISCONNECT, REASON_REMOVE_TUNNEL, REASON_FAILED_UPDATE):
        return trigger
    return REASON_DISCONNECTED


def diff_peers(
    sent: dict[uuid.UUID, Node], desired: Mapping[uuid.UUID, Node | None], trigger: str
) -> list[PeerUpdate]:
    """Updates that bring a connection from ``sent`` to ``desired`` (updating ``sent`` in place).

    ``desired`` maps each tunnel peer to its live node, or None when it is lost; peers missing
    from it are gone. Never LOST/DISCONNECTED about a peer never announced, never an identical
    node twice, and a peer is forgotten once it was reported LOST or DISCONNECTED (spec §8.4).
    """
    updates: list[PeerUpdate] = []
    for peer_id, node in desired.items():
        if node is None:
            if sent.pop(peer_id, None) is not None:
                updates.append(PeerUpdate(peer_id, Kind.LOST, None, _reason_for(Kind.LOST, trigger)))
        elif sent.get(peer_id) != node:
            sent[peer_id] = node
            updates.append(PeerUpdate(peer_id, Kind.NODE, node, _reason_for(Kind.NODE, trigger)))
    for peer_id in [p for p in sent if p not in desired]:
        del sent[peer_id]
        updates.append(PeerUpdate(peer_id, Kind.DISCONNECTED, None, _reason_for(Kind.DISCONNECTED, trigger)))
    return updates


def node_bytes(node: Node) -> bytes:
    return node_to_proto(node).SerializeToString(deterministic=True)


def node_from_bytes(raw: bytes) -> Node:
    return node_from_proto(tailnet_pb2.Node.FromString(raw))


# --------------------------------------------------------------------------------------------------
# SQL

_BEAT = """
WITH beat AS (
    INSERT INTO tailnet_coordinators (id, heartbeat_at) VALUES (%(me)s, now())
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()
    RETURNING id
)
SELECT pg_notify(%(channel)s, id::text) FROM beat"""

_LIVE_COORDINATORS = """
SELECT id FROM tailnet_coordinators WHERE heartbeat_at > now() - make_interval(secs => %s)"""

# The other end of every tunnel of the peers in `changed`, with the coordinator it is connected to.
_INTERESTED = """
others AS (
    SELECT t.dst_id AS other FROM changed JOIN tailnet_tunnels t ON t.src_id = changed.id
    UNION
    SELECT t.src_id FROM changed JOIN tailnet_tunnels t ON t.dst_id = changed.id
)
SELECT p.id AS peer, p.coordinator_id AS coordinator
FROM others JOIN tailnet_peers p ON p.id = others.other
WHERE p.status = 'ok'"""

# A new connection takes the peer's row over. A row left by a lost connection (or by a dead
# coordinator) starts afresh, like the in-memory core forgetting a lost peer and its tunnels.
_REGISTER = """
WITH u AS (SELECT DISTINCT id FROM unnest(%(ids)s::uuid[]) AS u(id)),
stale AS (
    SELECT p.id FROM tailnet_peers p JOIN u ON u.id = p.id
    WHERE p.status = 'lost' OR NOT (p.coordinator_id = ANY(%(live)s::uuid[]))
),
dropped AS (DELETE FROM tailnet_tunnels t USING stale WHERE t.src_id = stale.id RETURNING 1)
INSERT INTO tailnet_peers (id, coordinator_id, node, status, updated_at)
SELECT u.id, %(me)s, NULL, 'ok', now() FROM u
ON CONFLICT (id) DO UPDATE SET
    coordinator_id = EXCLUDED.coordinator_id, status = 'ok', updated_at = now(),
    node = CASE WHEN tailnet_peers.id IN (SELECT id FROM stale) THEN NULL ELSE tailnet_peers.node END"""

# Only the connection that owns the row may change it.
_NODES = (
    """
WITH changed AS (
    INSERT INTO tailnet_peers (id, coordinator_id, node, status, updated_at)
    SELECT u.id, %(me)s, u.node, 'ok', now() FROM unnest(%(ids)s::uuid[], %(nodes)s::bytea[]) AS u(id, node)
    ON CONFLICT (id) DO UPDATE SET node = EXCLUDED.node, status = 'ok', updated_at = now()
    WHERE tailnet_peers.coordinator_id = EXCLUDED.coordinator_id
    RETURNING id
),"""
    + _INTERESTED
)

_DISCONNECT = (
    """
WITH changed AS (
    DELETE FROM tailnet_peers WHERE id = ANY(%(ids)s::uuid[]) AND coordinator_id = %(me)s RETURNING id
),
dropped AS (DELETE FROM tailnet_tunnels t USING changed WHERE t.src_id = changed.id RETURNING 1),"""
    + _INTERESTED
)

_LOST = (
    """
WITH changed AS (
    UPDATE tailnet_peers SET status = 'lost', updated_at = now()
    WHERE id = ANY(%(ids)s::uuid[]) AND coordinator_id = %(me)s RETURNING id
),"""
    + _INTERESTED
)

_LOST_ALL = (
    """
WITH changed AS (
    UPDATE tailnet_peers SET status = 'lost', updated_at = now()
    WHERE coordinator_id = %(me)s AND status = 'ok' RETURNING id
),"""
    + _INTERESTED
)

_ADD_TUNNELS = """
WITH changed AS (
    INSERT INTO tailnet_tunnels (src_id, dst_id, coordinator_id, updated_at)
    SELECT u.src, u.dst, %(me)s, now() FROM unnest(%(src)s::uuid[], %(dst)s::uuid[]) AS u(src, dst)
    ON CONFLICT (src_id, dst_id) DO UPDATE SET coordinator_id = EXCLUDED.coordinator_id, updated_at = now()
    RETURNING src_id, dst_id
)
SELECT p.id AS peer, p.coordinator_id AS coordinator
FROM changed JOIN tailnet_peers p ON p.id IN (changed.src_id, changed.dst_id)
WHERE p.status = 'ok'"""

_REMOVE_TUNNELS = """
WITH changed AS (
    DELETE FROM tailnet_tunnels t USING unnest(%(src)s::uuid[], %(dst)s::uuid[]) AS u(src, dst)
    WHERE t.src_id = u.src AND t.dst_id = u.dst
    RETURNING t.src_id, t.dst_id
)
SELECT p.id AS peer, p.coordinator_id AS coordinator
FROM changed JOIN tailnet_peers p ON p.id IN (changed.src_id, changed.dst_id)
WHERE p.status = 'ok'"""

_HANDSHAKES = """
SELECT u.n, EXISTS (
    SELECT 1 FROM tailnet_tunnels t
    WHERE (t.src_id = u.src AND t.dst_id = u.dst) OR (t.src_id = u.dst AND t.dst_id = u.src)
) AS shared, p.coordinator_id AS coordinator
FROM unnest(%(src)s::uuid[], %(dst)s::uuid[]) WITH ORDINALITY AS u(src, dst, n)
LEFT JOIN tailnet_peers p ON p.id = u.dst AND p.status = 'ok'
ORDER BY u.n"""

# Writes that touch one peer serialise on its advisory lock, taken in ascending order at the start
# of each write transaction. Why: in READ COMMITTED, a node update of X and a tunnel C → X committed
# concurrently would each miss the other's row (neither would tell the other side); with the lock
# the later one's statements see the earlier one's commit and notify accordingly.
_LOCK_PEERS = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k"

_NOTIFY = "SELECT count(pg_notify(c, p)) FROM unnest(%s::text[], %s::text[]) AS n(c, p)"

_MAPPINGS = """
WITH me AS (SELECT DISTINCT id FROM unnest(%s::uuid[]) AS me(id)),
pairs AS (
    SELECT me.id AS me, t.dst_id AS other FROM me JOIN tailnet_tunnels t ON t.src_id = me.id
    UNION
    SELECT me.id, t.src_id FROM me JOIN tailnet_tunnels t ON t.dst_id = me.id
)
SELECT pairs.me, pairs.other, p.node, p.status::text AS status, p.coordinator_id AS coordinator
FROM pairs JOIN tailnet_peers p ON p.id = pairs.other"""

_CLEANUP = """
WITH dead AS (
    DELETE FROM tailnet_coordinators WHERE heartbeat_at < now() - make_interval(secs => %(age)s) RETURNING id
),
lost AS (
    DELETE FROM tailnet_peers WHERE status = 'lost' AND updated_at < now() - make_interval(secs => %(age)s)
    RETURNING id
),
lost_tunnels AS (DELETE FROM tailnet_tunnels t USING lost WHERE t.src_id = lost.id RETURNING 1)
SELECT (SELECT count(*) FROM dead) AS coordinators, (SELECT count(*) FROM lost) AS peers"""


# --------------------------------------------------------------------------------------------------
# State


@attrs.frozen
class _Op:
    """One write, queued in request order; ``kind`` selects the statement."""

    kind: str  # register | node | add | remove | disconnect | lost | handshake
    peer: uuid.UUID
    serial: int
    node: bytes | None = None
    other: uuid.UUID | None = None
    reason: str = ""


@attrs.define(eq=False)
class _Local:
    """One coordinate connection on this replica."""

    ref: PeerRef
    name: str
    auth: Auth
    channel: trio.MemorySendChannel[Response]
    node: Node | None = None
    sent: dict[uuid.UUID, Node] = attrs.Factory(dict)
    pending: int = 0
    room: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    removed: bool = False


@attrs.define
class _Written:
    """What a committed batch asks for: local syncs and handshake outcomes."""

    syncs: list[tuple[uuid.UUID, str]] = attrs.Factory(list)
    handshakes: list[tuple[_Op, bool, uuid.UUID | None]] = attrs.Factory(list)


def peer_lock_key(peer_id: uuid.UUID) -> int:
    """The advisory lock key of a peer id: its first 8 bytes as a signed bigint."""
    return int.from_bytes(peer_id.bytes[:8], "big", signed=True)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@attrs.define(eq=False)
class PgCoordinator:
    """The tailnet coordinator of one replica, its shared state in PostgreSQL.

    ``run`` (in the daemon's root nursery) writes the first heartbeat before it reports started,
    then owns the LISTEN connection, heartbeats, writer and mapper tasks. When it is cancelled
    every local peer gets ``coordinator closed`` and, in the database, is marked lost so that the
    other ends on other replicas are told LOST.
    """

    db: Database
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    missed_heartbeats: int = MISSED_HEARTBEATS
    response_buffer: int = RESPONSE_BUFFER_SIZE
    request_buffer: int = REQUEST_BUFFER_SIZE
    refresh_interval: float = REFRESH_INTERVAL
    #: False only in tests that simulate a crash: stopping then leaves the rows as a killed process would.
    mark_lost_on_close: bool = True
    id: uuid.UUID = attrs.field(factory=uuid.uuid4)
    #: the daemon's stop deadline: bounds (and a second signal cuts) marking the peers lost
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    _locals: dict[uuid.UUID, _Local] = attrs.field(factory=dict, init=False)
    _ops: list[_Op] = attrs.field(factory=list, init=False)
    _ops_lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _dirty: dict[uuid.UUID, str] = attrs.field(factory=dict, init=False)
    _dirty_lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot, init=False)
    _last_seen: dict[uuid.UUID, float] = attrs.field(factory=dict, init=False)
    _serial: int = attrs.field(default=0, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _healthy: bool = attrs.field(default=True, init=False)
    #: counters for tests and metrics
    write_batches: int = attrs.field(default=0, init=False)
    syncs: int = attrs.field(default=0, init=False)

    @property
    def expiry(self) -> float:
        """Seconds without a heartbeat after which another coordinator's peers count as lost."""
        return self.heartbeat_interval * self.missed_heartbeats

    @property
    def running(self) -> bool:
        return self._running

    def live_coordinators(self) -> set[uuid.UUID]:
        """Coordinators whose peers count as connected: this one and those heard from recently."""
        return {self.id, *self._last_seen}

    def node(self, peer_id: uuid.UUID) -> Node | None:
        """The node ``peer_id`` last published, if it is connected to this replica."""
        local = self._locals.get(peer_id)
        return None if local is None else local.node

    # ---- lifecycle --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._closed:
            raise trio.ClosedResourceError("coordinator already closed")
        async with trio.open_nursery() as nursery:
            pubsub = PubSub(self.db, buffer_size=8192)
            await nursery.start(pubsub.run)
            await nursery.start(self._listen, pubsub, HEARTBEAT_CHANNEL, self._on_heartbeat)
            await nursery.start(self._listen, pubsub, coordinator_channel(self.id), self._on_message)
            # The first heartbeat precedes every peer row of ours: others never see our peers
            # before they know we are alive (NOTIFYs arrive in commit order).
            await self._beat()
            await self._reload_coordinators()
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._expire)
            nursery.start_soon(self._writer)
            nursery.start_soon(self._mapper)
            nursery.start_soon(self._refresh)
            self._running = True
            log.info("tailnet coordinator %s started (postgres)", self.id)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._running = False
                self._closed = True
                await self._shutdown()
                nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        for local in list(self._locals.values()):
            self._try_send(local, Response(error=ERROR_COORDINATOR_CLOSED))
            self._remove(local)
        self._ops.clear()
        if not self.mark_lost_on_close:
            return
        with self.cleanup.shield(SHUTDOWN_TIMEOUT):
            try:
                async with self.db.transaction() as tx:
                    rows = await tx.fetchall(_LOST_ALL, {"me": self.id})
                    await self._notify(
                        tx, [(r["peer"], r["coordinator"], REASON_COORDINATOR_CLOSE) for r in rows]
                    )
            except StoreError as exc:
                log.warning("tailnet coordinator %s: could not mark its peers lost: %s", self.id, exc)

    # ---- connections ------------------------------------------------------------------------------

    @asynccontextmanager
    async def connect(self, peer_id: uuid.UUID, name: str, auth: Auth) -> AsyncIterator[PgPeerHandle]:
        """Register a coordinate connection for ``peer_id`` for the duration of the block.

        Leaving without ``disconnect`` marks the peer LOST for its tunnel peers (on any replica).
        """
        if not self._running:
            raise trio.ClosedResourceError("coordinator is not running")
        send, receive = trio.open_memory_channel[Response](self.response_buffer)
        self._serial += 1
        local = _Local(ref=PeerRef(peer_id, self._serial), name=name, auth=auth, channel=send)
        handle = PgPeerHandle(coordinator=self, local=local, receive_channel=receive)
        if not self._healthy:
            self._try_send(local, Response(error=ERROR_UNHEALTHY))
            send.close()
            local.removed = True
        else:
            old = self._locals.get(peer_id)
            if old is not None:
                self._try_send(old, Response(error=ERROR_OVERWRITTEN))
                self._remove(old)
            self._locals[peer_id] = local
            self._enqueue(local, "register")
        try:
            yield handle
        finally:
            handle.close()
            receive.close()

    def _remove(self, local: _Local) -> None:
        """Forget ``local`` here (its queue ends after what was already sent)."""
        local.removed = True
        if self._locals.get(local.ref.id) is local:
            del self._locals[local.ref.id]
        local.channel.close()
        local.room.unpark_all()

    def _enqueue(
        self,
        local: _Local,
        kind: str,
        *,
        node: bytes | None = None,
        other: uuid.UUID | None = None,
        reason: str = "",
    ) -> None:
        local.pending += 1
        self._ops.append(_Op(kind, local.ref.id, local.ref.serial, node, other, reason))
        self._ops_lot.unpark_all()

    def _try_send(self, local: _Local, response: Response) -> bool:
        try:
            local.channel.send_nowait(response)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True  # its reader is gone; the block's exit tells us
        return True

    def _deliver(self, local: _Local, response: Response) -> None:
        """Queue ``response``; a full queue drops the receiver (DISCONNECTED, ``failed update``)."""
        if not self._try_send(local, response):
            log.debug("tailnet peer %s: response queue full, dropping it", local.ref.id)
            self._remove(local)
            self._enqueue(local, "disconnect", reason=REASON_FAILED_UPDATE)

    def _fail(self, local: _Local, error: str) -> None:
        self._try_send(local, Response(error=error))
        self._remove(local)
        self._enqueue(local, "lost", reason=REASON_LOST)

    async def _apply(self, local: _Local, request: Request) -> None:
        """Check and queue one request of ``local`` (the in-memory core's order of effects)."""
        try:
            problem = authorize(local.auth, request)
            if problem is not None:
                raise _RequestError(f"authorize request: {problem}")
            while local.pending >= self.request_buffer and not local.removed:
                await local.room.park()
            if local.removed:
                return
            if request.update_self is not None:
                local.node = request.update_self
                self._enqueue(local, "node", node=node_bytes(request.update_self))
            if request.add_tunnel is not None:
                self._enqueue(local, "add", other=_parse_id(request.add_tunnel, "add tunnel"))
            if request.remove_tunnel is not None:
                self._enqueue(local, "remove", other=_parse_id(request.remove_tunnel, "remove tunnel"))
            if request.disconnect:
                self._remove(local)
                self._enqueue(local, "disconnect", reason=REASON_GRACEFUL_DISCONNECT)
                return
            for raw in request.ready_for_handshake:
                self._enqueue(local, "handshake", other=_parse_id(raw, "ready for handshake"))
        except _RequestError as exc:
            self._fail(local, str(exc))

    # ---- writer -----------------------------------------------------------------------------------

    async def _writer(self) -> None:
        delay = 0.05
        while True:
            while not self._ops:
                await self._ops_lot.park()
            batch = self._ops[:MAX_BATCH]
            try:
                written = await self._write(batch)
            except StoreError as exc:
                log.warning(
                    "tailnet coordinator %s: write failed, retrying in %.2g s: %s", self.id, delay, exc
                )
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05
            del self._ops[: len(batch)]
            self.write_batches += 1
            for op in batch:
                local = self._locals.get(op.peer)
                if local is not None and local.ref.serial == op.serial:
                    local.pending -= 1
                    local.room.unpark_all()
            for peer_id, reason in written.syncs:
                self._mark(peer_id, reason)
            for op, shared, coordinator in written.handshakes:
                self._handshake_done(op, shared, coordinator)

    async def _write(self, batch: list[_Op]) -> _Written:
        written = _Written()
        targets: list[tuple[uuid.UUID, uuid.UUID, str]] = []
        keys: set[int] = set()
        for op in batch:
            if op.kind != "handshake":
                keys.add(peer_lock_key(op.peer))
                if op.other is not None:
                    keys.add(peer_lock_key(op.other))
        async with self.db.transaction() as tx:
            if keys:
                await tx.execute(_LOCK_PEERS, [sorted(keys)])
            start = 0
            while start < len(batch):
                first = batch[start]
                end = start + 1
                while (
                    end < len(batch) and batch[end].kind == first.kind and batch[end].reason == first.reason
                ):
                    end += 1
                run = batch[start:end]
                start = end
                if first.kind == "register":
                    await tx.execute(
                        _REGISTER,
                        {
                            "ids": [op.peer for op in run],
                            "me": self.id,
                            "live": list(self.live_coordinators()),
                        },
                    )
                    written.syncs.extend((op.peer, REASON_INIT) for op in run)
                elif first.kind == "node":
                    latest = {op.peer: op.node for op in run}
                    rows = await tx.fetchall(
                        _NODES, {"ids": list(latest), "nodes": list(latest.values()), "me": self.id}
                    )
                    targets.extend((r["peer"], r["coordinator"], REASON_NODE_UPDATE) for r in rows)
                elif first.kind in ("add", "remove"):
                    pairs = list(dict.fromkeys((op.peer, op.other) for op in run))
                    rows = await tx.fetchall(
                        _ADD_TUNNELS if first.kind == "add" else _REMOVE_TUNNELS,
                        {"src": [p[0] for p in pairs], "dst": [p[1] for p in pairs], "me": self.id},
                    )
                    reason = REASON_ADD_TUNNEL if first.kind == "add" else REASON_REMOVE_TUNNEL
                    targets.extend((r["peer"], r["coordinator"], reason) for r in rows)
                    # The requester re-reads even when nothing changed in the table.
                    written.syncs.extend((p[0], reason) for p in pairs)
                elif first.kind in ("disconnect", "lost"):
                    rows = await tx.fetchall(
                        _DISCONNECT if first.kind == "disconnect" else _LOST,
                        {"ids": list(dict.fromkeys(op.peer for op in run)), "me": self.id},
                    )
                    targets.extend((r["peer"], r["coordinator"], first.reason) for r in rows)
                elif first.kind == "handshake":
                    rows = await tx.fetchall(
                        _HANDSHAKES, {"src": [op.peer for op in run], "dst": [op.other for op in run]}
                    )
                    for op, row in zip(run, rows, strict=True):
                        written.handshakes.append((op, bool(row["shared"]), row["coordinator"]))
                        if row["shared"] and row["coordinator"] not in (None, self.id):
                            assert op.other is not None
                            await self._notify_raw(
                                tx,
                                [coordinator_channel(row["coordinator"])],
                                [encode_handshake(op.other, op.peer)],
                            )
                else:  # pragma: no cover - every kind is handled above
                    raise AssertionError(first.kind)
            for peer_id, coordinator, reason in targets:
                if coordinator == self.id:
                    written.syncs.append((peer_id, reason))
            await self._notify(tx, targets)
        return written

    async def _notify(self, tx: Transaction, targets: Iterable[tuple[uuid.UUID, uuid.UUID, str]]) -> None:
        """One NOTIFY per (other coordinator, reason) naming its peers; sent when ``tx`` commits."""
        grouped: dict[tuple[uuid.UUID, str], dict[uuid.UUID, None]] = {}
        for peer_id, coordinator, reason in targets:
            if coordinator != self.id:
                grouped.setdefault((coordinator, reason), {})[peer_id] = None
        channels: list[str] = []
        payloads: list[str] = []
        for (coordinator, reason), peers in grouped.items():
            for payload in encode_sync(reason, list(peers)):
                channels.append(coordinator_channel(coordinator))
                payloads.append(payload)
        await self._notify_raw(tx, channels, payloads)

    @staticmethod
    async def _notify_raw(tx: Transaction, channels: list[str], payloads: list[str]) -> None:
        if channels:
            await tx.execute(_NOTIFY, [channels, payloads])

    def _handshake_done(self, op: _Op, shared: bool, coordinator: uuid.UUID | None) -> None:
        assert op.other is not None
        if not shared:
            # Racy by nature (the client may have just gone), so only an error message.
            local = self._locals.get(op.peer)
            if local is not None and local.ref.serial == op.serial:
                message = f'{READY_FOR_HANDSHAKE_ERROR}: you do not share a tunnel with "{op.other}"'
                if not self._try_send(local, Response(error=message)):
                    self._fail(local, "handle ready for handshake: would block")
            return
        if coordinator == self.id:
            self._forward_handshake(op.other, op.peer)

    def _forward_handshake(self, dst: uuid.UUID, src: uuid.UUID) -> None:
        local = self._locals.get(dst)
        if local is not None:
            self._deliver(local, Response(peer_updates=(PeerUpdate(src, Kind.READY_FOR_HANDSHAKE),)))

    # ---- mapper -----------------------------------------------------------------------------------

    def _mark(self, peer_id: uuid.UUID, reason: str) -> None:
        if peer_id in self._locals:
            self._dirty[peer_id] = reason
            self._dirty_lot.unpark_all()

    def _mark_all(self, reason: str) -> None:
        for peer_id in self._locals:
            self._dirty[peer_id] = reason
        self._dirty_lot.unpark_all()

    async def _mapper(self) -> None:
        delay = 0.05
        while True:
            while not self._dirty:
                await self._dirty_lot.park()
            dirty, self._dirty = self._dirty, {}
            ids = [peer_id for peer_id in dirty if peer_id in self._locals]
            for chunk in _chunks(ids, MAX_BATCH):
                try:
                    rows = await self.db.fetchall(_MAPPINGS, [list(chunk)])
                except StoreError as exc:
                    log.warning("tailnet coordinator %s: mapping query failed: %s", self.id, exc)
                    for peer_id in chunk:
                        self._dirty.setdefault(peer_id, dirty[peer_id])
                    await trio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.05
                self._apply_mappings(chunk, rows, dirty)

    def _apply_mappings(
        self, peers: Sequence[uuid.UUID], rows: list[dict[str, Any]], reasons: Mapping[uuid.UUID, str]
    ) -> None:
        live = self.live_coordinators()
        desired: dict[uuid.UUID, dict[uuid.UUID, Node | None]] = {peer_id: {} for peer_id in peers}
        for row in rows:
            raw = row["node"]
            ok = row["status"] == "ok" and raw is not None and row["coordinator"] in live
            desired[row["me"]][row["other"]] = node_from_bytes(bytes(raw)) if ok else None
        for peer_id in peers:
            local = self._locals.get(peer_id)
            if local is None:
                continue
            self.syncs += 1
            updates = diff_peers(local.sent, desired[peer_id], reasons.get(peer_id, REASON_NODE_UPDATE))
            for chunk in _chunks(updates, INIT_BATCH_SIZE):
                if local.removed:
                    break
                self._deliver(local, Response(peer_updates=tuple(chunk)))

    # ---- notifications ----------------------------------------------------------------------------

    async def _listen(
        self,
        pubsub: PubSub,
        channel: str,
        handler: Any,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with pubsub.subscribe(channel, buffer_size=8192) as subscription:
            task_status.started()
            async for item in subscription:
                handler(item)

    def _on_message(self, item: str | Missed) -> None:
        if isinstance(item, Missed):
            self._mark_all(REASON_NODE_UPDATE)
            return
        try:
            message = decode_message(item)
        except ValueError as exc:
            log.error("tailnet coordinator %s: ignoring %s", self.id, exc)
            return
        if isinstance(message, SyncMessage):
            for peer_id in message.peers:
                self._mark(peer_id, message.reason)
        else:
            self._forward_handshake(message.dst, message.src)

    def _on_heartbeat(self, item: str | Missed) -> None:
        if isinstance(item, Missed):
            return  # the next beats re-establish liveness; _expire errs towards the database
        try:
            coordinator = uuid.UUID(item)
        except ValueError:
            log.error("tailnet coordinator %s: ignoring heartbeat %r", self.id, item[:80])
            return
        if coordinator == self.id:
            return
        known = coordinator in self._last_seen
        self._last_seen[coordinator] = trio.current_time()
        if not known:
            log.info("tailnet coordinator %s: coordinator %s is alive", self.id, coordinator)
            # Its peers may have been reported lost while it was silent: re-read everything.
            self._mark_all(REASON_NODE_UPDATE)

    # ---- heartbeats -------------------------------------------------------------------------------

    async def _beat(self) -> None:
        await self.db.execute(_BEAT, {"me": self.id, "channel": HEARTBEAT_CHANNEL})

    async def _reload_coordinators(self) -> None:
        now = trio.current_time()
        for row in await self.db.fetchall(_LIVE_COORDINATORS, [self.expiry]):
            if row["id"] != self.id:
                self._last_seen.setdefault(row["id"], now)

    async def _heartbeats(self) -> None:
        failures = 0
        while True:
            await trio.sleep(self.heartbeat_interval)
            try:
                await self._beat()
            except StoreError as exc:
                failures += 1
                log.error("tailnet coordinator %s: heartbeat failed (%d): %s", self.id, failures, exc)
                if failures >= self.missed_heartbeats and self._healthy:
                    # Others now consider us dead: send our peers elsewhere.
                    self._healthy = False
                    log.error("tailnet coordinator %s is unhealthy; closing its connections", self.id)
                    for local in list(self._locals.values()):
                        self._try_send(local, Response(error=ERROR_UNHEALTHY))
                        self._remove(local)
                continue
            if not self._healthy:
                log.info("tailnet coordinator %s is healthy again", self.id)
            failures = 0
            self._healthy = True

    async def _expire(self) -> None:
        """Drop coordinators not heard from for ``expiry`` seconds; re-sync every local peer then."""
        while True:
            now = trio.current_time()
            expired = [c for c, seen in self._last_seen.items() if now - seen >= self.expiry]
            for coordinator in expired:
                del self._last_seen[coordinator]
                log.warning(
                    "tailnet coordinator %s: coordinator %s missed %d heartbeats; its peers are lost",
                    self.id,
                    coordinator,
                    self.missed_heartbeats,
                )
            if expired:
                self._mark_all(REASON_LOST)
            deadline = min((seen + self.expiry for seen in self._last_seen.values()), default=math.inf)
            await trio.sleep_until(min(deadline, now + self.heartbeat_interval))

    async def _refresh(self) -> None:
        """Safety net: re-sync every local peer now and then; delete long-dead rows."""
        next_cleanup = trio.current_time()
        while True:
            await trio.sleep(self.refresh_interval)
            self._mark_all(REASON_NODE_UPDATE)
            if trio.current_time() >= next_cleanup:
                next_cleanup = trio.current_time() + CLEANUP_INTERVAL
                try:
                    await self.db.fetchone(_CLEANUP, {"age": RETENTION_SECONDS})
                except StoreError as exc:
                    log.warning("tailnet coordinator %s: cleanup failed: %s", self.id, exc)


@attrs.define(eq=False)
class PgPeerHandle:
    """One peer's side of the PostgreSQL coordinator (same surface as ``trio_coordinator.PeerHandle``)."""

    coordinator: PgCoordinator
    local: _Local
    receive_channel: trio.MemoryReceiveChannel[Response]

    @property
    def peer_id(self) -> uuid.UUID:
        return self.local.ref.id

    @property
    def ref(self) -> PeerRef:
        return self.local.ref

    @property
    def active(self) -> bool:
        """False once this connection was removed or replaced."""
        return not self.local.removed

    async def send(self, request: Request) -> bool:
        """Apply ``request``; waits while this connection has many unwritten requests. False when removed."""
        await trio.lowlevel.checkpoint()
        if self.local.removed:
            return False
        await self.coordinator._apply(self.local, request)
        return True

    def disconnect(self) -> None:
        """Leave gracefully: tunnel peers are told DISCONNECTED and the response queue ends."""
        if not self.local.removed:
            self.coordinator._remove(self.local)
            self.coordinator._enqueue(self.local, "disconnect", reason=REASON_GRACEFUL_DISCONNECT)

    def close(self, error: str = "") -> None:
        """The request side ended without ``disconnect``: LOST (``error``, if any, is queued first)."""
        if self.local.removed or not self.coordinator.running:
            return
        if error:
            self.coordinator._fail(self.local, error)
        else:
            self.coordinator._remove(self.local)
            self.coordinator._enqueue(self.local, "lost", reason=REASON_LOST)

    async def receive(self) -> Response:
        """The next response; raises ``trio.EndOfChannel`` once the coordinator closed this queue."""
        return await self.receive_channel.receive()

    def __aiter__(self) -> PgPeerHandle:
        return self

    async def __anext__(self) -> Response:
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
