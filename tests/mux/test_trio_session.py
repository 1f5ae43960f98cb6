"""MuxSession / MuxStream over in-memory transports: trio stream conformance, timers, GoAway,
cancellation."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.mux import GoAwayCode, MuxConfig, MuxError, MuxSession, MuxStream
from agentd.mux.frame import FLAG_SYN, TYPE_WINDOW_UPDATE, FrameDecoder, encode_header
from agentd.mux.state import StreamState

H = bytes.fromhex
QUIET = MuxConfig(enable_keepalive=False)


@pytest.fixture
async def pair(nursery: trio.Nursery) -> AsyncIterator[tuple[MuxSession, MuxSession]]:
    a, b = trio.testing.memory_stream_pair()
    cli = MuxSession(a, is_client=True, config=QUIET)
    srv = MuxSession(b, is_client=False, config=QUIET)
    await nursery.start(cli.run)
    await nursery.start(srv.run)
    yield cli, srv
    await cli.aclose()
    await srv.aclose()


async def stream_pair(cli: MuxSession, srv: MuxSession) -> tuple[MuxStream, MuxStream]:
    s1 = await cli.open_stream()
    s2 = await srv.accept_stream()
    return s1, s2


async def test_check_half_closeable_stream(nursery: trio.Nursery) -> None:
    a, b = trio.testing.memory_stream_pair()
    cli = MuxSession(a, is_client=True, config=QUIET)
    srv = MuxSession(b, is_client=False, config=QUIET)
    await nursery.start(cli.run)
    await nursery.start(srv.run)

    async def maker() -> tuple[MuxStream, MuxStream]:
        return await stream_pair(cli, srv)

    async def clogged() -> tuple[MuxStream, MuxStream]:
        s1, s2 = await stream_pair(cli, srv)
        # fill the window both ways: the next send_all on either side blocks until the peer reads
        await s1.send_all(b"x" * 262144)
        await s2.send_all(b"y" * 262144)
        return s1, s2

    await trio.testing.check_half_closeable_stream(maker, clogged)
    await cli.aclose()
    await srv.aclose()


async def test_echo_large_and_eof(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair
    payload = bytes(range(256)) * 8000  # 2 MB through a 256 KiB window

    async def echo() -> None:
        s = await srv.accept_stream()
        while data := await s.receive_some():
            await s.send_all(data)
        await s.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(echo)
        s = await cli.open_stream()
        got = bytearray()

        async def reader() -> None:
            while data := await s.receive_some(70000):
                got.extend(data)

        n.start_soon(reader)
        await s.send_all(payload)
        await s.send_eof()
    assert got == payload
    await s.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert cli.num_streams == 0 and srv.num_streams == 0


def delay_line(delay: float) -> tuple[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
    """A one-way memory stream whose bytes arrive ``delay`` seconds after they were sent."""

    async def deliver_later() -> None:
        await trio.sleep(delay)
        trio.testing.memory_stream_pump(send, receive)

    send = trio.testing.MemorySendStream(send_all_hook=deliver_later)
    receive = trio.testing.MemoryReceiveStream()
    return send, receive


async def test_ping_rtt_is_the_round_trip_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # 0.25 s there and 0.5 s back: each side's ping takes both legs, nothing more
    a_to_b, b_from_a = delay_line(0.25)
    b_to_a, a_from_b = delay_line(0.5)
    cli = MuxSession(trio.StapledStream(a_to_b, a_from_b), is_client=True, config=QUIET)
    srv = MuxSession(trio.StapledStream(b_to_a, b_from_a), is_client=False, config=QUIET)
    await nursery.start(cli.run)
    await nursery.start(srv.run)
    assert await cli.ping() == pytest.approx(0.75)
    assert await srv.ping() == pytest.approx(0.75)
    # a peer that never answers makes the ping fail after the write timeout instead of returning
    silent_end, _never_read = trio.testing.memory_stream_pair()
    lonely = MuxSession(silent_end, is_client=True, config=QUIET)
    await nursery.start(lonely.run)
    start = trio.current_time()
    with pytest.raises(MuxError, match="ping timeout"):
        await lonely.ping()
    assert trio.current_time() - start == pytest.approx(QUIET.connection_write_timeout)


async def test_send_ping_is_answered_into_last_heard(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The monitor's ping: written without waiting; the answer (like any inbound frame) moves
    ``last_heard`` to the time it arrived. A peer that never answers leaves it where it was."""
    a_to_b, b_from_a = delay_line(0.25)
    b_to_a, a_from_b = delay_line(0.5)
    cli = MuxSession(trio.StapledStream(a_to_b, a_from_b), is_client=True, config=QUIET)
    srv = MuxSession(trio.StapledStream(b_to_a, b_from_a), is_client=False, config=QUIET)
    await nursery.start(cli.run)
    await nursery.start(srv.run)
    await trio.sleep(10)
    sent = trio.current_time()
    assert srv.last_heard < sent - 5
    srv.send_ping()
    await trio.sleep(5)
    assert srv.last_heard == pytest.approx(sent + 0.75)
    # the peer's own frames count the same: its ping reaches srv after 0.25 s
    sent = trio.current_time()
    nursery.start_soon(cli.ping)
    await trio.sleep(5)
    assert srv.last_heard == pytest.approx(sent + 0.25)
    silent_end, _never_read = trio.testing.memory_stream_pair()
    lonely = MuxSession(silent_end, is_client=False, config=QUIET)
    await nursery.start(lonely.run)
    heard = lonely.last_heard
    lonely.send_ping()
    await trio.sleep(30)
    assert lonely.last_heard == heard and not lonely.closed


