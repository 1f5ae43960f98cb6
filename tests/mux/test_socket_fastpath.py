"""The socket fast path (MuxSession over a plain trio.SocketStream: readv/writev on the descriptor)
against the generic trio.abc.Stream path: same bytes, same errors."""

from __future__ import annotations

import random
import socket
import tracemalloc

import pytest
import trio
import trio.testing

from agentd.mux import MuxConfig, MuxSession, MuxStream
from agentd.mux.frame import FLAG_FIN, FLAG_SYN, TYPE_DATA, FrameDecoder, encode_header
from agentd.mux.sockio import SocketIO

QUIET = MuxConfig(enable_keepalive=False)


def socket_pair(sndbuf: int | None = None) -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if sndbuf is not None:
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return trio.SocketStream(a), trio.SocketStream(b)


async def start_pair(
    nursery: trio.Nursery, sndbuf: int | None = None
) -> tuple[MuxSession, MuxSession, trio.SocketStream]:
    a, b = socket_pair(sndbuf)
    cli = MuxSession(a, is_client=True, config=QUIET)
    srv = MuxSession(b, is_client=False, config=QUIET)
    assert cli._sockio is not None and srv._sockio is not None  # the fast path is in use
    await nursery.start(cli.run)
    await nursery.start(srv.run)
    return cli, srv, b


async def test_memory_stream_uses_generic_path() -> None:
    a, _b = trio.testing.memory_stream_pair()
    assert MuxSession(a, is_client=True, config=QUIET)._sockio is None


@pytest.mark.parametrize("sndbuf", [None, 4096])
async def test_echo_many_streams_through_small_socket_buffers(
    nursery: trio.Nursery, sndbuf: int | None
) -> None:
    # a tiny socket buffer forces partial writevs and EAGAIN on both sides, with frames of several
    # streams queued at once
    cli, srv, _ = await start_pair(nursery, sndbuf)
    payloads = [bytes([i]) * (300_000 + i * 7919) for i in range(6)]

    async def echo() -> None:
        async with trio.open_nursery() as n:
            for _ in payloads:
                s = await srv.accept_stream()

                async def serve(s: MuxStream) -> None:
                    while data := await s.receive_some(50_000):
                        await s.send_all(data)
                    await s.aclose()

                n.start_soon(serve, s)

    async def one(payload: bytes) -> None:
        s = await cli.open_stream()
        got = bytearray()

        async def reader() -> None:
            while data := await s.receive_some():
                got.extend(data)

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            for off in range(0, len(payload), 70_000):
                await s.send_all(payload[off : off + 70_000])
            await s.send_eof()
        assert got == payload
        await s.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(echo)
        for p in payloads:
            n.start_soon(one, p)
    await trio.testing.wait_all_tasks_blocked()
    assert cli.num_streams == 0 and srv.num_streams == 0
    await cli.aclose()
    await srv.aclose()


async def test_small_round_trips_and_new_streams(nursery: trio.Nursery) -> None:
    cli, srv, _ = await start_pair(nursery)

    async def server() -> None:
        while True:
            try:
                s = await srv.accept_stream()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            while data := await s.receive_some():
                await s.send_all(data)
            await s.aclose()

    nursery.start_soon(server)
    s = await cli.open_stream()
    for i in range(200):
        await s.send_all(b"%d" % i)
        assert await s.receive_some() == b"%d" % i
    await s.aclose()
    for i in range(100):
        s = await cli.open_stream()
        await s.send_all(b"new %d" % i)
        assert await s.receive_some() == b"new %d" % i
        await s.send_eof()
        assert await s.receive_some() == b""
        await s.aclose()
    assert 0 < await cli.ping() < QUIET.connection_write_timeout  # answered, not timed out
    await cli.aclose()
    await srv.aclose()


async def test_peer_transport_eof_ends_session(nursery: trio.Nursery) -> None:
    a, b = socket_pair()
    cli = MuxSession(a, is_client=True, config=QUIET)
    await nursery.start(cli.run)
    s = await cli.open_stream()
    await s.send_all(b"x")
    await b.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await s.receive_some()
    with trio.fail_after(5):
        while True:  # writes fail once the peer's end is gone
            try:
                await s.send_all(b"y" * 100_000)
            except trio.BrokenResourceError:
                break
    assert cli.closed


