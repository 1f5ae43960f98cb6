"""`agentd serve --workers N` (agentd.workers): real processes on the test PostgreSQL.

The parent binds the listeners and supervises N workers (each today's daemon); these tests start it
as `agentd serve --workers 2`, dial agents over TCP (SO_REUSEPORT sockets, one per worker) and the
shared Unix socket, and check what an operator sees: /metrics and /healthz for the whole host, a
SIGKILLed worker restarted and its agents served again, SIGTERM and SIGHUP reaching every worker.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.samples import Sample

from agentd.client import RpcClient
from agentd.config import ConfigError, build_config
from agentd.handshake import upgrade_client
from agentd.mux import MuxSession
from agentd.proto import agent_pb2
from agentd.store import Database
from agentd.store.testing import SeededAgent, seed_workspace
from agentd.workers import merge_expositions
from tests.test_cli import _agentd, _env, _http_get, _main, _one_error_line, _serve, private_dir
from tests.test_metrics import families

__all__ = ["private_dir"]  # a fixture

READY = re.compile(rb"ready: (\d+) workers \(pids ([\d, ]+)\)")


# -------------------------------------------------------------------------------------------------
# merging expositions (no processes)


def test_merge_sums_agentd_series_and_keeps_the_newest_agent_series() -> None:
    worker0 = "\n".join(
        [
            "# HELP agentd_agentstats_cpu Reported by workspace agents.",
            "# TYPE agentd_agentstats_cpu gauge",
            'agentd_agentstats_cpu{agent_name="a",note="x} y"} 1 1000',
            'agentd_agentstats_cpu{agent_name="b"} 5 1000',
            "# HELP agentd_stats_dropped_total Dropped.",
            "# TYPE agentd_stats_dropped_total counter",
            "agentd_stats_dropped_total 2",
            "# HELP h Build durations.",
            "# TYPE h histogram",
            'h_bucket{le="1"} 1',
            'h_bucket{le="+Inf"} 2',
            "h_sum 3.5",
            "h_count 2",
        ]
    )
    worker1 = "\n".join(
        [
            "# HELP agentd_agentstats_cpu Reported by workspace agents.",
            "# TYPE agentd_agentstats_cpu gauge",
            'agentd_agentstats_cpu{agent_name="a",note="x} y"} 7 2000',  # newer: the agent moved here
            'agentd_agentstats_cpu{agent_name="c"} 9 1500',
            "# HELP agentd_stats_dropped_total Dropped.",
            "# TYPE agentd_stats_dropped_total counter",
            "agentd_stats_dropped_total 3",
            "# HELP h Build durations.",
            "# TYPE h histogram",
            'h_bucket{le="1"} 0',
            'h_bucket{le="+Inf"} 1',
            "h_sum 1",
            "h_count 1",
        ]
    )
    merged = merge_expositions([worker0, worker1])
    assert families(merged) == {
        "agentd_agentstats_cpu": (
            "gauge",
            "Reported by workspace agents.",
            [
                Sample("agentd_agentstats_cpu", {"agent_name": "a", "note": "x} y"}, 7.0),
                Sample("agentd_agentstats_cpu", {"agent_name": "b"}, 5.0),
                Sample("agentd_agentstats_cpu", {"agent_name": "c"}, 9.0),
            ],
        ),
        "agentd_stats_dropped_total": (
            "counter",
            "Dropped.",
            [Sample("agentd_stats_dropped_total", {}, 5.0)],
        ),
        "h": (
            "histogram",
            "Build durations.",
            [
                Sample("h_bucket", {"le": "1"}, 1.0),
                Sample("h_bucket", {"le": "+Inf"}, 3.0),
                Sample("h_sum", {}, 4.5),
                Sample("h_count", {}, 3.0),
            ],
        ),
    }
    assert " 2000" not in merged and " 1500" not in merged  # the timestamps are not repeated
    # the order of the workers does not matter for the newest-wins rule
    swapped = families(merge_expositions([worker1, worker0]))
    assert {name: sorted(map(repr, f[2])) for name, f in swapped.items()} == {
        name: sorted(map(repr, f[2])) for name, f in families(merged).items()
    }


# -------------------------------------------------------------------------------------------------
# configuration


def test_workers_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_config(workers=4).workers == 4
    assert build_config().workers == 1
    for bad in ("0", "65", "-1"):
        result = _main(capsys, "serve", "--workers", bad, "--data-dir", str(tmp_path))
        assert _one_error_line(result) == f"agentd: --workers must be a whole number in 1..64, got {bad}"
    config = tmp_path / "agentd.toml"
    config.write_text("workers = 1.5\n")
    result = _main(capsys, "serve", "--config", str(config), "--data-dir", str(tmp_path))
    assert (
        _one_error_line(result)
        == f"agentd: {config}: field 'workers' must be a whole number in 1..64, got 1.5"
    )
    config.write_text("workers = 100\n")
    result = _main(capsys, "serve", "--config", str(config), "--data-dir", str(tmp_path))
    assert (
        _one_error_line(result)
        == f"agentd: {config}: field 'workers' must be a whole number in 1..64, got 100"
    )
    config.write_text('coordinator = "memory"\n')
    result = _main(capsys, "serve", "--config", str(config), "--workers", "2", "--data-dir", str(tmp_path))
    assert _one_error_line(result) == (
        'agentd: workers = 2 needs coordinator = "postgres": with "memory" each worker would be a '
        "tailnet of its own"
    )
    with pytest.raises(ConfigError):
        build_config(config_file=config, workers=3)
    assert build_config(config_file=config, workers=1).coordinator == "memory"


# -------------------------------------------------------------------------------------------------
# real processes


@attrs.define
class Host:
    process: trio.Process
    stderr: bytearray
    pids: list[int]
    port: int
    metrics_port: int
    sock: Path

    @property
    def text(self) -> str:
        return self.stderr.decode()


def _port_of(text: str, what: str) -> int:
    for line in text.splitlines():
        if "agentd.workers" in line and what in line:
            return int(line.split("tcp://127.0.0.1:", 1)[1].split()[0])
    raise AssertionError(text)


@asynccontextmanager
async def _host(args: Sequence[str], tmp_path: Path, *, workers: int = 2) -> AsyncIterator[Host]:
    sock = tmp_path / "agentd.sock"
    command = [
        sys.executable,
        "-m",
        "agentd",
        "serve",
        "--workers",
        str(workers),
        "--data-dir",
        str(tmp_path),
        "--listen",
        f"unix:{sock}",
        "--listen",
        "tcp://127.0.0.1:0",
        "--metrics-listen",
        "tcp://127.0.0.1:0",
        *args,
    ]
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE, env=_env())
        stderr = bytearray()
        ready = trio.Event()

        async def pump() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some(65536):
                stderr.extend(chunk)
                if READY.search(stderr):
                    ready.set()
            ready.set()

        nursery.start_soon(pump)
        try:
            with trio.fail_after(90):
                await ready.wait()
            match = READY.search(stderr)
            assert match is not None and process.poll() is None, stderr.decode()
            text = stderr.decode()
            host = Host(
                process,
                stderr,
                [int(p) for p in match.group(2).decode().split(", ")],
                _port_of(text, "listening on tcp://"),
                _port_of(text, "serving /metrics on tcp://"),
                sock,
            )
            assert len(host.pids) == workers
            yield host
        finally:
            if process.poll() is None:
                process.kill()  # the workers notice their parent's pipe closing and stop
            await process.wait()
            nursery.cancel_scope.cancel()


async def _get(port: int, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: agentd\r\n\r\n".encode())
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def _healthz(host: Host) -> dict[str, Any]:
    status, body = await _get(host.metrics_port, "/healthz")
    answer: dict[str, Any] = json.loads(body)
    assert status == (200 if answer["status"] != "unavailable" else 503)
    return answer


@attrs.define(eq=False)
class Agent:
    """An agent session dialled like Coder's agent; `served` is the replica the daemon recorded."""

    seeded: SeededAgent
    session: MuxSession
    cancel: trio.CancelScope

    @property
    def client(self) -> RpcClient:
        return RpcClient(self.session)


