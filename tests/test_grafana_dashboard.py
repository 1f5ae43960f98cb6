"""contrib/grafana/agentd-dashboard.json: valid dashboard JSON whose every query names metrics that a
running agentd's /metrics really exposes (a daemon with an agent that made RPCs and reported stats)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import trio

from agentd.admin import create_workspace
from agentd.client import RpcClient
from agentd.config import Config, TcpAddress, UnixAddress
from agentd.daemon import Daemon
from agentd.handshake import upgrade_client
from agentd.metrics import AGENT_METRIC_PREFIX
from agentd.mux import MuxSession
from agentd.proto import agent_pb2
from agentd.store import Database
from tests.test_connection import workspace_spec

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "agentd-dashboard.json"
#: agentd's own names and coderd's build histogram: what a query of this dashboard may name
_METRIC = re.compile(r"\b(?:agentd|coderd)_[a-zA-Z0-9_]*")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries(board: dict[str, Any]) -> list[str]:
    found = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    found += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return found


def exposed_names(exposition: str) -> set[str]:
    """Every sample name ``/metrics`` can carry: sample lines, and each TYPE'd family (histograms
    with their _bucket/_sum/_count series)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_is_grafana_json() -> None:
    board = dashboard()
    assert board["uid"] == "agentd-overview" and board["title"] == "agentd"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        assert panel["type"] in {"row", "stat", "timeseries"}
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    titles = " ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("connected agents", "rpc rate", "rpc latency", "database errors", "batcher flushes"):
        assert topic in titles
    assert "batcher drops" in titles and "per-agent stats" in titles


async def test_every_queried_metric_is_exposed_by_a_running_daemon(
    db: Database, db_url: str, tmp_path: Path
) -> None:
    created = await create_workspace(db, workspace_spec("dev", agents=("main",)))
    sock = tmp_path / "agentd.sock"
    config = Config(
        data_dir=tmp_path,
        postgres_url=db_url,
        listen=(UnixAddress(sock),),
        metrics_listen=TcpAddress("127.0.0.1", 0),
        shutdown_timeout=1,
    )
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        [operator] = daemon.operator_listener_names
        transport = await upgrade_client(
            await trio.open_unix_socket(str(sock)), token=str(created.agents[0].token)
        )
        session = MuxSession(transport, is_client=True)
        await nursery.start(session.run)
        client = RpcClient(session)
        await client.agent.GetManifest(agent_pb2.GetManifestRequest())
        gauge = agent_pb2.Stats.Metric(name="agent_load", type=agent_pb2.Stats.Metric.GAUGE, value=0.5)
        await client.agent.UpdateStats(agent_pb2.UpdateStatsRequest(stats=agent_pb2.Stats(metrics=[gauge])))

        stream = await trio.open_tcp_stream("127.0.0.1", int(operator.rsplit(":", 1)[1]))
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = b""
            while chunk := await stream.receive_some(65536):
                raw += chunk
        await session.aclose()
        daemon.request_stop()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    exposition = body.decode()
    exposed = exposed_names(exposition)
    assert f"{AGENT_METRIC_PREFIX}agent_load" in exposed  # the agent's report, under agentd's prefix
    assert 'agentd_rpc_calls_total{api="manifest",method="GetManifest"} 1.0' in exposition
    assert "\nagentd_agent_sessions 1.0\n" in exposition

    missing: dict[str, list[str]] = {}
    for query in queries(dashboard()):
        for name in _METRIC.findall(query):
            if name == AGENT_METRIC_PREFIX:  # a __name__ regex over the agent-reported series
                ok = any(n.startswith(AGENT_METRIC_PREFIX) for n in exposed)
            else:
                ok = name in exposed
            if not ok:
                missing.setdefault(name, []).append(query)
    assert missing == {}
