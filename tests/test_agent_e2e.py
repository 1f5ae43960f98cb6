"""End to end with three processes: ``agentd serve``, ``agentd admin create-workspace --json`` and
``agentd agent`` — over the Unix socket (raw yamux) and over TCP (WebSocket) — reaching ``ready``
with logs, script timings, metadata and stats in the database; Ctrl-C then reports the shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from agentd.agent import AGENT_VERSION
from agentd.store import Database
from tests.test_cli import EXAMPLE, _agentd, _env, _serve
from tests.test_cli import private_dir as private_dir  # the fixture

pytestmark = pytest.mark.slow


@attrs.define(eq=False)
class AgentProcess:
    process: trio.Process
    output: bytearray = attrs.field(factory=bytearray)
    _grew: trio.Event = attrs.field(factory=trio.Event)

    @property
    def lines(self) -> list[str]:
        return self.output.decode(errors="replace").splitlines()

    async def pump(self) -> None:
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.receive_some(65536):
            self.output += chunk
            self._grew.set()
            self._grew = trio.Event()
        self._grew.set()

    async def wait_for(self, text: str) -> None:
        with trio.fail_after(90):
            while not any(text in line for line in self.lines):
                if self.process.poll() is not None and not self._grew.is_set():
                    raise AssertionError(f"agent exited before {text!r}:\n{self.output.decode()}")
                await self._grew.wait()


@asynccontextmanager
async def agent_process(*args: str) -> AsyncIterator[AgentProcess]:
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "agentd", "agent", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        agent = AgentProcess(process)
        nursery.start_soon(agent.pump)
        try:
            yield agent
        finally:
            if process.poll() is None:
                process.kill()
            with trio.move_on_after(10):
                await process.wait()


async def check_rows(db: Database, agent_id: uuid.UUID, state: str) -> None:
    row = await db.fetchone(
        "SELECT lifecycle_state::text AS state, version, ready_at FROM workspace_agents WHERE id = %s",
        (agent_id,),
    )
    assert row is not None and row["state"] == state and row["version"] == AGENT_VERSION
    logs = await wait_rows(  # sent within ~1 s of the output
        db, "SELECT output FROM workspace_agent_logs WHERE agent_id = %s ORDER BY id", (agent_id,)
    )
    assert [log["output"] for log in logs][:5] == [
        "installing code-server",
        "step 1",
        "step 2",
        "step 3",
        "done",
    ]
    timings = await wait_rows(
        db,
        "SELECT t.stage::text, t.status::text FROM workspace_agent_script_timings t "
        "JOIN workspace_agent_scripts s ON s.id = t.script_id WHERE s.workspace_agent_id = %s "
        "ORDER BY t.started_at",
        (agent_id,),
    )
    assert timings[0] == {"stage": "start", "status": "ok"}


async def wait_rows(db: Database, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Rows the daemon's batchers write (metadata every 5 s, stats every 1 s): poll another process."""
    with trio.fail_after(60):
        while not (rows := await db.fetchall(sql, params)):  # noqa: ASYNC110 - another process writes
            await trio.sleep(0.2)
    return rows


