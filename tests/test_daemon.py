"""The daemon in-process: /healthz on every listener, 503 when the database is gone, clean stop."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from agentd.config import Config, ConfigError, TcpAddress, UnixAddress
from agentd.daemon import Daemon, Health, build_router, raise_open_files_limit
from agentd.handshake import RPC_PATH
from agentd.http import HttpApp
from agentd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agentd.store import open_database


async def _get(stream: trio.abc.Stream, path: str) -> tuple[int, dict[str, object]]:
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: agentd\r\n\r\n".encode())
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


async def test_daemon_answers_healthz_on_unix_and_tcp_then_stops_cleanly(db_url: str, tmp_path: Path) -> None:
    sock = tmp_path / "agentd.sock"
    config = Config(
        data_dir=tmp_path,
        postgres_url=db_url,
        listen=(UnixAddress(sock), TcpAddress("127.0.0.1", 0)),
        shutdown_timeout=1,
        metrics_listen=None,  # not the default port 2112: others on this machine may hold it
    )
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        unix_name, tcp_name = daemon.listener_names
        assert unix_name == f"unix:{sock}"
        port = int(tcp_name.rsplit(":", 1)[1])

        for stream in (await trio.open_unix_socket(str(sock)), await trio.open_tcp_stream("127.0.0.1", port)):
            status, body = await _get(stream, "/healthz")
            assert status == 200
            assert body == {"status": "ok", "version": "0.1.0", "database": {"ok": True}}

        status, body = await _get(await trio.open_unix_socket(str(sock)), "/elsewhere")
        assert status == 404
        status, body = await _get(await trio.open_tcp_stream("127.0.0.1", port), RPC_PATH)
        assert status == 401

        daemon.request_stop()
    assert not sock.exists()


async def test_metrics_only_on_the_operator_listener(db_url: str, tmp_path: Path) -> None:
    sock = tmp_path / "agentd.sock"
    config = Config(
        data_dir=tmp_path,
        postgres_url=db_url,
        listen=(UnixAddress(sock), TcpAddress("127.0.0.1", 0)),
        metrics_listen=TcpAddress("127.0.0.1", 0),
        shutdown_timeout=1,
    )
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        tcp_port = int(daemon.listener_names[1].rsplit(":", 1)[1])
        [operator_name] = daemon.operator_listener_names
        operator_port = int(operator_name.rsplit(":", 1)[1])
        # The agent listeners (the 0666 unix socket among them) do not serve /metrics ...
        for agent_stream in (
            await trio.open_unix_socket(str(sock)),
            await trio.open_tcp_stream("127.0.0.1", tcp_port),
        ):
            status, _ = await _get(agent_stream, "/metrics")
            assert status == 404
        # ... the operator listener does, and /healthz is on both.
        stream = await trio.open_tcp_stream("127.0.0.1", operator_port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert f"\r\ncontent-type: {METRICS_CONTENT_TYPE}\r\n".encode() in raw
        assert b"\nagentd_agent_stats_dropped_total 0.0\n" in raw
        status, body = await _get(await trio.open_tcp_stream("127.0.0.1", operator_port), "/healthz")
        assert status == 200 and body["status"] == "ok"
        status, _ = await _get(await trio.open_tcp_stream("127.0.0.1", operator_port), RPC_PATH)
        assert status == 404  # no agents here
        daemon.request_stop()
    # metrics_listen = none: no operator listener at all
    daemon = Daemon(attrs.evolve(config, metrics_listen=None))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert daemon.operator_listener_names == []
        daemon.request_stop()


async def test_stop_during_startup_exits_quietly(db_url: str, tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path, postgres_url=db_url, listen=(UnixAddress(tmp_path / "a.sock"),))
    daemon = Daemon(config)
    daemon.request_stop()
    with trio.fail_after(10):
        await daemon.run()
    assert not (tmp_path / "a.sock").exists()


async def test_healthz_is_503_when_the_database_is_unavailable(db_url: str) -> None:
    async with open_database(db_url) as db:
        assert await Health(db).check_database() is None
    # the pool is closed now: every query fails like a lost server would
    app = HttpApp(build_router(db))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.handle_connection, server)
        status, body = await _get(client, "/healthz")
    assert status == 503
    assert body["status"] == "unavailable"
    database = body["database"]
    assert isinstance(database, dict)
    assert database["ok"] is False
    assert "closed" in database["error"]


async def test_open_connections_get_the_grace_period_and_a_second_stop_cuts_it(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentd")
    sock = tmp_path / "agentd.sock"
    config = Config(data_dir=tmp_path, postgres_url=db_url, listen=(UnixAddress(sock),), shutdown_timeout=60)
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        idle = await trio.open_unix_socket(str(sock))  # connected, never sends a request
        await idle.send_all(b"GET /hea")
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()  # the daemon accepted it and waits for more
        daemon.request_stop()
        with trio.fail_after(10):
            while sock.exists():  # noqa: ASYNC110 - listeners closed at once ...
                await trio.sleep(0.01)
        assert any("s for 1 calls in flight" in r.getMessage() for r in caplog.records)  # the open request
        with trio.move_on_after(0.2) as waited:  # ... while the open connection is left to finish
            await idle.receive_some(10)
        assert waited.cancelled_caught
        start = trio.current_time()
        daemon.request_stop()
    assert trio.current_time() - start < 5
    assert await idle.receive_some(10) == b""  # the second stop closed it without an answer
    await idle.aclose()


async def test_sighup_reloads_log_level_and_keeps_running_on_a_bad_file(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sock = tmp_path / "agentd.sock"
    config = Config(data_dir=tmp_path, postgres_url=db_url, listen=(UnixAddress(sock),))
    answers: list[Config | Exception] = [
        attrs.evolve(config, log_level="debug", listen=(TcpAddress("127.0.0.1", 9),)),
        ConfigError("agentd.toml: unknown field 'x'"),
    ]

    reloaded = trio.Event()

    def reload_config() -> Config:
        reloaded.set()
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    daemon = Daemon(config, reload_config=reload_config)
    root_level = logging.getLogger().level
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            os.kill(os.getpid(), signal.SIGHUP)  # through the real signal path
            with trio.fail_after(5):
                await reloaded.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert daemon.config.log_level == "debug"
            assert logging.getLogger().level == logging.DEBUG
            assert "changes to listen take effect after a restart" in caplog.text
            await daemon.reload()
            assert (
                "reload failed, keeping the running configuration: agentd.toml: unknown field 'x'"
                in caplog.text
            )
            status, _ = await _get(await trio.open_unix_socket(str(sock)), "/healthz")
            assert status == 200  # still serving
            daemon.request_stop()
    finally:
        logging.getLogger().setLevel(root_level)


def test_serve_raises_its_open_files_limit_to_the_hard_limit(caplog: pytest.LogCaptureFixture) -> None:
    """`agentd serve` holds one descriptor per agent, so it lifts the soft limit (often 1024) itself."""
    original = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = original
    lowered = min(soft, hard - 1, 256)
    if lowered < 64:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} too low to lower and raise again")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        with caplog.at_level(logging.DEBUG, logger="agentd"):
            assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert f"from {lowered} to {hard}" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, original)


async def test_configured_per_agent_limits_reach_every_session(db_url: str, tmp_path: Path) -> None:
    """max_streams_per_agent and first_packet_timeout from the configuration bound a real session:
    streams past the cap are refused, silent ones are reset at the deadline, the session goes on."""
    from agentd.agent.dial import connect
    from agentd.mux import MuxSession
    from agentd.store.testing import seed_workspace

    async with open_database(db_url) as db:
        ws = await seed_workspace(db, agents=("main",))
    sock = tmp_path / "agentd.sock"
    config = Config(
        data_dir=tmp_path,
        postgres_url=db_url,
        listen=(UnixAddress(sock),),
        metrics_listen=None,
        shutdown_timeout=1,
        max_streams_per_agent=16,
        first_packet_timeout=0.5,
    )
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        stream = await connect(
            await trio.open_unix_socket(str(sock)), token=str(ws.agent("main").auth_token), websocket=False
        )
        session = MuxSession(stream, is_client=True)
        ended: list[float] = []

        async def until_reset(started: float, mux_stream: trio.abc.Stream) -> None:
            with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                await mux_stream.receive_some()
            ended.append(trio.current_time() - started)

        async with trio.open_nursery() as client:
            await client.start(session.run)
            async with trio.open_nursery() as waits:
                started = trio.current_time()
                for _ in range(40):  # SYNs only: these streams never send a packet
                    waits.start_soon(until_reset, started, await session.open_stream())
            assert len(ended) == 40
            refused = [t for t in ended if t < 0.4]
            reaped = [t for t in ended if t >= 0.4]
            assert len(refused) == 24  # past the cap of 16: RST at once
            assert len(reaped) == 16 and max(reaped) < 3  # at the configured 0.5 s, not the default 10 s
            assert not session.closed
            await session.ping()  # the session itself goes on
            client.cancel_scope.cancel()
        daemon.request_stop()
