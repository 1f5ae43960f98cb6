"""yamux frame codec: the 12-byte header, frame types, flags and GoAway codes.

Pure functions over bytes (no I/O). The layout is hashicorp/yamux v0.1.2's: version(1) type(1)
flags(2) stream id(4) length(4), all big-endian; only Data frames carry a body of `length` bytes.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = 12
PROTO_VERSION = 0

#: Initial per-stream window in both directions (fixed by the protocol, not configurable).
INITIAL_WINDOW = 256 * 1024
#: Stream ids at or above this are never allocated (Go's ErrStreamsExhausted bound).
MAX_STREAM_ID = 2**32 - 2

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8


class GoAwayCode(enum.IntEnum):
    """GoAway reasons; NORMAL only stops new streams, the others end the session."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class Frame(NamedTuple):
    """One decoded frame; `body` is empty for every type but Data."""

    version: int
    type: int
    flags: int
    stream_id: int
    length: int
    body: bytes = b""


def encode_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    """The 12 header bytes (version 0)."""
    return HEADER.pack(PROTO_VERSION, ftype, flags, stream_id, length)


def encode_frame(frame: Frame) -> bytes:
    """Header plus body; for Data frames `length` must equal len(body)."""
    if frame.type == TYPE_DATA and frame.length != len(frame.body):
        raise ValueError("data frame length does not match its body")
    if frame.type != TYPE_DATA and frame.body:
        raise ValueError("only data frames carry a body")
    return HEADER.pack(frame.version, frame.type, frame.flags, frame.stream_id, frame.length) + frame.body


def decode_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int, int, int, int]:
    """(version, type, flags, stream_id, length) from 12 bytes at `offset`; no validation."""
    return HEADER.unpack_from(buf, offset)


class FrameDecoder:
    """Incremental decoder: feed arbitrary byte chunks, get complete frames back.

    Used by tests and tools; the session parses inline (same layout) so that Data bodies go straight
    into stream buffers. Does not validate version/type: that is the session's job.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        self._buf += data
        out: list[Frame] = []
        buf = self._buf
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_SIZE:
            version, ftype, flags, sid, length = HEADER.unpack_from(buf, pos)
            body = b""
            if ftype == TYPE_DATA:
                if n - pos - HEADER_SIZE < length:
                    break
                body = bytes(buf[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
                pos += length
            pos += HEADER_SIZE
            out.append(Frame(version, ftype, flags, sid, length, body))
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)
