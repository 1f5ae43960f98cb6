"""`agentd admin create-workspace`: strict validation of the file and an all-or-nothing write."""

from __future__ import annotations

import copy
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest

from agentd.admin import (
    SpecError,
    WorkspaceExists,
    create_workspace,
    load_workspace_spec,
    validate_workspace_spec,
)
from agentd.store import Database
from agentd.store.agents import get_agent_by_token, token_digest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "workspace.toml"


def _example() -> dict[str, Any]:
    with EXAMPLE.open("rb") as f:
        return tomllib.load(f)


def _minimal() -> dict[str, Any]:
    return {
        "name": "w",
        "owner": {"username": "bob", "email": "bob@example.com"},
        "agents": [{"name": "main"}],
    }


def test_example_file_exercises_every_section() -> None:
    spec = load_workspace_spec(EXAMPLE)
    main = spec.agents[0]
    assert main.apps and any(app.healthcheck for app in main.apps)
    assert main.scripts and main.metadata and main.devcontainers
    assert main.resources_monitoring.memory and main.resources_monitoring.volumes
    assert main.environment_variables


def test_minimal_file_gets_defaults() -> None:
    spec = validate_workspace_spec(_minimal())
    assert spec.organization.name == "coder"
    assert spec.template.version == "v1"
    agent = spec.agents[0]
    assert agent.operating_system == "linux"
    assert agent.display_apps == (
        "vscode",
        "vscode_insiders",
        "web_terminal",
        "ssh_helper",
        "port_forwarding_helper",
    )
    assert agent.apps == () and agent.resources_monitoring.memory is None


