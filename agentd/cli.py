"""The `agentd` command line: serve, migrate, admin create-workspace, agents, agent.

Errors an operator can cause (bad flags, bad files, unreachable database, address in use) end with
one line on stderr naming the problem and a non-zero exit status; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from agentd import __version__
from agentd.config import LOG_LEVELS, Config, UserError, build_config

EXIT_USER_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


_ALLOW_CHMOD_HELP = "as root: let the embedded server add g+rx,o+rx to the data dir's parents"


def _add_database_flags(parser: argparse.ArgumentParser, *, serving: bool = False) -> None:
    """--config, --allow-chmod and where the database is: --data-dir (its embedded PostgreSQL) or
    --postgres-url, one or the other - except for `serve`, whose data dir also holds the default
    unix socket, so it may be given next to --postgres-url."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument("--allow-chmod", action="store_true", help=_ALLOW_CHMOD_HELP)
    group = parser if serving else parser.add_mutually_exclusive_group()
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help=(
            "data directory: the embedded PostgreSQL and the default unix socket"
            if serving
            else "data directory"
        )
        + " (default $XDG_DATA_HOME/agentd)",
    )
    group.add_argument(
        "--postgres-url", metavar="URL", help="use this PostgreSQL server instead of the embedded one"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agentd", description="Serve Coder's workspace-agent API backed by PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    serve = commands.add_parser("serve", help="run the daemon")
    _add_database_flags(serve, serving=True)
    serve.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="unix:/path/to.sock or tcp://HOST:PORT; repeatable "
        "(default unix:$DATA_DIR/agentd.sock and tcp://127.0.0.1:3113)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default info")
    serve.add_argument(
        "--agent-stats-refresh-interval",
        type=float,
        metavar="SECONDS",
        help="how often agents report stats (default 30)",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="where to serve /metrics (operators only): unix:/path or tcp://HOST:PORT, or none "
        "(default tcp://127.0.0.1:2112)",
    )

    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the listeners (default 1: one process, no parent)",
    )

    migrate = commands.add_parser("migrate", help="bring the database schema to the current version")
    _add_database_flags(migrate)

    admin = commands.add_parser("admin", help="administrative commands")
    admin_commands = admin.add_subparsers(dest="admin_command", metavar="COMMAND", parser_class=_Parser)
    admin_commands.required = True
    create = admin_commands.add_parser(
        "create-workspace", help="create a workspace with running agents from a TOML file"
    )
    create.add_argument("--file", type=Path, required=True, metavar="WORKSPACE.toml")
    create.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_database_flags(create)

    agents = commands.add_parser(
        "agents", help="list the agents: workspace, owner, versions, lifecycle, connection, last seen"
    )
    agents.add_argument("--json", action="store_true", help="print JSON (with --watch: one object per line)")
    agents.add_argument(
        "--watch", action="store_true", help="keep running and print each change as it happens"
    )
    _add_database_flags(agents)

    agent = commands.add_parser("agent", help="run a reference workspace agent against agentd")
    agent.add_argument("--url", required=True, metavar="URL", help="unix:/path/to.sock or tcp://HOST:PORT")
    agent.add_argument("--websocket", action="store_true", help="upgrade to WebSocket instead of raw yamux")
    agent.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("CODER_AGENT_TOKEN"),
        help="the agent's token (default $CODER_AGENT_TOKEN)",
    )
    agent.add_argument(
        "--boundary-logs", type=int, default=0, metavar="N", help="report N boundary logs per batch"
    )
    agent.add_argument(
        "--exit-after-ready", action="store_true", help="exit once startup finished (0 = ready)"
    )
    return parser


def _config_from(args: argparse.Namespace) -> Config:
    return build_config(
        config_file=args.config,
        data_dir=args.data_dir,
        postgres_url=args.postgres_url,
        listen=getattr(args, "listen", ()),
        log_level=getattr(args, "log_level", None),
        agent_stats_refresh_interval=getattr(args, "agent_stats_refresh_interval", None),
        metrics_listen=getattr(args, "metrics_listen", None),
        allow_chmod=args.allow_chmod,
        workers=getattr(args, "workers", None),
    )


def _setup_logging(level: str, *, worker: int | None = None) -> None:
    where = "" if worker is None else f"[worker {worker}] "
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pgserver logs every step at INFO; keep it for debugging only.
    logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.getLogger().level))


