"""Seeding and scope helpers for the boundary / resources / connections / context service tests."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import attrs

from agentd.admin import create_workspace, validate_workspace_spec
from agentd.components import Components
from agentd.model import AgentIdentity, WorkspaceIdentity
from agentd.services.base import ConnectionScope, Settings, WorkspaceCache
from agentd.store import Database
from agentd.store.sessions import authenticate_agent

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


async def seed(
    db: Database,
    *,
    agent_name: str = "main",
    memory_monitor: dict[str, Any] | None = None,
    volume_monitors: list[dict[str, Any]] | None = None,
) -> tuple[AgentIdentity, uuid.UUID]:
    """A workspace of a fresh owner with one agent, through ``agentd admin create-workspace``'s code;
    returns the identity the token authenticates (the real query of spec §2.2) and the token."""
    tag = uuid.uuid4().hex[:10]
    agent: dict[str, Any] = {"name": agent_name}
    monitoring: dict[str, Any] = {}
    if memory_monitor is not None:
        monitoring["memory"] = memory_monitor
    if volume_monitors is not None:
        monitoring["volumes"] = volume_monitors
    if monitoring:
        agent["resources_monitoring"] = monitoring
    spec = validate_workspace_spec(
        {
            "name": "dev",
            "owner": {"username": f"u-{tag}", "email": f"{tag}@example.com"},
            "organization": {"name": "acme"},
            "template": {"name": "docker", "version": "v1"},
            "resource": {"name": "dev", "type": "docker_container"},
            "agents": [agent],
        }
    )
    created = await create_workspace(db, spec)
    token = created.agents[0].token
    ident = await authenticate_agent(db, token)
    assert ident is not None
    return ident, token


async def seed_agent(db: Database, *, agent_name: str = "main") -> AgentIdentity:
    """One workspace with one build, resource and agent; returns the agent's identity."""
    ident, _ = await seed(db, agent_name=agent_name)
    return ident


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
