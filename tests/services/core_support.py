"""Seeding and scope helpers for the manifest / lifecycle / startup / logs service tests.

Workspaces come from `agentd.admin` (the same code `agentd admin create-workspace` runs); the identity
of each agent is read back from the rows, as the handshake does. Events go through the store's real
`PubSub`; tests subscribe to the channels they expect (`listen`) and `drain` them afterwards: a marker is
published on every channel and everything received before it is what the call published.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import attrs
import trio

from agentd.admin import CreatedWorkspace, WorkspaceSpec, create_workspace, validate_workspace_spec
from agentd.components import Components
from agentd.model import AgentIdentity
from agentd.services.base import ConnectionScope, Settings, WorkspaceCache
from agentd.services.events import Events
from agentd.store import Database
from agentd.store import db as db_module
from agentd.store.errors import StoreError
from agentd.store.pubsub import MISSED, PubSub, Subscription
from agentd.testing import TestAgent, serve_agent
from tests.services.audit_support import T0 as T0  # re-exported for the core services' tests
from tests.services.audit_support import FakeNow


@attrs.define
class Listener:
    """Open subscriptions on some channels; `drain` returns what arrived on each."""

    pubsub: PubSub
    subs: dict[str, Subscription]

    async def drain(self) -> dict[str, list[Any]]:
        """Every decoded payload received per channel since the last drain (channels with none omitted)."""
        marker = f"drain-{uuid.uuid4()}"
        got: dict[str, list[Any]] = {}
        for channel, sub in self.subs.items():
            await self.pubsub.publish(channel, marker)
            with trio.fail_after(10):
                async for item in sub:
                    assert item is not MISSED, f"missed messages on {channel}"
                    assert isinstance(item, str)
                    if item == marker:
                        break
                    got.setdefault(channel, []).append(json.loads(item))
        return got


@asynccontextmanager
async def listen(pubsub: PubSub, *channels: str) -> AsyncIterator[Listener]:
    """Subscribe to ``channels`` (LISTEN active on entry)."""
    async with AsyncExitStack() as stack:
        subs = {ch: await stack.enter_async_context(pubsub.subscribe(ch)) for ch in channels}
        yield Listener(pubsub, subs)


def owner_channel(ident: AgentIdentity) -> str:
    return f"workspace_owner:{ident.owner_id}"


def logs_channel(ident: AgentIdentity) -> str:
    return f"agent-logs:{ident.agent_id}"


def workspace_event(ident: AgentIdentity, kind: str) -> dict[str, str]:
    return {"kind": kind, "workspace_id": str(ident.workspace_id), "agent_id": str(ident.agent_id)}


def workspace_spec(**agent_fields: Any) -> WorkspaceSpec:
    """A validated create-workspace spec with agents "main" (with ``agent_fields``) and "other"."""
    main = {"name": "main", "directory": "/home/coder", **agent_fields}
    return validate_workspace_spec(
        {
            "name": "dev",
            "owner": {"username": "alice", "email": "alice@example.com"},
            "agents": [main, {"name": "other"}],
        }
    )


async def identity(
    db: Database, agent_id: uuid.UUID, api_version: tuple[int, int] = (2, 10)
) -> AgentIdentity:
    """The agent's identity as the handshake derives it from the rows."""
    row = await db.fetchone(
        "SELECT a.id, a.name, a.parent_id, a.resource_id, b.id AS build_id, w.id AS workspace_id,"
        " w.name AS workspace_name, w.owner_id, w.owner_username, w.organization_id, w.template_id,"
        " b.template_version_id"
        " FROM workspace_agents a"
        " JOIN workspace_resources r ON r.id = a.resource_id"
        " JOIN workspace_builds b ON b.job_id = r.job_id"
        " JOIN workspaces_expanded w ON w.id = b.workspace_id"
        " WHERE a.id = %s",
        [agent_id],
    )
    assert row is not None
    return AgentIdentity(
        agent_id=row["id"],
        agent_name=row["name"],
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
class Seeded:
    workspace: CreatedWorkspace
    main: AgentIdentity
    other: AgentIdentity


async def seed(db: Database, spec: WorkspaceSpec | None = None) -> Seeded:
    """Create the workspace of ``spec`` (default `workspace_spec()`) and return its agents' identities."""
    created = await create_workspace(db, spec if spec is not None else workspace_spec())
    by_name = {a.name: a.id for a in created.agents}
    return Seeded(
        workspace=created,
        main=await identity(db, by_name["main"]),
        other=await identity(db, by_name["other"]),
    )


def make_scope(
    db: Database,
    ident: AgentIdentity,
    *,
    pubsub: Any = None,
    settings: Settings | None = None,
    components: Components | None = None,
    now: FakeNow | None = None,
) -> ConnectionScope:
    return ConnectionScope(
        ident=ident,
        db=db,
        events=Events(pubsub if pubsub is not None else PubSub(db)),
        cache=WorkspaceCache(None),
        settings=settings if settings is not None else Settings(),
        components=components if components is not None else Components(),
        now=now if now is not None else FakeNow(),
    )


async def connect(nursery: trio.Nursery, db: Database, token: uuid.UUID, **options: Any) -> TestAgent:
    """Serve one agent connection in-process through agentd.testing (all composed services)."""
    agent: TestAgent = await nursery.start(functools.partial(serve_agent, db, token, **options))
    return agent


def token_of(seeded: Seeded, name: str = "main") -> uuid.UUID:
    return next(a.token for a in seeded.workspace.agents if a.name == name)


async def inject_failure(db: Database, table: str, event: str, when: str = "true") -> None:
    """Make PostgreSQL itself reject ``event`` (e.g. "INSERT", "UPDATE OF logs_overflowed") on ``table``
    for rows matching ``when`` (over NEW): the store then raises what a real failure raises."""
    name = f"inject_{uuid.uuid4().hex[:8]}"
    await db.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'injected failure'; END; $$"
    )
    await db.execute(
        f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW WHEN ({when})"
        f" EXECUTE FUNCTION {name}()"
    )


@attrs.define
class FailingPublisher:
    """A publisher whose every publish fails the way a lost database connection does."""

    async def publish(self, channel: str, payload: str | bytes) -> None:
        await trio.lowlevel.checkpoint()
        raise StoreError("connection lost")


@contextmanager
def round_trips() -> Iterator[list[int]]:
    """Count the database round trips (store calls reaching PostgreSQL) made inside the block, by
    wrapping the store's busy watcher: each sequential store call flips it on once."""
    previous = db_module._busy_watcher
    count = [0]

    def watch(busy: bool) -> None:
        if busy:
            count[0] += 1
        if previous is not None:
            previous(busy)

    db_module.set_busy_watcher(watch)
    try:
        yield count
    finally:
        db_module.set_busy_watcher(previous)
