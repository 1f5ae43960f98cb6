"""Synchronous helpers behind the shared pytest database fixtures (tests/conftest.py).

One server per test run (external via AGENTD_TEST_POSTGRES_URL, else an embedded pgserver in a
temporary directory), one migrated template database, and per-test clones made with
``CREATE DATABASE … TEMPLATE`` — cloning a small template takes tens of milliseconds, migrating
takes far longer. Database names carry the pid and a random suffix so that several test runs can
share one external server.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio
from psycopg import sql as pgsql

from agentd.store.agents import token_digest
from agentd.store.db import open_database
from agentd.store.embedded import PgServerApi, _start, _stop
from agentd.store.migrate import migrate

__all__ = [
    "SeededAgent",
    "SeededBuild",
    "SeededWorkspace",
    "TestServer",
    "add_build",
    "catalog_snapshot",
    "embedded_test_server",
    "insert_row",
    "seed_workspace",
    "set_job_status",
    "test_server",
]

ENV_URL = "AGENTD_TEST_POSTGRES_URL"


@attrs.define
class TestServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    __test__ = False  # not a pytest test class

    admin_url: str

    def url_for(self, dbname: str) -> str:
        """A connection string for database ``dbname`` on this server."""
        return psycopg.conninfo.make_conninfo(self.admin_url, dbname=dbname)

    def _admin(self, statement: pgsql.Composed) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)

    def new_name(self, prefix: str) -> str:
        """A database name unlikely to collide with other runs on a shared server."""
        return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"

    def create_empty(self, prefix: str = "agentd_empty") -> str:
        """CREATE DATABASE from template0; return its name."""
        name = self.new_name(prefix)
        self._admin(pgsql.SQL("CREATE DATABASE {} TEMPLATE template0").format(pgsql.Identifier(name)))
        return name

    def create_template(self) -> str:
        """An empty database migrated to the current schema, to clone tests' databases from."""
        name = self.create_empty("agentd_tpl")

        async def run() -> None:
            async with open_database(self.url_for(name), min_size=1, max_size=1) as db:
                await migrate(db)

        trio.run(run)
        return name

    def clone(self, template: str, prefix: str = "agentd_test") -> str:
        """CREATE DATABASE … TEMPLATE ``template``; return the new database's name."""
        name = self.new_name(prefix)
        self._admin(
            pgsql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                pgsql.Identifier(name), pgsql.Identifier(template)
            )
        )
        return name

    def drop(self, name: str) -> None:
        """DROP DATABASE, disconnecting whatever is still connected to it."""
        self._admin(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(pgsql.Identifier(name)))


@contextmanager
def embedded_test_server(directory: Path) -> Iterator[TestServer]:
    """A throwaway pgserver in ``directory`` tuned for tests (no fsync); deleted on exit."""
    server: Any = _start(directory / "postgres", "delete")
    try:
        url = PgServerApi.uri(server)
        with psycopg.connect(url, autocommit=True) as conn:
            # Durability is worthless for a throwaway test server; these settings apply on reload.
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(pgsql.SQL("ALTER SYSTEM SET {} = off").format(pgsql.Identifier(setting)))
            conn.execute("SELECT pg_reload_conf()")
        yield TestServer(url)
    finally:
        _stop(server)


@contextmanager
def test_server(directory: Path) -> Iterator[TestServer]:
    """``AGENTD_TEST_POSTGRES_URL`` when set, else an embedded server in ``directory``."""
    url = os.environ.get(ENV_URL)
    if url:
        yield TestServer(url)
    else:
        with embedded_test_server(directory) as server:
            yield server


