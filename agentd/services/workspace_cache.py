"""The workspace cache refresher (spec §4.3), process-wide.

Services that need the workspace identity (UpdateStats, ReportConnection, UpdateAppStatus,
PushContextState) read ``scope.cache``. A session's cache is filled when it starts (from the connect
query, unless the workspace is a prebuild) and cleared when it ends; while it lives, one
:class:`WorkspaceCacheRefresher` for the whole process re-reads the workspaces of every live session
every five minutes in ONE query, so a claimed prebuild becomes visible without a reconnect. A read
that fails keeps the stale data; a prebuild or an unchanged identity changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio
from trio_util import periodic  # type: ignore[import-untyped]

from agentd.model import WorkspaceIdentity
from agentd.services.base import WorkspaceCache

__all__ = ["REFRESH_INTERVAL", "CacheEntry", "WorkspaceCacheRefresher"]

log = logging.getLogger("agentd.services.workspace_cache")

#: coderd's workspaceCacheRefreshInterval.
REFRESH_INTERVAL = 5 * 60.0

#: Reads many workspaces' identities at once (``agentd.store.sessions.workspace_identities``).
Reader = Callable[[Sequence[uuid.UUID]], Awaitable[dict[uuid.UUID, WorkspaceIdentity]]]

_UNREAD: Any = object()


@attrs.define(eq=False)
class CacheEntry:
    """One session's cache under the refresher."""

    cache: WorkspaceCache
    workspace_id: uuid.UUID
    #: Identities applied to this cache (the fill at start included).
    refreshes: int = 0


@attrs.define(eq=False)
class WorkspaceCacheRefresher:
    """Keeps every registered session's cache current while ``run`` runs.

    ``read`` is the batched identity query bound to the store, injected so the refresher owns no
    database handle of its own.
    """

    read: Reader
    interval: float = REFRESH_INTERVAL
    entries: set[CacheEntry] = attrs.field(factory=set, init=False)
    #: Batched reads issued (one per refresh, however many sessions).
    reads: int = attrs.field(default=0, init=False)

    async def add(
        self, cache: WorkspaceCache, workspace_id: uuid.UUID, identity: WorkspaceIdentity | None = _UNREAD
    ) -> CacheEntry:
        """Register a session's cache and fill it: from ``identity`` (what the connect query read) or,
        when not given, from a read of its own."""
        entry = CacheEntry(cache, workspace_id)
        if identity is _UNREAD:
            try:
                identity = (await self._read([workspace_id])).get(workspace_id)
            except Exception:
                log.warning("workspace %s: cache fill failed", workspace_id, exc_info=True)
                identity = None
        self._apply(entry, identity)
        self.entries.add(entry)
        return entry

    def discard(self, entry: CacheEntry) -> None:
        """The session ended: forget its cache and clear it."""
        self.entries.discard(entry)
        entry.cache.value = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh every ``interval`` until cancelled."""
        task_status.started()
        # The first tick is immediate and finds no session registered yet (a no-op without a query).
        async for _ in periodic(self.interval):
            await self.refresh()

    async def refresh(self) -> None:
        """One tick for every registered cache: one read; on error every cache keeps its data."""
        entries = list(self.entries)
        if not entries:
            return
        try:
            identities = await self._read(sorted({e.workspace_id for e in entries}))
        except Exception:
            log.warning(
                "cache refresh of %d sessions failed; keeping stale data", len(entries), exc_info=True
            )
            return
        for entry in entries:
            if entry in self.entries:  # not ended while reading
                self._apply(entry, identities.get(entry.workspace_id))

    async def _read(self, workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, WorkspaceIdentity]:
        self.reads += 1
        return await self.read(workspace_ids)

    @staticmethod
    def _apply(entry: CacheEntry, identity: WorkspaceIdentity | None) -> None:
        entry.refreshes += 1
        if identity is None:
            log.warning("workspace %s: not found on cache refresh; keeping stale data", entry.workspace_id)
            return
        if identity.is_prebuild or identity == entry.cache.value:
            return
        entry.cache.value = identity
