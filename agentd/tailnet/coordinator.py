"""Sans-I/O core of the in-memory tailnet coordinator (spec/agent-api.md §8.4).

The coordinator relays WireGuard/disco node state between peers that share a tunnel: a client opens
a tunnel to an agent, each side publishes its node with ``update_self`` and receives the other's.
This module holds only state and rules. Callers feed it plain attrs values (``register``,
``handle_request``, ``lost``, ``delivered``, ``close``) and get back a list of effects: ``Send``
(one ``Response`` to one peer connection) and ``Close`` (that connection's response queue ends).
The trio adapter in ``trio_coordinator`` turns those into memory-channel operations; conversion
from/to ``tailnet_pb2`` lives in ``convert``.

Each connection is a ``PeerRef`` (peer id + connection serial) rather than a bare id, because a
reconnecting agent overwrites its older connection while the older one is still draining.
"""

from __future__ import annotations

import enum
import ipaddress
import uuid
from collections.abc import Iterable, Mapping
from typing import TypeAlias

import attrs

#: Responses queued per peer connection before the receiving peer is dropped (Go ResponseBufferSize).
RESPONSE_BUFFER_SIZE = 512
#: Requests Go buffers per peer (RequestBufferSize); agentd applies requests as they arrive.
REQUEST_BUFFER_SIZE = 32
#: Peer updates per response when a new connection is sent the nodes of its tunnel peers.
INIT_BATCH_SIZE = 1024

TAILSCALE_SERVICE_PREFIX = bytes.fromhex("fd7a115ca1e0")
CODER_SERVICE_PREFIX = bytes.fromhex("fd60627aa42b")
LEGACY_AGENT_ADDRESS = ipaddress.IPv6Address("fd7a:115c:a1e0:49d6:b259:b7ac:b1b2:48f4")

ERROR_OVERWRITTEN = "peer ID overwritten by new connection"
ERROR_COORDINATOR_CLOSED = "coordinator closed"
READY_FOR_HANDSHAKE_ERROR = "ready for handshake error"

REASON_NODE_UPDATE = "node update"
REASON_ADD_TUNNEL = "add tunnel"
REASON_REMOVE_TUNNEL = "remove tunnel"
REASON_GRACEFUL_DISCONNECT = "graceful disconnect"
REASON_LOST = "lost"
REASON_FAILED_UPDATE = "failed update"
REASON_INIT = "init"
REASON_COORDINATOR_CLOSE = "coordinator close"


def service_address(prefix: bytes, peer_id: uuid.UUID) -> ipaddress.IPv6Address:
    """The /128 address of ``peer_id`` under a 6-byte service prefix (Tailscale's or Coder's)."""
    return ipaddress.IPv6Address(prefix + peer_id.bytes[6:])


def agent_addresses(agent_id: uuid.UUID) -> frozenset[ipaddress.IPv6Address]:
    """Every address an agent may advertise for itself."""
    return frozenset(
        {
            service_address(TAILSCALE_SERVICE_PREFIX, agent_id),
            service_address(CODER_SERVICE_PREFIX, agent_id),
            LEGACY_AGENT_ADDRESS,
        }
    )


class AddressError(ValueError):
    """A node address that is not a valid ``addr/bits`` prefix."""