async def test_reset_drops_data_and_peer_sees_broken(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair
    s1, s2 = await stream_pair(cli, srv)
    await s1.send_all(b"abc")
    await trio.testing.wait_all_tasks_blocked()
    await s2.reset()
    with pytest.raises(trio.ClosedResourceError):
        await s2.receive_some()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.BrokenResourceError):
        await s1.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await s1.send_all(b"more")
    assert cli.num_streams == 0 and srv.num_streams == 0


async def test_peer_rst_discards_buffered_data(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair
    s1, s2 = await stream_pair(cli, srv)
    await s1.send_all(b"abc")
    await s1.reset()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.BrokenResourceError):
        await s2.receive_some()


async def test_go_away_normal_stops_new_streams_only(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair
    s1, s2 = await stream_pair(cli, srv)
    await srv.go_away(GoAwayCode.NORMAL)
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(MuxError, match="not accepting"):
        await cli.open_stream()
    await s1.send_all(b"still")
    assert await s2.receive_some() == b"still"
    await s2.send_all(b"works")
    assert await s1.receive_some() == b"works"
    assert not cli.closed and not srv.closed


async def test_go_away_error_closes_session(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair
    s1, _s2 = await stream_pair(cli, srv)
    await srv.go_away(GoAwayCode.PROTOCOL_ERROR)
    with pytest.raises(trio.BrokenResourceError):
        await s1.receive_some()
    assert cli.closed
    with pytest.raises(trio.BrokenResourceError):
        await cli.accept_stream()


async def test_accept_raises_after_close(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair

    async def acceptor() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await srv.accept_stream()

    async with trio.open_nursery() as n:
        n.start_soon(acceptor)
        await trio.testing.wait_all_tasks_blocked()
        await srv.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await cli.accept_stream()  # the peer's transport went away


async def raw_server_peer(
    nursery: trio.Nursery, config: MuxConfig
) -> tuple[MuxSession, trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]:
    """A MuxSession whose peer is the test itself (raw bytes both ways)."""
    to_mux_send, to_mux_recv = trio.testing.memory_stream_one_way_pair()
    from_mux_send, from_mux_recv = trio.testing.memory_stream_one_way_pair()
    transport = trio.StapledStream(from_mux_send, to_mux_recv)
    session = MuxSession(transport, is_client=True, config=config)
    await nursery.start(session.run)
    return session, to_mux_send, from_mux_recv


async def test_keepalive_timeout_closes_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    session, _to_mux, from_mux = await raw_server_peer(nursery, MuxConfig())
    start = trio.current_time()
    ping = await from_mux.receive_some()
    assert trio.current_time() - start == pytest.approx(30)
    assert ping == H("00 02 00 01 00 00 00 00 00 00 00 00")  # Y7, first ping id 0
    await trio.sleep(9)
    assert not session.closed
    await trio.sleep(2)
    assert session.closed
    assert "keepalive timeout" in repr(session.close_reason)


async def test_keepalive_answered_keeps_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    session, to_mux, from_mux = await raw_server_peer(nursery, MuxConfig())
    for i in range(3):
        data = await from_mux.receive_some()
        assert data == encode_header(2, FLAG_SYN, 0, i)
        await to_mux.send_all(encode_header(2, 2, 0, i))
    assert not session.closed


async def test_inbound_ping_answered_while_app_idle(nursery: trio.Nursery) -> None:
    _session, to_mux, from_mux = await raw_server_peer(nursery, QUIET)
    await to_mux.send_all(
        H("00 00 00 00 00 00 00 09 00 00 00 02 01 02") + H("00 02 00 01 00 00 00 00 00 00 00 07")
    )
    assert await from_mux.receive_some() == H("00 02 00 02 00 00 00 00 00 00 00 07")


async def test_open_timeout_closes_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    session, _to_mux, from_mux = await raw_server_peer(nursery, QUIET)
    await session.open_stream()
    assert await from_mux.receive_some() == H("00 01 00 01 00 00 00 01 00 00 00 00")
    await trio.sleep(74)
    assert not session.closed
    await trio.sleep(2)
    assert session.closed and "open timeout" in repr(session.close_reason)


async def test_open_acked_in_time_no_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    session, to_mux, from_mux = await raw_server_peer(nursery, QUIET)
    for _ in range(3):
        s = await session.open_stream()
        await from_mux.receive_some()
        await to_mux.send_all(encode_header(TYPE_WINDOW_UPDATE, 2, s.stream_id, 0))
        await trio.sleep(50)
    await trio.sleep(200)
    assert not session.closed


async def test_close_timeout_sends_rst(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    session, to_mux, from_mux = await raw_server_peer(nursery, QUIET)
    s = await session.open_stream()
    await to_mux.send_all(encode_header(TYPE_WINDOW_UPDATE, 2, 1, 0))
    await s.send_eof()
    dec = FrameDecoder()
    frames = dec.feed(await from_mux.receive_some())
    while len(frames) < 2:
        frames += dec.feed(await from_mux.receive_some())
    assert [f.flags for f in frames] == [FLAG_SYN, 4]
    await trio.sleep(299)
    assert session.num_streams == 1
    await trio.sleep(2)
    assert await from_mux.receive_some() == H("00 01 00 08 00 00 00 01 00 00 00 00")
    assert session.num_streams == 0 and not session.closed
    with pytest.raises(trio.BrokenResourceError):
        await s.receive_some()


async def test_protocol_error_sends_go_away_and_closes(nursery: trio.Nursery) -> None:
    session, to_mux, from_mux = await raw_server_peer(nursery, QUIET)
    await to_mux.send_all(H("00 01 00 01 00 00 00 02 00 00 00 00") * 2)  # duplicate SYN
    data = b""
    while len(data) < 12:
        data += await from_mux.receive_some()
    assert data == H("00 03 00 00 00 00 00 00 00 00 00 01")
    assert await from_mux.receive_some() == b""  # then the transport is closed
    s = await session.accept_stream()  # the first, valid stream was already queued
    with pytest.raises(trio.BrokenResourceError):
        await s.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await session.accept_stream()


async def test_bad_version_closes_silently(nursery: trio.Nursery) -> None:
    session, to_mux, from_mux = await raw_server_peer(nursery, QUIET)
    await to_mux.send_all(H("01 00 00 00 00 00 00 01 00 00 00 00"))
    assert await from_mux.receive_some() == b""  # transport closed, nothing sent
    assert session.closed


async def test_backlog_overflow_rst_reader_not_blocked(nursery: trio.Nursery) -> None:
    _session, to_mux, from_mux = await raw_server_peer(
        nursery, MuxConfig(accept_backlog=2, enable_keepalive=False)
    )
    syns = b"".join(encode_header(TYPE_WINDOW_UPDATE, FLAG_SYN, i, 0) for i in (2, 4, 6))
    await to_mux.send_all(syns + H("00 02 00 01 00 00 00 00 00 00 00 07"))
    data = b""
    while len(data) < 24:
        data += await from_mux.receive_some()
    assert data == H("00 01 00 08 00 00 00 06 00 00 00 00") + H("00 02 00 02 00 00 00 00 00 00 00 07")


async def test_window_zero_writer_waits_without_timeout(
    pair: tuple[MuxSession, MuxSession], autojump_clock: trio.testing.MockClock
) -> None:
    cli, srv = pair
    s1, s2 = await stream_pair(cli, srv)
    done = trio.Event()

    async def writer() -> None:
        await s1.send_all(b"x" * 300000)
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(writer)
        await trio.sleep(3600)  # an hour at zero window: still waiting, no error
        assert not done.is_set()
        got = 0
        while got < 300000:
            got += len(await s2.receive_some())
    assert done.is_set()


async def test_cancelled_send_all_never_corrupts(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair
    s1, s2 = await stream_pair(cli, srv)
    received = bytearray()

    async def drain() -> None:
        while data := await s2.receive_some():
            received.extend(data)

    async with trio.open_nursery() as n:
        n.start_soon(drain)
        sent = bytearray()
        for i in range(60):
            chunk = bytes([i]) * (1000 * (i + 1))
            with trio.CancelScope() as scope:
                if i % 3 == 0:
                    scope.cancel()  # cancelled before anything is queued
                    await s1.send_all(chunk)
                await s1.send_all(chunk)
                sent += chunk
            if i % 3 == 1:
                with trio.move_on_after(0):  # cancelled at its first checkpoint: maybe partly queued
                    await s1.send_all(b"")
        await s1.send_eof()
    assert received == sent
    # the session is intact: a fresh stream round-trips and a ping works
    t1, t2 = await stream_pair(cli, srv)
    await t1.send_all(b"ok")
    assert await t2.receive_some() == b"ok"
    assert 0 < await cli.ping() < QUIET.connection_write_timeout  # answered, not timed out
    assert not cli.closed and not srv.closed


async def test_cancel_while_blocked_on_window_keeps_session(pair: tuple[MuxSession, MuxSession]) -> None:
    cli, srv = pair
    s1, s2 = await stream_pair(cli, srv)
    with trio.move_on_after(0.05):
        await s1.send_all(b"z" * 600000)  # blocks after 256 KiB
    received = 0
    while received < 262144:
        received += len(await s2.receive_some())
    assert received == 262144
    await s1.send_all(b"after")
    assert await s2.receive_some() == b"after"


async def test_many_open_close_cycles_no_leak(
    pair: tuple[MuxSession, MuxSession], nursery: trio.Nursery
) -> None:
    cli, srv = pair

    async def server() -> None:
        while True:
            s = await srv.accept_stream()
            data = await s.receive_some()
            await s.send_all(data)
            assert await s.receive_some() == b""
            await s.aclose()

    def live_stream_states() -> int:
        gc.collect()
        return sum(isinstance(o, StreamState) for o in gc.get_objects())

    nursery.start_soon(server)
    before = live_stream_states()
    for _ in range(1000):
        s = await cli.open_stream()
        await s.send_all(b"ping")
        assert await s.receive_some() == b"ping"
        await s.aclose()
    del s
    await trio.testing.wait_all_tasks_blocked()
    assert cli.num_streams == 0 and srv.num_streams == 0
    # nothing keeps closed streams alive (open/close timers included): at most the last one's state
    # on each side may linger until the next stream comes along
    assert live_stream_states() - before <= 2


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 50000)), min_size=1, max_size=20))
def test_random_concurrent_streams_deliver_in_order(ops: list[tuple[int, int]]) -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        cli = MuxSession(a, is_client=True, config=QUIET)
        srv = MuxSession(b, is_client=False, config=QUIET)
        async with trio.open_nursery() as n:
            await n.start(cli.run)
            await n.start(srv.run)
            streams = [await stream_pair(cli, srv) for _ in range(4)]
            expected = [bytearray() for _ in streams]
            got = [bytearray() for _ in streams]

            async def reader(i: int) -> None:
                while data := await streams[i][1].receive_some(7000):
                    got[i] += data

            async def writer(i: int) -> None:
                for idx, size in ops:
                    if idx == i:
                        chunk = bytes([i]) * size
                        expected[i] += chunk
                        await streams[i][0].send_all(chunk)
                await streams[i][0].send_eof()

            async with trio.open_nursery() as n2:
                for i in range(4):
                    n2.start_soon(reader, i)
                    n2.start_soon(writer, i)
            assert got == expected
            await cli.aclose()
            await srv.aclose()

    trio.run(main)


async def test_stuck_transport_ends_session_and_releases_writers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # the peer never reads: a lockstep transport blocks every send until the other side receives
    a, _b = trio.testing.lockstep_stream_pair()
    session = MuxSession(a, is_client=True, config=MuxConfig(keepalive_interval=30))
    await nursery.start(session.run)
    stream = await session.open_stream()
    start = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):
        with trio.move_on_after(5):  # cancelling the blocked, shielded write does not tear a frame...
            await stream.send_all(b"x" * 1000)
        await stream.send_all(b"x")  # ...the write finishes or the session ends
    assert session.closed and "keepalive timeout" in repr(session.close_reason)
    assert 40 <= trio.current_time() - start <= 42  # 30 s to the ping + 10 s write timeout (+ flush grace)


