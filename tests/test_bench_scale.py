"""bench/scale.py end to end at toy scale: seeding, `agentd serve`, the Go generator, /proc and
pg_stat_database sampling, and the table. Proves the benchmark works; measures nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from agentd.store.testing import TestServer
from tests.gopeer import REPO, build_go_program, require

BENCH = REPO / "bench" / "scale.py"


def _bench(pg_server: TestServer, *args: str) -> subprocess.CompletedProcess[str]:
    require(build_go_program, "goload")
    return subprocess.run(
        [sys.executable, str(BENCH), "--postgres-url", pg_server.admin_url, "--idle-seconds", "1", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _only_run(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout)["runs"]
    assert len(runs) == 1
    return runs[0]  # type: ignore[no-any-return]


def test_scale_bench_unix_rate(pg_server: TestServer) -> None:
    run = _only_run(_bench(pg_server, "--agents", "5", "--duration", "2", "--rate", "2", "--json"))
    assert run["connected"] == 5
    assert run["connect_errors"] == {} and run["load_errors"] == {} and run["error_count"] == 0
    assert run["dead_sessions"] == 0 and run["server_alive"]
    # 5 agents at 2 RPC/s for 2 s, the three RPCs in turn (random phase: each agent makes 4 calls)
    assert run["rpcs"] == 20
    assert set(run["per_method"]) == {"UpdateStats", "BatchUpdateMetadata", "BatchCreateLogs"}
    assert run["overall"]["p50_ms"] > 0 and run["overall"]["max_ms"] >= run["overall"]["p99_ms"]
    assert run["server_cpu_ms_per_connect"] > 0
    assert run["server_rss_before_mib"] > 10 and run["server_peak_rss_mib"] >= run["server_rss_before_mib"]
    assert run["pg_xact_per_connect"] >= 0


def test_scale_bench_websocket_cadence_prints_one_table(pg_server: TestServer) -> None:
    done = _bench(pg_server, "--agents", "3", "--duration", "1", "--websocket", "--coder-cadence")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 connected" in done.stderr and "0 errors" in done.stderr
    table = done.stdout
    assert "websocket/TCP, cadence" in table
    assert "agents connected" in table and "3 agents" in table
    for label in (
        "connect rate (agents/s)",
        "server CPU % of a core per 1,000 idle",
        "PG xact/s idle per 1,000",
    ):
        assert label in table


def test_scale_bench_rejects_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--agents", "five"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--agents: expected numbers separated by commas, got 'five'" in done.stderr