async def _dial(
    nursery: trio.Nursery, seeded: SeededAgent, host: Host, *, unix: bool = False, metric: float | None = None
) -> Agent:
    if unix:
        stream: trio.abc.Stream = await trio.open_unix_socket(str(host.sock))
    else:
        stream = await trio.open_tcp_stream("127.0.0.1", host.port)
    session = MuxSession(await upgrade_client(stream, token=str(seeded.auth_token)), is_client=True)
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await session.run()

    nursery.start_soon(run)
    agent = Agent(seeded, session, scope)
    await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
    if metric is not None:
        gauge = agent_pb2.Stats.Metric(name="load", type=agent_pb2.Stats.Metric.GAUGE, value=metric)
        await agent.client.agent.UpdateStats(
            agent_pb2.UpdateStatsRequest(stats=agent_pb2.Stats(metrics=[gauge]))
        )
    return agent


async def _replica_of(db: Database, agent_id: uuid.UUID) -> uuid.UUID:
    """The replica that recorded the agent's current connection (polled: another process writes it)."""
    with trio.fail_after(20):
        while True:
            row = await db.fetchone(
                "SELECT last_connected_replica_id, disconnected_at, last_connected_at FROM workspace_agents "
                "WHERE id = %s",
                (agent_id,),
            )
            assert row is not None
            if row["last_connected_replica_id"] is not None and row["disconnected_at"] is None:
                replica: uuid.UUID = row["last_connected_replica_id"]
                return replica
            await trio.sleep(0.05)


