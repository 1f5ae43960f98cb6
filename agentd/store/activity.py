"""Workspace activity: the deadline bump of spec §9.3 and the batched ``last_used_at`` of §9.2."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection

from agentd.store.db import Database, Transaction

__all__ = ["activity_bump_workspace", "batch_update_last_used_at"]

Queryable = Database | Transaction

# Durations in templates/workspaces are Go nanoseconds; `(ns / 1000) * 1 µs` is the interval.
# The bump is the template's activity_bump, unless now + bump would pass a future next autostart:
# then the workspace behaves as if it had autostarted then, i.e. (next_autostart - now) + TTL (the
# workspace's TTL when users may set autostop, else the template's default). The update applies only
# to a completed `start` build with a deadline, a positive bump, a non-prebuild owner, and only when
# less than 95 % of the interval is left (throttling repeated bumps). The deadline never decreases
# and never passes max_deadline (when set).
_ACTIVITY_BUMP_CTE = """
WITH latest AS (
    SELECT
        b.id AS build_id,
        b.deadline AS build_deadline,
        b.max_deadline AS build_max_deadline,
        b.transition AS build_transition,
        j.completed_at AS job_completed_at,
        t.activity_bump AS activity_bump,
        w.owner_id AS owner_id,
        CASE
            WHEN %(next_autostart)s::timestamptz IS NOT NULL
                AND %(next_autostart)s::timestamptz > %(now)s::timestamptz
                AND %(now)s::timestamptz + (t.activity_bump / 1000) * interval '1 microsecond'
                    > %(next_autostart)s::timestamptz
            THEN (%(next_autostart)s::timestamptz - %(now)s::timestamptz)
                + (CASE WHEN t.allow_user_autostop THEN w.ttl ELSE t.default_ttl END / 1000)
                    * interval '1 microsecond'
            ELSE (t.activity_bump / 1000) * interval '1 microsecond'
        END AS bump
    FROM workspace_builds b
    JOIN provisioner_jobs j ON j.id = b.job_id
    JOIN workspaces w ON w.id = b.workspace_id
    JOIN templates t ON t.id = w.template_id
    WHERE b.workspace_id = %(workspace_id)s
    ORDER BY b.build_number DESC
    LIMIT 1
)"""
_ACTIVITY_BUMP_UPDATE = """
UPDATE workspace_builds AS wb
SET
    updated_at = %(now)s::timestamptz,
    deadline = CASE
        WHEN l.build_max_deadline = '0001-01-01 00:00:00+00'::timestamptz
            THEN GREATEST(wb.deadline, %(now)s::timestamptz + l.bump)
        ELSE LEAST(GREATEST(wb.deadline, %(now)s::timestamptz + l.bump), l.build_max_deadline)
    END
FROM latest AS l
WHERE wb.id = l.build_id
    AND l.job_completed_at IS NOT NULL
    AND l.build_transition = 'start'
    AND l.activity_bump > 0
    AND l.bump > interval '0'
    AND l.build_deadline <> '0001-01-01 00:00:00+00'::timestamptz
    AND l.build_deadline - l.bump * 0.95 < %(now)s::timestamptz
    AND l.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0'::uuid
"""
_ACTIVITY_BUMP = _ACTIVITY_BUMP_CTE + _ACTIVITY_BUMP_UPDATE
# The bump and an event in one statement (one round trip): the NOTIFY is sent whether or not a
# deadline moved, and only if the statement commits.
_ACTIVITY_BUMP_NOTIFY = (
    _ACTIVITY_BUMP_CTE
    + ", bumped AS ("
    + _ACTIVITY_BUMP_UPDATE
    + """RETURNING 1
)
SELECT (SELECT count(*) FROM bumped) AS bumped, pg_notify(%(channel)s, %(payload)s) AS notice
"""
)


async def activity_bump_workspace(
    db: Queryable,
    workspace_id: uuid.UUID,
    *,
    now: dt.datetime,
    next_autostart: dt.datetime | None,
    notice: tuple[str, str] | None = None,
) -> bool:
    """Bump the latest build's deadline for activity at ``now``; True when a deadline was written.

    ``notice`` (channel, payload): the same statement also sends that NOTIFY (bumped or not).
    """
    params = {"workspace_id": workspace_id, "now": now, "next_autostart": next_autostart}
    if notice is None:
        return await db.execute(_ACTIVITY_BUMP, params) > 0
    row = await db.fetchone(_ACTIVITY_BUMP_NOTIFY, {**params, "channel": notice[0], "payload": notice[1]})
    return row is not None and int(row["bumped"]) > 0


async def batch_update_last_used_at(
    db: Queryable, workspace_ids: Collection[uuid.UUID], last_used_at: dt.datetime
) -> int:
    """Set ``last_used_at`` of many workspaces at once, never moving it backwards; returns rows changed."""
    if not workspace_ids:
        return 0
    return await db.execute(
        "UPDATE workspaces SET last_used_at = %s WHERE id = ANY(%s::uuid[]) AND last_used_at < %s",
        [last_used_at, list(workspace_ids), last_used_at],
    )
