"""DRPC wire codec (storj drpcwire): varints, frames, packets, error bodies and metadata.

Pure functions and one incremental parser; no I/O.  The parser is a streaming parser: it ignores
transport boundaries (one packet may arrive one byte at a time, many packets may share one read).
Every malformed input raises :class:`DrpcProtocolError` and nothing else.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

import attrs

__all__ = [
    "MAX_PACKET_SIZE",
    "MAX_VARINT_LEN",
    "SPLIT_SIZE",
    "DrpcProtocolError",
    "Frame",
    "Kind",
    "Packet",
    "PacketParser",
    "append_frame",
    "append_packet",
    "append_varint",
    "decode_error",
    "decode_metadata",
    "encode_error",
    "encode_metadata",
    "parse_frame",
    "read_varint",
]

#: Largest message/packet body (Coder sets drpc's MaximumBufferSize to 4 MiB explicitly).
MAX_PACKET_SIZE = 4 * 1024 * 1024
#: Go splits packets into frames of at most this much data.
SPLIT_SIZE = 64 * 1024
#: An unsigned 64-bit varint never needs more than 10 bytes.
MAX_VARINT_LEN = 10
_U64_MAX = (1 << 64) - 1
# A frame header is at most 1 control byte + 3 varints.
_MAX_HEADER_LEN = 1 + 3 * MAX_VARINT_LEN


class DrpcProtocolError(Exception):
    """The peer broke the DRPC protocol; the transport (one mux stream) must be closed."""


class Kind(enum.IntEnum):
    """Packet kinds (bits 6..1 of the control byte)."""

    INVOKE = 1
    MESSAGE = 2
    ERROR = 3
    CANCEL = 4
    CLOSE = 5
    CLOSE_SEND = 6
    INVOKE_METADATA = 7


_KNOWN_KINDS = frozenset(int(k) for k in Kind)


# ---------------------------------------------------------------------------------------- varints


def append_varint(buf: bytearray, value: int) -> None:
    """Append ``value`` (0 ≤ value < 2**64) as a protobuf/LEB128 varint."""
    if value < 0 or value > _U64_MAX:
        raise ValueError(f"varint out of range: {value}")
    while value >= 0x80:
        buf.append((value & 0x7F) | 0x80)
        value >>= 7
    buf.append(value)


def read_varint(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """Decode a varint at ``pos``; return ``(value, next_pos)`` or None if more bytes are needed.

    Raises DrpcProtocolError when the 10th byte still has the continuation bit (Go: "varint too long")
    or the value does not fit in 64 bits.
    """
    end = len(data)
    value = 0
    shift = 0
    for i in range(MAX_VARINT_LEN):
        if pos + i >= end:
            return None
        b = data[pos + i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value > _U64_MAX:
                raise DrpcProtocolError("varint overflows 64 bits")
            return value, pos + i + 1
        shift += 7
    raise DrpcProtocolError("varint too long")


# ----------------------------------------------------------------------------------------- frames


@attrs.frozen(slots=True)
class Frame:
    """One wire frame; frames with the same (stream, message) id concatenate into a packet."""

    kind: int
    stream_id: int
    message_id: int
    data: bytes
    done: bool = True
    control: bool = False


class Packet(NamedTuple):
    """One assembled packet: a logical message of one kind (a tuple: packets are hot)."""

    kind: int
    stream_id: int
    message_id: int
    data: bytes
    control: bool = False


def _control_byte(kind: int, done: bool, control: bool) -> int:
    if not 0 <= kind < 64:
        raise ValueError(f"kind out of range: {kind}")
    return (0x80 if control else 0) | (kind << 1) | (1 if done else 0)


def append_frame(buf: bytearray, frame: Frame) -> None:
    """Append one encoded frame."""
    buf.append(_control_byte(frame.kind, frame.done, frame.control))
    append_varint(buf, frame.stream_id)
    append_varint(buf, frame.message_id)
    append_varint(buf, len(frame.data))
    buf += frame.data


def parse_frame(data: bytes | bytearray | memoryview, pos: int = 0) -> tuple[Frame, int] | None:
    """Parse one frame at ``pos``: ``(frame, next_pos)``, or None if incomplete.

    Does not apply the packet size limit; :class:`PacketParser` does.
    """
    header = _parse_header(data, pos)
    if header is None:
        return None
    cb, sid, mid, length, body = header
    if len(data) - body < length:
        return None
    frame = Frame(
        kind=(cb & 0x7E) >> 1,
        stream_id=sid,
        message_id=mid,
        data=bytes(data[body : body + length]),
        done=bool(cb & 1),
        control=bool(cb & 0x80),
    )
    return frame, body + length


def _parse_header(data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int, int, int] | None:
    # Go waits for at least 4 bytes (control + three 1-byte varints) before parsing.
    if len(data) - pos < 4:
        return None
    cb = data[pos]
    r = read_varint(data, pos + 1)
    if r is None:
        return None
    sid, p = r
    r = read_varint(data, p)
    if r is None:
        return None
    mid, p = r
    r = read_varint(data, p)
    if r is None:
        return None
    length, p = r
    return cb, sid, mid, length, p


def append_packet(
    buf: bytearray,
    kind: int,
    stream_id: int,
    message_id: int,
    data: bytes | bytearray | memoryview = b"",
    *,
    control: bool = False,
    split_size: int = SPLIT_SIZE,
) -> None:
    """Append a packet as frames of at most ``split_size`` data bytes (Go: 64 KiB); empty → one frame."""
    n = len(data)
    if n <= split_size:
        # Fast path (almost every packet): one frame, header built inline.
        if (stream_id | message_id | n) < 0x80 and 0 <= kind < 64 and stream_id >= 0 and message_id >= 0:
            buf += bytes(((0x81 if control else 1) | (kind << 1), stream_id, message_id, n))
        else:
            buf.append(_control_byte(kind, True, control))
            append_varint(buf, stream_id)
            append_varint(buf, message_id)
            append_varint(buf, n)
        buf += data
        return
    view = memoryview(data)
    for off in range(0, n, split_size):
        chunk = view[off : off + split_size]
        done = off + split_size >= n
        buf.append(_control_byte(kind, done, control))
        append_varint(buf, stream_id)
        append_varint(buf, message_id)
        append_varint(buf, len(chunk))
        buf += chunk


# ------------------------------------------------------------------------------- packet assembly


class PacketParser:
    """Incremental frame reader and packet assembler with Go drpcwire.Reader's rules.

    * ids ``(stream, message)`` must not go below the expected id (starts at (1, 1); after a
      packet it becomes (stream, message + 1)), else "id monotonicity violation";
    * a frame with a larger id discards a partially assembled packet;
    * a kind change inside one packet is an error;
    * packets over ``max_size`` bytes (and frames that could only build one) are "data overflow";
    * packets with an unknown kind are dropped if they carry the control bit, else an error.
    """

    __slots__ = ("_buf", "_control", "_data", "_kind", "_max", "_mid", "_partial", "_sid")

    def __init__(self, max_size: int = MAX_PACKET_SIZE) -> None:
        self._buf = bytearray()  # an incomplete frame (grows in place: no quadratic copying)
        self._max = max_size
        self._sid = 1
        self._mid = 1
        self._partial = False
        self._kind = 0
        self._control = False
        self._data = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    @property
    def pending(self) -> int:
        """Bytes held for packets not yet complete: an incomplete frame plus a partially assembled
        packet (each bounded by ``max_size``)."""
        return len(self._buf) + len(self._data)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Consume transport bytes; return the packets they complete (possibly none)."""
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data if type(data) is bytes else bytes(data)
        out: list[Packet] = []
        pos = 0
        n = len(buf)
        try:
            while n - pos >= 4:
                cb = buf[pos]
                sid = buf[pos + 1]
                mid = buf[pos + 2]
                length = buf[pos + 3]
                if (sid | mid | length) < 0x80:
                    body = pos + 4  # the usual case: three one-byte varints
                else:
                    header = _parse_header(buf, pos)
                    if header is None:
                        break
                    cb, sid, mid, length, body = header
                if length > self._max:
                    raise DrpcProtocolError("data overflow")
                end = body + length
                if end > n:
                    break
                pos = end
                if sid == self._sid and mid == self._mid and not self._partial and cb & 1:
                    # Fast path: a single-frame packet with exactly the expected id.
                    self._mid = mid + 1
                    kind = (cb & 0x7E) >> 1
                    if kind in _KNOWN_KINDS:
                        out.append(Packet(kind, sid, mid, bytes(buf[body:end]), bool(cb & 0x80)))
                    elif not cb & 0x80:
                        raise DrpcProtocolError(f"unknown packet kind {kind}")
                    continue
                pkt = self._frame(cb, sid, mid, bytes(buf[body:end]))
                if pkt is not None:
                    out.append(pkt)
        finally:
            if buf is self._buf:
                del self._buf[:pos]
            elif pos < n:
                self._buf = bytearray(buf[pos:])
        return out

    def _frame(self, cb: int, sid: int, mid: int, data: bytes) -> Packet | None:
        kind = (cb & 0x7E) >> 1
        if sid < self._sid or (sid == self._sid and mid < self._mid):
            raise DrpcProtocolError("id monotonicity violation")
        if sid != self._sid or mid != self._mid:
            # A newer id: whatever was partially assembled is abandoned (Go does the same).
            self._sid = sid
            self._mid = mid
            self._partial = False
            self._data = bytearray()
        if self._partial:
            if kind != self._kind:
                raise DrpcProtocolError("packet kind change")
            if len(self._data) + len(data) > self._max:
                raise DrpcProtocolError("data overflow")
            self._data += data
            self._control = self._control or bool(cb & 0x80)
        else:
            self._kind = kind
            self._control = bool(cb & 0x80)
            if cb & 1:
                self._mid = mid + 1
                return self._finish(kind, sid, mid, data)
            self._partial = True
            self._data = bytearray(data)
        if not cb & 1:
            return None
        whole = bytes(self._data)
        self._data = bytearray()
        self._partial = False
        self._mid = mid + 1
        return self._finish(self._kind, sid, mid, whole)

    def _finish(self, kind: int, sid: int, mid: int, data: bytes) -> Packet | None:
        if kind not in _KNOWN_KINDS:
            if self._control:
                return None  # forward-compatible extension: ignore
            raise DrpcProtocolError(f"unknown packet kind {kind}")
        return Packet(kind, sid, mid, data, self._control)


