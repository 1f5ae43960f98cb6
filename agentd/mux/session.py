"""Sans-I/O yamux session: bytes in -> events, commands -> bytes out.

Behaviour follows hashicorp/yamux v0.1.2 (spec/wire.md Part A): flags processed ACK, FIN, RST; Go's
half-window credit rule; protocol errors (window overrun, duplicate SYN, unexpected FIN, bad version,
unknown type) end the session; frames for unknown streams are ignored; inbound SYNs beyond the accept
backlog, beyond `max_inbound_streams` live peer-opened streams (an agentd extension: bounds what one
peer can make us hold) or after a local GoAway are answered with RST without involving the application.

The parser is written for speed: one pass over each received chunk with `struct.unpack_from`, Data
bodies copied straight into the stream's buffer (also when a body spans several chunks), no per-frame
objects other than the events the caller needs.
"""

from __future__ import annotations

from typing import NamedTuple

from agentd.mux.errors import MuxError, ProtocolError
from agentd.mux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    HEADER,
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_STREAM_ID,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    GoAwayCode,
)
from agentd.mux.state import (
    CAN_RECEIVE,
    CAN_SEND,
    CLOSED,
    ESTABLISHED,
    LOCAL_CLOSE,
    REMOTE_CLOSE,
    RESET,
    STATE_NAMES,
    SYN_RECEIVED,
    SYN_SENT,
    StreamState,
)

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


# ---- events ---------------------------------------------------------------------------------------


class StreamOpened(NamedTuple):
    """The peer opened a stream; it waits in the accept backlog (not yet ACKed)."""

    stream_id: int
    stream: StreamState


class StreamEstablished(NamedTuple):
    """The peer ACKed a stream we opened."""

    stream_id: int
    stream: StreamState


class DataReceived(NamedTuple):
    """`length` more bytes are in `stream.recv_buf`."""

    stream_id: int
    stream: StreamState
    length: int


class WindowUpdated(NamedTuple):
    """The peer granted `delta` more bytes of send window."""

    stream_id: int
    stream: StreamState
    delta: int


class StreamEnded(NamedTuple):
    """The peer half-closed (FIN): after the buffered bytes, the stream reads EOF."""

    stream_id: int
    stream: StreamState


class StreamReset(NamedTuple):
    """The peer reset the stream (or we did, answering data sent after our close)."""

    stream_id: int
    stream: StreamState


class PingAcked(NamedTuple):
    opaque: int


class GoAwayReceived(NamedTuple):
    """GoAway(NORMAL): no new streams may be opened; existing ones go on."""

    code: int


class ConnectionTerminated(NamedTuple):
    """GoAway with an error code: the peer is ending the session."""

    code: int


Event = (
    StreamOpened
    | StreamEstablished
    | DataReceived
    | WindowUpdated
    | StreamEnded
    | StreamReset
    | PingAcked
    | GoAwayReceived
    | ConnectionTerminated
)


# ---- the state machine ----------------------------------------------------------------------------


class StreamClosedError(MuxError):
    """The stream was closed locally (write after half-close / close)."""


class StreamResetError(MuxError):
    """The stream was reset (by the peer, by us, or by the close timeout)."""


class SessionClosedError(MuxError):
    """The session is over."""


