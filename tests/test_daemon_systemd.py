"""sd_notify datagrams, the watchdog cadence and LISTEN_FDS parsing (fd passing end to end is in test_cli)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio
import trio.testing

from agentd import systemd


def _receiver(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


async def test_notify_sends_one_datagram_per_call(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path / "notify")
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert notifier.enabled
    assert await notifier.notify("READY=1", "STATUS=serving")
    assert await notifier.notify("STOPPING=1")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"
    assert receiver.recv(4096) == b"STOPPING=1"
    notifier.close()
    receiver.close()


async def test_notify_supports_the_abstract_namespace() -> None:
    name = f"agentd-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
    assert await notifier.notify("READY=1")
    assert receiver.recv(100) == b"READY=1"
    notifier.close()
    receiver.close()


async def test_notify_is_a_noop_without_systemd_and_never_raises(tmp_path: Path) -> None:
    assert not await systemd.Notifier.from_environ({}).notify("READY=1")
    gone = systemd.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not await gone.notify("READY=1")


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


async def test_watchdog_pings_every_interval(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    receiver = _receiver(tmp_path / "notify")
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    with trio.move_on_after(31):
        await systemd.run_watchdog(notifier, 15.0)
    pings = []
    while True:
        try:
            pings.append(receiver.recv(100))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 3  # at t = 0, 15, 30
    notifier.close()
    receiver.close()


def test_listen_fds_ignores_another_process_and_unsets_the_variables() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.listen_fds(env) == []
    assert env == {}
    assert systemd.listen_fds({}) == []
    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}) == []
