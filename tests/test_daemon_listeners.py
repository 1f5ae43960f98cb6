"""Listeners: stale vs live unix sockets, ports in use, graceful stop of the accept loop."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from agentd.config import TcpAddress, UnixAddress, UserError
from agentd.listeners import ListenError, Server, adopt_socket, bind_all, bind_tcp, bind_unix


async def test_unix_listener_serves_and_removes_its_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "agentd.sock"
    bound = await bind_unix(UnixAddress(path))
    assert path.stat().st_mode & 0o777 == 0o666  # agents of any local user may connect
    client = await trio.open_unix_socket(str(path))
    server_side = await bound.listener.accept()
    await client.send_all(b"hi")
    assert await server_side.receive_some(2) == b"hi"
    await client.aclose()
    await server_side.aclose()
    await bound.aclose()
    assert not path.exists()


async def test_stale_unix_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "agentd.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))
    crashed.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    bound = await bind_unix(UnixAddress(path))
    # the path now leads to the new listener: a client's bytes reach it
    client = await trio.open_unix_socket(str(path))
    server_side = await bound.listener.accept()
    await client.send_all(b"after the crash")
    assert await server_side.receive_some(100) == b"after the crash"
    assert path.stat().st_mode & 0o777 == 0o666
    await client.aclose()
    await server_side.aclose()
    await bound.aclose()
    assert not path.exists()  # and it is the new listener's file: removed with it


async def test_live_unix_socket_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "agentd.sock"
    other = await bind_unix(UnixAddress(path))
    with pytest.raises(ListenError, match="socket in use by another process") as info:
        await bind_unix(UnixAddress(path))
    assert str(path) in str(info.value)
    await other.aclose()


async def test_regular_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "agentd.sock"
    path.write_text("not a socket")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        await bind_unix(UnixAddress(path))
    assert path.read_text() == "not a socket"


async def test_socket_file_replaced_by_someone_else_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "agentd.sock"
    bound = await bind_unix(UnixAddress(path))
    os.unlink(path)
    path.write_text("someone else's")
    await bound.aclose()
    assert path.read_text() == "someone else's"


async def test_too_long_unix_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ListenError, match="longer than 107 bytes"):
        await bind_unix(UnixAddress(tmp_path / ("x" * 120)))


async def test_port_in_use_is_an_error_naming_the_address() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ListenError) as info:
            await bind_tcp(TcpAddress("127.0.0.1", port))
        assert str(info.value) == f"cannot listen on tcp://127.0.0.1:{port}: address already in use"
    finally:
        taken.close()


async def test_bind_all_is_all_or_nothing(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    path = tmp_path / "a.sock"
    try:
        with pytest.raises(ListenError):
            await bind_all([UnixAddress(path), TcpAddress("127.0.0.1", taken.getsockname()[1])])
        assert not path.exists()
    finally:
        taken.close()


async def test_tcp_port_zero_reports_the_real_port() -> None:
    [bound] = await bind_tcp(TcpAddress("127.0.0.1", 0))
    port = bound.listener.socket.getsockname()[1]
    assert port != 0
    assert bound.name == f"tcp://127.0.0.1:{port}"
    await bound.aclose()


async def test_adopted_socket_is_served_and_its_file_kept(tmp_path: Path) -> None:
    path = tmp_path / "systemd.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    bound = adopt_socket(sock)
    assert bound.name == f"unix:{path} (systemd)"
    client = await trio.open_unix_socket(str(path))
    (await bound.listener.accept()).socket.close()
    await client.aclose()
    await bound.aclose()
    assert path.exists()  # systemd owns the file


def test_connected_socket_from_accept_yes_unit_is_one_line_error() -> None:
    """Accept=yes (or systemd-socket-activate --accept) passes a connected socket, not a listener."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with (
        ours,
        theirs,
        pytest.raises(UserError, match=r"connected socket \(Accept=yes\): agentd needs Accept=no"),
    ):
        adopt_socket(ours)


async def test_server_stop_closes_listeners_then_drains_connections(tmp_path: Path) -> None:
    path = tmp_path / "agentd.sock"
    bound = await bind_unix(UnixAddress(path))
    finished = []

    async def handler(stream: trio.abc.Stream) -> None:
        data = await stream.receive_some(10)
        await stream.send_all(data.upper())
        finished.append(data)

    server = Server([bound], handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        slow = await trio.open_unix_socket(str(path))
        await trio.testing.wait_all_tasks_blocked()
        assert server.active_connections == 1
        server.stop(5)
        await trio.testing.wait_all_tasks_blocked()
        assert not path.exists()  # no new clients once stopping
        with pytest.raises(OSError):
            await trio.open_unix_socket(str(path))
        await slow.send_all(b"late")  # an open connection still completes within the grace period
        assert await slow.receive_some(10) == b"LATE"
        await slow.aclose()
    assert finished == [b"late"]


async def test_server_cancels_connections_after_the_grace_period(tmp_path: Path) -> None:
    bound = await bind_unix(UnixAddress(tmp_path / "agentd.sock"))
    cancelled = []

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(True)
            raise

    server = Server([bound], handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client = await trio.open_unix_socket(str(tmp_path / "agentd.sock"))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        server.stop(0.2)
    assert 0.2 <= trio.current_time() - start < 2
    assert cancelled == [True]
    assert await client.receive_some(10) == b""  # closed by the server
    await client.aclose()


async def test_a_failing_handler_does_not_stop_the_server(tmp_path: Path) -> None:
    path = tmp_path / "agentd.sock"
    bound = await bind_unix(UnixAddress(path))
    calls = []

    async def handler(stream: trio.abc.Stream) -> None:
        calls.append(1)
        raise RuntimeError("bug in one connection")

    server = Server([bound], handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        for _ in range(2):
            client = await trio.open_unix_socket(str(path))
            assert await client.receive_some(10) == b""
            await client.aclose()
        server.stop(1)
    assert calls == [1, 1]
