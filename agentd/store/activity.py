"""Workspace activity: the deadline bump of spec §9.3 and the batched ``last_used_at`` of §9.2."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Sequence

import attrs

from agentd.store.db import Database, Transaction

__all__ = ["Bump", "activity_bump_workspace", "activity_bump_workspaces", "batch_update_last_used_at"]

Queryable = Database | Transaction

# Durations in templates/workspaces are Go nanoseconds; `(ns / 1000) * 1 µs` is the interval.
# The bump is the template's activity_bump, unless now + bump would pass a future next autostart:
# then the workspace behaves as if it had autostarted then, i.e. (next_autostart - now) + TTL (the
# workspace's TTL when users may set autostop, else the template's default). The update applies only
# to a completed `start` build with a deadline, a positive bump, a non-prebuild owner, and only when
# less than 95 % of the interval is left (throttling repeated bumps). The deadline never decreases
# and never passes max_deadline (when set).
# Many workspaces in one statement: one request row per workspace (its own `now` and next autostart),
# each joined to its latest build. Every NOTIFY of the batch rides in the same statement (sent
# whether or not a deadline moved, and only if the statement commits).
_ACTIVITY_BUMP = """
WITH req AS (
    SELECT *
    FROM unnest(%(workspace_ids)s::uuid[], %(nows)s::timestamptz[], %(next_autostarts)s::timestamptz[])
        AS r(workspace_id, now, next_autostart)
), latest AS (
    SELECT
        r.now AS now,
        b.id AS build_id,
        b.deadline AS build_deadline,
        b.max_deadline AS build_max_deadline,
        b.transition AS build_transition,
        j.completed_at AS job_completed_at,
        t.activity_bump AS activity_bump,
        w.owner_id AS owner_id,
        CASE
            WHEN r.next_autostart IS NOT NULL
                AND r.next_autostart > r.now
                AND r.now + (t.activity_bump / 1000) * interval '1 microsecond' > r.next_autostart
            THEN (r.next_autostart - r.now)
                + (CASE WHEN t.allow_user_autostop THEN w.ttl ELSE t.default_ttl END / 1000)
                    * interval '1 microsecond'
            ELSE (t.activity_bump / 1000) * interval '1 microsecond'
        END AS bump
    FROM req r
    CROSS JOIN LATERAL (
        SELECT * FROM workspace_builds b1
        WHERE b1.workspace_id = r.workspace_id
        ORDER BY b1.build_number DESC
        LIMIT 1
    ) b
    JOIN provisioner_jobs j ON j.id = b.job_id
    JOIN workspaces w ON w.id = b.workspace_id
    JOIN templates t ON t.id = w.template_id
), bumped AS (
    UPDATE workspace_builds AS wb
    SET
        updated_at = l.now,
        deadline = CASE
            WHEN l.build_max_deadline = '0001-01-01 00:00:00+00'::timestamptz
                THEN GREATEST(wb.deadline, l.now + l.bump)
            ELSE LEAST(GREATEST(wb.deadline, l.now + l.bump), l.build_max_deadline)
        END
    FROM latest AS l
    WHERE wb.id = l.build_id
        AND l.job_completed_at IS NOT NULL
        AND l.build_transition = 'start'
        AND l.activity_bump > 0
        AND l.bump > interval '0'
        AND l.build_deadline <> '0001-01-01 00:00:00+00'::timestamptz
        AND l.build_deadline - l.bump * 0.95 < l.now
        AND l.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0'::uuid
    RETURNING wb.workspace_id
), notices AS (
    SELECT pg_notify(n.channel, n.payload)
    FROM unnest(%(channels)s::text[], %(payloads)s::text[]) AS n(channel, payload)
)
SELECT
    coalesce((SELECT array_agg(workspace_id) FROM bumped), '{}') AS bumped,
    (SELECT count(*) FROM notices) AS notices
"""


@attrs.frozen
class Bump:
    """One workspace's activity at ``now`` (``next_autostart``: from its schedule, or None)."""

    workspace_id: uuid.UUID
    now: dt.datetime
    next_autostart: dt.datetime | None


async def activity_bump_workspaces(
    db: Queryable, bumps: Sequence[Bump], notices: Sequence[tuple[str, str]] = ()
) -> set[uuid.UUID]:
    """Bump each workspace's latest build deadline for activity (at most one bump per workspace:
    the latest ``now`` wins) and send ``notices`` (channel, payload) in the same statement; returns
    the workspaces whose deadline was written."""
    latest: dict[uuid.UUID, Bump] = {}
    for bump in bumps:
        seen = latest.get(bump.workspace_id)
        if seen is None or bump.now >= seen.now:
            latest[bump.workspace_id] = bump
    items = list(latest.values())
    row = await db.fetchone(
        _ACTIVITY_BUMP,
        {
            "workspace_ids": [b.workspace_id for b in items],
            "nows": [b.now for b in items],
            "next_autostarts": [b.next_autostart for b in items],
            "channels": [channel for channel, _ in notices],
            "payloads": [payload for _, payload in notices],
        },
    )
    return set(row["bumped"]) if row is not None else set()


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
    bumped = await activity_bump_workspaces(
        db, [Bump(workspace_id, now, next_autostart)], [notice] if notice is not None else ()
    )
    return workspace_id in bumped


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
