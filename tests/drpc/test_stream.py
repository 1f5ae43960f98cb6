"""The sans-I/O per-transport state machine (drpcmanager/drpcstream semantics, spec B3-B5)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.drpc.stream import (
    DrpcConnection,
    Invoked,
    MessageReceived,
    RecvClosed,
    RemoteCancelled,
    RemoteClosed,
    RemoteError,
    Role,
    RpcClosedError,
    Superseded,
)
from agentd.drpc.wire import DrpcProtocolError, Kind, append_packet, encode_error, encode_metadata

H = bytes.fromhex


def pkt(kind: int, sid: int, mid: int, data: bytes = b"", control: bool = False) -> bytes:
    buf = bytearray()
    append_packet(buf, kind, sid, mid, data, control=control)
    return bytes(buf)


def test_server_unary_sequence() -> None:
    c = DrpcConnection(Role.SERVER)
    evs = c.receive_data(
        pkt(Kind.INVOKE, 1, 1, b"/a.B/C") + pkt(Kind.MESSAGE, 1, 2, b"x") + pkt(Kind.CLOSE_SEND, 1, 3)
    )
    assert [type(e) for e in evs] == [Invoked, MessageReceived, RecvClosed]
    assert evs[0] == Invoked(1, "/a.B/C", {}) and evs[1].data == b"x"
    assert c.active
    c.send_message(b"\x0a\x02hi")
    assert c.close_send() is True
    assert not c.active  # both sides CloseSend → terminated
    assert c.data_to_send() == H("05 01 01 04 0a 02 68 69 0d 01 02 00")
    assert c.data_to_send() == b""
    # The client's Close after the response is ignored; so is anything else for the dead stream.
    assert c.receive_data(pkt(Kind.CLOSE, 1, 4) + pkt(Kind.MESSAGE, 1, 5)) == []
    assert c.close() is False and c.send_error(0, "x") is False and c.close_send() is False
    with pytest.raises(RpcClosedError):
        c.send_message(b"")


@pytest.mark.parametrize(
    ("packet", "event"),
    [
        (pkt(Kind.CLOSE, 1, 2), RemoteClosed(1)),
        (pkt(Kind.CANCEL, 1, 2, control=True), RemoteCancelled(1)),
        (pkt(Kind.ERROR, 1, 2, encode_error(7, "bad")), RemoteError(1, 7, "bad")),
    ],
)
def test_remote_termination(packet: bytes, event: object) -> None:
    c = DrpcConnection(Role.SERVER)
    c.receive_data(pkt(Kind.INVOKE, 1, 1, b"/a.B/C"))
    (ev,) = c.receive_data(packet)
    assert type(ev) is type(event) and ev == event
    assert not c.active
    assert c.send_error(0, "late") is False
    assert c.data_to_send() == b""


def test_new_invoke_supersedes_active_rpc_and_metadata_applies() -> None:
    c = DrpcConnection(Role.SERVER)
    c.receive_data(pkt(Kind.INVOKE, 1, 1, b"/a.B/C"))
    evs = c.receive_data(
        pkt(Kind.INVOKE_METADATA, 2, 1, encode_metadata({"k": "v"})) + pkt(Kind.INVOKE, 2, 2, b"/a.B/D")
    )
    assert [type(e) for e in evs] == [Superseded, Invoked]
    assert evs[0] == Superseded(1) and evs[1] == Invoked(2, "/a.B/D", {"k": "v"})
    # Metadata for another stream id does not apply.
    c.close()
    c.data_to_send()
    evs = c.receive_data(
        pkt(Kind.INVOKE_METADATA, 3, 1, encode_metadata({"k": "v"})) + pkt(Kind.INVOKE, 4, 1, b"/x")
    )
    assert evs == [Invoked(4, "/x", {})]


def test_protocol_errors() -> None:
    c = DrpcConnection(Role.SERVER)
    c.receive_data(pkt(Kind.INVOKE, 1, 1, b"/a.B/C"))
    with pytest.raises(DrpcProtocolError, match="invoke on existing stream"):
        c.receive_data(pkt(Kind.INVOKE, 1, 2, b"/a.B/C"))
    with pytest.raises(DrpcProtocolError):
        DrpcConnection(Role.SERVER).receive_data(pkt(Kind.INVOKE_METADATA, 1, 1, b"\x12\x00"))
    with pytest.raises(DrpcProtocolError):
        DrpcConnection(Role.SERVER).receive_data(pkt(Kind.INVOKE, 1, 1, b"\xff"))
    client = DrpcConnection(Role.CLIENT)
    client.invoke("/a.B/C")
    with pytest.raises(DrpcProtocolError, match="unknown stream"):
        client.receive_data(pkt(Kind.MESSAGE, 2, 1))


def test_client_sequence_with_metadata_and_ids() -> None:
    c = DrpcConnection(Role.CLIENT)
    c.invoke("/coder.agent.v2.Agent/GetManifest", {"k": "v"})
    c.send_message(b"")
    c.close_send()
    name = b"/coder.agent.v2.Agent/GetManifest"
    assert c.data_to_send() == H("0f 01 01 08 0a 06 0a 01 6b 12 01 76 03 01 02 21") + name + H(
        "05 01 03 00 0d 01 04 00"
    )
    assert c.receive_data(H("05 01 01 04 0a 02 68 69")) == [MessageReceived(1, H("0a 02 68 69"))]
    assert c.close() is True
    assert c.data_to_send() == H("0b 01 05 00")
    # The server's CloseSend arriving after our Close is tolerated.
    assert c.receive_data(H("0d 01 02 00")) == []
    # Next RPC on the same transport: stream 2.
    st2 = c.invoke("/x")
    assert st2.stream_id == 2
    assert c.data_to_send() == H("03 02 01 02") + b"/x"
    with pytest.raises(RuntimeError):
        c.invoke("/y")
    assert c.cancel() is True
    assert c.data_to_send() == H("89 02 02 00")


def test_bidi_half_close_both_ways() -> None:
    c = DrpcConnection(Role.SERVER)
    c.receive_data(pkt(Kind.INVOKE, 1, 1, b"/t.T/Coordinate"))
    c.send_message(b"a")
    assert c.receive_data(pkt(Kind.CLOSE_SEND, 1, 2)) == [RecvClosed(1)]
    assert c.active  # server may keep sending after the client's CloseSend
    c.send_message(b"b")
    c.close_send()
    assert not c.active
    assert c.data_to_send() == H("05 01 01 01 61 05 01 02 01 62 0d 01 03 00")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["msg", "close_send", "close", "error", "cancel", "r_msg", "r_cs", "r_close", "r_err", "r_cancel"]
        ),
        max_size=12,
    )
)
def test_random_command_and_packet_sequences(ops: list[str]) -> None:
    """Any interleaving: only RpcClosedError from sends; nothing is sent after termination."""
    c = DrpcConnection(Role.SERVER)
    c.receive_data(pkt(Kind.INVOKE, 1, 1, b"/a.B/C"))
    mid = 2
    for op in ops:
        was_active = c.active
        if op.startswith("r_"):
            kind = {
                "r_msg": Kind.MESSAGE,
                "r_cs": Kind.CLOSE_SEND,
                "r_close": Kind.CLOSE,
                "r_err": Kind.ERROR,
                "r_cancel": Kind.CANCEL,
            }[op]
            evs = c.receive_data(pkt(kind, 1, mid, encode_error(1, "e") if kind == Kind.ERROR else b""))
            mid += 1
            if not was_active:
                assert evs == []
            continue
        before = c.data_to_send()
        assert before == b""
        if op == "msg":
            try:
                c.send_message(b"m")
            except RpcClosedError:
                assert not was_active or (c.stream is not None and c.stream.send_closed)
        else:
            getattr(
                c,
                {"close_send": "close_send", "close": "close", "error": "send_error", "cancel": "cancel"}[op],
            )(*((0, "x") if op == "error" else ()))
        out = c.data_to_send()
        if not was_active:
            assert out == b""
