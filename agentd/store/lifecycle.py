"""Queries behind UpdateLifecycle and UpdateStartup (spec §7.5, §7.6, §10.3).

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

__all__ = [
    "BuildMetrics",
    "LifecycleTimes",
    "TimeRule",
    "get_build_metrics",
    "update_lifecycle_state",
    "update_startup",
]


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
# The update and its event in one statement: the NOTIFY only when the agent row was updated.
_LIFECYCLE_NOTIFY_SQL = f"""
WITH updated AS ({_LIFECYCLE_SQL})
SELECT u.started_at, u.ready_at, pg_notify(%(channel)s, %(payload)s) AS notice FROM updated AS u
"""


async def update_lifecycle_state(
    db: Database | Transaction,
    agent_id: uuid.UUID,
    state: str,
    changed_at: dt.datetime,
    *,
    started_rule: TimeRule,
    ready_rule: TimeRule,
    notice: tuple[str, str] | None = None,
) -> LifecycleTimes | None:
    """Set ``lifecycle_state`` and apply the timestamp rules; None when the agent does not exist.

    ``notice`` (channel, payload): the same statement sends that NOTIFY when it updated the agent.
    """
    params = {
        "state": state,
        "started_rule": started_rule.value,
        "ready_rule": ready_rule.value,
        "changed_at": changed_at,
        "agent_id": agent_id,
    }
    if notice is None:
        row = await db.fetchone(_LIFECYCLE_SQL, params)
    else:
        row = await db.fetchone(_LIFECYCLE_NOTIFY_SQL, {**params, "channel": notice[0], "payload": notice[1]})
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


@attrs.frozen
class BuildMetrics:
    """The build of an agent's resource, seen for the build-duration metric (spec §7.5)."""

    created_at: dt.datetime
    transition: str
    template_name: str
    organization_name: str
    is_prebuild: bool
    #: Every agent of the build has ``ready_at`` set (a terminal startup state).
    all_agents_ready: bool
    last_agent_ready_at: dt.datetime | None
    #: "error" if any agent is start_error, else "timeout" if any is start_timeout, else "success".
    worst_status: str


_BUILD_METRICS_SQL = """
SELECT
    wb.created_at,
    wb.transition::text AS transition,
    t.name AS template_name,
    o.name AS organization_name,
    (w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'::uuid) AS is_prebuild,
    count(*) FILTER (WHERE wa.ready_at IS NULL) = 0 AS all_agents_ready,
    max(wa.ready_at) AS last_agent_ready_at,
    CASE
        WHEN bool_or(wa.lifecycle_state = 'start_error') THEN 'error'
        WHEN bool_or(wa.lifecycle_state = 'start_timeout') THEN 'timeout'
        ELSE 'success'
    END AS worst_status
FROM workspace_resources r
JOIN workspace_builds wb ON wb.job_id = r.job_id
JOIN workspaces w ON w.id = wb.workspace_id
JOIN templates t ON t.id = w.template_id
JOIN organizations o ON o.id = t.organization_id
JOIN workspace_resources build_resources ON build_resources.job_id = wb.job_id
JOIN workspace_agents wa ON wa.resource_id = build_resources.id
WHERE r.id = %s
GROUP BY wb.created_at, wb.transition, t.name, o.name, w.owner_id
"""


async def get_build_metrics(db: Database | Transaction, resource_id: uuid.UUID) -> BuildMetrics | None:
    """The build behind ``resource_id`` with the startup state of all its agents; None if unknown."""
    row = await db.fetchone(_BUILD_METRICS_SQL, [resource_id])
    if row is None:
        return None
    return BuildMetrics(
        created_at=row["created_at"],
        transition=row["transition"],
        template_name=row["template_name"],
        organization_name=row["organization_name"],
        is_prebuild=row["is_prebuild"],
        all_agents_ready=row["all_agents_ready"],
        last_agent_ready_at=row["last_agent_ready_at"],
        worst_status=row["worst_status"],
    )
