"""agentd's own /metrics figures: sessions, RPC counts, latency histogram, failures by kind, batchers."""

from __future__ import annotations

import functools

import attrs
import outcome
import pytest
import trio
from prometheus_client.samples import Sample

from agentd.components import Components
from agentd.drpc.errors import RpcError
from agentd.server_metrics import RPC_DURATION_BUCKETS, ServerMetrics, error_kind
from agentd.store import Database
from agentd.store.errors import StoreError
from agentd.tailnet import Coordinator, DERPMapSource
from agentd.testing import serve_agent
from tests.test_connection import seed
from tests.test_metrics import families
from tests.test_shutdown import logs_request


@attrs.define
class Batcher:
    flushes: int = 0
    dropped: int = 0


@attrs.define
class FakeComponents:
    metadata_batcher: object = None
    stats_batcher: object = None
    last_used: object = None


def test_failures_are_told_apart() -> None:
    assert error_kind(RpcError("bad request")) == "rejected"
    assert error_kind(StoreError("connection lost")) == "database"
    wrapped = RpcError("write failed")
    wrapped.__cause__ = StoreError("deadlock")
    assert error_kind(wrapped) == "database"
    assert error_kind(ValueError("bug")) == "internal"


def test_calls_latency_and_errors_render_as_prometheus_text() -> None:
    m = ServerMetrics()
    m.session_started()
    m.session_started()
    m.session_ended()
    m.record_call("manifest", "GetManifest", 0.003, outcome.Value(None))
    m.record_call("manifest", "GetManifest", 0.2, outcome.Error(StoreError("down")))
    m.record_call("manifest", "GetManifest", 60.0, None)  # cancelled: counted and timed, not an error
    m.record_call("tailnet", "Coordinate", None, outcome.Value(None))  # a stream: counted, not timed
    assert (m.calls("manifest", "GetManifest"), m.errors("manifest", "GetManifest", "database")) == (3, 1)
    text = m.render(
        FakeComponents(metadata_batcher=Batcher(flushes=4, dropped=2), last_used=Batcher(flushes=1))
    )
    parsed = families(text)
    assert parsed["agentd_agent_sessions"][2] == [Sample("agentd_agent_sessions", {}, 1.0)]
    assert parsed["agentd_agent_sessions"][0] == "gauge"
    assert parsed["agentd_agent_sessions_total"][2] == [Sample("agentd_agent_sessions_total", {}, 2.0)]
    labels = {"api": "manifest", "method": "GetManifest"}
    calls = parsed["agentd_rpc_calls_total"]
    assert calls[0] == "counter"
    assert Sample("agentd_rpc_calls_total", labels, 3.0) in calls[2]
    assert Sample("agentd_rpc_calls_total", {"api": "tailnet", "method": "Coordinate"}, 1.0) in calls[2]
    assert parsed["agentd_rpc_errors_total"][2] == [
        Sample("agentd_rpc_errors_total", {**labels, "kind": "database"}, 1.0)
    ]
    kind, _, durations = parsed["agentd_rpc_duration_seconds"]
    assert kind == "histogram"
    buckets = {float(s.labels["le"]): s.value for s in durations if s.name.endswith("_bucket")}
    assert list(buckets) == [*RPC_DURATION_BUCKETS, float("inf")]
    assert (buckets[0.001], buckets[0.005], buckets[0.25], buckets[10.0], buckets[float("inf")]) == (
        0,
        1,
        2,
        2,
        3,
    )
    assert Sample("agentd_rpc_duration_seconds_count", labels, 3.0) in durations
    [total] = [s.value for s in durations if s.name == "agentd_rpc_duration_seconds_sum"]
    assert total == pytest.approx(60.203)
    assert not any(s.labels.get("method") == "Coordinate" for s in durations)  # a stream is not timed
    assert parsed["agentd_batcher_flushes_total"][2] == [
        Sample("agentd_batcher_flushes_total", {"batcher": "metadata_batcher"}, 4.0),
        Sample("agentd_batcher_flushes_total", {"batcher": "last_used"}, 1.0),
    ]
    # only batchers that keep a drop count, and none that is not configured (stats_batcher)
    assert parsed["agentd_batcher_dropped_total"][2] == [
        Sample("agentd_batcher_dropped_total", {"batcher": "metadata_batcher"}, 2.0),
        Sample("agentd_batcher_dropped_total", {"batcher": "last_used"}, 0.0),
    ]
    # every family has exactly one HELP and one TYPE line
    lines = text.splitlines()
    types = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types)) == 8 == len(parsed)
    assert parsed["agentd_rpc_in_flight"][2] == [Sample("agentd_rpc_in_flight", {}, 0.0)]


async def test_rpcs_in_flight_count_the_calls_being_handled(db: Database) -> None:
    """A call waiting in PostgreSQL is in flight (agentd_rpc_in_flight) until it returns."""
    ws = await seed(db)
    components = Components(coordinator=Coordinator(), derp_map=DERPMapSource.from_config())
    async with trio.open_nursery() as nursery:
        agent = await nursery.start(
            functools.partial(serve_agent, db, ws.agents[0].token, services=("logs",), components=components)
        )
        assert components.server_metrics.in_flight == 0
        async with db.transaction() as tx:
            await tx.execute("LOCK TABLE workspace_agent_logs IN EXCLUSIVE MODE")
            nursery.start_soon(agent.client.agent.BatchCreateLogs, logs_request(1))
            with trio.fail_after(10):
                while components.server_metrics.in_flight != 1:  # noqa: ASYNC110 - the daemon's gauge
                    await trio.sleep(0.01)
            assert "agentd_rpc_in_flight 1.0" in components.server_metrics.render(components)
        with trio.fail_after(10):
            while components.server_metrics.in_flight != 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert components.server_metrics.calls("logs", "BatchCreateLogs") == 1
        nursery.cancel_scope.cancel()
