"""Boundary audit rows (spec §7.17, §9.5): sessions, logs and per-replica usage stats."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import attrs

from agentd.store.db import Database, Transaction

__all__ = [
    "USAGE_LOCK_KEY",
    "BoundaryLogRow",
    "BoundarySession",
    "UsageFlush",
    "UsageSummary",
    "insert_boundary_logs",
    "insert_boundary_session",
    "take_usage_summary",
    "upsert_usage_stats",
]

Queryable = Database | Transaction

#: pg_advisory_xact_lock key serialising usage flushes with the telemetry reset ("agentdbu").
USAGE_LOCK_KEY = 0x6167656E74646275


@attrs.frozen
class BoundarySession:
    id: uuid.UUID
    workspace_agent_id: uuid.UUID
    owner_id: uuid.UUID
    confined_process_name: str
    started_at: dt.datetime


@attrs.frozen
class BoundaryLogRow:
    id: uuid.UUID
    sequence_number: int
    captured_at: dt.datetime
    created_at: dt.datetime
    proto: str
    method: str
    detail: str
    matched_rule: str | None


async def insert_boundary_session(db: Queryable, session: BoundarySession) -> bool:
    """Create the session row; True if this call created it, False if it already existed.

    A primary-key conflict keeps the first creator's agent and owner (spec §7.17 step 5).
    """
    created = await db.fetchval(
        "INSERT INTO boundary_sessions"
        " (id, workspace_agent_id, confined_process_name, started_at, updated_at, owner_id)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING true",
        [
            session.id,
            session.workspace_agent_id,
            session.confined_process_name,
            session.started_at,
            session.started_at,
            session.owner_id,
        ],
    )
    return created is True


async def insert_boundary_logs(
    db: Queryable, session_id: uuid.UUID, owner_id: uuid.UUID, rows: Sequence[BoundaryLogRow]
) -> int:
    """All rows of one batch in one multi-row INSERT (all or nothing); returns the number inserted."""
    if not rows:
        return 0
    return await db.execute(
        "INSERT INTO boundary_logs"
        " (id, session_id, sequence_number, captured_at, created_at, proto, method, detail, matched_rule,"
        "  owner_id)"
        " SELECT u.id, %s, u.seq, u.captured_at, u.created_at, u.proto, u.method, u.detail, u.rule, %s"
        " FROM unnest(%s::uuid[], %s::int[], %s::timestamptz[], %s::timestamptz[], %s::text[], %s::text[],"
        "  %s::text[], %s::text[]) AS u(id, seq, captured_at, created_at, proto, method, detail, rule)",
        [
            session_id,
            owner_id,
            [r.id for r in rows],
            [r.sequence_number for r in rows],
            [r.captured_at for r in rows],
            [r.created_at for r in rows],
            [r.proto for r in rows],
            [r.method for r in rows],
            [r.detail for r in rows],
            [r.matched_rule for r in rows],
        ],
    )


@attrs.frozen
class UsageFlush:
    """One flush of the usage tracker (spec §9.5).

    ``new_*`` are the uniques seen since the previous flush (what a fresh row starts the period with);
    ``period_*`` the uniques seen since the period began (what an existing row's counts become).
    """

    replica_id: uuid.UUID
    new_workspaces: int
    new_users: int
    period_workspaces: int
    period_users: int
    allowed: int
    denied: int
    now: dt.datetime


async def upsert_usage_stats(db: Database, flush: UsageFlush) -> bool:
    """Upsert this replica's row under the usage advisory lock; True if a new row (period) was inserted."""
    async with db.transaction() as tx:
        await tx.execute("SELECT pg_advisory_xact_lock(%s)", [USAGE_LOCK_KEY])
        inserted = await tx.fetchval(
            "INSERT INTO boundary_usage_stats"
            " (replica_id, unique_workspaces_count, unique_users_count, allowed_requests, denied_requests,"
            "  window_start, updated_at)"
            " VALUES (%(replica)s, %(new_ws)s, %(new_users)s, %(allowed)s, %(denied)s, %(now)s, %(now)s)"
            " ON CONFLICT (replica_id) DO UPDATE SET"
            "  unique_workspaces_count = %(period_ws)s,"
            "  unique_users_count = %(period_users)s,"
            "  allowed_requests = boundary_usage_stats.allowed_requests + EXCLUDED.allowed_requests,"
            "  denied_requests = boundary_usage_stats.denied_requests + EXCLUDED.denied_requests,"
            "  updated_at = EXCLUDED.updated_at"
            " RETURNING (xmax = 0) AS inserted",
            {
                "replica": flush.replica_id,
                "new_ws": flush.new_workspaces,
                "new_users": flush.new_users,
                "period_ws": flush.period_workspaces,
                "period_users": flush.period_users,
                "allowed": flush.allowed,
                "denied": flush.denied,
                "now": flush.now,
            },
        )
    return inserted is True


@attrs.frozen
class UsageSummary:
    """All replicas' usage of one telemetry period (Coder's GetAndResetBoundaryUsageSummary)."""

    unique_workspaces: int
    unique_users: int
    allowed_requests: int
    denied_requests: int


async def take_usage_summary(db: Database, *, now: dt.datetime, stale_after: dt.timedelta) -> UsageSummary:
    """Sum the rows updated within ``stale_after`` and delete every row, ending the period.

    Runs under the usage lock, so no flush lands between the read and the delete; the next flush of
    each replica then INSERTs and starts a new period (spec §9.5). Unique counts are summed across
    replicas, as Coder does (a workspace seen by two replicas counts twice).
    """
    async with db.transaction() as tx:
        await tx.execute("SELECT pg_advisory_xact_lock(%s)", [USAGE_LOCK_KEY])
        row = await tx.fetchone(
            "SELECT coalesce(sum(unique_workspaces_count), 0) AS ws,"
            " coalesce(sum(unique_users_count), 0) AS users, coalesce(sum(allowed_requests), 0) AS allowed,"
            " coalesce(sum(denied_requests), 0) AS denied"
            " FROM boundary_usage_stats WHERE updated_at >= %s",
            [now - stale_after],
        )
        await tx.execute("DELETE FROM boundary_usage_stats")
    assert row is not None
    return UsageSummary(int(row["ws"]), int(row["users"]), int(row["allowed"]), int(row["denied"]))
