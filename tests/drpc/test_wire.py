"""DRPC codec against the vectors of spec/wire.md E3/E4 (Go-emitted bytes), whole and byte by byte."""

from __future__ import annotations

import pytest

from agentd.drpc.wire import (
    MAX_PACKET_SIZE,
    DrpcProtocolError,
    Frame,
    Kind,
    Packet,
    PacketParser,
    append_frame,
    append_packet,
    append_varint,
    decode_error,
    decode_metadata,
    encode_error,
    encode_metadata,
    parse_frame,
    read_varint,
)

H = bytes.fromhex
OLD_NAME = b"/agent.v2.Agent/GetManifest"
NAME = b"/coder.agent.v2.Agent/GetManifest"
UNKNOWN_TEXT = b'protocol error: unknown rpc: "/coder.agent.v2.Agent/GetManifest"'

VARINTS = [
    (0, "00"),
    (1, "01"),
    (127, "7f"),
    (128, "80 01"),
    (300, "ac 02"),
    (16383, "ff 7f"),
    (16384, "80 80 01"),
    (65536, "80 80 04"),
    (2**32 - 1, "ff ff ff ff 0f"),
    (2**64 - 1, "ff ff ff ff ff ff ff ff ff 01"),
]


@pytest.mark.parametrize(("value", "hexbytes"), VARINTS)
def test_varint_vectors(value: int, hexbytes: str) -> None:
    buf = bytearray()
    append_varint(buf, value)
    assert bytes(buf) == H(hexbytes)
    assert read_varint(H(hexbytes), 0) == (value, len(H(hexbytes)))
    # Every strict prefix is "need more bytes", never an error.
    for cut in range(len(H(hexbytes))):
        assert read_varint(H(hexbytes)[:cut], 0) is None


def test_varint_too_long_and_overflow() -> None:
    with pytest.raises(DrpcProtocolError, match="varint too long"):
        read_varint(b"\xff" * 10 + b"\x01", 0)
    with pytest.raises(DrpcProtocolError):
        read_varint(b"\xff" * 9 + b"\x7f", 0)  # 70 bits
    with pytest.raises(ValueError):
        append_varint(bytearray(), 2**64)
    with pytest.raises(ValueError):
        append_varint(bytearray(), -1)


# (name, packet, expected bytes)
PACKETS = [
    (
        "D1",
        Packet(Kind.INVOKE, 1, 1, b"/agent.v2.Agent/GetManifest"),
        H("03 01 01 1b") + b"/agent.v2.Agent/GetManifest",
    ),
    ("D2", Packet(Kind.INVOKE, 1, 1, NAME), H("03 01 01 21") + NAME),
    ("D3", Packet(Kind.MESSAGE, 1, 2, b""), H("05 01 02 00")),
    ("D4", Packet(Kind.CLOSE_SEND, 1, 3, b""), H("0d 01 03 00")),
    ("D5", Packet(Kind.CLOSE, 1, 4, b""), H("0b 01 04 00")),
    ("D6", Packet(Kind.CANCEL, 1, 5, b"", control=True), H("89 01 05 00")),
    ("D7", Packet(Kind.MESSAGE, 1, 1, H("0a 02 68 69")), H("05 01 01 04 0a 02 68 69")),
    ("D8", Packet(Kind.CLOSE_SEND, 1, 2, b""), H("0d 01 02 00")),
    (
        "D9",
        Packet(Kind.ERROR, 1, 1, encode_error(12, "Unimplemented")),
        H("07 01 01 15 00 00 00 00 00 00 00 0c 55 6e 69 6d 70 6c 65 6d 65 6e 74 65 64"),
    ),
    (
        "D10",
        Packet(Kind.ERROR, 1, 1, encode_error(0, UNKNOWN_TEXT.decode())),
        H("07 01 01 48 00 00 00 00 00 00 00 00") + UNKNOWN_TEXT,
    ),
    (
        "D12",
        Packet(Kind.INVOKE_METADATA, 1, 1, encode_metadata({"k": "v"})),
        H("0f 01 01 08 0a 06 0a 01 6b 12 01 76"),
    ),
]


