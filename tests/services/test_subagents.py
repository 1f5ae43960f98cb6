"""CreateSubAgent / ListSubAgents / DeleteSubAgent (spec §7.14-7.16): both creation paths, name and
slug rules, hashed slugs, health, sharing-level clamping, collected app errors, the rebind guard,
listing and soft deletion — always scoped to the calling parent."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import uuid
from typing import Any

import pytest
import trio

from agentd.admin import create_workspace, validate_workspace_spec
from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services import subagents
from agentd.services.subagents import clamp_sharing_level, hashed_slug
from agentd.store import Database
from agentd.store.agents import get_agent_by_token, token_digest
from agentd.store.sessions import authenticate_agent
from agentd.store.subagents import AppUpsert, upsert_app
from agentd.testing import serve_agent
from tests.services.audit_support import T0, FakeNow, make_scope

Req = agent_pb2.CreateSubAgentRequest
App = Req.App
AppError = agent_pb2.CreateSubAgentResponse.AppCreationError


async def seed_parent(
    db: Database, *, agents: tuple[str, ...] = ("main",)
) -> tuple[list[AgentIdentity], uuid.UUID]:
    """A workspace with the given agents (the first is the parent under test); identities + first token."""
    tag = uuid.uuid4().hex[:10]
    spec = validate_workspace_spec(
        {
            "name": "dev",
            "owner": {"username": f"u-{tag}", "email": f"{tag}@example.com"},
            "agents": [
                {
                    "name": name,
                    "connection_timeout_seconds": 321,
                    "troubleshooting_url": "https://help.example.com",
                    "api_key_scope": "no_user_data",
                    "motd_file": "/etc/motd",
                }
                for name in agents
            ],
        }
    )
    created = await create_workspace(db, spec)
    idents = []
    for agent in created.agents:
        ident = await authenticate_agent(db, agent.token)
        assert ident is not None
        idents.append(ident)
    return idents, created.agents[0].token


def service(db: Database, ident: AgentIdentity, now: FakeNow | None = None) -> subagents.SubAgentsService:
    return subagents.build(make_scope(db, ident, now=now or FakeNow()))


async def agent_row(db: Database, agent_id: uuid.UUID) -> dict[str, Any]:
    row = await db.fetchone(
        "SELECT id, parent_id, name, resource_id, auth_token_hash, auth_instance_id, architecture,"
        " operating_system, directory, environment_variables, instance_metadata, resource_metadata,"
        " connection_timeout_seconds, troubleshooting_url, motd_file, display_apps::text[] AS display_apps,"
        " display_order, api_key_scope::text AS api_key_scope, created_at, updated_at, deleted"
        " FROM workspace_agents WHERE id = %s",
        [agent_id],
    )
    assert row is not None
    return row


async def app_rows(db: Database, agent_id: uuid.UUID) -> list[dict[str, Any]]:
    return await db.fetchall(
        "SELECT slug, display_name, icon, command, url, external, subdomain,"
        " sharing_level::text AS sharing_level, healthcheck_url, healthcheck_interval, healthcheck_threshold,"
        " health::text AS health, display_order, hidden, open_in::text AS open_in, display_group, tooltip,"
        " created_at"
        " FROM workspace_apps WHERE agent_id = %s ORDER BY display_order, slug",
        [agent_id],
    )


def expected_slug(agent: str, slug: str) -> str:
    digest = hashlib.sha256(f"{agent}/{slug}".encode()).digest()
    return base64.b32hexencode(digest).decode()[:8].lower() + "-" + slug


async def test_handler_paths(db: Database) -> None:
    [parent], _ = await seed_parent(db)
    assert set(service(db, parent).handlers()) == {
        "/coder.agent.v2.Agent/CreateSubAgent",
        "/coder.agent.v2.Agent/ListSubAgents",
        "/coder.agent.v2.Agent/DeleteSubAgent",
    }


def test_hashed_slug_and_clamping() -> None:
    assert hashed_slug("devcontainer", "code-server") == expected_slug("devcontainer", "code-server")
    # Coder's own test vectors (sub-agent "child-agent").
    assert hashed_slug("child-agent", "code-server") == "fdqf0lpd-code-server"
    assert hashed_slug("child-agent", "vim") == "547knu0f-vim"
    assert hashed_slug("child-agent", "valid-app") == "511ctirn-valid-app"
    assert hashed_slug("a", "x") != hashed_slug("b", "x")
    assert len(hashed_slug("a", "x").split("-")[0]) == 8
    assert clamp_sharing_level("public", None) == "public"  # no policy: permissive
    assert clamp_sharing_level("public", "owner") == "owner"
    assert clamp_sharing_level("organization", "authenticated") == "organization"
    assert clamp_sharing_level("authenticated", "organization") == "organization"
    assert clamp_sharing_level("owner", "owner") == "owner"


async def test_create_child_copies_parent_fields(db: Database) -> None:
    [parent], _ = await seed_parent(db)
    svc = service(db, parent)
    response = await svc.create_sub_agent(
        Req(
            name="devcontainer",
            directory="/workspaces/app",
            architecture="arm64",
            operating_system="linux",
            display_apps=[Req.VSCODE, Req.WEB_TERMINAL, Req.PORT_FORWARDING_HELPER],
        )
    )
    assert list(response.app_creation_errors) == []
    child_id = uuid.UUID(bytes=response.agent.id)
    token = uuid.UUID(bytes=response.agent.auth_token)
    assert response.agent.name == "devcontainer"
    parent_row = await agent_row(db, parent.agent_id)
    row = await agent_row(db, child_id)
    assert row == {
        "id": child_id,
        "parent_id": parent.agent_id,
        "name": "devcontainer",
        "resource_id": parent.resource_id,
        "auth_token_hash": token_digest(token),
        "auth_instance_id": None,
        "architecture": "arm64",
        "operating_system": "linux",
        "directory": "/workspaces/app",
        "environment_variables": None,
        "instance_metadata": None,
        "resource_metadata": None,
        "connection_timeout_seconds": 321,
        "troubleshooting_url": "https://help.example.com",
        "motd_file": "",
        "display_apps": ["vscode", "web_terminal", "port_forwarding_helper"],
        "display_order": 0,
        "api_key_scope": "no_user_data",
        "created_at": T0,
        "updated_at": T0,
        "deleted": False,
    }
    assert token_digest(token) != parent_row["auth_token_hash"]
    # The child authenticates with its own token and knows its parent.
    child = await authenticate_agent(db, token)
    assert child is not None
    assert (child.agent_id, child.parent_id, child.workspace_id) == (
        child_id,
        parent.agent_id,
        parent.workspace_id,
    )
    by_token = await get_agent_by_token(db, token)
    assert by_token is not None
    assert (by_token.agent.id, by_token.agent.parent_id) == (child_id, parent.agent_id)


async def test_create_validation_errors(db: Database) -> None:
    [parent], _ = await seed_parent(db)
    svc = service(db, parent)
    cases = [
        (
            Req(name="ok", display_apps=[Req.VSCODE, 7]),  # type: ignore[list-item]
            'field: display_apps[1] detail: "7" is not a valid display app',
        ),
        (Req(name=""), "field: name detail: agent name cannot be empty"),
        (
            Req(name="bad_name"),
            'field: name detail: agent name "bad_name" does not match regex "(?i)^[a-z0-9](-?[a-z0-9])*$"',
        ),
        (
            Req(name="-x"),
            'field: name detail: agent name "-x" does not match regex "(?i)^[a-z0-9](-?[a-z0-9])*$"',
        ),
        (
            Req(name="a--b"),
            'field: name detail: agent name "a--b" does not match regex "(?i)^[a-z0-9](-?[a-z0-9])*$"',
        ),
    ]
    for request, text in cases:
        with pytest.raises(RpcError) as err:
            await svc.create_sub_agent(request)
        assert err.value.message == text
    # Longer than the column: the database refuses it and nothing is inserted.
    with pytest.raises(RpcError) as err:
        await svc.create_sub_agent(Req(name="a" * 65))
    assert err.value.message.startswith("insert sub agent: ") and "64" in err.value.message
    # Upper case is allowed by the name rule.
    response = await svc.create_sub_agent(Req(name="Dev-1"))
    assert response.agent.name == "Dev-1"
    assert (
        await db.fetchval("SELECT count(*) FROM workspace_agents WHERE parent_id = %s", [parent.agent_id])
        == 1
    )


async def test_duplicate_names_are_refused(db: Database) -> None:
    [parent, sibling], _ = await seed_parent(db, agents=("main", "other"))
    svc = service(db, parent)
    first = await svc.create_sub_agent(Req(name="dc"))
    for taken in ("dc", "main", "other"):
        with pytest.raises(RpcError) as err:
            await svc.create_sub_agent(Req(name=taken))
        assert err.value.message.startswith("insert sub agent: ")
        assert err.value.message.endswith("(name)")
        assert f'"{taken}" already exists' in err.value.message
    # After deletion the name is free again.
    await svc.delete_sub_agent(agent_pb2.DeleteSubAgentRequest(id=first.agent.id))
    again = await svc.create_sub_agent(Req(name="dc"))
    assert again.agent.id != first.agent.id
    assert sibling.agent_id != parent.agent_id


async def test_apps_created_with_hashed_slugs(db: Database) -> None:
    [parent], _ = await seed_parent(db)
    await db.execute(
        "UPDATE templates SET max_port_sharing_level = 'public' WHERE id = %s", [parent.template_id]
    )
    response = await service(db, parent).create_sub_agent(
        Req(
            name="dc",
            apps=[
                App(
                    slug="code-server",
                    display_name="VS Code",
                    icon="/icon/code.svg",
                    url="http://localhost:8080",
                    healthcheck=App.Healthcheck(url="http://localhost:8080/healthz", interval=5, threshold=6),
                    share=App.AUTHENTICATED,
                    open_in=App.TAB,
                    order=1,
                    group="Editors",
                    subdomain=True,
                ),
                App(slug="shell", command="bash", hidden=True, external=False, order=2),
                App(slug="docs", url="https://docs.example.com", external=True, share=App.PUBLIC, order=3),
            ],
        )
    )
    assert list(response.app_creation_errors) == []
    child_id = uuid.UUID(bytes=response.agent.id)
    rows = await app_rows(db, child_id)
    base = {"tooltip": "", "created_at": T0, "icon": "", "display_name": "", "display_group": None}
    assert rows == [
        base
        | {
            "slug": expected_slug("dc", "code-server"),
            "display_name": "VS Code",
            "icon": "/icon/code.svg",
            "command": None,
            "url": "http://localhost:8080",
            "external": False,
            "subdomain": True,
            "sharing_level": "authenticated",
            "healthcheck_url": "http://localhost:8080/healthz",
            "healthcheck_interval": 5,
            "healthcheck_threshold": 6,
            "health": "initializing",
            "display_order": 1,
            "hidden": False,
            "open_in": "tab",
            "display_group": "Editors",
        },
        base
        | {
            "slug": expected_slug("dc", "shell"),
            "command": "bash",
            "url": None,
            "external": False,
            "subdomain": False,
            "sharing_level": "owner",
            "healthcheck_url": "",
            "healthcheck_interval": 0,
            "healthcheck_threshold": 0,
            "health": "disabled",
            "display_order": 2,
            "hidden": True,
            "open_in": "slim-window",
        },
        base
        | {
            "slug": expected_slug("dc", "docs"),
            "command": None,
            "url": "https://docs.example.com",
            "external": True,
            "subdomain": False,
            "sharing_level": "public",
            "healthcheck_url": "",
            "healthcheck_interval": 0,
            "healthcheck_threshold": 0,
            "health": "disabled",
            "display_order": 3,
            "hidden": False,
            "open_in": "slim-window",
        },
    ]


async def test_sharing_level_clamped_to_template_policy(db: Database) -> None:
    [parent], _ = await seed_parent(db)
    await db.execute(
        "UPDATE templates SET max_port_sharing_level = 'authenticated' WHERE id = %s", [parent.template_id]
    )
    response = await service(db, parent).create_sub_agent(
        Req(
            name="dc",
            apps=[
                App(slug="a", url="http://a", share=App.PUBLIC),
                App(slug="b", url="http://b", share=App.ORGANIZATION),
                App(slug="c", url="http://c", share=App.AUTHENTICATED),
                App(slug="d", url="http://d"),
            ],
        )
    )
    assert list(response.app_creation_errors) == []
    rows = await app_rows(db, uuid.UUID(bytes=response.agent.id))
    assert {r["slug"].split("-", 1)[1]: r["sharing_level"] for r in rows} == {
        "a": "authenticated",  # clamped, not refused
        "b": "organization",
        "c": "authenticated",
        "d": "owner",
    }
    # The default template policy (owner) clamps everything to owner.
    await db.execute(
        "UPDATE templates SET max_port_sharing_level = 'owner' WHERE id = %s", [parent.template_id]
    )
    response = await service(db, parent).create_sub_agent(
        Req(name="dc2", apps=[App(slug="a", url="http://a", share=App.PUBLIC)])
    )
    [row] = await app_rows(db, uuid.UUID(bytes=response.agent.id))
    assert row["sharing_level"] == "owner"


async def test_app_errors_are_collected(db: Database) -> None:
    [parent], _ = await seed_parent(db)
    response = await service(db, parent).create_sub_agent(
        Req(
            name="dc",
            apps=[
                App(slug="good", url="http://good"),
                App(slug=""),
                App(slug="Bad_Slug"),
                App(slug="good", url="http://again"),
                App(slug="share", share=9),  # type: ignore[arg-type]
                App(slug="open", open_in=4),  # type: ignore[arg-type]
                App(slug="fine", command="true"),
                App(slug="long", command="true", display_name="x" * 65),  # varchar(64): a database error
            ],
        )
    )
    regex = "^[a-z0-9](-?[a-z0-9])*$"
    *validation, database = response.app_creation_errors
    assert database.index == 7 and not database.HasField("field")
    assert database.error.startswith("insert workspace app: ") and "64" in database.error
    assert validation == [
        AppError(index=1, field="slug", error="must not be empty"),
        AppError(index=2, field="slug", error=f'"Bad_Slug" does not match regex "{regex}"'),
        AppError(index=3, field="slug", error='"good" is already in use'),
        AppError(index=4, field="share", error='"9" is not a valid app sharing level'),
        AppError(index=5, field="open_in", error='"4" is not an open in setting'),
    ]
    rows = await app_rows(db, uuid.UUID(bytes=response.agent.id))
    assert {r["slug"] for r in rows} == {expected_slug("dc", "good"), expected_slug("dc", "fine")}


async def test_upsert_refuses_to_rebind_another_workspaces_app(db: Database) -> None:
    [mine, mine2], _ = await seed_parent(db, agents=("main", "second"))
    [theirs], _ = await seed_parent(db)
    app_id = uuid.uuid4()

    def app(agent_id: uuid.UUID, slug: str) -> AppUpsert:
        return AppUpsert(
            id=app_id,
            created_at=T0,
            agent_id=agent_id,
            slug=slug,
            display_name="",
            icon="",
            command="true",
            url=None,
            external=False,
            subdomain=False,
            sharing_level="owner",
            healthcheck_url="",
            healthcheck_interval=0,
            healthcheck_threshold=0,
            health="disabled",
            display_order=0,
            hidden=False,
            open_in="slim-window",
            display_group=None,
        )

    assert await upsert_app(db, app(theirs.agent_id, "theirs"))
    assert not await upsert_app(db, app(mine.agent_id, "stolen"))
    row = await db.fetchone("SELECT agent_id, slug FROM workspace_apps WHERE id = %s", [app_id])
    assert row == {"agent_id": theirs.agent_id, "slug": "theirs"}
    # Within one workspace an app may move between agents (the upsert's update path).
    app_id = uuid.uuid4()
    assert await upsert_app(db, app(mine.agent_id, "x"))
    assert await upsert_app(db, app(mine2.agent_id, "y"))
    row = await db.fetchone("SELECT agent_id, slug FROM workspace_apps WHERE id = %s", [app_id])
    assert row == {"agent_id": mine2.agent_id, "slug": "y"}


async def test_precreated_child_is_updated_not_created(db: Database) -> None:
    [parent], _ = await seed_parent(db)
    now = FakeNow()
    svc = service(db, parent, now)
    created = await svc.create_sub_agent(Req(name="dc", directory="/old", display_apps=[Req.VSCODE]))
    child_id = uuid.UUID(bytes=created.agent.id)
    now.advance(minutes=5)
    response = await svc.create_sub_agent(
        Req(
            id=created.agent.id,
            name="ignored",
            architecture="ignored",
            directory="/new",
            display_apps=[Req.SSH_HELPER],
            apps=[App(slug="ignored", url="http://x")],
        )
    )
    # Tokens are stored hashed: the child's token cannot be returned again, so a fresh one is
    # issued (and the old one stops working).
    new_token = uuid.UUID(bytes=response.agent.auth_token)
    assert (response.agent.id, response.agent.name) == (created.agent.id, created.agent.name)
    assert new_token != uuid.UUID(bytes=created.agent.auth_token)
    assert list(response.app_creation_errors) == []
    auth = await authenticate_agent(db, new_token)
    assert auth is not None and auth.agent_id == child_id
    assert await authenticate_agent(db, uuid.UUID(bytes=created.agent.auth_token)) is None
    row = await agent_row(db, child_id)
    assert (row["name"], row["directory"], row["display_apps"], row["updated_at"]) == (
        "dc",
        "/new",
        ["ssh_helper"],
        T0 + dt.timedelta(minutes=5),
    )
    assert row["architecture"] == ""
    assert await app_rows(db, child_id) == []
    # An empty directory leaves the directory alone; display apps are always replaced.
    await svc.create_sub_agent(Req(id=created.agent.id))
    row = await agent_row(db, child_id)
    assert (row["directory"], row["display_apps"]) == ("/new", [])
    assert (
        await db.fetchval("SELECT count(*) FROM workspace_agents WHERE parent_id = %s", [parent.agent_id])
        == 1
    )


async def test_precreated_child_must_belong_to_this_parent(db: Database) -> None:
    [parent, sibling], _ = await seed_parent(db, agents=("main", "other"))
    [stranger], _ = await seed_parent(db)
    sibling_child = await service(db, sibling).create_sub_agent(Req(name="sib-dc", directory="/keep"))
    stranger_child = await service(db, stranger).create_sub_agent(Req(name="dc", directory="/keep"))
    svc = service(db, parent)
    for foreign in (
        sibling_child.agent.id,
        stranger_child.agent.id,
        parent.agent_id.bytes,
        sibling.agent_id.bytes,
    ):
        with pytest.raises(RpcError) as err:
            await svc.create_sub_agent(Req(id=foreign, directory="/hijack", display_apps=[]))
        assert err.value.message == "subagent does not belong to this parent agent (id)"
    for child in (sibling_child, stranger_child):
        row = await agent_row(db, uuid.UUID(bytes=child.agent.id))
        assert row["directory"] == "/keep"
        assert len(row["display_apps"]) == 0
    unknown = uuid.uuid4()
    with pytest.raises(RpcError) as err:
        await svc.create_sub_agent(Req(id=unknown.bytes))
    assert err.value.message == f'get workspace agent by id: agent "{unknown}" not found (id)'
    # A deleted child cannot be revived through the pre-created path.
    gone = await svc.create_sub_agent(Req(name="gone"))
    await svc.delete_sub_agent(agent_pb2.DeleteSubAgentRequest(id=gone.agent.id))
    with pytest.raises(RpcError) as err:
        await svc.create_sub_agent(Req(id=gone.agent.id))
    assert (
        err.value.message
        == f'get workspace agent by id: agent "{uuid.UUID(bytes=gone.agent.id)}" not found (id)'
    )
    with pytest.raises(RpcError) as err:
        await svc.create_sub_agent(Req(id=b"\x00" * 4))
    assert err.value.message == "parse agent id: invalid UUID (got 4 bytes) (id)"


async def test_list_only_this_parents_live_children(db: Database) -> None:
    [parent, sibling], _ = await seed_parent(db, agents=("main", "other"))
    svc = service(db, parent)
    assert list((await svc.list_sub_agents(agent_pb2.ListSubAgentsRequest())).agents) == []
    a = await svc.create_sub_agent(Req(name="a"))
    b = await svc.create_sub_agent(Req(name="b"))
    await service(db, sibling).create_sub_agent(Req(name="c"))
    await svc.delete_sub_agent(agent_pb2.DeleteSubAgentRequest(id=a.agent.id))
    listed = (await svc.list_sub_agents(agent_pb2.ListSubAgentsRequest())).agents
    # tokens are stored hashed: only CreateSubAgent returns one
    assert list(listed) == [agent_pb2.SubAgent(id=b.agent.id, name=b.agent.name)]


async def test_delete_soft_deletes_own_child_only(db: Database) -> None:
    [parent, sibling], _ = await seed_parent(db, agents=("main", "other"))
    [stranger], _ = await seed_parent(db)
    svc = service(db, parent)
    mine = await svc.create_sub_agent(Req(name="dc", apps=[App(slug="web", url="http://w")]))
    theirs = await service(db, stranger).create_sub_agent(Req(name="dc"))
    siblings = await service(db, sibling).create_sub_agent(Req(name="sib"))
    mine_id = uuid.UUID(bytes=mine.agent.id)
    await db.execute(
        "INSERT INTO workspace_agent_context_snapshots (workspace_agent_id, version, aggregate_hash)"
        " VALUES (%s, 1, '\\x00')",
        [mine_id],
    )
    await db.execute(
        "INSERT INTO workspace_agent_context_resources"
        " (workspace_agent_id, source, body_kind, body, content_hash, size_bytes, status)"
        " VALUES (%s, 'AGENTS.md', 'instruction_file', '{}', '\\x00', 1, 'ok')",
        [mine_id],
    )
    # Another parent's child, a sibling's child, this agent itself, the sibling, an unknown id:
    # not found, nothing changed.
    for other in (
        theirs.agent.id,
        siblings.agent.id,
        parent.agent_id.bytes,
        sibling.agent_id.bytes,
        uuid.uuid4().bytes,
    ):
        with pytest.raises(RpcError) as err:
            await svc.delete_sub_agent(agent_pb2.DeleteSubAgentRequest(id=other))
        assert err.value.message == f'delete sub agent: agent "{uuid.UUID(bytes=other)}" not found (id)'
    deleted = await db.fetchall("SELECT name FROM workspace_agents WHERE deleted")
    assert deleted == []
    assert await svc.delete_sub_agent(agent_pb2.DeleteSubAgentRequest(id=mine.agent.id)) == (
        agent_pb2.DeleteSubAgentResponse()
    )
    with pytest.raises(RpcError, match="not found"):  # already deleted
        await svc.delete_sub_agent(agent_pb2.DeleteSubAgentRequest(id=mine.agent.id))
    assert (await agent_row(db, mine_id))["deleted"] is True
    for table in ("workspace_agent_context_snapshots", "workspace_agent_context_resources"):
        assert (
            await db.fetchval(f"SELECT count(*) FROM {table} WHERE workspace_agent_id = %s", [mine_id]) == 0
        )
    assert len(await app_rows(db, mine_id)) == 1  # apps are retained
    assert await authenticate_agent(db, uuid.UUID(bytes=mine.agent.auth_token)) is None
    for alive in (theirs, siblings):
        assert (await agent_row(db, uuid.UUID(bytes=alive.agent.id)))["deleted"] is False
    with pytest.raises(RpcError) as err:
        await svc.delete_sub_agent(agent_pb2.DeleteSubAgentRequest(id=b"\x01"))
    assert err.value.message == "invalid UUID (got 1 bytes) (id)"


async def test_end_to_end_child_connects_with_its_own_token(db: Database, nursery: trio.Nursery) -> None:
    [parent], token = await seed_parent(db)
    agent = await nursery.start(
        functools.partial(serve_agent, db, token, services=("subagents", "manifest"), role=None)
    )
    assert not (await agent.client.agent.GetManifest(agent_pb2.GetManifestRequest())).HasField("parent_id")
    created = await agent.client.agent.CreateSubAgent(
        Req(
            name="devcontainer",
            directory="/workspaces/x",
            display_apps=[Req.VSCODE],
            apps=[App(slug="web", url="http://w"), App(slug="")],
        )
    )
    assert [(e.index, e.field) for e in created.app_creation_errors] == [(1, "slug")]
    with pytest.raises(RpcError) as err:
        await agent.client.agent.CreateSubAgent(Req(name=""))
    assert err.value.message == "field: name detail: agent name cannot be empty"
    listed = await agent.client.agent.ListSubAgents(agent_pb2.ListSubAgentsRequest())
    assert list(listed.agents) == [agent_pb2.SubAgent(id=created.agent.id, name=created.agent.name)]

    child = await nursery.start(
        functools.partial(
            serve_agent,
            db,
            uuid.UUID(bytes=created.agent.auth_token),
            services=("subagents", "manifest"),
            role=None,
        )
    )
    assert child.ident.agent_id == uuid.UUID(bytes=created.agent.id)
    assert child.ident.parent_id == parent.agent_id
    assert child.ident.workspace_id == parent.workspace_id
    # The child's manifest names it and its parent.
    manifest = await child.client.agent.GetManifest(agent_pb2.GetManifestRequest())
    assert manifest.agent_id == created.agent.id
    assert manifest.agent_name == "devcontainer"
    assert manifest.HasField("parent_id") and manifest.parent_id == parent.agent_id.bytes
    assert manifest.directory == "/workspaces/x"
    assert manifest.workspace_id == parent.workspace_id.bytes
    # The child cannot delete itself through its own connection (it is not its own child) ...
    with pytest.raises(RpcError, match="not found"):
        await child.client.agent.DeleteSubAgent(agent_pb2.DeleteSubAgentRequest(id=created.agent.id))
    assert (await agent_row(db, child.ident.agent_id))["deleted"] is False
    await child.disconnect()
    # ... its parent can.
    await agent.client.agent.DeleteSubAgent(agent_pb2.DeleteSubAgentRequest(id=created.agent.id))
    assert (await agent_row(db, child.ident.agent_id))["deleted"] is True
    assert list((await agent.client.agent.ListSubAgents(agent_pb2.ListSubAgentsRequest())).agents) == []
    await agent.disconnect()
