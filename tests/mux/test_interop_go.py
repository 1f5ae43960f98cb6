"""agentd.mux against the real hashicorp/yamux, in both directions, over Unix sockets and TCP.

The Go side is interop/goyamux (built once per session by tests/gopeer.py). Go-client tests run a
scripted goyamux client against an agentd.mux server defined here; agentd-client tests drive an
agentd.mux client against a goyamux server. Both servers speak the same per-stream protocol: a
command line ("echo", "sink", "source N", "goaway", "rst", "drop", "watch TAG") and then payload.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from agentd.mux import GoAwayCode, MuxConfig, MuxError, MuxSession, MuxStream
from tests import gopeer
from tests.gopeer import connect, go_server, run_go_client

# The session fixture that builds the Go peer (skip or fail without Go); made visible here until
# tests/conftest.py lists `pytest_plugins = ["tests.gopeer"]`.
go_peer = gopeer.go_peer

pytestmark = pytest.mark.interop

TRANSPORTS = ["unix", "tcp"]
# What "the session is over" and "this stream was reset" may look like through agentd's API.
ENDED = (trio.ClosedResourceError, trio.BrokenResourceError, MuxError)


def pattern(n: int) -> bytes:
    """The same bytes goyamux's pattern(n) produces."""
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


@pytest.fixture(params=TRANSPORTS)
def listen_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "unix":
        return f"unix:{tmp_path / 'mux.sock'}"
    return "tcp:127.0.0.1:0"


# ---------------------------------------------------------------------------------------------
# agentd.mux server speaking the command protocol


async def read_line(stream: MuxStream) -> tuple[bytes, bytes]:
    buffered = b""
    while b"\n" not in buffered:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b"", buffered
        buffered += chunk
    line, _, rest = buffered.partition(b"\n")
    return line, rest