class Connection:
    """One end of a yamux session, without I/O.

    Feed received transport bytes to `receive_data`; after any call, `data_to_send()` holds the bytes
    to write, in order. The caller owns timers (keepalive, open and close timeouts) and calls the
    corresponding commands.
    """

    def __init__(
        self,
        *,
        is_client: bool,
        max_stream_window: int = INITIAL_WINDOW,
        accept_backlog: int = 256,
        max_inbound_streams: int | None = None,
    ) -> None:
        if max_stream_window < INITIAL_WINDOW:
            raise ValueError("max_stream_window must be at least 256 KiB")
        if accept_backlog < 1:
            raise ValueError("accept_backlog must be positive")
        if max_inbound_streams is not None and max_inbound_streams < 1:
            raise ValueError("max_inbound_streams must be positive (or None: no cap)")
        self.is_client = is_client
        self.max_window = max_stream_window
        self._half_window = max_stream_window // 2
        self.accept_backlog = accept_backlog
        #: cap on live peer-opened streams (accepted or not, until closed/reset); None: no cap
        self.max_inbound_streams = max_inbound_streams
        #: peer-opened streams still in the table
        self.inbound_live = 0
        self.streams: dict[int, StreamState] = {}
        self._next_id = 1 if is_client else 2
        self._out: list[bytes | memoryview] = []
        #: bytes queued in data_to_send()
        self.out_len = 0
        self.local_go_away = False
        self.remote_go_away = False
        #: peer-opened streams not yet accepted
        self.inbound_pending = 0
        #: streams we opened that the peer has not ACKed (or reset) yet
        self.outbound_pending = 0
        self._ping_id = 0
        self.closed = False
        self.dead_streams: list[StreamState] = []
        self.error: ProtocolError | None = None
        # parser state
        self._hdr = bytearray()
        self._body_left = 0
        self._body_stream: StreamState | None = None
        self._body_flags = 0

    # ---- output --------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the transport, in order; empties the queue."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        self._out = []
        self.out_len = 0
        return bytes(data)

    def take_output(self) -> list[bytes | memoryview]:
        """Queued chunks (joining is up to the writer); empties the queue."""
        out = self._out
        self._out = []
        self.out_len = 0
        return out

    def unsend(self, chunks: list[bytes | memoryview]) -> None:
        """Put back what a writer took but could not write yet, ahead of anything queued since."""
        if chunks:
            self._out[:0] = chunks
            self.out_len += sum(len(c) for c in chunks)

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self.out_len += len(data)

    # ---- commands --------------------------------------------------------------------------------

    def open_stream(self) -> StreamState:
        """Register a new outbound stream and queue its SYN (a window update, as Go does)."""
        if self.closed:
            raise SessionClosedError("session closed")
        if self.remote_go_away:
            raise MuxError("remote end is not accepting connections")
        sid = self._next_id
        if sid >= MAX_STREAM_ID:
            raise MuxError("stream ids exhausted")
        self._next_id = sid + 2
        st = StreamState(sid, SYN_SENT)
        st.syn_pending = True
        st.recv_window = self.max_window  # the SYN's delta grants the peer the extra credit
        self.outbound_pending += 1
        self.streams[sid] = st
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, sid, self.max_window - INITIAL_WINDOW))
        return st

    def accept_stream(self, st: StreamState) -> None:
        """The application took `st` from the backlog: send the ACK (exactly once)."""
        if st.in_backlog:
            st.in_backlog = False
            self.inbound_pending -= 1
        if not st.ack_pending:
            return
        st.ack_pending = False
        if st.forgotten or self.closed:
            return
        if st.state == SYN_RECEIVED:
            st.state = ESTABLISHED
        delta = (self.max_window - len(st.recv_buf)) - st.recv_window
        if delta < 0:
            delta = 0
        st.recv_window += delta
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_ACK, st.id, delta))

    def send_data(self, st: StreamState, data: bytes | memoryview) -> int:
        """Queue one Data frame of up to the peer's window; returns how many bytes it took (0: window
        empty). `data` must not change afterwards (pass bytes or a view of bytes)."""
        if st.state not in CAN_SEND or st.forgotten:
            self._raise_send_error(st)
        if self.closed:
            raise SessionClosedError("session closed")
        n = len(data)
        window = st.send_window
        if n > window:
            n = window
            data = data[:n]
        if n == 0:
            return 0
        st.send_window = window - n
        out = self._out
        out.append(_pack(0, TYPE_DATA, 0, st.id, n))
        out.append(data)
        self.out_len += n + HEADER_SIZE
        return n

    def _raise_send_error(self, st: StreamState) -> None:
        if st.state == RESET:
            raise StreamResetError("stream reset")
        if st.session_dead:
            raise SessionClosedError("session closed")
        raise StreamClosedError("stream closed")

    def read(self, st: StreamState, max_bytes: int) -> bytes:
        """Take up to `max_bytes` buffered bytes and return window credit per Go's half-window rule."""
        buf = st.recv_buf
        data = buf.take(max_bytes)
        if data and st.state in CAN_RECEIVE and not st.forgotten and not self.closed:
            delta = (self.max_window - len(buf)) - st.recv_window
            if delta >= self._half_window:
                st.recv_window += delta
                self._queue(_pack(0, TYPE_WINDOW_UPDATE, 0, st.id, delta))
        return data

    def end_stream(self, st: StreamState) -> None:
        """Half-close (send FIN), per hashicorp's Close(); a no-op when already closed or reset."""
        s = st.state
        if st.forgotten or self.closed:
            return
        if s in (SYN_SENT, SYN_RECEIVED, ESTABLISHED):
            st.state = LOCAL_CLOSE
        elif s == REMOTE_CLOSE:
            st.state = CLOSED
            self._forget(st)
        else:
            return
        flags = FLAG_FIN
        if st.ack_pending:
            st.ack_pending = False
            flags |= FLAG_ACK
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, flags, st.id, 0))

    def close_stream(self, st: StreamState) -> None:
        """The application closed both directions: FIN, drop unread data; data that still arrives
        is answered with RST (so the peer's writer learns nobody reads)."""
        st.app_closed = True
        dropped = len(st.recv_buf)
        st.recv_buf.clear()
        if dropped and st.state in CAN_RECEIVE and not st.forgotten and not self.closed:
            # hand the dropped bytes' credit back so a writer blocked on our window wakes up,
            # sends, and learns from the RST that nobody reads any more
            delta = self.max_window - st.recv_window
            if delta > 0:
                st.recv_window += delta
                self._queue(_pack(0, TYPE_WINDOW_UPDATE, 0, st.id, delta))
        self.end_stream(st)

    def reset_stream(self, st: StreamState) -> None:
        """Abort: RST to the peer, unread data dropped, stream forgotten."""
        st.recv_buf.clear()
        if st.forgotten or self.closed or st.state == RESET:
            st.state = RESET
            return
        st.state = RESET
        self._forget(st)
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, st.id, 0))

    def ping(self) -> int:
        """Queue a ping request; returns its opaque id (PingAcked carries it back)."""
        if self.closed:
            raise SessionClosedError("session closed")
        pid = self._ping_id
        self._ping_id = (pid + 1) & 0xFFFFFFFF
        self._queue(_pack(0, TYPE_PING, FLAG_SYN, 0, pid))
        return pid

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Queue a GoAway; from now on inbound SYNs are answered with RST."""
        if self.closed:
            raise SessionClosedError("session closed")
        self.local_go_away = True
        self._queue(_pack(0, TYPE_GO_AWAY, 0, 0, int(code)))

    def close(self) -> None:
        """The session is over: every stream is marked dead and forgotten."""
        if self.closed:
            return
        self.closed = True
        for st in self.streams.values():
            st.session_dead = True
            st.forgotten = True
        #: the streams that were open when the session ended (so an adapter can wake their waiters)
        self.dead_streams = list(self.streams.values())
        self.streams.clear()
        self.inbound_live = 0

    def _forget(self, st: StreamState) -> None:
        if not st.forgotten:
            st.forgotten = True
            if self.streams.pop(st.id, None) is not None and (st.id ^ self._next_id) & 1:
                self.inbound_live -= 1  # the peer's ids have the other parity
        if st.syn_pending:
            st.syn_pending = False
            self.outbound_pending -= 1

    def _fail(self, err: ProtocolError, events: list[Event]) -> ProtocolError:
        err.events = list(events)
        self.error = err
        if err.send_go_away:
            self._queue(_pack(0, TYPE_GO_AWAY, 0, 0, int(err.code)))
        self.close()
        return err

    # ---- input -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse transport bytes (any split); returns the events, raises ProtocolError."""
        if self.error is not None:
            raise self.error
        events: list[Event] = []
        if self.closed:
            return events
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        streams = self.streams
        while pos < n:
            left = self._body_left
            if left:
                # inside a Data body (possibly for an ignored stream)
                take = n - pos
                if take > left:
                    take = left
                st = self._body_stream
                left -= take
                self._body_left = left
                if st is not None and not st.forgotten:
                    if st.app_closed:
                        # closed by the application while this body was in flight: nobody reads it
                        self.reset_stream(st)
                        events.append(StreamReset(st.id, st))
                        self._body_stream = st = None
                    else:
                        st.recv_buf.append(bytes(mv[pos : pos + take]))
                        events.append(DataReceived(st.id, st, take))
                pos += take
                if not left:
                    self._body_stream = None
                    if st is not None and self._body_flags and not st.forgotten:
                        try:
                            self._stream_flags(st, self._body_flags, events)
                        except ProtocolError as err:
                            raise self._fail(err, events) from None
                continue
            if self._hdr or n - pos < HEADER_SIZE:
                hdr = self._hdr
                take = HEADER_SIZE - len(hdr)
                hdr += mv[pos : pos + take]
                pos += take
                if len(hdr) < HEADER_SIZE:
                    break
                version, ftype, flags, sid, length = _unpack_from(hdr, 0)
                hdr.clear()
            else:
                version, ftype, flags, sid, length = _unpack_from(mv, pos)
                pos += HEADER_SIZE
            try:
                if version != 0:
                    raise ProtocolError(f"invalid protocol version {version}", send_go_away=False)
                if ftype == TYPE_DATA:
                    st = streams.get(sid)
                    if flags & FLAG_SYN or st is None:
                        st = self._incoming_syn(sid, flags, events) if flags & FLAG_SYN else None
                    if st is not None:
                        if flags & FLAG_ACK:
                            self._on_ack(st, events)
                        if length > st.recv_window:
                            raise ProtocolError("receive window exceeded")
                        if length and st.app_closed:
                            # nobody will read it: tell the peer to stop
                            self.reset_stream(st)
                            events.append(StreamReset(sid, st))
                            st = None
                        else:
                            st.recv_window -= length
                    if not length:
                        if st is not None and flags & (FLAG_FIN | FLAG_RST):
                            self._stream_flags(st, flags, events)
                        continue
                    # fast path: the whole body is here
                    if n - pos >= length:
                        if st is not None:
                            st.recv_buf.append(bytes(mv[pos : pos + length]))
                            events.append(DataReceived(sid, st, length))
                            if flags & (FLAG_FIN | FLAG_RST):
                                self._stream_flags(st, flags, events)
                        pos += length
                        continue
                    self._body_left = length
                    self._body_stream = st
                    self._body_flags = flags & (FLAG_FIN | FLAG_RST)
                elif ftype == TYPE_WINDOW_UPDATE:
                    st = streams.get(sid)
                    if flags & FLAG_SYN:
                        st = self._incoming_syn(sid, flags, events)
                    if st is None:
                        continue
                    if flags & FLAG_ACK:
                        self._on_ack(st, events)
                    if flags & (FLAG_FIN | FLAG_RST):
                        self._stream_flags(st, flags, events)
                        if st.state == RESET:
                            continue
                    if length:
                        st.send_window += length
                        events.append(WindowUpdated(sid, st, length))
                elif ftype == TYPE_PING:
                    if flags & FLAG_SYN:
                        self._queue(_pack(0, TYPE_PING, FLAG_ACK, 0, length))
                    else:
                        events.append(PingAcked(length))
                elif ftype == TYPE_GO_AWAY:
                    if length == GoAwayCode.NORMAL:
                        self.remote_go_away = True
                        events.append(GoAwayReceived(length))
                    else:
                        events.append(ConnectionTerminated(length))
                        self.close()
                        return events
                else:
                    raise ProtocolError(f"invalid message type {ftype}", send_go_away=False)
            except ProtocolError as err:
                raise self._fail(err, events) from None
        return events

    def _incoming_syn(self, sid: int, flags: int, events: list[Event]) -> StreamState | None:
        if sid in self.streams:
            raise ProtocolError(f"duplicate stream declared: {sid}")
        cap = self.max_inbound_streams
        if (
            self.local_go_away
            or self.inbound_pending >= self.accept_backlog
            or (cap is not None and self.inbound_live >= cap)
        ):
            self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
            return None
        st = StreamState(sid, SYN_RECEIVED)
        st.ack_pending = True
        st.in_backlog = True
        self.inbound_pending += 1
        self.inbound_live += 1
        self.streams[sid] = st
        events.append(StreamOpened(sid, st))
        return st

    def _on_ack(self, st: StreamState, events: list[Event]) -> None:
        if st.syn_pending:
            st.syn_pending = False
            self.outbound_pending -= 1
            if st.state == SYN_SENT:
                st.state = ESTABLISHED
            events.append(StreamEstablished(st.id, st))

    def _stream_flags(self, st: StreamState, flags: int, events: list[Event]) -> None:
        """FIN then RST, with hashicorp's transitions (ACK handled before the window/payload)."""
        if flags & FLAG_FIN:
            s = st.state
            if s in (SYN_SENT, SYN_RECEIVED, ESTABLISHED):
                st.state = REMOTE_CLOSE
                events.append(StreamEnded(st.id, st))
            elif s == LOCAL_CLOSE:
                st.state = CLOSED
                self._forget(st)
                events.append(StreamEnded(st.id, st))
            else:
                raise ProtocolError(f"unexpected FIN flag in state {s} ({STATE_NAMES[s]})")
        if flags & FLAG_RST:
            st.state = RESET
            st.recv_buf.clear()
            self._forget(st)
            events.append(StreamReset(st.id, st))

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        return f"<Connection {role} streams={len(self.streams)} queued={self.out_len}>"


__all__ = [
    "CLOSED",
    "Connection",
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "PingAcked",
    "SessionClosedError",
    "StreamClosedError",
    "StreamEnded",
    "StreamEstablished",
    "StreamOpened",
    "StreamReset",
    "StreamResetError",
    "WindowUpdated",
]
