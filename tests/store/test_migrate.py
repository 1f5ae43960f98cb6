"""Migrations: empty -> current, v1 fixture + data -> current (same catalog as schema.sql, no data
loss), idempotence, concurrent replicas, refusal of foreign or newer databases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from agentd.store import Database, open_database
from agentd.store.agents import get_agent_by_token, token_digest
from agentd.store.migrate import (
    CURRENT_VERSION,
    MIGRATIONS,
    MigrationError,
    migrate,
    schema_sql,
    schema_version,
)
from agentd.store.testing import catalog_snapshot, insert_row

ROOT = Path(__file__).resolve().parents[2]
V1_FIXTURE = ROOT / "tests" / "fixtures" / "schema_v1.sql"


def test_schema_sql_is_the_packaged_one() -> None:
    assert schema_sql() == (ROOT / "schema.sql").read_text(encoding="utf-8")
    assert [m.version for m in MIGRATIONS] == list(range(2, CURRENT_VERSION + 1))
    for step in MIGRATIONS:
        assert step.sql().strip()


async def test_migrate_empty_database(empty_db_url: str) -> None:
    async with open_database(empty_db_url) as db:
        assert await schema_version(db) is None
        assert await migrate(db) == CURRENT_VERSION
        assert await schema_version(db) == CURRENT_VERSION
        before = await catalog_snapshot(db)
        assert await migrate(db) == CURRENT_VERSION
        assert await catalog_snapshot(db) == before
        assert await db.fetchval("SELECT count(*) FROM schema_version") == 1
        # Connections opened before the enums existed were replaced: enum arrays load as lists.
        assert await db.fetchval("SELECT '{vscode,web_terminal}'::display_app[]") == [
            "vscode",
            "web_terminal",
        ]


async def test_template_is_current(db: Database) -> None:
    assert await schema_version(db) == CURRENT_VERSION


async def _fill_v1(db: Database) -> dict[str, uuid.UUID]:
    ids = {
        k: uuid.uuid4()
        for k in ("org", "user", "tpl", "tv", "job", "ws", "build", "res", "agent", "app", "script")
    }
    ids["token"] = uuid.uuid4()
    now = datetime.now(UTC)
    stamps = {"created_at": now, "updated_at": now}
    async with db.transaction() as tx:
        await insert_row(tx, "organizations", {"id": ids["org"], "name": "org", **stamps})
        await insert_row(
            tx, "users", {"id": ids["user"], "email": "a@example.com", "username": "alice", **stamps}
        )
        await insert_row(
            tx,
            "templates",
            {"id": ids["tpl"], "organization_id": ids["org"], "name": "tpl", "active_version_id": ids["tv"]}
            | {"created_by": ids["user"], **stamps},
        )
        await insert_row(
            tx,
            "provisioner_jobs",
            {"id": ids["job"], "started_at": now, "completed_at": now, "organization_id": ids["org"]}
            | {"initiator_id": ids["user"], "type": "workspace_build", **stamps},
        )
        await insert_row(
            tx,
            "template_versions",
            {"id": ids["tv"], "template_id": ids["tpl"], "organization_id": ids["org"], "name": "v1"}
            | {"job_id": ids["job"], "created_by": ids["user"], **stamps},
        )
        await insert_row(
            tx,
            "workspaces",
            {
                "id": ids["ws"],
                "owner_id": ids["user"],
                "organization_id": ids["org"],
                "template_id": ids["tpl"],
            }
            | {"name": "ws", **stamps},
        )
        await insert_row(
            tx,
            "workspace_builds",
            {
                "id": ids["build"],
                "workspace_id": ids["ws"],
                "template_version_id": ids["tv"],
                "build_number": 1,
            }
            | {"transition": "start", "initiator_id": ids["user"], "job_id": ids["job"], **stamps},
        )
        await insert_row(
            tx,
            "workspace_resources",
            {"id": ids["res"], "created_at": now, "job_id": ids["job"], "transition": "start"}
            | {"type": "docker_container", "name": "dev"},
        )
        await insert_row(
            tx,
            "workspace_agents",
            {"id": ids["agent"], "name": "main", "resource_id": ids["res"], "auth_token": ids["token"]}
            | {"architecture": "amd64", "operating_system": "linux", "lifecycle_state": "ready"}
            | {"logs_length": 5, **stamps},
        )
        await insert_row(
            tx,
            "workspace_agent_logs",
            {"agent_id": ids["agent"], "created_at": now, "output": "hello", "level": "warn"},
        )
        await insert_row(
            tx,
            "workspace_apps",
            {"id": ids["app"], "created_at": now, "agent_id": ids["agent"], "display_name": "Code"}
            | {"icon": "/icon.svg", "slug": "code", "health": "healthy"},
        )
        await insert_row(
            tx,
            "workspace_agent_metadata",
            {"workspace_agent_id": ids["agent"], "display_name": "Load", "key": "load", "script": "uptime"}
            | {"timeout": 5, "interval": 10},
        )
        await insert_row(
            tx,
            "workspace_agent_scripts",
            {"workspace_agent_id": ids["agent"], "log_source_id": uuid.uuid4(), "log_path": "/tmp/s.log"}
            | {"created_at": now, "script": "echo hi", "cron": "", "start_blocks_login": False}
            | {"run_on_start": True, "run_on_stop": False, "timeout_seconds": 60, "display_name": "Hi"}
            | {"id": ids["script"]},
        )
        await insert_row(
            tx,
            "workspace_agent_script_timings",
            {"script_id": ids["script"], "started_at": now - timedelta(minutes=1), "ended_at": now}
            | {"exit_code": 0, "stage": "start", "status": "ok"},
        )
    return ids


async def test_upgrade_from_v1_matches_schema_sql_without_data_loss(empty_db_url: str, db: Database) -> None:
    async with open_database(empty_db_url) as old:
        await old.execute(V1_FIXTURE.read_text(encoding="utf-8"))
        assert await schema_version(old) == 1
        ids = await _fill_v1(old)
        assert await migrate(old) == CURRENT_VERSION
        assert await schema_version(old) == CURRENT_VERSION

        # Same catalog as a database created straight from schema.sql (the fixture's template).
        upgraded, fresh = await catalog_snapshot(old), await catalog_snapshot(db)
        assert (
            len(fresh["columns"]) > 300 and len(fresh["enums"]) > 20 and fresh["triggers"] and fresh["views"]
        )
        for part in fresh:
            assert upgraded[part] == fresh[part], part

        agent = await old.fetchone("SELECT * FROM workspace_agents WHERE id = %s", [ids["agent"]])
        assert agent is not None
        assert (agent["name"], agent["lifecycle_state"], agent["logs_length"]) == ("main", "ready", 5)
        assert (agent["deleted"], agent["api_key_scope"], agent["parent_id"]) == (False, "all", None)
        app = await old.fetchone(
            "SELECT slug, health, open_in, tooltip FROM workspace_apps WHERE id = %s", [ids["app"]]
        )
        assert app == {"slug": "code", "health": "healthy", "open_in": "slim-window", "tooltip": ""}
        assert await old.fetchval(
            "SELECT output FROM workspace_agent_logs WHERE agent_id = %s", [ids["agent"]]
        ) == ("hello")
        assert await old.fetchval("SELECT count(*) FROM workspace_agent_script_timings") == 1
        assert await old.fetchval("SELECT display_order FROM workspace_agent_metadata") == 0
        row = await old.fetchone(
            "SELECT owner_username, task_id FROM workspaces_expanded WHERE id = %s", [ids["ws"]]
        )
        assert row == {"owner_username": "alice", "task_id": None}
        # The new tables work against upgraded rows.
        await old.execute(
            "INSERT INTO workspace_agent_memory_resource_monitors (agent_id, enabled, threshold, created_at)"
            " VALUES (%s, true, 80, now())",
            [ids["agent"]],
        )
        assert await old.fetchval("SELECT count(*) FROM users WHERE is_system") == 1


async def test_upgrade_hashes_agent_tokens_and_old_tokens_keep_working(empty_db_url: str) -> None:
    async with open_database(empty_db_url) as old:
        await old.execute(V1_FIXTURE.read_text(encoding="utf-8"))
        ids = await _fill_v1(old)
        # A second agent on the same resource, with its own token.
        token2 = uuid.uuid4()
        now = datetime.now(UTC)
        await insert_row(
            old,
            "workspace_agents",
            {"id": uuid.uuid4(), "name": "side", "resource_id": ids["res"], "auth_token": token2}
            | {"architecture": "amd64", "operating_system": "linux", "created_at": now, "updated_at": now},
        )
        tokens = [ids["token"], token2]
        assert await _tables_mentioning(old, tokens)  # the plain tokens are there before
        await migrate(old)
        # No table holds a token in any form (text, hex, bytes) in any column after the upgrade.
        assert await _tables_mentioning(old, tokens) == []
        for token in tokens:
            auth = await get_agent_by_token(old, token)
            assert auth is not None and auth.agent.auth_token_hash == token_digest(token)
        assert await get_agent_by_token(old, uuid.uuid4()) is None


async def _tables_mentioning(db: Database, tokens: list[uuid.UUID]) -> list[str]:
    """Tables with a row whose text form (every column: uuid, text, bytea as hex, ...) shows a token."""
    needles = [form for t in tokens for form in (str(t), t.hex)]
    found = []
    for table in await db.fetchall("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
        name = table["tablename"]
        rows = await db.fetchall(f'SELECT t::text AS row FROM "{name}" t')
        if any(n in r["row"].replace("-", "") or n in r["row"] for r in rows for n in needles):
            found.append(name)
    return found


async def test_concurrent_migrations(empty_db_url: str) -> None:
    results: list[int] = []

    async def replica() -> None:
        async with open_database(empty_db_url, max_size=1) as db:
            results.append(await migrate(db))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(replica)
    assert results == [CURRENT_VERSION] * 3
    async with open_database(empty_db_url) as db:
        assert await db.fetchval("SELECT count(*) FROM schema_version") == 1


async def test_refuses_newer_database(db: Database) -> None:
    await db.execute("INSERT INTO schema_version (version) VALUES (%s)", [CURRENT_VERSION + 1])
    with pytest.raises(MigrationError, match="newer"):
        await migrate(db)


async def test_refuses_foreign_database(empty_db_url: str) -> None:
    async with open_database(empty_db_url) as db:
        await db.execute("CREATE TABLE somebody_elses (x int)")
        with pytest.raises(MigrationError, match="not an agentd database"):
            await migrate(db)
