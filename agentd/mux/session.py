"""Sans-I/O yamux session: bytes in -> events, commands -> bytes out.

Behaviour follows hashicorp/yamux v0.1.2 (spec/wire.md Part A): flags processed ACK, FIN, RST; Go's
half-window credit rule; protocol errors (window overrun, duplicate SYN, unexpected FIN, bad version,
unknown type) end the session; frames for unknown streams are ignored; inbound SYNs beyond the accept
backlog, beyond `max_inbound_streams` live peer-opened streams (an agentd extension: bounds what one
peer can make us hold) or after a local GoAway are answered with RST without involving the application.

Shape (as hashicorp's session.go): `receive_data` cuts the bytes into frames and hands each to the
handler of its type (`_on_data`, `_on_window_update`, `_on_ping`, `_on_go_away`); stream states move
only through `_move` (the table is `state.TRANSITIONS`). A protocol error is never raised: it ends
the session and comes back as the last event (`ProtocolViolated`).

The parser is written for speed: one pass over each received chunk with `struct.unpack_from`, Data
bodies copied straight into the stream's buffer (also when a body spans several chunks), no per-frame
objects other than the events the caller needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from agentd.mux.errors import (
    MuxError,
    ProtocolError,
    SessionClosedError,
    StreamClosedError,
    StreamResetError,
)
from agentd.mux.events import (
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
    ACK_RECEIVED,
    ACK_SENT,
    CAN_RECEIVE,
    CAN_SEND,
    CLOSED,
    FIN_RECEIVED,
    FIN_SENT,
    FINISHED,
    LOCAL_CLOSE,
    REMOTE_CLOSE,
    RESET,
    RST,
    STATE_NAMES,
    SYN_RECEIVED,
    SYN_SENT,
    TRANSITIONS,
    StreamState,
)

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_FIN_OR_RST = FLAG_FIN | FLAG_RST

#: `Connection.read_status`: what a stream with nothing buffered has for its reader
#: more may come: wait for DataReceived / StreamEnded / StreamReset
READ_WAIT = 0
#: the peer half-closed: end of stream
READ_EOF = 1
#: the stream was reset (by either side)
READ_RESET = 2
#: the session ended while the stream was open
READ_SESSION_ENDED = 3


class Connection:
    """One end of a yamux session, without I/O.

    Feed received transport bytes to `receive_data`; after any call, `data_to_send()` holds the bytes
    to write, in order. The caller owns timers (keepalive, open and close timeouts) and calls the
    corresponding commands; the query methods (`open_pending`, `close_pending`, `send_blocked`,
    `read_status`, `outbound_backlog_full`) tell it when to wait and what a timer still applies to.
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
        #: bytes queued in data_to_send() (read-only outside the core: the writer's measure)
        self.out_len = 0
        self._out: list[bytes | memoryview] = []
        self._max_window = max_stream_window
        self._half_window = max_stream_window // 2
        self._accept_backlog = accept_backlog
        #: cap on live peer-opened streams (accepted or not, until closed/reset); None: no cap
        self._max_inbound = max_inbound_streams
        self._streams: dict[int, StreamState] = {}
        self._next_id = 1 if is_client else 2
        #: our streams the peer has not ACKed (or reset) yet (hashicorp's inflight, bounded by the
        #: accept backlog)
        self._outbound_pending = 0
        #: peer-opened streams the application has not accepted yet (the accept backlog)
        self._inbound_pending = 0
        #: peer-opened streams still in the table
        self._inbound_live = 0
        self._local_go_away = False
        self._remote_go_away = False
        self._ping_id = 0
        self._closed = False
        self._error: ProtocolError | None = None
        #: streams that were open when the session ended, until `close()` hands them out
        self._dead: list[StreamState] = []
        # parser state: a header split across reads, a Data body still arriving
        self._hdr = bytearray()
        self._body_left = 0
        self._body_stream: StreamState | None = None
        self._body_flags = 0

    # ---- queries ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def error(self) -> ProtocolError | None:
        """The protocol error that ended the session, if one did."""
        return self._error

    @property
    def streams(self) -> Mapping[int, StreamState]:
        """The live streams by id (a read-only view)."""
        return MappingProxyType(self._streams)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    @property
    def outbound_pending(self) -> int:
        """Streams we opened that the peer has not ACKed (or reset) yet."""
        return self._outbound_pending

    @property
    def inbound_pending(self) -> int:
        """Peer-opened streams not accepted yet."""
        return self._inbound_pending

    @property
    def inbound_live(self) -> int:
        """Peer-opened streams in the table (what `max_inbound_streams` caps)."""
        return self._inbound_live

    def outbound_backlog_full(self) -> bool:
        """`accept_backlog` of our streams wait for their ACK: open_stream should wait (for an ACK,
        a RST, or a FIN that ends an unACKed stream: StreamEstablished / StreamReset / StreamEnded)."""
        return self._outbound_pending >= self._accept_backlog

    def open_pending(self, st: StreamState) -> bool:
        """We opened `st` and wait for the peer's ACK (the open timeout applies)."""
        return st._syn_pending and not self._closed

    def close_pending(self, st: StreamState) -> bool:
        """We half-closed `st` and wait for the peer's FIN (the close timeout applies)."""
        return st.state == LOCAL_CLOSE and not self._closed

    def send_blocked(self, st: StreamState) -> bool:
        """A send on `st` would take nothing (window empty) yet not fail: wait for WindowUpdated."""
        return st.send_window <= 0 and st.state in CAN_SEND and not self._closed

    def read_status(self, st: StreamState) -> int:
        """For a reader that found `st.recv_buf` empty: READ_WAIT, READ_EOF, READ_RESET or
        READ_SESSION_ENDED."""
        s = st.state
        if s == RESET:
            return READ_RESET
        if s in (REMOTE_CLOSE, CLOSED):
            return READ_EOF
        if self._closed:
            return READ_SESSION_ENDED
        return READ_WAIT

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
        if self._closed:
            raise SessionClosedError("session closed")
        if self._remote_go_away:
            raise MuxError("remote end is not accepting connections")
        sid = self._next_id
        if sid >= MAX_STREAM_ID:
            raise MuxError("stream ids exhausted")
        self._next_id = sid + 2
        st = StreamState(sid, SYN_SENT)
        st.recv_window = self._max_window  # the SYN's delta grants the peer the extra credit
        self._outbound_pending += 1
        self._streams[sid] = st
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, sid, self._max_window - INITIAL_WINDOW))
        return st

    def accept_stream(self, st: StreamState) -> None:
        """The application took `st` from the backlog: send the ACK (exactly once)."""
        if st._in_backlog:
            st._in_backlog = False
            self._inbound_pending -= 1
        if not st._ack_pending:
            return
        st._ack_pending = False
        if self._closed or st.state in FINISHED:
            return
        self._move(st, ACK_SENT)
        delta = (self._max_window - len(st.recv_buf)) - st.recv_window
        if delta < 0:
            delta = 0
        st.recv_window += delta
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_ACK, st.id, delta))

    def send_data(self, st: StreamState, data: bytes | memoryview) -> int:
        """Queue one Data frame of up to the peer's window; returns how many bytes it took (0: window
        empty). `data` must not change afterwards (pass bytes or a view of bytes)."""
        if st.state not in CAN_SEND or self._closed:
            self._raise_send_error(st)
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
        if self._closed and st.state not in FINISHED:
            raise SessionClosedError("session closed")
        raise StreamClosedError("stream closed")

    def read(self, st: StreamState, max_bytes: int) -> bytes:
        """Take up to `max_bytes` buffered bytes and return window credit per Go's half-window rule."""
        buf = st.recv_buf
        data = buf.take(max_bytes)
        if data and st.state in CAN_RECEIVE and not self._closed:
            delta = (self._max_window - len(buf)) - st.recv_window
            if delta >= self._half_window:
                st.recv_window += delta
                self._queue(_pack(0, TYPE_WINDOW_UPDATE, 0, st.id, delta))
        return data

    def end_stream(self, st: StreamState) -> None:
        """Half-close (send FIN), per hashicorp's Close(); a no-op when already closed or reset."""
        if self._closed or not self._move(st, FIN_SENT):
            return
        flags = FLAG_FIN
        if st._ack_pending:
            st._ack_pending = False
            flags |= FLAG_ACK
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, flags, st.id, 0))

    def close_stream(self, st: StreamState) -> None:
        """The application closed both directions: FIN, drop unread data; data that still arrives
        is answered with RST (so the peer's writer learns nobody reads)."""
        st._app_closed = True
        dropped = len(st.recv_buf)
        st.recv_buf.clear()
        if dropped and st.state in CAN_RECEIVE and not self._closed:
            # hand the dropped bytes' credit back so a writer blocked on our window wakes up,
            # sends, and learns from the RST that nobody reads any more
            delta = self._max_window - st.recv_window
            if delta > 0:
                st.recv_window += delta
                self._queue(_pack(0, TYPE_WINDOW_UPDATE, 0, st.id, delta))
        self.end_stream(st)

    def reset_stream(self, st: StreamState) -> None:
        """Abort: RST to the peer, unread data dropped, stream forgotten."""
        st.recv_buf.clear()
        if self._closed or st.state in FINISHED:
            # already out of the table: nothing to send, but from now on it reads as reset
            st.state = RESET
            return
        self._move(st, RST)
        self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, st.id, 0))

    def ping(self) -> int:
        """Queue a ping request; returns its opaque id (PingAcked carries it back)."""
        if self._closed:
            raise SessionClosedError("session closed")
        pid = self._ping_id
        self._ping_id = (pid + 1) & 0xFFFFFFFF
        self._queue(_pack(0, TYPE_PING, FLAG_SYN, 0, pid))
        return pid

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Queue a GoAway; from now on inbound SYNs are answered with RST."""
        if self._closed:
            raise SessionClosedError("session closed")
        self._local_go_away = True
        self._queue(_pack(0, TYPE_GO_AWAY, 0, 0, int(code)))

    def close(self) -> list[StreamState]:
        """End the session (idempotent): every stream is dropped from the table and reads as ended.

        Returns the streams that were open when the session ended (also when `receive_data` ended
        it), each once, so an adapter can wake whoever waits on them."""
        self._end()
        dead = self._dead
        self._dead = []
        return dead

    def _end(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._dead = list(self._streams.values())
        self._streams.clear()
        self._inbound_live = 0

    # ---- stream states ---------------------------------------------------------------------------

    def _move(self, st: StreamState, event: int) -> bool:
        """Apply `event` (ACK_RECEIVED, ACK_SENT, FIN_SENT, FIN_RECEIVED, RST) to `st` per
        TRANSITIONS; False if it does not apply in `st`'s state. A stream that ends leaves the table."""
        new = TRANSITIONS[event].get(st.state)
        if new is None:
            return False
        st.state = new
        if new in FINISHED:
            sid = st.id
            if self._streams.pop(sid, None) is not None and (sid ^ self._next_id) & 1:
                self._inbound_live -= 1  # the peer's ids have the other parity
            if st._syn_pending:
                st._syn_pending = False
                self._outbound_pending -= 1
        return True

    # ---- input -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse transport bytes (any split) into events. A protocol error ends the session and is
        the last event (`ProtocolViolated`); once the session is over, nothing is parsed."""
        events: list[Event] = []
        if self._closed:
            return events
        try:
            self._receive(memoryview(data), events)
        except ProtocolError as err:
            self._error = err
            if err.send_go_away:
                self._queue(_pack(0, TYPE_GO_AWAY, 0, 0, int(err.code)))
            self._end()
            events.append(ProtocolViolated(err))
        return events

    def _receive(self, mv: memoryview, events: list[Event]) -> None:
        """Cut `mv` into frames and hand each to its type's handler."""
        n = len(mv)
        pos = 0
        while pos < n:
            if self._body_left:
                pos = self._on_data_body(mv, pos, n, events)
                continue
            if self._hdr or n - pos < HEADER_SIZE:
                hdr = self._hdr
                take = HEADER_SIZE - len(hdr)
                hdr += mv[pos : pos + take]
                pos += take
                if len(hdr) < HEADER_SIZE:
                    return
                version, ftype, flags, sid, length = _unpack_from(hdr, 0)
                hdr.clear()
            else:
                version, ftype, flags, sid, length = _unpack_from(mv, pos)
                pos += HEADER_SIZE
            if version != 0:
                raise ProtocolError(f"invalid protocol version {version}", send_go_away=False)
            if ftype == TYPE_DATA:
                pos = self._on_data(mv, pos, n, flags, sid, length, events)
            elif ftype == TYPE_WINDOW_UPDATE:
                self._on_window_update(flags, sid, length, events)
            elif ftype == TYPE_PING:
                self._on_ping(flags, length, events)
            elif ftype == TYPE_GO_AWAY:
                if self._on_go_away(length, events):
                    return
            else:
                raise ProtocolError(f"invalid message type {ftype}", send_go_away=False)

    def _on_data(
        self, mv: memoryview, pos: int, n: int, flags: int, sid: int, length: int, events: list[Event]
    ) -> int:
        """A Data header at `mv[pos - 12]`: take its body from `pos` on; returns where it ends (or
        `pos` when the body continues in later reads: `_on_data_body`)."""
        st = self._on_syn(sid, events) if flags & FLAG_SYN else self._streams.get(sid)
        if st is not None:
            if flags & FLAG_ACK:
                self._on_ack(st, events)
            if length > st.recv_window:
                raise ProtocolError("receive window exceeded")
            if length and st._app_closed:
                self._reset_unread(st, events)
                st = None
            else:
                st.recv_window -= length
        if not length:
            if st is not None and flags & _FIN_OR_RST:
                self._on_close_flags(st, flags, events)
            return pos
        if n - pos >= length:
            # the whole body is here
            if st is not None:
                st.recv_buf.append(bytes(mv[pos : pos + length]))
                events.append(DataReceived(sid, st, length))
                if flags & _FIN_OR_RST:
                    self._on_close_flags(st, flags, events)
            return pos + length
        self._body_left = length
        self._body_stream = st
        self._body_flags = flags & _FIN_OR_RST
        return pos

    def _on_data_body(self, mv: memoryview, pos: int, n: int, events: list[Event]) -> int:
        """More of a Data body that spans reads (possibly for an ignored stream); its FIN/RST apply
        once it is complete. Returns where this read's part of it ends."""
        left = self._body_left
        take = n - pos
        if take > left:
            take = left
        st = self._body_stream
        left -= take
        self._body_left = left
        if st is not None and st.state not in FINISHED:
            if st._app_closed:
                self._reset_unread(st, events)
                self._body_stream = st = None
            else:
                st.recv_buf.append(bytes(mv[pos : pos + take]))
                events.append(DataReceived(st.id, st, take))
        if not left:
            self._body_stream = None
            if st is not None and self._body_flags and st.state not in FINISHED:
                self._on_close_flags(st, self._body_flags, events)
        return pos + take

    def _on_window_update(self, flags: int, sid: int, delta: int, events: list[Event]) -> None:
        st = self._on_syn(sid, events) if flags & FLAG_SYN else self._streams.get(sid)
        if st is None:
            return
        if flags & FLAG_ACK:
            self._on_ack(st, events)
        if flags & _FIN_OR_RST:
            self._on_close_flags(st, flags, events)
            if st.state == RESET:
                return
        if delta:
            st.send_window += delta
            events.append(WindowUpdated(sid, st, delta))

    def _on_ping(self, flags: int, opaque: int, events: list[Event]) -> None:
        if flags & FLAG_SYN:
            self._queue(_pack(0, TYPE_PING, FLAG_ACK, 0, opaque))
        else:
            events.append(PingAcked(opaque))

    def _on_go_away(self, code: int, events: list[Event]) -> bool:
        """True if it ended the session (an error code)."""
        if code == GoAwayCode.NORMAL:
            self._remote_go_away = True
            events.append(GoAwayReceived(code))
            return False
        events.append(ConnectionTerminated(code))
        self._end()
        return True

    def _on_syn(self, sid: int, events: list[Event]) -> StreamState | None:
        """The peer opens `sid`: a new stream in the backlog, or None if refused (RST queued)."""
        if sid in self._streams:
            raise ProtocolError(f"duplicate stream declared: {sid}")
        cap = self._max_inbound
        if (
            self._local_go_away
            or self._inbound_pending >= self._accept_backlog
            or (cap is not None and self._inbound_live >= cap)
        ):
            self._queue(_pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
            return None
        st = StreamState(sid, SYN_RECEIVED)
        self._inbound_pending += 1
        self._inbound_live += 1
        self._streams[sid] = st
        events.append(StreamOpened(sid, st))
        return st

    def _on_ack(self, st: StreamState, events: list[Event]) -> None:
        if st._syn_pending:
            st._syn_pending = False
            self._outbound_pending -= 1
            self._move(st, ACK_RECEIVED)
            events.append(StreamEstablished(st.id, st))

    def _on_close_flags(self, st: StreamState, flags: int, events: list[Event]) -> None:
        """FIN then RST (the ACK was handled before the window or payload)."""
        if flags & FLAG_FIN:
            if not self._move(st, FIN_RECEIVED):
                s = st.state
                raise ProtocolError(f"unexpected FIN flag in state {s} ({STATE_NAMES[s]})")
            events.append(StreamEnded(st.id, st))
        if flags & FLAG_RST:
            st.recv_buf.clear()
            self._move(st, RST)
            events.append(StreamReset(st.id, st))

    def _reset_unread(self, st: StreamState, events: list[Event]) -> None:
        """Data for a stream the application closed: nobody will read it, tell the peer to stop."""
        self.reset_stream(st)
        events.append(StreamReset(st.id, st))

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        return f"<Connection {role} streams={len(self._streams)} queued={self.out_len}>"


__all__ = [
    "READ_EOF",
    "READ_RESET",
    "READ_SESSION_ENDED",
    "READ_WAIT",
    "Connection",
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "PingAcked",
    "ProtocolViolated",
    "StreamEnded",
    "StreamEstablished",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
]
