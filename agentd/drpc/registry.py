"""RPC method table (derived from proto service descriptors) and per-connection handler registry.

The method table — path → request type, response type, call shape — is computed once per set of
services and cached; a :class:`Registry` is a cheap per-connection mapping from path to handler
bound to that connection's service objects.  ``Registry.build`` refuses to start when some RPC of
the served services has neither a handler nor an explicit "unimplemented" entry.
"""

from __future__ import annotations

import enum
import functools
import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

__all__ = [
    "CallShape",
    "Handler",
    "Registry",
    "RegistryError",
    "RpcMethod",
    "ServerStream",
    "default_services",
    "method_table",
]


class CallShape(enum.Enum):
    UNARY = "unary"
    SERVER_STREAM = "server_stream"
    CLIENT_STREAM = "client_stream"
    BIDI = "bidi"

    @classmethod
    def of(cls, method: MethodDescriptor) -> CallShape:
        if method.client_streaming:
            return cls.BIDI if method.server_streaming else cls.CLIENT_STREAM
        return cls.SERVER_STREAM if method.server_streaming else cls.UNARY


@attrs.frozen(slots=True)
class RpcMethod:
    """One RPC as the wire names it (``/coder.agent.v2.Agent/GetManifest``)."""

    path: str
    service: str
    name: str
    request_type: type[Message]
    response_type: type[Message]
    shape: CallShape


class ServerStream(Protocol):
    """What streaming handlers get: ``await stream.send(msg)``; ``async for msg in stream``."""

    async def send(self, message: Message) -> None: ...

    async def receive(self) -> Any:
        """The next request message; raises trio.EndOfChannel after the client's CloseSend."""

    def __aiter__(self) -> AsyncIterator[Any]: ...


#: unary ``(req) -> resp``; server-stream ``(req, stream) -> None``; client-stream ``(stream) -> resp``;
#: bidi ``(stream) -> None``.
Handler = Callable[..., Awaitable[Any]]


class RegistryError(Exception):
    """A registry does not cover the served services exactly."""


def default_services() -> tuple[ServiceDescriptor, ...]:
    """coder.agent.v2.Agent and coder.tailnet.v2.Tailnet, the services agentd serves."""
    # Imported by name so this layer does not type-check against the generated stubs.
    agent = importlib.import_module("agentd.proto.agent_pb2")
    tailnet = importlib.import_module("agentd.proto.tailnet_pb2")
    return (
        agent.DESCRIPTOR.services_by_name["Agent"],
        tailnet.DESCRIPTOR.services_by_name["Tailnet"],
    )


@functools.cache
def method_table(services: tuple[ServiceDescriptor, ...] | None = None) -> Mapping[str, RpcMethod]:
    """Path → :class:`RpcMethod` for every method of ``services`` (default: agentd's), cached."""
    if services is None:
        services = default_services()
    table: dict[str, RpcMethod] = {}
    for service in services:
        for m in service.methods:
            path = f"/{service.full_name}/{m.name}"
            table[path] = RpcMethod(
                path=path,
                service=service.full_name,
                name=m.name,
                request_type=GetMessageClass(m.input_type),
                response_type=GetMessageClass(m.output_type),
                shape=CallShape.of(m),
            )
    return table


@attrs.frozen(slots=True)
class Registry:
    """Per-connection routing: path → (method, handler or None for "unimplemented")."""

    routes: Mapping[str, tuple[RpcMethod, Handler | None]]

    @classmethod
    def build(
        cls,
        handlers: Mapping[str, Handler],
        unimplemented: Iterable[str] = (),
        *,
        services: Iterable[ServiceDescriptor] | None = None,
    ) -> Registry:
        """Bind handlers; raise RegistryError on unknown paths, overlaps or uncovered RPCs."""
        table = method_table(None if services is None else tuple(services))
        unimpl = frozenset(unimplemented)
        unknown = sorted((set(handlers) | unimpl) - set(table))
        if unknown:
            raise RegistryError(f"not an RPC of the served services: {', '.join(unknown)}")
        both = sorted(set(handlers) & unimpl)
        if both:
            raise RegistryError(f"both handled and unimplemented: {', '.join(both)}")
        missing = sorted(set(table) - set(handlers) - unimpl)
        if missing:
            raise RegistryError(f"no handler and not unimplemented: {', '.join(missing)}")
        routes = {path: (method, handlers.get(path)) for path, method in table.items()}
        return cls(routes)

    def lookup(self, path: str) -> tuple[RpcMethod, Handler | None] | None:
        """The method and its handler (None: unimplemented), or None for an unknown path."""
        return self.routes.get(path)
