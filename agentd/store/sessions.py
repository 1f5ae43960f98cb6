"""Queries of agent connections: who the token belongs to (with everything a connection reads at
start, in one query), connection timestamps, the session authorisation re-check and the workspace
identity the cache refresher re-reads — the periodic ones for every session of the process at once.

Coder's names, for grepping: GetAuthenticatedWorkspaceAgentAndBuildByAuthToken (spec §2.2),
UpdateWorkspaceAgentConnectionByID and GetLatestWorkspaceBuildByWorkspaceID (§2.8),
GetWorkspaceByID on ``workspaces_expanded`` (§4.3).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
from psycopg import sql as pgsql

from agentd.model import AgentIdentity, WorkspaceIdentity
from agentd.store.agents import AUTHORIZED_AGENT, get_agent_by_token, token_matches, token_param
from agentd.store.db import Database, Transaction
from agentd.store.monitors import MemoryMonitor, VolumeMonitor

__all__ = [
    "Authenticated",
    "ConnectionTimes",
    "Queryable",
    "SessionAuthorization",
    "authenticate_agent",
    "authenticate_connection",
    "connection_times",
    "latest_build_id",
    "mark_connected",
    "mark_disconnected",
    "mark_session_start",
    "mark_sessions_started",
    "session_authorizations",
    "update_connection",
    "workspace_identities",
    "workspace_identity",
]


class Queryable(Protocol):
    """A Database or a Transaction."""

    async def execute(self, sql: Any, params: Any = ()) -> int: ...

    async def fetchone(self, sql: Any, params: Any = ()) -> dict[str, Any] | None: ...

    async def fetchval(self, sql: Any, params: Any = ()) -> Any: ...

    async def fetchall(self, sql: Any, params: Any = ()) -> list[dict[str, Any]]: ...


async def authenticate_agent(
    db: Database | Transaction, token: uuid.UUID, *, api_version: tuple[int, int] = (2, 10)
) -> AgentIdentity | None:
    """The agent a token authenticates, or None: spec §2.2 (latest build or the stop-build exception;
    deleted workspaces and deleted agents refused)."""
    auth = await get_agent_by_token(db, token)
    if auth is None:
        return None
    agent, build, workspace = auth.agent, auth.build, auth.workspace
    return AgentIdentity(
        agent_id=agent.id,
        agent_name=agent.name,
        parent_id=agent.parent_id,
        resource_id=agent.resource_id,
        build_id=build.id,
        workspace_id=workspace.id,
        workspace_name=workspace.name,
        owner_id=workspace.owner_id,
        owner_username=auth.owner_username,
        organization_id=workspace.organization_id,
        template_id=workspace.template_id,
        template_version_id=build.template_version_id,
        api_version=api_version,
    )


@attrs.frozen
class ConnectionTimes:
    """The connection columns of one ``workspace_agents`` row."""

    first_connected_at: dt.datetime | None
    last_connected_at: dt.datetime | None
    disconnected_at: dt.datetime | None
    last_connected_replica_id: uuid.UUID | None


async def connection_times(db: Queryable, agent_id: uuid.UUID) -> ConnectionTimes | None:
    row = await db.fetchone(
        "SELECT first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id "
        "FROM workspace_agents WHERE id = %s",
        (agent_id,),
    )
    if row is None:
        return None
    return ConnectionTimes(
        first_connected_at=row["first_connected_at"],
        last_connected_at=row["last_connected_at"],
        disconnected_at=row["disconnected_at"],
        last_connected_replica_id=row["last_connected_replica_id"],
    )


async def update_connection(
    db: Queryable,
    agent_id: uuid.UUID,
    times: ConnectionTimes,
    *,
    updated_at: dt.datetime,
) -> int:
    """UpdateWorkspaceAgentConnectionByID: all four columns plus ``updated_at``; the rowcount."""
    return await db.execute(
        "UPDATE workspace_agents SET first_connected_at = %s, last_connected_at = %s, "
        "disconnected_at = %s, last_connected_replica_id = %s, updated_at = %s WHERE id = %s",
        (
            times.first_connected_at,
            times.last_connected_at,
            times.disconnected_at,
            times.last_connected_replica_id,
            updated_at,
            agent_id,
        ),
    )


async def latest_build_id(db: Queryable, workspace_id: uuid.UUID) -> uuid.UUID | None:
    """GetLatestWorkspaceBuildByWorkspaceID's id (None: the workspace has no build)."""
    value = await db.fetchval(
        "SELECT id FROM workspace_builds WHERE workspace_id = %s ORDER BY build_number DESC LIMIT 1",
        (workspace_id,),
    )
    return value if isinstance(value, uuid.UUID) else None


