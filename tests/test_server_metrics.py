"""agentd's own /metrics figures: sessions, RPC counts, latency histogram, failures by kind, batchers."""

from __future__ import annotations

import attrs
import outcome

from agentd.drpc.errors import RpcError
from agentd.server_metrics import RPC_DURATION_BUCKETS, ServerMetrics, error_kind
from agentd.store.errors import StoreError


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
    lines = text.splitlines()
    assert "agentd_agent_sessions 1" in lines and "agentd_agent_sessions_total 2" in lines
    labels = 'api="manifest",method="GetManifest"'
    assert f"agentd_rpc_calls_total{{{labels}}} 3" in lines
    assert f'agentd_rpc_errors_total{{{labels},kind="database"}} 1' in lines
    buckets = [line for line in lines if line.startswith("agentd_rpc_duration_seconds_bucket")]
    assert len(buckets) == len(RPC_DURATION_BUCKETS) + 1
    assert f'agentd_rpc_duration_seconds_bucket{{{labels},le="0.005"}} 1' in lines  # cumulative
    assert f'agentd_rpc_duration_seconds_bucket{{{labels},le="0.25"}} 2' in lines
    assert f'agentd_rpc_duration_seconds_bucket{{{labels},le="10"}} 2' in lines
    assert f'agentd_rpc_duration_seconds_bucket{{{labels},le="+Inf"}} 3' in lines
    assert f"agentd_rpc_duration_seconds_count{{{labels}}} 3" in lines
    assert 'agentd_rpc_calls_total{api="tailnet",method="Coordinate"} 1' in lines
    assert not any('method="Coordinate"' in line for line in lines if line.startswith("agentd_rpc_duration"))
    assert 'agentd_batcher_flushes_total{batcher="metadata_batcher"} 4' in lines
    assert 'agentd_batcher_flushes_total{batcher="last_used"} 1' in lines
    assert 'agentd_batcher_dropped_total{batcher="metadata_batcher"} 2' in lines
    assert not any('batcher="stats_batcher"' in line for line in lines)  # not configured
    # every family has exactly one HELP and one TYPE line
    families = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(families) == len(set(families)) == 7
