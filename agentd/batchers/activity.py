"""Activity bumps (spec §9.3) group-committed: one statement for every bump waiting meanwhile.

UpdateStats bumps the workspace's deadline before it answers (coderd's ActivityBumpWorkspace is
synchronous too), one statement per call. Under load that is most of the process's transactions.
Here the calls share statements without a timer: a lone call takes the lock and writes its own bump
at once; calls arriving while a statement runs queue up, and the next one to get the lock writes
every queued bump — with their ``stats_update`` NOTIFYs — in one statement. Each caller still returns
only once its own bump is written (or has failed). The write is shielded and bounded (``timeout``,
and the daemon's cleanup deadline while it stops), so a cancelled caller never abandons the bumps of
the others it carries.
"""

from __future__ import annotations

import logging
import uuid

import attrs
import trio

from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.activity import Bump, activity_bump_workspaces

__all__ = ["ActivityBumper"]

log = logging.getLogger("agentd.batchers.activity")

#: coderd's bound on one bump
BUMP_TIMEOUT_S = 15.0


@attrs.define(eq=False)
class _Pending:
    bump: Bump
    notice: tuple[str, str] | None
    done: trio.Event = attrs.field(factory=trio.Event)
    bumped: bool = False
    error: BaseException | None = None


@attrs.define(eq=False)
class ActivityBumper:
    """The process-wide writer of activity bumps; a daemon component (no task of its own)."""

    db: Database
    timeout: float = BUMP_TIMEOUT_S
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    #: statements written, and the bumps they carried
    statements: int = attrs.field(default=0, init=False)
    bumps: int = attrs.field(default=0, init=False)
    _queue: list[_Pending] = attrs.field(factory=list, init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)

    async def bump(self, bump: Bump, notice: tuple[str, str] | None = None) -> bool:
        """Bump ``bump.workspace_id`` (and send ``notice`` in the same statement); True when its
        deadline moved. Raises what the statement raised, or TimeoutError past ``timeout``."""
        item = _Pending(bump, notice)
        self._queue.append(item)
        try:
            async with self._lock:  # FIFO: one statement at a time
                if not item.done.is_set():
                    batch, self._queue = self._queue, []
                    await self._write(batch)
        except trio.Cancelled:
            if not item.done.is_set() and item in self._queue:
                self._queue.remove(item)  # cancelled before anyone took it: not written
            raise
        if item.error is not None:
            raise item.error
        return item.bumped

    async def _write(self, batch: list[_Pending]) -> None:
        error: BaseException | None = None
        bumped: set[uuid.UUID] = set()
        try:
            with self.cleanup.shield(self.timeout) as scope:
                bumped = await activity_bump_workspaces(
                    self.db, [p.bump for p in batch], [p.notice for p in batch if p.notice is not None]
                )
            if scope.cancelled_caught:
                error = TimeoutError(f"activity bump not written within {self.timeout:g} s")
        except Exception as exc:
            error = exc
        finally:
            self.statements += 1
            self.bumps += len(batch)
            for p in batch:
                p.error = error
                p.bumped = p.bump.workspace_id in bumped
                p.done.set()