# ------------------------------------------------------------------------------------ error body

_CODE = struct.Struct(">Q")
_INVALID_ERROR_NOTE = " (drpcwire note: invalid error data)"


def encode_error(code: int, message: str) -> bytes:
    """Error packet body: 8-byte big-endian code, then the UTF-8 text."""
    return _CODE.pack(code) + message.encode("utf-8", "replace")


def decode_error(data: bytes) -> tuple[int, str]:
    """Inverse of :func:`encode_error`; a body under 8 bytes becomes a code-0 text with a note."""
    if len(data) < 8:
        return 0, data.decode("utf-8", "replace") + _INVALID_ERROR_NOTE
    return _CODE.unpack_from(data)[0], data[8:].decode("utf-8", "replace")


# -------------------------------------------------------------------------------------- metadata


def encode_metadata(metadata: dict[str, str]) -> bytes:
    """InvokeMetadata body: ``map<string,string>`` as field 1, key and value always written."""
    out = bytearray()
    for key, value in metadata.items():
        k = key.encode()
        v = value.encode()
        entry = bytearray(b"\x0a")
        append_varint(entry, len(k))
        entry += k
        entry.append(0x12)
        append_varint(entry, len(v))
        entry += v
        out.append(0x0A)
        append_varint(out, len(entry))
        out += entry
    return bytes(out)


def _read_len_field(data: bytes, pos: int, end: int, tag: int) -> tuple[bytes, int]:
    if pos >= end or data[pos] != tag:
        raise DrpcProtocolError("invalid metadata")
    r = read_varint(data, pos + 1)
    if r is None:
        raise DrpcProtocolError("invalid metadata")
    length, pos = r
    if length > end - pos:
        raise DrpcProtocolError("invalid metadata")
    return data[pos : pos + length], pos + length


def decode_metadata(data: bytes) -> dict[str, str]:
    """Strict decoder like Go's: every entry is exactly key (tag 0x0a) then value (tag 0x12)."""
    out: dict[str, str] = {}
    pos = 0
    end = len(data)
    try:
        while pos < end:
            entry, pos = _read_len_field(data, pos, end, 0x0A)
            key, p = _read_len_field(entry, 0, len(entry), 0x0A)
            value, p = _read_len_field(entry, p, len(entry), 0x12)
            if p != len(entry):
                raise DrpcProtocolError("invalid metadata")
            out[key.decode()] = value.decode()
    except UnicodeDecodeError as exc:
        raise DrpcProtocolError("invalid metadata") from exc
    return out
