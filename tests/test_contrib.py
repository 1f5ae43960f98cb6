"""The shipped systemd units and config agree with each other and with what agentd needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


def _directives(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (CONTRIB / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_stop_signals_only_agentd_so_it_stops_its_own_postgres() -> None:
    assert _directives("agentd.service")["KillMode"] == ["mixed"]


def test_runtime_directory_is_private_so_platformdirs_accepts_it() -> None:
    unit = _directives("agentd.service")
    assert unit["RuntimeDirectory"] == ["agentd"]
    assert unit["RuntimeDirectoryMode"] == ["0700"]
    assert "XDG_RUNTIME_DIR=/run/agentd" in unit["Environment"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for name in ("agentd.service", "agentd.socket"):
        # verify insists ExecStart exists; point it at a real binary, everything else as shipped
        text = (CONTRIB / name).read_text().replace("/usr/local/bin/agentd", "/bin/true")
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "agentd.service"), str(tmp_path / "agentd.socket")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_runtime_dir_warning_is_surfaced(tmp_path: Path) -> None:
    """An XDG_RUNTIME_DIR with mode 0755 (the unit's old default) is reported, not silently ignored."""
    import os
    import sys

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    code = (
        "import logging; logging.basicConfig()\n"
        "from agentd.store.embedded import _import_pgserver; _import_pgserver()"
    )
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "embedded PostgreSQL lock directory" in result.stderr
    assert "0700" in result.stderr or "mode" in result.stderr
    runtime.chmod(0o700)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "lock directory" not in result.stderr


def test_sandbox_directives_from_issue_13() -> None:
    unit = _directives("agentd.service")
    for key in (
        "SystemCallFilter",
        "SystemCallArchitectures",
        "CapabilityBoundingSet",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "UMask",
        "RemoveIPC",
    ):
        assert key in unit, key
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["UMask"] == ["0027"]


def test_one_socket_path_and_mode_everywhere() -> None:
    sock = _directives("agentd.socket")
    assert sock["Accept"] == ["no"]
    assert "/run/agentd.sock" in sock["ListenStream"]
    assert (sock["SocketMode"], sock["SocketGroup"]) == (["0660"], ["agentd"])
    readme = (CONTRIB.parent / "README.md").read_text()
    toml = (CONTRIB / "agentd.toml").read_text()
    for text in (readme, toml):
        assert "/run/agentd/agentd.sock" not in text
        assert "/run/agentd.sock" in text and "0660" in text and "group agentd" in text


def test_timeout_stop_sec_covers_shutdown_timeout() -> None:
    from agentd.config import NUMBER_RANGES, build_config
    from agentd.shutdown import MARGIN

    stop = float(_directives("agentd.service")["TimeoutStopSec"][0])
    shipped = build_config(config_file=CONTRIB / "agentd.toml")
    # agentd's own bound, then ~30 s for the embedded PostgreSQL to stop
    assert shipped.shutdown_timeout + MARGIN + 30 <= stop
    assert "TimeoutStopSec" in (CONTRIB / "agentd.toml").read_text()
    assert "shutdown_timeout" in (CONTRIB / "agentd.service").read_text()
    assert NUMBER_RANGES["shutdown_timeout"][0] == 0
