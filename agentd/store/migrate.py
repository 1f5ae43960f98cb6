"""Bring a database to the current schema: apply schema.sql to an empty one, upgrade scripts to an
older one. Idempotent and safe for replicas migrating at the same time (advisory lock).

schema.sql is the one source of the current DDL. Each entry of `MIGRATIONS` upgrades version N-1 to
N with a script in agentd/migrations/; tests assert that upgrading the frozen version-1 fixture
yields exactly the catalog schema.sql creates, so the two cannot drift apart.
"""

from __future__ import annotations

from importlib import resources

import attrs

from agentd.store.db import Database, Transaction
from agentd.store.errors import StoreError

__all__ = [
    "CURRENT_VERSION",
    "MIGRATIONS",
    "Migration",
    "MigrationError",
    "migrate",
    "schema_sql",
    "schema_version",
]

# pg_advisory_xact_lock key shared by every agentd replica ("agentdmg" in ASCII).
MIGRATION_LOCK_KEY = 0x6167656E74646D67


class MigrationError(StoreError):
    """The database cannot be migrated (newer than this agentd, or not an agentd database)."""


@attrs.frozen
class Migration:
    """Upgrade from ``version - 1`` to ``version`` by running agentd/migrations/<script>."""

    version: int
    script: str

    def sql(self) -> str:
        """The upgrade script's text (shipped as package data)."""
        return resources.files("agentd").joinpath("migrations", self.script).read_text(encoding="utf-8")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "0002_agent_api.sql"),
    Migration(3, "0003_hash_agent_tokens.sql"),
    Migration(4, "0004_tailnet_coordinator.sql"),
)

CURRENT_VERSION = MIGRATIONS[-1].version if MIGRATIONS else 1


def schema_sql() -> str:
    """The current schema (top-level schema.sql, shipped inside the package as agentd/schema.sql)."""
    return resources.files("agentd").joinpath("schema.sql").read_text(encoding="utf-8")


async def _version_in(tx: Transaction) -> int | None:
    if await tx.fetchval("SELECT to_regclass('public.schema_version') IS NOT NULL") is not True:
        return None
    version = await tx.fetchval("SELECT max(version) FROM schema_version")
    return None if version is None else int(version)


async def schema_version(db: Database) -> int | None:
    """The database's schema version, or None when it has never been migrated."""
    async with db.transaction() as tx:
        return await _version_in(tx)


async def migrate(db: Database) -> int:
    """Migrate ``db`` to `CURRENT_VERSION` in one transaction; return the version reached.

    Concurrent callers serialise on an advisory lock; the later ones find the work done.
    """
    applied = await _migrate(db)
    if applied:
        await db.reload_types()
    return CURRENT_VERSION


async def _migrate(db: Database) -> bool:
    """Run the migration transaction; return whether it changed the schema."""
    # No client-side deadline either (waiting for another replica's migration included); a dead
    # server is still noticed through the connection's TCP keepalives and tcp_user_timeout.
    db = db.with_query_timeout(None)
    async with db.transaction() as tx:
        # Large upgrades may take longer than the pool's statement_timeout; waiting for another
        # replica's migration counts as statement time too.
        await tx.execute("SET LOCAL statement_timeout = 0")
        await tx.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_KEY])
        version = await _version_in(tx)
        if version is None:
            tables = await tx.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            )
            if tables:
                raise MigrationError(
                    f"database has {tables} tables but no schema_version table: not an agentd database"
                )
            await tx.execute(schema_sql())
            await tx.execute("INSERT INTO schema_version (version) VALUES (%s)", [CURRENT_VERSION])
            return True
        if version > CURRENT_VERSION:
            raise MigrationError(
                f"database schema version {version} is newer than this agentd supports ({CURRENT_VERSION})"
            )
        applied = False
        for step in MIGRATIONS:
            if step.version > version:
                await tx.execute(step.sql())
                await tx.execute("INSERT INTO schema_version (version) VALUES (%s)", [step.version])
                applied = True
        return applied