def parse_prefix(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Parse ``addr/bits`` like Go's ``netip.ParsePrefix``: address and prefix length, no zone.

    Addresses are compared as parsed values, never as text: Go prints ``/128`` prefixes with
    leading zeros dropped (``fd7a:115c:a1e0:0:...`` vs ``fd7a:115c:a1e0::...``).
    """
    addr_text, sep, bits_text = text.partition("/")
    if not sep:
        raise AddressError(f"netip.ParsePrefix(\"{text}\"): no '/'")
    if "%" in addr_text:
        raise AddressError(f'netip.ParsePrefix("{text}"): IPv6 zones cannot be present in a prefix')
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError as exc:
        raise AddressError(f'netip.ParsePrefix("{text}"): {exc}') from None
    if not bits_text.isascii() or not bits_text.isdigit() or (len(bits_text) > 1 and bits_text[0] == "0"):
        raise AddressError(f'netip.ParsePrefix("{text}"): bad bits after slash: "{bits_text}"')
    bits = int(bits_text)
    if bits > addr.max_prefixlen:
        raise AddressError(f'netip.ParsePrefix("{text}"): prefix length out of range')
    return addr, bits


# --------------------------------------------------------------------------------------------------
# Values


@attrs.frozen
class Timestamp:
    """``google.protobuf.Timestamp`` as plain numbers (a node's ``as_of``)."""

    seconds: int = 0
    nanos: int = 0


def _sorted_pairs_str_float(
    value: Mapping[str, float] | Iterable[tuple[str, float]],
) -> tuple[tuple[str, float], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), float(v)) for k, v in items))


def _sorted_pairs_int_str(
    value: Mapping[int, str] | Iterable[tuple[int, str]],
) -> tuple[tuple[int, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((int(k), str(v)) for k, v in items))


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class Node:
    """A peer's WireGuard/disco state as published with ``update_self`` (tailnet.v2 ``Node``).

    Maps are kept as sorted pairs so that equal nodes compare equal: the coordinator never resends
    a node identical to the one a peer already has.
    """

    id: int = 0
    as_of: Timestamp | None = None
    key: bytes = b""
    disco: str = ""
    preferred_derp: int = 0
    derp_latency: tuple[tuple[str, float], ...] = attrs.field(default=(), converter=_sorted_pairs_str_float)
    derp_forced_websocket: tuple[tuple[int, str], ...] = attrs.field(
        default=(), converter=_sorted_pairs_int_str
    )
    addresses: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    allowed_ips: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    endpoints: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)


def _raw_id(value: uuid.UUID | bytes) -> bytes:
    return value.bytes if isinstance(value, uuid.UUID) else bytes(value)


def _raw_optional_id(value: uuid.UUID | bytes | None) -> bytes | None:
    return None if value is None else _raw_id(value)


def _raw_ids(value: Iterable[uuid.UUID | bytes]) -> tuple[bytes, ...]:
    return tuple(_raw_id(v) for v in value)


@attrs.frozen
class Request:
    """One ``CoordinateRequest``. Ids stay raw bytes as on the wire; the core validates them."""

    update_self: Node | None = None
    disconnect: bool = False
    add_tunnel: bytes | None = attrs.field(default=None, converter=_raw_optional_id)
    remove_tunnel: bytes | None = attrs.field(default=None, converter=_raw_optional_id)
    ready_for_handshake: tuple[bytes, ...] = attrs.field(default=(), converter=_raw_ids)


class Kind(enum.IntEnum):
    """``CoordinateResponse.PeerUpdate.Kind``."""

    KIND_UNSPECIFIED = 0
    NODE = 1
    DISCONNECTED = 2
    LOST = 3
    READY_FOR_HANDSHAKE = 4


@attrs.frozen
class PeerUpdate:
    id: uuid.UUID
    kind: Kind
    node: Node | None = None
    reason: str = ""


@attrs.frozen
class Response:
    """One ``CoordinateResponse``: a batch of peer updates, or an error message (never fatal by itself)."""

    peer_updates: tuple[PeerUpdate, ...] = ()
    error: str = ""


# --------------------------------------------------------------------------------------------------
# Authorisation


def _id_set(value: Iterable[uuid.UUID]) -> frozenset[uuid.UUID]:
    return frozenset(value)


@attrs.frozen
class AgentAuth:
    """An agent coordinating as itself: no tunnels, only its own addresses."""

    agent_id: uuid.UUID


@attrs.frozen
class ClientAuth:
    """A client that may open tunnels to the given agents; /128 addresses; no ready_for_handshake."""

    agent_ids: frozenset[uuid.UUID] = attrs.field(converter=_id_set)


@attrs.frozen
class TrustedAuth:
    """A trusted in-process peer (the single-tailnet role of coderd): everything is allowed."""


