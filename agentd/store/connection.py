"""Queries of the per-agent connection: who the token belongs to, connection timestamps, the
latest-build check and the workspace identity the cache refresher re-reads.

Coder's names, for grepping: GetAuthenticatedWorkspaceAgentAndBuildByAuthToken (spec §2.2),
UpdateWorkspaceAgentConnectionByID and GetLatestWorkspaceBuildByWorkspaceID (§2.8),
GetWorkspaceByID on ``workspaces_expanded`` (§4.3).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Protocol

import attrs

from agentd.services.base import AgentIdentity, WorkspaceIdentity

__all__ = [
    "ConnectionTimes",
    "Queryable",
    "authenticate_agent",
    "connection_times",
    "latest_build_id",
    "update_connection",
    "workspace_identity",
]


class Queryable(Protocol):
    """A Database or a Transaction."""

    async def execute(self, sql: str, params: Any = ()) -> int: ...

    async def fetchone(self, sql: str, params: Any = ()) -> dict[str, Any] | None: ...

    async def fetchval(self, sql: str, params: Any = ()) -> Any: ...


_AUTHENTICATE = """
SELECT a.id AS agent_id, a.name AS agent_name, a.parent_id, a.resource_id,
       b.id AS build_id, b.workspace_id, b.template_version_id,
       w.name AS workspace_name, w.owner_id, u.username AS owner_username,
       w.organization_id, w.template_id
FROM workspace_agents a
JOIN workspace_resources r ON r.id = a.resource_id
JOIN workspace_builds b ON b.job_id = r.job_id
JOIN provisioner_jobs j ON j.id = b.job_id
JOIN workspaces w ON w.id = b.workspace_id
JOIN users u ON u.id = w.owner_id
CROSS JOIN LATERAL (
    SELECT lb.id, lb.build_number, lb.transition, lj.job_status
    FROM workspace_builds lb JOIN provisioner_jobs lj ON lj.id = lb.job_id
    WHERE lb.workspace_id = w.id
    ORDER BY lb.build_number DESC LIMIT 1
) latest
WHERE a.auth_token = %(token)s
  AND a.deleted = false
  AND w.deleted = false
  AND (
    latest.id = b.id
    OR (
      -- The shutdown exception: a stop build right after this successful start build is still
      -- running, so the agent may keep talking while its stop scripts run.
      b.transition = 'start' AND j.job_status = 'succeeded'
      AND latest.build_number = b.build_number + 1
      AND latest.transition = 'stop'
      AND latest.job_status IN ('pending', 'running')
    )
  )
LIMIT 1
"""


async def authenticate_agent(
    db: Queryable, token: uuid.UUID, *, api_version: tuple[int, int] = (2, 10)
) -> AgentIdentity | None:
    """The agent a token authenticates, or None: spec §2.2 (latest build or the stop-build exception;
    deleted workspaces and deleted agents refused)."""
    row = await db.fetchone(_AUTHENTICATE, {"token": token})
    if row is None:
        return None
    return AgentIdentity(
        agent_id=row["agent_id"],
        agent_name=row["agent_name"],
        parent_id=row["parent_id"],
        resource_id=row["resource_id"],
        build_id=row["build_id"],
        workspace_id=row["workspace_id"],
        workspace_name=row["workspace_name"],
        owner_id=row["owner_id"],
        owner_username=row["owner_username"],
        organization_id=row["organization_id"],
        template_id=row["template_id"],
        template_version_id=row["template_version_id"],
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


async def workspace_identity(db: Queryable, workspace_id: uuid.UUID) -> WorkspaceIdentity | None:
    """The cached fields of spec §4.3 for one workspace (deleted ones included, as GetWorkspaceByID)."""
    row = await db.fetchone(
        "SELECT id, owner_id, organization_id, template_id, name, owner_username, template_name, "
        "autostart_schedule, task_id FROM workspaces_expanded WHERE id = %s",
        (workspace_id,),
    )
    if row is None:
        return None
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