AGENTS = tuple(f"a{i}" for i in range(12))


@pytest.mark.slow
async def test_two_workers_share_the_listeners_and_report_as_one_host(
    db_url: str, db: Database, tmp_path: Path
) -> None:
    ws = await seed_workspace(db, agents=AGENTS)
    async with _host(["--postgres-url", db_url], tmp_path) as host, trio.open_nursery() as nursery:
        assert len(set(host.pids)) == 2 and os.getpid() not in host.pids
        health = await _healthz(host)
        assert health["status"] == "ok"
        assert [(w["worker"], w["pid"], w["status"]) for w in health["workers"]] == [
            (0, host.pids[0], "ok"),
            (1, host.pids[1], "ok"),
        ]
        assert all(w["database"] == {"ok": True} for w in health["workers"])

        agents = []
        with trio.fail_after(60):
            for i, name in enumerate(AGENTS):
                # the last two over the shared unix socket, the rest over TCP (SO_REUSEPORT)
                agents.append(
                    await _dial(nursery, ws.agent(name), host, unix=i >= len(AGENTS) - 2, metric=float(i))
                )
            replicas = [await _replica_of(db, agent.seeded.id) for agent in agents]
        # The kernel spread the TCP connections over both workers (2 x 0.5^10 chance to fail).
        assert len(set(replicas[:-2])) == 2, replicas

        status, body = await _get(host.metrics_port, "/metrics")
        assert status == 200
        text = body.decode()
        parsed = families(text)
        load = {s.labels["agent_name"]: s for s in parsed["agentd_agentstats_load"][2]}
        for i, name in enumerate(AGENTS):  # every agent's series, whichever worker it reported to
            assert load[name].value == i and load[name].timestamp is None, text
        assert text.count("# TYPE agentd_agentstats_load gauge") == 1
        assert text.count("# TYPE agentd_agent_metrics_invalid_total counter") == 1
        assert parsed["agentd_worker_up"][2] == [
            Sample("agentd_worker_up", {"worker": "0"}, 1.0),
            Sample("agentd_worker_up", {"worker": "1"}, 1.0),
        ]
        assert (
            Sample("agentd_worker_restarts_total", {"worker": "1"}, 0.0)
            in parsed["agentd_worker_restarts_total"][2]
        )
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_and_its_agents_redial(
    db_url: str, db: Database, tmp_path: Path
) -> None:
    ws = await seed_workspace(db, agents=AGENTS)
    async with _host(["--postgres-url", db_url], tmp_path) as host, trio.open_nursery() as nursery:
        with trio.fail_after(60):
            agents = [await _dial(nursery, ws.agent(name), host) for name in AGENTS]
            replicas = [await _replica_of(db, agent.seeded.id) for agent in agents]
        assert len(set(replicas)) == 2, replicas
        victim_replica = replicas[0]
        victims = [a for a, r in zip(agents, replicas, strict=True) if r == victim_replica]
        others = [a for a, r in zip(agents, replicas, strict=True) if r != victim_replica]
        # Which worker serves the victims? The one that, stopped (SIGSTOP), leaves their RPCs unanswered.
        victim_pid = None
        for pid in host.pids:
            os.kill(pid, signal.SIGSTOP)
            try:
                with trio.move_on_after(1.0) as probe:
                    await victims[0].client.agent.GetAnnouncementBanners(
                        agent_pb2.GetAnnouncementBannersRequest()
                    )
            finally:
                os.kill(pid, signal.SIGCONT)
            if probe.cancelled_caught:
                victim_pid = pid
                break
        assert victim_pid is not None
        os.kill(victim_pid, signal.SIGKILL)
        killed = trio.current_time()

        with trio.fail_after(30):
            for agent in victims:  # their sessions end ...
                with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                    await agent.session.accept_stream()
            # ... and they are served again at once (by the other worker, or by the restarted one)
            for agent in victims:
                again = await _dial(nursery, agent.seeded, host)
                await again.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
            reconnected = trio.current_time() - killed
            # the other worker's agents never noticed
            for agent in others:
                await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
            # the parent restarts the worker: a new pid in its slot, counted in /healthz and /metrics
            while True:
                health = await _healthz(host)
                if health["status"] == "ok" and sum(w["restarts"] for w in health["workers"]) == 1:
                    break
                await trio.sleep(0.1)
        pids = [w["pid"] for w in health["workers"]]
        assert victim_pid not in pids and len(set(pids)) == 2
        assert "restarting it in" in host.text and "was killed by SIGKILL" in host.text
        _, body = await _get(host.metrics_port, "/metrics")
        restarts = families(body.decode())["agentd_worker_restarts_total"][2]
        assert sorted(s.value for s in restarts) == [0.0, 1.0]
        assert reconnected < 10, reconnected
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_sigterm_stops_every_worker_and_sighup_reaches_them(
    db_url: str, db: Database, tmp_path: Path
) -> None:
    ws = await seed_workspace(db, agents=("main",))
    config = tmp_path / "agentd.toml"
    config.write_text('log_level = "info"\nshutdown_timeout = 3\n')
    async with (
        _host(["--postgres-url", db_url, "--config", str(config)], tmp_path) as host,
        trio.open_nursery() as nursery,
    ):
        config.write_text('log_level = "debug"\nshutdown_timeout = 3\n')
        host.process.send_signal(signal.SIGHUP)
        with trio.fail_after(20):
            while not all(f"[worker {i}] agentd: log level is now debug" in host.text for i in (0, 1)):  # noqa: ASYNC110
                await trio.sleep(0.05)
            while "agentd.workers: reloaded 2 workers" not in host.text:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert host.process.poll() is None

        agent = await _dial(nursery, ws.agent("main"), host, unix=True)
        host.process.send_signal(signal.SIGTERM)
        start = trio.current_time()
        with trio.fail_after(3 + 10 + 5):
            with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                await agent.session.accept_stream()
            assert await host.process.wait() == 0, host.text
        assert trio.current_time() - start < 3 + 10
        for pid in host.pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not host.sock.exists()  # the parent bound it and removed it
        assert "stopping 2 workers" in host.text and "Traceback" not in host.text
        row = await db.fetchone(
            "SELECT disconnected_at FROM workspace_agents WHERE id = %s", (agent.seeded.id,)
        )
        assert row is not None and row["disconnected_at"] is not None
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_one_worker_is_todays_single_process(db_url: str, tmp_path: Path) -> None:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "agentd",
            "serve",
            "--workers",
            "1",
            "--postgres-url",
            db_url,
            "--data-dir",
            str(tmp_path),
            "--listen",
            "tcp://127.0.0.1:0",
            "--metrics-listen",
            "none",
        ],
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert process.stderr is not None
    text = b""
    with trio.fail_after(60):
        while b" ready" not in text:
            text += await process.stderr.receive_some(65536)
    assert b"agentd.workers" not in text and b"[worker" not in text
    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


