"""Binding listeners (unix, tcp, systemd fds) and the accept loop with hypercorn-style graceful stop.

A unix socket file left behind by a crashed daemon is replaced; one that still accepts connections
belongs to a live daemon and is an error. Only socket files agentd created itself are removed on
exit, and only if they are still the same file (an operator may have started another daemon).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import attrs
import trio

from agentd.config import ListenAddress, TcpAddress, UnixAddress, UserError

log = logging.getLogger("agentd.listeners")

#: Listen backlog: connections the kernel completes while agentd is busy. When a replica or worker
#: dies, thousands of agents redial the survivors at once; past the backlog the kernel drops their
#: handshakes (the agents then wait out SYN retries and back off). Go's listeners, Coder's
#: included, ask for the kernel's maximum too; Linux caps it at net.core.somaxconn (4096 by default).
BACKLOG = 65535
SOCKET_MODE = 0o666
MAX_UNIX_PATH = 107  # sizeof(sun_path) - 1 on Linux
_ACCEPT_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

ConnectionHandler = Callable[[trio.abc.Stream], Awaitable[None]]


class ListenError(UserError):
    """An address could not be bound (in use, permission, bad path)."""


@attrs.define(eq=False)
class BoundListener:
    """One listening socket, what to call it in messages, and the socket file we own (if any)."""

    listener: trio.SocketListener
    name: str
    owned_path: Path | None = None
    owned_ident: tuple[int, int] | None = None  # (st_dev, st_ino) of owned_path when we bound it

    async def aclose(self) -> None:
        """Close the socket; remove the socket file only if it is still the one we created."""
        await self.listener.aclose()
        if self.owned_path is None:
            return
        try:
            st = os.lstat(self.owned_path)
            if (st.st_dev, st.st_ino) == self.owned_ident:
                os.unlink(self.owned_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", self.owned_path, e.strerror)
        self.owned_path = None


def describe_bind_error(e: OSError) -> str:
    """A bind/listen failure in a few words (the error line of `cannot listen on ADDR: ...`)."""
    if e.errno == errno.EADDRINUSE:
        return "address already in use"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine"
    return e.strerror or str(e)


async def _unix_socket_is_live(path: Path) -> bool:
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(2):
            await probe.connect(str(path))
            return True
        return True  # it did not refuse: something is there, just slow
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()


async def bind_unix(address: UnixAddress, *, backlog: int = BACKLOG) -> BoundListener:
    """Bind a unix stream socket, replacing a stale socket file from a crashed run."""
    path = address.path
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ListenError(f"cannot listen on {address}: the path is longer than {MAX_UNIX_PATH} bytes")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ListenError(
            f"cannot listen on {address}: cannot create {path.parent}: {describe_bind_error(e)}"
        ) from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ListenError(f"cannot listen on {address}: {describe_bind_error(e)}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"cannot listen on {address}: {path} exists and is not a socket")
        if await _unix_socket_is_live(path):
            raise ListenError(
                f"cannot listen on {address}: socket in use by another process (is agentd running?)"
            )
        log.info("removing stale socket %s", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ListenError(
                f"cannot listen on {address}: cannot remove stale socket: {describe_bind_error(e)}"
            ) from None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        # Same reach as the TCP listener on localhost: every agent request is authenticated by its
        # token, so any local user may connect (the directory's permissions can still narrow it).
        os.chmod(path, SOCKET_MODE)
        st = os.lstat(path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {describe_bind_error(e)}") from None
    return BoundListener(
        trio.SocketListener(sock), str(address), owned_path=path, owned_ident=(st.st_dev, st.st_ino)
    )


async def bind_tcp(address: TcpAddress, *, backlog: int = BACKLOG) -> list[BoundListener]:
    """Bind every address HOST resolves to (e.g. both families for `localhost`)."""
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host, backlog=backlog)
    except OSError as e:
        raise ListenError(f"cannot listen on {address}: {describe_bind_error(e)}") from None
    out = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        out.append(BoundListener(listener, str(TcpAddress(host, port))))
    return out


def describe_peer(stream: trio.abc.Stream) -> dict[str, object]:
    """Who is on an accepted connection, for log lines: ``transport`` (unix or tcp) and ``remote``
    (``HOST:PORT``; for a unix socket ``unix:PATH`` of the listener, with the peer's pid and uid)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return {"transport": type(stream).__name__}
    try:
        if sock.family == socket.AF_UNIX:
            fields: dict[str, object] = {"transport": "unix", "remote": f"unix:{sock.getsockname() or '?'}"}
            peercred = getattr(socket, "SO_PEERCRED", None)  # Linux
            if peercred is not None:
                pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, 12))
                fields["peer_pid"], fields["peer_uid"] = pid, uid
            return fields
        host, port = sock.getpeername()[:2]
        return {"transport": "tcp", "remote": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    except OSError as e:  # the peer is already gone
        return {"transport": "?", "remote": f"? ({e.strerror})"}


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def adopt_socket(sock: socket.socket) -> BoundListener:
    """Wrap a listening socket handed to us (systemd); we never remove its file."""
    sock.setblocking(False)
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        if _is_connected(sock):
            raise UserError(
                f"systemd passed fd {sock.fileno()}, a connected socket (Accept=yes): agentd needs "
                "Accept=no in its .socket unit (it accepts connections itself)"
            )
        sock.listen(BACKLOG)
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        label = f"unix:{name.decode() if isinstance(name, bytes) else name}"
    else:
        label = str(TcpAddress(name[0], name[1]))
    return BoundListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), f"{label} (systemd)")


