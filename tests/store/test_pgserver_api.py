"""The pgserver seam: the installed pgserver has every function, attribute and private file agentd
relies on, and a release without them is refused with one line naming what changed."""

from __future__ import annotations

import configparser
import importlib.metadata
import sys
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from agentd.store.embedded import (
    EmbeddedPostgresError,
    PgServerApi,
    _import_pgserver,
    pgserver_incompatibilities,
)

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def test_installed_pgserver_has_what_agentd_uses() -> None:
    # _import_pgserver already refuses an incompatible one; ask again to see the list
    assert pgserver_incompatibilities(_import_pgserver()) == []


def test_installed_pgserver_is_within_the_declared_range() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    requires = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    [pgserver_req] = [r for r in requires if r.name == "pgserver"]
    assert "<0.2" in str(pgserver_req.specifier)  # agentd uses pgserver's private API: pin its minor
    assert importlib.metadata.version("pgserver") in pgserver_req.specifier


def test_each_missing_piece_is_named() -> None:
    class PostgresServer:  # a release that renamed the lock and dropped cleanup()
        lock = None

        def __init__(self, pgdata: Path) -> None:
            self.pgdata = pgdata

        def get_uri(self) -> str:
            return ""

    def get_server(path: Path) -> PostgresServer:
        return PostgresServer(path)

    fake = types.SimpleNamespace(get_server=get_server, PostgresServer=PostgresServer)
    assert pgserver_incompatibilities(fake) == [
        "pgserver.get_server(path: 'Path') -> 'PostgresServer' lacks (pgdata, cleanup_mode)",
        "pgserver.PostgresServer._lock (the cross-process lock) is missing",
        "pgserver.PostgresServer.cleanup is missing",
        "pgserver.PostgresServer no longer keeps its handles in .handle_pids.json",
    ]
    assert pgserver_incompatibilities(types.SimpleNamespace()) == [
        "pgserver.get_server is missing",
        "pgserver.PostgresServer is missing",
    ]


def test_an_incompatible_release_is_refused_before_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", types.SimpleNamespace())
    with pytest.raises(EmbeddedPostgresError) as info:
        PgServerApi.load()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"pgserver {importlib.metadata.version('pgserver')} is not a release agentd")
    assert "needs pgserver<0.2" in message and "pgserver.get_server is missing" in message
