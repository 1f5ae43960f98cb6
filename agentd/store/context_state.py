"""Workspace-agent context snapshots (spec §7.19): one repeatable-read transaction per push."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import attrs

from agentd.store.db import Database, Transaction
from agentd.store.errors import SerializationFailure

__all__ = [
    "MAX_RETRIES",
    "ContextPush",
    "ContextResourceRow",
    "ContextSnapshot",
    "apply_context_push",
    "fetch_context_resources",
    "fetch_context_snapshot",
]

log = logging.getLogger("agentd.store.context_state")

#: Serialization failures retried after the first attempt.
MAX_RETRIES = 5

Queryable = Database | Transaction


@attrs.frozen
class ContextResourceRow:
    source: str
    source_path: str
    body_kind: str
    #: protojson text of the body variant, stored as jsonb.
    body_json: str
    content_hash: bytes
    size_bytes: int
    status: str
    error: str


@attrs.frozen
class ContextPush:
    agent_id: uuid.UUID
    version: int
    aggregate_hash: bytes
    snapshot_error: str
    initial: bool
    resources: Sequence[ContextResourceRow]
    received_at: dt.datetime


@attrs.frozen
class ContextSnapshot:
    agent_id: uuid.UUID
    version: int
    aggregate_hash: bytes
    snapshot_error: str
    received_at: dt.datetime


async def fetch_context_snapshot(db: Queryable, agent_id: uuid.UUID) -> ContextSnapshot | None:
    row = await db.fetchone(
        "SELECT workspace_agent_id, version, aggregate_hash, snapshot_error, received_at"
        " FROM workspace_agent_context_snapshots WHERE workspace_agent_id = %s",
        [agent_id],
    )
    if row is None:
        return None
    return ContextSnapshot(
        row["workspace_agent_id"],
        row["version"],
        bytes(row["aggregate_hash"]),
        row["snapshot_error"],
        row["received_at"],
    )


async def fetch_context_resources(db: Queryable, agent_id: uuid.UUID) -> list[dict[str, Any]]:
    """The agent's stored resources ordered by source (body as parsed JSON)."""
    rows = await db.fetchall(
        "SELECT source, source_path, body_kind::text AS body_kind, body, content_hash, size_bytes,"
        " status::text AS status, error, created_at, updated_at"
        " FROM workspace_agent_context_resources WHERE workspace_agent_id = %s ORDER BY source",
        [agent_id],
    )
    return [dict(r) for r in rows]


async def _apply(tx: Transaction, push: ContextPush) -> bool:
    stored = await tx.fetchval(
        "SELECT version FROM workspace_agent_context_snapshots WHERE workspace_agent_id = %s",
        [push.agent_id],
    )
    if stored is not None and not push.initial and push.version <= stored:
        return False
    await tx.execute(
        "INSERT INTO workspace_agent_context_snapshots"
        " (workspace_agent_id, version, aggregate_hash, snapshot_error, received_at)"
        " VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (workspace_agent_id) DO UPDATE SET version = EXCLUDED.version,"
        "  aggregate_hash = EXCLUDED.aggregate_hash, snapshot_error = EXCLUDED.snapshot_error,"
        "  received_at = EXCLUDED.received_at",
        [push.agent_id, push.version, push.aggregate_hash, push.snapshot_error, push.received_at],
    )
    res = push.resources
    if res:
        await tx.execute(
            "INSERT INTO workspace_agent_context_resources"
            " (workspace_agent_id, source, source_path, body_kind, body, content_hash, size_bytes, status,"
            "  error, created_at, updated_at)"
            " SELECT %(agent)s, u.source, u.source_path, u.body_kind::workspace_agent_context_body_kind,"
            "  u.body::jsonb, u.content_hash, u.size_bytes,"
            "  u.status::workspace_agent_context_resource_status, u.error, %(now)s, %(now)s"
            " FROM unnest(%(source)s::text[], %(source_path)s::text[], %(body_kind)s::text[],"
            "  %(body)s::text[], %(hash)s::bytea[], %(size)s::bigint[], %(status)s::text[],"
            "  %(error)s::text[]) AS u(source, source_path, body_kind, body, content_hash, size_bytes,"
            "  status, error)"
            " ON CONFLICT (workspace_agent_id, source) DO UPDATE SET source_path = EXCLUDED.source_path,"
            "  body_kind = EXCLUDED.body_kind, body = EXCLUDED.body, content_hash = EXCLUDED.content_hash,"
            "  size_bytes = EXCLUDED.size_bytes, status = EXCLUDED.status, error = EXCLUDED.error,"
            "  updated_at = EXCLUDED.updated_at",
            {
                "agent": push.agent_id,
                "now": push.received_at,
                "source": [r.source for r in res],
                "source_path": [r.source_path for r in res],
                "body_kind": [r.body_kind for r in res],
                "body": [r.body_json for r in res],
                "hash": [r.content_hash for r in res],
                "size": [r.size_bytes for r in res],
                "status": [r.status for r in res],
                "error": [r.error for r in res],
            },
        )
    await tx.execute(
        "DELETE FROM workspace_agent_context_resources"
        " WHERE workspace_agent_id = %s AND NOT (source = ANY(%s::text[]))",
        [push.agent_id, [r.source for r in res]],
    )
    return True


async def apply_context_push(db: Database, push: ContextPush) -> bool:
    """Store the push unless it is a replay; True when accepted.

    Repeatable read, so a concurrent push of the same agent makes one of them fail to serialize; that
    one is retried (up to `MAX_RETRIES` times) and then sees the other's version.
    """
    attempt = 0
    while True:
        try:
            async with db.transaction(isolation="repeatable read") as tx:
                return await _apply(tx, push)
        except SerializationFailure:
            attempt += 1
            if attempt > MAX_RETRIES:
                raise
            log.debug("context push: serialization failure, retry %d agent_id=%s", attempt, push.agent_id)