Auth: TypeAlias = AgentAuth | ClientAuth | TrustedAuth


def _check_addresses(node: Node, allowed: frozenset[ipaddress.IPv6Address] | None) -> str | None:
    for text in node.addresses + node.allowed_ips:
        try:
            addr, bits = parse_prefix(text)
        except AddressError as exc:
            return f"parse node address: {exc}"
        if bits != 128:
            return f"invalid address bits, expected 128, got {bits}"
        if allowed is not None and addr not in allowed:
            return f"invalid node address, got {addr}"
    return None


def authorize(auth: Auth, request: Request) -> str | None:
    """The reason ``request`` is not allowed for a peer with ``auth``, or None when it is."""
    if isinstance(auth, TrustedAuth):
        return None
    if isinstance(auth, AgentAuth):
        if request.add_tunnel is not None:
            return "agents cannot open tunnels"
        if request.update_self is not None:
            return _check_addresses(request.update_self, agent_addresses(auth.agent_id))
        return None
    if request.add_tunnel is not None:
        if len(request.add_tunnel) != 16:
            return f"parse add tunnel id: invalid UUID (got {len(request.add_tunnel)} bytes)"
        dst = uuid.UUID(bytes=request.add_tunnel)
        if dst not in auth.agent_ids:
            if len(auth.agent_ids) == 1:
                (expected,) = auth.agent_ids
                return f"invalid agent id, expected {expected}, got {dst}"
            return "workspace agent not found or you do not have permission"
    if request.update_self is not None:
        problem = _check_addresses(request.update_self, None)
        if problem is not None:
            return problem
    if request.ready_for_handshake:
        return "clients may not send ready_for_handshake"
    return None


# --------------------------------------------------------------------------------------------------
# Effects


@attrs.frozen
class PeerRef:
    """One coordinate connection of a peer: the peer id plus a serial unique within the core."""

    id: uuid.UUID
    serial: int


@attrs.frozen
class Send:
    """Queue ``response`` on the connection ``peer``."""

    peer: PeerRef
    response: Response


@attrs.frozen
class Close:
    """The connection ``peer`` gets nothing more: its queue ends after what was already sent."""

    peer: PeerRef


Effect: TypeAlias = Send | Close


class CoordinatorClosedError(Exception):
    """``register`` on a closed coordinator."""


# --------------------------------------------------------------------------------------------------
# State


@attrs.define
class _Peer:
    ref: PeerRef
    name: str
    auth: Auth
    node: Node | None = None
    #: what this connection was last told about each other peer (per-destination dedupe)
    sent: dict[uuid.UUID, Node] = attrs.Factory(dict)
    #: responses handed out but not yet delivered by the I/O layer
    queued: int = 0


