"""Random frames and bytes never raise anything but the documented DrpcProtocolError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.drpc.stream import DrpcConnection, Role
from agentd.drpc.wire import (
    DrpcProtocolError,
    Frame,
    PacketParser,
    append_frame,
    decode_metadata,
    read_varint,
)

FUZZ = settings(max_examples=150, deadline=None)

frames = st.builds(
    Frame,
    kind=st.integers(0, 63),
    stream_id=st.integers(0, 4),
    message_id=st.integers(0, 6),
    data=st.binary(max_size=40),
    done=st.booleans(),
    control=st.booleans(),
)


def _encode(fs: list[Frame]) -> bytes:
    buf = bytearray()
    for f in fs:
        append_frame(buf, f)
    return bytes(buf)


def _drive(role: Role, data: bytes, chunk: int) -> None:
    conn = DrpcConnection(role, max_packet_size=64)
    try:
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
    except DrpcProtocolError:
        pass


@FUZZ
@given(st.lists(frames, max_size=12), st.integers(1, 7))
def test_random_frames(fs: list[Frame], chunk: int) -> None:
    data = _encode(fs)
    _drive(Role.SERVER, data, chunk)
    _drive(Role.CLIENT, data, chunk)


@FUZZ
@given(st.binary(max_size=200), st.integers(1, 9))
def test_random_bytes(data: bytes, chunk: int) -> None:
    _drive(Role.SERVER, data, chunk)
    _drive(Role.CLIENT, data, chunk)
    try:
        read_varint(data, 0)
    except DrpcProtocolError:
        pass
    try:
        decode_metadata(data)
    except DrpcProtocolError:
        pass


@FUZZ
@given(st.lists(frames, max_size=12))
def test_parser_whole_equals_bytewise(fs: list[Frame]) -> None:
    data = _encode(fs)
    try:
        whole = PacketParser(64).feed(data)
    except DrpcProtocolError:
        whole = None
    p = PacketParser(64)
    out = []
    try:
        for i in range(len(data)):
            out += p.feed(data[i : i + 1])
    except DrpcProtocolError:
        out = None  # type: ignore[assignment]
    assert whole == out
