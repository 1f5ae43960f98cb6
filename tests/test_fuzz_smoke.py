"""A few seconds of bench/fuzz.py (the `just fuzz` campaign) against a live daemon: it runs, feeds
every kind of input, and finds no crash, no failed call of the good agent and no failed /healthz."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from agentd.store.testing import TestServer

ROOT = Path(__file__).resolve().parent.parent


def test_fuzz_campaign_smoke(pg_server: TestServer) -> None:
    args = ["--seconds", "4", "--workers", "4", "--seed", "11", "--postgres-url", pg_server.admin_url]
    result = subprocess.run(
        [sys.executable, "bench/fuzz.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    inputs = re.search(
        r"inputs run: (\d+) \(bytes (\d+), transcript (\d+), protobuf (\d+), http (\d+)\)", out
    )
    assert inputs is not None, out
    assert all(int(n) > 0 for n in inputs.groups()), out
    assert "crashes: daemon exit none, tracebacks in its log 0" in out
    assert re.search(r"good agent: [1-9]\d* calls ok, 0 failed", out), out
    assert re.search(r"/healthz: [1-9]\d* ok, 0 failed", out), out
