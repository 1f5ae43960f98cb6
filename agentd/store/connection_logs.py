"""connection_logs upserts (spec §7.13, §9.7) and the workspace fields a log row names."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import attrs

from agentd.store.db import Database, Transaction

__all__ = ["ConnectionLogRow", "LogWorkspace", "fetch_log_workspace", "upsert_connection_logs"]

Queryable = Database | Transaction


@attrs.frozen
class ConnectionLogRow:
    """One row of connection_logs; ``disconnect_time`` is None while the connection is open."""

    id: uuid.UUID
    connect_time: dt.datetime
    organization_id: uuid.UUID
    workspace_owner_id: uuid.UUID
    workspace_id: uuid.UUID
    workspace_name: str
    agent_name: str
    type: str
    code: int | None
    ip: str | None
    user_agent: str | None
    user_id: uuid.UUID | None
    slug_or_port: str | None
    connection_id: uuid.UUID | None
    disconnect_time: dt.datetime | None
    disconnect_reason: str | None


@attrs.frozen
class LogWorkspace:
    id: uuid.UUID
    name: str
    owner_id: uuid.UUID
    organization_id: uuid.UUID


async def fetch_log_workspace(db: Queryable, workspace_id: uuid.UUID) -> LogWorkspace | None:
    """The slow path when the connection has no cached workspace (prebuilds, spec §4.4)."""
    row = await db.fetchone(
        "SELECT id, name, owner_id, organization_id FROM workspaces WHERE id = %s", [workspace_id]
    )
    if row is None:
        return None
    return LogWorkspace(row["id"], row["name"], row["owner_id"], row["organization_id"])


_COLUMNS = (
    "id, connect_time, organization_id, workspace_owner_id, workspace_id, workspace_name, agent_name,"
    " type, code, ip, user_agent, user_id, slug_or_port, connection_id, disconnect_time, disconnect_reason"
)


async def upsert_connection_logs(db: Queryable, rows: Sequence[ConnectionLogRow]) -> int:
    """One statement for the whole batch, upserting on (connection_id, workspace_id, agent_name).

    An existing row keeps the earliest connect time (a standalone disconnect's placeholder gives way to
    the real connect) and takes disconnect time, reason and code only while they are still NULL (the first
    disconnect wins). Rows must have distinct keys (the batcher merges them first).
    """
    if not rows:
        return 0
    return await db.execute(
        f"INSERT INTO connection_logs ({_COLUMNS})"
        " SELECT u.id, u.connect_time, u.organization_id, u.workspace_owner_id, u.workspace_id,"
        "  u.workspace_name, u.agent_name, u.type::connection_type, u.code, u.ip::inet, u.user_agent,"
        "  u.user_id, u.slug_or_port, u.connection_id, u.disconnect_time, u.disconnect_reason"
        " FROM unnest(%s::uuid[], %s::timestamptz[], %s::uuid[], %s::uuid[], %s::uuid[], %s::text[],"
        "  %s::text[], %s::text[], %s::int[], %s::text[], %s::text[], %s::uuid[], %s::text[], %s::uuid[],"
        "  %s::timestamptz[], %s::text[])"
        " AS u(id, connect_time, organization_id, workspace_owner_id, workspace_id, workspace_name,"
        "  agent_name, type, code, ip, user_agent, user_id, slug_or_port, connection_id, disconnect_time,"
        "  disconnect_reason)"
        " ON CONFLICT (connection_id, workspace_id, agent_name) DO UPDATE SET"
        "  connect_time = LEAST(connection_logs.connect_time, EXCLUDED.connect_time),"
        "  disconnect_time = COALESCE(connection_logs.disconnect_time, EXCLUDED.disconnect_time),"
        "  disconnect_reason = COALESCE(connection_logs.disconnect_reason, EXCLUDED.disconnect_reason),"
        "  code = COALESCE(connection_logs.code, EXCLUDED.code)",
        [
            [r.id for r in rows],
            [r.connect_time for r in rows],
            [r.organization_id for r in rows],
            [r.workspace_owner_id for r in rows],
            [r.workspace_id for r in rows],
            [r.workspace_name for r in rows],
            [r.agent_name for r in rows],
            [r.type for r in rows],
            [r.code for r in rows],
            [r.ip for r in rows],
            [r.user_agent for r in rows],
            [r.user_id for r in rows],
            [r.slug_or_port for r in rows],
            [r.connection_id for r in rows],
            [r.disconnect_time for r in rows],
            [r.disconnect_reason for r in rows],
        ],
    )
