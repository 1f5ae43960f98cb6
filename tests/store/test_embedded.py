"""Embedded PostgreSQL: start in a data directory, reuse its data on restart, stop on exit."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import trio

from agentd.store import open_database
from agentd.store.embedded import PGSERVER_HANDLES_FILE, EmbeddedPostgresError, embedded_postgres
from agentd.store.migrate import CURRENT_VERSION, migrate, schema_version


def _postmaster_pid(data_dir: Path) -> int | None:
    pidfile = data_dir / "postgres" / "postmaster.pid"
    if not pidfile.exists():
        return None
    return int(pidfile.read_text().split()[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _exited(pid: int) -> bool:
    # The postmaster is not our child: poll (it may linger briefly after pg_ctl stop returns).
    for _ in range(200):
        if not _alive(pid):
            return True
        await trio.sleep(0.05)
    return False


@pytest.mark.slow
async def test_start_reuse_and_stop() -> None:
    # Outside pytest's tmp tree: the server runs as pgserver's own user (see tests/conftest.py).
    with tempfile.TemporaryDirectory(prefix="agentd-embedded-") as raw:
        data_dir = Path(raw)
        async with embedded_postgres(data_dir) as url:
            pid = _postmaster_pid(data_dir)
            assert pid is not None and _alive(pid)
            # pgserver's private handle file, which agentd prunes of dead pids: still a list of pids
            handles = data_dir / "postgres" / PGSERVER_HANDLES_FILE
            assert json.loads(handles.read_text()) == [os.getpid()]
            async with open_database(url) as db:
                assert await migrate(db) == CURRENT_VERSION
                await db.execute(
                    "INSERT INTO organizations (id, name, created_at, updated_at)"
                    " VALUES (gen_random_uuid(), 'kept', now(), now())"
                )
        assert await _exited(pid)

        async with embedded_postgres(data_dir) as url, open_database(url) as db:
            assert await schema_version(db) == CURRENT_VERSION
            assert await db.fetchval("SELECT name FROM organizations") == "kept"
            restarted = _postmaster_pid(data_dir)
            assert restarted is not None and restarted != pid
        assert await _exited(restarted)


async def test_unusable_data_dir_is_one_clear_line() -> None:
    with tempfile.TemporaryDirectory(prefix="agentd-embedded-") as raw:
        blocker = Path(raw) / "file"
        blocker.write_text("not a directory")
        with pytest.raises(EmbeddedPostgresError) as info:
            async with embedded_postgres(blocker):
                pass
        assert "\n" not in str(info.value)
        assert str(blocker) in str(info.value)
