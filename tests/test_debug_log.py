"""`agentd serve --log-level debug` follows an agent session line by line (issue 13 item 5): the
upgrade, the connect, one line per RPC (method, duration, outcome), every batcher flush and the
disconnect, each carrying `agent_id=<uuid>`; at `info` none of that appears.

A real `agentd serve` subprocess (its own logging setup, its stderr), agents dialling over the Unix
socket (raw yamux) and TCP (WebSocket)."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import uuid
from pathlib import Path

import pytest
import trio

from agentd.client import UNIMPLEMENTED, RpcClient, RpcError
from agentd.handshake import upgrade_client
from agentd.mux import MuxSession
from agentd.proto import agent_pb2, tailnet_pb2
from agentd.store import Database
from tests.test_cli import Serving, _serve
from tests.test_e2e_serve import create_workspace

pytestmark = pytest.mark.slow

BAD_VERSION = "not a version"

#: "2026-12-04 14:00:00,123 DEBUG agentd.drpc.server: rpc agent_id=… method=… duration_ms=… outcome=…"
RPC_LINE = re.compile(
    r" DEBUG agentd\.drpc\.server: rpc agent_id=(?P<agent>\S+) method=(?P<method>\S+)"
    r" duration_ms=(?P<ms>\d+\.\d{3}) outcome=(?P<outcome>ok|error|cancelled)(?P<rest>.*)$"
)


async def drive_agent(stream: trio.abc.Stream, token: str, *, websocket: bool) -> list[str]:
    """Several RPCs feeding every batcher, one refused by validation, one unimplemented and one
    stream the agent cancels; returns the methods called."""
    transport = await upgrade_client(stream, token=token, websocket=websocket)
    session = MuxSession(transport, is_client=True)
    now = dt.datetime.now(dt.UTC)
    agent = "/coder.agent.v2.Agent/"
    called = []
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        client = RpcClient(session)
        await client.agent.GetManifest(agent_pb2.GetManifestRequest())
        stats = agent_pb2.Stats(connection_count=1, rx_bytes=100, tx_bytes=50)
        await client.agent.UpdateStats(agent_pb2.UpdateStatsRequest(stats=stats))
        metadata = agent_pb2.BatchUpdateMetadataRequest()
        entry = metadata.metadata.add(key="cpu")
        entry.result.value = "0.42"
        entry.result.collected_at.FromDatetime(now)
        await client.agent.BatchUpdateMetadata(metadata)
        connection = agent_pb2.Connection(
            id=uuid.uuid4().bytes,
            action=agent_pb2.Connection.CONNECT,
            type=agent_pb2.Connection.SSH,
            ip="10.1.2.3",
        )
        connection.timestamp.FromDatetime(now)
        await client.agent.ReportConnection(agent_pb2.ReportConnectionRequest(connection=connection))
        boundary = agent_pb2.ReportBoundaryLogsRequest(
            session_id=str(uuid.uuid4()), confined_process_name="claude"
        )
        log = boundary.logs.add(allowed=True, sequence_number=1)
        log.time.FromDatetime(now)
        log.http_request.method, log.http_request.url = "GET", "https://example.com/"
        await client.agent.ReportBoundaryLogs(boundary)
        called += [f"{agent}{m}" for m in ("GetManifest", "UpdateStats", "BatchUpdateMetadata")]
        called += [f"{agent}ReportConnection", f"{agent}ReportBoundaryLogs"]
        with pytest.raises(RpcError, match="invalid agent semver version"):
            await client.agent.UpdateStartup(
                agent_pb2.UpdateStartupRequest(startup=agent_pb2.Startup(version=BAD_VERSION))
            )
        called.append(f"{agent}UpdateStartup")
        with pytest.raises(RpcError) as info:
            await client.tailnet.RefreshResumeToken(tailnet_pb2.RefreshResumeTokenRequest())
        assert info.value.code == UNIMPLEMENTED
        called.append("/coder.tailnet.v2.Tailnet/RefreshResumeToken")
        async with client.tailnet.StreamDERPMaps(tailnet_pb2.StreamDERPMapsRequest()) as derp:
            await derp.__anext__()  # then the agent hangs up on it: cancelled
        called.append("/coder.tailnet.v2.Tailnet/StreamDERPMaps")
        await session.aclose()
    return called


async def run_session(
    serving: Serving, sock: Path, db_url: str, *, debug: bool
) -> tuple[dict[str, str], list[str]]:
    """Both agents of the example workspace through `drive_agent`, then (with `debug`, once agentd
    logged both disconnects) a graceful stop (SIGTERM: the batchers' final flushes). Returns
    {transport: agent id} and the lines agentd logged."""
    created = await create_workspace(db_url)
    main, second = created["agents"][0], created["agents"][-1]
    with trio.fail_after(60):
        called = await drive_agent(await trio.open_unix_socket(str(sock)), main["token"], websocket=False)
        port = serving.port()
        assert called == await drive_agent(
            await trio.open_tcp_stream("127.0.0.1", port), second["token"], websocket=True
        )
        disconnects = [f"agent disconnected agent_id={a['id']}" for a in (main, second)]
        while debug and not all(d in serving.text for d in disconnects):  # noqa: ASYNC110 - stderr
            await trio.sleep(0.05)  # else SIGTERM may come first (reason="closed by agentd")
        serving.process.send_signal(signal.SIGTERM)
        assert await serving.process.wait() == 0, serving.text
    await trio.sleep(0.1)  # the pump reads the last of stderr
    return {"unix": main["id"], "tcp": second["id"]}, serving.text.splitlines()


def only(lines: list[str], pattern: str) -> re.Match[str]:
    matches = [m for line in lines if (m := re.search(pattern, line))]
    assert len(matches) == 1, (pattern, matches, "\n".join(lines))
    return matches[0]


async def test_debug_logs_every_step_of_an_agent_session(db_url: str, db: Database, tmp_path: Path) -> None:
    sock = tmp_path / "agentd.sock"
    args = ["--postgres-url", db_url, "--data-dir", str(tmp_path), "--listen", f"unix:{sock}"]
    async with _serve([*args, "--listen", "tcp://127.0.0.1:0", "--log-level", "debug"]) as serving:
        agents, lines = await run_session(serving, sock, db_url, debug=True)
    assert "Traceback" not in serving.text, serving.text
    methods = [
        "/coder.agent.v2.Agent/GetManifest",
        "/coder.agent.v2.Agent/UpdateStats",
        "/coder.agent.v2.Agent/BatchUpdateMetadata",
        "/coder.agent.v2.Agent/ReportConnection",
        "/coder.agent.v2.Agent/ReportBoundaryLogs",
        "/coder.agent.v2.Agent/UpdateStartup",
        "/coder.tailnet.v2.Tailnet/RefreshResumeToken",
        "/coder.tailnet.v2.Tailnet/StreamDERPMaps",
    ]
    unix, tcp = agents["unix"], agents["tcp"]

    # The upgrade: transport, protocol, version, role and who is on the other end.
    upgraded = only(lines, rf"DEBUG agentd\.connection: agent upgraded agent_id={unix} (.*)$").group(1)
    assert upgraded == (
        f"transport=unix remote=unix:{sock} peer_pid={os.getpid()} peer_uid={os.getuid()}"
        " protocol=yamux api_version=2.10 role=agent"
    )
    upgraded = only(lines, rf"DEBUG agentd\.connection: agent upgraded agent_id={tcp} (.*)$").group(1)
    assert re.fullmatch(
        r"transport=tcp remote=127\.0\.0\.1:\d+ protocol=websocket api_version=2\.10 role=agent", upgraded
    )

    for agent_id in (unix, tcp):
        connected = only(lines, rf"DEBUG agentd\.connection: agent connected agent_id={agent_id} (.*)$")
        assert re.fullmatch(r"name=alice-dev-\S+ api_version=2\.10 monitored=true", connected.group(1))
        # One line per RPC, in the order they were answered, each with this agent's id.
        rpcs = [m for line in lines if (m := RPC_LINE.search(line)) and m["agent"] == agent_id]
        assert [m["method"] for m in rpcs] == methods, "\n".join(lines)
        outcomes = {m["method"].rsplit("/", 1)[1]: (m["outcome"], m["rest"]) for m in rpcs}
        assert all(outcomes[m] == ("ok", "") for m in ("GetManifest", "UpdateStats", "ReportBoundaryLogs"))
        assert outcomes["UpdateStartup"] == (
            "error",
            f' code=0 error="invalid agent semver version \\"{BAD_VERSION}\\""',
        )
        assert outcomes["RefreshResumeToken"] == ("error", " code=12 error=Unimplemented")
        assert outcomes["StreamDERPMaps"] == ("cancelled", "")
        # The disconnect, after the last RPC: why, how long, how many calls the services ran (all 8:
        # the tailnet service answers RefreshResumeToken with code 12 itself).
        disconnected = only(lines, rf"DEBUG agentd\.connection: agent disconnected agent_id={agent_id} (.*)$")
        assert re.fullmatch(r"reason=disconnect connected_s=\d+\.\d{3} calls=8", disconnected.group(1))
        assert lines.index(disconnected.string) > lines.index(rpcs[-1].string)

    # Every batcher's flush (here the final ones, on SIGTERM), whoever's data they carry.
    flushes = {
        m[1] for line in lines if (m := re.search(r" DEBUG \S+: flush batcher=(\w+) .*duration_ms=", line))
    }
    assert flushes == {"stats", "last_used", "metadata", "connection_log", "boundary_usage"}, "\n".join(lines)


async def test_info_is_quiet_about_sessions(db_url: str, db: Database, tmp_path: Path) -> None:
    """At the default level an agent session logs nothing: startup and shutdown lines only."""
    sock = tmp_path / "agentd.sock"
    args = ["--postgres-url", db_url, "--data-dir", str(tmp_path), "--listen", f"unix:{sock}"]
    async with _serve([*args, "--listen", "tcp://127.0.0.1:0"]) as serving:
        agents, lines = await run_session(serving, sock, db_url, debug=False)
    # boundary_request is an audit line (info on purpose, as in Coder): the only per-agent one.
    audit = [line for line in lines if " INFO agentd.boundary: boundary_request " in line]
    assert len(audit) == 2
    text = "\n".join(line for line in lines if line not in audit)
    for agent_id in agents.values():
        assert agent_id not in text, text
    assert " DEBUG " not in text and " rpc " not in text and "flush batcher" not in text, text
    assert len(text.splitlines()) <= 10, text
