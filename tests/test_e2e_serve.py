"""End to end: `agentd serve` as a subprocess, a workspace made with `agentd admin create-workspace`,
and agents dialling over the Unix socket (raw yamux upgrade) and TCP (WebSocket)."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from agentd.client import UNIMPLEMENTED, RpcClient, RpcError
from agentd.connection import load_service_builders
from agentd.handshake import upgrade_client
from agentd.mux import MuxSession
from agentd.proto import agent_pb2, tailnet_pb2
from agentd.store import Database
from tests.test_cli import EXAMPLE, Serving, _agentd, _serve

pytestmark = pytest.mark.slow


async def create_workspace(db_url: str) -> dict[str, Any]:
    result = await _agentd(
        "admin", "create-workspace", "--file", str(EXAMPLE), "--json", "--postgres-url", db_url
    )
    assert result.returncode == 0, result.stderr.decode()
    created: dict[str, Any] = json.loads(result.stdout)
    return created


async def exercise_agent(stream: trio.abc.Stream, token: str, *, websocket: bool, agent_id: str) -> None:
    """Dial like Coder's agent (version 2.10, role agent) and call the RPCs agentd serves."""
    transport = await upgrade_client(stream, token=token, websocket=websocket)
    session = MuxSession(transport, is_client=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        client = RpcClient(session)
        banners = await client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
        assert list(banners.announcement_banners) == []
        assert (
            await client.agent.GetServiceBanner(agent_pb2.GetServiceBannerRequest())
            == agent_pb2.ServiceBanner()
        )
        if "manifest" in load_service_builders():
            manifest = await client.agent.GetManifest(agent_pb2.GetManifestRequest())
            assert uuid.UUID(bytes=manifest.agent_id) == uuid.UUID(agent_id)
        else:
            with pytest.raises(RpcError) as info:
                await client.agent.GetManifest(agent_pb2.GetManifestRequest())
            assert info.value.code == UNIMPLEMENTED
        # Always code 12 on an agent connection, whichever services are composed.
        with pytest.raises(RpcError) as info:
            await client.tailnet.RefreshResumeToken(tailnet_pb2.RefreshResumeTokenRequest())
        assert info.value.code == UNIMPLEMENTED
        assert 0 < await session.ping() < session.config.connection_write_timeout
        await session.aclose()


async def raw_request(stream: trio.abc.Stream, token: str) -> tuple[int, dict[str, Any]]:
    async with stream:
        await stream.send_all(
            (
                "GET /api/v2/workspaceagents/me/rpc?version=2.10&role=agent HTTP/1.1\r\nHost: agentd\r\n"
                f"Coder-Session-Token: {token}\r\nConnection: Upgrade\r\nUpgrade: yamux\r\n\r\n"
            ).encode()
        )
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head
    return int(head.split(b" ")[1]), json.loads(body)


async def connection_row(db: Database, agent_id: str) -> dict[str, Any]:
    row = await db.fetchone(
        "SELECT first_connected_at, last_connected_at, disconnected_at, last_connected_replica_id "
        "FROM workspace_agents WHERE id = %s",
        (uuid.UUID(agent_id),),
    )
    assert row is not None
    return row


async def test_serve_agents_over_unix_yamux_and_tcp_websocket(
    db_url: str, db: Database, tmp_path: Path
) -> None:
    sock = tmp_path / "agentd.sock"
    args = ["--postgres-url", db_url, "--data-dir", str(tmp_path), "--listen", f"unix:{sock}"]
    async with _serve([*args, "--listen", "tcp://127.0.0.1:0"]) as serving:
        created = await create_workspace(db_url)
        main, second = created["agents"][0], created["agents"][-1]
        with trio.fail_after(60):
            await exercise_agent(
                await trio.open_unix_socket(str(sock)), main["token"], websocket=False, agent_id=main["id"]
            )
            port = serving.port()
            await exercise_agent(
                await trio.open_tcp_stream("127.0.0.1", port),
                second["token"],
                websocket=True,
                agent_id=second["id"],
            )
            for stream in (
                await trio.open_unix_socket(str(sock)),
                await trio.open_tcp_stream("127.0.0.1", port),
            ):
                status, body = await raw_request(stream, str(uuid.uuid4()))
                assert status == 401
                assert body["message"] == "Workspace agent not authorized."
            status, body = await raw_request(await trio.open_unix_socket(str(sock)), "nope")
            assert (status, body["message"]) == (401, "Workspace agent token invalid.")

            # Both sessions were monitored: connected, then disconnected when the agent closed.
            for agent in (main, second):
                # Another process writes it: poll the database (there is no event to wait on here).
                while (row := await connection_row(db, agent["id"]))["disconnected_at"] is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert row["first_connected_at"] is not None and row["last_connected_replica_id"] is not None
        assert_running(serving)


def assert_running(serving: Serving) -> None:
    assert serving.process.poll() is None, serving.text
    assert "Traceback" not in serving.text, serving.text


async def test_sigterm_ends_connected_agents_promptly(db_url: str, db: Database, tmp_path: Path) -> None:
    sock = tmp_path / "agentd.sock"
    async with _serve(
        ["--postgres-url", db_url, "--data-dir", str(tmp_path), "--listen", f"unix:{sock}"]
    ) as serving:
        created = await create_workspace(db_url)
        agent = created["agents"][0]
        transport = await upgrade_client(await trio.open_unix_socket(str(sock)), token=agent["token"])
        session = MuxSession(transport, is_client=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            await RpcClient(session).agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
            serving.process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                # The daemon ends the session at shutdown: the agent sees its session end...
                with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
                    await session.accept_stream()
                # ...and the daemon exits cleanly.
                assert await serving.process.wait() == 0, serving.text
        row = await connection_row(db, agent["id"])
        assert row["disconnected_at"] is not None
