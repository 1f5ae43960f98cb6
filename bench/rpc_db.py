"""Server CPU per RPC against the database: `agentd serve` in its own process, agents driving it.

Creates a fresh database on ``--postgres-url``'s server, migrates it, seeds ``--agents`` workspaces
from examples/workspace.toml, starts ``python -m agentd serve --listen unix:…`` as a subprocess and
connects every agent through the real upgrade. Then, for each kind in turn, every agent calls that
RPC back to back (a new mux stream per call, Coder's pattern) for ``--seconds``; the server's CPU
(utime + stime from /proc/PID/stat) over that window divided by the calls completed is the CPU per
RPC. Kinds:

* ``noop``       UpdateStats without stats: mux + DRPC + the API-task hop, no database (the baseline)
* ``stats``      UpdateStats with one connection (batched row, activity bump, stats_update NOTIFY)
* ``stats0``     UpdateStats with no connections (batched row only)
* ``metadata``   BatchUpdateMetadata of the manifest's keys (process-wide batcher)
* ``logs``       BatchCreateLogs, one line, on the agent's first script log source
* ``lifecycle``  UpdateLifecycle READY
* ``manifest``   GetManifest
* ``mix``        stats / metadata / logs in turn (the issue's workload)

Kinds alternate for ``--rounds`` rounds; the table shows the median per kind and its ratio to
``noop`` measured in the same run. The machine is shared: read ratios, not absolute numbers alone.

    python bench/rpc_db.py --postgres-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.admin import create_workspace, load_workspace_spec  # noqa: E402
from agentd.agent.dial import connect  # noqa: E402
from agentd.client import RpcClient  # noqa: E402
from agentd.mux import MuxSession  # noqa: E402
from agentd.proto import agent_pb2  # noqa: E402
from agentd.store import open_database  # noqa: E402
from agentd.store.migrate import migrate  # noqa: E402

KINDS = ("noop", "stats", "stats0", "metadata", "logs", "lifecycle", "manifest", "mix")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _with_db(url: str, dbname: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{dbname}"


# ------------------------------------------------------------------------------------ setup


async def _create_database(admin_url: str, dbname: str, drop: bool = False) -> None:
    async with open_database(admin_url, min_size=1, max_size=1) as db:
        if drop:
            await db.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        else:
            await db.execute(f'CREATE DATABASE "{dbname}"')


async def _seed(url: str, n: int) -> list[str]:
    spec = load_workspace_spec(ROOT / "examples" / "workspace.toml")
    spec = msgspec.structs.replace(spec, agents=spec.agents[:1])
    tokens = []
    async with open_database(url) as db:
        await migrate(db)
        for i in range(n):
            created = await create_workspace(db, msgspec.structs.replace(spec, name=f"bench-{i}"))
            tokens.append(str(created.agents[0].token))
    return tokens


# ------------------------------------------------------------------------------------ agents


class Agent:
    def __init__(self, client: RpcClient) -> None:
        self.client = client
        self.metadata = agent_pb2.BatchUpdateMetadataRequest()
        self.logs = agent_pb2.BatchCreateLogsRequest()
        self.mix = 0

    async def prepare(self) -> None:
        manifest = await self.client.agent.GetManifest(agent_pb2.GetManifestRequest())
        for md in manifest.metadata:
            item = self.metadata.metadata.add(key=md.key)
            item.result.value = "42"
        self.logs.log_source_id = manifest.scripts[0].log_source_id
        self.logs.logs.add(output="step 1", level=agent_pb2.Log.INFO)

    async def call(self, kind: str) -> None:
        agent = self.client.agent
        if kind == "mix":
            kind = ("stats", "metadata", "logs")[self.mix % 3]
            self.mix += 1
        if kind == "noop":
            await agent.UpdateStats(agent_pb2.UpdateStatsRequest())
        elif kind in ("stats", "stats0"):
            req = agent_pb2.UpdateStatsRequest()
            req.stats.connection_count = 1 if kind == "stats" else 0
            req.stats.rx_bytes = 100
            req.stats.connections_by_proto["ssh"] = req.stats.connection_count
            await agent.UpdateStats(req)
        elif kind == "metadata":
            await agent.BatchUpdateMetadata(self.metadata)
        elif kind == "logs":
            await agent.BatchCreateLogs(self.logs)
        elif kind == "lifecycle":
            req = agent_pb2.UpdateLifecycleRequest()
            req.lifecycle.state = agent_pb2.Lifecycle.READY
            await agent.UpdateLifecycle(req)
        elif kind == "manifest":
            await agent.GetManifest(agent_pb2.GetManifestRequest())
        else:
            raise ValueError(kind)


async def _drive(agents: list[Agent], kind: str, seconds: float, pid: int) -> tuple[int, float]:
    count = 0
    counting = False

    async def loop(agent: Agent) -> None:
        nonlocal count
        while True:
            await agent.call(kind)
            if counting:
                count += 1

    async with trio.open_nursery() as nursery:
        for agent in agents:
            nursery.start_soon(loop, agent)
        await trio.sleep(0.3)  # warm up: every agent in its loop
        counting = True
        cpu0 = _cpu_seconds(pid)
        await trio.sleep(seconds)
        cpu1 = _cpu_seconds(pid)
        counting = False
        n = count
        nursery.cancel_scope.cancel()
    return n, cpu1 - cpu0


async def _bench(
    sock: str, tokens: list[str], kinds: list[str], seconds: float, rounds: int, pid: int
) -> None:
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    async with trio.open_nursery() as nursery:
        agents = []
        for token in tokens:
            stream = await trio.open_unix_socket(sock)
            transport = await connect(stream, token=token, websocket=False)
            session = MuxSession(transport, is_client=True)
            await nursery.start(session.run)
            agent = Agent(RpcClient(session))
            await agent.prepare()
            agents.append(agent)
        for _ in range(rounds):
            for kind in kinds:
                n, cpu = await _drive(agents, kind, seconds, pid)
                results[kind].append((n / seconds, cpu * 1e6 / max(n, 1)))
        nursery.cancel_scope.cancel()
    base = statistics.median(us for _, us in results["noop"]) if "noop" in results else None
    print(f"{'kind':<10} {'RPC/s':>8} {'server µs/RPC':>14} {'÷ noop':>7}   (median of {rounds})")
    for kind in kinds:
        rate = statistics.median(r for r, _ in results[kind])
        us = statistics.median(u for _, u in results[kind])
        ratio = f"{us / base:7.2f}" if base else ""
        print(f"{kind:<10} {rate:8.0f} {us:14.0f} {ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated subset of " + ", ".join(KINDS)
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="also record the server with py-spy (--nonblocking) into FILE (.txt: raw)",
    )
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            parser.error(f"unknown kind {k!r}")
    if "noop" not in kinds and not args.profile:
        kinds.insert(0, "noop")

    dbname = f"agentd_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = _with_db(args.postgres_url, dbname)
    trio.run(_create_database, args.postgres_url, dbname)
    try:
        tokens = trio.run(_seed, url, args.agents)
        with tempfile.TemporaryDirectory() as tmp:
            sock = os.path.join(tmp, "agentd.sock")
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agentd",
                    "serve",
                    "--postgres-url",
                    url,
                    "--listen",
                    f"unix:{sock}",
                    "--log-level",
                    "warning",
                    "--metrics-listen",
                    "none",
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(sock):
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("agentd serve did not start")
                    time.sleep(0.05)
                spy = None
                if args.profile:
                    fmt = "raw" if args.profile.endswith(".txt") else "flamegraph"
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "--nonblocking",
                            "-r",
                            "200",
                            "-f",
                            fmt,
                            "-o",
                            args.profile,
                            "-p",
                            str(server.pid),
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                try:
                    trio.run(_bench, sock, tokens, kinds, args.seconds, args.rounds, server.pid)
                finally:
                    if spy is not None:
                        spy.send_signal(2)
                        spy.wait(timeout=60)
            finally:
                server.terminate()
                server.wait(timeout=30)
    finally:
        trio.run(_create_database, args.postgres_url, dbname, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