_CATALOG_QUERIES: dict[str, str] = {
    "relations": """
        SELECT relname, relkind, relpersistence FROM pg_class
        WHERE relnamespace = 'public'::regnamespace ORDER BY relname""",
    "columns": """
        SELECT table_name,
               -- the column's place among the live ones (a dropped column leaves a gap in attnum)
               row_number() OVER (PARTITION BY table_name ORDER BY ordinal_position) AS position,
               column_name, data_type, udt_name, character_maximum_length,
               is_nullable, column_default, is_generated, generation_expression
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, ordinal_position""",
    "constraints": """
        SELECT conrelid::regclass::text AS rel, conname, pg_get_constraintdef(oid) AS def
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2""",
    "enums": """
        SELECT t.typname, array_agg(e.enumlabel::text ORDER BY e.enumsortorder) AS labels
        FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
        WHERE t.typnamespace = 'public'::regnamespace GROUP BY 1 ORDER BY 1""",
    "views": "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public' ORDER BY 1",
    "triggers": """
        SELECT tgrelid::regclass::text AS rel, tgname, pg_get_triggerdef(oid) AS def
        FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "functions": """
        SELECT proname, pg_get_functiondef(oid) AS def FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace ORDER BY 1""",
}


async def catalog_snapshot(db: Any) -> dict[str, list[dict[str, Any]]]:
    """Everything schema-shaped in ``public`` (tables, columns, constraints, indexes, enums,
    views, triggers, functions) in a comparable form; two databases with equal snapshots have
    the same schema."""
    return {name: await db.fetchall(query) for name, query in _CATALOG_QUERIES.items()}


async def insert_row(db: Any, table: str, values: dict[str, Any]) -> None:
    """INSERT one row given as a column -> value dict (``db`` is a Database or Transaction)."""
    stmt = pgsql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        pgsql.Identifier(table),
        pgsql.SQL(", ").join(pgsql.Identifier(c) for c in values),
        pgsql.SQL(", ").join(pgsql.Placeholder() for _ in values),
    )
    await db.execute(stmt, list(values.values()))


# ---------------------------------------------------------------------------------------------
# Seeding: the minimal rows an agent needs (org, owner, template + version, workspace, builds with
# provisioner jobs, a resource per build and agents on it), for store and service tests.
# ---------------------------------------------------------------------------------------------

_JOB_COLUMNS: dict[str, tuple[bool, bool, bool, bool]] = {
    # status: (started_at, canceled_at, completed_at, error)
    "pending": (False, False, False, False),
    "running": (True, False, False, False),
    "succeeded": (True, False, True, False),
    "failed": (True, False, True, True),
    "canceling": (True, True, False, False),
    "canceled": (True, True, True, False),
}


@attrs.define
class SeededAgent:
    """An agent created by `seed_workspace` / `add_build`."""

    id: uuid.UUID
    name: str
    auth_token: uuid.UUID
    resource_id: uuid.UUID


@attrs.define
class SeededBuild:
    """A build with its provisioner job, one resource and its agents (by name)."""

    id: uuid.UUID
    build_number: int
    transition: str
    job_id: uuid.UUID
    resource_id: uuid.UUID
    agents: dict[str, SeededAgent]


@attrs.define
class SeededWorkspace:
    """Ids of everything `seed_workspace` created."""

    organization_id: uuid.UUID
    owner_id: uuid.UUID
    template_id: uuid.UUID
    template_version_id: uuid.UUID
    workspace_id: uuid.UUID
    builds: list[SeededBuild]

    @property
    def latest(self) -> SeededBuild:
        """The build with the highest number."""
        return self.builds[-1]

    def agent(self, name: str = "main") -> SeededAgent:
        """Agent ``name`` of the latest build."""
        return self.latest.agents[name]


def job_status_columns(status: str, now: datetime) -> dict[str, Any]:
    """provisioner_jobs columns that make its generated ``job_status`` equal ``status``."""
    started, canceled, completed, error = _JOB_COLUMNS[status]
    return {
        "started_at": now if started else None,
        "canceled_at": now if canceled else None,
        "completed_at": now if completed else None,
        "error": "provisioner failed" if error else None,
    }


async def set_job_status(db: Any, job_id: uuid.UUID, status: str) -> None:
    """Move a provisioner job to ``status`` (pending, running, succeeded, failed, canceling, canceled)."""
    values = job_status_columns(status, datetime.now(UTC))
    await db.execute(
        "UPDATE provisioner_jobs SET started_at = %(started_at)s, canceled_at = %(canceled_at)s,"
        " completed_at = %(completed_at)s, error = %(error)s, updated_at = now() WHERE id = %(id)s",
        {**values, "id": job_id},
    )


async def add_build(
    db: Any,
    workspace: SeededWorkspace,
    *,
    transition: str = "start",
    job_status: str = "succeeded",
    agents: tuple[str, ...] = ("main",),
) -> SeededBuild:
    """Append the next build (job, resource, fresh agents with fresh tokens) to ``workspace``."""
    now = datetime.now(UTC)
    number = workspace.builds[-1].build_number + 1 if workspace.builds else 1
    build = SeededBuild(uuid.uuid4(), number, transition, uuid.uuid4(), uuid.uuid4(), {})
    await insert_row(
        db,
        "provisioner_jobs",
        {
            "id": build.job_id,
            "created_at": now,
            "updated_at": now,
            "organization_id": workspace.organization_id,
        }
        | {"initiator_id": workspace.owner_id, "type": "workspace_build"}
        | job_status_columns(job_status, now),
    )
    await insert_row(
        db,
        "workspace_builds",
        {"id": build.id, "created_at": now, "updated_at": now, "workspace_id": workspace.workspace_id}
        | {"template_version_id": workspace.template_version_id, "build_number": number}
        | {"transition": transition, "initiator_id": workspace.owner_id, "job_id": build.job_id},
    )
    await insert_row(
        db,
        "workspace_resources",
        {"id": build.resource_id, "created_at": now, "job_id": build.job_id, "transition": transition}
        | {"type": "docker_container", "name": "dev"},
    )
    for order, name in enumerate(agents):
        agent = SeededAgent(uuid.uuid4(), name, uuid.uuid4(), build.resource_id)
        await insert_row(
            db,
            "workspace_agents",
            {
                "id": agent.id,
                "created_at": now,
                "updated_at": now,
                "name": name,
                "resource_id": build.resource_id,
            }
            | {"auth_token_hash": token_digest(agent.auth_token), "architecture": "amd64"}
            | {"operating_system": "linux"}
            | {"directory": "/home/coder", "display_order": order},
        )
        build.agents[name] = agent
    workspace.builds.append(build)
    return build


async def seed_workspace(
    db: Any,
    *,
    owner_username: str = "alice",
    workspace_name: str = "ws",
    agents: tuple[str, ...] = ("main",),
    job_status: str = "succeeded",
) -> SeededWorkspace:
    """Create an organization, owner, template + version, workspace and build 1 (a start whose
    job has ``job_status``) with ``agents``; return their ids."""
    now = datetime.now(UTC)
    stamps = {"created_at": now, "updated_at": now}
    ws = SeededWorkspace(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), [])
    import_job = uuid.uuid4()
    await insert_row(
        db, "organizations", {"id": ws.organization_id, "name": f"org-{ws.organization_id.hex[:8]}"} | stamps
    )
    await insert_row(
        db,
        "users",
        {"id": ws.owner_id, "email": f"{owner_username}@example.com", "username": owner_username}
        | {"name": owner_username.title()}
        | stamps,
    )
    await insert_row(
        db,
        "templates",
        {"id": ws.template_id, "organization_id": ws.organization_id, "name": f"tpl-{ws.template_id.hex[:8]}"}
        | {"active_version_id": ws.template_version_id, "created_by": ws.owner_id}
        | stamps,
    )
    await insert_row(
        db,
        "provisioner_jobs",
        {"id": import_job, "organization_id": ws.organization_id, "initiator_id": ws.owner_id}
        | {"type": "template_version_import"}
        | job_status_columns("succeeded", now)
        | stamps,
    )
    await insert_row(
        db,
        "template_versions",
        {"id": ws.template_version_id, "template_id": ws.template_id, "organization_id": ws.organization_id}
        | {"name": "v1", "job_id": import_job, "created_by": ws.owner_id}
        | stamps,
    )
    await insert_row(
        db,
        "workspaces",
        {"id": ws.workspace_id, "owner_id": ws.owner_id, "organization_id": ws.organization_id}
        | {"template_id": ws.template_id, "name": workspace_name}
        | stamps,
    )
    await add_build(db, ws, transition="start", job_status=job_status, agents=agents)
    return ws
