"""A TCP forwarder to put between agentd and PostgreSQL, that can black-hole the database.

``pause()`` stops forwarding without closing anything: connections stay open, bytes already read are
held, and new connections are accepted but never connected upstream — what a network that drops
packets looks like to both ends (no RST, no FIN). ``resume()`` forwards again; ``cut()`` closes every
connection (held bytes are discarded, so PostgreSQL never sees a statement sent during the pause).
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class PausableForwarder:
    """``await nursery.start(forwarder.run)``; then point the client at ``127.0.0.1:port``."""

    target_host: str
    target_port: int
    port: int = attrs.field(default=0, init=False)
    connections: int = attrs.field(default=0, init=False)
    _flowing: trio.Event = attrs.field(factory=trio.Event, init=False)
    _links: set[trio.CancelScope] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self._flowing.set()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def pause(self) -> None:
        if not self.paused:
            self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every forwarded connection now (the listener keeps accepting)."""
        for link in self._links:
            link.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _wait_flowing(self) -> None:
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        with trio.CancelScope() as link:
            self._links.add(link)
            try:
                async with client:
                    await self._wait_flowing()
                    upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            finally:
                self._links.discard(link)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, link: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await self._wait_flowing()  # paused: hold these bytes, read nothing more
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        link.cancel()
