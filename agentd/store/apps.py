"""Queries of the apps API (spec §7.7 BatchUpdateAppHealths, §7.18 UpdateAppStatus).

Coder's names, for grepping: GetWorkspaceAppsByAgentID, UpdateWorkspaceAppHealthByID,
GetWorkspaceAppByAgentIDAndSlug, GetLatestWorkspaceAppStatusByAppID, InsertWorkspaceAppStatus,
GetTaskByID (+ the task's app of the latest build).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import attrs

from agentd.store.db import Database, Transaction

__all__ = [
    "AppHealth",
    "AppStatus",
    "TaskApp",
    "WorkspaceApp",
    "app_by_slug",
    "apps_by_agent",
    "insert_app_status",
    "latest_app_status",
    "task_of_workspace",
    "update_app_healths",
]

Queryable = Database | Transaction


@attrs.frozen
class WorkspaceApp:
    """The columns of a ``workspace_apps`` row these APIs look at."""

    id: uuid.UUID
    agent_id: uuid.UUID
    slug: str
    healthcheck_url: str
    health: str


_APP_COLUMNS = "id, agent_id, slug, healthcheck_url, health::text AS health"


def _app(row: dict[str, object]) -> WorkspaceApp:
    return WorkspaceApp(
        id=row["id"],  # type: ignore[arg-type]
        agent_id=row["agent_id"],  # type: ignore[arg-type]
        slug=str(row["slug"]),
        healthcheck_url=str(row["healthcheck_url"]),
        health=str(row["health"]),
    )


async def apps_by_agent(db: Queryable, agent_id: uuid.UUID) -> list[WorkspaceApp]:
    """GetWorkspaceAppsByAgentID."""
    rows = await db.fetchall(
        f"SELECT {_APP_COLUMNS} FROM workspace_apps WHERE agent_id = %s ORDER BY slug", [agent_id]
    )
    return [_app(r) for r in rows]


async def app_by_slug(db: Queryable, agent_id: uuid.UUID, slug: str) -> WorkspaceApp | None:
    """GetWorkspaceAppByAgentIDAndSlug."""
    row = await db.fetchone(
        f"SELECT {_APP_COLUMNS} FROM workspace_apps WHERE agent_id = %s AND slug = %s", [agent_id, slug]
    )
    return None if row is None else _app(row)


@attrs.frozen
class AppHealth:
    """A health change of one app."""

    app_id: uuid.UUID
    health: str


async def update_app_healths(db: Queryable, agent_id: uuid.UUID, changes: Sequence[AppHealth]) -> int:
    """UpdateWorkspaceAppHealthByID for many apps in one statement, limited to ``agent_id``'s apps;
    returns the number of rows written."""
    if not changes:
        return 0
    return await db.execute(
        "UPDATE workspace_apps AS a SET health = c.health::workspace_app_health"
        " FROM unnest(%s::uuid[], %s::text[]) AS c(id, health)"
        " WHERE a.id = c.id AND a.agent_id = %s",
        [[c.app_id for c in changes], [c.health for c in changes], agent_id],
    )


@attrs.frozen
class AppStatus:
    """A ``workspace_app_statuses`` row."""

    id: uuid.UUID
    created_at: dt.datetime
    workspace_id: uuid.UUID
    agent_id: uuid.UUID
    app_id: uuid.UUID
    state: str
    message: str
    uri: str | None


async def latest_app_status(db: Queryable, app_id: uuid.UUID) -> AppStatus | None:
    """GetLatestWorkspaceAppStatusByAppID (None: the app never reported a status)."""
    row = await db.fetchone(
        "SELECT id, created_at, workspace_id, agent_id, app_id, state::text AS state, message, uri"
        " FROM workspace_app_statuses WHERE app_id = %s ORDER BY created_at DESC, id LIMIT 1",
        [app_id],
    )
    return None if row is None else AppStatus(**row)


async def insert_app_status(db: Queryable, status: AppStatus) -> None:
    """InsertWorkspaceAppStatus."""
    await db.execute(
        "INSERT INTO workspace_app_statuses (id, created_at, workspace_id, agent_id, app_id, state, message,"
        " uri) VALUES (%s, %s, %s, %s, %s, %s::workspace_app_status_state, %s, %s)",
        [
            status.id,
            status.created_at,
            status.workspace_id,
            status.agent_id,
            status.app_id,
            status.state,
            status.message,
            status.uri,
        ],
    )


@attrs.frozen
class TaskApp:
    """The (non-deleted) task of a workspace and the app its latest build marks as the task's app."""

    task_id: uuid.UUID
    name: str
    app_id: uuid.UUID | None


async def task_of_workspace(db: Queryable, workspace_id: uuid.UUID) -> TaskApp | None:
    """The workspace's task (None: the workspace has no task)."""
    row = await db.fetchone(
        "SELECT t.id, t.name, ("
        "   SELECT twa.workspace_app_id FROM task_workspace_apps twa WHERE twa.task_id = t.id"
        "   ORDER BY twa.workspace_build_number DESC LIMIT 1"
        " ) AS app_id"
        " FROM tasks t WHERE t.workspace_id = %s AND t.deleted_at IS NULL",
        [workspace_id],
    )
    if row is None:
        return None
    return TaskApp(task_id=row["id"], name=row["name"], app_id=row["app_id"])
