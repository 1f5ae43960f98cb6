"""Writes behind UpdateLifecycle and UpdateStartup (spec §7.5, §7.6, §10.3).

Each is one UPDATE of the agent's own row that also serves as the fresh agent read (AgentFn): a
missing or deleted agent updates nothing and the caller reports it. The started_at / ready_at rules
read the current row inside the same statement, so concurrent calls cannot interleave a read and a
write.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Sequence

import attrs

from agentd.store.db import Database, Transaction

__all__ = ["LifecycleTimes", "TimeRule", "update_lifecycle_state", "update_startup"]


class TimeRule(enum.Enum):
    """What an update does to one of started_at / ready_at."""

    KEEP = "keep"
    SET = "set"
    #: Set only when currently NULL.
    FILL = "fill"
    CLEAR = "clear"


@attrs.frozen
class LifecycleTimes:
    """The agent row's timestamps after the update."""

    started_at: dt.datetime | None
    ready_at: dt.datetime | None


_LIFECYCLE_SQL = """
UPDATE workspace_agents SET
    lifecycle_state = %(state)s::workspace_agent_lifecycle_state,
    started_at = CASE %(started_rule)s::text
        WHEN 'set' THEN %(changed_at)s::timestamptz
        WHEN 'fill' THEN coalesce(started_at, %(changed_at)s::timestamptz)
        WHEN 'clear' THEN NULL
        ELSE started_at
    END,
    ready_at = CASE %(ready_rule)s::text
        WHEN 'set' THEN %(changed_at)s::timestamptz
        WHEN 'fill' THEN coalesce(ready_at, %(changed_at)s::timestamptz)
        WHEN 'clear' THEN NULL
        ELSE ready_at
    END
WHERE id = %(agent_id)s AND NOT deleted
RETURNING started_at, ready_at
"""


async def update_lifecycle_state(
    db: Database | Transaction,
    agent_id: uuid.UUID,
    state: str,
    changed_at: dt.datetime,
    *,
    started_rule: TimeRule,
    ready_rule: TimeRule,
) -> LifecycleTimes | None:
    """Set ``lifecycle_state`` and apply the timestamp rules; None when the agent does not exist."""
    row = await db.fetchone(
        _LIFECYCLE_SQL,
        {
            "state": state,
            "started_rule": started_rule.value,
            "ready_rule": ready_rule.value,
            "changed_at": changed_at,
            "agent_id": agent_id,
        },
    )
    if row is None:
        return None
    return LifecycleTimes(started_at=row["started_at"], ready_at=row["ready_at"])


async def update_startup(
    db: Database | Transaction,
    agent_id: uuid.UUID,
    *,
    version: str,
    expanded_directory: str,
    subsystems: Sequence[str],
    api_version: str,
) -> bool:
    """Record what the agent reported at startup; False when the agent does not exist."""
    count = await db.execute(
        "UPDATE workspace_agents SET version = %s, expanded_directory = %s,"
        " subsystems = %s::text[]::workspace_agent_subsystem[], api_version = %s"
        " WHERE id = %s AND NOT deleted",
        [version, expanded_directory, list(subsystems), api_version, agent_id],
    )
    return count > 0
