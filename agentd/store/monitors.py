"""Resource monitor rows of one agent (spec §7.11-7.12, §10.2 workspace_agent_*_resource_monitors)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import attrs

from agentd.store.db import Database, Transaction

__all__ = [
    "MemoryMonitor",
    "VolumeMonitor",
    "fetch_memory_monitor",
    "fetch_volume_monitors",
    "update_memory_monitor",
    "update_volume_monitor",
]

Queryable = Database | Transaction


@attrs.frozen
class MemoryMonitor:
    agent_id: uuid.UUID
    enabled: bool
    threshold: int
    state: str  # 'OK' | 'NOK'
    created_at: dt.datetime
    updated_at: dt.datetime
    debounced_until: dt.datetime


@attrs.frozen
class VolumeMonitor:
    agent_id: uuid.UUID
    path: str
    enabled: bool
    threshold: int
    state: str
    created_at: dt.datetime
    updated_at: dt.datetime
    debounced_until: dt.datetime


def _memory(row: dict[str, Any]) -> MemoryMonitor:
    return MemoryMonitor(
        agent_id=row["agent_id"],
        enabled=row["enabled"],
        threshold=row["threshold"],
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        debounced_until=row["debounced_until"],
    )


def _volume(row: dict[str, Any]) -> VolumeMonitor:
    return VolumeMonitor(
        agent_id=row["agent_id"],
        path=row["path"],
        enabled=row["enabled"],
        threshold=row["threshold"],
        state=row["state"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        debounced_until=row["debounced_until"],
    )


async def fetch_memory_monitor(db: Queryable, agent_id: uuid.UUID) -> MemoryMonitor | None:
    """The agent's memory monitor, or None when the template defines none."""
    row = await db.fetchone(
        "SELECT agent_id, enabled, threshold, state::text AS state, created_at, updated_at, debounced_until"
        " FROM workspace_agent_memory_resource_monitors WHERE agent_id = %s",
        [agent_id],
    )
    return None if row is None else _memory(row)


async def fetch_volume_monitors(db: Queryable, agent_id: uuid.UUID) -> list[VolumeMonitor]:
    """The agent's volume monitors, ordered by path so answers are stable."""
    rows = await db.fetchall(
        "SELECT agent_id, path, enabled, threshold, state::text AS state, created_at, updated_at,"
        " debounced_until FROM workspace_agent_volume_resource_monitors WHERE agent_id = %s ORDER BY path",
        [agent_id],
    )
    return [_volume(r) for r in rows]


async def update_memory_monitor(
    db: Queryable, agent_id: uuid.UUID, *, state: str, updated_at: dt.datetime, debounced_until: dt.datetime
) -> None:
    """Coder's UpdateMemoryResourceMonitor: written on every push (spec §7.12)."""
    await db.execute(
        "UPDATE workspace_agent_memory_resource_monitors"
        " SET state = %s::workspace_agent_monitor_state, updated_at = %s, debounced_until = %s"
        " WHERE agent_id = %s",
        [state, updated_at, debounced_until, agent_id],
    )


async def update_volume_monitor(
    db: Queryable,
    agent_id: uuid.UUID,
    path: str,
    *,
    state: str,
    updated_at: dt.datetime,
    debounced_until: dt.datetime,
) -> None:
    """Coder's UpdateVolumeResourceMonitor."""
    await db.execute(
        "UPDATE workspace_agent_volume_resource_monitors"
        " SET state = %s::workspace_agent_monitor_state, updated_at = %s, debounced_until = %s"
        " WHERE agent_id = %s AND path = %s",
        [state, updated_at, debounced_until, agent_id, path],
    )
