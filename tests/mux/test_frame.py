"""Codec tests driven by spec/wire.md E1, both directions, also fed one byte at a time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.mux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    Frame,
    FrameDecoder,
    decode_header,
    encode_frame,
    encode_header,
)

H = bytes.fromhex

# (name, wire bytes, frame)
VECTORS = [
    ("Y1", "00 01 00 01 00 00 00 01 00 00 00 00", Frame(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0)),
    ("Y2", "00 01 00 02 00 00 00 01 00 00 00 00", Frame(0, TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0)),
    ("Y3", "00 01 00 04 00 00 00 01 00 00 00 00", Frame(0, TYPE_WINDOW_UPDATE, FLAG_FIN, 1, 0)),
    ("Y4", "00 01 00 08 00 00 00 01 00 00 00 00", Frame(0, TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0)),
    ("Y5", "00 02 00 01 00 00 00 00 00 00 00 07", Frame(0, TYPE_PING, FLAG_SYN, 0, 7)),
    ("Y6", "00 02 00 02 00 00 00 00 00 00 00 07", Frame(0, TYPE_PING, FLAG_ACK, 0, 7)),
    ("Y7a", "00 02 00 01 00 00 00 00 00 00 00 00", Frame(0, TYPE_PING, FLAG_SYN, 0, 0)),
    ("Y7b", "00 02 00 02 00 00 00 00 00 00 00 00", Frame(0, TYPE_PING, FLAG_ACK, 0, 0)),
    ("Y8", "00 03 00 00 00 00 00 00 00 00 00 00", Frame(0, TYPE_GO_AWAY, 0, 0, 0)),
    ("Y9", "00 03 00 00 00 00 00 00 00 00 00 01", Frame(0, TYPE_GO_AWAY, 0, 0, 1)),
    ("Y10", "00 03 00 00 00 00 00 00 00 00 00 02", Frame(0, TYPE_GO_AWAY, 0, 0, 2)),
    ("Y11", "00 00 00 00 00 00 00 01 00 00 00 05 68 65 6c 6c 6f", Frame(0, TYPE_DATA, 0, 1, 5, b"hello")),
    ("Y12", "00 01 00 00 00 00 00 01 00 02 00 00", Frame(0, TYPE_WINDOW_UPDATE, 0, 1, 131072)),
    ("Y13", "00 01 00 01 00 00 00 02 00 00 00 00", Frame(0, TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0)),
    (
        "Y14",
        "00 00 00 05 00 00 00 01 00 00 00 02 68 69",
        Frame(0, TYPE_DATA, FLAG_SYN | FLAG_FIN, 1, 2, b"hi"),
    ),
]


@pytest.mark.parametrize(("name", "wire", "frame"), VECTORS, ids=[v[0] for v in VECTORS])
def test_encode(name: str, wire: str, frame: Frame) -> None:
    assert encode_frame(frame) == H(wire)
    assert encode_header(frame.type, frame.flags, frame.stream_id, frame.length) == H(wire)[:12]


@pytest.mark.parametrize(("name", "wire", "frame"), VECTORS, ids=[v[0] for v in VECTORS])
def test_decode_whole_and_bytewise(name: str, wire: str, frame: Frame) -> None:
    data = H(wire)
    assert decode_header(data) == frame[:5]
    assert FrameDecoder().feed(data) == [frame]
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert out == []
    assert out == [frame]
    assert dec.pending == 0


def test_max_size_headers() -> None:
    assert encode_header(TYPE_DATA, 0, 1, 262144) == H("00 00 00 00 00 00 00 01 00 04 00 00")  # Y15
    assert encode_header(TYPE_DATA, 0, 1, 262145) == H("00 00 00 00 00 00 00 01 00 04 00 01")  # Y16


def test_all_vectors_concatenated_decode_in_order() -> None:
    data = b"".join(H(v[1]) for v in VECTORS)
    assert FrameDecoder().feed(data) == [v[2] for v in VECTORS]


def test_encode_rejects_inconsistent_frames() -> None:
    with pytest.raises(ValueError):
        encode_frame(Frame(0, TYPE_DATA, 0, 1, 3, b"ab"))
    with pytest.raises(ValueError):
        encode_frame(Frame(0, TYPE_PING, 0, 0, 1, b"x"))


frames = st.builds(
    lambda t, f, sid, ln, body: (
        Frame(0, t, f, sid, len(body), body) if t == TYPE_DATA else Frame(0, t, f, sid, ln)
    ),
    st.sampled_from([TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY]),
    st.integers(0, 15),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(frames, max_size=8), st.data())
def test_roundtrip_any_split(fs: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(encode_frame(f) for f in fs)
    dec = FrameDecoder()
    out: list[Frame] = []
    pos = 0
    while pos < len(wire):
        step = data.draw(st.integers(1, 40))
        out += dec.feed(wire[pos : pos + step])
        pos += step
    assert out == fs
