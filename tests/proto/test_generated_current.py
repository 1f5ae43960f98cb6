"""The committed agentd/proto/*_pb2.py and *_pb2.pyi are exactly what scripts/gen_proto.py produces.

A .proto edit without regenerating (or a hand edit of generated code) would ship messages that
differ from their source; this catches it by regenerating into a temporary directory.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "agentd" / "proto"
GENERATED_GLOBS = ("*_pb2.py", "*_pb2.pyi")


def _generated_names(directory: Path) -> set[str]:
    return {p.name for pattern in GENERATED_GLOBS for p in directory.glob(pattern)}


def _regenerate(out: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"gen_proto.py failed:\n{result.stdout}\n{result.stderr}"


def test_committed_generated_files_are_current(tmp_path: Path) -> None:
    _regenerate(tmp_path)

    fresh = _generated_names(tmp_path)
    committed = _generated_names(PROTO_DIR)
    expected = {f"{p.stem}{suffix}" for p in PROTO_DIR.glob("*.proto") for suffix in ("_pb2.py", "_pb2.pyi")}
    assert fresh == expected, f"generator wrote {sorted(fresh)}, expected {sorted(expected)}"
    assert committed == fresh, (
        f"agentd/proto has generated files {sorted(committed)}, the sources produce {sorted(fresh)}; "
        "run `just proto`"
    )

    stale = []
    for name in sorted(fresh):
        new = (tmp_path / name).read_text()
        old = (PROTO_DIR / name).read_text()
        if new != old:
            diff = difflib.unified_diff(
                old.splitlines(), new.splitlines(), f"committed/{name}", f"regenerated/{name}", lineterm=""
            )
            # The serialized descriptor is one very long line: clip lines so the diff stays readable.
            stale.append("\n".join(line[:160] for line in list(diff)[:40]))
    assert not stale, "generated files are stale; run `just proto`:\n" + "\n".join(stale)


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _regenerate(first)
    _regenerate(second)
    for name in sorted(_generated_names(first)):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_agent_module_imports_tailnet_through_the_package() -> None:
    source = (PROTO_DIR / "agent_pb2.py").read_text()
    assert "from agentd.proto import tailnet_pb2" in source
    assert "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'agentd.proto.agent_pb2'" in source
