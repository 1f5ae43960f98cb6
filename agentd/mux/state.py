"""Per-stream state of the sans-I/O yamux core (hashicorp stream states and windows)."""

from __future__ import annotations

import collections
from typing import Any

from agentd.mux.frame import INITIAL_WINDOW

# Numbering matches hashicorp's streamState so error texts line up with Go's ("state 5").
INIT = 0
SYN_SENT = 1
SYN_RECEIVED = 2
ESTABLISHED = 3
LOCAL_CLOSE = 4
REMOTE_CLOSE = 5
CLOSED = 6
RESET = 7

STATE_NAMES = {
    INIT: "Init",
    SYN_SENT: "SYNSent",
    SYN_RECEIVED: "SYNReceived",
    ESTABLISHED: "Established",
    LOCAL_CLOSE: "LocalClose",
    REMOTE_CLOSE: "RemoteClose",
    CLOSED: "Closed",
    RESET: "Reset",
}

#: States in which the peer may still send us data / we may still send the peer data.
CAN_RECEIVE = frozenset({SYN_SENT, SYN_RECEIVED, ESTABLISHED, LOCAL_CLOSE})
CAN_SEND = frozenset({SYN_SENT, SYN_RECEIVED, ESTABLISHED, REMOTE_CLOSE})
#: States of a stream that has left the connection's table (nothing more goes out for it).
FINISHED = frozenset({CLOSED, RESET})

# ---- transitions ------------------------------------------------------------------------------------
# What moves a stream (hashicorp's stream.go: processFlags for what arrives, sendFlags / Close for
# what we send). `Connection._move` is the one place that applies them.

#: the peer ACKed a stream we opened
ACK_RECEIVED = 0
#: we ACKed a stream the peer opened (on accept, or with an early FIN)
ACK_SENT = 1
#: we half-closed
FIN_SENT = 2
#: the peer half-closed
FIN_RECEIVED = 3
#: either side reset
RST = 4

_LIVE = (SYN_SENT, SYN_RECEIVED, ESTABLISHED, LOCAL_CLOSE, REMOTE_CLOSE)

#: TRANSITIONS[what happened][state] -> new state. A state missing from a row means the event does
#: not apply there: an ACK changes nothing, a FIN_SENT sends nothing, a FIN_RECEIVED is a protocol
#: error (hashicorp's "unexpected FIN flag in state N").
TRANSITIONS: tuple[dict[int, int], ...] = (
    # ACK_RECEIVED
    {SYN_SENT: ESTABLISHED},
    # ACK_SENT
    {SYN_RECEIVED: ESTABLISHED},
    # FIN_SENT
    {SYN_SENT: LOCAL_CLOSE, SYN_RECEIVED: LOCAL_CLOSE, ESTABLISHED: LOCAL_CLOSE, REMOTE_CLOSE: CLOSED},
    # FIN_RECEIVED
    {SYN_SENT: REMOTE_CLOSE, SYN_RECEIVED: REMOTE_CLOSE, ESTABLISHED: REMOTE_CLOSE, LOCAL_CLOSE: CLOSED},
    # RST (also after the FIN of the same frame closed the stream)
    dict.fromkeys((*_LIVE, CLOSED), RESET),
)


class RecvBuffer:
    """A stream's received bytes as the chunks they arrived in.

    Each Data body is copied once (out of the transport's read buffer) and handed to the reader as
    it is when the reader takes at least that much, so the common large read costs no further copy
    (a bytearray would copy in, then copy out, then re-grow).
    """

    __slots__ = ("_chunks", "_off", "_size")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        #: bytes of the first chunk already taken
        self._off = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __bytes__(self) -> bytes:
        data = b"".join(self._chunks)
        return data[self._off :] if self._off else data

    def append(self, chunk: bytes) -> None:
        if chunk:
            self._chunks.append(chunk)
            self._size += len(chunk)

    def clear(self) -> None:
        self._chunks.clear()
        self._off = 0
        self._size = 0

    def take(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` from the front (whole chunks when they fit: no copy)."""
        chunks = self._chunks
        if not chunks:
            return b""
        first = chunks[0]
        off = self._off
        avail = len(first) - off
        if max_bytes < avail:
            self._off = off + max_bytes
            self._size -= max_bytes
            return first[off : off + max_bytes]
        chunks.popleft()
        self._off = 0
        if off:
            first = first[off:]
        if avail >= max_bytes or not chunks:
            self._size -= avail
            return first
        # several chunks fit: join as many as fit, and part of the next
        parts = [first]
        got = avail
        while chunks and got < max_bytes:
            nxt = chunks[0]
            want = max_bytes - got
            if len(nxt) <= want:
                parts.append(chunks.popleft())
                got += len(nxt)
            else:
                parts.append(nxt[:want])
                self._off = want
                got += want
        self._size -= got
        return b"".join(parts)


class StreamState:
    """One stream's protocol state, receive buffer and windows.

    Plain slotted class (not attrs) because it sits on the per-frame hot path. The core changes
    `state` only through `TRANSITIONS`; `id`, `state`, `recv_buf` and the windows are for reading
    outside the core, `handle` is the I/O adapter's slot. The underscored flags are the core's
    bookkeeping of the open handshake and the backlogs (hashicorp keeps it in the session: inflight,
    synCh, acceptCh). The connection's table drops the stream once it is closed or reset; whoever
    still holds it (the application's stream object) can drain `recv_buf`.
    """

    __slots__ = (
        "_ack_pending",
        "_app_closed",
        "_in_backlog",
        "_syn_pending",
        "handle",
        "id",
        "recv_buf",
        "recv_window",
        "send_window",
        "state",
    )

    def __init__(self, stream_id: int, state: int) -> None:
        self.id = stream_id
        self.state = state
        self.recv_buf = RecvBuffer()
        self.recv_window = INITIAL_WINDOW
        self.send_window = INITIAL_WINDOW
        #: we opened it and no ACK/RST has arrived yet (counts against the outbound backlog)
        self._syn_pending = state == SYN_SENT
        #: the peer opened it and we have not sent the ACK yet (sent exactly once: on accept, or
        #: with a FIN sent before it)
        self._ack_pending = state == SYN_RECEIVED
        #: the peer opened it and the application has not accepted it yet (the accept backlog)
        self._in_backlog = state == SYN_RECEIVED
        #: the application closed both directions: later data from the peer is answered with RST
        self._app_closed = False
        #: slot for the I/O adapter's stream object
        self.handle: Any = None

    def __repr__(self) -> str:
        return f"<StreamState id={self.id} {STATE_NAMES[self.state]} buffered={len(self.recv_buf)}>"
