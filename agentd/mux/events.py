"""Events of the sans-I/O yamux core: what `Connection.receive_data` reports.

Small NamedTuples (one allocation each, no per-frame objects beyond them); the stream events carry
the core's `StreamState`, whose `handle` is the I/O adapter's stream object.
"""

from __future__ import annotations

from typing import NamedTuple

from agentd.mux.errors import ProtocolError
from agentd.mux.state import StreamState


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
    """GoAway with an error code: the peer ended the session (always the last event)."""

    code: int


class ProtocolViolated(NamedTuple):
    """The peer broke the protocol: the session is over (always the last event). The GoAway that
    says so, if `error.send_go_away`, is queued in `data_to_send()`."""

    error: ProtocolError


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
    | ProtocolViolated
)

__all__ = [
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
