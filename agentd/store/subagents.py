"""Queries of the sub-agent API (spec §7.14-7.16): child agents of a parent agent and their apps.

Coder's names, for grepping: InsertWorkspaceAgent, UpdateWorkspaceAgentDisplayAppsByID,
UpdateWorkspaceAgentDirectoryByID, GetWorkspaceAgentsByParentID, DeleteWorkspaceSubAgentByID,
UpsertWorkspaceApp, GetTemplateByID (max port sharing level).

Every statement that touches a child is scoped by ``parent_id`` so one agent can never reach another
agent's children, whatever id it sends.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import attrs

from agentd.store.agents import token_digest
from agentd.store.db import Database, Transaction

__all__ = [
    "AppUpsert",
    "NewSubAgent",
    "SubAgent",
    "delete_child",
    "insert_child",
    "list_children",
    "reissue_child_token",
    "template_max_port_sharing_level",
    "update_child_directory",
    "update_child_display_apps",
    "upsert_app",
]

Queryable = Database | Transaction


@attrs.frozen
class SubAgent:
    """What the API returns about a child: ``{name, id, auth_token}``. The token is only known when
    it was just issued (tokens are stored hashed): None otherwise."""

    id: uuid.UUID
    name: str
    auth_token: uuid.UUID | None


@attrs.frozen
class NewSubAgent:
    """A child to insert; the rest of the row is copied from the parent (spec §7.14 step 5)."""

    id: uuid.UUID
    parent_id: uuid.UUID
    name: str
    auth_token: uuid.UUID
    architecture: str
    operating_system: str
    directory: str
    display_apps: Sequence[str]
    created_at: dt.datetime


async def insert_child(db: Queryable, child: NewSubAgent) -> SubAgent | None:
    """Insert the child under its parent (resource, connection timeout, troubleshooting URL and API key
    scope copied from the parent row). None when the parent row does not exist. A name already used by a
    live agent of the same build raises `agentd.store.errors.UniqueViolation` (schema trigger)."""
    row = await db.fetchone(
        "INSERT INTO workspace_agents (id, parent_id, created_at, updated_at, name, resource_id,"
        " auth_token_hash, auth_instance_id, architecture, environment_variables, operating_system,"
        " directory,"
        " instance_metadata, resource_metadata, connection_timeout_seconds, troubleshooting_url, motd_file,"
        " display_apps, display_order, api_key_scope)"
        " SELECT %(id)s, p.id, %(now)s, %(now)s, %(name)s, p.resource_id, %(token_hash)s, NULL,"
        " %(arch)s, NULL, %(os)s, %(directory)s, NULL, NULL, p.connection_timeout_seconds,"
        " p.troubleshooting_url, '',"
        " %(display_apps)s::text[]::display_app[], 0, p.api_key_scope"
        " FROM workspace_agents p WHERE p.id = %(parent)s"
        " RETURNING id, name",
        {
            "id": child.id,
            "parent": child.parent_id,
            "now": child.created_at,
            "name": child.name,
            "token_hash": token_digest(child.auth_token),
            "arch": child.architecture,
            "os": child.operating_system,
            "directory": child.directory,
            "display_apps": list(child.display_apps),
        },
    )
    if row is None:
        return None
    return SubAgent(id=row["id"], name=row["name"], auth_token=child.auth_token)


async def update_child_display_apps(
    db: Queryable, parent_id: uuid.UUID, child_id: uuid.UUID, display_apps: Sequence[str], now: dt.datetime
) -> int:
    """UpdateWorkspaceAgentDisplayAppsByID, only for a child of ``parent_id``; the rowcount."""
    return await db.execute(
        "UPDATE workspace_agents SET display_apps = %s::text[]::display_app[], updated_at = %s"
        " WHERE id = %s AND parent_id = %s",
        [list(display_apps), now, child_id, parent_id],
    )


async def update_child_directory(
    db: Queryable, parent_id: uuid.UUID, child_id: uuid.UUID, directory: str, now: dt.datetime
) -> int:
    """UpdateWorkspaceAgentDirectoryByID, only for a child of ``parent_id``; the rowcount."""
    return await db.execute(
        "UPDATE workspace_agents SET directory = %s, updated_at = %s WHERE id = %s AND parent_id = %s",
        [directory, now, child_id, parent_id],
    )


async def list_children(db: Queryable, parent_id: uuid.UUID) -> list[SubAgent]:
    """GetWorkspaceAgentsByParentID: the parent's non-deleted children (ordered by creation for
    stable output; the API promises no order)."""
    rows = await db.fetchall(
        "SELECT id, name FROM workspace_agents WHERE parent_id = %s AND deleted = false"
        " ORDER BY created_at, id",
        [parent_id],
    )
    return [SubAgent(id=r["id"], name=r["name"], auth_token=None) for r in rows]


async def reissue_child_token(db: Queryable, parent_id: uuid.UUID, child_id: uuid.UUID) -> uuid.UUID | None:
    """A fresh token for a child of ``parent_id`` (its digest replaces the old one, which stops
    working); None if it is not such a child. Tokens are stored hashed, so a pre-created child's
    token cannot be handed out again: it is replaced instead."""
    token = uuid.uuid4()
    changed = await db.execute(
        "UPDATE workspace_agents SET auth_token_hash = %s WHERE id = %s AND parent_id = %s",
        [token_digest(token), child_id, parent_id],
    )
    return token if changed else None


async def delete_child(db: Database, parent_id: uuid.UUID, child_id: uuid.UUID) -> bool:
    """DeleteWorkspaceSubAgentByID scoped to this parent: soft-delete the child if it is a live child of
    ``parent_id`` and drop its context snapshot and resources; apps are kept. False (and nothing
    changed) for any other id — a non-child, another parent's child, an already deleted child."""
    async with db.transaction() as tx:
        deleted = await tx.fetchval(
            "UPDATE workspace_agents SET deleted = true"
            " WHERE id = %s AND parent_id = %s AND parent_id IS NOT NULL AND deleted = false RETURNING id",
            [child_id, parent_id],
        )
        if deleted is None:
            return False
        await tx.execute(
            "DELETE FROM workspace_agent_context_resources WHERE workspace_agent_id = %s", [child_id]
        )
        await tx.execute(
            "DELETE FROM workspace_agent_context_snapshots WHERE workspace_agent_id = %s", [child_id]
        )
    return True