async def read_exactly(stream: MuxStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await stream.receive_some(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def read_to_eof(stream: MuxStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(65536):
        out += chunk
    return bytes(out)


async def reset(stream: MuxStream) -> None:
    result = stream.reset()  # sync or async in agentd.mux; accept both
    if inspect.isawaitable(result):
        await result


async def serve_stream(session: MuxSession, stream: MuxStream) -> None:
    try:
        line, rest = await read_line(stream)
        command = line.split()
        if not command:
            return
        if command[0] in (b"echo", b"E", b"goaway"):
            if command[0] == b"goaway":
                await session.go_away(code=GoAwayCode.NORMAL)
            if rest:
                await stream.send_all(rest)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        elif command[0] in (b"sink", b"S"):
            count = len(rest) + len(await read_to_eof(stream))
            await stream.send_all(b"%d\n" % count)
        elif command[0] == b"source":
            await stream.send_all(pattern(int(command[1])))
            await stream.send_eof()
            await read_to_eof(stream)
        elif command[0] == b"rst":
            await reset(stream)
        elif command[0] == b"drop":
            pass  # closed below without reading what the peer sends
    except ENDED:
        pass
    finally:
        try:
            await stream.aclose()
        except ENDED:
            pass


@attrs.define
class MuxServer:
    address: str
    #: one entry per finished session: the exception type that ended accept_stream()
    ended: list[type[BaseException]] = attrs.Factory(list)
    sessions_done: trio.Event = attrs.Factory(trio.Event)


@asynccontextmanager
async def mux_server(listen: str, config: MuxConfig | None = None) -> AsyncIterator[MuxServer]:
    """An agentd.mux yamux server on `listen` that serves every stream with serve_stream."""
    family, _, where = listen.partition(":")
    if family == "unix":
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(where)
        address = listen
    else:
        sock = trio.socket.socket(trio.socket.AF_INET)
        await sock.bind(("127.0.0.1", 0))
        address = f"tcp:127.0.0.1:{sock.getsockname()[1]}"
    sock.listen(16)
    listener = trio.SocketListener(sock)
    server = MuxServer(address)

    async def session_main(conn: trio.SocketStream) -> None:
        session = MuxSession(conn, is_client=False, config=config or MuxConfig())
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            try:
                while True:
                    stream = await session.accept_stream()
                    nursery.start_soon(serve_stream, session, stream)
            except ENDED as exc:
                server.ended.append(type(exc))
                server.sessions_done.set()
            await session.aclose()

    async with trio.open_nursery() as nursery:

        async def accept_loop() -> None:
            async with listener:
                while True:
                    nursery.start_soon(session_main, await listener.accept())

        nursery.start_soon(accept_loop)
        yield server
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# Go client → agentd.mux server

GO_CLIENT_SCENARIOS = [
    "echo",  # 100 KB echoed
    "bigwrite",  # 1 MiB in one Write through the 256 KiB window, echoed back
    "sink",  # 1 MiB, Go half-closes, agentd answers the count after the FIN
    "halfclose",  # agentd half-closes first, Go reads EOF and still writes
    "concurrent",  # 200 streams at once
    "cycles",  # 10,000 sequential open/round trip/close, no stream left on the Go side
    "ping",  # Go Session.Ping answered by agentd
    "goaway",  # agentd go_away(NORMAL): Go Open fails, the open stream finishes
    "rst",  # agentd reset(): Go Read and Write see "connection reset"
    "drop",  # agentd aclose() without reading: Go's 2 MiB Write fails instead of waiting for credit
]


@pytest.mark.parametrize("scenario", GO_CLIENT_SCENARIOS)
async def test_go_client_against_agentd_server(go_peer: Path, listen_address: str, scenario: str) -> None:
    async with mux_server(listen_address) as server:
        [result] = await run_go_client(go_peer, server.address, "-script", scenario)
        assert result["ok"], result
        # The Go client closed its session (plain transport EOF): agentd's accept ends with an error.
        with trio.fail_after(5):
            await server.sessions_done.wait()
        assert server.ended, "accept_stream() never reported the end of the session"


async def test_go_keepalive_pings_are_answered(go_peer: Path, listen_address: str) -> None:
    """Go pings every 50 ms and kills the session if an answer takes over 1 s."""
    async with mux_server(listen_address) as server:
        [result] = await run_go_client(
            go_peer, server.address, "-keepalive", "50ms", "-write-timeout", "1s", "-script", "keepalive"
        )
        assert result["ok"], result


# ---------------------------------------------------------------------------------------------
# agentd.mux client → Go server


@asynccontextmanager
async def agentd_client(address: str, config: MuxConfig | None = None) -> AsyncIterator[MuxSession]:
    conn = await connect(address)
    session = MuxSession(conn, is_client=True, config=config or MuxConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        yield session
        await session.aclose()
        nursery.cancel_scope.cancel()


async def open_command(session: MuxSession, command: str) -> MuxStream:
    stream = await session.open_stream()
    await stream.send_all(command.encode() + b"\n")
    return stream


async def echo_through(stream: MuxStream, payload: bytes) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        assert await read_exactly(stream, len(payload)) == payload


async def test_agentd_client_echo(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        stream = await open_command(session, "echo")
        await echo_through(stream, pattern(100_000))
        await stream.send_eof()
        assert await stream.receive_some(10) == b""  # Go closes after our EOF
        await stream.aclose()


async def test_agentd_client_1mib_through_window(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        stream = await open_command(session, "echo")
        await echo_through(stream, pattern(1 << 20))  # one send_all of 4 windows, echoed back
        await stream.aclose()


async def test_agentd_client_sink_half_close(go_peer: Path, listen_address: str) -> None:
    """agentd half-closes; Go counts to EOF and still answers on the half-open stream."""
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        stream = await open_command(session, "sink")
        await stream.send_all(pattern(1 << 20))
        await stream.send_eof()
        assert await read_to_eof(stream) == b"%d\n" % (1 << 20)
        await stream.aclose()


async def test_agentd_client_go_half_closes_first(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        stream = await open_command(session, "source 300000")
        assert await read_to_eof(stream) == pattern(300_000)
        await stream.send_all(b"still writable after the peer's FIN")
        await stream.aclose()


async def test_agentd_client_200_concurrent_streams(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:

        async def one(i: int) -> None:
            stream = await open_command(session, "echo")
            await echo_through(stream, b"stream %d:" % i + pattern(16 << 10))
            await stream.aclose()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)


async def test_agentd_client_10000_open_close_cycles(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        with trio.fail_after(40):
            for i in range(10_000):
                stream = await session.open_stream()
                await stream.send_all(b"E\n" + bytes([i & 0xFF]))
                assert await read_exactly(stream, 1) == bytes([i & 0xFF])
                await stream.send_eof()
                assert await stream.receive_some(1) == b""
                await stream.aclose()
        # Both FINs were seen for every stream: none may be left in the session's table.
        assert session.num_streams == 0
        # The session still works after 10,000 streams came and went.
        stream = await open_command(session, "echo")
        await echo_through(stream, b"after")
        await stream.aclose()


async def test_agentd_ping_against_go(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        for _ in range(3):
            with trio.fail_after(5):
                rtt = await session.ping()
            assert 0 < rtt < 5


async def test_agentd_answers_go_server_keepalive(go_peer: Path, listen_address: str) -> None:
    """A Go server pinging every 50 ms with a 1 s deadline keeps the session."""
    args = ("-keepalive", "50ms", "-write-timeout", "1s")
    async with go_server(go_peer, listen_address, *args) as go, agentd_client(go.address) as session:
        await trio.sleep(1.5)
        stream = await open_command(session, "echo")
        with trio.fail_after(5):
            await echo_through(stream, b"alive")
        await stream.aclose()


async def test_agentd_reset_is_connection_reset_in_go(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        stream = await open_command(session, "watch r1")
        assert await read_exactly(stream, 9) == b"watching\n"
        await stream.send_all(b"some bytes")
        await reset(stream)
        with trio.fail_after(5):
            event = await go.next_event()
        assert event["tag"] == "r1"
        assert event["err"] == "connection reset", event
        # Other streams are unaffected.
        other = await open_command(session, "echo")
        await echo_through(other, b"fine")
        await other.aclose()


async def test_go_backlog_overflow_resets_agentd_stream(go_peer: Path, listen_address: str) -> None:
    """A Go server that never accepts, backlog 2: the third stream gets RST."""
    args = ("-serve", "none", "-backlog", "2")
    async with go_server(go_peer, listen_address, *args) as go, agentd_client(go.address) as session:
        with trio.fail_after(5):
            streams = [await session.open_stream() for _ in range(3)]
            for stream in streams[:2]:
                await stream.send_all(b"x")  # waiting in Go's backlog: writable
            # The RST surfaces on whichever call comes after it arrived.
            with pytest.raises(trio.BrokenResourceError):
                await streams[2].send_all(b"x")
                await streams[2].receive_some(10)


async def test_go_away_from_go_stops_agentd_opens(go_peer: Path, listen_address: str) -> None:
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address) as session:
        stream = await open_command(session, "goaway")
        await echo_through(stream, b"before")  # Go sent GoAway before echoing this
        with trio.fail_after(5), pytest.raises(ENDED):
            await session.open_stream()  # refused locally, like Go's ErrRemoteGoAway
        await echo_through(stream, pattern(300_000))  # the existing stream finishes normally
        await stream.send_eof()
        assert await stream.receive_some(1) == b""
        await stream.aclose()


async def test_agentd_client_open_close_beyond_outbound_backlog(go_peer: Path, listen_address: str) -> None:
    """Open and at once close 300 streams while Go is not accepting yet (hashicorp lets at most
    256 un-ACKed opens wait, like agentd). A Go stream that got our FIN before Accept never sends
    an ACK, only its own FIN, so that FIN must free the outbound slot for the parked opener."""
    args = ("-accept-delay", "300ms")
    async with go_server(go_peer, listen_address, *args) as go, agentd_client(go.address) as session:
        with trio.fail_after(5):  # takes well under a second when the slots are freed
            for _ in range(300):
                stream = await session.open_stream()
                await stream.aclose()
            stream = await open_command(session, "echo")
            await echo_through(stream, b"still opening")
            await stream.aclose()


# ---------------------------------------------------------------------------------------------
# Windows larger than 256 KiB (advertised as an extra delta on the SYN / ACK window update)

BIG_WINDOW = 1 << 20


async def test_big_windows_go_client_against_agentd_server(go_peer: Path, listen_address: str) -> None:
    """Both ends allow 1 MiB per stream: Go sends Data frames of up to 1 MiB, and so does agentd."""
    async with mux_server(listen_address, MuxConfig(max_stream_window=BIG_WINDOW)) as server:
        [result] = await run_go_client(
            go_peer, server.address, "-window", str(BIG_WINDOW), "-script", "hugewrite"
        )
        assert result["ok"], result


async def test_big_windows_agentd_client_against_go_server(go_peer: Path, listen_address: str) -> None:
    """agentd's SYN grants Go 1 MiB of credit, so Go may send 1 MiB before agentd reads a byte."""
    args = ("-window", str(BIG_WINDOW))
    config = MuxConfig(max_stream_window=BIG_WINDOW)
    async with go_server(go_peer, listen_address, *args) as go, agentd_client(go.address, config) as session:
        stream = await open_command(session, f"source {BIG_WINDOW} big")
        with trio.fail_after(10):
            # Go's Write returns before the application read a byte: the SYN granted the whole MiB
            assert await go.next_event() == {"event": "sourced", "tag": "big", "wrote": BIG_WINDOW}
            assert await read_to_eof(stream) == pattern(BIG_WINDOW)
        await stream.aclose()
        stream = await open_command(session, "echo")
        with trio.fail_after(20):
            await echo_through(stream, pattern(4 << 20))
        await stream.aclose()


async def test_go_client_big_window_against_default_agentd(go_peer: Path, listen_address: str) -> None:
    """Go's SYN carries 768 KiB of extra credit: agentd may then send Go frames of up to 1 MiB."""
    async with mux_server(listen_address) as server:
        args = ("-window", str(BIG_WINDOW), "-script", "hugewrite")
        [result] = await run_go_client(go_peer, server.address, *args)
        assert result["ok"], result


async def test_default_agentd_client_against_big_window_go(go_peer: Path, listen_address: str) -> None:
    """Go's ACK carries 768 KiB of extra credit for agentd's stream."""
    args = ("-window", str(BIG_WINDOW))
    async with go_server(go_peer, listen_address, *args) as go, agentd_client(go.address) as session:
        stream = await open_command(session, "echo")
        with trio.fail_after(20):
            await echo_through(stream, pattern(4 << 20))
        await stream.aclose()


async def test_agentd_keepalive_against_go(go_peer: Path, listen_address: str) -> None:
    """agentd pings Go every 50 ms with a 1 s deadline; Go answers, so the session lives on."""
    config = MuxConfig(keepalive_interval=0.05, connection_write_timeout=1.0)
    async with go_server(go_peer, listen_address) as go, agentd_client(go.address, config) as session:
        await trio.sleep(1.0)
        stream = await open_command(session, "echo")
        with trio.fail_after(5):
            await echo_through(stream, b"alive")
        await stream.aclose()


async def test_local_reset_frees_an_outbound_slot(go_peer: Path, listen_address: str) -> None:
    """256 opens wait for ACKs from a Go server that never accepts; an opener parked for the
    257th slot must get it as soon as the application resets one of the waiting streams."""
    args = ("-serve", "none", "-backlog", "300")
    async with go_server(go_peer, listen_address, *args) as go, agentd_client(go.address) as session:
        with trio.fail_after(5):
            waiting = [await session.open_stream() for _ in range(256)]
            opened: list[MuxStream] = []

            async def open_one() -> None:
                opened.append(await session.open_stream())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_one)
                await trio.testing.wait_all_tasks_blocked()  # the opener ran as far as it could
                assert not opened, "the 257th open did not wait for a free slot"
                await reset(waiting[0])
            assert len(opened) == 1
