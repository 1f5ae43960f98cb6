"""Where the agent dials and how: ``unix:/path`` or ``tcp://host:port``, then the HTTP upgrade.

Pure parsing (:func:`parse_target`) under one small trio function (:func:`connect`) that opens the
socket and performs the raw-yamux or WebSocket upgrade with the agent's token, like Coder's
``ConnectRPC210WithRole(ctx, "agent")``.
"""

from __future__ import annotations

import math

import attrs
import trio

from agentd.handshake import HANDSHAKE_TIMEOUT, upgrade_client

__all__ = ["Target", "TargetError", "connect", "open_target", "parse_target"]


class TargetError(ValueError):
    """A ``--url`` the agent cannot dial."""


@attrs.frozen
class Target:
    """A parsed ``--url``: exactly one of ``path`` (Unix socket) or ``host``/``port`` (TCP)."""

    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def http_host(self) -> str:
        """The Host header: the TCP authority, or ``agentd`` for a Unix socket."""
        if self.scheme == "unix":
            return "agentd"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """``unix:/path`` (also ``unix:///path``) or ``tcp://host:port`` (IPv6 hosts in brackets)."""
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise TargetError(f"{url!r}: a unix: URL needs a socket path")
        return Target("unix", path=path)
    if url.startswith("tcp://"):
        rest = url[len("tcp://") :].rstrip("/")
        if rest.startswith("["):
            host, sep, tail = rest[1:].partition("]")
            if not sep or not tail.startswith(":"):
                raise TargetError(f"{url!r}: expected tcp://[v6-address]:port")
            port_text = tail[1:]
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep:
                raise TargetError(f"{url!r}: expected tcp://host:port")
        if not host:
            raise TargetError(f"{url!r}: missing host")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise TargetError(f"{url!r}: port must be 1-65535")
        return Target("tcp", host=host, port=int(port_text))
    raise TargetError(f"{url!r}: expected unix:/path/to.sock or tcp://host:port")


async def open_target(target: Target) -> trio.abc.Stream:
    """Open the socket (no upgrade yet)."""
    if target.scheme == "unix":
        return await trio.open_unix_socket(target.path)
    return await trio.open_tcp_stream(target.host, target.port)


async def connect(
    stream: trio.abc.Stream,
    *,
    token: str,
    websocket: bool,
    host: str = "agentd",
    timeout: float = HANDSHAKE_TIMEOUT,  # noqa: ASYNC109 - a protocol bound
) -> trio.abc.Stream:
    """Upgrade an open socket to the yamux byte stream (``?version=2.10&role=agent``).

    Raises :class:`agentd.websocket.UpgradeError` when the server refuses (401 for a bad token).
    The socket is closed on any failure.
    """
    try:
        return await upgrade_client(
            stream,
            token=token,
            websocket=websocket,
            host=host,
            timeout=timeout if timeout > 0 else math.inf,
        )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
