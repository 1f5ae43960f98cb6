"""Graceful stop of a real `agentd serve` (issue 11 item 3): SIGTERM drains the calls in flight and
writes every acknowledged row with a healthy database; with a black-holed one it still exits within
``shutdown_timeout`` + the documented margin, counting what it could not write; a second signal
ends it at once."""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from agentd.client import RpcClient
from agentd.handshake import upgrade_client
from agentd.mux import MuxSession
from agentd.mux.errors import MuxError
from agentd.proto import agent_pb2
from agentd.shutdown import MARGIN
from agentd.store import Database
from tests.pgforward import PausableForwarder
from tests.test_cli import Serving, _serve
from tests.test_e2e_serve import create_workspace

pytestmark = pytest.mark.slow

#: what the test allows beyond the daemon's own bound: interpreter exit, a loaded machine
SLACK = 2.0


@asynccontextmanager
async def agent_session(sock: Path, token: str) -> AsyncIterator[tuple[MuxSession, RpcClient]]:
    transport = await upgrade_client(await trio.open_unix_socket(str(sock)), token=token)
    session = MuxSession(transport, is_client=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        yield session, RpcClient(session)
        nursery.cancel_scope.cancel()


def serve_args(tmp_path: Path, url: str, shutdown_timeout: float) -> list[str]:
    config = tmp_path / "agentd.toml"
    config.write_text(f"shutdown_timeout = {shutdown_timeout}\n")
    return [
        *("--config", str(config), "--postgres-url", url, "--data-dir", str(tmp_path)),
        *("--listen", f"unix:{tmp_path / 'agentd.sock'}", "--metrics-listen", "tcp://127.0.0.1:0"),
    ]


def stats_request(connections: int = 0) -> agent_pb2.UpdateStatsRequest:
    return agent_pb2.UpdateStatsRequest(
        stats=agent_pb2.Stats(connection_count=connections, rx_bytes=1, tx_bytes=2)
    )


def logs_request(lines: int) -> agent_pb2.BatchCreateLogsRequest:
    return agent_pb2.BatchCreateLogsRequest(
        log_source_id=uuid.uuid4().bytes,
        logs=[agent_pb2.Log(output=f"line {i}", level=agent_pb2.Log.INFO) for i in range(lines)],
    )


async def count_rows(db: Database, table: str, agent_ids: Sequence[str]) -> int:
    return int(
        await db.fetchval(
            f"SELECT count(*) FROM {table} WHERE agent_id = ANY(%s)",
            ([uuid.UUID(a) for a in agent_ids],),
        )
    )


async def rpcs_in_flight(port: int) -> float:
    """The serving process's ``agentd_rpc_in_flight``."""
    status, body = await http_get(port, "/metrics")
    assert status == 200, body
    match = re.search(r"^agentd_rpc_in_flight (\S+)$", body, re.M)
    assert match, body
    return float(match.group(1))


async def lock_waiters(db: Database, text: str) -> int:
    """Statements (of this database) waiting for a lock whose text contains ``text``: the log insert
    starts ``WITH agent AS``, the activity bump ``WITH req AS`` (pg_stat_activity keeps only the
    first 1 KiB of a query)."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE %s",
            (f"%{text}%",),
        )
    )


async def http_get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def operator_port(serving: Serving) -> int:
    match = re.search(r"serving /metrics on tcp://127\.0\.0\.1:(\d+)", serving.text)
    assert match, serving.text
    return int(match.group(1))


def lost_stats(text: str) -> int:
    match = re.search(r"(\d+) acknowledged agent stats rows (?:were )?not written", text)
    assert match, text
    return int(match.group(1))


async def test_sigterm_lets_calls_in_flight_finish_and_loses_no_row(
    db_url: str, db: Database, tmp_path: Path
) -> None:
    """Calls blocked in a (healthy, slow) database when SIGTERM lands all complete; no new call may
    start (GoAway); /healthz says draining; every acknowledged log line and stats row is in the table."""
    sock = tmp_path / "agentd.sock"
    async with _serve(serve_args(tmp_path, db_url, shutdown_timeout=20)) as serving:
        created = await create_workspace(db_url)
        agents = created["agents"]
        ids = [a["id"] for a in agents]
        locked, release = trio.Event(), trio.Event()

        async def hold_locks() -> None:
            # EXCLUSIVE blocks the writers (INSERT/UPDATE) and lets readers through.
            async with db.transaction() as tx:
                await tx.execute(
                    "LOCK TABLE workspace_agent_logs, workspace_agent_stats, workspace_builds"
                    " IN EXCLUSIVE MODE"
                )
                locked.set()
                await release.wait()

        outcomes: list[tuple[str, object]] = []
        logs_lines, logs_calls, stats_calls = 7, 0, 0

        async def call(kind: str, fn: Any, request: Any) -> None:
            try:
                await fn(request)
            except Exception as exc:
                outcomes.append((kind, exc))
            else:
                outcomes.append((kind, "ok"))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                sessions = []
                for agent in agents:
                    for _ in range(2):
                        sessions.append(await nursery.start(_hold_session, sock, agent["token"]))
                nursery.start_soon(hold_locks)
                await locked.wait()
                bumps = 0
                async with trio.open_nursery() as calls:
                    # The pool has 10 connections: at most that many calls can wait in PostgreSQL.
                    for i, (_, client) in enumerate(sessions):
                        calls.start_soon(call, "logs", client.agent.BatchCreateLogs, logs_request(logs_lines))
                        logs_calls += 1
                        calls.start_soon(call, "stats", client.agent.UpdateStats, stats_request())
                        stats_calls += 1
                        if i % 2:
                            # connections > 0: the call bumps the workspace's activity (waits too)
                            calls.start_soon(call, "stats", client.agent.UpdateStats, stats_request(1))
                            stats_calls += 1
                            bumps += 1
                    # Every log insert and every activity bump waits for the lock: they are in flight
                    # (the bumps share statements: one waits in PostgreSQL, the rest queue behind it).
                    while await lock_waiters(db, "WITH agent AS") < logs_calls:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    while await lock_waiters(db, "WITH req AS") < 1:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    port = operator_port(serving)
                    while await rpcs_in_flight(port) < logs_calls + bumps:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    assert not [o for o in outcomes if o[0] == "logs"]
                    serving.process.send_signal(signal.SIGTERM)
                    await trio.sleep(1.0)
                    # Still running, nothing cut off, and draining is visible to operators.
                    assert serving.process.poll() is None, serving.text
                    assert not [o for o in outcomes if o[0] == "logs"], outcomes
                    status, body = await http_get(operator_port(serving), "/healthz")
                    assert (status, '"draining"' in body) == (503, True), body
                    # A new call may not start: the session said GoAway.
                    _, client = sessions[0]
                    with pytest.raises(MuxError, match="not accepting"):
                        await client.agent.UpdateStats(stats_request())
                    release.set()
                    released = trio.current_time()
                assert await serving.process.wait() == 0, serving.text
                print(
                    f"\nhealthy: exited {trio.current_time() - released:.2f} s after the calls could finish"
                )
                nursery.cancel_scope.cancel()
        failures = [o for o in outcomes if o[1] != "ok"]
        assert not failures, (failures, serving.text)
        assert len(outcomes) == logs_calls + stats_calls
        assert await count_rows(db, "workspace_agent_logs", ids) == logs_calls * logs_lines
        assert await count_rows(db, "workspace_agent_stats", ids) == stats_calls
        assert "not written" not in serving.text, serving.text


async def _hold_session(
    sock: Path, token: str, *, task_status: trio.TaskStatus[tuple[MuxSession, RpcClient]]
) -> None:
    async with agent_session(sock, token) as pair:
        task_status.started(pair)
        await trio.sleep_forever()


def forwarded(url: str, port: int) -> str:
    return make_conninfo(url, host="127.0.0.1", port=str(port))


@asynccontextmanager
async def blackholed_daemon(
    db_url: str, db: Database, tmp_path: Path, shutdown_timeout: float
) -> AsyncIterator[tuple[Serving, int, list[str], int]]:
    """A daemon whose database goes silent while 6 agent sessions are connected: yields the daemon,
    the stats rows written before, the agent ids, and how many stats rows were acknowledged after
    (held by the batcher). One BatchCreateLogs per session hangs in the database."""
    params = conninfo_to_dict(db_url)
    host = str(params.get("host") or "127.0.0.1")
    if host.startswith("/"):
        pytest.skip("the forwarder needs PostgreSQL over TCP (AGENTD_TEST_POSTGRES_URL)")
    forwarder = PausableForwarder(host, int(params.get("port") or 5432))
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        url = forwarded(db_url, forwarder.port)
        sock = tmp_path / "agentd.sock"
        async with _serve(serve_args(tmp_path, url, shutdown_timeout)) as serving:
            created = await create_workspace(db_url)
            ids = [a["id"] for a in created["agents"]]
            assert serving.process.poll() is None, serving.text
            with trio.fail_after(60):
                sessions = []
                for agent in created["agents"]:
                    for _ in range(3):
                        sessions.append(await nursery.start(_hold_session, sock, agent["token"]))
                for _, client in sessions:
                    await client.agent.UpdateStats(stats_request())
                # Another process writes them: poll the database.
                while (before := await count_rows(db, "workspace_agent_stats", ids)) < len(sessions):  # noqa: ASYNC110
                    await trio.sleep(0.05)
                forwarder.pause()
                acknowledged = 0
                for _, client in sessions:
                    for _ in range(4):
                        await client.agent.UpdateStats(stats_request())
                        acknowledged += 1

                async def stuck_call(client: RpcClient) -> None:
                    try:
                        await client.agent.BatchCreateLogs(logs_request(3))
                    except Exception:
                        pass

                for _, client in sessions:
                    nursery.start_soon(stuck_call, client)
                await trio.sleep(0.5)
            yield serving, before, ids, acknowledged
            forwarder.cut()
        nursery.cancel_scope.cancel()


async def test_sigterm_with_a_blackholed_database_exits_within_the_bound(
    db_url: str, db: Database, tmp_path: Path
) -> None:
    timeout = 3.0
    async with blackholed_daemon(db_url, db, tmp_path, timeout) as (serving, before, ids, acknowledged):
        start = trio.current_time()
        serving.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout + MARGIN + SLACK + 30):
            await serving.process.wait()
        took = trio.current_time() - start
        assert serving.process.returncode is not None, serving.text
        print(f"\nblackholed, shutdown_timeout={timeout:g}: exited {took:.2f} s after SIGTERM")
        assert took <= timeout + MARGIN + SLACK, f"{took:.1f} s\n{serving.text}"
    # Nothing sent during the pause reached PostgreSQL; the log line counts exactly those rows.
    assert await count_rows(db, "workspace_agent_stats", ids) == before
    assert lost_stats(serving.text) == acknowledged, serving.text


async def test_second_signal_ends_at_once(db_url: str, db: Database, tmp_path: Path) -> None:
    timeout = 20.0
    async with blackholed_daemon(db_url, db, tmp_path, timeout) as (serving, _, _, acknowledged):
        serving.process.send_signal(signal.SIGTERM)
        await trio.sleep(1.0)
        assert serving.process.poll() is None  # draining: the stuck calls get shutdown_timeout
        start = trio.current_time()
        serving.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            await serving.process.wait()
        took = trio.current_time() - start
        assert serving.process.returncode is not None, serving.text
        print(f"\nblackholed: exited {took:.2f} s after the second SIGTERM")
        assert took <= 1.0 + SLACK, f"{took:.1f} s\n{serving.text}"
    assert lost_stats(serving.text) == acknowledged, serving.text
