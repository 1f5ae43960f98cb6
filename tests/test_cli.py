"""`python -m agentd` end to end: serve (+ systemd), migrate, admin create-workspace, agents, user errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from agentd.cli import build_parser, main
from agentd.store import Database, open_database
from agentd.store.agents import token_digest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "workspace.toml"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nothing"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


async def _agentd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "agentd", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env or _env(),
        )


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI in this process (fast; for cases that need no separate process)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["agentd", *args], code, out.encode(), err.encode())


def _one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """User errors: non-zero exit, exactly one line on stderr, no traceback."""
    assert result.returncode != 0, result
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("agentd: ") or lines[0].startswith("agentd ")
    return lines[0]


@attrs.define
class Serving:
    process: trio.Process
    stderr: bytearray

    @property
    def text(self) -> str:
        return self.stderr.decode()

    def port(self) -> int:
        for line in self.text.splitlines():
            if "listening on tcp://" in line:
                return int(line.rsplit(":", 1)[1].split()[0])
        raise AssertionError(self.text)


@asynccontextmanager
async def _serve(
    args: Sequence[str],
    *,
    command: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    preexec_fn: Callable[[], object] | None = None,
) -> AsyncIterator[Serving]:
    """Start `agentd serve` (or `command`), wait for its ready line, make sure it is gone afterwards.

    Without a --metrics-listen of the test's own, none: the default port (2112) is the machine's."""
    if "--metrics-listen" not in args:
        args = [*args, "--metrics-listen", "none"]
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            command or [sys.executable, "-m", "agentd", "serve", *args],
            stderr=subprocess.PIPE,
            env=env or _env(),
            pass_fds=pass_fds,
            preexec_fn=preexec_fn,
        )
        assert process.stderr is not None
        serving = Serving(process, bytearray())
        ready = trio.Event()

        async def pump() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some(65536):
                serving.stderr += chunk
                if b" ready" in serving.stderr:
                    ready.set()
            ready.set()

        nursery.start_soon(pump)
        try:
            with trio.fail_after(60):
                await ready.wait()
            assert process.poll() is None, serving.text
            yield serving
        finally:
            if process.poll() is None:
                process.kill()
            await process.wait()


async def _http_get(stream: trio.abc.Stream, path: str) -> tuple[int, dict[str, object]]:
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: agentd\r\n\r\n".encode())
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    return sock


async def test_serve_healthz_on_unix_and_tcp_notify_and_sigterm(db_url: str, tmp_path: Path) -> None:
    sock = tmp_path / "agentd.sock"
    notify = _notify_socket(tmp_path / "notify")
    env = _env(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="100000")
    args = [
        "--postgres-url",
        db_url,
        "--data-dir",
        str(tmp_path),
        "--listen",
        f"unix:{sock}",
        "--listen",
        "tcp://127.0.0.1:0",
    ]
    async with _serve(args, env=env) as serving:
        assert notify.recv(4096).split(b"\n")[0] == b"READY=1"
        port = serving.port()
        for stream in (await trio.open_unix_socket(str(sock)), await trio.open_tcp_stream("127.0.0.1", port)):
            status, body = await _http_get(stream, "/healthz")
            assert (status, body) == (200, {"status": "ok", "version": "0.1.0", "database": {"ok": True}})
        status, _ = await _http_get(await trio.open_tcp_stream("127.0.0.1", port), "/nope")
        assert status == 404
        serving.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await serving.process.wait() == 0, serving.text
    messages: list[bytes] = []
    while not messages or messages[-1] != b"STOPPING=1":
        messages.append(notify.recv(4096).split(b"\n")[0])
    notify.close()
    assert b"WATCHDOG=1" in messages  # every 50 ms while serving
    assert set(messages[:-1]) == {b"WATCHDOG=1"}
    assert not sock.exists()
    assert "Traceback" not in serving.text


async def test_serve_with_systemd_socket_activation(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.fileno()
    # LISTEN_PID must be the daemon's pid: the shell sets it to its own and then execs python.
    command = (
        f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -m agentd serve --postgres-url "{db_url}"'
        " --metrics-listen none"
    )
    async with _serve(
        [], command=["sh", "-c", command], pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3)
    ) as serving:
        assert f"listening on unix:{path} (systemd)" in serving.text
        assert "3113" not in serving.text  # socket-activated: no default listeners
        listener.close()  # only the daemon holds the socket now
        status, body = await _http_get(await trio.open_unix_socket(str(path)), "/healthz")
        assert status == 200 and body["database"] == {"ok": True}
        serving.process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await serving.process.wait() == 0
    assert path.exists()  # the socket file belongs to systemd, not to agentd


async def test_serve_port_in_use_is_one_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = await _agentd(
            "serve",
            "--postgres-url",
            UNREACHABLE,
            "--data-dir",
            str(tmp_path),
            "--listen",
            f"tcp://127.0.0.1:{port}",
        )
    finally:
        taken.close()
    assert result.returncode == 1
    assert (
        _one_error_line(result) == f"agentd: cannot listen on tcp://127.0.0.1:{port}: address already in use"
    )


def test_serve_unix_socket_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agentd.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        result = _main(capsys, "serve", "--postgres-url", UNREACHABLE, "--listen", f"unix:{path}")
    finally:
        live.close()
    line = _one_error_line(result)
    assert (
        line == f"agentd: cannot listen on unix:{path}: socket in use by another process (is agentd running?)"
    )
    assert path.exists()  # not ours to remove


def test_serve_unreachable_database_is_one_line_and_leaves_no_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agentd.sock"
    result = _main(
        capsys,
        "serve",
        "--postgres-url",
        UNREACHABLE,
        "--listen",
        f"unix:{path}",
        "--metrics-listen",
        "none",
        "--log-level",
        "error",
    )
    line = _one_error_line(result)
    assert line.startswith("agentd: cannot connect to PostgreSQL at ")
    assert "127.0.0.1:1" in line
    assert not path.exists()


def test_bad_flags_and_config_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "listen address 'ftp://x'" in _one_error_line(_main(capsys, "serve", "--listen", "ftp://x"))
    usage = _main(capsys, "frobnicate")
    assert usage.returncode == 2
    assert "invalid choice: 'frobnicate'" in _one_error_line(usage)
    config = tmp_path / "agentd.toml"
    config.write_text('listen = ["tcp://127.0.0.1:0"]\nlisten_on = "x"\n')
    line = _one_error_line(_main(capsys, "serve", "--config", str(config)))
    assert line.startswith(f"agentd: {config}: unknown field 'listen_on'")
    config.write_text("listen = [\n")
    assert "invalid TOML" in _one_error_line(_main(capsys, "serve", "--config", str(config)))


@pytest.mark.parametrize(
    ("file_text", "flags", "needle"),
    [
        ("agent_stats_refresh_interval = inf\n", (), "field 'agent_stats_refresh_interval' must be"),
        ("shutdown_timeout = nan\n", (), "field 'shutdown_timeout' must be a number of seconds in 0..3600"),
        ("", ("--agent-stats-refresh-interval", "1e15"), "--agent-stats-refresh-interval must be"),
        ("", ("--agent-stats-refresh-interval", "nan"), "in 1..86400, got nan"),
        (
            'log_level = "loud"\n',
            (),
            "agentd.toml: field 'log_level' must be one of debug, info, warning, error",
        ),
    ],
)
def test_out_of_range_numbers_are_one_line_before_anything_binds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file_text: str, flags: tuple[str, ...], needle: str
) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(file_text)
    sock = tmp_path / "a.sock"
    args = ("serve", "--config", str(config), "--listen", f"unix:{sock}", *flags)
    assert needle in _one_error_line(_main(capsys, *args))
    assert not sock.exists()
    assert not (tmp_path / "postgres").exists()


async def test_config_file_values_apply_and_flags_win(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(
        f'postgres_url = "{UNREACHABLE}"\nlisten = ["unix:from-file.sock", "tcp://127.0.0.1:0"]\n'
        f'data_dir = "{tmp_path}"\n'
    )
    # the flag's database wins over the file's unreachable one; the file's listeners are used
    async with _serve(["--config", str(config), "--postgres-url", db_url]) as serving:
        assert f"listening on unix:{tmp_path / 'from-file.sock'}" in serving.text
        status, _ = await _http_get(await trio.open_unix_socket(str(tmp_path / "from-file.sock")), "/healthz")
        assert status == 200
        serving.process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await serving.process.wait() == 0


def test_migrate_is_idempotent(empty_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        result = _main(capsys, "migrate", "--postgres-url", empty_db_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().startswith("agentd: database schema is current")


def test_migrate_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(_main(capsys, "migrate", "--postgres-url", UNREACHABLE))
    assert line.startswith("agentd: cannot connect to PostgreSQL")


async def test_create_workspace_json_prints_tokens_that_match_rows(db_url: str, db: Database) -> None:
    result = await _agentd(
        "admin", "create-workspace", "--file", str(EXAMPLE), "--json", "--postgres-url", db_url
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"workspace_id", "agents"}
    assert [a["name"] for a in out["agents"]] == ["main", "sidecar"]
    for agent in out["agents"]:
        row = await db.fetchone(
            "SELECT a.auth_token_hash AS token, w.id::text AS workspace_id FROM workspace_agents a"
            " JOIN workspace_resources r ON r.id = a.resource_id"
            " JOIN workspace_builds b ON b.job_id = r.job_id"
            " JOIN workspaces w ON w.id = b.workspace_id WHERE a.id = %s",
            [agent["id"]],
        )
        assert row == {"token": token_digest(uuid.UUID(agent["token"])), "workspace_id": out["workspace_id"]}

    again = await _agentd("admin", "create-workspace", "--file", str(EXAMPLE), "--postgres-url", db_url)
    assert _one_error_line(again) == "agentd: workspace 'dev' already exists for owner 'alice'"


def test_create_workspace_text_output(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    result = _main(capsys, "admin", "create-workspace", "--file", str(EXAMPLE), "--postgres-url", db_url)
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("workspace dev ")
    assert lines[1].startswith("agent main id=") and " token=" in lines[1]


def test_create_workspace_bad_files_create_nothing(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "ws.toml"
    cases = {
        'name = "x"\n[owner\n': "invalid TOML",
        EXAMPLE.read_text().replace("[[agents.metadata]]\nkey", "[[agents.metadata]]\nkye", 1): (
            "agents[0].metadata[0].kye: unknown field"
        ),
        EXAMPLE.read_text().replace('sharing_level = "owner"', 'sharing_level = "everyone"'): (
            "agents[0].apps[0].sharing_level: must be one of owner, authenticated, organization, public"
        ),
    }
    for text, needle in cases.items():
        bad.write_text(text)
        result = _main(
            capsys, "admin", "create-workspace", "--file", str(bad), "--json", "--postgres-url", db_url
        )
        line = _one_error_line(result)
        assert line.startswith(f"agentd: {bad}: ")
        assert needle in line
        assert result.stdout == b""

    async def counts() -> list[int]:
        async with open_database(db_url) as db:
            tables = ("organizations", "templates", "workspaces", "workspace_agents", "provisioner_jobs")
            users = [await db.fetchval("SELECT count(*) FROM users WHERE NOT is_system")]
            return users + [await db.fetchval(f"SELECT count(*) FROM {table}") for table in tables]

    assert trio.run(counts) == [0] * 6


def test_create_workspace_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_error_line(
        _main(capsys, "admin", "create-workspace", "--file", str(EXAMPLE), "--postgres-url", UNREACHABLE)
    )
    assert line.startswith("agentd: cannot connect to PostgreSQL")


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory outside /tmp/pytest-of-<user>: pytest resets that one to mode 0700 whenever a test
    run starts, which locks out the unprivileged user pgserver runs PostgreSQL as when we are root."""
    path = Path(tempfile.mkdtemp(prefix="agentd-test-"))
    path.chmod(0o755)  # as root agentd refuses to open it up itself (no --allow-chmod)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_embedded_default_shared_with_admin_while_serving(private_dir: Path) -> None:
    """README command (1) in miniature: embedded PostgreSQL, healthz ok, admin beside serve, clean stop."""
    data = private_dir / "data"
    async with _serve(["--data-dir", str(data), "--listen", "tcp://127.0.0.1:0"]) as serving:
        assert (data / "agentd.sock").exists() is False  # only the listeners asked for
        port = serving.port()
        status, body = await _http_get(await trio.open_tcp_stream("127.0.0.1", port), "/healthz")
        assert status == 200 and body["database"] == {"ok": True}
        result = await _agentd(
            "admin", "create-workspace", "--file", str(EXAMPLE), "--json", "--data-dir", str(data)
        )
        assert result.returncode == 0, result.stderr
        created = json.loads(result.stdout)["agents"]
        assert len(created) == 2
        # `agentd agents` reads the same embedded server
        listed = await _agentd("agents", "--json", "--data-dir", str(data))
        assert listed.returncode == 0, listed.stderr
        assert {a["id"] for a in json.loads(listed.stdout)} == {a["id"] for a in created}
        # the admin processes exiting must not stop the server the daemon still uses
        status, body = await _http_get(await trio.open_tcp_stream("127.0.0.1", port), "/healthz")
        assert status == 200 and body["database"] == {"ok": True}
        serving.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await serving.process.wait() == 0, serving.text
    assert not (data / "postgres" / "postmaster.pid").exists()  # embedded server stopped


