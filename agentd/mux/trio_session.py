"""trio adapter for the sans-I/O yamux core: MuxSession and MuxStream.

Task shape (all under `MuxSession.run`'s nursery):
- reader: reads the transport in 64 KiB chunks -> `Connection.receive_data` -> wake the waiters
  the events name. On a plain `trio.SocketStream` it waits for readability after a short read and
  `readv`s into one buffer per thread that every session's reader shares (`agentd.mux.sockio`);
  any other `trio.abc.Stream` uses `receive_some`.
  It never blocks on anything but the transport read: pings, RSTs and window updates are only
  queued.
- writer: the one path to the transport. It drains whatever the core queued (frames from every
  stream: one `writev` on the socket fast path, else joined into `send_all`s), so a cancelled
  application call can never leave half a frame. An application call writes inline instead when
  the writer is idle (no task switch); on the fast path a write the socket takes at once needs no
  cancel scope and no scheduler pass.
- keepalive (ping every interval, close the session when the ACK misses the write timeout; off for
  sessions agentd.monitor pings) and one timer task for stream open / close timeouts.
Waiting uses a task slot (`_TaskSlot`) where only one task can wait (a stream's reader, its writer,
the writer task) and `trio.lowlevel.ParkingLot`s elsewhere, only touched when someone is parked.
The socket fast path (direct readv/writev, the per-thread read buffer) is `agentd.mux.sockio`.
"""

from __future__ import annotations

import collections
import math
import operator
from typing import Any

