"""A tiny test service (built from a descriptor at runtime) and helpers to run client ↔ server."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from agentd.client import RpcClient
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Registry
from agentd.drpc.server import serve_session
from agentd.mux import MuxConfig, MuxSession

_T = descriptor_pb2.FieldDescriptorProto


def _pool_with(
    package: str, service: str, methods: list[tuple[str, str, str, bool, bool]]
) -> ServiceDescriptor:
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{package.replace('.', '/')}/t.proto", package=package)
    fdp.syntax = "proto3"
    for name in ("Req", "Resp"):
        msg = fdp.message_type.add(name=name)
        msg.field.add(name="n", number=1, type=_T.TYPE_INT64, label=_T.LABEL_OPTIONAL)
        msg.field.add(name="blob", number=2, type=_T.TYPE_BYTES, label=_T.LABEL_OPTIONAL)
        msg.field.add(name="text", number=3, type=_T.TYPE_STRING, label=_T.LABEL_OPTIONAL)
    msg = fdp.message_type.add(name="Hi")
    msg.field.add(name="a", number=1, type=_T.TYPE_STRING, label=_T.LABEL_OPTIONAL)
    msg = fdp.message_type.add(name="Empty")
    svc = fdp.service.add(name=service)
    for mname, inp, out, cs, ss in methods:
        svc.method.add(
            name=mname,
            input_type=f".{package}.{inp}",
            output_type=f".{package}.{out}",
            client_streaming=cs,
            server_streaming=ss,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool.FindServiceByName(f"{package}.{service}")


ECHO = _pool_with(
    "test.drpc.v1",
    "Echo",
    [
        ("Unary", "Req", "Resp", False, False),
        ("ServerStream", "Req", "Resp", False, True),
        ("ClientStream", "Req", "Resp", True, False),
        ("Bidi", "Req", "Resp", True, True),
        ("Unimpl", "Req", "Resp", False, False),
    ],
)
Req: Any = GetMessageClass(ECHO.file.message_types_by_name["Req"])
Resp: Any = GetMessageClass(ECHO.file.message_types_by_name["Resp"])

# /x.Y/Z unary: empty request → Hi{a: "hi"} (body 0a 02 68 69), as in the spec transcripts.
XY_UNARY = _pool_with("x", "Y", [("Z", "Empty", "Hi", False, False)])
# /x.Y/Z server-streaming: Req{n} → Resp{n=1}, Resp{n=2}, ... Resp{n=req.n} (transcript T3).
XY_STREAM = _pool_with("x", "Y", [("Z", "Req", "Resp", False, True)])


async def _fail_with(error: RpcError) -> None:
    await trio.lowlevel.checkpoint()
    raise error


class EchoService:
    """Per-connection handlers; records what happened for assertions."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.cancelled_event = trio.Event()
        self.started = trio.Event()
        self.finished_bidi = trio.Event()

    async def unary(self, req: Any) -> Any:
        if req.text == "fail":
            raise RpcError("nope", 42)
        if req.text == "crash":
            raise ValueError("boom")
        if req.text == "fail-in-nursery":
            async with trio.open_nursery() as nursery:  # a handler's task fails with an RpcError
                nursery.start_soon(_fail_with, RpcError("bad request inside", 3))
        if req.text == "echo":
            return Resp(blob=req.blob, text=req.text)
        if req.text == "grow":
            return Resp(blob=req.blob, text="x" * 300)
        if req.text == "wrong-type":
            return Req()
        if req.text == "sleep":
            self.started.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                self.cancelled_event.set()
                raise
        return Resp(n=req.n + 1, blob=req.blob, text=req.text)

    async def server_stream(self, req: Any, stream: Any) -> None:
        for i in range(1, req.n + 1):
            await stream.send(Resp(n=i))
        if req.text == "fail":
            raise RpcError("stream failed", 7)
        if req.text == "sleep":
            self.started.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.cancelled += 1
                self.cancelled_event.set()
                raise

    async def client_stream(self, stream: Any) -> Any:
        total = 0
        count = 0
        async for req in stream:
            total += req.n
            count += 1
        return Resp(n=total, text=str(count))

    async def bidi(self, stream: Any) -> None:
        try:
            async for req in stream:
                if req.text == "close":
                    return
                await stream.send(Resp(n=req.n + 1, text=req.text))
        except trio.Cancelled:
            self.cancelled += 1
            self.cancelled_event.set()
            raise
        finally:
            self.finished_bidi.set()

    def registry(self) -> Registry:
        p = "/test.drpc.v1.Echo/"
        return Registry.build(
            handlers={
                p + "Unary": self.unary,
                p + "ServerStream": self.server_stream,
                p + "ClientStream": self.client_stream,
                p + "Bidi": self.bidi,
            },
            unimplemented={p + "Unimpl"},
            services=[ECHO],
        )


@asynccontextmanager
async def mux_client(
    registry: Registry,
    *,
    services: list[ServiceDescriptor] | None = None,
    transport_pair: Any = None,
    server_config: MuxConfig | None = None,
    log_context: str = "",
) -> AsyncIterator[tuple[RpcClient, MuxSession, MuxSession]]:
    """A MuxSession client ↔ server over a memory stream pair with serve_session on the server."""
    if transport_pair is None:
        transport_pair = trio.testing.memory_stream_pair()
    a, b = transport_pair
    client_session = MuxSession(a, is_client=True)
    server_session = MuxSession(b, is_client=False, config=server_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(client_session.run)
        await nursery.start(server_session.run)
        await nursery.start(
            functools.partial(serve_session, log_context=log_context), server_session, registry
        )
        client = RpcClient(client_session, services=services if services is not None else [ECHO])
        yield client, client_session, server_session
        nursery.cancel_scope.cancel()