def _cmd_serve(args: argparse.Namespace) -> int:
    from agentd.daemon import Daemon, raise_open_files_limit, tune_gc_for_serving
    from agentd.workers import run_parent, run_worker, worker_spec_from_environ

    config = _config_from(args)
    spec = worker_spec_from_environ()
    _setup_logging(config.log_level, worker=None if spec is None else spec.index)
    raise_open_files_limit()
    if spec is not None:  # a worker of `agentd serve --workers N` (agentd.workers)
        tune_gc_for_serving()
        trio.run(run_worker, spec, config, lambda: _config_from(args))
        return 0
    if config.workers > 1:
        command = [sys.executable, "-m", "agentd", *args.argv]
        return run_parent(config, command, lambda: _config_from(args))
    tune_gc_for_serving()
    daemon = Daemon(
        config,
        reload_config=lambda: _config_from(args),
        freeze_gc_when_ready=True,
        exit_on_overrun=True,
    )
    trio.run(daemon.run)
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from agentd.daemon import open_store
    from agentd.store.migrate import migrate

    config = _config_from(args)
    _setup_logging("warning")

    async def run() -> int:
        async with open_store(config, migrate=False) as db:
            return await migrate(db)

    version = trio.run(run)
    print(f"agentd: database schema is current (version {version})")
    return 0


def _cmd_create_workspace(args: argparse.Namespace) -> int:
    from agentd.admin import create_workspace, load_workspace_spec
    from agentd.daemon import open_store

    spec = load_workspace_spec(args.file)  # validate before touching any database
    config = _config_from(args)
    _setup_logging("warning")

    async def run() -> Any:
        async with open_store(config) as db:
            return await create_workspace(db, spec)

    created = trio.run(run)
    if args.json:
        print(json.dumps(created.to_json(), indent=2))
    else:
        print(f"workspace {created.workspace_name} {created.workspace_id}")
        for agent in created.agents:
            print(f"agent {agent.name} id={agent.id} token={agent.token}")
    return 0


def _cmd_agents(args: argparse.Namespace) -> int:
    from agentd.agents_cmd import run_agents_command

    config = _config_from(args)
    _setup_logging("warning")

    def write(line: str) -> None:
        print(line, flush=True)

    return trio.run(
        functools.partial(run_agents_command, config, json_output=args.json, watch=args.watch, write=write)
    )


def _cmd_agent(args: argparse.Namespace) -> int:
    from agentd.agent import TargetError, parse_target, run_agent

    if not args.token:
        raise UserError("agent: --token (or $CODER_AGENT_TOKEN) is required")
    if args.boundary_logs < 0 or args.boundary_logs > 1000:
        raise UserError("agent: --boundary-logs must be between 0 and 1000")
    try:
        parse_target(args.url)
    except TargetError as exc:
        raise UserError(f"agent: --url {exc}") from None
    return trio.run(
        functools.partial(
            run_agent,
            args.url,
            token=args.token,
            websocket=args.websocket,
            boundary_logs=args.boundary_logs,
            exit_after_ready=args.exit_after_ready,
        )
    )


_COMMANDS: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
    ("serve", None): _cmd_serve,
    ("migrate", None): _cmd_migrate,
    ("admin", "create-workspace"): _cmd_create_workspace,
    ("agents", None): _cmd_agents,
    ("agent", None): _cmd_agent,
}


def _user_error(exc: BaseException) -> BaseException | None:
    """The first user-caused error inside `exc` (trio wraps errors from nurseries in groups)."""
    from agentd.store.embedded import EmbeddedPostgresError
    from agentd.store.errors import StoreError

    if isinstance(exc, UserError | StoreError | EmbeddedPostgresError):
        return exc
    if isinstance(exc, OSError) and exc.filename is not None:
        # the environment, not agentd: a data directory that cannot be created, a file not readable
        return UserError(f"{exc.filename}: {exc.strerror or exc}")
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _user_error(sub)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    command = _COMMANDS[(args.command, getattr(args, "admin_command", None))]
    try:
        return command(args)
    except KeyboardInterrupt:
        print("agentd: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        found = _user_error(exc)
        if found is None:
            raise
        message = " ".join(str(found).split()) or type(found).__name__
        print(f"agentd: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