async def test_frames_reach_a_raw_peer_intact_with_partial_writes(nursery: trio.Nursery) -> None:
    # what the fast path writes decodes to exactly the frames queued, across partial writes
    a, b = socket_pair(4096)
    cli = MuxSession(a, is_client=True, config=QUIET)
    await nursery.start(cli.run)
    s = await cli.open_stream()
    payload = bytes(range(256)) * 800
    async with trio.open_nursery() as n:
        n.start_soon(s.send_all, payload)
        dec = FrameDecoder()
        frames = []
        body = bytearray()
        while len(body) < len(payload):
            chunk = await b.receive_some(3000)
            for f in dec.feed(chunk):
                frames.append(f)
                body += f.body
        assert bytes(body) == payload
        assert frames[0].flags & 1  # the SYN first
    await cli.aclose()


async def test_send_nowait_returns_the_unwritten_rest() -> None:
    a, b = socket_pair(4096)
    io = SocketIO(a)
    chunks: list[bytes | memoryview] = [b"h" * 12, b"x" * 200_000, b"t" * 12]
    rest = io.send_nowait(list(chunks))
    written = 200_024 - sum(len(c) for c in rest)
    assert 0 < written < 200_024
    got = bytearray()
    while len(got) < written:
        got += await b.receive_some()
    assert bytes(got) == b"".join(chunks)[:written]
    assert io.send_nowait([]) == []
    await a.aclose()
    with pytest.raises(trio.ClosedResourceError):
        io.send_nowait([b"late"])
    await b.aclose()


def _raw_stream_bytes(payload: bytes, frame_size: int) -> bytes:
    """What a yamux client writes to open stream 1, send `payload` in Data frames and FIN it."""
    out = bytearray()
    for off in range(0, len(payload), frame_size):
        flags = FLAG_SYN if off == 0 else 0
        body = payload[off : off + frame_size]
        if off + frame_size >= len(payload):
            flags |= FLAG_FIN
        out += encode_header(TYPE_DATA, flags, 1, len(body)) + body
    return bytes(out)


@pytest.mark.parametrize("chunk", [4093, 70_001])
async def test_sessions_sharing_the_read_buffer_keep_their_own_bytes(
    nursery: trio.Nursery, chunk: int
) -> None:
    # The fast path reads every session of the thread into one shared buffer. Several sessions
    # receive big frames at the same time, their bytes arriving interleaved and cut at odd places
    # (headers and bodies split across reads): each stream must get exactly its own payload. A
    # reader that parsed its read after an await (when another session's read may have overwritten
    # the buffer) would hand over another session's bytes or fail on a garbled header.
    count = 4
    payloads = [random.Random(i).randbytes(240_000) for i in range(count)]
    peers = []
    sessions = []
    for _ in range(count):
        a, b = socket_pair()
        srv = MuxSession(b, is_client=False, config=QUIET)
        assert srv._sockio is not None
        await nursery.start(srv.run)
        peers.append(a)
        sessions.append(srv)

    async def send(peer: trio.SocketStream, data: bytes) -> None:
        for off in range(0, len(data), chunk):
            await peer.send_all(data[off : off + chunk])

    received: list[bytes] = [b""] * count

    async def receive(i: int) -> None:
        stream = await sessions[i].accept_stream()
        got = bytearray()
        while data := await stream.receive_some():
            got += data
        received[i] = bytes(got)

    async with trio.open_nursery() as n:
        for i in range(count):
            n.start_soon(receive, i)
            n.start_soon(send, peers[i], _raw_stream_bytes(payloads[i], 80_000))
    for i in range(count):
        assert not sessions[i].closed, sessions[i].close_reason
        assert received[i] == payloads[i]


async def test_idle_sessions_do_not_hold_a_read_buffer_each(nursery: trio.Nursery) -> None:
    # what an idle connected session costs in Python allocations (the reader's buffer was 64 KiB
    # per session; the fast path now shares one per thread)
    pairs = 40
    # one session first, so the thread's shared buffer and the module-level caches exist
    await start_pair(nursery)
    await trio.testing.wait_all_tasks_blocked()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(pairs):
            await start_pair(nursery)
        await trio.testing.wait_all_tasks_blocked()
        per_session = (tracemalloc.get_traced_memory()[0] - before) / (2 * pairs)
    finally:
        tracemalloc.stop()
    assert per_session < 40 * 1024, f"{per_session:.0f} bytes per idle session"