#: The columns of ``workspaces_expanded`` that make a WorkspaceIdentity (spec §4.3).
IDENTITY_COLUMNS = (
    "id, owner_id, organization_id, template_id, name, owner_username, template_name, "
    "autostart_schedule, task_id"
)


def identity_from_row(row: dict[str, Any]) -> WorkspaceIdentity:
    """A WorkspaceIdentity from a row selecting IDENTITY_COLUMNS."""
    return WorkspaceIdentity(
        id=row["id"],
        owner_id=row["owner_id"],
        organization_id=row["organization_id"],
        template_id=row["template_id"],
        name=row["name"],
        owner_username=row["owner_username"],
        template_name=row["template_name"],
        autostart_schedule=row["autostart_schedule"],
        task_id=row["task_id"],
    )


async def workspace_identity(db: Queryable, workspace_id: uuid.UUID) -> WorkspaceIdentity | None:
    """The cached fields of spec §4.3 for one workspace (deleted ones included, as GetWorkspaceByID)."""
    row = await db.fetchone(
        f"SELECT {IDENTITY_COLUMNS} FROM workspaces_expanded WHERE id = %s", (workspace_id,)
    )
    return None if row is None else identity_from_row(row)


# ---- connect: one query --------------------------------------------------------------------------


@attrs.frozen
class Preload:
    """Per-connection state read once at connect, in the token lookup's query, for the services that
    would otherwise each ``load()`` it (spec §4.1 step 4): one round trip instead of one per service."""

    #: None: the template defines no memory monitor.
    memory_monitor: MemoryMonitor | None = None
    #: ordered by path
    volume_monitors: tuple[VolumeMonitor, ...] = ()


@attrs.frozen
class Authenticated:
    """What the connect query returns: who is on the connection, the workspace identity for its cache
    (spec §4.3, as ``workspaces_expanded`` shows it) and the services' per-connection state."""

    ident: AgentIdentity
    workspace: WorkspaceIdentity
    preload: Preload


_MONITOR_JSON = (
    "'enabled', {t}.enabled, 'threshold', {t}.threshold, 'state', {t}.state::text, "
    "'created_at', {t}.created_at, 'updated_at', {t}.updated_at, 'debounced_until', {t}.debounced_until"
)

_CONNECT = pgsql.SQL(
    """
WITH a AS MATERIALIZED (
  -- The token names at most one agent: start there whatever the planner's statistics say (a fresh
  -- database without them planned a scan of every build first, 5 ms instead of 0.2 ms).
  SELECT a.id, a.name, a.parent_id, a.resource_id, a.deleted FROM workspace_agents a WHERE {token_matches}
)
SELECT a.id AS agent_id, a.name AS agent_name, a.parent_id, a.resource_id,
       b.id AS build_id, b.template_version_id,
       w.id, w.owner_id, w.organization_id, w.template_id, w.name, w.autostart_schedule,
       owner.username AS owner_username, t.name AS template_name, tasks.id AS task_id,
       (SELECT json_build_object("""
    + _MONITOR_JSON.format(t="m")
    + """)
          FROM workspace_agent_memory_resource_monitors m WHERE m.agent_id = a.id) AS memory_monitor,
       (SELECT json_agg(json_build_object('path', v.path, """
    + _MONITOR_JSON.format(t="v")
    + """) ORDER BY v.path)
          FROM workspace_agent_volume_resource_monitors v WHERE v.agent_id = a.id) AS volume_monitors
FROM a
JOIN workspace_resources r ON r.id = a.resource_id
JOIN workspace_builds b ON b.job_id = r.job_id
JOIN workspaces w ON w.id = b.workspace_id
JOIN users owner ON owner.id = w.owner_id
JOIN templates t ON t.id = w.template_id
LEFT JOIN tasks ON tasks.workspace_id = w.id AND tasks.deleted_at IS NULL
WHERE {authorized}
"""
).format(token_matches=token_matches(), authorized=AUTHORIZED_AGENT)
#: Rendered once: psycopg would otherwise compose the text again on every connect.
_CONNECT_TEXT = _CONNECT.as_string()


