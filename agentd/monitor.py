"""The connection monitor (spec §2.8, coderd's agentConnectionMonitor), process-wide.

coderd runs one monitor per agent connection, each with its own ticker and queries. agentd keeps
the observable behaviour and pays for it once per tick for the whole process: one
:class:`ConnectionMonitor` (a daemon component, DESIGN task tree) holds a :class:`Watch` for every
live session and, every ``ping_period``:

* closes the sessions that have sent nothing for more than ``disconnect_timeout`` ("ping timeout"),
  and sends a yamux ping to each session that has been quiet for half a period (any frame from
  the agent, its own keepalive pings included, proves it alive; the answer to our ping is one).
  The pings stay per connection on the wire, but no task waits on one: the tick writes them
  (:meth:`Pinger.send_ping`) and the session's reader notes the answer (:attr:`Pinger.last_heard`).
  A monitored session therefore runs no keepalive task of its own;
* writes ``last_connected_at`` = now (``disconnected_at`` cleared) for every monitored agent in ONE
  statement and publishes ``agt_connection_update`` for those whose disconnect that cleared;
* re-checks every session's authorisation in ONE query — for every role, not only the monitored
  ones (issue 11): the agent's build is no longer the workspace's latest ("build is outdated"), the
  workspace or the agent was deleted ("workspace deleted", "agent deleted") → the session ends.

Per session, only the role "" / "agent" sessions are *monitored* (timestamps written, pinged), as
in coderd; every session is *watched* (authorisation re-checked).

* start (:meth:`ConnectionMonitor.open`): ``first_connected_at`` = existing or now,
  ``last_connected_at`` = now, ``disconnected_at`` kept, ``last_connected_replica_id`` = this replica,
  ``updated_at`` = now — one statement, shared by the sessions starting at the same moment — then an
  ``agt_connection_update`` event (one NOTIFY statement for the same batch).
* end: the monitor ends a session by cancelling it (:attr:`Watch.end`); it never waits for a peer.
  The connection then closes its transport FIRST (WebSocket close 1001 + reason where it is one),
  and only then :meth:`ConnectionMonitor.close` writes ``disconnected_at`` = now and publishes the
  event, bounded by ``close_timeout`` (a few seconds) and by the daemon's cleanup deadline
  (agentd.shutdown: a stop bounds these writes, a second signal cuts them): a database that hangs can
  never hold a closed session open (issue 11 item 3).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Protocol

import attrs
import trio
from trio_util import periodic  # type: ignore[import-untyped]

from agentd.batchers.group_commit import GroupCommit
from agentd.clock import Now, utcnow
from agentd.logfmt import quote
from agentd.model import AgentIdentity
from agentd.services.events import AGT_CONNECTION_UPDATE, Events
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store import sessions as queries

__all__ = [
    "AGENT_DELETED",
    "BUILD_OUTDATED",
    "DEFAULT_DISCONNECT_TIMEOUT",
    "DEFAULT_PING_PERIOD",
    "DISCONNECT",
    "PING_TIMEOUT",
    "WORKSPACE_DELETED",
    "ConnectionMonitor",
    "Pinger",
    "Watch",
    "disconnect_timeout_for",
]

log = logging.getLogger("agentd.monitor")

#: AgentConnectionUpdateFrequency.
DEFAULT_PING_PERIOD = 15.0
#: AgentInactiveDisconnectTimeout: twice the ping period.
DEFAULT_DISCONNECT_TIMEOUT = 30.0
#: coderd's floor for the disconnect timeout.
MIN_DISCONNECT_TIMEOUT = 2.0
#: Upper bound of the final disconnect write (and of closing the transport before it).
MAX_CLOSE_TIMEOUT = 5.0
#: Upper bound of a session's start write (batched with other sessions starting at the same time).
START_TIMEOUT = 10.0

BUILD_OUTDATED = "build is outdated"
WORKSPACE_DELETED = "workspace deleted"
AGENT_DELETED = "agent deleted"
PING_TIMEOUT = "ping timeout"
DISCONNECT = "disconnect"


def disconnect_timeout_for(ping_period: float) -> float:
    """2 x the ping period, at least 2 s (coderd)."""
    return max(2 * ping_period, MIN_DISCONNECT_TIMEOUT)


class Pinger(Protocol):
    """What a watch needs from the mux session: ``agentd.mux.MuxSession`` fits."""

    #: trio time of the last bytes read from the peer
    last_heard: float

    def send_ping(self) -> None: ...


def _error_reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@attrs.define(eq=False)
class Watch:
    """One live session under the monitor. ``end(reason)`` cancels that session (synchronously)."""

    ident: AgentIdentity
    end: Callable[[str], None]
    #: Role "" or "agent": connection timestamps written, pings checked (spec §2.8).
    monitored: bool
    pinger: Pinger | None = None
    #: trio time the watch began (a session is not silent before it has had a chance to speak).
    opened_at: float = 0.0
    #: Why the session ended ("disconnect" unless the monitor ended it).
    reason: str = DISCONNECT
    ended: bool = False
    #: Pings the monitor has sent this session.
    pings_sent: int = 0

    @property
    def last_heard(self) -> float:
        """When the agent was last heard from (or the watch began)."""
        heard = self.pinger.last_heard if self.pinger is not None else self.opened_at
        return max(heard, self.opened_at)

    def stop(self, reason: str) -> None:
        """End the session with ``reason`` (the first reason wins)."""
        if self.ended:
            return
        self.ended = True
        self.reason = reason
        log.debug("agent session ending agent_id=%s reason=%s", self.ident.agent_id, quote(reason))
        self.end(reason)


@attrs.define(eq=False)
class ConnectionMonitor:
    """The process-wide monitor of every agent session; ``await nursery.start(monitor.run)``."""

    db: Database
    events: Events
    replica_id: uuid.UUID
    now: Now = utcnow
    ping_period: float = DEFAULT_PING_PERIOD
    disconnect_timeout: float = attrs.field()
    close_timeout: float = attrs.field()
    #: the daemon's: bounds the shielded start and disconnect writes while it stops
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    watches: set[Watch] = attrs.field(factory=set, init=False)
    #: Ticks run (each: one UPDATE and one authorisation query, however many sessions).
    ticks: int = attrs.field(default=0, init=False)
    _starts: GroupCommit[AgentIdentity, bool] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._starts = GroupCommit(self._write_starts)

    @disconnect_timeout.default
    def _default_timeout(self) -> float:
        return disconnect_timeout_for(self.ping_period)

    @close_timeout.default
    def _default_close_timeout(self) -> float:
        return min(self.disconnect_timeout, MAX_CLOSE_TIMEOUT)

    # ---- per session --------------------------------------------------------------------------

    async def open(
        self,
        ident: AgentIdentity,
        *,
        end: Callable[[str], None],
        monitored: bool,
        pinger: Pinger | None = None,
    ) -> Watch:
        """Watch a new session; a monitored one gets its start write and event first (errors raise:
        the session does not start, as when coderd's first write fails)."""
        watch = Watch(ident=ident, end=end, monitored=monitored, pinger=pinger, opened_at=trio.current_time())
        if monitored:
            await self._start(ident)
        self.watches.add(watch)
        return watch

    async def _start(self, ident: AgentIdentity) -> None:
        """The start write and event of one session, batched with every other session starting
        meanwhile (agentd.batchers.group_commit: a lone connect waits for nothing). Shielded and
        bounded: a write that happened is never abandoned by a cancelled caller (the caller's
        teardown then records the disconnect)."""
        found = None
        with self.cleanup.shield(START_TIMEOUT):
            found = await self._starts.submit(ident)
        if not found:
            raise LookupError(f"agent {ident.agent_id}: start write failed (no such agent, or timed out)")

    async def _write_starts(self, batch: list[AgentIdentity]) -> list[bool]:
        """One statement for the batch, then its events in one."""
        found = await queries.mark_sessions_started(
            self.db, sorted({i.agent_id for i in batch}), now=self.now(), replica_id=self.replica_id
        )
        events = [
            (i.owner_id, AGT_CONNECTION_UPDATE, i.workspace_id, i.agent_id)
            for i in batch
            if i.agent_id in found
        ]
        try:
            await self.events.workspaces(events)
        except Exception as exc:
            log.warning("publishing %d connection updates failed: %s", len(events), exc)
        return [i.agent_id in found for i in batch]

    async def close(self, watch: Watch) -> None:
        """The session has ended and its transport is closed: forget it; for a monitored one write
        ``disconnected_at`` and publish, bounded by ``close_timeout`` and shielded from cancellation."""
        self.watches.discard(watch)
        watch.ended = True
        if not watch.monitored:
            return
        log.debug("monitor exiting agent_id=%s reason=%s", watch.ident.agent_id, quote(watch.reason))
        with self.cleanup.shield(self.close_timeout) as scope:
            try:
                await queries.mark_disconnected(
                    self.db, watch.ident.agent_id, now=self.now(), replica_id=self.replica_id
                )
            except Exception as exc:
                log.warning("agent disconnect update failed agent_id=%s: %s", watch.ident.agent_id, exc)
            await self._publish_quietly(watch.ident)
        if scope.cancelled_caught:
            log.warning(
                "agent disconnect not recorded within %g s or by the stop deadline agent_id=%s",
                self.close_timeout,
                watch.ident.agent_id,
            )

    # ---- process-wide ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tick every ``ping_period`` until cancelled (sessions end on their own)."""
        task_status.started()
        first = True
        async for _ in periodic(self.ping_period):
            if first:
                first = False
                continue
            # A tick that hangs (database unreachable) must not stack up: the next one retries.
            with trio.move_on_after(self.ping_period):
                await self.tick()

    async def tick(self) -> None:
        """One tick for every live session: silence check and pings, one timestamp write, one
        authorisation query."""
        self.ticks += 1
        now_t = trio.current_time()
        live = [w for w in self.watches if not w.ended]
        quiet = self.ping_period / 2
        for watch in live:
            pinger = watch.pinger
            if not watch.monitored or pinger is None:
                continue
            silent = now_t - watch.last_heard
            if silent > self.disconnect_timeout:
                watch.stop(PING_TIMEOUT)
            elif silent >= quiet:
                # answered within the write timeout or not, the next ticks see it in last_heard
                pinger.send_ping()
                watch.pings_sent += 1
        live = [w for w in live if not w.ended]
        if not live:
            return
        monitored = [w for w in live if w.monitored]
        if monitored:
            try:
                cleared = await queries.mark_connected(
                    self.db,
                    sorted({w.ident.agent_id for w in monitored}),
                    now=self.now(),
                    replica_id=self.replica_id,
                )
            except Exception as exc:
                # coderd closes the connection when its update fails; so does every monitored session.
                log.warning("connection update of %d agents failed: %s", len(monitored), exc)
                for watch in monitored:
                    watch.stop(_error_reason(exc))
                return
            if cleared:
                # After a restart every reconnected agent's disconnect is cleared here: one NOTIFY
                # statement for all of them.
                changed = {w.ident.agent_id: w.ident for w in monitored if w.ident.agent_id in cleared}
                events = [
                    (i.owner_id, AGT_CONNECTION_UPDATE, i.workspace_id, i.agent_id) for i in changed.values()
                ]
                try:
                    await self.events.workspaces(events)
                except Exception as exc:
                    log.warning("publishing %d connection updates failed: %s", len(events), exc)
        await self.check_authorization([w for w in live if not w.ended])

    async def check_authorization(self, watches: list[Watch]) -> None:
        """End the sessions whose build is no longer the latest, or whose workspace or agent is gone."""
        if not watches:
            return
        pairs = sorted({(w.ident.agent_id, w.ident.workspace_id) for w in watches})
        try:
            states = await queries.session_authorizations(self.db, pairs)
        except Exception as exc:
            log.warning("authorisation check of %d sessions failed: %s", len(watches), exc)
            for watch in watches:
                watch.stop(_error_reason(exc))
            return
        for watch in watches:
            state = states.get(watch.ident.agent_id)
            if state is None or state.agent_deleted:
                watch.stop(AGENT_DELETED)
            elif state.workspace_deleted:
                watch.stop(WORKSPACE_DELETED)
            elif state.latest_build_id != watch.ident.build_id:
                watch.stop(BUILD_OUTDATED)

    async def _publish(self, ident: AgentIdentity) -> None:
        await self.events.workspace(ident.owner_id, AGT_CONNECTION_UPDATE, ident.workspace_id, ident.agent_id)

    async def _publish_quietly(self, ident: AgentIdentity) -> None:
        try:
            await self._publish(ident)
        except Exception as exc:
            log.warning("publishing the connection update failed agent_id=%s: %s", ident.agent_id, exc)