def _mutated(path: list[Any], value: Any, *, delete: bool = False) -> dict[str, Any]:
    raw = copy.deepcopy(_example())
    target = raw
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["nmae"], "x", "nmae: unknown field"),
        (["owner", "mail"], "x", "owner.mail: unknown field"),
        (["agents", 0, "apps", 1, "slugg"], "x", "agents[0].apps[1].slugg: unknown field"),
        (
            ["agents", 0, "apps", 0, "healthcheck", "every"],
            1,
            "agents[0].apps[0].healthcheck.every: unknown field",
        ),
        (
            ["agents", 0, "resources_monitoring", "cpu"],
            {},
            "agents[0].resources_monitoring.cpu: unknown field",
        ),
        (
            ["agents", 0, "scripts", 0, "timeout_seconds"],
            "5",
            "agents[0].scripts[0].timeout_seconds: must be an integer",
        ),
        (
            ["agents", 0, "apps", 0, "sharing_level"],
            "world",
            "agents[0].apps[0].sharing_level: must be one of",
        ),
        (
            ["agents", 0, "display_apps"],
            ["emacs"],
            "agents[0].display_apps[0]: must be one of vscode, vscode_insiders, web_terminal",
        ),
        (["agents", 0, "name"], "bad name", "agents[0].name: must be letters"),
        (
            ["agents", 0, "apps", 1, "slug"],
            "code-server",
            "agents[0].apps[1].slug: duplicate value 'code-server'",
        ),
        (["agents", 1, "name"], "main", "agents[1].name: duplicate value 'main'"),
        (
            ["agents", 0, "resources_monitoring", "memory", "threshold"],
            101,
            "threshold: must be an integer in 0..100, got 101",
        ),
        (["agents", 0, "auth_token"], "not-a-uuid", "agents[0].auth_token: must be a UUID"),
        (["agents", 0, "environment_variables"], {"A": 1}, "must be a table of strings"),
        (["agents"], [], "agents: at least one [[agents]] table is required"),
        (["agents"], {"name": "x"}, "agents: must be an array of tables"),
    ],
)
def test_invalid_spec_names_the_field(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_workspace_spec(_mutated(path, value), source="ws.toml")
    assert str(info.value).startswith("ws.toml: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (["owner", "email"], "owner.email: required field is missing"),
        (["agents", 0, "metadata", 0, "script"], "agents[0].metadata[0].script: required field is missing"),
        (["owner"], "owner: required field is missing"),
    ],
)
def test_missing_required_field(path: list[Any], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_workspace_spec(_mutated(path, None, delete=True))


def test_app_needs_url_or_command() -> None:
    raw = _minimal()
    raw["agents"][0]["apps"] = [{"slug": "x"}]
    with pytest.raises(SpecError, match=r"agents\[0\]\.apps\[0\]: needs a url or a command"):
        validate_workspace_spec(raw)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[owner\n')
    with pytest.raises(SpecError, match=r"bad\.toml: invalid TOML"):
        load_workspace_spec(bad)
    with pytest.raises(SpecError, match="file not found"):
        load_workspace_spec(tmp_path / "absent.toml")


async def _count(db: Database, table: str) -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table}"))


async def test_create_workspace_writes_every_row(db: Database) -> None:
    created = await create_workspace(db, load_workspace_spec(EXAMPLE))
    assert [a.name for a in created.agents] == ["main", "sidecar"]

    ws = await db.fetchone(
        "SELECT w.name, u.username, o.name AS org, t.name AS template, tv.name AS version"
        " FROM workspaces w JOIN users u ON u.id = w.owner_id"
        " JOIN organizations o ON o.id = w.organization_id"
        " JOIN templates t ON t.id = w.template_id JOIN template_versions tv ON tv.id = t.active_version_id"
        " WHERE w.id = %s",
        [created.workspace_id],
    )
    assert ws == {
        "name": "dev",
        "username": "alice",
        "org": "acme",
        "template": "docker-dev",
        "version": "v1",
    }
    build = await db.fetchone(
        "SELECT b.build_number, b.transition::text, j.job_status::text, j.type::text"
        " FROM workspace_builds b JOIN provisioner_jobs j ON j.id = b.job_id WHERE b.workspace_id = %s",
        [created.workspace_id],
    )
    assert build == {
        "build_number": 1,
        "transition": "start",
        "job_status": "succeeded",
        "type": "workspace_build",
    }

    for agent in created.agents:
        row = await db.fetchone(
            "SELECT a.auth_token_hash, a.name, r.name AS resource FROM workspace_agents a"
            " JOIN workspace_resources r ON r.id = a.resource_id"
            " JOIN workspace_builds b ON b.job_id = r.job_id WHERE a.id = %s",
            [agent.id],
        )
        assert row == {"auth_token_hash": token_digest(agent.token), "name": agent.name, "resource": "dev"}
    main = created.agents[0].id
    main_row = await db.fetchone(
        "SELECT directory, environment_variables, display_apps::text[] AS display_apps,"
        " connection_timeout_seconds, motd_file FROM workspace_agents WHERE id = %s",
        [main],
    )
    assert main_row == {
        "directory": "/home/coder",
        "environment_variables": {"EDITOR": "vim", "GIT_AUTHOR_NAME": "Alice Example"},
        "display_apps": ["vscode", "web_terminal", "ssh_helper", "port_forwarding_helper"],
        "connection_timeout_seconds": 120,
        "motd_file": "/etc/motd",
    }
    sidecar_apps = await db.fetchval(
        "SELECT display_apps::text[] FROM workspace_agents WHERE id = %s", [created.agents[1].id]
    )
    assert sidecar_apps == []

    apps = await db.fetchall(
        "SELECT slug, healthcheck_url, healthcheck_interval, healthcheck_threshold, health::text,"
        " open_in::text, sharing_level::text, external FROM workspace_apps WHERE agent_id = %s ORDER BY slug",
        [main],
    )
    assert apps == [
        {
            "slug": "code-server",
            "healthcheck_url": "http://localhost:13337/healthz",
            "healthcheck_interval": 5,
            "healthcheck_threshold": 6,
            "health": "initializing",
            "open_in": "slim-window",
            "sharing_level": "owner",
            "external": False,
        },
        {
            "slug": "docs",
            "healthcheck_url": "",
            "healthcheck_interval": 0,
            "healthcheck_threshold": 0,
            "health": "disabled",
            "open_in": "slim-window",
            "sharing_level": "authenticated",
            "external": True,
        },
        {
            "slug": "htop",
            "healthcheck_url": "",
            "healthcheck_interval": 0,
            "healthcheck_threshold": 0,
            "health": "disabled",
            "open_in": "tab",
            "sharing_level": "owner",
            "external": False,
        },
    ]
    scripts = await db.fetchall(
        "SELECT s.display_name, s.run_on_start, s.run_on_stop, s.cron, ls.display_name AS source"
        " FROM workspace_agent_scripts s JOIN workspace_agent_log_sources ls"
        " ON ls.id = s.log_source_id AND ls.workspace_agent_id = s.workspace_agent_id"
        " WHERE s.workspace_agent_id = %s ORDER BY s.display_name",
        [main],
    )
    assert [
        (s["display_name"], s["source"], s["run_on_start"], s["run_on_stop"], s["cron"]) for s in scripts
    ] == [
        ("Back up home", "Back up home", False, True, ""),
        ("Install code-server", "Install code-server", True, False, ""),
        ("Prune caches", "Prune caches", False, False, "0 0 3 * * *"),
    ]
    metadata = await db.fetchall(
        "SELECT key, interval, timeout, value FROM workspace_agent_metadata WHERE workspace_agent_id = %s"
        " ORDER BY display_order",
        [main],
    )
    assert metadata == [
        {"key": "cpu", "interval": 10, "timeout": 1, "value": ""},
        {"key": "disk", "interval": 60, "timeout": 5, "value": ""},
    ]
    assert await db.fetchone(
        "SELECT enabled, threshold, state::text FROM workspace_agent_memory_resource_monitors"
        " WHERE agent_id = %s",
        [main],
    ) == {"enabled": True, "threshold": 90, "state": "OK"}
    assert await db.fetchall(
        "SELECT path, threshold FROM workspace_agent_volume_resource_monitors WHERE agent_id = %s", [main]
    ) == [{"path": "/home/coder", "threshold": 80}]
    assert await db.fetchall(
        "SELECT name, workspace_folder, subagent_id FROM workspace_agent_devcontainers"
        " WHERE workspace_agent_id = %s",
        [main],
    ) == [{"name": "app", "workspace_folder": "/home/coder/app", "subagent_id": None}]


async def test_second_workspace_reuses_owner_organization_and_template(db: Database) -> None:
    first = await create_workspace(db, load_workspace_spec(EXAMPLE))
    tables = ("users", "organizations", "templates", "template_versions", "workspaces")
    before = {t: await _count(db, t) for t in tables}
    raw = _example()
    raw["name"] = "dev2"
    second = await create_workspace(db, validate_workspace_spec(raw))
    assert second.owner_id == first.owner_id
    after = {t: await _count(db, t) for t in tables}
    assert after == {**before, "workspaces": before["workspaces"] + 1}


async def test_fixed_token_is_used(db: Database) -> None:
    raw = _minimal()
    token = uuid.uuid4()
    raw["agents"][0]["auth_token"] = str(token)
    created = await create_workspace(db, validate_workspace_spec(raw))
    assert created.agents[0].token == token


async def test_existing_workspace_is_an_error_and_nothing_is_added(db: Database) -> None:
    await create_workspace(db, load_workspace_spec(EXAMPLE))
    before = {t: await _count(db, t) for t in ("workspaces", "workspace_agents", "provisioner_jobs")}
    with pytest.raises(WorkspaceExists, match="workspace 'dev' already exists for owner 'alice'"):
        await create_workspace(db, load_workspace_spec(EXAMPLE))
    assert {t: await _count(db, t) for t in before} == before


async def test_failure_midway_rolls_everything_back(db: Database) -> None:
    await create_workspace(db, validate_workspace_spec(_minimal()))
    raw = _minimal()
    raw["organization"] = {"name": "fresh-org"}  # written first ...
    raw["owner"] = {"username": "other", "email": "bob@example.com"}  # ... then this fails
    with pytest.raises(SpecError, match=r"owner\.email: 'bob@example\.com' already belongs to user 'bob'"):
        await create_workspace(db, validate_workspace_spec(raw))
    assert await db.fetchval("SELECT count(*) FROM organizations WHERE name = 'fresh-org'") == 0


async def test_created_tokens_authenticate_through_the_token_query(db: Database) -> None:
    """What the agent endpoint will do with a token create-workspace printed (spec §2.2)."""
    created = await create_workspace(db, load_workspace_spec(EXAMPLE))
    for agent in created.agents:
        found = await get_agent_by_token(db, agent.token)
        assert found is not None
        assert found.agent.id == agent.id
        assert found.agent.name == agent.name
        assert found.workspace.id == created.workspace_id
        assert found.build.id == created.build_id
        assert (found.build.build_number, found.build.transition) == (1, "start")
    main = await get_agent_by_token(db, created.agents[0].token)
    assert main is not None
    assert main.agent.display_apps == ("vscode", "web_terminal", "ssh_helper", "port_forwarding_helper")
    assert main.agent.lifecycle_state == "created"
    assert await get_agent_by_token(db, uuid.uuid4()) is None
