"""The connection monitor of one agent session (spec §2.8, coderd's agentConnectionMonitor).

Runs only when the agent dialled with role empty or ``agent``. Shape:

* start: ``first_connected_at`` = existing or now, ``last_connected_at`` = now, ``disconnected_at``
  kept, ``last_connected_replica_id`` = this replica, ``updated_at`` = now; written, then an
  ``agt_connection_update`` event.
* pinger: a yamux ping every ``ping_period``; each answer records the time. Like coderd it stops at
  the first failed ping, so the ticker notices the silence.
* ticker, every ``ping_period``: no answer for more than ``disconnect_timeout`` closes the connection
  ("ping timeout"); else ``last_connected_at`` = now (and ``disconnected_at`` cleared) is written, an
  event is published if that cleared a disconnect, and the agent's build must still be the workspace's
  latest ("build is outdated" closes the connection).
* exit (any reason, including the session ending under it): ``disconnected_at`` = now, a final write
  and event shielded from cancellation but bounded by ``disconnect_timeout``, and the connection is
  closed with the reason (WebSocket close 1001 + reason where the transport is a WebSocket).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from agentd.services.base import AgentIdentity, Now, utcnow
from agentd.services.events import AGT_CONNECTION_UPDATE, Events
from agentd.store import connection as queries
from agentd.store.connection import ConnectionTimes

__all__ = [
    "DEFAULT_DISCONNECT_TIMEOUT",
    "DEFAULT_PING_PERIOD",
    "ConnectionMonitor",
    "Pinger",
    "disconnect_timeout_for",
]

log = logging.getLogger("agentd.monitor")

#: AgentConnectionUpdateFrequency.
DEFAULT_PING_PERIOD = 15.0
#: AgentInactiveDisconnectTimeout: twice the ping period.
DEFAULT_DISCONNECT_TIMEOUT = 30.0
#: coderd's floor for the disconnect timeout.
MIN_DISCONNECT_TIMEOUT = 2.0

BUILD_OUTDATED = "build is outdated"
PING_TIMEOUT = "ping timeout"
DISCONNECT = "disconnect"


def disconnect_timeout_for(ping_period: float) -> float:
    """2 x the ping period, at least 2 s (coderd)."""
    return max(2 * ping_period, MIN_DISCONNECT_TIMEOUT)


class Pinger(Protocol):
    """What the monitor needs from the mux session: ``agentd.mux.MuxSession`` fits."""

    async def ping(self) -> float: ...


Closer = Callable[[str], Awaitable[None]]


@attrs.define(eq=False)
class ConnectionMonitor:
    """One agent session's monitor; ``await nursery.start(monitor.run)`` in the agent nursery.

    ``close(reason)`` ends the session (the connection passes one that closes the WebSocket with
    1001 + reason and the mux session); the monitor calls it when it gives up and when it exits.
    """

    db: Any  # agentd.store.Database
    events: Events
    ident: AgentIdentity
    replica_id: uuid.UUID
    pinger: Pinger
    close: Closer
    now: Now = utcnow
    ping_period: float = DEFAULT_PING_PERIOD
    disconnect_timeout: float = attrs.field()
    times: ConnectionTimes = attrs.field(init=False, default=ConnectionTimes(None, None, None, None))
    reason: str = attrs.field(init=False, default=DISCONNECT)
    _last_ping: float = attrs.field(init=False, default=0.0)

    @disconnect_timeout.default
    def _default_timeout(self) -> float:
        return disconnect_timeout_for(self.ping_period)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Initial write and event, then ping and tick until a close reason or cancellation."""
        await self._start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pings)
                task_status.started()
                self.reason = await self._ticks()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _start(self) -> None:
        existing = await queries.connection_times(self.db, self.ident.agent_id)
        now = self.now()
        self._last_ping = trio.current_time()
        self.times = ConnectionTimes(
            first_connected_at=(existing.first_connected_at if existing else None) or now,
            last_connected_at=now,
            disconnected_at=existing.disconnected_at if existing else None,
            last_connected_replica_id=self.replica_id,
        )
        await self._write(now)
        await self._publish()

    async def _pings(self) -> None:
        while True:
            await trio.sleep(self.ping_period)
            with trio.move_on_after(self.ping_period) as scope:
                try:
                    await self.pinger.ping()
                except (trio.BrokenResourceError, trio.ClosedResourceError, Exception) as exc:
                    log.debug("agent %s: ping failed: %s", self.ident.agent_id, exc)
                    return
            if scope.cancelled_caught:
                return
            self._last_ping = trio.current_time()

    async def _ticks(self) -> str:
        """Returns the reason to close the connection."""
        while True:
            await trio.sleep(self.ping_period)
            silent = trio.current_time() - self._last_ping
            if silent > self.disconnect_timeout:
                return PING_TIMEOUT
            was_disconnected = self.times.disconnected_at is not None
            now = self.now()
            self.times = attrs.evolve(self.times, disconnected_at=None, last_connected_at=now)
            try:
                await self._write(now)
            except Exception as exc:
                log.warning("agent %s: connection update failed: %s", self.ident.agent_id, exc)
                return str(exc) or type(exc).__name__
            if was_disconnected:
                await self._publish_quietly()
            try:
                latest = await queries.latest_build_id(self.db, self.ident.workspace_id)
            except Exception as exc:
                log.warning("agent %s: latest build check failed: %s", self.ident.agent_id, exc)
                return str(exc) or type(exc).__name__
            if latest != self.ident.build_id:
                return BUILD_OUTDATED

    async def _finish(self) -> None:
        """Shielded by the caller; bounded here: the disconnect write, the event, the close."""
        log.info("agent %s: connection monitor exiting: %s", self.ident.agent_id, self.reason)
        with trio.move_on_after(self.disconnect_timeout):
            now = self.now()
            self.times = attrs.evolve(self.times, disconnected_at=now)
            try:
                await self._write(now)
            except Exception as exc:
                log.warning("agent %s: disconnect update failed: %s", self.ident.agent_id, exc)
            await self._publish_quietly()
        with trio.move_on_after(self.disconnect_timeout):
            try:
                await self.close(self.reason)
            except Exception as exc:
                log.debug("agent %s: close failed: %s", self.ident.agent_id, exc)

    async def _write(self, now: Any) -> None:
        await queries.update_connection(self.db, self.ident.agent_id, self.times, updated_at=now)

    async def _publish(self) -> None:
        await self.events.workspace(
            self.ident.owner_id, AGT_CONNECTION_UPDATE, self.ident.workspace_id, self.ident.agent_id
        )

    async def _publish_quietly(self) -> None:
        try:
            await self._publish()
        except Exception as exc:
            log.warning("agent %s: publishing the connection update failed: %s", self.ident.agent_id, exc)
