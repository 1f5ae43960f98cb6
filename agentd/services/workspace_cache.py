"""The workspace cache refresher of one agent connection (spec §4.3).

Services that need the workspace identity (UpdateStats, ReportConnection, UpdateAppStatus,
PushContextState) read ``scope.cache``. This task fills it when the session starts (unless the
workspace is a prebuild), re-reads the workspace every five minutes so that a claimed prebuild
becomes visible without a reconnect, keeps stale data when a read fails, and clears the cache when
the session ends. It lives exactly as long as the session: it runs in the agent's nursery.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import attrs
import trio

from agentd.services.base import WorkspaceCache, WorkspaceIdentity

__all__ = ["REFRESH_INTERVAL", "WorkspaceCacheRefresher"]

log = logging.getLogger("agentd.services.workspace_cache")

#: coderd's workspaceCacheRefreshInterval.
REFRESH_INTERVAL = 5 * 60.0

Reader = Callable[[uuid.UUID], Awaitable[WorkspaceIdentity | None]]


@attrs.define(eq=False)
class WorkspaceCacheRefresher:
    """Keeps ``cache`` current for ``workspace_id`` while ``run`` runs.

    ``read`` is the identity query bound to the store (``agentd.store.connection.workspace_identity``
    with the database applied), injected so the refresher owns no database handle of its own.
    """

    cache: WorkspaceCache
    workspace_id: uuid.UUID
    read: Reader
    interval: float = REFRESH_INTERVAL
    refreshes: int = attrs.field(default=0, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fill the cache, report started, then refresh every ``interval`` until cancelled."""
        try:
            await self.refresh()
            task_status.started()
            while True:
                await trio.sleep(self.interval)
                await self.refresh()
        finally:
            self.cache.value = None

    async def refresh(self) -> None:
        """One tick: read; on error keep the cache; a prebuild or an unchanged identity changes nothing."""
        self.refreshes += 1
        try:
            identity = await self.read(self.workspace_id)
        except Exception:
            log.warning(
                "workspace %s: cache refresh failed; keeping stale data", self.workspace_id, exc_info=True
            )
            return
        if identity is None:
            log.warning("workspace %s: not found on cache refresh; keeping stale data", self.workspace_id)
            return
        if identity.is_prebuild or identity == self.cache.value:
            return
        self.cache.value = identity
