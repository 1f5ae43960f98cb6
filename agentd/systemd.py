"""systemd integration without a dependency: socket activation (LISTEN_FDS) and sd_notify.

Both protocols are tiny and stable (see sd_listen_fds(3) and sd_notify(3)): inherited listening
sockets start at fd 3, and notifications are single datagrams of `KEY=VALUE` lines sent to the
Unix socket named by NOTIFY_SOCKET (a leading `@` means the abstract namespace).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

import attrs
import trio
from trio_util import periodic  # type: ignore[import-untyped]

SD_LISTEN_FDS_START = 3


def listen_fds(environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[socket.socket]:
    """Return the listening sockets systemd passed to this process (empty when not socket-activated).

    The variables are honoured only when LISTEN_PID names this process, so a child we spawn never
    mistakes our sockets for its own; with `unset` they are removed from the environment afterwards.
    """
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise OSError(f"systemd passed fd {fd} which is not a stream socket")
        sockets.append(sock)
    return sockets


def _notify_address(value: str) -> str | bytes:
    return b"\0" + value[1:].encode() if value.startswith("@") else value


@attrs.define
class Notifier:
    """Sends sd_notify messages; a no-op when NOTIFY_SOCKET is unset (not run by systemd)."""

    address: str | bytes | None
    _sock: trio.socket.SocketType | None = attrs.field(default=None, init=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        return cls(_notify_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def notify(self, *lines: str) -> bool:
        """Send one datagram of `lines`; returns False (and never raises) if it could not be sent.

        A broken notification channel must not take the daemon down: systemd then restarts or times
        it out on its own terms.
        """
        if self.address is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await self._sock.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when the watchdog is off."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid is not None and watchdog_pid != str(os.getpid()):
        return None
    if usec <= 0:
        return None
    return max(usec / 2_000_000, 0.001)


async def run_watchdog(
    notifier: Notifier,
    interval: float | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ping the systemd watchdog every `interval` seconds for as long as the event loop is alive."""
    task_status.started()
    if interval is None or not notifier.enabled:
        await trio.sleep_forever()
    async for _ in periodic(interval):
        await notifier.notify("WATCHDOG=1")
