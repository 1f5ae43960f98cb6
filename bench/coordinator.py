"""Tailnet coordinator latency: a node update from an agent reaching its tunnel peer.

Measured in one run, on a fresh database of the server ``--postgres-url`` names (created from the
current schema and dropped afterwards):

* ``memory``          the in-memory coordinator: agent and client on one coordinator
* ``postgres local``  one PostgreSQL coordinator holding both ends
* ``postgres cross``  the agent on replica A, the client on replica B (two coordinators, each with
                      its own pool and LISTEN connection, in this process): the issue's target,
                      ≤ 100 ms p99

Each mode sends ``--updates`` sequential node updates (the next once the previous one arrived) and
reports p50/p99/mean and the ratio to the in-memory coordinator. ``--burst N`` adds a row where N
agents on A update at once and N clients on B wait for them (the writer coalesces them into a few
transactions; the row shows the time until the last arrived and how many write batches it took).

    python bench/coordinator.py --postgres-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentd.store import open_database
from agentd.store.testing import TestServer
from agentd.tailnet.api import PeerConnection, TailnetCoordinator
from agentd.tailnet.coordinator import (
    TAILSCALE_SERVICE_PREFIX,
    AgentAuth,
    ClientAuth,
    Node,
    Request,
    service_address,
)
from agentd.tailnet.pg_coordinator import PgCoordinator
from agentd.tailnet.trio_coordinator import Coordinator


def node(peer_id: uuid.UUID, derp: int) -> Node:
    addr = service_address(TAILSCALE_SERVICE_PREFIX, peer_id)
    return Node(preferred_derp=derp, addresses=(f"{addr}/128",), key=peer_id.bytes)


@asynccontextmanager
async def running(coordinator: TailnetCoordinator) -> AsyncIterator[TailnetCoordinator]:
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        yield coordinator
        nursery.cancel_scope.cancel()


async def next_node(peer: PeerConnection) -> Node:
    while True:
        response = await peer.receive()
        for update in response.peer_updates:
            if update.node is not None:
                return update.node


async def measure(a: TailnetCoordinator, b: TailnetCoordinator, updates: int) -> list[float]:
    """Seconds from each agent ``send`` on ``a`` to the client on ``b`` holding that node."""
    agent_id, client_id = uuid.uuid4(), uuid.uuid4()
    out: list[float] = []
    async with (
        a.connect(agent_id, "agent", AgentAuth(agent_id)) as agent,
        b.connect(client_id, "client", ClientAuth({agent_id})) as client,
    ):
        await agent.send(Request(update_self=node(agent_id, 1)))
        await client.send(Request(update_self=node(client_id, 1), add_tunnel=agent_id))
        await next_node(client)
        for i in range(updates):
            want = node(agent_id, i + 2)
            start = time.perf_counter()
            await agent.send(Request(update_self=want))
            while await next_node(client) != want:
                pass
            out.append(time.perf_counter() - start)
    return out


async def burst(a: PgCoordinator, b: PgCoordinator, n: int) -> tuple[float, int]:
    """N agents on ``a`` update at once; seconds until all N clients on ``b`` have the new node."""
    agents = [uuid.uuid4() for _ in range(n)]
    elapsed = 0.0
    batches = 0
    async with trio.open_nursery() as nursery:
        handles: list[tuple[PeerConnection, PeerConnection]] = []
        ready = trio.Event()
        done = trio.Event()
        arrived = 0

        async def pair(agent_id: uuid.UUID, task_status: trio.TaskStatus[None]) -> None:
            nonlocal arrived
            client_id = uuid.uuid4()
            async with (
                a.connect(agent_id, "agent", AgentAuth(agent_id)) as agent,
                b.connect(client_id, "client", ClientAuth({agent_id})) as client,
            ):
                await agent.send(Request(update_self=node(agent_id, 1)))
                await client.send(Request(update_self=node(client_id, 1), add_tunnel=agent_id))
                await next_node(client)
                handles.append((agent, client))
                task_status.started()
                await ready.wait()
                want = node(agent_id, 2)
                while await next_node(client) != want:
                    pass
                arrived += 1
                if arrived == n:
                    done.set()
                await trio.sleep_forever()

        for agent_id in agents:
            await nursery.start(pair, agent_id)
        before = a.write_batches
        ready.set()
        start = time.perf_counter()
        for (agent, _), agent_id in zip(handles, agents, strict=True):
            await agent.send(Request(update_self=node(agent_id, 2)))
        await done.wait()
        elapsed = time.perf_counter() - start
        batches = a.write_batches - before
        nursery.cancel_scope.cancel()
    return elapsed, batches


def row(name: str, samples: list[float], base: float | None) -> str:
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    mean = statistics.fmean(samples) * 1000
    ratio = f"{p50 / base:6.1f}x" if base else "  1.0x"
    return f"{name:<16} {len(samples):>6} {p50:>9.3f} {p99:>9.3f} {mean:>9.3f}   {ratio}"


async def run(url: str, updates: int, burst_n: int) -> None:
    server = TestServer(url)
    dbname = await trio.to_thread.run_sync(server.create_template)
    try:
        db_url = server.url_for(dbname)
        async with (
            open_database(db_url, max_size=4) as db_a,
            open_database(db_url, max_size=4) as db_b,
        ):
            memory = Coordinator()
            async with running(memory):
                await measure(memory, memory, 50)  # warm-up
                mem = await measure(memory, memory, updates)
            pg_a = PgCoordinator(db_a)
            pg_b = PgCoordinator(db_b)
            async with running(pg_a), running(pg_b):
                await measure(pg_a, pg_b, 50)  # warm-up
                local = await measure(pg_a, pg_a, updates)
                cross = await measure(pg_a, pg_b, updates)
                burst_result = await burst(pg_a, pg_b, burst_n) if burst_n else None
        base = sorted(mem)[len(mem) // 2] * 1000
        print(f"{'mode':<16} {'n':>6} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}   p50 vs memory")
        print(row("memory", mem, None))
        print(row("postgres local", local, base))
        print(row("postgres cross", cross, base))
        if burst_result is not None:
            seconds, batches = burst_result
            print(
                f"burst: {burst_n} agents on A updated at once -> all {burst_n} clients on B in "
                f"{seconds * 1000:.1f} ms, {batches} write transactions on A"
            )
    finally:
        await trio.to_thread.run_sync(server.drop, dbname)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres-url", default=os.environ.get("AGENTD_TEST_POSTGRES_URL"))
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=500, help="agents updating at once (0: skip)")
    args = parser.parse_args()
    if not args.postgres_url:
        parser.error("--postgres-url (or AGENTD_TEST_POSTGRES_URL) is required")
    trio.run(run, args.postgres_url, args.updates, args.burst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
