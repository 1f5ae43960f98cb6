"""Boundary between ``tailnet_pb2`` messages and the coordinator core's attrs values.

Conversion never fails: ids stay raw bytes until the core validates them, so a malformed id
becomes the coordinator's error message rather than an exception here.
"""

from __future__ import annotations

import uuid

from agentd.proto import tailnet_pb2
from agentd.tailnet.coordinator import Kind, Node, PeerUpdate, Request, Response, Timestamp

_PBKind = tailnet_pb2.CoordinateResponse.PeerUpdate.Kind


def node_from_proto(message: tailnet_pb2.Node) -> Node:
    as_of = Timestamp(message.as_of.seconds, message.as_of.nanos) if message.HasField("as_of") else None
    return Node(
        id=message.id,
        as_of=as_of,
        key=bytes(message.key),
        disco=message.disco,
        preferred_derp=message.preferred_derp,
        derp_latency=dict(message.derp_latency),
        derp_forced_websocket=dict(message.derp_forced_websocket),
        addresses=tuple(message.addresses),
        allowed_ips=tuple(message.allowed_ips),
        endpoints=tuple(message.endpoints),
    )


def node_to_proto(node: Node) -> tailnet_pb2.Node:
    message = tailnet_pb2.Node(
        id=node.id,
        key=node.key,
        disco=node.disco,
        preferred_derp=node.preferred_derp,
        derp_latency=dict(node.derp_latency),
        derp_forced_websocket=dict(node.derp_forced_websocket),
        addresses=node.addresses,
        allowed_ips=node.allowed_ips,
        endpoints=node.endpoints,
    )
    if node.as_of is not None:
        message.as_of.seconds = node.as_of.seconds
        message.as_of.nanos = node.as_of.nanos
    return message


def request_from_proto(message: tailnet_pb2.CoordinateRequest) -> Request:
    """A ``CoordinateRequest`` as the core's ``Request`` (sub-messages present ⇔ set in Go)."""
    return Request(
        # A present update_self without a node is Go's nil node: treat it as an empty node.
        update_self=node_from_proto(message.update_self.node) if message.HasField("update_self") else None,
        disconnect=message.HasField("disconnect"),
        add_tunnel=bytes(message.add_tunnel.id) if message.HasField("add_tunnel") else None,
        remove_tunnel=bytes(message.remove_tunnel.id) if message.HasField("remove_tunnel") else None,
        ready_for_handshake=tuple(bytes(r.id) for r in message.ready_for_handshake),
    )


def request_to_proto(request: Request) -> tailnet_pb2.CoordinateRequest:
    message = tailnet_pb2.CoordinateRequest()
    if request.update_self is not None:
        message.update_self.node.CopyFrom(node_to_proto(request.update_self))
    if request.disconnect:
        message.disconnect.SetInParent()
    if request.add_tunnel is not None:
        message.add_tunnel.id = request.add_tunnel
    if request.remove_tunnel is not None:
        message.remove_tunnel.id = request.remove_tunnel
    for raw in request.ready_for_handshake:
        message.ready_for_handshake.add(id=raw)
    return message


def response_to_proto(response: Response) -> tailnet_pb2.CoordinateResponse:
    message = tailnet_pb2.CoordinateResponse(error=response.error)
    for update in response.peer_updates:
        pb = message.peer_updates.add(
            id=update.id.bytes, kind=_PBKind.Value(update.kind.name), reason=update.reason
        )
        if update.node is not None:
            pb.node.CopyFrom(node_to_proto(update.node))
    return message


def response_from_proto(message: tailnet_pb2.CoordinateResponse) -> Response:
    """For clients and tests: the wire response back as core values (ids must be 16 bytes)."""
    updates = tuple(
        PeerUpdate(
            id=uuid.UUID(bytes=bytes(pb.id)),
            kind=Kind(pb.kind),
            node=node_from_proto(pb.node) if pb.HasField("node") else None,
            reason=pb.reason,
        )
        for pb in message.peer_updates
    )
    return Response(peer_updates=updates, error=message.error)