import attrs
import trio
from trio.lowlevel import (
    Abort,
    ParkingLot,
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from agentd.mux.errors import MuxError, ProtocolError, StreamClosedError, StreamResetError
from agentd.mux.frame import INITIAL_WINDOW, GoAwayCode
from agentd.mux.session import (
    READ_EOF,
    READ_RESET,
    READ_SESSION_ENDED,
    Connection,
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcked,
    ProtocolViolated,
    StreamEnded,
    StreamEstablished,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from agentd.mux.sockio import RECV_SIZE, SocketIO, shared_recv
from agentd.mux.state import StreamState

#: application writers wait for the writer task once this much is queued (all streams together)
HIGH_WATER = 1024 * 1024
#: Data bodies at least this big are written without joining them to the frames around them
BIG_CHUNK = 32 * 1024
#: how long a dying session keeps flushing queued frames (e.g. the GoAway of a protocol error)
FLUSH_GRACE = 1.0


@attrs.frozen
class MuxConfig:
    """Session settings; defaults are hashicorp/yamux's DefaultConfig."""

    accept_backlog: int = 256
    enable_keepalive: bool = True
    keepalive_interval: float = 30.0
    connection_write_timeout: float = 10.0
    max_stream_window: int = attrs.field(default=INITIAL_WINDOW)
    stream_open_timeout: float = 75.0
    stream_close_timeout: float = 300.0
    #: agentd extension: at most this many live streams opened by the peer (accepted or waiting in
    #: the backlog, until closed or reset); SYNs past it are refused with RST, so one peer cannot
    #: make the session hold unbounded stream state (each holds up to max_stream_window buffered).
    #: The backlog is a subset of these, so the tighter of the two limits the unaccepted ones.
    #: None: no cap (hashicorp's behaviour). Coder's agent runs ~10 concurrent RPCs.
    max_inbound_streams: int | None = 256

    @max_stream_window.validator
    def _check_window(self, _attr: object, value: int) -> None:
        if value < INITIAL_WINDOW:
            raise ValueError("max_stream_window must be at least 256 KiB")


class _TaskSlot:
    """Where the one task that may wait for something parks (a stream's reader, its writer, the
    session's writer task): cheaper than a ParkingLot to create and to park/wake."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None

    async def park(self) -> None:
        self.task = current_task()
        await wait_task_rescheduled(self._abort)

    def _abort(self, _raise_cancel: Any) -> Abort:
        self.task = None
        return Abort.SUCCEEDED

    def wake(self) -> None:
        task = self.task
        if task is not None:
            self.task = None
            reschedule(task)


def _check_max_bytes(max_bytes: int | None) -> int:
    if max_bytes is None:
        return 1 << 62
    max_bytes = operator.index(max_bytes)
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


class MuxStream(trio.abc.HalfCloseableStream):
    """One yamux stream. `send_eof` half-closes (FIN), `aclose` closes both ways (FIN; data the
    peer still sends is answered with RST), `reset` aborts (RST, unread data dropped)."""

    __slots__ = ("_closed", "_conn", "_reading", "_receiving", "_sending", "_session", "_st", "_writing")

    def __init__(self, session: MuxSession, st: StreamState) -> None:
        self._session = session
        self._conn = session._conn
        self._st = st
        # at most one task waits per direction (the conflict detectors see to it)
        self._reading = _TaskSlot()
        self._writing = _TaskSlot()
        self._receiving = False
        self._sending = False
        self._closed = False

    @property
    def stream_id(self) -> int:
        return self._st.id

    @property
    def session(self) -> MuxSession:
        return self._session

    def __repr__(self) -> str:
        return f"<MuxStream {self._st!r}>"

    def _send_error(self, exc: MuxError) -> BaseException:
        if self._closed or isinstance(exc, StreamClosedError):
            return trio.ClosedResourceError("stream closed")
        if isinstance(exc, StreamResetError):
            return trio.BrokenResourceError("stream reset")
        return self._session._broken_error()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        self._sending = True
        try:
            view = memoryview(data if type(data) is bytes else bytes(data))
            total = len(view)
            off = 0
            parked = False
            conn = self._conn
            st = self._st
            session = self._session
            while True:
                try:
                    n = conn.send_data(st, view[off:] if off else view)
                except MuxError as exc:
                    raise self._send_error(exc) from None
                off += n
                if off >= total:
                    break
                if not n:
                    session._wake_writer()
                    parked = True
                    await self._writing.park()
                    if self._closed:
                        raise trio.ClosedResourceError("stream closed")
            if conn.out_len > HIGH_WATER:
                session._wake_writer()
                parked = True
                await session._wait_drained()
            elif await session._flush_inline():
                parked = True
            if not parked:
                await cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await checkpoint_if_cancelled()
        self._sending = True
        try:
            parked = False
            st = self._st
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if not self._conn.send_blocked(st):
                    break
                parked = True
                await self._writing.park()
            if not parked:
                await cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        session = self._session
        self._conn.end_stream(self._st)
        session._after_local_close(self._st, wake_writer=False)
        if not await session._flush_inline():
            if self._conn.out_len:
                session._wake_writer()
            await cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        n = _check_max_bytes(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        await checkpoint_if_cancelled()
        self._receiving = True
        try:
            st = self._st
            parked = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if st.recv_buf:
                    conn = self._conn
                    queued = conn.out_len
                    data = conn.read(st, n)
                    if conn.out_len != queued:
                        # a window update: sent now if the socket takes it at once, else by the
                        # writer task (a read never blocks on writing). Other queued frames (an
                        # accept's ACK) are left to the writer: they leave with the next reply.
                        self._session._flush_nowait()
                    elif queued:
                        self._session._wake_writer()
                    break
                status = self._conn.read_status(st)
                if status == READ_RESET:
                    raise trio.BrokenResourceError("stream reset by peer")
                if status == READ_EOF:
                    data = b""
                    break
                if status == READ_SESSION_ENDED:
                    raise self._session._broken_error()
                parked = True
                await self._reading.park()
            if not parked:
                await cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        session = self._session
        if not self._closed:
            self._closed = True
            self._conn.close_stream(self._st)
            # the FIN goes out with the writer task after a yield, so it usually shares a packet
            # with what the application writes next (e.g. the next request's SYN and data)
            session._after_local_close(self._st)
            self._wake()
        await checkpoint()

    async def reset(self) -> None:
        """Abort the stream: the peer sees RST, unread data is dropped; later calls raise
        ClosedResourceError."""
        if not self._closed:
            self._closed = True
            self._conn.reset_stream(self._st)
            self._session._after_local_reset()
            self._wake()
        await checkpoint()

    def _wake(self) -> None:
        self._reading.wake()
        self._writing.wake()


class MuxSession:
    """A yamux session over any `trio.abc.Stream`; run it with `await nursery.start(session.run)`."""

    def __init__(
        self, transport: trio.abc.Stream, *, is_client: bool, config: MuxConfig | None = None
    ) -> None:
        self._transport = transport
        #: the fast path when the transport is a plain socket stream
        self._sockio = SocketIO(transport) if type(transport) is trio.SocketStream else None
        self.config = config if config is not None else MuxConfig()
        self.is_client = is_client
        self._conn = Connection(
            is_client=is_client,
            max_stream_window=self.config.max_stream_window,
            accept_backlog=self.config.accept_backlog,
            max_inbound_streams=self.config.max_inbound_streams,
        )
        #: the writer task while it waits for work
        self._writer_slot = _TaskSlot()
        self._drain_lot = ParkingLot()
        self._accept_lot = ParkingLot()
        self._open_lot = ParkingLot()
        self._timer_lot = ParkingLot()
        #: when the timer task will next wake by itself (-inf: it is running, not sleeping)
        self._timer_wake_at = -math.inf
        self._accept_queue: collections.deque[MuxStream] = collections.deque()
        self._pings: dict[int, trio.Event] = {}
        #: trio time of the last bytes read from the peer (any frame proves it is alive)
        self.last_heard = trio.current_time()
        self._open_deadlines: collections.deque[tuple[float, StreamState]] = collections.deque()
        self._close_deadlines: collections.deque[tuple[float, StreamState]] = collections.deque()
        self._started = False
        self._writing = False
        #: scheduler passes the writer lets go by after a wake-up before writing (see _writer)
        self._writer_yields = 1
        self._closing = False
        self._closed_locally = False
        self._close_reason: BaseException | None = None
        self._reader_scope: trio.CancelScope | None = None
        self._aux_scope = trio.CancelScope()
        self._nursery_scope: trio.CancelScope | None = None
        self._done = trio.Event()

    # ---- public API --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def close_reason(self) -> BaseException | None:
        """Why the session ended (None while open or after a local aclose)."""
        return self._close_reason

    @property
    def num_streams(self) -> int:
        """Streams still in the session's table (open or half-closed)."""
        return self._conn.num_streams

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reader, writer, keepalive and timers; returns when the session has ended."""
        if self._started:
            raise RuntimeError("MuxSession.run called twice")
        self._started = True
        try:
            if self._closing:
                task_status.started()
                return
            async with trio.open_nursery() as nursery:
                self._nursery_scope = nursery.cancel_scope
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._aux, self._aux_scope)
                task_status.started()
                # held, the status would keep nursery.start's temporary nursery alive (~1 KiB)
                del task_status
        finally:
            self._terminate(None)
            with trio.CancelScope(shield=True):
                try:
                    await self._close_transport()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            self._done.set()

    async def open_stream(self) -> MuxStream:
        """Open a stream (sends SYN; does not wait for the ACK, like Go)."""
        await checkpoint_if_cancelled()
        conn = self._conn
        while True:
            if self._closing:
                raise self._session_error()
            if not conn.outbound_backlog_full():
                break
            await self._open_lot.park()
        st = conn.open_stream()
        stream = MuxStream(self, st)
        st.handle = stream
        timeout = self.config.stream_open_timeout
        if timeout > 0:
            self._push_deadline(self._open_deadlines, timeout, st)
        self._wake_writer()
        # no schedule point here: the SYN goes out with the first send (or via the writer task)
        return stream

    async def accept_stream(self) -> MuxStream:
        """Next stream the peer opened (sends its ACK); raises ClosedResourceError after aclose,
        BrokenResourceError once the session died."""
        await checkpoint_if_cancelled()
        parked = False
        queue = self._accept_queue
        while not queue:
            if self._closing:
                raise self._session_error()
            parked = True
            await self._accept_lot.park()
        stream = queue.popleft()
        self._conn.accept_stream(stream._st)
        # the ACK waits two scheduler passes: a handler started now gets to write its first reply
        # (inline, carrying the ACK) after its own first receive, so both leave in one packet
        self._writer_yields = 2
        self._wake_writer()
        if not parked:
            await cancel_shielded_checkpoint()
        return stream

    async def ping(self) -> float:
        """Round-trip time in seconds; MuxError if no answer within the write timeout."""
        if self._closing:
            await checkpoint()
            raise self._session_error()
        pid = self._conn.ping()
        self._wake_writer()
        event = trio.Event()
        self._pings[pid] = event
        start = trio.current_time()
        try:
            with trio.move_on_after(self.config.connection_write_timeout) as cs:
                await event.wait()
        finally:
            self._pings.pop(pid, None)
        if cs.cancelled_caught:
            raise MuxError("ping timeout")
        if self._closing:
            raise self._session_error()
        return trio.current_time() - start

    def send_ping(self) -> None:
        """Queue a ping and write it now if the socket takes it; its answer shows in `last_heard`.
        For a process-wide liveness check (agentd.monitor): no task waits for the answer."""
        if self._closing:
            return
        self._conn.ping()
        self._flush_nowait()

    async def go_away(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """Tell the peer to open no more streams; later inbound SYNs get RST. Existing streams go on."""
        await checkpoint_if_cancelled()
        if self._closing:
            raise self._session_error()
        self._conn.go_away(code)
        self._wake_writer()
        await cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """End the session (like Go's Close: no GoAway; the peer sees EOF). Idempotent."""
        self._closed_locally = self._closed_locally or not self._closing
        self._terminate(None)
        if not self._started:
            self._started = True
            with trio.CancelScope(shield=True):
                try:
                    await self._transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            self._done.set()
        await checkpoint()
        with trio.CancelScope(shield=True):
            await self._done.wait()

    async def __aenter__(self) -> MuxSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- internals -----------------------------------------------------------------------------------

    def _session_error(self) -> BaseException:
        if self._closed_locally:
            return trio.ClosedResourceError("mux session closed")
        return self._broken_error()

    def _broken_error(self) -> BaseException:
        reason = self._close_reason
        err = trio.BrokenResourceError(f"mux session ended: {reason!r}" if reason else "mux session ended")
        err.__cause__ = reason
        return err

    async def _close_transport(self) -> None:
        """Close the transport; after a yamux protocol error, a transport that can say why it closes
        (``close_protocol_error``, e.g. WebSocket's Close 1002) is told so."""
        reason = self._close_reason
        close_error = getattr(self._transport, "close_protocol_error", None)
        if isinstance(reason, ProtocolError) and close_error is not None:
            await close_error(f"yamux: {reason}")
        else:
            await self._transport.aclose()

    def _wake_writer(self) -> None:
        self._writer_slot.wake()

    # ---- writing: one path ------------------------------------------------------------------------
    # Whoever queued frames first tries `_write_nowait` (one writev on the socket fast path, from
    # the calling task, no scheduler pass). What the socket does not take at once is written with
    # `_send_chunks`, awaited either by the calling task (`_flush_inline`: a request's reply) or by
    # the writer task (`_writer`: everything else); `_writing` keeps them from interleaving.

    def _write_nowait(self, *, rest_to_writer: bool) -> bool:
        """One writev of the whole queue when the writer is idle; True if the queue is empty now
        (or the session just ended). What the socket does not take stays queued: for the writer
        task (woken) with ``rest_to_writer``, else for the caller's awaited flush."""
        conn = self._conn
        sockio = self._sockio
        if sockio is None or self._writing or self._closing or not conn.out_len:
            if rest_to_writer and conn.out_len:
                self._wake_writer()
            return not conn.out_len
        try:
            rest = sockio.send_nowait(conn.take_output())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._terminate(exc)
            return True
        if rest:
            conn.unsend(rest)
            if rest_to_writer:
                self._wake_writer()
            return False
        self._after_write()
        return True

    def _flush_nowait(self) -> None:
        """Write the queue now if the socket takes it without waiting; the rest goes to the writer."""
        self._write_nowait(rest_to_writer=True)

    async def _flush_inline(self) -> bool:
        """Write the queued frames from the calling task when the writer is idle (saves a task
        switch and a wake-up per request). Shielded, so a cancelled caller never leaves half a
        frame. True if that was a checkpoint (the socket fast path writes without one)."""
        if self._write_nowait(rest_to_writer=False):
            return False
        conn = self._conn
        if self._writing or self._closing or not conn.out_len:
            return False
        self._writing = True
        try:
            total = conn.out_len
            chunks = conn.take_output()
            try:
                # no deadline here (a deadline scope per write is not free): a transport that
                # stops draining fails the keepalive ping, and ending the session closes the
                # transport, which releases this write
                with trio.CancelScope(shield=True):
                    await self._send_chunks(chunks, total)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._terminate(exc)
        finally:
            self._writing = False
        if conn.out_len:
            self._wake_writer()
        self._after_write()
        return True

    def _after_write(self) -> None:
        # application writers waiting for the queue to drain below HIGH_WATER
        if self._drain_lot:
            self._drain_lot.unpark_all()

    async def _send_chunks(self, chunks: list[bytes | memoryview], total: int) -> bool:
        """Socket fast path: one writev. Otherwise one send_all for small batches; big Data bodies
        go out on their own instead of being copied into a joined buffer (an extra syscall is
        cheaper than a 256 KiB copy). True if it was a checkpoint."""
        sockio = self._sockio
        if sockio is not None:
            return await sockio.send_chunks(chunks)
        send_all = self._transport.send_all
        if len(chunks) == 1:
            await send_all(chunks[0])
        elif total <= BIG_CHUNK * 2:
            await send_all(b"".join(chunks))
        else:
            small: list[bytes | memoryview] = []
            for chunk in chunks:
                if len(chunk) >= BIG_CHUNK:
                    if small:
                        await send_all(small[0] if len(small) == 1 else b"".join(small))
                        small = []
                    await send_all(chunk)
                else:
                    small.append(chunk)
            if small:
                await send_all(b"".join(small))
        return True

    async def _wait_drained(self) -> None:
        while self._conn.out_len > HIGH_WATER and not self._closing:
            await self._drain_lot.park()

    def _push_deadline(
        self, dq: collections.deque[tuple[float, StreamState]], delay: float, st: StreamState
    ) -> None:
        # drop heads that no longer matter so the queue stays as long as the live streams
        while dq and not self._deadline_live(dq is self._open_deadlines, dq[0][1]):
            dq.popleft()
        deadline = trio.current_time() + delay
        dq.append((deadline, st))
        # deadlines only grow within a queue: wake the timer task only if it sleeps past this one
        if deadline < self._timer_wake_at and self._timer_lot:
            self._timer_lot.unpark_all()

    def _deadline_live(self, is_open: bool, st: StreamState) -> bool:
        return self._conn.open_pending(st) if is_open else self._conn.close_pending(st)

    def _after_local_reset(self) -> None:
        # a reset of a stream still waiting for its ACK frees an outbound-backlog slot
        if self._open_lot:
            self._open_lot.unpark_all()
        self._wake_writer()

    def _after_local_close(self, st: StreamState, wake_writer: bool = True) -> None:
        if self._conn.close_pending(st) and self.config.stream_close_timeout > 0:
            self._push_deadline(self._close_deadlines, self.config.stream_close_timeout, st)
        if wake_writer:
            self._wake_writer()

    def _terminate(self, reason: BaseException | None) -> None:
        """End the session: wake every waiter, stop the reader and helpers; the writer flushes what is
        queued (bounded by FLUSH_GRACE)."""
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason
        conn = self._conn
        for st in conn.close():
            handle = st.handle
            if isinstance(handle, MuxStream):
                handle._wake()
        for stream in self._accept_queue:
            stream._wake()
        for event in self._pings.values():
            event.set()
        for lot in (self._accept_lot, self._open_lot, self._drain_lot, self._timer_lot):
            lot.unpark_all()
        self._wake_writer()
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        self._aux_scope.cancel()
        if self._nursery_scope is not None:
            grace = FLUSH_GRACE if conn.out_len else 0.0
            self._nursery_scope.deadline = min(self._nursery_scope.deadline, trio.current_time() + grace)

    async def _reader(self) -> None:
        conn = self._conn
        receive_some = self._transport.receive_some
        sockio = self._sockio
        # shared with the other sessions of this thread: read from only between a read and the
        # receive_data that follows it, with no await in between (see agentd.mux.sockio.SharedRecvBuffer)
        view = shared_recv.view if sockio is not None else memoryview(b"")
        short = True
        accept_queue = self._accept_queue
        now = trio.current_time
        with trio.CancelScope() as scope:
            self._reader_scope = scope
            if self._closing:
                return
            while True:
                data: bytes | bytearray | memoryview
                try:
                    if sockio is not None:
                        if not short:
                            # the last read filled the buffer: read on, but let others run first
                            await cancel_shielded_checkpoint()
                        got = await sockio.recv_into(view, short)
                        short = got < RECV_SIZE
                        data = view[:got]
                    else:
                        data = await receive_some(RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._terminate(exc)
                    return
                if not data:
                    self._terminate(EOFError("transport closed by peer"))
                    return
                self.last_heard = now()
                # no await from the read to here: `data` may be the thread's shared buffer
                events = conn.receive_data(data)
                if events:
                    self._dispatch(events, accept_queue)
                    if self._closing:
                        return  # a protocol error or the peer's GoAway ended the session
                    # an opener may wait for an outbound slot: ACK, RST, or a FIN that completed a
                    # stream the peer never ACKed (Go sends no ACK for a stream FIN'd before Accept)
                    if self._open_lot and not conn.outbound_backlog_full():
                        self._open_lot.unpark_all()
                if conn.out_len and self._writer_slot.task is not None:
                    if events:
                        self._wake_writer()
                    else:
                        # only control frames to answer (a ping's ACK): write them from here rather
                        # than wake the writer task for them
                        self._flush_nowait()

    def _dispatch(self, events: list[Event], accept_queue: collections.deque[MuxStream]) -> None:
        for ev in events:
            # `type(ev) is` narrows like isinstance and is the cheaper test per event
            if type(ev) is DataReceived or type(ev) is StreamEnded:
                h = ev.stream.handle
                if h is not None:
                    h._reading.wake()
            elif type(ev) is WindowUpdated:
                h = ev.stream.handle
                if h is not None:
                    h._writing.wake()
            elif type(ev) is StreamOpened:
                stream = MuxStream(self, ev.stream)
                ev.stream.handle = stream
                accept_queue.append(stream)
                if self._accept_lot:
                    self._accept_lot.unpark()
            elif type(ev) is StreamReset:
                h = ev.stream.handle
                if h is not None:
                    h._wake()
                if self._open_lot:
                    self._open_lot.unpark_all()
            elif type(ev) is StreamEstablished:
                if self._open_lot:
                    self._open_lot.unpark_all()
            elif type(ev) is PingAcked:
                event = self._pings.get(ev.opaque)
                if event is not None:
                    event.set()
            elif type(ev) is GoAwayReceived:
                if self._open_lot:
                    self._open_lot.unpark_all()
            elif type(ev) is ConnectionTerminated:
                self._terminate(MuxError(f"peer sent GoAway({ev.code})"))
                return
            elif type(ev) is ProtocolViolated:
                self._terminate(ev.error)
                return

    async def _writer(self) -> None:
        conn = self._conn
        while True:
            if not conn.out_len or self._writing:
                if self._closing and not self._writing:
                    return
                await self._writer_slot.park()
                # let the tasks woken with us run first: an accepted stream's ACK or a closed
                # stream's FIN then leaves with the next reply (often written inline), not as a
                # packet of its own
                # (nothing queued any more: someone wrote it inline, so no pass is spent on that)
                for _ in range(self._writer_yields):
                    if not conn.out_len:
                        break
                    await cancel_shielded_checkpoint()
                self._writer_yields = 1
                continue
            total = conn.out_len
            chunks = conn.take_output()
            self._writing = True
            try:
                await self._send_chunks(chunks, total)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._terminate(exc)
                return
            finally:
                self._writing = False
            self._after_write()

    async def _aux(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                if self.config.enable_keepalive:
                    nursery.start_soon(self._keepalive)
                nursery.start_soon(self._timers)

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(self.config.keepalive_interval)
            try:
                await self.ping()
            except MuxError:
                self._terminate(MuxError("keepalive timeout"))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _timers(self) -> None:
        opens = self._open_deadlines
        closes = self._close_deadlines
        conn = self._conn
        while True:
            now = trio.current_time()
            while opens and (opens[0][0] <= now or not self._deadline_live(True, opens[0][1])):
                _deadline, st = opens.popleft()
                if self._deadline_live(True, st):
                    self._terminate(MuxError(f"stream {st.id} open timeout: no ACK from the peer"))
                    return
            while closes and (closes[0][0] <= now or not self._deadline_live(False, closes[0][1])):
                _deadline, st = closes.popleft()
                if self._deadline_live(False, st):
                    conn.reset_stream(st)
                    if isinstance(st.handle, MuxStream):
                        st.handle._wake()
                    self._after_local_reset()
            nxt = min(opens[0][0] if opens else math.inf, closes[0][0] if closes else math.inf)
            self._timer_wake_at = nxt
            with trio.move_on_at(nxt):
                await self._timer_lot.park()
            self._timer_wake_at = -math.inf
