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
from agentd.store.agents import get_agent_by_token
from agentd.store.db import Database, Transaction

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