@pytest.mark.skipif(os.geteuid() != 0, reason="pgserver chmods parents only when run as root")
def test_root_refuses_to_chmod_data_dir_parents(
    private_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = private_dir / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    line = _one_error_line(_main(capsys, "migrate", "--data-dir", str(closed / "data")))
    assert f"would chmod g+rx,o+rx {closed} 0700->0755" in line
    assert "--allow-chmod" in line
    assert oct(closed.stat().st_mode & 0o777) == "0o700"  # nothing changed
    assert not (closed / "data").exists()


async def test_admin_beside_unit_style_serve_shares_the_embedded_server(private_dir: Path) -> None:
    """Like contrib/agentd.service: XDG_RUNTIME_DIR=/run/agentd (RuntimeDirectoryMode=0700). pgserver's
    lock lives there, so `agentd admin` with the same runtime dir joins the running server."""
    run = private_dir / "run"
    run.mkdir(mode=0o700)
    run.chmod(0o700)
    data = private_dir / "data"
    env = _env(XDG_RUNTIME_DIR=str(run))
    async with _serve(["--data-dir", str(data), "--listen", "tcp://127.0.0.1:0"], env=env) as serving:
        pid = (data / "postgres" / "postmaster.pid").read_text().split()[0]
        result = await _agentd(
            "admin", "create-workspace", "--file", str(EXAMPLE), "--data-dir", str(data), env=env
        )
        assert result.returncode == 0, result.stderr
        assert (run / "python_PostgresServer" / ".lockfile").exists()
        assert (data / "postgres" / "postmaster.pid").read_text().split()[0] == pid  # same server
        assert "lock directory" not in serving.text  # platformdirs accepted the runtime dir
        serving.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await serving.process.wait() == 0, serving.text
    assert not (data / "postgres" / "postmaster.pid").exists()


def test_unusable_data_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _one_error_line(_main(capsys, "migrate", "--data-dir", str(blocker / "data")))
    assert str(blocker) in line


@pytest.mark.parametrize(
    "command", [["migrate"], ["admin", "create-workspace", "--file", "w.toml"], ["agents"], ["serve"]]
)
def test_database_flags_are_one_declaration(command: list[str]) -> None:
    """Every command takes --config/--allow-chmod/--data-dir/--postgres-url the same way; only
    `serve` (whose data dir also holds the default socket) takes a data dir next to a URL."""
    both = ["--data-dir", "/srv/agentd", "--postgres-url", "postgresql://db/agentd"]
    if command == ["serve"]:
        args = build_parser().parse_args([*command, *both, "--allow-chmod", "--config", "c.toml"])
        assert (args.data_dir, args.postgres_url, args.allow_chmod) == (
            Path("/srv/agentd"),
            "postgresql://db/agentd",
            True,
        )
    else:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, *both])