async def test_agent_process_reaches_ready_over_unix_yamux_and_tcp_websocket(
    db_url: str, db: Database, tmp_path: Path
) -> None:
    sock = tmp_path / "agentd.sock"
    workspace = EXAMPLE  # its scripts run anywhere: the README demo and this test are the same run
    # Agents report stats every 2 s here (the operator's knob; 30 s by default), so the test need not
    # wait out Coder's default interval to see a stats row.
    args = ["--postgres-url", db_url, "--data-dir", str(tmp_path), "--listen", f"unix:{sock}"]
    args += ["--agent-stats-refresh-interval", "2"]
    async with _serve([*args, "--listen", "tcp://127.0.0.1:0"]) as serving:
        created = await _agentd(
            "admin", "create-workspace", "--file", str(workspace), "--json", "--postgres-url", db_url
        )
        assert created.returncode == 0, created.stderr.decode()
        agents = json.loads(created.stdout)["agents"]
        main, sidecar = agents[0], agents[1]

        # Unix socket, raw yamux: ready with rows; stats after the 2 s report interval.
        async with agent_process("--url", f"unix:{sock}", "--token", main["token"]) as agent:
            await agent.wait_for("lifecycle ready")
            await agent.wait_for("stats interval 2s")
            await agent.wait_for("coordinator: sent node")
            main_id = uuid.UUID(main["id"])
            await check_rows(db, main_id, "ready")
            metadata = await wait_rows(
                db,
                "SELECT key, value FROM workspace_agent_metadata WHERE workspace_agent_id = %s "
                "AND value <> '' ORDER BY key",
                (main_id,),
            )
            [cpu] = [m for m in metadata if m["key"] == "cpu"]
            float(cpu["value"])  # the 1-minute load average from /proc/loadavg

            # Meanwhile over TCP + WebSocket, the second agent (no scripts) with --exit-after-ready.
            port = serving.port()
            async with agent_process(
                "--url",
                f"tcp://127.0.0.1:{port}",
                "--websocket",
                "--token",
                sidecar["token"],
                "--exit-after-ready",
            ) as other:
                with trio.fail_after(60):
                    assert await other.process.wait() == 0, other.output.decode()
                assert f"agent: connected (websocket over tcp://127.0.0.1:{port})" in other.lines
                assert "agent: lifecycle ready" in other.lines
            row = await db.fetchone(
                "SELECT lifecycle_state::text AS state, version FROM workspace_agents WHERE id = %s",
                (uuid.UUID(sidecar["id"]),),
            )
            assert row == {"state": "ready", "version": AGENT_VERSION}

            await agent.wait_for("stats sent")
            stats = await wait_rows(
                db, "SELECT rx_bytes, tx_bytes FROM workspace_agent_stats WHERE agent_id = %s", (main_id,)
            )
            assert stats[0]["rx_bytes"] > 0 and stats[0]["tx_bytes"] > 0

            # Ctrl-C: shutting_down, the stop script, off; exit 0.
            agent.process.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                assert await agent.process.wait() == 0, agent.output.decode()
            assert "agent: lifecycle off" in agent.lines
            assert 'agent: script "echo backing up home" exited 0 (1 line logged)' in agent.lines
            assert agent.lines[-1] == "agent: exited"
        row = await db.fetchone(
            "SELECT lifecycle_state::text AS state FROM workspace_agents WHERE id = %s", (main_id,)
        )
        assert row == {"state": "off"}
        assert serving.process.poll() is None and "Traceback" not in serving.text, serving.text


async def test_agent_command_errors_are_one_line() -> None:
    bad_url = await _agentd("agent", "--url", "http://x", "--token", "t")
    assert bad_url.returncode == 1
    assert bad_url.stderr.decode().startswith("agentd: agent: --url 'http://x': expected unix:")
    no_token = await _agentd("agent", "--url", "unix:/nonexistent.sock", env=_env(CODER_AGENT_TOKEN=""))
    assert no_token.returncode == 1 and "--token" in no_token.stderr.decode()


@pytest.mark.parametrize("kill_mode", ["mixed", "control-group"])
async def test_stop_with_embedded_server_records_disconnects_only_under_killmode_mixed(
    private_dir: Path, kill_mode: str
) -> None:
    """contrib/agentd.service uses KillMode=mixed: SIGTERM to agentd alone, which records each agent's
    disconnect and then stops its PostgreSQL. systemd's default (control-group) also SIGTERMs every
    postgres process at once: final writes (disconnects, flushes) race the stopping server and fail."""
    import psutil

    from agentd.store import open_database
    from agentd.store.embedded import embedded_postgres

    data, sock = private_dir / "data", private_dir / "agentd.sock"
    async with _serve(["--data-dir", str(data), "--listen", f"unix:{sock}"]) as serving:
        created = await _agentd(
            "admin", "create-workspace", "--file", str(EXAMPLE), "--json", "--data-dir", str(data)
        )
        assert created.returncode == 0, created.stderr.decode()
        main = json.loads(created.stdout)["agents"][0]
        async with agent_process("--url", f"unix:{sock}", "--token", main["token"]) as agent:
            await agent.wait_for("lifecycle ready")
            postmaster = psutil.Process(int((data / "postgres" / "postmaster.pid").read_text().split()[0]))
            postgres = [postmaster, *postmaster.children(recursive=True)]
            serving.process.send_signal(signal.SIGTERM)
            if kill_mode == "control-group":
                for proc in postgres:
                    proc.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                await serving.process.wait()
    if kill_mode == "mixed":
        assert serving.process.returncode == 0, serving.text
        assert not (data / "postgres" / "postmaster.pid").exists()  # agentd stopped its server
    async with embedded_postgres(data) as url, open_database(url) as db:
        row = await db.fetchone(
            "SELECT disconnected_at FROM workspace_agents WHERE id = %s", (uuid.UUID(main["id"]),)
        )
    assert row is not None
    if kill_mode == "mixed":
        assert row["disconnected_at"] is not None, serving.text
    else:
        # PostgreSQL's smart shutdown lets sessions already open finish, so which final writes still
        # get through is a race; that some of them fail against the stopping server is not.
        failed = ("database system is shutting down", "terminating connection", "No such file or directory")
        assert any(text in serving.text for text in failed), serving.text
