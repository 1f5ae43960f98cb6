"""The process-wide ``last_used_at`` tracker (spec §9.2): workspaces marked used, written every minute.

UpdateStats (and anything else that counts as use) calls ``add(workspace_id)``; every ``interval``
(60 s) the collected ids get ``last_used_at = now`` in one statement (10 s timeout, never moving the
value backwards). Cancelling ``run`` (shutdown) writes what is collected, shielded and bounded (also by the
daemon's cleanup deadline, agentd.shutdown).
"""

from __future__ import annotations

import logging
import uuid
from time import perf_counter

import attrs
import trio
from trio_util import periodic  # type: ignore[import-untyped]

from agentd.clock import Now, utcnow
from agentd.logfmt import elapsed_ms
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.activity import batch_update_last_used_at
from agentd.store.errors import StoreError

__all__ = ["LastUsedTracker"]

log = logging.getLogger("agentd.batchers.last_used")

FLUSH_INTERVAL_S = 60.0
FLUSH_TIMEOUT_S = 10.0
SHUTDOWN_FLUSH_TIMEOUT_S = 15.0


@attrs.define(eq=False)
class LastUsedTracker:
    db: Database
    interval: float = FLUSH_INTERVAL_S
    flush_timeout: float = FLUSH_TIMEOUT_S
    shutdown_timeout: float = SHUTDOWN_FLUSH_TIMEOUT_S
    now: Now = utcnow
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    flushes: int = attrs.field(default=0, init=False)
    _ids: set[uuid.UUID] = attrs.field(factory=set, init=False)

    def add(self, workspace_id: uuid.UUID) -> None:
        """Mark the workspace used; written at the next flush."""
        self._ids.add(workspace_id)

    @property
    def pending(self) -> int:
        return len(self._ids)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            # periodic's first tick is immediate: it writes what was marked before `run` (usually
            # nothing, which costs nothing), then one tick every interval.
            async for _ in periodic(self.interval):
                with trio.move_on_after(self.flush_timeout):
                    await self._flush()
        finally:
            with self.cleanup.shield(self.shutdown_timeout):
                await self._flush()

    async def _flush(self) -> None:
        if not self._ids:
            return
        ids, self._ids = self._ids, set()
        self.flushes += 1
        started = perf_counter()
        try:
            await batch_update_last_used_at(self.db, ids, self.now())
            log.debug("flush batcher=last_used workspaces=%d duration_ms=%.1f", len(ids), elapsed_ms(started))
        except trio.Cancelled:
            self._ids |= ids
            raise
        except StoreError:
            log.exception("update last_used_at of %d workspaces", len(ids))
