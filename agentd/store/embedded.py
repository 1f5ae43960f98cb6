"""Embedded PostgreSQL (the ``pgserver`` package) living in agentd's data directory.

pgserver's API is blocking (initdb, pg_ctl, file locks), so its calls run in a worker thread via
``trio.to_thread.run_sync`` — the one place agentd uses a thread. The server listens on a Unix
socket only. It is reused when already running (another agentd process on the same data
directory, e.g. ``agentd admin`` beside ``agentd serve``) and stopped on exit only by the last
process using it (pgserver counts handles per process id in the data directory).

Besides its public ``get_server``, agentd relies on two pgserver internals: the class-level
cross-process lock ``PostgresServer._lock`` and the per-data-directory handle file
``.handle_pids.json`` (a JSON list of pids). ``PgServerApi`` is the only code that touches pgserver;
``pgserver_incompatibilities`` checks what it relies on, so a pgserver release that changed it (the
requirement is ``<0.2``) fails with one line naming the difference instead of misbehaving.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import logging
import os
import stat
import warnings
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import trio

__all__ = ["EmbeddedPostgresError", "embedded_postgres"]

_log = logging.getLogger("agentd.embedded")

PGDATA_DIRNAME = "postgres"


class EmbeddedPostgresError(Exception):
    """The embedded server could not be initialised or started (message is one line)."""


# ---- the pgserver seam ----------------------------------------------------------------------------

#: pgserver's per-data-directory list of the pids holding a handle (a private file of pgserver).
PGSERVER_HANDLES_FILE = ".handle_pids.json"


def pgserver_incompatibilities(module: Any) -> list[str]:
    """What of the pgserver API agentd uses is missing or different in ``module`` (empty: all there)."""
    problems: list[str] = []
    get_server = getattr(module, "get_server", None)
    if not callable(get_server):
        problems.append("pgserver.get_server is missing")
    else:
        params = inspect.signature(get_server).parameters
        if list(params)[:1] != ["pgdata"] or "cleanup_mode" not in params:
            problems.append(
                f"pgserver.get_server{inspect.signature(get_server)} lacks (pgdata, cleanup_mode)"
            )
    server_class = getattr(module, "PostgresServer", None)
    if server_class is None:
        problems.append("pgserver.PostgresServer is missing")
        return problems
    lock = getattr(server_class, "_lock", None)
    if not (hasattr(lock, "__enter__") and hasattr(lock, "__exit__")):
        problems.append("pgserver.PostgresServer._lock (the cross-process lock) is missing")
    for method in ("get_uri", "cleanup"):
        if not callable(getattr(server_class, method, None)):
            problems.append(f"pgserver.PostgresServer.{method} is missing")
    try:
        init_source = inspect.getsource(server_class.__init__)
    except (OSError, TypeError):
        init_source = ""
    if PGSERVER_HANDLES_FILE not in init_source:
        problems.append(f"pgserver.PostgresServer no longer keeps its handles in {PGSERVER_HANDLES_FILE}")
    return problems


class PgServerApi:
    """The part of pgserver agentd uses; ``load()`` imports and checks it."""

    def __init__(self, module: Any) -> None:
        self._module = module

    @classmethod
    def load(cls) -> PgServerApi:
        """Import pgserver, refusing (EmbeddedPostgresError) a release whose API agentd cannot use.

        pgserver resolves its runtime directory (its cross-process lock) at import. When platformdirs
        rejects $XDG_RUNTIME_DIR (unset, or not mode 0700) the lock falls back to /tmp/runtime-UID,
        which `agentd admin` outside a PrivateTmp unit cannot see: log that warning instead of hiding
        it."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pgserver

        for warning in caught:
            _log.warning("embedded PostgreSQL lock directory: %s", " ".join(str(warning.message).split()))
        problems = pgserver_incompatibilities(pgserver)
        if problems:
            version = _distribution_version("pgserver")
            raise EmbeddedPostgresError(
                f"pgserver {version} is not a release agentd supports (needs pgserver<0.2): "
                + "; ".join(problems)
            )
        return cls(pgserver)

    def lock(self) -> AbstractContextManager[Any]:
        """pgserver's cross-process lock, held while it reads or writes a data directory's handles."""
        lock: AbstractContextManager[Any] = self._module.PostgresServer._lock
        return lock

    def get_server(self, pgdata: Path, cleanup_mode: str | None) -> Any:
        """Start (or attach to) the server of ``pgdata``; returns pgserver's handle."""
        return self._module.get_server(pgdata, cleanup_mode=cleanup_mode)

    @staticmethod
    def uri(server: Any) -> str:
        return str(server.get_uri())

    @staticmethod
    def release(server: Any) -> None:
        """Give up this process's handle; the last process's release stops (or deletes) the server."""
        server.cleanup()


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _import_pgserver() -> Any:
    """The pgserver module, imported and checked (see PgServerApi.load)."""
    return PgServerApi.load()._module