def _encode(pkt: Packet) -> bytes:
    buf = bytearray()
    append_packet(buf, pkt.kind, pkt.stream_id, pkt.message_id, pkt.data, control=pkt.control)
    return bytes(buf)


def _feed_bytewise(data: bytes) -> list[Packet]:
    parser = PacketParser()
    out: list[Packet] = []
    for i in range(len(data)):
        out += parser.feed(data[i : i + 1])
    assert parser.buffered == 0
    return out


@pytest.mark.parametrize(("name", "pkt", "wire"), PACKETS, ids=[p[0] for p in PACKETS])
def test_packet_vectors(name: str, pkt: Packet, wire: bytes) -> None:
    assert _encode(pkt) == wire
    # Decoding needs the stream's id sequence to start at (1, 1): prefix with lower-id packets.
    prefix = b"".join(_encode(Packet(Kind.MESSAGE, 1, mid, b"")) for mid in range(1, pkt.message_id))
    whole = PacketParser().feed(prefix + wire)
    assert whole[-1] == pkt
    assert _feed_bytewise(prefix + wire)[-1] == pkt


def test_metadata_vectors() -> None:
    assert encode_metadata({"key": "value"}) == H("0a 0c 0a 03 6b 65 79 12 05 76 61 6c 75 65")
    assert decode_metadata(H("0a 0c 0a 03 6b 65 79 12 05 76 61 6c 75 65")) == {"key": "value"}
    assert decode_metadata(encode_metadata({"": ""})) == {"": ""}
    assert decode_metadata(b"") == {}


@pytest.mark.parametrize(
    "bad",
    [
        "0a",  # truncated entry
        "0a 02 0a 00",  # key without value
        "0a 04 12 00 0a 00",  # value before key
        "0a 06 0a 00 12 00 18 01",  # extra field inside the entry
        "12 00",  # wrong outer tag
        "0a 05 0a 01 6b 12 05",  # value length past the entry
        "0a 06 0a 01 ff 12 01 76",  # invalid UTF-8 key
    ],
)
def test_metadata_strict(bad: str) -> None:
    with pytest.raises(DrpcProtocolError):
        decode_metadata(H(bad))


def test_error_body() -> None:
    assert decode_error(encode_error(12, "Unimplemented")) == (12, "Unimplemented")
    code, text = decode_error(b"abc")
    assert code == 0 and text.startswith("abc") and "invalid error data" in text


def test_d13_split_70000() -> None:
    body = bytes(range(256)) * 273 + bytes(112)
    assert len(body) == 70000
    buf = bytearray()
    append_packet(buf, Kind.MESSAGE, 1, 2, body)
    assert bytes(buf[:6]) == H("04 01 02 80 80 04")
    assert bytes(buf[6 + 65536 : 6 + 65536 + 5]) == H("05 01 02 f0 22")
    assert len(buf) == 6 + 65536 + 5 + 4464
    prefix = _encode(Packet(Kind.INVOKE, 1, 1, NAME))
    (inv, msg) = PacketParser().feed(prefix + bytes(buf))
    assert inv.kind == Kind.INVOKE and msg == Packet(Kind.MESSAGE, 1, 2, body)
    frame, end = parse_frame(bytes(buf))  # type: ignore[misc]
    assert frame.done is False and len(frame.data) == 65536 and end == 6 + 65536


