"""Trio adapter over ``CoordinatorCore``: one process-wide coordinator, one ``PeerHandle`` per stream.

Requests are applied synchronously in the caller's task (the core never blocks), so a bug or a bad
request surfaces in the Coordinate call that sent it, never in the daemon's nursery. Responses go
through a bounded memory channel per connection; the core counts what is queued and drops a
receiver whose channel is full (spec §8.4), so ``send_nowait`` into the channel never blocks.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from agentd.tailnet.coordinator import (
    RESPONSE_BUFFER_SIZE,
    Auth,
    Close,
    CoordinatorCore,
    Effect,
    Node,
    PeerRef,
    Request,
    Response,
    Send,
)


@attrs.define(eq=False)
class Coordinator:
    """The daemon's tailnet coordinator. Start ``run`` in the root nursery before serving agents.

    When ``run`` ends (cancelled at shutdown) every connected peer receives ``coordinator closed``
    and its response stream ends.
    """

    core: CoordinatorCore = attrs.field(factory=lambda: CoordinatorCore(response_buffer=RESPONSE_BUFFER_SIZE))
    _channels: dict[PeerRef, trio.MemorySendChannel[Response]] = attrs.field(factory=dict, init=False)
    _running: bool = attrs.field(default=False, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.core.closed:
            raise trio.ClosedResourceError("coordinator already closed")
        self._running = True
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._running = False
            self._apply(self.core.close())

    @property
    def running(self) -> bool:
        """True between ``run`` starting and the coordinator closing."""
        return self._running

    @asynccontextmanager
    async def connect(self, peer_id: uuid.UUID, name: str, auth: Auth) -> AsyncIterator[PeerHandle]:
        """Register a coordinate connection for ``peer_id`` for the duration of the block.

        Leaving the block without a ``disconnect`` request marks the peer LOST for its tunnel peers;
        after ``disconnect`` they were already told DISCONNECTED and leaving changes nothing.
        """
        if not self._running:
            raise trio.ClosedResourceError("coordinator is not running")
        send, receive = trio.open_memory_channel[Response](self.core.response_buffer)
        ref, effects = self.core.register(peer_id, name, auth)
        self._channels[ref] = send
        self._apply(effects)
        handle = PeerHandle(coordinator=self, ref=ref, receive_channel=receive)
        try:
            yield handle
        finally:
            handle.close()
            receive.close()
            # Normally closed by the core's Close effect; make sure nothing of ours lingers.
            leftover = self._channels.pop(ref, None)
            if leftover is not None:
                leftover.close()

    def node(self, peer_id: uuid.UUID) -> Node | None:
        """The node ``peer_id`` last published, if it is connected."""
        return self.core.node(peer_id)

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                channel = self._channels.get(effect.peer)
                if channel is None:
                    continue
                try:
                    channel.send_nowait(effect.response)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The handle's owner is gone; the core hears about it when its block exits.
                    pass
            elif isinstance(effect, Close):
                channel = self._channels.pop(effect.peer, None)
                if channel is not None:
                    channel.close()


@attrs.define(eq=False)
class PeerHandle:
    """One peer's side of the coordinator: apply requests, iterate responses until the queue ends."""

    coordinator: Coordinator
    ref: PeerRef
    receive_channel: trio.MemoryReceiveChannel[Response]

    @property
    def peer_id(self) -> uuid.UUID:
        return self.ref.id

    @property
    def active(self) -> bool:
        """False once the coordinator removed or replaced this connection."""
        return self.coordinator.core.is_current(self.ref)

    def send_nowait(self, request: Request) -> bool:
        """Apply ``request`` now. False when this connection was already removed (request ignored)."""
        if not self.active:
            return False
        self.coordinator._apply(self.coordinator.core.handle_request(self.ref, request))
        return True

    async def send(self, request: Request) -> bool:
        await trio.lowlevel.checkpoint()
        return self.send_nowait(request)

    def disconnect(self) -> None:
        """Leave gracefully: tunnel peers are told DISCONNECTED and the response queue ends."""
        self.send_nowait(Request(disconnect=True))

    def close(self, error: str = "") -> None:
        """The request side ended without ``disconnect``: LOST (``error``, if any, is queued first)."""
        self.coordinator._apply(self.coordinator.core.lost(self.ref, error))

    async def receive(self) -> Response:
        """The next response; raises ``trio.EndOfChannel`` once the coordinator closed this queue."""
        response = await self.receive_channel.receive()
        self.coordinator.core.delivered(self.ref)
        return response

    def __aiter__(self) -> PeerHandle:
        return self

    async def __anext__(self) -> Response:
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