async def test_outbound_backlog_waits_and_reset_frees_a_slot(nursery: trio.Nursery) -> None:
    session, _to_mux, _from_mux = await raw_server_peer(
        nursery, MuxConfig(accept_backlog=2, enable_keepalive=False)
    )
    first = await session.open_stream()
    await session.open_stream()
    opened: list[MuxStream] = []

    async def open_one() -> None:
        opened.append(await session.open_stream())

    async with trio.open_nursery() as n:
        n.start_soon(open_one)
        await trio.testing.wait_all_tasks_blocked()
        assert not opened  # two un-ACKed streams: the third open waits
        await first.reset()
    assert len(opened) == 1 and opened[0].stream_id == 5


async def test_fin_without_ack_frees_an_outbound_slot(nursery: trio.Nursery) -> None:
    session, to_mux, _from_mux = await raw_server_peer(
        nursery, MuxConfig(accept_backlog=1, enable_keepalive=False)
    )
    first = await session.open_stream()
    await first.aclose()  # FIN before the peer accepted
    opened: list[MuxStream] = []

    async def open_one() -> None:
        opened.append(await session.open_stream())

    async with trio.open_nursery() as n:
        n.start_soon(open_one)
        await trio.testing.wait_all_tasks_blocked()
        assert not opened
        await to_mux.send_all(H("00 01 00 04 00 00 00 01 00 00 00 00"))  # Go's FIN, never an ACK
    assert len(opened) == 1 and session.num_streams == 1