def _ts(raw: str) -> dt.datetime:
    return dt.datetime.fromisoformat(raw)


def _memory_monitor(agent_id: uuid.UUID, raw: dict[str, Any] | None) -> MemoryMonitor | None:
    if raw is None:
        return None
    return MemoryMonitor(
        agent_id=agent_id,
        enabled=raw["enabled"],
        threshold=raw["threshold"],
        state=raw["state"],
        created_at=_ts(raw["created_at"]),
        updated_at=_ts(raw["updated_at"]),
        debounced_until=_ts(raw["debounced_until"]),
    )


def _volume_monitors(agent_id: uuid.UUID, raw: list[dict[str, Any]] | None) -> tuple[VolumeMonitor, ...]:
    return tuple(
        VolumeMonitor(
            agent_id=agent_id,
            path=v["path"],
            enabled=v["enabled"],
            threshold=v["threshold"],
            state=v["state"],
            created_at=_ts(v["created_at"]),
            updated_at=_ts(v["updated_at"]),
            debounced_until=_ts(v["debounced_until"]),
        )
        for v in raw or ()
    )


async def authenticate_connection(
    db: Queryable, token: uuid.UUID, *, api_version: tuple[int, int] = (2, 10)
) -> Authenticated | None:
    """The token lookup of spec §2.2 and everything else a connection reads at start, in one query.

    None when the token authenticates no agent (same rules as :func:`authenticate_agent`).
    """
    row = await db.fetchone(_CONNECT_TEXT, {"token": token_param(token)})
    if row is None:
        return None
    agent_id = row["agent_id"]
    ident = AgentIdentity(
        agent_id=agent_id,
        agent_name=row["agent_name"],
        parent_id=row["parent_id"],
        resource_id=row["resource_id"],
        build_id=row["build_id"],
        workspace_id=row["id"],
        workspace_name=row["name"],
        owner_id=row["owner_id"],
        owner_username=row["owner_username"],
        organization_id=row["organization_id"],
        template_id=row["template_id"],
        template_version_id=row["template_version_id"],
        api_version=api_version,
    )
    return Authenticated(
        ident=ident,
        workspace=identity_from_row(row),
        preload=Preload(
            memory_monitor=_memory_monitor(agent_id, row["memory_monitor"]),
            volume_monitors=_volume_monitors(agent_id, row["volume_monitors"]),
        ),
    )


# ---- connection timestamps (spec §2.8) -----------------------------------------------------------


async def mark_session_start(
    db: Queryable, agent_id: uuid.UUID, *, now: dt.datetime, replica_id: uuid.UUID
) -> bool | None:
    """The monitor's start write in one statement: ``first_connected_at`` = existing or now,
    ``last_connected_at`` = now, ``disconnected_at`` kept. Returns whether a disconnect is recorded
    (None: no such agent)."""
    row = await db.fetchone(
        "UPDATE workspace_agents SET first_connected_at = COALESCE(first_connected_at, %(now)s),"
        " last_connected_at = %(now)s, last_connected_replica_id = %(replica)s, updated_at = %(now)s"
        " WHERE id = %(id)s RETURNING disconnected_at IS NOT NULL AS disconnected",
        {"now": now, "replica": replica_id, "id": agent_id},
    )
    return None if row is None else bool(row["disconnected"])


async def mark_sessions_started(
    db: Queryable, agent_ids: Sequence[uuid.UUID], *, now: dt.datetime, replica_id: uuid.UUID
) -> set[uuid.UUID]:
    """:func:`mark_session_start` for many agents in one statement; returns the agents found."""
    rows = await db.fetchall(
        "UPDATE workspace_agents SET first_connected_at = COALESCE(first_connected_at, %(now)s),"
        " last_connected_at = %(now)s, last_connected_replica_id = %(replica)s, updated_at = %(now)s"
        " WHERE id = ANY(%(ids)s) RETURNING id",
        {"now": now, "replica": replica_id, "ids": list(agent_ids)},
    )
    return {row["id"] for row in rows}