def test_whole_unary_request_and_with_metadata() -> None:
    req = H("03 01 01 21") + NAME + H("05 01 02 00 0d 01 03 00")
    assert len(req) == 0x2D
    kinds = [(p.kind, p.message_id) for p in PacketParser().feed(req)]
    assert kinds == [(Kind.INVOKE, 1), (Kind.MESSAGE, 2), (Kind.CLOSE_SEND, 3)]
    md = H("0f 01 01 08 0a 06 0a 01 6b 12 01 76 03 01 02 21") + NAME + H("05 01 03 00 0d 01 04 00")
    assert len(md) == 0x39
    assert [p.kind for p in _feed_bytewise(md)] == [
        Kind.INVOKE_METADATA,
        Kind.INVOKE,
        Kind.MESSAGE,
        Kind.CLOSE_SEND,
    ]


def test_frame_roundtrip_and_control_bits() -> None:
    buf = bytearray()
    append_frame(buf, Frame(kind=Kind.MESSAGE, stream_id=300, message_id=2, data=b"x", done=False))
    assert bytes(buf) == H("04 ac 02 02 01 78")
    assert parse_frame(bytes(buf)) == (Frame(Kind.MESSAGE, 300, 2, b"x", done=False), 6)
    assert parse_frame(bytes(buf[:5])) is None
    assert parse_frame(b"\x05\x01") is None


def test_monotonicity_and_gaps() -> None:
    p = PacketParser()
    assert p.feed(H("05 01 01 00 05 01 05 00"))[1].message_id == 5  # gaps are fine
    with pytest.raises(DrpcProtocolError, match="monotonicity"):
        p.feed(H("05 01 05 00"))  # replaying an id is fatal
    with pytest.raises(DrpcProtocolError, match="monotonicity"):
        PacketParser().feed(H("05 00 01 00"))  # stream 0 is never valid
    with pytest.raises(DrpcProtocolError, match="monotonicity"):
        PacketParser().feed(H("05 01 00 00"))  # message 0 either


def test_partial_packet_discarded_by_newer_id_and_kind_change() -> None:
    p = PacketParser()
    assert p.feed(H("04 01 01 01 61")) == []  # non-final Message frame
    assert p.feed(H("05 01 02 01 62")) == [Packet(Kind.MESSAGE, 1, 2, b"b")]
    p = PacketParser()
    p.feed(H("04 01 01 01 61"))
    with pytest.raises(DrpcProtocolError, match="kind change"):
        p.feed(H("07 01 01 00"))
    p = PacketParser()
    assert p.feed(H("04 01 01 01 61 05 01 01 01 62")) == [Packet(Kind.MESSAGE, 1, 1, b"ab")]


def test_unknown_kinds() -> None:
    # Kind 9 with the control bit: ignored (ids still advance); without: protocol error.
    p = PacketParser()
    assert p.feed(H("93 01 01 00 05 01 02 00")) == [Packet(Kind.MESSAGE, 1, 2, b"")]
    with pytest.raises(DrpcProtocolError, match="unknown packet kind"):
        PacketParser().feed(H("13 01 01 00"))
    with pytest.raises(DrpcProtocolError, match="unknown packet kind"):
        PacketParser().feed(H("01 01 01 00"))  # kind 0 is reserved
    # A control bit on any frame makes the packet control.
    p = PacketParser()
    assert p.feed(H("12 01 01 00 93 01 01 00")) == []


def test_packet_size_limit() -> None:
    ok = bytearray()
    append_packet(ok, Kind.MESSAGE, 1, 1, bytes(MAX_PACKET_SIZE))
    (pkt,) = PacketParser().feed(bytes(ok))
    assert len(pkt.data) == MAX_PACKET_SIZE
    over = bytearray()
    append_packet(over, Kind.MESSAGE, 1, 1, bytes(MAX_PACKET_SIZE + 1))
    with pytest.raises(DrpcProtocolError, match="overflow"):
        PacketParser().feed(bytes(over))
    # One frame announcing more than the limit fails at its header, before buffering the body.
    big = bytearray(b"\x05\x01\x01")
    append_varint(big, MAX_PACKET_SIZE + 1)
    with pytest.raises(DrpcProtocolError, match="overflow"):
        PacketParser().feed(bytes(big))
