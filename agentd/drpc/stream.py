"""Sans-I/O DRPC transport state: one active RPC ("stream") at a time, as Go's drpcmanager.

A :class:`DrpcConnection` owns one transport's :class:`~agentd.drpc.wire.PacketParser`, the active
:class:`RpcStream` and an outgoing byte buffer.  ``receive_data(bytes)`` returns events; commands
(``invoke``, ``send_message``, ``close_send``, ``close``, ``send_error``, ``cancel``) queue bytes
that ``data_to_send()`` hands to the I/O layer, so a whole unary reply (Message + CloseSend) is one
write.  Semantics follow drpcstream (spec/wire.md B3-B5): three one-shot flags *send-closed*,
*recv-closed*, *terminated*; anything received after termination is ignored.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import attrs

from agentd.drpc.wire import (
    DrpcProtocolError,
    Kind,
    PacketParser,
    append_packet,
    decode_error,
    decode_metadata,
    encode_error,
    encode_metadata,
)

__all__ = [
    "DrpcConnection",
    "Event",
    "Invoked",
    "MessageReceived",
    "RecvClosed",
    "RemoteCancelled",
    "RemoteClosed",
    "RemoteError",
    "Role",
    "RpcClosedError",
    "RpcStream",
    "Superseded",
]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class RpcClosedError(Exception):
    """A local send on an RPC whose send side is closed or which has terminated."""


# ------------------------------------------------------------------------------------------ events


class Invoked(NamedTuple):
    """Server: the peer started RPC ``rpc`` on DRPC stream ``stream_id``."""

    stream_id: int
    rpc: str
    metadata: dict[str, str]


class MessageReceived(NamedTuple):
    stream_id: int
    data: bytes


class RecvClosed(NamedTuple):
    """The peer sent CloseSend: no more messages will arrive (reads see end of stream)."""

    stream_id: int


class RemoteClosed(NamedTuple):
    """The peer sent Close: the RPC is over in both directions."""

    stream_id: int


class RemoteError(NamedTuple):
    """The peer sent an Error packet: the RPC is over."""

    stream_id: int
    code: int
    message: str


class RemoteCancelled(NamedTuple):
    """The peer sent a (soft) Cancel: the RPC is over."""

    stream_id: int


class Superseded(NamedTuple):
    """Server: a packet for a newer stream implicitly cancelled the still-active RPC."""

    stream_id: int


Event = Invoked | MessageReceived | RecvClosed | RemoteClosed | RemoteError | RemoteCancelled | Superseded


# ------------------------------------------------------------------------------------------ stream


@attrs.define(slots=True)
class RpcStream:
    """State of one RPC on a transport (drpcstream's three signals plus our send sequence)."""

    stream_id: int
    rpc: str
    next_message_id: int = 1
    send_closed: bool = False
    recv_closed: bool = False
    terminated: bool = False

    def _next_id(self) -> int:
        mid = self.next_message_id
        self.next_message_id = mid + 1
        return mid


# -------------------------------------------------------------------------------------- connection


class DrpcConnection:
    """One DRPC transport (one mux stream under Coder): packet parsing, the active RPC, output."""

    __slots__ = ("_last_sid", "_metadata", "_out", "_parser", "_superseded", "packets", "role", "stream")

    def __init__(self, role: Role, *, max_packet_size: int | None = None) -> None:
        self.role = role
        self._parser = PacketParser() if max_packet_size is None else PacketParser(max_packet_size)
        self._out = bytearray()
        #: The current (possibly finished) RPC, or None before the first one.
        self.stream: RpcStream | None = None
        self._last_sid = 0
        self._metadata: tuple[int, dict[str, str]] | None = None
        self._superseded: Superseded | None = None
        #: complete packets received so far
        self.packets = 0

    # ------------------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """Take the queued bytes (possibly empty)."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def pending(self) -> int:
        """Received bytes held for packets not yet complete (see PacketParser.pending)."""
        return self._parser.pending

    @property
    def active(self) -> bool:
        """An RPC is in progress (not yet terminated)."""
        return self.stream is not None and not self.stream.terminated

    # ------------------------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed transport bytes; return the resulting events.  Raises DrpcProtocolError."""
        events: list[Event] = []
        for pkt in self._parser.feed(data):
            self.packets += 1
            ev = self._packet(pkt.kind, pkt.stream_id, pkt.data)
            if self._superseded is not None:
                events.append(self._superseded)
                self._superseded = None
            if ev is not None:
                events.append(ev)
        return events

    def _packet(self, kind: int, sid: int, data: bytes) -> Event | None:
        cur = self.stream
        if cur is not None and sid < cur.stream_id:
            return None  # a finished stream's stragglers
        if cur is None or sid > cur.stream_id:
            return self._new_stream_packet(kind, sid, data)
        if kind == Kind.INVOKE:
            raise DrpcProtocolError("invoke on existing stream")
        if cur.terminated or kind == Kind.INVOKE_METADATA:
            return None
        if kind == Kind.MESSAGE:
            if cur.recv_closed:
                return None
            return MessageReceived(sid, data)
        if kind == Kind.CLOSE_SEND:
            if cur.recv_closed:
                return None
            cur.recv_closed = True
            if cur.send_closed:
                cur.terminated = True
            return RecvClosed(sid)
        cur.terminated = True
        cur.recv_closed = True
        if kind == Kind.CLOSE:
            return RemoteClosed(sid)
        if kind == Kind.ERROR:
            code, message = decode_error(data)
            return RemoteError(sid, code, message)
        return RemoteCancelled(sid)  # Kind.CANCEL (the parser only yields known kinds)

    def _new_stream_packet(self, kind: int, sid: int, data: bytes) -> Event | None:
        if self.role is Role.CLIENT:
            raise DrpcProtocolError(f"packet for unknown stream {sid}")
        superseded = self._supersede()
        if superseded is not None:
            self._superseded = superseded
        if kind == Kind.INVOKE_METADATA:
            self._metadata = (sid, decode_metadata(data))
            return None
        if kind != Kind.INVOKE:
            return None  # Go cancels the active RPC and waits for this stream's Invoke
        try:
            rpc = data.decode()
        except UnicodeDecodeError as exc:
            raise DrpcProtocolError("rpc name is not UTF-8") from exc
        metadata: dict[str, str] = {}
        if self._metadata is not None:
            if self._metadata[0] == sid:
                metadata = self._metadata[1]
            self._metadata = None
        self.stream = RpcStream(sid, rpc)
        self._last_sid = sid
        return Invoked(sid, rpc, metadata)

    def _supersede(self) -> Superseded | None:
        cur = self.stream
        if cur is None or cur.terminated:
            return None
        cur.terminated = True
        return Superseded(cur.stream_id)

    # ---------------------------------------------------------------------------- commands

    def invoke(self, rpc: str, metadata: dict[str, str] | None = None) -> RpcStream:
        """Client: start RPC ``rpc`` on the next stream id (Invoke is queued, not flushed)."""
        if self.role is not Role.CLIENT:
            raise RuntimeError("only a client invokes")
        if self.active:
            raise RuntimeError("an RPC is already active on this transport")
        sid = self._last_sid + 1
        self._last_sid = sid
        st = RpcStream(sid, rpc)
        self.stream = st
        if metadata:
            append_packet(self._out, Kind.INVOKE_METADATA, sid, st._next_id(), encode_metadata(metadata))
        append_packet(self._out, Kind.INVOKE, sid, st._next_id(), rpc.encode())
        return st

    def _current(self) -> RpcStream:
        st = self.stream
        if st is None:
            raise RpcClosedError("no RPC on this transport")
        return st

    def send_message(self, data: bytes | bytearray | memoryview) -> None:
        """Queue a Message packet; raises RpcClosedError after CloseSend or termination."""
        st = self._current()
        if st.terminated or st.send_closed:
            raise RpcClosedError("send on a closed RPC")
        append_packet(self._out, Kind.MESSAGE, st.stream_id, st._next_id(), data)

    def close_send(self) -> bool:
        """Queue CloseSend (half-close); no-op (False) if already send-closed or terminated."""
        st = self._current()
        if st.terminated or st.send_closed:
            return False
        append_packet(self._out, Kind.CLOSE_SEND, st.stream_id, st._next_id())
        st.send_closed = True
        if st.recv_closed:
            st.terminated = True
        return True

    def close(self) -> bool:
        """Queue Close (the RPC is dead both ways); no-op (False) if already terminated."""
        st = self._current()
        if st.terminated:
            return False
        append_packet(self._out, Kind.CLOSE, st.stream_id, st._next_id())
        st.terminated = st.send_closed = True
        return True

    def send_error(self, code: int, message: str) -> bool:
        """Queue an Error packet, terminating the RPC; no-op (False) if already terminated."""
        st = self._current()
        if st.terminated:
            return False
        append_packet(self._out, Kind.ERROR, st.stream_id, st._next_id(), encode_error(code, message))
        st.terminated = st.send_closed = True
        return True

    def cancel(self) -> bool:
        """Queue a soft Cancel (control bit set), terminating the RPC; no-op if terminated."""
        st = self._current()
        if st.terminated:
            return False
        append_packet(self._out, Kind.CANCEL, st.stream_id, st._next_id(), control=True)
        st.terminated = st.send_closed = True
        return True