async def test_startup_errors_with_workers_are_one_line(tmp_path: Path) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nothing"
    sock = tmp_path / "agentd.sock"
    result = await _agentd(
        "serve", "--workers", "2", "--postgres-url", unreachable, "--listen", f"unix:{sock}",
        "--data-dir", str(tmp_path), "--metrics-listen", "none", "--log-level", "error",
    )  # fmt: skip
    assert _one_error_line(result).startswith("agentd: cannot connect to PostgreSQL at ")
    assert not sock.exists()  # the parent removed what it bound
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = await _agentd(
            "serve", "--workers", "2", "--postgres-url", unreachable, "--listen",
            f"tcp://127.0.0.1:{port}", "--data-dir", str(tmp_path),
        )  # fmt: skip
    finally:
        taken.close()
    assert (
        _one_error_line(result) == f"agentd: cannot listen on tcp://127.0.0.1:{port}: address already in use"
    )


@pytest.mark.slow
async def test_socket_activated_parent_notifies_for_all_workers(db_url: str, tmp_path: Path) -> None:
    """systemd passes the socket to the parent; the parent alone talks to NOTIFY_SOCKET: READY=1 once
    both workers are ready, WATCHDOG=1 only while both are alive, STOPPING=1 at the end."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.fileno()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    messages: list[tuple[float, str]] = []

    async def receive() -> None:
        while True:
            await trio.lowlevel.wait_readable(notify)
            data = notify.recv(4096).decode()
            messages.append((trio.current_time(), data.split("\n")[0]))

    command = (
        f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -m agentd serve --workers 2 '
        f'--postgres-url "{db_url}" --metrics-listen none --data-dir "{tmp_path}"'
    )
    env = _env(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="200000")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        async with _serve(
            [], command=["sh", "-c", command], pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3), env=env
        ) as serving:
            with trio.fail_after(60):
                while not READY.search(serving.stderr):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            pids = [int(p) for p in READY.search(serving.stderr).group(2).decode().split(", ")]  # type: ignore[union-attr]
            assert f"listening on unix:{path} (systemd) (2 workers)" in serving.text
            listener.close()  # only agentd holds the socket now
            for _ in range(4):  # either worker answers on the shared socket
                status, body = await _http_get(await trio.open_unix_socket(str(path)), "/healthz")
                assert status == 200 and body["database"] == {"ok": True}
            await trio.sleep(0.5)
            assert next(m for _, m in messages) == "READY=1"
            assert "WATCHDOG=1" in [m for _, m in messages[1:]]
            os.kill(pids[1], signal.SIGKILL)
            killed = trio.current_time()
            with trio.fail_after(60):
                while "is ready again" not in serving.text:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            back = trio.current_time()
            await trio.sleep(0.5)
            # No ping while worker 1 was dead (restart backoff ≥ 0.25 s plus its start-up); pings again now.
            pings = [t for t, m in messages if m == "WATCHDOG=1"]
            gap = max(b - a for a, b in itertools.pairwise(pings) if b > killed)
            assert gap >= 0.25 + 0.2, (gap, back - killed)
            assert pings[-1] > back
            serving.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await serving.process.wait() == 0, serving.text
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    texts = [m for _, m in messages]
    assert texts.count("READY=1") == 1 and texts[-1] == "STOPPING=1"
    assert path.exists()  # systemd's socket file, not ours to remove
    notify.close()


@pytest.mark.slow
async def test_workers_stop_when_the_parent_is_killed(db_url: str, tmp_path: Path) -> None:
    async with _host(["--postgres-url", db_url], tmp_path) as host:
        host.process.send_signal(signal.SIGKILL)
        await host.process.wait()
        with trio.fail_after(30):
            for pid in host.pids:
                while "Z" not in _proc_state(pid):  # noqa: ASYNC110
                    await trio.sleep(0.05)
        assert "the parent process is gone; stopping" in host.text


def _proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after `(comm)`: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _proc_state(pid: int) -> str:
    try:
        return _proc_stat(pid)[0]
    except OSError:
        return "Z"  # gone


@pytest.mark.slow
async def test_parent_owns_the_embedded_server(private_dir: Path) -> None:
    data = private_dir / "data"
    async with _host([], data) as host:
        health = await _healthz(host)
        assert [w["status"] for w in health["workers"]] == ["ok", "ok"]
        postmaster = (data / "postgres" / "postmaster.pid").read_text().split()[0]
        parent = _proc_stat(int(postmaster))[1]
        assert int(parent) not in host.pids  # started by the parent (via pg_ctl), not by a worker
        host.process.send_signal(signal.SIGTERM)
        with trio.fail_after(40):
            assert await host.process.wait() == 0, host.text
    assert not (data / "postgres" / "postmaster.pid").exists()  # stopped with the parent


def test_agent_series_carry_their_report_time_on_request() -> None:
    from agentd.metrics import AgentLabels, AgentMetrics, ReportedMetric

    clock = [100.0]
    metrics = AgentMetrics(clock=lambda: clock[0])
    metrics.update(AgentLabels("u", "w", "a", "t"), [ReportedMetric("load", "gauge", 2.0)])
    clock[0] += 5.0  # reported 5 s ago
    identity = {"username": "u", "workspace_name": "w", "agent_name": "a", "template_name": "t"}
    [plain] = families(metrics.render())["agentd_agentstats_load"][2]
    assert plain == Sample("agentd_agentstats_load", identity, 2.0)  # no timestamp
    [stamped] = families(metrics.render(timestamps=True))["agentd_agentstats_load"][2]
    assert (stamped.name, stamped.labels, stamped.value) == (plain.name, plain.labels, plain.value)
    assert stamped.timestamp is not None
    assert abs(float(stamped.timestamp) - (time.time() - 5.0)) < 2