@attrs.define
class TunnelStore:
    """Tunnels as src→dst pairs, indexed both ways."""

    by_src: dict[uuid.UUID, dict[uuid.UUID, None]] = attrs.Factory(dict)
    by_dst: dict[uuid.UUID, dict[uuid.UUID, None]] = attrs.Factory(dict)

    def add(self, src: uuid.UUID, dst: uuid.UUID) -> None:
        self.by_src.setdefault(src, {})[dst] = None
        self.by_dst.setdefault(dst, {})[src] = None

    def remove(self, src: uuid.UUID, dst: uuid.UUID) -> None:
        dsts = self.by_src.get(src)
        if dsts is not None:
            dsts.pop(dst, None)
            if not dsts:
                del self.by_src[src]
        srcs = self.by_dst.get(dst)
        if srcs is not None:
            srcs.pop(src, None)
            if not srcs:
                del self.by_dst[dst]

    def remove_all_from(self, src: uuid.UUID) -> None:
        for dst in list(self.by_src.get(src, ())):
            self.remove(src, dst)

    def peers_of(self, peer_id: uuid.UUID) -> list[uuid.UUID]:
        """Every peer sharing a tunnel with ``peer_id``, in either direction, each once."""
        out = dict.fromkeys(self.by_src.get(peer_id, ()))
        out.update(dict.fromkeys(self.by_dst.get(peer_id, ())))
        return list(out)

    def exists(self, a: uuid.UUID, b: uuid.UUID) -> bool:
        return b in self.by_src.get(a, ()) or a in self.by_src.get(b, ())

    def pairs(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        return [(src, dst) for src, dsts in self.by_src.items() for dst in dsts]


class _WouldBlock(Exception):
    """A response could not be queued: the receiving connection's queue is full."""


class _RequestError(Exception):
    """A request that ends the sender's coordination (Go: the request loop returns an error)."""


@attrs.define
class CoordinatorCore:
    """In-memory coordinator state machine. Every public method returns the effects to apply, in order."""

    response_buffer: int = RESPONSE_BUFFER_SIZE
    init_batch: int = INIT_BATCH_SIZE
    _peers: dict[uuid.UUID, _Peer] = attrs.field(factory=dict, init=False)
    _tunnels: TunnelStore = attrs.field(factory=TunnelStore, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _next_serial: int = attrs.field(default=1, init=False)
    _effects: list[Effect] = attrs.field(factory=list, init=False)

    # ---- inspection -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def is_current(self, ref: PeerRef) -> bool:
        """True while ``ref`` is the registered connection of its peer id."""
        peer = self._peers.get(ref.id)
        return peer is not None and peer.ref == ref

    def peer_ids(self) -> list[uuid.UUID]:
        return list(self._peers)

    def node(self, peer_id: uuid.UUID) -> Node | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.node

    def name(self, peer_id: uuid.UUID) -> str | None:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.name

    def tunnels(self) -> list[tuple[uuid.UUID, uuid.UUID]]:
        return self._tunnels.pairs()

    def queued(self, ref: PeerRef) -> int:
        peer = self._peers.get(ref.id)
        return peer.queued if peer is not None and peer.ref == ref else 0

    # ---- inputs -----------------------------------------------------------------------------------

    def register(self, peer_id: uuid.UUID, name: str, auth: Auth) -> tuple[PeerRef, list[Effect]]:
        """A new coordinate connection for ``peer_id``; an older one for the same id is overwritten.

        The new connection is sent the current nodes of every peer it shares a tunnel with (tunnels
        outlive connections: a client's tunnel to an agent survives the agent reconnecting).
        """
        if self._closed:
            raise CoordinatorClosedError("coordinator is closed")
        ref = PeerRef(peer_id, self._next_serial)
        self._next_serial += 1
        old = self._peers.get(peer_id)
        if old is not None:
            self._try_send(old, Response(error=ERROR_OVERWRITTEN))
            self._effects.append(Close(old.ref))
        peer = _Peer(ref=ref, name=name, auth=auth)
        self._peers[peer_id] = peer
        others = [self._peers[i] for i in self._tunnels.peers_of(peer_id) if i in self._peers]
        try:
            self._batch_update(peer, others, Kind.NODE, REASON_INIT)
        except _WouldBlock:
            self._remove_peer(peer_id, Kind.DISCONNECTED, REASON_FAILED_UPDATE)
        return ref, self._take()

    def handle_request(self, ref: PeerRef, request: Request) -> list[Effect]:
        """Apply one request from connection ``ref``. Requests of a replaced/removed connection are ignored.

        A request that is not authorised (or carries a malformed id) ends the connection: the error
        text is queued to it, then it is removed as LOST. A ``ready_for_handshake`` for a peer it
        shares no tunnel with only earns an error message.
        """
        if self._closed or not self.is_current(ref):
            return []
        peer = self._peers[ref.id]
        try:
            self._apply_request(peer, request)
        except _RequestError as exc:
            self._fail(peer, str(exc))
        return self._take()

    def lost(self, ref: PeerRef, error: str = "") -> list[Effect]:
        """Connection ``ref`` ended without ``disconnect``; ``error`` (if any) is queued to it first."""
        if self._closed or not self.is_current(ref):
            return []
        peer = self._peers[ref.id]
        if error:
            self._fail(peer, error)
        else:
            self._remove_peer(ref.id, Kind.LOST, REASON_LOST)
        return self._take()

    def delivered(self, ref: PeerRef, count: int = 1) -> None:
        """The I/O layer took ``count`` responses of ``ref`` off its queue, making room."""
        peer = self._peers.get(ref.id)
        if peer is not None and peer.ref == ref:
            peer.queued = max(0, peer.queued - count)

    def close(self) -> list[Effect]:
        """Shut down: every connection gets ``coordinator closed`` and its queue ends.

        Tunnel peers are told LOST (not DISCONNECTED) so established connections are not torn down.
        """
        if self._closed:
            return []
        self._closed = True
        for peer_id in list(self._peers):
            peer = self._peers.get(peer_id)
            if peer is None:
                continue
            self._try_send(peer, Response(error=ERROR_COORDINATOR_CLOSED))
            self._remove_peer(peer_id, Kind.LOST, REASON_COORDINATOR_CLOSE)
        return self._take()

    # ---- rules ------------------------------------------------------------------------------------

    def _take(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    def _apply_request(self, peer: _Peer, request: Request) -> None:
        problem = authorize(peer.auth, request)
        if problem is not None:
            raise _RequestError(f"authorize request: {problem}")
        if request.update_self is not None:
            peer.node = request.update_self
            self._update_tunnel_peers(peer.ref.id, request.update_self, Kind.NODE, REASON_NODE_UPDATE)
        if request.add_tunnel is not None:
            dst = _parse_id(request.add_tunnel, "add tunnel")
            if not self._add_tunnel(peer, dst):
                return
        if request.remove_tunnel is not None:
            dst = _parse_id(request.remove_tunnel, "remove tunnel")
            if not self._remove_tunnel(peer, dst):
                return
        if request.disconnect:
            self._remove_peer(peer.ref.id, Kind.DISCONNECTED, REASON_GRACEFUL_DISCONNECT)
            return
        if request.ready_for_handshake:
            self._ready_for_handshake(peer, request.ready_for_handshake)

    def _fail(self, peer: _Peer, error: str) -> None:
        self._try_send(peer, Response(error=error))
        self._remove_peer(peer.ref.id, Kind.LOST, REASON_LOST)

    def _add_tunnel(self, src: _Peer, dst_id: uuid.UUID) -> bool:
        """Record src→dst and exchange nodes; False when src itself had to be dropped."""
        self._tunnels.add(src.ref.id, dst_id)
        dst = self._peers.get(dst_id)
        if dst is None:
            return True
        if dst.node is not None:
            try:
                self._update_mapping(src, dst_id, dst.node, Kind.NODE, REASON_ADD_TUNNEL)
            except _WouldBlock:
                self._remove_peer(src.ref.id, Kind.DISCONNECTED, REASON_FAILED_UPDATE)
                return False
        if src.node is not None:
            try:
                self._update_mapping(dst, src.ref.id, src.node, Kind.NODE, REASON_ADD_TUNNEL)
            except _WouldBlock:
                self._remove_peer(dst_id, Kind.DISCONNECTED, REASON_FAILED_UPDATE)
        return True

    def _remove_tunnel(self, src: _Peer, dst_id: uuid.UUID) -> bool:
        """Tell both ends DISCONNECTED and forget src→dst; False when src itself had to be dropped."""
        try:
            self._update_mapping(src, dst_id, None, Kind.DISCONNECTED, REASON_REMOVE_TUNNEL)
        except _WouldBlock:
            self._remove_peer(src.ref.id, Kind.DISCONNECTED, REASON_FAILED_UPDATE)
            return False
        dst = self._peers.get(dst_id)
        if dst is not None:
            try:
                self._update_mapping(dst, src.ref.id, None, Kind.DISCONNECTED, REASON_REMOVE_TUNNEL)
            except _WouldBlock:
                self._remove_peer(dst_id, Kind.DISCONNECTED, REASON_FAILED_UPDATE)
        self._tunnels.remove(src.ref.id, dst_id)
        return True

    def _ready_for_handshake(self, src: _Peer, ids: tuple[bytes, ...]) -> None:
        for raw in ids:
            dst_id = _parse_id(raw, "ready for handshake")
            if not self._tunnels.exists(src.ref.id, dst_id):
                # Racy by nature (the client may have just gone), so only an error message.
                message = f'{READY_FOR_HANDSHAKE_ERROR}: you do not share a tunnel with "{dst_id}"'
                if not self._try_send(src, Response(error=message)):
                    raise _RequestError(f"handle ready for handshake: {_WOULD_BLOCK}")
                continue
            dst = self._peers.get(dst_id)
            if dst is None:
                continue
            update = PeerUpdate(id=src.ref.id, kind=Kind.READY_FOR_HANDSHAKE)
            if not self._try_send(dst, Response(peer_updates=(update,))):
                raise _RequestError(f"handle ready for handshake: {_WOULD_BLOCK}")

    def _update_tunnel_peers(self, peer_id: uuid.UUID, node: Node | None, kind: Kind, reason: str) -> None:
        for other_id in self._tunnels.peers_of(peer_id):
            other = self._peers.get(other_id)
            if other is None:
                continue
            try:
                self._update_mapping(other, peer_id, node, kind, reason)
            except _WouldBlock:
                self._remove_peer(other_id, Kind.DISCONNECTED, REASON_FAILED_UPDATE)

    def _remove_peer(self, peer_id: uuid.UUID, kind: Kind, reason: str) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        self._update_tunnel_peers(peer_id, None, kind, reason)
        self._tunnels.remove_all_from(peer_id)
        # The peer may have been replaced while its tunnel peers were being told.
        if self._peers.get(peer_id) is peer:
            del self._peers[peer_id]
            self._effects.append(Close(peer.ref))

    def _store_mapping(
        self, to: _Peer, about: uuid.UUID, node: Node | None, kind: Kind, reason: str
    ) -> PeerUpdate | None:
        """Per-destination dedupe: the update to send ``to`` about ``about``, or None to send nothing."""
        previous = to.sent.get(about)
        if kind in (Kind.LOST, Kind.DISCONNECTED):
            if about not in to.sent:
                return None  # never announced, nothing to retract
            del to.sent[about]
        elif kind == Kind.NODE:
            assert node is not None
            if previous is not None and previous == node:
                return None
            to.sent[about] = node
        return PeerUpdate(id=about, kind=kind, node=node, reason=reason)

    def _update_mapping(
        self, to: _Peer, about: uuid.UUID, node: Node | None, kind: Kind, reason: str
    ) -> None:
        update = self._store_mapping(to, about, node, kind, reason)
        if update is None:
            return
        if not self._try_send(to, Response(peer_updates=(update,))):
            raise _WouldBlock()

    def _batch_update(self, to: _Peer, others: list[_Peer], kind: Kind, reason: str) -> None:
        updates: list[PeerUpdate] = []
        for other in others:
            if other.node is None:
                continue
            update = self._store_mapping(to, other.ref.id, other.node, kind, reason)
            if update is not None:
                updates.append(update)
        for start in range(0, len(updates), self.init_batch):
            chunk = tuple(updates[start : start + self.init_batch])
            if not self._try_send(to, Response(peer_updates=chunk)):
                raise _WouldBlock()

    def _try_send(self, to: _Peer, response: Response) -> bool:
        """Queue ``response`` unless ``to``'s queue is full (never blocks, like Go's select/default)."""
        if to.queued >= self.response_buffer:
            return False
        to.queued += 1
        self._effects.append(Send(to.ref, response))
        return True


_WOULD_BLOCK = "would block"


def _parse_id(raw: bytes, what: str) -> uuid.UUID:
    if len(raw) != 16:
        raise _RequestError(
            f"{what} failed: unable to convert bytes to UUID: invalid UUID (got {len(raw)} bytes)"
        )
    return uuid.UUID(bytes=raw)
