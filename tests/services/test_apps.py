"""BatchUpdateAppHealths (spec §7.7): fail-fast validation texts, only changed apps written, one
``app_health`` event per batch that changed something."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from agentd.admin import create_workspace, validate_workspace_spec
from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services import apps
from agentd.services.events import Events
from agentd.store import MISSED, Database, PubSub, Subscription
from agentd.store.sessions import authenticate_agent
from agentd.testing import serve_agent
from tests.services.audit_support import make_scope

Health = agent_pb2.AppHealth
Update = agent_pb2.BatchUpdateAppHealthRequest.HealthUpdate
Request = agent_pb2.BatchUpdateAppHealthRequest


@attrs.frozen
class Seeded:
    ident: AgentIdentity
    token: uuid.UUID
    app_ids: dict[str, uuid.UUID]


async def seed_apps(db: Database) -> Seeded:
    """One agent with a health-checked app ("web"), another ("api") and one without healthcheck ("term")."""
    tag = uuid.uuid4().hex[:10]
    spec = validate_workspace_spec(
        {
            "name": "dev",
            "owner": {"username": f"u-{tag}", "email": f"{tag}@example.com"},
            "agents": [
                {
                    "name": "main",
                    "apps": [
                        {
                            "slug": "web",
                            "url": "http://localhost:8080",
                            "healthcheck": {"url": "http://localhost:8080/h"},
                        },
                        {
                            "slug": "api",
                            "url": "http://localhost:9090",
                            "healthcheck": {"url": "http://localhost:9090/h"},
                        },
                        {"slug": "term", "command": "bash"},
                    ],
                }
            ],
        }
    )
    created = await create_workspace(db, spec)
    ident = await authenticate_agent(db, created.agents[0].token)
    assert ident is not None
    rows = await db.fetchall("SELECT id, slug FROM workspace_apps WHERE agent_id = %s", [ident.agent_id])
    return Seeded(ident, created.agents[0].token, {r["slug"]: r["id"] for r in rows})


@pytest.fixture
async def pubsub(db: Database) -> AsyncIterator[PubSub]:
    ps = PubSub(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(ps.run)
        yield ps
        nursery.cancel_scope.cancel()


def service(db: Database, seeded: Seeded, pubsub: PubSub) -> apps.AppsService:
    return apps.build(attrs.evolve(make_scope(db, seeded.ident), events=Events(pubsub)))


async def healths(db: Database, agent_id: uuid.UUID) -> dict[str, str]:
    rows = await db.fetchall(
        "SELECT slug, health::text AS health FROM workspace_apps WHERE agent_id = %s", [agent_id]
    )
    return {r["slug"]: r["health"] for r in rows}


async def next_event(sub: Subscription) -> dict[str, Any]:
    with trio.fail_after(10):
        payload = await sub.__anext__()
    assert payload is not MISSED
    assert isinstance(payload, str)
    return dict(json.loads(payload))


async def next_event_of(sub: Subscription, kind: str) -> dict[str, Any]:
    """The next event of ``kind``, skipping others (the connection monitor's agt_connection_update)."""
    while True:
        event = await next_event(sub)
        if event["kind"] == kind:
            return event


async def no_event(sub: Subscription) -> None:
    with trio.move_on_after(0.3):
        payload = await sub.__anext__()
        raise AssertionError(f"unexpected event {payload!r}")


def req(*updates: tuple[bytes, int]) -> agent_pb2.BatchUpdateAppHealthRequest:
    return Request(updates=[Update(id=i, health=h) for i, h in updates])  # type: ignore[arg-type]


async def test_handler_paths(db: Database) -> None:
    seeded = await seed_apps(db)
    svc = apps.build(make_scope(db, seeded.ident))
    assert set(svc.handlers()) == {
        "/coder.agent.v2.Agent/BatchUpdateAppHealths",
        "/coder.agent.v2.Agent/UpdateAppStatus",
    }


async def test_empty_batch_needs_no_database(db: Database) -> None:
    seeded = await seed_apps(db)
    # No database and no events at all: an empty batch must not touch either.
    svc = apps.build(make_scope(None, seeded.ident))
    assert await svc.batch_update_app_healths(Request()) == agent_pb2.BatchUpdateAppHealthResponse()


async def test_changed_apps_written_and_one_event(db: Database, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    svc = service(db, seeded, pubsub)
    web, api = seeded.app_ids["web"], seeded.app_ids["api"]
    async with pubsub.subscribe(f"workspace_owner:{seeded.ident.owner_id}") as sub:
        await svc.batch_update_app_healths(req((web.bytes, Health.HEALTHY), (api.bytes, Health.INITIALIZING)))
        assert await healths(db, seeded.ident.agent_id) == {
            "web": "healthy",
            "api": "initializing",
            "term": "disabled",
        }
        assert await next_event(sub) == {
            "kind": "app_health",
            "workspace_id": str(seeded.ident.workspace_id),
            "agent_id": str(seeded.ident.agent_id),
        }
        await no_event(sub)
        # Nothing changed (api is already initializing, web already healthy): no write, no event.
        await svc.batch_update_app_healths(req((web.bytes, Health.HEALTHY), (api.bytes, Health.INITIALIZING)))
        await no_event(sub)
        await svc.batch_update_app_healths(req((api.bytes, Health.UNHEALTHY), (web.bytes, Health.DISABLED)))
        assert await healths(db, seeded.ident.agent_id) == {
            "web": "disabled",
            "api": "unhealthy",
            "term": "disabled",
        }
        assert (await next_event(sub))["kind"] == "app_health"


async def test_only_changed_rows_are_updated(db: Database, pubsub: PubSub) -> None:
    """An unchanged app's row is not rewritten (observed through PostgreSQL's row version, xmin)."""
    seeded = await seed_apps(db)
    svc = service(db, seeded, pubsub)
    web, api = seeded.app_ids["web"], seeded.app_ids["api"]

    async def versions() -> dict[str, str]:
        rows = await db.fetchall(
            "SELECT slug, xmin::text AS v FROM workspace_apps WHERE agent_id = %s", [seeded.ident.agent_id]
        )
        return {r["slug"]: r["v"] for r in rows}

    before = await versions()
    await svc.batch_update_app_healths(req((web.bytes, Health.HEALTHY), (api.bytes, Health.INITIALIZING)))
    after = await versions()
    assert after["api"] == before["api"] and after["term"] == before["term"]
    assert after["web"] != before["web"]


async def test_validation_is_fail_fast_and_writes_nothing(db: Database, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    other = await seed_apps(db)
    svc = service(db, seeded, pubsub)
    web, term = seeded.app_ids["web"], seeded.app_ids["term"]
    foreign = other.app_ids["web"]
    unknown = uuid.uuid4()
    cases = [
        (
            req((web.bytes, Health.HEALTHY), (b"\x01\x02", Health.HEALTHY)),
            'parse workspace app ID "\\x01\\x02": invalid UUID (got 2 bytes) (updates[1].id)',
        ),
        (
            req((web.bytes, Health.HEALTHY), (unknown.bytes, Health.HEALTHY)),
            f'workspace app ID "{unknown}" not found (updates[1].id)',
        ),
        (
            req((web.bytes, Health.HEALTHY), (foreign.bytes, Health.HEALTHY)),
            f'workspace app ID "{foreign}" not found (updates[1].id)',
        ),
        (
            req((web.bytes, Health.HEALTHY), (term.bytes, Health.HEALTHY)),
            f'workspace app "{term}" ("term") does not have healthchecks enabled (updates[1].id)',
        ),
        (
            req((web.bytes, Health.HEALTHY), (web.bytes, Health.APP_HEALTH_UNSPECIFIED)),
            f'unknown health status "APP_HEALTH_UNSPECIFIED" for app "{web}" ("web") (updates[1].health)',
        ),
        (
            req((web.bytes, 9)),
            f'unknown health status "9" for app "{web}" ("web") (updates[0].health)',
        ),
    ]
    async with pubsub.subscribe(f"workspace_owner:{seeded.ident.owner_id}") as sub:
        for request, text in cases:
            with pytest.raises(RpcError) as err:
                await svc.batch_update_app_healths(request)
            assert err.value.message == text
        await no_event(sub)
    assert await healths(db, seeded.ident.agent_id) == {
        "web": "initializing",
        "api": "initializing",
        "term": "disabled",
    }
    assert await healths(db, other.ident.agent_id) == {
        "web": "initializing",
        "api": "initializing",
        "term": "disabled",
    }


async def test_end_to_end_through_serve_agent(db: Database, nursery: trio.Nursery, pubsub: PubSub) -> None:
    seeded = await seed_apps(db)
    async with pubsub.subscribe(f"workspace_owner:{seeded.ident.owner_id}") as sub:
        agent = await nursery.start(
            functools.partial(
                serve_agent, db, seeded.token, services=("apps",), role="", events=Events(pubsub)
            )
        )
        await agent.client.agent.BatchUpdateAppHealths(req((seeded.app_ids["web"].bytes, Health.HEALTHY)))
        assert await next_event_of(sub, "app_health") == {
            "kind": "app_health",
            "workspace_id": str(seeded.ident.workspace_id),
            "agent_id": str(seeded.ident.agent_id),
        }
        with pytest.raises(RpcError) as err:
            await agent.client.agent.BatchUpdateAppHealths(
                req((seeded.app_ids["term"].bytes, Health.HEALTHY))
            )
        assert "does not have healthchecks enabled" in err.value.message
        await agent.disconnect()
    assert (await healths(db, seeded.ident.agent_id))["web"] == "healthy"
