"""Activity bumps (spec §9.3) group-committed: one statement for every bump waiting meanwhile.

UpdateStats bumps the workspace's deadline before it answers (coderd's ActivityBumpWorkspace is
synchronous too), one statement per call. Under load that is most of the process's transactions.
Here the calls share statements (agentd.batchers.group_commit): a lone call writes its own bump at
once; calls arriving while a statement runs share the next one, with their ``stats_update``
NOTIFYs. Each caller still returns
only once its own bump is written (or has failed). The write is shielded and bounded (``timeout``,
and the daemon's cleanup deadline while it stops), so a cancelled caller never abandons the bumps of
the others it carries.
"""

from __future__ import annotations

import uuid

import attrs

from agentd.batchers.group_commit import GroupCommit
from agentd.shutdown import CleanupDeadline
from agentd.store import Database
from agentd.store.activity import Bump, activity_bump_workspaces

__all__ = ["ActivityBumper"]

#: coderd's bound on one bump
BUMP_TIMEOUT_S = 15.0


@attrs.define(eq=False)
class ActivityBumper:
    """The process-wide writer of activity bumps; a daemon component (no task of its own)."""

    db: Database
    timeout: float = BUMP_TIMEOUT_S
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline)
    _commit: GroupCommit[tuple[Bump, tuple[str, str] | None], bool] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._commit = GroupCommit(self._write)

    @property
    def statements(self) -> int:
        """Statements written so far."""
        return self._commit.statements

    @property
    def bumps(self) -> int:
        """Bumps those statements carried."""
        return self._commit.items

    async def bump(self, bump: Bump, notice: tuple[str, str] | None = None) -> bool:
        """Bump ``bump.workspace_id`` (and send ``notice`` in the same statement); True when its
        deadline moved. Raises what the statement raised, or TimeoutError past ``timeout``."""
        return bool(await self._commit.submit((bump, notice)))

    async def _write(self, batch: list[tuple[Bump, tuple[str, str] | None]]) -> list[bool]:
        bumped: set[uuid.UUID] = set()
        with self.cleanup.shield(self.timeout) as scope:
            bumped = await activity_bump_workspaces(
                self.db, [b for b, _ in batch], [n for _, n in batch if n is not None]
            )
        if scope.cancelled_caught:
            raise TimeoutError(f"activity bump not written within {self.timeout:g} s")
        return [b.workspace_id in bumped for b, _ in batch]
