"""The daemon in-process: /healthz on every listener, 503 when the database is gone, clean stop."""

from __future__ import annotations

import json
from pathlib import Path

import trio
import trio.testing

from agentd.config import Config, TcpAddress, UnixAddress
from agentd.daemon import AGENT_RPC_PATH, Daemon, Health, build_router
from agentd.http import HttpApp
from agentd.store import asyncio_loop, open_database


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
        status, body = await _get(await trio.open_tcp_stream("127.0.0.1", port), AGENT_RPC_PATH)
        assert status == 501

        daemon.request_stop()
    assert not sock.exists()


async def test_stop_during_startup_exits_quietly(db_url: str, tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path, postgres_url=db_url, listen=(UnixAddress(tmp_path / "a.sock"),))
    daemon = Daemon(config)
    daemon.request_stop()
    with trio.fail_after(10):
        await daemon.run()
    assert not (tmp_path / "a.sock").exists()


async def test_healthz_is_503_when_the_database_is_unavailable(db_url: str) -> None:
    async with asyncio_loop():
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
