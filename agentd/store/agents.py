"""Typed queries for workspace agents, their builds and workspaces (spec/agent-api.md §2.2, §4)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any

import attrs
from psycopg import sql as pgsql

from agentd.store.db import Database, Transaction
from agentd.store.records import as_tuple, from_row, select_list

__all__ = [
    "AUTHORIZED_AGENT",
    "PREBUILDS_SYSTEM_USER_ID",
    "AuthenticatedAgent",
    "Workspace",
    "WorkspaceAgent",
    "WorkspaceBuild",
    "get_agent_by_id",
    "get_agent_by_token",
    "token_digest",
    "token_matches",
    "token_param",
]

# Owner of prebuilt workspaces (spec §4.4).
PREBUILDS_SYSTEM_USER_ID = uuid.UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")


@attrs.frozen
class WorkspaceAgent:
    """A ``workspace_agents`` row. Enum columns are their string labels."""

    id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    name: str
    first_connected_at: datetime | None
    last_connected_at: datetime | None
    disconnected_at: datetime | None
    resource_id: uuid.UUID
    auth_instance_id: str | None
    architecture: str
    environment_variables: dict[str, Any] | None
    operating_system: str
    instance_metadata: Any
    resource_metadata: Any
    directory: str
    version: str
    last_connected_replica_id: uuid.UUID | None
    connection_timeout_seconds: int
    troubleshooting_url: str
    motd_file: str
    lifecycle_state: str
    expanded_directory: str
    logs_length: int
    logs_overflowed: bool
    started_at: datetime | None
    ready_at: datetime | None
    subsystems: tuple[str, ...] = attrs.field(converter=as_tuple)
    display_apps: tuple[str, ...] = attrs.field(converter=as_tuple)
    api_version: str
    display_order: int
    parent_id: uuid.UUID | None
    api_key_scope: str
    deleted: bool
    #: SHA-256 of the token (`token_digest`); the token itself is not stored
    auth_token_hash: bytes


@attrs.frozen
class WorkspaceBuild:
    """A ``workspace_build_with_user`` row (a build plus its initiator's names)."""

    id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    workspace_id: uuid.UUID
    template_version_id: uuid.UUID
    build_number: int
    transition: str
    initiator_id: uuid.UUID
    job_id: uuid.UUID
    deadline: datetime
    reason: str
    daily_cost: int
    max_deadline: datetime
    template_version_preset_id: uuid.UUID | None
    has_ai_task: bool | None
    has_external_agent: bool | None
    initiator_by_username: str
    initiator_by_name: str


@attrs.frozen
class Workspace:
    """A ``workspaces`` row (ACLs are not cached, spec §4.3, so they are left out)."""

    id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    owner_id: uuid.UUID
    organization_id: uuid.UUID
    template_id: uuid.UUID
    deleted: bool
    name: str
    autostart_schedule: str | None
    ttl: int | None
    last_used_at: datetime
    dormant_at: datetime | None
    deleting_at: datetime | None
    automatic_updates: str
    favorite: bool
    next_start_at: datetime | None

    @property
    def is_prebuild(self) -> bool:
        """Owned by the prebuilds system user (spec §4.4)."""
        return self.owner_id == PREBUILDS_SYSTEM_USER_ID


@attrs.frozen
class AuthenticatedAgent:
    """What a valid agent token resolves to (spec §2.2)."""

    agent: WorkspaceAgent
    build: WorkspaceBuild
    workspace: Workspace
    task_id: uuid.UUID | None
    owner_username: str = ""


def token_matches(column: str = "a.auth_token_hash") -> pgsql.Composable:
    """The one place a presented agent token is compared with the stored one (``%(token)s``).

    Storing a digest at rest changes only this condition and :func:`token_param`.
    """
    return pgsql.SQL("{} = %(token)s").format(pgsql.SQL(column))


def token_param(token: uuid.UUID) -> bytes:
    """The value bound to ``%(token)s`` in :func:`token_matches`: the token's digest (tokens are stored
    hashed; see :func:`token_digest`)."""
    return token_digest(token)


#: Spec §2.2's authorisation of agent ``a`` (build ``b``, workspace ``w``): live workspace and agent,
#: and the agent's build is the latest, or the start build right before an in-progress stop.
AUTHORIZED_AGENT = pgsql.SQL(
    """
  w.deleted = false
  AND a.deleted = false
  AND (
    -- The agent belongs to the workspace's latest build …
    b.build_number = (SELECT max(build_number) FROM workspace_builds WHERE workspace_id = w.id)
    -- … or to a succeeded start build directly followed by the latest build, a stop whose job is
    -- still pending or running (so shutdown scripts can keep reporting).
    OR (
      b.transition = 'start'
      AND EXISTS (SELECT 1 FROM provisioner_jobs j WHERE j.id = b.job_id AND j.job_status = 'succeeded')
      AND EXISTS (
        SELECT 1
        FROM workspace_builds nb
        JOIN provisioner_jobs nj ON nj.id = nb.job_id
        WHERE nb.workspace_id = w.id
          AND nb.build_number = b.build_number + 1
          AND nb.build_number = (SELECT max(build_number) FROM workspace_builds WHERE workspace_id = w.id)
          AND nb.transition = 'stop'
          AND nj.job_status IN ('pending', 'running')
      )
    )
  )
"""
)

_AGENT_BY_TOKEN = pgsql.SQL(
    """
SELECT {agent}, {build}, {workspace}, tasks.id AS task_id, owner.username AS owner_username
FROM workspace_agents a
JOIN workspace_resources r ON r.id = a.resource_id
JOIN workspace_build_with_user b ON b.job_id = r.job_id
JOIN workspaces w ON w.id = b.workspace_id
JOIN users owner ON owner.id = w.owner_id
LEFT JOIN tasks ON tasks.workspace_id = w.id
WHERE {token_matches} AND {authorized}
"""
).format(
    agent=select_list(WorkspaceAgent, "a", "agent__"),
    build=select_list(WorkspaceBuild, "b", "build__"),
    workspace=select_list(Workspace, "w", "workspace__"),
    token_matches=token_matches(),
    authorized=AUTHORIZED_AGENT,
)

_AGENT_BY_ID = pgsql.SQL("SELECT {agent} FROM workspace_agents a WHERE a.id = %s").format(
    agent=select_list(WorkspaceAgent, "a")
)


def token_digest(token: uuid.UUID) -> bytes:
    """What ``workspace_agents.auth_token_hash`` holds for ``token``: SHA-256 of its 16 bytes (tokens
    are random UUIDs, so no salt or slow hash is needed; migration 0003 computes the same in SQL)."""
    return hashlib.sha256(token.bytes).digest()


async def get_agent_by_token(db: Database | Transaction, token: uuid.UUID) -> AuthenticatedAgent | None:
    """Resolve an agent token (``GetAuthenticatedWorkspaceAgentAndBuildByAuthToken``).

    None when no live agent of a live workspace has this token, or when its build is neither the
    latest nor the start build preceding an in-progress stop. The presented token is hashed and
    matched by digest equality in the (indexed) WHERE clause: no token comparison happens in Python.
    """
    row = await db.fetchone(_AGENT_BY_TOKEN, {"token": token_param(token)})
    if row is None:
        return None
    return AuthenticatedAgent(
        agent=from_row(WorkspaceAgent, row, "agent__"),
        build=from_row(WorkspaceBuild, row, "build__"),
        workspace=from_row(Workspace, row, "workspace__"),
        task_id=row["task_id"],
        owner_username=row["owner_username"],
    )


async def get_agent_by_id(db: Database | Transaction, agent_id: uuid.UUID) -> WorkspaceAgent | None:
    """The agent row by id, deleted or not (the per-call fresh read, spec §4.1 "AgentFn")."""
    row = await db.fetchone(_AGENT_BY_ID, [agent_id])
    return None if row is None else from_row(WorkspaceAgent, row)
