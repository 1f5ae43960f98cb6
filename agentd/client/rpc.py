"""Agent-side DRPC client over a mux session: one new mux stream per call, like Coder's Go transport.

Every call opens a fresh mux stream (so the DRPC stream id is always 1), writes Invoke + Message +
CloseSend in one write for unary calls, keeps the mux write side open until the server's terminal
packet arrived, answers like Go's client (a Close if the server's CloseSend was not seen yet) and
then FINs.  A cancelled call just closes its mux stream (FIN) — Go's default, non-soft cancel —
which the server reads as "cancel the RPC".

Typed stubs are generated at runtime from the service descriptors: ``client.agent.GetManifest(req)``
for unary calls, ``client.tailnet.StreamDERPMaps(req)`` (async iterator / async context manager)
for server streams, ``client.tailnet.Coordinate()`` (send/receive/close_send/aclose) for bidi.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import trio
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from agentd.drpc.errors import RpcError
from agentd.drpc.registry import CallShape, RpcMethod, method_table
from agentd.drpc.stream import (
    DrpcConnection,
    Event,
    MessageReceived,
    RecvClosed,
    RemoteCancelled,
    RemoteClosed,
    RemoteError,
    Role,
)
from agentd.drpc.wire import MAX_PACKET_SIZE, DrpcProtocolError

if TYPE_CHECKING:
    from agentd.client.stubs import AgentStub, TailnetStub

__all__ = [
    "BidiCall",
    "ClientStreamCall",
    "RpcClient",
    "RpcConn",
    "ServerStreamCall",
    "StreamOpener",
]

ReqT = TypeVar("ReqT", bound=Message)
RespT = TypeVar("RespT", bound=Message)


class StreamOpener(Protocol):
    """What :class:`RpcClient` needs from a mux session (agentd.mux.MuxSession fits)."""

    async def open_stream(self) -> trio.abc.HalfCloseableStream: ...


class _Link:
    """One transport + its client-side DRPC :class:`DrpcConnection` + events not yet consumed."""

    __slots__ = ("conn", "events", "idle", "transport", "writing")

    def __init__(self, transport: trio.abc.HalfCloseableStream, max_packet_size: int) -> None:
        self.transport = transport
        self.conn = DrpcConnection(Role.CLIENT, max_packet_size=max_packet_size)
        self.events: deque[Event] = deque()
        self.writing = False
        self.idle: trio.Event | None = None

    async def flush(self) -> None:
        """Write everything queued as one transport write (one writer at a time, in order)."""
        while self.writing:
            if self.idle is None:
                self.idle = trio.Event()  # only on contention (bidi calls sending from two tasks)
            await self.idle.wait()
        data = self.conn.data_to_send()
        if not data:
            await trio.lowlevel.checkpoint()
            return
        self.writing = True
        try:
            await self.transport.send_all(data)
        finally:
            self.writing = False
            if self.idle is not None:
                self.idle.set()
                self.idle = None

    async def next_event(self) -> Event:
        """The next event of the active RPC; BrokenResourceError if the transport ends first."""
        events = self.events
        while not events:
            data = await self.transport.receive_some()
            if not data:
                raise trio.BrokenResourceError("the server closed the stream before the RPC ended")
            try:
                events.extend(self.conn.receive_data(data))
            except DrpcProtocolError as exc:
                raise trio.BrokenResourceError(f"drpc protocol error: {exc}") from exc
        return events.popleft()


def _decode(type_: type[RespT], data: bytes, path: str) -> RespT:
    msg = type_()
    if not data:
        return msg
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise RpcError(f"{path}: invalid {type_.__name__} from server: {exc}") from None
    return msg


def _check_request(method: RpcMethod, request: Message | None) -> Message:
    if request is None:
        return method.request_type()
    if not isinstance(request, method.request_type):
        raise TypeError(f"{method.path} takes {method.request_type.__name__}, not {type(request).__name__}")
    return request


async def _unary(link: _Link, method: RpcMethod, request: Message) -> Message:
    """One unary RPC on ``link``; leaves the RPC terminated (Close sent if needed)."""
    conn = link.conn
    conn.invoke(method.path)
    conn.send_message(request.SerializeToString())
    conn.close_send()
    await link.flush()
    while True:
        ev = await link.next_event()
        if type(ev) is MessageReceived:
            response = _decode(method.response_type, ev.data, method.path)
            # Whatever arrived with it (usually the server's CloseSend) is already applied.
            link.events.clear()
            if conn.close():  # the server's CloseSend not seen yet: Go's deferred Close
                await link.flush()
            return response
        if type(ev) is RemoteError:
            raise RpcError(ev.message, ev.code)
        if type(ev) is RecvClosed or type(ev) is RemoteClosed or type(ev) is RemoteCancelled:
            # Go's Invoke sees io.EOF when the server ends the RPC without a message.
            conn.close()
            await link.flush()
            raise RpcError("EOF")


async def _close_quietly(transport: trio.abc.HalfCloseableStream) -> None:
    try:
        await transport.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class RpcConn:
    """DRPC over one transport, one RPC at a time (Go's drpcconn); stream ids 1, 2, 3, …

    Coder's pattern is :class:`RpcClient` (a new mux stream per call); this is for sequential calls
    on one stream.  ``aclose()`` closes the transport.
    """

    def __init__(
        self,
        transport: trio.abc.HalfCloseableStream,
        *,
        services: Iterable[ServiceDescriptor] | None = None,
        max_packet_size: int = MAX_PACKET_SIZE,
    ) -> None:
        self._link = _Link(transport, max_packet_size)
        self._table = method_table(None if services is None else tuple(services))
        self._lock = trio.Lock()

    async def unary(self, path: str, request: Message | None = None) -> Message:
        method = self._table[path]
        request = _check_request(method, request)
        lock = self._lock
        try:
            lock.acquire_nowait()  # one call at a time (Go's drpcconn); no yield when free
        except trio.WouldBlock:
            await lock.acquire()
        try:
            self._link.events.clear()
            return await _unary(self._link, method, request)
        except BaseException:
            if self._link.conn.active:
                # The transport's state is unknown mid-call: it cannot carry another RPC.
                await trio.aclose_forcefully(self._link.transport)
            raise
        finally:
            lock.release()

    async def aclose(self) -> None:
        await _close_quietly(self._link.transport)


class _StreamCall(Generic[ReqT, RespT]):
    """A streaming RPC on its own mux stream, opened lazily on first use."""

    def __init__(
        self,
        client: RpcClient,
        method: RpcMethod,
        request: Message | None = None,
    ) -> None:
        self._client = client
        self._method = method
        self._request = request
        self._link: _Link | None = None
        self._open_lock = trio.Lock()
        self._closed = False

    async def _ensure(self) -> _Link:
        link = self._link
        if link is not None:
            return link
        if self._closed:
            raise trio.ClosedResourceError("the call was closed")
        async with self._open_lock:
            if self._link is None:
                transport = await self._client._session.open_stream()
                link = _Link(transport, self._client._max_packet_size)
                link.conn.invoke(self._method.path)  # buffered: flushed with the first send
                if self._request is not None:
                    link.conn.send_message(self._request.SerializeToString())
                    link.conn.close_send()
                    await link.flush()
                self._link = link
            return self._link

    async def send(self, message: ReqT) -> None:
        """Send one request message."""
        method = self._method
        if not isinstance(message, method.request_type):
            raise TypeError(
                f"{method.path} takes {method.request_type.__name__}, not {type(message).__name__}"
            )
        link = await self._ensure()
        if not link.conn.active or link.conn.stream is None or link.conn.stream.send_closed:
            raise trio.ClosedResourceError("the RPC's send side is closed")
        link.conn.send_message(message.SerializeToString())
        await link.flush()

    async def close_send(self) -> None:
        """Half-close: no more requests (the server's receive loop ends)."""
        link = await self._ensure()
        if link.conn.close_send():
            await link.flush()
        await self._finish_if_over()

    async def receive(self) -> RespT:
        """The next response; trio.EndOfChannel at the server's end of stream; RpcError on error."""
        link = await self._ensure()
        await link.flush()  # an Invoke still buffered (receive before any send) goes out now
        while True:
            st = link.conn.stream
            if st is not None and st.recv_closed and not link.events:
                await self._finish_if_over()
                raise trio.EndOfChannel
            try:
                ev = await link.next_event()
            except trio.BrokenResourceError:
                await self.aclose()
                raise
            if type(ev) is MessageReceived:
                return cast(RespT, _decode(self._method.response_type, ev.data, self._method.path))
            if type(ev) is RemoteError:
                await self._finish_if_over()
                raise RpcError(ev.message, ev.code)
            if type(ev) is RemoteCancelled:
                await self._finish_if_over()
                raise RpcError("context canceled")
            # RecvClosed / RemoteClosed: loop to report end of stream.

    async def _finish_if_over(self) -> None:
        link = self._link
        if link is not None and not link.conn.active and not self._closed:
            self._closed = True
            await _close_quietly(link.transport)

    async def aclose(self) -> None:
        """End the call: Close if the RPC is still running, then FIN the mux stream.  Idempotent."""
        link = self._link
        if link is None or self._closed:
            self._closed = True
            return
        self._closed = True
        try:
            if link.conn.close():
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await link.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
        finally:
            await _close_quietly(link.transport)

    async def __aenter__(self) -> _StreamCall[ReqT, RespT]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            # Cancelled (or KeyboardInterrupt): Go closes the transport — FIN, no packet.
            self._closed = True
            if self._link is not None:
                await trio.aclose_forcefully(self._link.transport)
            return
        await self.aclose()


class ServerStreamCall(_StreamCall[Message, RespT]):
    """Server-streaming call: ``async with call: async for resp in call: ...``."""

    def __aiter__(self) -> ServerStreamCall[RespT]:
        return self

    async def __anext__(self) -> RespT:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> ServerStreamCall[RespT]:
        return self


class ClientStreamCall(_StreamCall[ReqT, RespT]):
    """Client-streaming call: ``await call.send(req)`` …, then ``await call.close_and_receive()``."""

    async def close_and_receive(self) -> RespT:
        await self.close_send()
        try:
            response = await self.receive()
        except trio.EndOfChannel:
            await self.aclose()
            raise RpcError("EOF") from None
        await self.aclose()
        return response

    async def __aenter__(self) -> ClientStreamCall[ReqT, RespT]:
        return self


class BidiCall(_StreamCall[ReqT, RespT]):
    """Bidirectional call: ``send``, ``receive``, ``close_send``, ``aclose`` (and async with)."""

    def __aiter__(self) -> BidiCall[ReqT, RespT]:
        return self

    async def __anext__(self) -> RespT:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> BidiCall[ReqT, RespT]:
        return self


# ------------------------------------------------------------------------------- generated stubs


def stub_attribute(service: ServiceDescriptor) -> str:
    """Attribute name for a service on :class:`RpcClient`: ``Agent`` → ``agent``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", service.name).lower()


def _make_method(method: RpcMethod) -> Callable[..., Any]:
    shape = method.shape
    if shape is CallShape.UNARY:

        async def unary(self: _ServiceStub, request: Message | None = None) -> Any:
            return await self._client.unary(method.path, request)

        fn: Callable[..., Any] = unary
    elif shape is CallShape.SERVER_STREAM:

        def server_stream(self: _ServiceStub, request: Message | None = None) -> ServerStreamCall[Any]:
            return self._client.server_stream(method.path, request)

        fn = server_stream
    elif shape is CallShape.CLIENT_STREAM:

        def client_stream(self: _ServiceStub) -> ClientStreamCall[Any, Any]:
            return self._client.client_stream(method.path)

        fn = client_stream
    else:

        def bidi(self: _ServiceStub) -> BidiCall[Any, Any]:
            return self._client.bidi(method.path)

        fn = bidi
    fn.__name__ = fn.__qualname__ = method.name
    fn.__doc__ = (
        f"{method.shape.value} RPC {method.path}: "
        f"{method.request_type.__name__} -> {method.response_type.__name__}"
    )
    return fn


class _ServiceStub:
    """Base of the generated per-service stub classes."""

    __slots__ = ("_client",)

    def __init__(self, client: RpcClient) -> None:
        self._client = client


@functools.cache
def _stub_classes(services: tuple[ServiceDescriptor, ...] | None) -> dict[str, type[_ServiceStub]]:
    table = method_table(services)
    by_service: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    for method in table.values():
        by_service.setdefault(method.service, {})[method.name] = _make_method(method)
    if services is None:
        from agentd.drpc.registry import default_services

        services = default_services()
    for service in services:
        names[service.full_name] = stub_attribute(service)
    classes: dict[str, type[_ServiceStub]] = {}
    for full_name, methods in by_service.items():
        cls = type(full_name.rsplit(".", 1)[-1] + "Stub", (_ServiceStub,), {"__slots__": (), **methods})
        classes[names[full_name]] = cls
    return classes


class RpcClient:
    """DRPC client over a mux session.  ``client.<service>.<Method>(...)`` for every RPC.

    Services default to coder.agent.v2.Agent (``client.agent``) and coder.tailnet.v2.Tailnet
    (``client.tailnet``); pass ``services`` for others (attribute = snake_case service name).
    """

    def __init__(
        self,
        session: StreamOpener,
        *,
        services: Iterable[ServiceDescriptor] | None = None,
        max_packet_size: int = MAX_PACKET_SIZE,
    ) -> None:
        self._session = session
        self._max_packet_size = max_packet_size
        key = None if services is None else tuple(services)
        self._table = method_table(key)
        self._stubs = {name: cls(self) for name, cls in _stub_classes(key).items()}

    @property
    def agent(self) -> AgentStub:
        return cast("AgentStub", self._stubs["agent"])

    @property
    def tailnet(self) -> TailnetStub:
        return cast("TailnetStub", self._stubs["tailnet"])

    def __getattr__(self, name: str) -> Any:
        stubs = self.__dict__.get("_stubs", {})
        if name in stubs:
            return stubs[name]
        raise AttributeError(name)

    def _method(self, path: str, shape: CallShape) -> RpcMethod:
        try:
            method = self._table[path]
        except KeyError:
            raise ValueError(f"unknown RPC {path}") from None
        if method.shape is not shape:
            raise TypeError(f"{path} is a {method.shape.value} RPC")
        return method

    async def unary(self, path: str, request: Message | None = None) -> Any:
        """Call unary RPC ``path`` on a new mux stream; RpcError if the server answers with one."""
        method = self._method(path, CallShape.UNARY)
        request = _check_request(method, request)
        transport = await self._session.open_stream()
        link = _Link(transport, self._max_packet_size)
        try:
            response = await _unary(link, method, request)
        except BaseException as exc:
            if isinstance(exc, Exception) and not link.conn.active:
                await _close_quietly(transport)  # an Error reply: the RPC ended cleanly
            else:
                # Cancelled or broken mid-call: close the stream (FIN), which cancels the RPC.
                await trio.aclose_forcefully(transport)
            raise
        await _close_quietly(transport)
        return response

    def server_stream(self, path: str, request: Message | None = None) -> ServerStreamCall[Any]:
        method = self._method(path, CallShape.SERVER_STREAM)
        return ServerStreamCall(self, method, _check_request(method, request))

    def client_stream(self, path: str) -> ClientStreamCall[Any, Any]:
        return ClientStreamCall(self, self._method(path, CallShape.CLIENT_STREAM))

    def bidi(self, path: str) -> BidiCall[Any, Any]:
        return BidiCall(self, self._method(path, CallShape.BIDI))
