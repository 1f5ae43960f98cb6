"""Protobuf messages of Coder's agent protocol (coder.agent.v2, coder.tailnet.v2).

``agent_pb2`` and ``tailnet_pb2`` are generated from the .proto sources beside them by
``python scripts/gen_proto.py`` and committed. This module adds the two service descriptors and
the DRPC path of a method, which the RPC registry and the client stubs are built from.
"""

from __future__ import annotations

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from agentd.proto import agent_pb2, tailnet_pb2

__all__ = ["AGENT_SERVICE", "TAILNET_SERVICE", "agent_pb2", "rpc_path", "tailnet_pb2"]

AGENT_SERVICE: ServiceDescriptor = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
"""``coder.agent.v2.Agent``: the 19 RPCs of agent API 2.10."""

TAILNET_SERVICE: ServiceDescriptor = tailnet_pb2.DESCRIPTOR.services_by_name["Tailnet"]
"""``coder.tailnet.v2.Tailnet``: the 5 tailnet RPCs served on the same connection."""


def rpc_path(method: MethodDescriptor) -> str:
    """The DRPC/gRPC path of a method, e.g. ``/coder.agent.v2.Agent/GetManifest``."""
    return f"/{method.containing_service.full_name}/{method.name}"