async def mark_connected(
    db: Queryable, agent_ids: Sequence[uuid.UUID], *, now: dt.datetime, replica_id: uuid.UUID
) -> set[uuid.UUID]:
    """One monitor tick for every given agent in one statement: ``last_connected_at`` = now and
    ``disconnected_at`` cleared. Returns the agents whose disconnect this cleared (their status
    changed: an ``agt_connection_update`` is due). Rows are locked in id order (no deadlock between
    replicas ticking overlapping sets); a row another transaction holds is skipped until the next
    tick, so one stuck row cannot stall the tick of every agent."""
    rows = await db.fetchall(
        "UPDATE workspace_agents a SET last_connected_at = %(now)s, disconnected_at = NULL,"
        " last_connected_replica_id = %(replica)s, updated_at = %(now)s"
        " FROM (SELECT id, disconnected_at FROM workspace_agents WHERE id = ANY(%(ids)s)"
        "       ORDER BY id FOR UPDATE SKIP LOCKED) prev"
        " WHERE a.id = prev.id RETURNING a.id, prev.disconnected_at IS NOT NULL AS cleared",
        {"now": now, "replica": replica_id, "ids": list(agent_ids)},
    )
    return {row["id"] for row in rows if row["cleared"]}


async def mark_disconnected(
    db: Queryable, agent_id: uuid.UUID, *, now: dt.datetime, replica_id: uuid.UUID
) -> int:
    """The monitor's final write: ``disconnected_at`` = now (the other timestamps as last written)."""
    return await db.execute(
        "UPDATE workspace_agents SET disconnected_at = %(now)s, last_connected_replica_id = %(replica)s,"
        " updated_at = %(now)s WHERE id = %(id)s",
        {"now": now, "replica": replica_id, "id": agent_id},
    )


# ---- session authorisation, re-checked on every tick ---------------------------------------------


@attrs.frozen
class SessionAuthorization:
    """What decides whether a live session may go on (its agent and workspace as they are now)."""

    latest_build_id: uuid.UUID | None
    workspace_deleted: bool
    agent_deleted: bool


async def session_authorizations(
    db: Queryable, sessions: Sequence[tuple[uuid.UUID, uuid.UUID]]
) -> dict[uuid.UUID, SessionAuthorization]:
    """For each ``(agent_id, workspace_id)``, keyed by agent: the workspace's latest build and whether
    the workspace or the agent is deleted (a missing row counts as deleted). One query for all."""
    if not sessions:
        return {}
    rows = await db.fetchall(
        "SELECT s.agent_id,"
        " (SELECT id FROM workspace_builds b WHERE b.workspace_id = s.workspace_id"
        "   ORDER BY build_number DESC LIMIT 1) AS latest_build_id,"
        " coalesce(w.deleted, true) AS workspace_deleted, coalesce(a.deleted, true) AS agent_deleted"
        " FROM unnest(%s::uuid[], %s::uuid[]) AS s(agent_id, workspace_id)"
        " LEFT JOIN workspaces w ON w.id = s.workspace_id"
        " LEFT JOIN workspace_agents a ON a.id = s.agent_id",
        ([a for a, _ in sessions], [w for _, w in sessions]),
    )
    return {
        row["agent_id"]: SessionAuthorization(
            latest_build_id=row["latest_build_id"],
            workspace_deleted=row["workspace_deleted"],
            agent_deleted=row["agent_deleted"],
        )
        for row in rows
    }


async def workspace_identities(
    db: Queryable, workspace_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, WorkspaceIdentity]:
    """:func:`workspace_identity` for many workspaces in one query (missing ones are left out)."""
    if not workspace_ids:
        return {}
    rows = await db.fetchall(
        f"SELECT {IDENTITY_COLUMNS} FROM workspaces_expanded WHERE id = ANY(%s)", (list(workspace_ids),)
    )
    return {row["id"]: identity_from_row(row) for row in rows}
