"""Connect rate and idle cost of one ``agentd serve`` process (a small stand-in until bench/scale.py).

Seeds N workspaces (one agent each, from examples/workspace.toml) in a database of its own on the
given PostgreSQL server (kept and reused on later runs with the same N), starts ``python -m agentd
serve`` from this checkout as a separate process on a Unix socket, then:

* connect phase: N agents dial with ``--inflight`` in flight (upgrade + yamux; ``--manifest`` also
  calls GetManifest on each, like an agent does first) → connects/s, server CPU ms per connect;
* idle phase: the agents stay connected, answering pings, for ``--idle`` seconds → PostgreSQL
  transactions/s (``pg_stat_database`` of the bench database) and the server's CPU % of a core,
  both also per 1,000 agents.

``--profile FILE`` records the server with py-spy during the connect phase (raw collapsed stacks)
and prints the functions with most samples (inclusive and self).

    python bench/idle_connect.py --agents 1000 --idle 60 [--manifest] [--profile /tmp/connect.txt]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import psycopg
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.admin import create_workspace, load_workspace_spec  # noqa: E402
from agentd.client import RpcClient  # noqa: E402
from agentd.handshake import upgrade_client  # noqa: E402
from agentd.mux import MuxSession  # noqa: E402
from agentd.proto import agent_pb2  # noqa: E402
from agentd.store import open_database  # noqa: E402
from agentd.store.migrate import migrate  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def xacts(url: str, dbname: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
        assert row is not None
        return int(row[0])


async def seed(server_url: str, dbname: str, n: int) -> list[uuid.UUID]:
    """The tokens of N one-agent workspaces in ``dbname`` (created and seeded once)."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
            conn.execute(f'CREATE DATABASE "{dbname}"')
    url = f"{server_url.rstrip('/')}/{dbname}"
    async with open_database(url) as db:
        await migrate(db)
        have = await db.fetchval("SELECT count(*) FROM workspace_agents")
        if have != n:
            await db.execute("TRUNCATE workspaces, users, organizations, templates CASCADE")
            spec = load_workspace_spec(ROOT / "examples" / "workspace.toml")
            for i in range(n):
                await create_workspace(
                    db, msgspec.structs.replace(spec, name=f"ws{i}", agents=spec.agents[:1])
                )
        rows = await db.fetchall("SELECT auth_token FROM workspace_agents ORDER BY id")
    return [row["auth_token"] for row in rows]


async def hold(
    path: str, token: uuid.UUID, manifest: bool, ready: trio.MemorySendChannel[None], stop: trio.Event
) -> None:
    stream = await trio.open_unix_socket(path)
    transport = await upgrade_client(stream, token=token, timeout=60)
    session = MuxSession(transport, is_client=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        if manifest:
            await RpcClient(session).agent.GetManifest(agent_pb2.GetManifestRequest())
        await ready.send(None)
        await stop.wait()
        nursery.cancel_scope.cancel()


def run(args: argparse.Namespace) -> None:
    dbname = f"agentd_idlebench_{args.agents}"
    t0 = time.monotonic()
    tokens = trio.run(seed, args.postgres, dbname, args.agents)
    print(f"seeded {len(tokens)} agents in {dbname} ({time.monotonic() - t0:.1f} s)")
    url = f"{args.postgres.rstrip('/')}/{dbname}"
    with tempfile.TemporaryDirectory() as tmp:
        sock = f"{tmp}/agentd.sock"
        with open(f"{tmp}/serve.log", "w") as log:
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
                    "--metrics-listen",
                    "none",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                while not os.path.exists(sock):
                    if server.poll() is not None:
                        raise SystemExit(Path(f"{tmp}/serve.log").read_text())
                    time.sleep(0.1)
                time.sleep(0.5)
                trio.run(measure, args, server.pid, sock, url, dbname, tokens)
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
    if args.profile:
        top(args.profile)


async def measure(
    args: argparse.Namespace, pid: int, sock: str, url: str, dbname: str, tokens: list[uuid.UUID]
) -> None:
    stop = trio.Event()
    send, _receive = trio.open_memory_channel[None](len(tokens))
    limiter = trio.CapacityLimiter(args.inflight)
    profiler = None
    if args.profile:
        profiler = await trio.lowlevel.open_process(
            [
                "py-spy",
                "record",
                *(["--nonblocking"] if not args.blocking else []),
                "-r",
                "200",
                "-p",
                str(pid),
                "-f",
                "raw",
                "-o",
                args.profile,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await trio.sleep(1.0)
    async with trio.open_nursery() as nursery:
        cpu0, wall0, own0 = cpu_seconds(pid), time.monotonic(), time.process_time()

        async def one(token: uuid.UUID) -> None:
            async with limiter:
                inner_send, inner_receive = trio.open_memory_channel[None](1)
                nursery.start_soon(hold, sock, token, args.manifest, inner_send, stop)
                await inner_receive.receive()
                await send.send(None)

        async with trio.open_nursery() as dialers:
            for token in tokens:
                dialers.start_soon(one, token)
        wall = time.monotonic() - wall0
        cpu = cpu_seconds(pid) - cpu0
        own = time.process_time() - own0
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            await profiler.wait()
        n = len(tokens)
        what = "connect+GetManifest" if args.manifest else "connect"
        print(
            f"{what}: {n} agents in {wall:.2f} s = {n / wall:.0f}/s with {args.inflight} in flight;"
            f" server CPU {cpu * 1000 / n:.2f} ms per connect (this client: {own * 1000 / n:.2f} ms)"
        )
        await trio.sleep(args.settle)
        x0, cpu0, wall0 = xacts(url, dbname), cpu_seconds(pid), time.monotonic()
        await trio.sleep(args.idle)
        x1, cpu1, wall1 = xacts(url, dbname), cpu_seconds(pid), time.monotonic()
        span = wall1 - wall0
        tps = (x1 - x0 - 1) / span  # minus the measuring transaction itself
        pct = 100 * (cpu1 - cpu0) / span
        print(
            f"idle {n} agents for {span:.0f} s: {tps:.1f} tx/s ({tps * 1000 / n:.1f} per 1,000 agents),"
            f" server CPU {pct:.2f} % of a core ({pct * 1000 / n:.2f} % per 1,000 agents)"
        )
        stop.set()


def top(path: str, count: int = 25) -> None:
    """The functions with most samples in a py-spy raw (collapsed) file: inclusive and self."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        samples = int(n)
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")") for f in stack.split(";")]
        total += samples
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    print(f"py-spy: {total} samples")
    print("inclusive:")
    for frame, n in inclusive.most_common(count):
        print(f"  {100 * n / total:5.1f} %  {frame}")
    print("self:")
    for frame, n in own.most_common(count):
        print(f"  {100 * n / total:5.1f} %  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle measurement")
    parser.add_argument(
        "--settle", type=float, default=20.0, help="seconds between the phases (past the first tick)"
    )
    parser.add_argument("--manifest", action="store_true", help="call GetManifest after each connect")
    parser.add_argument("--profile", help="py-spy raw output file for the connect phase")
    parser.add_argument("--blocking", action="store_true", help="py-spy pauses the server per sample")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
