"""trio DRPC server: Go's ``drpcserver.ServeOne`` per transport, and an accept loop per session.

Each transport (one mux stream under Coder) has a sans-I/O :class:`~agentd.drpc.stream.DrpcConnection`
and, at any time, exactly one task reading it.  A handler runs in its own task while a reader keeps
reading, so that the peer's FIN, Close, Cancel or Error cancels it: to keep a task switch off the
reply's path, the reading task runs a unary/server-stream handler itself and hands the read loop to
a new task (client-stream and bidi handlers get a task of their own, as the reader feeds them).
All of them live in one nursery (the session's, or serve_stream's own).  RPCs on one transport are
served one after another until EOF; on EOF the active handler is cancelled and the transport is
closed (FIN) at once, as Go clients wait for that FIN.  A protocol error or an over-limit packet
resets that one mux stream; a handler's exception becomes one Error packet.

Per-session bounds (:class:`ServerLimits`, agentd's own): the bytes a session's streams hold for
requests not yet complete (incomplete frames and partially assembled packets, up to
``max_packet_size`` each) share one :class:`RequestBudget`, and a stream whose read would take the
session past it is reset; a stream must deliver its first complete packet (the Invoke) within
``first_packet_timeout`` of being accepted, else it is reset. Together with the mux's cap on live
streams this bounds what one peer can make the server hold.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Any, Final, Protocol

import attrs
import trio
from google.protobuf.message import DecodeError, Message

from agentd.drpc.errors import UNIMPLEMENTED, UNIMPLEMENTED_TEXT, RpcError, unknown_rpc_text
from agentd.drpc.registry import CallShape, Handler, Registry, RpcMethod
from agentd.drpc.stream import (
    DrpcConnection,
    Event,
    Invoked,
    MessageReceived,
    RecvClosed,
    Role,
    RpcClosedError,
)
from agentd.drpc.wire import MAX_PACKET_SIZE, DrpcProtocolError
from agentd.logfmt import quote

__all__ = ["RequestBudget", "ServerLimits", "StreamAcceptor", "serve_session", "serve_stream"]

log = logging.getLogger("agentd.drpc.server")
_DEBUG: Final = logging.DEBUG

# How an RPC ended, in its debug line ("rpc ... outcome=..."): answered, answered with a DRPC
# error (its code and message follow), or ended early (the peer cancelled or went away, or the
# session ended).
OK: Final = "ok"
ERROR: Final = "error"
CANCELLED: Final = "cancelled"


@attrs.frozen
class ServerLimits:
    """What one session (one agent) may make the server hold."""

    #: bytes held for incomplete requests, all streams of the session together; four packets of
    #: the largest size (Coder's agent sends at most ~1 MiB: log batches)
    request_buffer_budget: int = 16 * 1024 * 1024
    #: seconds from a stream's accept to its first complete packet (Coder's agent sends the Invoke
    #: at once); None: no deadline
    first_packet_timeout: float | None = 10.0
    max_packet_size: int = MAX_PACKET_SIZE


class RequestBudget:
    """One session's account of buffered request bytes (sans-I/O: streams charge and release)."""

    __slots__ = ("limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: the most ever held at once (tests, metrics)
        self.peak = 0

    def recharge(self, old: int, new: int) -> bool:
        """A stream's holding goes from ``old`` to ``new`` bytes; False (nothing changed) if that
        would take the session past its limit."""
        used = self.used - old + new
        if new > old and used > self.limit:
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True


class StreamAcceptor(Protocol):
    """What :func:`serve_session` needs from a mux session."""

    async def accept_stream(self) -> trio.abc.HalfCloseableStream: ...


async def serve_session(
    session: StreamAcceptor,
    registry: Registry,
    *,
    limits: ServerLimits | None = None,
    budget: RequestBudget | None = None,
    log_context: str = "",
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept mux streams until the session closes; serve each in its own task (owned here).
    ``budget`` (default: a fresh one of ``limits.request_buffer_budget``) is shared by its streams.
    ``log_context`` (``key=value`` pairs, e.g. ``agent_id=…``) goes into every line logged about the
    session's streams, among them the debug line of each RPC: name, duration, outcome."""
    limits = limits if limits is not None else ServerLimits()
    if budget is None:
        budget = RequestBudget(limits.request_buffer_budget)
    tag = _tag(log_context)
    async with trio.open_nursery() as nursery:
        task_status.started()
        # held, the status would keep nursery.start's temporary nursery alive (~1 KiB per session)
        del task_status
        while True:
            try:
                stream = await session.accept_stream()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            # Handlers run in this nursery too (saves a nursery per call); each stream's task
            # still waits for its handler before closing the stream.
            nursery.start_soon(_serve_in, stream, registry, nursery, limits, budget, tag)


async def _serve_in(
    transport: trio.abc.HalfCloseableStream,
    registry: Registry,
    nursery: trio.Nursery,
    limits: ServerLimits,
    budget: RequestBudget,
    tag: str,
) -> None:
    timeout = limits.first_packet_timeout
    deadline = None if timeout is None else trio.current_time() + timeout
    await _StreamServer(transport, registry, limits.max_packet_size, budget, deadline, tag).run(nursery)


async def serve_stream(
    transport: trio.abc.HalfCloseableStream,
    registry: Registry,
    *,
    max_packet_size: int = MAX_PACKET_SIZE,
    log_context: str = "",
) -> None:
    """Serve RPCs on one transport until EOF, a transport failure or a protocol error; then close it."""
    server = _StreamServer(transport, registry, max_packet_size, tag=_tag(log_context))
    async with trio.open_nursery() as nursery:
        await server.run(nursery)


class _Call:
    """trio-side state of the active RPC: its handler's cancel scope and request channel."""

    __slots__ = ("awaiting_request", "finished", "handler", "method", "recv", "scope", "send", "stream_id")

    def __init__(self, stream_id: int, method: RpcMethod, handler: Handler) -> None:
        self.stream_id = stream_id
        self.method = method
        self.handler = handler
        self.scope = trio.CancelScope()
        self.finished = False
        # Unary and server-stream handlers start once their single request message arrived.
        self.awaiting_request = method.shape in (CallShape.UNARY, CallShape.SERVER_STREAM)
        self.send: trio.MemorySendChannel[bytes] | None = None
        self.recv: trio.MemoryReceiveChannel[bytes] | None = None
        if not self.awaiting_request:
            # One buffered message, like Go's streambuf: an unread stream pushes back on the peer.
            self.send, self.recv = trio.open_memory_channel[bytes](1)

    def end_requests(self) -> None:
        if self.send is not None:
            self.send.close()

    def abort(self) -> None:
        self.scope.cancel()
        self.end_requests()


class _HandlerStream:
    """The :class:`~agentd.drpc.registry.ServerStream` given to streaming handlers."""

    __slots__ = ("_call", "_server")

    def __init__(self, server: _StreamServer, call: _Call) -> None:
        self._server = server
        self._call = call

    async def send(self, message: Message) -> None:
        """Send one response message (flushed at once, like Go's MsgSend)."""
        method = self._call.method
        if not isinstance(message, method.response_type):
            raise TypeError(
                f"{method.path} sends {method.response_type.__name__}, not {type(message).__name__}"
            )
        payload = message.SerializeToString()
        if len(payload) > self._server.max_size:
            raise RpcError(_too_large(method, len(payload)))
        server = self._server
        try:
            server.conn.send_message(payload)
        except RpcClosedError:
            raise trio.BrokenResourceError("the RPC is over") from None
        await server.flush()
        if server.broken:
            raise trio.BrokenResourceError("the stream is gone")

    async def receive(self) -> Any:
        """The next request; trio.EndOfChannel after the client's CloseSend."""
        recv = self._call.recv
        if recv is None:
            await trio.lowlevel.checkpoint()
            raise trio.EndOfChannel
        data = await recv.receive()
        return _decode(self._call.method, data)

    def __aiter__(self) -> _HandlerStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


def _tag(log_context: str) -> str:
    """``log_context`` as the messages' prefix: ``"agent_id=… "`` (or nothing)."""
    return f"{log_context} " if log_context else ""


def _log_rpc(tag: str, path: str, started: float, outcome: str, code: int = 0, message: str = "") -> None:
    """The debug line of one RPC (only called when debug logging is on)."""
    ms = (perf_counter() - started) * 1000.0
    if outcome == ERROR:
        log.debug(
            "rpc %smethod=%s duration_ms=%.3f outcome=error code=%d error=%s",
            tag,
            path,
            ms,
            code,
            quote(message),
        )
    else:
        log.debug("rpc %smethod=%s duration_ms=%.3f outcome=%s", tag, path, ms, outcome)


def _sole_rpc_error(exc: BaseException) -> RpcError | None:
    """The RpcError an exception group (from a handler's nursery) wraps, alone, if it does."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, RpcError) else None


def _too_large(method: RpcMethod, size: int) -> str:
    return f"{method.path}: response of {size} bytes exceeds the message size limit"


def _decode(method: RpcMethod, data: bytes) -> Message:
    msg = method.request_type()
    if not data:
        return msg  # an empty message (common: most Get* requests)
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise RpcError(f"{method.path}: invalid {method.request_type.__name__}: {exc}") from None
    return msg


class _StreamServer:
    __slots__ = (
        "_charged",
        "_first_deadline",
        "_handlers_done",
        "_idle",
        "_start",
        "_writing",
        "broken",
        "budget",
        "call",
        "conn",
        "max_size",
        "nursery",
        "registry",
        "running",
        "tag",
        "transport",
    )

    def __init__(
        self,
        transport: trio.abc.HalfCloseableStream,
        registry: Registry,
        max_size: int,
        budget: RequestBudget | None = None,
        first_deadline: float | None = None,
        tag: str = "",
    ) -> None:
        self.transport = transport
        #: what every log line about this stream starts with (``"agent_id=… "``)
        self.tag = tag
        self.budget = budget
        #: bytes this stream holds in ``budget``
        self._charged = 0
        #: until the first complete packet: when the stream is reset for not sending one
        self._first_deadline = first_deadline
        self.registry = registry
        self.conn = DrpcConnection(Role.SERVER, max_packet_size=max_size)
        self.max_size = max_size
        self.call: _Call | None = None
        self._writing = False
        self._idle: trio.Event | None = None
        # A send cut short (cancelled/failed) may leave half a frame on the wire: stop serving.
        self.broken = False
        self.nursery: trio.Nursery | None = None
        self.running = 0
        self._start: tuple[_Call, Message | None] | None = None
        self._handlers_done: trio.Event | None = None

    async def run(self, nursery: trio.Nursery) -> None:
        """Serve until EOF/failure; the read loop and handlers run as tasks of ``nursery``."""
        self.nursery = nursery
        await self._reader()

    async def _reader(self) -> None:
        """The read loop.  To start a handler, the reading task runs it itself and hands the loop
        to a fresh task: the reply goes out without waiting for a task switch (the critical path of
        a unary call), while the new reader still sees a FIN/Close/Cancel that must cancel it."""
        clean = False
        start: tuple[_Call, Message | None] | None = None
        try:
            clean, start = await self._read_loop()
            if start is not None:
                assert self.nursery is not None
                self.nursery.start_soon(self._reader)
                await self._run_handler(*start)
                return
            if self.call is not None:
                self.call.abort()
            while self.running:
                # The aborted handler unwinds (it sends nothing more) before the stream closes.
                if self._handlers_done is None:
                    self._handlers_done = trio.Event()
                await self._handlers_done.wait()
        except BaseException:
            if self.call is not None:
                self.call.abort()
            clean = False
            raise
        finally:
            if start is None:
                if self.budget is not None:
                    self.budget.recharge(self._charged, 0)
                    self._charged = 0
                if clean and not self.broken:
                    # EOF: FIN back at once (P-D3); aclose also releases the mux stream.
                    await _close(self.transport)
                else:
                    await _abort(self.transport)

    async def _read_loop(self) -> tuple[bool, tuple[_Call, Message | None] | None]:
        """Read until EOF (True), a transport/protocol failure (False), or a handler to start."""
        transport = self.transport
        conn = self.conn
        while not self.broken:
            try:
                deadline = self._first_deadline
                if deadline is None:
                    data = await transport.receive_some()
                else:
                    data = b""
                    with trio.move_on_at(deadline) as waited:
                        data = await transport.receive_some()
                    if waited.cancelled_caught:
                        log.debug(
                            "drpc %sno complete packet within the deadline, resetting the stream", self.tag
                        )
                        return False, None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False, None
            if not data:
                return True, None
            try:
                events = conn.receive_data(data)
            except DrpcProtocolError as exc:
                log.debug("drpc %sprotocol error, closing the stream: %s", self.tag, exc)
                return False, None
            if deadline is not None and conn.packets:
                self._first_deadline = None
            budget = self.budget
            if budget is not None:
                pending = conn.pending
                if pending != self._charged:
                    if not budget.recharge(self._charged, pending):
                        log.debug(
                            "drpc %srequest buffer budget (%d bytes) exhausted, resetting the stream",
                            self.tag,
                            budget.limit,
                        )
                        return False, None
                    self._charged = pending
            for ev in events:
                await self._dispatch(ev)
            start = self._start
            if start is not None:
                self._start = None
                return True, start
        return False, None

    async def _dispatch(self, ev: Event) -> None:
        call = self.call
        if type(ev) is MessageReceived:
            if call is None or call.stream_id != ev.stream_id or call.finished:
                return
            if call.awaiting_request:
                call.awaiting_request = False
                try:
                    request = _decode(call.method, ev.data)
                except RpcError as exc:
                    await self._fail(call, exc.code, exc.message)
                    return
                self._spawn(call, request)
            elif call.send is not None:
                try:
                    await call.send.send(ev.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the handler is done with its requests
            return
        if type(ev) is Invoked:
            if call is not None:
                call.abort()
            self.call = None
            route = self.registry.lookup(ev.rpc)
            if route is None:
                text = unknown_rpc_text(ev.rpc)
                if log.isEnabledFor(_DEBUG):
                    _log_rpc(self.tag, ev.rpc, perf_counter(), ERROR, 0, text)
                self.conn.send_error(0, text)
                await self.flush()
                return
            method, handler = route
            if handler is None:
                if log.isEnabledFor(_DEBUG):
                    _log_rpc(self.tag, method.path, perf_counter(), ERROR, UNIMPLEMENTED, UNIMPLEMENTED_TEXT)
                self.conn.send_error(UNIMPLEMENTED, UNIMPLEMENTED_TEXT)
                await self.flush()
                return
            call = self.call = _Call(ev.stream_id, method, handler)
            if not call.awaiting_request:
                self._spawn(call, None)
            return
        if call is None or call.stream_id != ev.stream_id:
            return
        if type(ev) is RecvClosed:
            if call.awaiting_request:
                # CloseSend before the request: Go's MsgRecv sees io.EOF and the RPC fails with it.
                call.awaiting_request = False
                await self._fail(call, 0, "EOF")
            else:
                call.end_requests()
            return
        # RemoteClosed / RemoteError / RemoteCancelled / Superseded: the RPC is over.
        call.abort()
        if self.call is call:
            self.call = None

    def _spawn(self, call: _Call, request: Message | None) -> None:
        """Schedule a handler: run by the reading task after this batch of events (see _reader)."""
        self.running += 1
        assert self.nursery is not None
        if not call.awaiting_request and call.recv is not None:
            # Client-stream/bidi: the reader may soon block feeding this handler's requests, so
            # it must already be running in its own task.
            self.nursery.start_soon(self._run_handler, call, request)
            return
        if self._start is not None:
            # Two handlers from one read (pipelined calls; the first is usually superseded).
            self.nursery.start_soon(self._run_handler, *self._start)
        self._start = (call, request)

    async def _fail(self, call: _Call, code: int, message: str) -> None:
        """The call fails before its handler runs (undecodable request, CloseSend before it)."""
        call.finished = True
        if log.isEnabledFor(_DEBUG):
            _log_rpc(self.tag, call.method.path, perf_counter(), ERROR, code, message)
        self.conn.send_error(code, message)
        await self.flush()

    async def _run_handler(self, call: _Call, request: Message | None) -> None:
        try:
            await self._handle(call, request)
        finally:
            self.running -= 1
            if not self.running and self._handlers_done is not None:
                self._handlers_done.set()
                self._handlers_done = None

    async def _handle(self, call: _Call, request: Message | None) -> None:
        method = call.method
        handler = call.handler
        conn = self.conn
        # The RPC's debug line: decided once per call; with debug off it costs this check and a few
        # local stores (nothing is timed or formatted).
        trace = log.isEnabledFor(_DEBUG)
        started = perf_counter() if trace else 0.0
        outcome = OK
        code = 0
        message = ""
        try:
            with call.scope:
                try:
                    shape = method.shape
                    if shape is CallShape.UNARY:
                        result = await handler(request)
                    elif shape is CallShape.SERVER_STREAM:
                        result = await handler(request, _HandlerStream(self, call))
                    else:
                        result = await handler(_HandlerStream(self, call))
                    if shape is CallShape.UNARY or shape is CallShape.CLIENT_STREAM:
                        if not isinstance(result, method.response_type):
                            expected = method.response_type.__name__
                            raise TypeError(f"handler returned {type(result).__name__}, not {expected}")
                        payload = result.SerializeToString()
                        if len(payload) > self.max_size:
                            raise RpcError(_too_large(method, len(payload)))
                        if not conn.active or conn.stream is None or conn.stream.stream_id != call.stream_id:
                            outcome = CANCELLED  # the peer moved on (cancelled, closed or invoked anew)
                            return
                        conn.send_message(payload)
                    if conn.active and conn.stream is not None and conn.stream.stream_id == call.stream_id:
                        conn.close_send()
                except RpcError as exc:
                    outcome, code, message = ERROR, exc.code, exc.message
                    self._queue_error(call, code, message)
                except RpcClosedError:
                    outcome = CANCELLED
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    if self.broken:
                        outcome = CANCELLED
                        return  # the client went away mid-call: not the handler's failure
                    log.exception("rpc %smethod=%s failed", self.tag, method.path)
                    outcome, message = ERROR, f"{method.path}: {type(exc).__name__}: {exc}"
                    self._queue_error(call, 0, message)
                except Exception as exc:
                    rpc_error = _sole_rpc_error(exc)
                    if rpc_error is not None:
                        # raised in a task of the handler's own nursery: the answer, not an internal error
                        outcome, code, message = ERROR, rpc_error.code, rpc_error.message
                    else:
                        log.exception("rpc %smethod=%s failed", self.tag, method.path)
                        outcome, message = ERROR, f"{method.path}: {type(exc).__name__}: {exc}"
                    self._queue_error(call, code, message)
                finally:
                    call.finished = True
                    if call.recv is not None:
                        call.recv.close()
                await self.flush()
            if call.scope.cancelled_caught:
                outcome = CANCELLED  # the peer's Cancel/Close/FIN, or a new Invoke superseding it
        except BaseException:
            outcome = CANCELLED  # the session is ending (or the flush failed): nobody got an answer
            raise
        finally:
            if trace:
                _log_rpc(self.tag, method.path, started, outcome, code, message)

    def _queue_error(self, call: _Call, code: int, message: str) -> None:
        st = self.conn.stream
        if st is not None and st.stream_id == call.stream_id:
            self.conn.send_error(code, message)

    async def flush(self) -> None:
        """Write everything queued, in order, as one transport write (one writer at a time)."""
        while self._writing:
            if self._idle is None:
                self._idle = trio.Event()  # only on contention: the common path allocates nothing
            await self._idle.wait()
        data = self.conn.data_to_send()
        if not data or self.broken:
            await trio.lowlevel.checkpoint()
            return
        self._writing = True
        try:
            await self.transport.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The stream (or session) is gone: the reader ends this stream; nothing to report.
            self.broken = True
        except BaseException:
            self.broken = True  # cancelled mid-write: half a frame may be out
            raise
        finally:
            self._writing = False
            if self._idle is not None:
                self._idle.set()
                self._idle = None


async def _close(transport: trio.abc.HalfCloseableStream) -> None:
    try:
        await transport.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _abort(transport: trio.abc.HalfCloseableStream) -> None:
    """After a protocol error or broken write: reset the mux stream if we can, else close it."""
    reset = getattr(transport, "reset", None)
    try:
        if reset is not None:
            result = reset()
            if hasattr(result, "__await__"):
                await result
        else:
            await trio.aclose_forcefully(transport)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