def _prune_dead_handles(pgdata: Path) -> None:
    """Forget handle pids of processes that died without cleaning up (kill -9), so the last live
    process still stops the server on exit."""
    path = pgdata / PGSERVER_HANDLES_FILE
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_G_RX_O_RX = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def chmod_plan(pgdata: Path) -> list[tuple[Path, int, int]]:
    """(dir, mode now, mode after) for every existing parent of `pgdata` that pgserver, run as root,
    would open up with g+rx,o+rx so that its unprivileged PostgreSQL user can traverse it."""
    plan = []
    for parent in pgdata.parents:
        try:
            mode = stat.S_IMODE(parent.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & _G_RX_O_RX != _G_RX_O_RX:
            plan.append((parent, mode, mode | _G_RX_O_RX))
    return plan


def _refuse_root_chmod(pgdata: Path) -> None:
    plan = chmod_plan(pgdata)
    if plan:
        changes = ", ".join(f"{d} {old:04o}->{new:04o}" for d, old, new in plan)
        raise EmbeddedPostgresError(
            f"running as root, the embedded PostgreSQL runs as an unprivileged user and would chmod "
            f"g+rx,o+rx {changes}; choose a --data-dir whose parents are already traversable, or pass "
            "--allow-chmod to accept"
        )


def _start(pgdata: Path, cleanup_mode: str | None, allow_chmod: bool = True) -> Any:
    pgserver = PgServerApi.load()
    pgdata = pgdata.expanduser().resolve()
    if os.geteuid() == 0 and not allow_chmod:
        _refuse_root_chmod(pgdata)
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        if pgdata.exists():
            with pgserver.lock():
                _prune_dead_handles(pgdata)
        return pgserver.get_server(pgdata, cleanup_mode)
    except Exception as exc:
        log = pgdata / "log"
        hint = f" (see {log})" if log.is_file() else ""
        message = " ".join(f"{exc!s}".split())
        raise EmbeddedPostgresError(f"cannot start embedded PostgreSQL in {pgdata}: {message}{hint}") from exc


def _stop(server: Any) -> None:
    PgServerApi.release(server)


@asynccontextmanager
async def embedded_postgres(
    data_dir: str | os.PathLike[str],
    *,
    delete_on_exit: bool = False,
    allow_chmod: bool = True,
) -> AsyncIterator[str]:
    """Start (or reuse) the PostgreSQL server in ``<data_dir>/postgres``; yield its URL.

    The URL names database ``postgres`` over the server's Unix socket. On exit the server is
    stopped unless another process still uses it; ``delete_on_exit`` also removes its data
    (for throwaway test servers). As root, ``allow_chmod=False`` refuses data dirs whose parents
    pgserver would chmod (agentd's commands pass the operator's ``--allow-chmod``).
    """
    pgdata = Path(data_dir) / PGDATA_DIRNAME
    mode: Literal["stop", "delete"] = "delete" if delete_on_exit else "stop"
    server = await trio.to_thread.run_sync(_start, pgdata, mode, allow_chmod)
    try:
        yield PgServerApi.uri(server)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_stop, server)
