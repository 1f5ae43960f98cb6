"""workspace_agent_stats inserts (spec §7.4, §9.2) and the workspace an agent belongs to."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence

import attrs

from agentd.model import WorkspaceIdentity
from agentd.store.db import Database, Transaction
from agentd.store.sessions import IDENTITY_COLUMNS, identity_from_row

__all__ = ["AgentStatsRow", "insert_agent_stats", "workspace_by_agent_id"]

Queryable = Database | Transaction


@attrs.frozen
class AgentStatsRow:
    """One workspace_agent_stats row as the stats batcher queues it."""

    id: uuid.UUID
    created_at: dt.datetime
    user_id: uuid.UUID
    agent_id: uuid.UUID
    workspace_id: uuid.UUID
    template_id: uuid.UUID
    connections_by_proto: Mapping[str, int]
    connection_count: int
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    connection_median_latency_ms: float
    session_count_vscode: int
    session_count_jetbrains: int
    session_count_reconnecting_pty: int
    session_count_ssh: int
    usage: bool = False


_COLUMNS = tuple(f.name for f in attrs.fields(AgentStatsRow))
_TYPES = {
    "id": "uuid",
    "created_at": "timestamptz",
    "user_id": "uuid",
    "agent_id": "uuid",
    "workspace_id": "uuid",
    "template_id": "uuid",
    "connections_by_proto": "jsonb",
    "connection_median_latency_ms": "float8",
    "usage": "bool",
}
# ON CONFLICT: a batch re-sent after a write cancelled at shutdown may already be committed; the
# retry must not fail on those ids and lose the rest.
_INSERT = (
    "INSERT INTO workspace_agent_stats ({cols}) SELECT * FROM unnest({arrays}) ON CONFLICT (id) DO NOTHING"
).format(
    cols=", ".join(_COLUMNS),
    arrays=", ".join(f"%s::{_TYPES.get(c, 'int8')}[]" for c in _COLUMNS),
)


def _column(rows: Sequence[AgentStatsRow], name: str) -> list[object]:
    if name == "connections_by_proto":
        # jsonb refuses \u0000: one agent's NUL in a protocol name must not fail everyone's batch.
        return [
            json.dumps(
                {k.replace("\x00", ""): v for k, v in r.connections_by_proto.items()}, separators=(",", ":")
            )
            for r in rows
        ]
    return [getattr(r, name) for r in rows]


async def insert_agent_stats(db: Queryable, rows: Sequence[AgentStatsRow]) -> int:
    """All rows in one multi-row ``INSERT … SELECT * FROM unnest(...)``; returns the rows inserted
    (rows whose id is already stored are skipped, so re-sending a batch is harmless)."""
    if not rows:
        return 0
    return await db.execute(_INSERT, [_column(rows, c) for c in _COLUMNS])


_WORKSPACE_BY_AGENT = f"""
SELECT {", ".join("w." + c.strip() for c in IDENTITY_COLUMNS.split(","))}
FROM workspace_agents a
JOIN workspace_resources r ON r.id = a.resource_id
JOIN workspace_builds b ON b.job_id = r.job_id
JOIN workspaces_expanded w ON w.id = b.workspace_id
WHERE a.id = %s
"""


async def workspace_by_agent_id(db: Queryable, agent_id: uuid.UUID) -> WorkspaceIdentity | None:
    """``GetWorkspaceByAgentID``: the identity of the workspace whose build runs the agent."""
    row = await db.fetchone(_WORKSPACE_BY_AGENT, [agent_id])
    return None if row is None else identity_from_row(row)