async def bind_all(
    addresses: Iterable[ListenAddress], inherited: Iterable[socket.socket] = ()
) -> list[BoundListener]:
    """Bind everything or nothing: on the first failure close what was already bound, then raise."""
    bound: list[BoundListener] = []
    try:
        for sock in inherited:
            bound.append(adopt_socket(sock))
        for address in addresses:
            if isinstance(address, UnixAddress):
                bound.append(await bind_unix(address))
            else:
                bound.extend(await bind_tcp(address))
    except BaseException:
        with trio.CancelScope(shield=True):
            for listener in bound:
                await listener.aclose()
        raise
    return bound


@attrs.define(eq=False)
class Server:
    """Accepts on every listener and runs `handler` per connection, each in a task this server owns.

    `stop(grace)` stops accepting and closes the listeners at once (so the unix socket files go away
    and new clients are refused), then gives open connections `grace` seconds before cancelling them.
    `run` returns when every connection task has finished.
    """

    listeners: Sequence[BoundListener]
    handler: ConnectionHandler
    _accept_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _connections_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _stopped: trio.Event = attrs.field(factory=trio.Event, init=False)
    active_connections: int = attrs.field(default=0, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._connections_scope:
                async with trio.open_nursery() as connections:
                    with self._accept_scope:
                        async with trio.open_nursery() as accepting:
                            for bound in self.listeners:
                                accepting.start_soon(self._accept_loop, bound, connections)
                            task_status.started()
                    await self._close_listeners()
        finally:
            await self._close_listeners()

    def stop(self, grace: float) -> None:
        """Stop accepting now; cancel connections still open after `grace` seconds."""
        self._accept_scope.cancel()
        self._connections_scope.deadline = min(self._connections_scope.deadline, trio.current_time() + grace)

    async def _close_listeners(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        with trio.CancelScope(shield=True):
            for bound in self.listeners:
                await bound.aclose()

    async def _accept_loop(self, bound: BoundListener, connections: trio.Nursery) -> None:
        while True:
            try:
                stream = await bound.listener.accept()
            except OSError as e:
                if e.errno in _ACCEPT_RESOURCE_ERRNOS:
                    log.error("accept on %s failed: %s; retrying in 100 ms", bound.name, e.strerror)
                    await trio.sleep(0.1)
                    continue
                raise
            connections.start_soon(self._serve_one, stream)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        self.active_connections += 1
        try:
            await self.handler(stream)
        except Exception:
            log.exception("connection handler failed")
        finally:
            self.active_connections -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
