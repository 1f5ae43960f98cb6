"""workspace_agent_metadata writes for BatchUpdateMetadata (spec §7.8, §9.1).

Rows are created by the provisioner (here: ``agentd admin create-workspace``); the agent API only
updates the value, error and collected_at of existing ``(agent, key)`` rows, so unknown keys are
silently ignored.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import attrs

from agentd.store.db import Database, Transaction

__all__ = ["MetadataRow", "MetadataUpdate", "batch_update_metadata", "metadata_rows"]

Queryable = Database | Transaction


@attrs.frozen
class MetadataUpdate:
    """One accepted metadata result of one agent (value and error already limited by the service)."""

    agent_id: uuid.UUID
    key: str
    value: str
    error: str
    collected_at: dt.datetime


@attrs.frozen
class MetadataRow:
    """The agent-reported part of one workspace_agent_metadata row."""

    key: str
    value: str
    error: str
    collected_at: dt.datetime


_BATCH_UPDATE = """
UPDATE workspace_agent_metadata AS wam
SET value = u.value, error = u.error, collected_at = u.collected_at
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::timestamptz[])
    AS u(agent_id, key, value, error, collected_at)
WHERE wam.workspace_agent_id = u.agent_id AND wam.key = u.key
"""


async def batch_update_metadata(db: Queryable, updates: Sequence[MetadataUpdate]) -> int:
    """One ``UPDATE … FROM unnest(...)`` for many (agent, key) results; returns the rows updated.

    The caller dedupes by (agent, key): one statement must not update a row twice.
    """
    if not updates:
        return 0
    return await db.execute(
        _BATCH_UPDATE,
        [
            [u.agent_id for u in updates],
            [u.key for u in updates],
            [u.value for u in updates],
            [u.error for u in updates],
            [u.collected_at for u in updates],
        ],
    )


async def metadata_rows(db: Queryable, agent_id: uuid.UUID) -> dict[str, MetadataRow]:
    """The agent's metadata results by key (what the UI reads)."""
    rows = await db.fetchall(
        "SELECT key, value, error, collected_at FROM workspace_agent_metadata"
        " WHERE workspace_agent_id = %s ORDER BY key",
        [agent_id],
    )
    return {
        str(r["key"]): MetadataRow(
            key=str(r["key"]), value=str(r["value"]), error=str(r["error"]), collected_at=r["collected_at"]
        )
        for r in rows
    }
