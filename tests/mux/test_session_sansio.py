"""The E2 probes of spec/wire.md against the sans-I/O core, plus hypothesis and leak checks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.mux import GoAwayCode, MuxError, ProtocolError
from agentd.mux.frame import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    encode_header,
)
from agentd.mux.session import (
    READ_EOF,
    READ_RESET,
    READ_SESSION_ENDED,
    READ_WAIT,
    Connection,
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    PingAcked,
    ProtocolViolated,
    StreamEnded,
    StreamEstablished,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from agentd.mux.state import CAN_SEND, ESTABLISHED, LOCAL_CLOSE, REMOTE_CLOSE, RESET

H = bytes.fromhex
Y1 = H("00 01 00 01 00 00 00 01 00 00 00 00")
Y2 = H("00 01 00 02 00 00 00 01 00 00 00 00")
Y3 = H("00 01 00 04 00 00 00 01 00 00 00 00")
Y4 = H("00 01 00 08 00 00 00 01 00 00 00 00")
Y5 = H("00 02 00 01 00 00 00 00 00 00 00 07")
Y6 = H("00 02 00 02 00 00 00 00 00 00 00 07")
Y8 = H("00 03 00 00 00 00 00 00 00 00 00 00")
Y9 = H("00 03 00 00 00 00 00 00 00 00 00 01")
Y12 = H("00 01 00 00 00 00 00 01 00 02 00 00")
Y16 = H("00 00 00 00 00 00 00 01 00 04 00 01")


def data_frame(sid: int, body: bytes, flags: int = 0) -> bytes:
    return encode_header(TYPE_DATA, flags, sid, len(body)) + body


def server_with_stream_1() -> tuple[Connection, object]:
    """Go-server probe setup: `-> Y1`, app accepts, `<- Y2`."""
    srv = Connection(is_client=False)
    (ev,) = srv.receive_data(Y1)
    assert isinstance(ev, StreamOpened) and ev.stream_id == 1
    srv.accept_stream(ev.stream)
    assert srv.data_to_send() == Y2
    return srv, ev.stream


def violation(conn: Connection, data: bytes) -> ProtocolError:
    """Feed `data`, which must break the protocol: the error is the last event and ends the session."""
    events = conn.receive_data(data)
    assert events and isinstance(events[-1], ProtocolViolated), events
    assert not any(isinstance(e, ProtocolViolated) for e in events[:-1])
    assert conn.closed and conn.error is events[-1].error
    return events[-1].error


def feed_bytewise(conn: Connection, data: bytes) -> list[object]:
    out: list[object] = []
    for i in range(len(data)):
        out += conn.receive_data(data[i : i + 1])
    return out


def test_open_sends_y1_and_ack_establishes() -> None:
    cli = Connection(is_client=True)
    s1 = cli.open_stream()
    s3 = cli.open_stream()
    assert (s1.id, s3.id) == (1, 3)
    assert cli.data_to_send() == Y1 + H("00 01 00 01 00 00 00 03 00 00 00 00")
    assert cli.outbound_pending == 2
    (ev,) = cli.receive_data(Y2)
    assert isinstance(ev, StreamEstablished) and s1.state == ESTABLISHED
    assert cli.outbound_pending == 1
    srv = Connection(is_client=False)
    assert srv.open_stream().id == 2
    assert srv.data_to_send() == H("00 01 00 01 00 00 00 02 00 00 00 00")  # Y13


def test_duplicate_fin_is_protocol_error() -> None:
    srv, _s = server_with_stream_1()
    (ev,) = srv.receive_data(Y3)
    assert isinstance(ev, StreamEnded)
    err = violation(srv, Y3)
    assert str(err) == "unexpected FIN flag in state 5 (RemoteClose)"
    assert err.code == GoAwayCode.PROTOCOL_ERROR
    assert srv.data_to_send() == Y9
    # a session that ended parses nothing more (the ping is not answered)
    assert srv.receive_data(Y5) == []
    assert srv.data_to_send() == b""


def test_window_overrun_is_protocol_error_at_the_header() -> None:
    srv, _ = server_with_stream_1()
    # body never needed: the header alone is fatal
    assert str(violation(srv, Y16)) == "receive window exceeded"
    assert srv.data_to_send() == Y9


def test_max_window_frame_accepted() -> None:
    srv, s = server_with_stream_1()
    events = srv.receive_data(data_frame(1, b"z" * 262144))
    assert sum(e.length for e in events if isinstance(e, DataReceived)) == 262144
    assert s.recv_window == 0


def test_duplicate_syn_is_protocol_error() -> None:
    srv, _ = server_with_stream_1()
    assert str(violation(srv, Y1)) == "duplicate stream declared: 1"


def test_events_before_a_protocol_error_are_kept_and_the_streams_handed_out_once() -> None:
    srv, s = server_with_stream_1()
    events = srv.receive_data(data_frame(1, b"abc") + Y5 + H("00 09 00 00 00 00 00 00 00 00 00 00"))
    assert [type(e) for e in events] == [DataReceived, ProtocolViolated]
    assert str(events[-1].error) == "invalid message type 9"
    assert srv.data_to_send() == Y6  # the ping before the bad frame was answered; no GoAway
    # the adapter wakes the streams' waiters: each stream once, also when parsing ended the session
    assert srv.close() == [s]
    assert srv.close() == []
    assert srv.read(s, 10) == b"abc" and srv.read_status(s) == READ_SESSION_ENDED


def test_backlog_overflow_rsts_without_the_application() -> None:
    srv = Connection(is_client=False, accept_backlog=2)
    syns = b"".join(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, i, 0) for i in (1, 3, 5))
    events = srv.receive_data(syns)
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [1, 3]
    assert srv.data_to_send() == H("00 01 00 08 00 00 00 05 00 00 00 00")
    assert 5 not in srv.streams
    # data for the refused stream is ignored, not fatal
    assert srv.receive_data(data_frame(5, b"abc")) == []
    # accepting one frees a slot
    srv.accept_stream(events[0].stream)
    srv.data_to_send()
    (ev,) = srv.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 7, 0))
    assert isinstance(ev, StreamOpened)


def test_inbound_stream_cap_counts_accepted_streams_until_they_end() -> None:
    srv = Connection(is_client=False, accept_backlog=100, max_inbound_streams=2)
    syn = lambda i: encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, i, 0)  # noqa: E731
    events = srv.receive_data(syn(1) + syn(3))
    for ev in events:
        srv.accept_stream(ev.stream)  # accepted streams still count: the cap is on live streams
    srv.data_to_send()
    assert srv.receive_data(syn(5)) == []
    assert srv.data_to_send() == H("00 01 00 08 00 00 00 05 00 00 00 00")  # RST
    assert 5 not in srv.streams and srv.inbound_live == 2
    # our own (outbound) streams do not count
    srv.open_stream()
    # a reset (by the peer) and a full close free their slots
    srv.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0))
    srv.end_stream(events[1].stream)
    srv.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, 3, 0))
    assert srv.inbound_live == 0
    srv.data_to_send()
    opened = srv.receive_data(syn(7) + syn(9) + syn(11))
    assert [e.stream_id for e in opened if isinstance(e, StreamOpened)] == [7, 9]
    assert srv.data_to_send() == encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, 11, 0)
    # a local reset frees one too
    srv.reset_stream(opened[0].stream)
    assert srv.inbound_live == 1
    with pytest.raises(ValueError):
        Connection(is_client=False, max_inbound_streams=0)


def test_local_go_away_then_syn_gets_rst() -> None:
    srv = Connection(is_client=False)
    srv.go_away()
    assert srv.data_to_send() == Y8
    assert srv.receive_data(Y1) == []
    assert srv.data_to_send() == Y4


def test_remote_go_away_normal_stops_opens_only() -> None:
    cli = Connection(is_client=True)
    s1 = cli.open_stream()
    cli.receive_data(Y2)
    (ev,) = cli.receive_data(Y8)
    assert isinstance(ev, GoAwayReceived) and ev.code == 0
    with pytest.raises(MuxError, match="remote end is not accepting connections"):
        cli.open_stream()
    # existing stream still works both ways
    assert cli.send_data(s1, memoryview(b"ok")) == 2
    assert isinstance(cli.receive_data(data_frame(1, b"yo"))[0], DataReceived)
    assert not cli.closed


def test_remote_go_away_error_terminates() -> None:
    cli = Connection(is_client=True)
    cli.open_stream()
    events = cli.receive_data(Y9 + Y5)
    assert events == [ConnectionTerminated(1)]
    assert cli.closed and cli.data_to_send() == H("00 01 00 01 00 00 00 01 00 00 00 00")


@pytest.mark.parametrize(
    "wire", [H("01 00 00 00 00 00 00 01 00 00 00 00"), H("00 04 00 00 00 00 00 00 00 00 00 00")]
)
def test_bad_version_or_type_closes_silently(wire: bytes) -> None:
    srv = Connection(is_client=False)
    assert not violation(srv, wire).send_go_away
    assert srv.data_to_send() == b""


def test_unknown_stream_frames_ignored_ping_still_answered() -> None:
    srv = Connection(is_client=False)
    wire = H("00 00 00 00 00 00 00 09 00 00 00 02 01 02") + encode_header(TYPE_WINDOW_UPDATE, 0, 11, 5)
    assert srv.receive_data(wire) == []
    assert srv.data_to_send() == b""
    assert feed_bytewise(srv, Y5) == []
    assert srv.data_to_send() == Y6
    assert srv.receive_data(Y6) == [PingAcked(7)]


def test_rst_discards_buffered_data() -> None:
    srv, s = server_with_stream_1()
    srv.receive_data(data_frame(1, b"abc"))
    assert bytes(s.recv_buf) == b"abc"
    (ev,) = srv.receive_data(Y4)
    assert isinstance(ev, StreamReset)
    assert s.state == RESET and not s.recv_buf and 1 not in srv.streams


def test_window_return_after_half_window_consumed() -> None:
    srv, s = server_with_stream_1()
    srv.receive_data(data_frame(1, b"a" * 131071))
    assert srv.read(s, 1 << 30) == b"a" * 131071
    assert srv.data_to_send() == b""
    feed_bytewise(srv, data_frame(1, b"b"))
    assert srv.read(s, 10) == b"b"
    assert srv.data_to_send() == Y12


def test_300000_byte_write_splits_on_the_window() -> None:
    cli = Connection(is_client=True)
    s = cli.open_stream()
    cli.data_to_send()
    payload = memoryview(bytes(range(256)) * 1200)[:300000]
    assert cli.send_data(s, payload) == 262144
    out = cli.data_to_send()
    assert out[:12] == H("00 00 00 00 00 00 00 01 00 04 00 00") and len(out) == 12 + 262144
    assert cli.send_data(s, payload[262144:]) == 0
    (ev,) = cli.receive_data(H("00 01 00 00 00 00 00 01 00 00 9c 40"))
    assert isinstance(ev, WindowUpdated) and ev.delta == 40000
    assert cli.send_data(s, payload[262144:]) == 37856
    out = cli.data_to_send()
    assert out[:12] == H("00 00 00 00 00 00 00 01 00 00 93 e0") and out[12:] == payload[262144:]
    assert s.send_window == 40000 - 37856


def test_syn_fin_data_reads_then_eof_and_syn_rst() -> None:
    srv = Connection(is_client=False)
    events = srv.receive_data(H("00 00 00 05 00 00 00 01 00 00 00 02 68 69"))  # Y14
    assert [type(e) for e in events] == [StreamOpened, DataReceived, StreamEnded]
    s = events[0].stream
    assert s.state == REMOTE_CLOSE and srv.read(s, 10) == b"hi"
    srv.accept_stream(s)
    # ACK exactly once; like Go, the accept-time update also returns the 2 bytes already read
    assert srv.data_to_send() == H("00 01 00 02 00 00 00 01 00 00 00 02")
    srv.end_stream(s)
    assert srv.data_to_send() == Y3 and 1 not in srv.streams
    events = srv.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN | FLAG_RST, 3, 0))
    assert [type(e) for e in events] == [StreamOpened, StreamReset]


def test_server_closes_first_fin_without_ack() -> None:
    srv, s = server_with_stream_1()
    srv.end_stream(s)
    assert srv.data_to_send() == Y3 and s.state == LOCAL_CLOSE
    srv.end_stream(s)  # never FIN twice
    assert srv.data_to_send() == b""
    srv.receive_data(Y3)
    assert not srv.streams


def test_data_after_app_close_gets_rst() -> None:
    srv, s = server_with_stream_1()
    srv.close_stream(s)
    assert srv.data_to_send() == Y3
    events = srv.receive_data(data_frame(1, b"late"))
    assert [type(e) for e in events] == [StreamReset]
    assert srv.data_to_send() == Y4 and not srv.streams


def test_ack_flags_on_data_and_combined_flags() -> None:
    cli = Connection(is_client=True)
    s = cli.open_stream()
    cli.data_to_send()
    events = cli.receive_data(data_frame(1, b"x", FLAG_ACK | FLAG_FIN))
    assert [type(e) for e in events] == [StreamEstablished, DataReceived, StreamEnded]
    assert s.state == REMOTE_CLOSE


def test_body_split_across_reads_goes_straight_to_the_buffer() -> None:
    srv, s = server_with_stream_1()
    frame = data_frame(1, b"0123456789", FLAG_FIN)
    srv.receive_data(frame[:15])
    assert bytes(s.recv_buf) == b"012" and s.state == ESTABLISHED  # FIN waits for the whole body
    srv.receive_data(frame[15:])
    assert bytes(s.recv_buf) == b"0123456789" and s.state == REMOTE_CLOSE


def test_no_leak_after_many_open_close_cycles() -> None:
    cli = Connection(is_client=True)
    srv = Connection(is_client=False)
    for i in range(20_000):
        a = cli.open_stream()
        cli.send_data(a, memoryview(b"req"))
        cli.end_stream(a)
        events = srv.receive_data(cli.data_to_send())
        b = events[0].stream
        srv.accept_stream(b)
        assert srv.read(b, 100) == b"req"
        srv.send_data(b, memoryview(b"resp"))
        srv.end_stream(b)
        cli.receive_data(srv.data_to_send())
        assert cli.read(a, 100) == b"resp"
        if i % 1000 == 0:
            assert len(cli.streams) == 0 and len(srv.streams) == 0
    assert not cli.streams and not srv.streams
    assert cli.outbound_pending == 0 and srv.inbound_pending == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_only_events_or_protocol_error(data: bytes, client: bool) -> None:
    conn = Connection(is_client=client, accept_backlog=4)
    events = conn.receive_data(data)
    assert not any(isinstance(e, ProtocolViolated) for e in events[:-1])
    if events and isinstance(events[-1], ProtocolViolated):
        assert conn.closed and isinstance(events[-1].error, ProtocolError)
    conn.data_to_send()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 1, 2, 3, 4]),
            st.integers(0, 15),
            st.integers(0, 12),
            st.integers(0, 300000),
            st.binary(max_size=20),
        ),
        max_size=12,
    )
)
def test_random_frames_only_events_or_protocol_error(frames: list[tuple[int, int, int, int, bytes]]) -> None:
    wire = b""
    for ftype, flags, sid, length, body in frames:
        if ftype == TYPE_DATA:
            wire += encode_header(ftype, flags, sid, len(body)) + body
        else:
            wire += encode_header(ftype, flags, sid, length)
    conn = Connection(is_client=False, accept_backlog=3)
    for ev in conn.receive_data(wire):
        if isinstance(ev, StreamOpened):
            conn.accept_stream(ev.stream)
        elif isinstance(ev, ProtocolViolated):
            assert conn.closed
            return
    for s in list(conn.streams.values()):
        conn.read(s, 1 << 20)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_random_interleavings_deliver_in_order(seed: int) -> None:
    run_interleaving(random.Random(seed))


def run_interleaving(rng: random.Random) -> None:
    """Two cores, random ops, random transport splits: bytes arrive in order, or the stream reports
    reset; nothing else."""
    a = Connection(is_client=True)
    b = Connection(is_client=False)
    pairs: dict[int, dict[str, object]] = {}
    pending_ab = bytearray()
    pending_ba = bytearray()
    for _ in range(400):
        op = rng.random()
        if op < 0.1 and len(pairs) < 8:
            s = a.open_stream()
            pairs[s.id] = {
                "a": s,
                "b": None,
                "sent_ab": bytearray(),
                "got_ab": bytearray(),
                "sent_ba": bytearray(),
                "got_ba": bytearray(),
            }
        elif op < 0.45 and pairs:
            p = pairs[rng.choice(list(pairs))]
            side = rng.choice("ab")
            s = p[side]
            conn = a if side == "a" else b
            if s is not None and s.state in CAN_SEND:
                chunk = rng.randbytes(rng.randint(1, 70000))
                n = conn.send_data(s, memoryview(chunk))
                p["sent_ab" if side == "a" else "sent_ba"] += chunk[:n]
        elif op < 0.7 and pairs:
            p = pairs[rng.choice(list(pairs))]
            for side, conn, key in (("a", a, "got_ba"), ("b", b, "got_ab")):
                s = p[side]
                if s is not None:
                    p[key] += conn.read(s, rng.randint(1, 100000))
        elif op < 0.78 and pairs:
            p = pairs[rng.choice(list(pairs))]
            side = rng.choice("ab")
            if p[side] is not None:
                (a if side == "a" else b).end_stream(p[side])
        elif op < 0.8 and pairs:
            p = pairs[rng.choice(list(pairs))]
            side = rng.choice("ab")
            if p[side] is not None:
                (a if side == "a" else b).reset_stream(p[side])
                p["reset"] = True
        # pump a random slice of each direction
        pending_ab += a.data_to_send()
        pending_ba += b.data_to_send()
        k = rng.randint(0, len(pending_ab))
        for ev in b.receive_data(bytes(pending_ab[:k])):
            if isinstance(ev, StreamOpened):
                b.accept_stream(ev.stream)
                pairs[ev.stream_id]["b"] = ev.stream
        del pending_ab[:k]
        k = rng.randint(0, len(pending_ba))
        a.receive_data(bytes(pending_ba[:k]))
        del pending_ba[:k]
    # drain everything
    for _ in range(50):
        pending_ab += a.data_to_send()
        pending_ba += b.data_to_send()
        for ev in b.receive_data(bytes(pending_ab)):
            if isinstance(ev, StreamOpened):
                b.accept_stream(ev.stream)
                pairs[ev.stream_id]["b"] = ev.stream
        a.receive_data(bytes(pending_ba))
        pending_ab.clear()
        pending_ba.clear()
        for p in pairs.values():
            if p["b"] is not None:
                p["got_ab"] += b.read(p["b"], 1 << 30)
            p["got_ba"] += a.read(p["a"], 1 << 30)
    for p in pairs.values():
        if p.get("reset") or p["a"].state == RESET or (p["b"] is not None and p["b"].state == RESET):
            assert p["sent_ab"].startswith(p["got_ab"]) and p["sent_ba"].startswith(p["got_ba"])
        else:
            assert p["got_ab"] == p["sent_ab"] and p["got_ba"] == p["sent_ba"]


def test_body_in_flight_when_app_closes_gets_rst() -> None:
    srv, s = server_with_stream_1()
    frame = data_frame(1, b"x" * 1000)
    srv.receive_data(frame[:500])
    srv.read(s, 10_000)
    srv.close_stream(s)
    assert srv.data_to_send() == Y3
    events = srv.receive_data(frame[500:])
    assert [type(e) for e in events] == [StreamReset]
    assert srv.data_to_send() == Y4 and not srv.streams and not s.recv_buf


def test_bigger_window_is_granted_on_syn_and_ack() -> None:
    big = 1 << 20
    cli = Connection(is_client=True, max_stream_window=big)
    s = cli.open_stream()
    assert cli.data_to_send() == encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, big - 262144)
    cli.receive_data(data_frame(1, b"x" * big, FLAG_ACK))  # the whole granted window at once
    assert len(s.recv_buf) == big
    srv = Connection(is_client=False, max_stream_window=big)
    (ev,) = srv.receive_data(Y1)
    srv.accept_stream(ev.stream)
    assert srv.data_to_send() == encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, big - 262144)
    srv.receive_data(data_frame(1, b"y" * big))
    assert str(violation(srv, data_frame(1, b"z"))) == "receive window exceeded"


def test_queries_the_adapter_waits_on() -> None:
    cli = Connection(is_client=True, accept_backlog=2)
    a = cli.open_stream()
    b = cli.open_stream()
    assert cli.outbound_backlog_full() and cli.open_pending(a) and cli.open_pending(b)
    cli.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0))
    assert not cli.outbound_backlog_full() and not cli.open_pending(a)
    cli.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_RST, 3, 0))  # a reset frees its slot too
    assert cli.outbound_pending == 0 and not cli.open_pending(b) and cli.read_status(b) == READ_RESET
    # reader: wait, then EOF after the peer's FIN
    assert cli.read_status(a) == READ_WAIT
    cli.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN, 1, 0))
    assert cli.read_status(a) == READ_EOF
    # writer: blocked only while the window is empty and the stream can still send
    assert cli.send_data(a, memoryview(b"x" * 262144)) == 262144
    assert cli.send_blocked(a)
    cli.receive_data(encode_header(TYPE_WINDOW_UPDATE, 0, 1, 10))
    assert not cli.send_blocked(a)
    # close timer: from our FIN until the peer's (here it came first: the stream is gone at once)
    c = cli.open_stream()
    cli.end_stream(c)
    assert cli.close_pending(c)
    cli.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_ACK | FLAG_FIN, 5, 0))
    assert not cli.close_pending(c) and 5 not in cli.streams
    cli.end_stream(a)
    assert not cli.close_pending(a) and cli.num_streams == 0


def test_fin_and_rst_in_one_frame_resets_after_closing() -> None:
    srv, s = server_with_stream_1()
    srv.end_stream(s)
    events = srv.receive_data(encode_header(TYPE_WINDOW_UPDATE, FLAG_FIN | FLAG_RST, 1, 0))
    assert [type(e) for e in events] == [StreamEnded, StreamReset]
    assert s.state == RESET and not srv.streams and srv.inbound_live == 0
