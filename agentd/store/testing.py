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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio
from psycopg import sql as pgsql

from agentd.store.db import open_database
from agentd.store.embedded import _start, _stop
from agentd.store.migrate import migrate

__all__ = ["TestServer", "embedded_test_server"]

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
        url = str(server.get_uri())
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