async def template_max_port_sharing_level(db: Queryable, workspace_id: uuid.UUID) -> str | None:
    """The template policy that caps app sharing levels (None: workspace or template not found)."""
    value = await db.fetchval(
        "SELECT t.max_port_sharing_level::text FROM workspaces w JOIN templates t ON t.id = w.template_id"
        " WHERE w.id = %s",
        [workspace_id],
    )
    return None if value is None else str(value)


@attrs.frozen
class AppUpsert:
    """One ``workspace_apps`` row as CreateSubAgent writes it."""

    id: uuid.UUID
    created_at: dt.datetime
    agent_id: uuid.UUID
    slug: str
    display_name: str
    icon: str
    command: str | None
    url: str | None
    external: bool
    subdomain: bool
    sharing_level: str
    healthcheck_url: str
    healthcheck_interval: int
    healthcheck_threshold: int
    health: str
    display_order: int
    hidden: bool
    open_in: str
    display_group: str | None
    tooltip: str = ""


# The workspace an agent belongs to: agent → resource → build (by provisioner job) → workspace.
_AGENT_WORKSPACE = (
    "SELECT b.workspace_id FROM workspace_agents a"
    " JOIN workspace_resources r ON r.id = a.resource_id"
    " JOIN workspace_builds b ON b.job_id = r.job_id WHERE a.id = {agent}"
)


async def upsert_app(db: Queryable, app: AppUpsert) -> bool:
    """UpsertWorkspaceApp: insert, or update the app with this id — but only if the existing app's agent
    belongs to no workspace or to the new agent's workspace (the rebind guard: an app of one workspace never
    moves to an agent of another workspace, or of none). False when the guard refused."""
    guard_old = _AGENT_WORKSPACE.format(agent="workspace_apps.agent_id")
    guard_new = _AGENT_WORKSPACE.format(agent="EXCLUDED.agent_id")
    row = await db.fetchval(
        "INSERT INTO workspace_apps (id, created_at, agent_id, slug, display_name, icon, command, url,"
        " external, subdomain, sharing_level, healthcheck_url, healthcheck_interval, healthcheck_threshold,"
        " health, display_order, hidden, open_in, display_group, tooltip)"
        " VALUES (%(id)s, %(created_at)s, %(agent_id)s, %(slug)s, %(display_name)s, %(icon)s, %(command)s,"
        " %(url)s, %(external)s, %(subdomain)s, %(sharing_level)s::app_sharing_level, %(healthcheck_url)s,"
        " %(healthcheck_interval)s, %(healthcheck_threshold)s, %(health)s::workspace_app_health,"
        " %(display_order)s, %(hidden)s, %(open_in)s::workspace_app_open_in, %(display_group)s, %(tooltip)s)"
        " ON CONFLICT (id) DO UPDATE SET agent_id = EXCLUDED.agent_id, slug = EXCLUDED.slug,"
        " display_name = EXCLUDED.display_name, icon = EXCLUDED.icon, command = EXCLUDED.command,"
        " url = EXCLUDED.url, external = EXCLUDED.external, subdomain = EXCLUDED.subdomain,"
        " sharing_level = EXCLUDED.sharing_level, healthcheck_url = EXCLUDED.healthcheck_url,"
        " healthcheck_interval = EXCLUDED.healthcheck_interval,"
        " healthcheck_threshold = EXCLUDED.healthcheck_threshold, health = EXCLUDED.health,"
        " display_order = EXCLUDED.display_order, hidden = EXCLUDED.hidden, open_in = EXCLUDED.open_in,"
        " display_group = EXCLUDED.display_group, tooltip = EXCLUDED.tooltip"
        f" WHERE ({guard_old}) IS NULL OR ({guard_old}) = ({guard_new})"
        " RETURNING id",
        attrs.asdict(app),
    )
    return row is not None
