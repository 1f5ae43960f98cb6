"""Boundary usage tracker (spec §9.5): unique workspaces/users and allowed/denied request counts per replica.

One per process. ``track`` is called by every connection's ReportBoundaryLogs; ``run`` flushes every minute
into ``boundary_usage_stats`` keyed by replica id. A missing row means telemetry collected and deleted the
previous period, so the flush INSERTs and the period starts over with the uniques seen since the last flush;
an existing row is UPDATEd with the uniques of the whole period and the request counts added.

Unlike Coder, the period's unique sets are kept until the period ends, so a later UPDATE never undercounts
(Coder resets them after every flush); and a failed flush puts its counts back instead of dropping them.
The sets hold at most one id per workspace and per user that used boundary during one telemetry period.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from time import perf_counter

import attrs
import trio
import trio_util  # type: ignore[import-untyped]

from agentd.clock import Now, utcnow
from agentd.logfmt import elapsed_ms
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store import boundary as store

log = logging.getLogger("agentd.boundary_usage")

FLUSH_INTERVAL_S = 60.0
SHUTDOWN_FLUSH_TIMEOUT_S = 15.0


@attrs.frozen
class Pending:
    """What one flush carries: ids and counts accumulated since the previous flush."""

    workspaces: frozenset[uuid.UUID]
    users: frozenset[uuid.UUID]
    allowed: int
    denied: int


@attrs.define
class UsageCounter:
    """The sans-I/O part: accumulate, hand a snapshot to a flush, and learn how the flush went."""

    period_workspaces: set[uuid.UUID] = attrs.field(factory=set)
    period_users: set[uuid.UUID] = attrs.field(factory=set)
    workspaces: set[uuid.UUID] = attrs.field(factory=set)
    users: set[uuid.UUID] = attrs.field(factory=set)
    allowed: int = 0
    denied: int = 0

    def track(self, workspace_id: uuid.UUID, owner_id: uuid.UUID, allowed: int, denied: int) -> None:
        self.workspaces.add(workspace_id)
        self.users.add(owner_id)
        self.allowed += allowed
        self.denied += denied

    @property
    def dirty(self) -> bool:
        return bool(self.workspaces or self.users or self.allowed or self.denied)

    def take(self) -> Pending | None:
        """Snapshot and reset what accumulated since the last flush; None when there is nothing new."""
        if not self.dirty:
            return None
        pending = Pending(frozenset(self.workspaces), frozenset(self.users), self.allowed, self.denied)
        self.workspaces, self.users, self.allowed, self.denied = set(), set(), 0, 0
        return pending

    def flush_args(self, pending: Pending, replica_id: uuid.UUID, now: dt.datetime) -> store.UsageFlush:
        return store.UsageFlush(
            replica_id=replica_id,
            new_workspaces=len(pending.workspaces),
            new_users=len(pending.users),
            period_workspaces=len(self.period_workspaces | pending.workspaces),
            period_users=len(self.period_users | pending.users),
            allowed=pending.allowed,
            denied=pending.denied,
            now=now,
        )

    def committed(self, pending: Pending, *, inserted: bool) -> None:
        """The flush landed: a new row starts a new period with exactly this flush's ids."""
        if inserted:
            self.period_workspaces = set(pending.workspaces)
            self.period_users = set(pending.users)
        else:
            self.period_workspaces |= pending.workspaces
            self.period_users |= pending.users

    def failed(self, pending: Pending) -> None:
        """The flush did not land: keep its ids and counts for the next one."""
        self.workspaces |= pending.workspaces
        self.users |= pending.users
        self.allowed += pending.allowed
        self.denied += pending.denied


@attrs.define(eq=False)
class BoundaryUsageTracker:
    """Process-wide tracker; ``track`` is synchronous and never blocks an RPC."""

    db: Database
    replica_id: uuid.UUID
    interval: float = FLUSH_INTERVAL_S
    now: Now = utcnow
    counter: UsageCounter = attrs.field(factory=UsageCounter)
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    _flush_lock: trio.Lock = attrs.field(factory=trio.Lock)

    def track(self, workspace_id: uuid.UUID, owner_id: uuid.UUID, allowed: int, denied: int) -> None:
        self.counter.track(workspace_id, owner_id, allowed, denied)

    async def flush(self) -> bool:
        """Write what accumulated; True if something was written. Errors propagate (counts are kept)."""
        async with self._flush_lock:
            pending = self.counter.take()
            if pending is None:
                return False
            started = perf_counter()
            try:
                inserted = await store.upsert_usage_stats(
                    self.db, self.counter.flush_args(pending, self.replica_id, self.now())
                )
            except BaseException:
                self.counter.failed(pending)
                raise
            self.counter.committed(pending, inserted=inserted)
            log.debug(
                "flush batcher=boundary_usage workspaces=%d users=%d allowed=%d denied=%d new_period=%d"
                " duration_ms=%.1f",
                len(pending.workspaces),
                len(pending.users),
                pending.allowed,
                pending.denied,
                inserted,
                elapsed_ms(started),
            )
            return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for _ in trio_util.periodic(self.interval):
                try:
                    await self.flush()
                except Exception:
                    log.exception("flush boundary usage stats")
        finally:
            with self.cleanup.shield(SHUTDOWN_FLUSH_TIMEOUT_S):
                try:
                    await self.flush()
                except Exception:
                    log.exception("final flush of boundary usage stats")
