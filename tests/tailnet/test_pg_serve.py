"""Two replicas, one of them a real `agentd serve` process that is SIGKILLed.

The agent dials the subprocess (replica B, coordinator = "postgres", 0.5 s heartbeats) over TCP and
coordinates like Coder's agent; a client peer on an in-process PostgreSQL coordinator (replica A) on
the same database opens a tunnel to it. Both learn each other's node; when B is killed, A's client
is told the agent is LOST within B's heartbeat bound.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
import trio

from agentd.client import RpcClient
from agentd.handshake import upgrade_client
from agentd.mux import MuxSession
from agentd.proto import tailnet_pb2
from agentd.store import Database
from agentd.tailnet.convert import node_from_proto, node_to_proto
from agentd.tailnet.coordinator import ClientAuth, Kind, PeerUpdate, Request
from agentd.tailnet.pg_coordinator import PgCoordinator
from tests.tailnet.test_coordinators import CLIENT, node, updates
from tests.test_cli import _serve
from tests.test_e2e_serve import create_workspace

pytestmark = pytest.mark.slow

HEARTBEAT = 0.5


async def test_killed_replica_is_lost_for_the_other_end(db_url: str, db: Database, tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'coordinator = "postgres"\ncoordinator_heartbeat = {HEARTBEAT}\n')
    args = ["--config", str(config), "--postgres-url", db_url, "--data-dir", str(tmp_path)]
    async with _serve([*args, "--listen", "tcp://127.0.0.1:0"]) as serving:
        created = await create_workspace(db_url)
        agent_id = uuid.UUID(created["agents"][0]["id"])
        token = created["agents"][0]["token"]
        replica_a = PgCoordinator(db, heartbeat_interval=HEARTBEAT)
        async with trio.open_nursery() as nursery:
            await nursery.start(replica_a.run)
            stream = await trio.open_tcp_stream("127.0.0.1", serving.port())
            session = MuxSession(await upgrade_client(stream, token=token, websocket=False), is_client=True)
            await nursery.start(session.run)
            async with (
                RpcClient(session).tailnet.Coordinate() as call,
                replica_a.connect(CLIENT, "client", ClientAuth({agent_id})) as client,
            ):
                await call.send(
                    tailnet_pb2.CoordinateRequest(update_self={"node": node_to_proto(node(agent_id))})
                )
                await client.send(Request(update_self=node(CLIENT), add_tunnel=agent_id))
                with trio.fail_after(10):
                    [got] = await updates(client, 1)
                    assert (got.id, got.kind, got.node) == (agent_id, Kind.NODE, node(agent_id))
                    response = await call.receive()
                [update] = response.peer_updates
                assert uuid.UUID(bytes=update.id) == CLIENT and update.kind == Kind.NODE
                assert node_from_proto(update.node) == node(CLIENT)

                serving.process.send_signal(signal.SIGKILL)
                killed = trio.current_time()
                with trio.fail_after(10):
                    [lost] = await updates(client, 1)
                elapsed = trio.current_time() - killed
                assert lost == PeerUpdate(agent_id, Kind.LOST, None, "lost")
                # 3 missed heartbeats (1.5 s) after the last one, plus slack for a loaded machine.
                assert elapsed <= replica_a.expiry + 1.5, elapsed
            nursery.cancel_scope.cancel()
