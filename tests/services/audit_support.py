"""Seeding and scope helpers for the boundary / resources / connections / context service tests.

Hand-written inserts of the minimal rows an agent needs (organization, user, template, version, job,
workspace, build, resource, agent) until agentd.admin's create-workspace seeding is on main.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import attrs

from agentd.components import Components
from agentd.services.base import (
    AgentIdentity,
    ConnectionScope,
    Settings,
    WorkspaceCache,
    WorkspaceIdentity,
)
from agentd.store import Database

T0 = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)


@attrs.define
class FakeNow:
    """A settable wall clock for ``scope.now`` (timestamps written to rows)."""

    value: dt.datetime = T0

    def __call__(self) -> dt.datetime:
        return self.value

    def advance(self, **kw: float) -> dt.datetime:
        self.value += dt.timedelta(**kw)
        return self.value


async def seed_org_user(db: Database, username: str = "alice") -> tuple[uuid.UUID, uuid.UUID]:
    org, user = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        "INSERT INTO organizations (id, name, created_at, updated_at) VALUES (%s, %s, now(), now())",
        [org, f"org-{org.hex[:8]}"],
    )
    await db.execute(
        "INSERT INTO users (id, email, username, created_at, updated_at) VALUES (%s, %s, %s, now(), now())",
        [user, f"{username}-{user.hex[:6]}@example.com", f"{username}-{user.hex[:6]}"],
    )
    return org, user


async def seed_agent(
    db: Database,
    *,
    org: uuid.UUID | None = None,
    owner: uuid.UUID | None = None,
    workspace_name: str = "dev",
    agent_name: str = "main",
) -> AgentIdentity:
    """One workspace with one build, resource and agent; returns the agent's identity."""
    if org is None or owner is None:
        org, owner = await seed_org_user(db)
    template, version, job, ws, build, resource, agent = (uuid.uuid4() for _ in range(7))
    await db.execute(
        "INSERT INTO templates (id, created_at, updated_at, organization_id, name, active_version_id,"
        " created_by) VALUES (%s, now(), now(), %s, %s, %s, %s)",
        [template, org, f"tpl-{template.hex[:8]}", version, owner],
    )
    await db.execute(
        "INSERT INTO provisioner_jobs (id, created_at, updated_at, organization_id, initiator_id, type)"
        " VALUES (%s, now(), now(), %s, %s, 'workspace_build')",
        [job, org, owner],
    )
    await db.execute(
        "INSERT INTO template_versions (id, template_id, organization_id, created_at, updated_at, name,"
        " job_id, created_by) VALUES (%s, %s, %s, now(), now(), 'v1', %s, %s)",
        [version, template, org, job, owner],
    )
    await db.execute(
        "INSERT INTO workspaces (id, created_at, updated_at, owner_id, organization_id, template_id, name)"
        " VALUES (%s, now(), now(), %s, %s, %s, %s)",
        [ws, owner, org, template, f"{workspace_name}-{ws.hex[:6]}"],
    )
    await db.execute(
        "INSERT INTO workspace_builds (id, created_at, updated_at, workspace_id, template_version_id,"
        " build_number, transition, initiator_id, job_id)"
        " VALUES (%s, now(), now(), %s, %s, 1, 'start', %s, %s)",
        [build, ws, version, owner, job],
    )
    await db.execute(
        "INSERT INTO workspace_resources (id, created_at, job_id, transition, type, name)"
        " VALUES (%s, now(), %s, 'start', 'docker_container', 'dev')",
        [resource, job],
    )
    await db.execute(
        "INSERT INTO workspace_agents (id, created_at, updated_at, name, resource_id, auth_token,"
        " architecture, operating_system) VALUES (%s, now(), now(), %s, %s, %s, 'amd64', 'linux')",
        [agent, agent_name, resource, uuid.uuid4()],
    )
    row = await db.fetchone("SELECT name FROM workspaces WHERE id = %s", [ws])
    assert row is not None
    username = await db.fetchval("SELECT username FROM users WHERE id = %s", [owner])
    return AgentIdentity(
        agent_id=agent,
        agent_name=agent_name,
        parent_id=None,
        resource_id=resource,
        build_id=build,
        workspace_id=ws,
        workspace_name=row["name"],
        owner_id=owner,
        owner_username=username,
        organization_id=org,
        template_id=template,
        template_version_id=version,
    )


def workspace_identity(ident: AgentIdentity) -> WorkspaceIdentity:
    return WorkspaceIdentity(
        id=ident.workspace_id,
        owner_id=ident.owner_id,
        organization_id=ident.organization_id,
        template_id=ident.template_id,
        name=ident.workspace_name,
        owner_username=ident.owner_username,
        template_name="tpl",
    )


def make_scope(
    db: Database | None,
    ident: AgentIdentity,
    *,
    components: Components | None = None,
    now: Any = None,
    cached: bool = True,
) -> ConnectionScope:
    return ConnectionScope(
        ident=ident,
        db=db,
        events=None,
        cache=WorkspaceCache(workspace_identity(ident) if cached else None),
        settings=Settings(),
        components=components if components is not None else Components(),
        now=now if now is not None else FakeNow(),
    )
