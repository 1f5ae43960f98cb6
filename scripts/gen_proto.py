"""Regenerate agentd/proto/*_pb2.py and *_pb2.pyi from the .proto sources beside them.

Run from anywhere: ``python scripts/gen_proto.py`` (``just proto``), or
``python scripts/gen_proto.py --out DIR`` to write the four generated files into DIR instead
(tests/proto/test_generated_current.py does that to prove the committed files are current).

protoc comes from the pinned grpcio-tools, so the output is a pure function of the sources and
that pin (plus one fixed mypy directive prepended to each stub, see PYI_HEADER). Sources are
compiled with the repository root as the import root, which makes the generated agent_pb2 say
``from agentd.proto import tailnet_pb2``. Only message modules and type stubs are produced:
agentd speaks DRPC, so gRPC service stubs would be dead code.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_PKG = Path("agentd") / "proto"

# protoc's .pyi output uses bare ``Mapping`` and a ``**kwargs`` without annotation (for fields named
# after Python keywords, e.g. IPFields.class). Code checked with ``mypy --strict`` imports these
# stubs, and mypy reports errors in followed stubs, so the stubs carry this one inline directive.
PYI_HEADER = '# mypy: disable-error-code="type-arg, no-untyped-def"\n'


def proto_sources() -> list[Path]:
    """The .proto files, relative to the repository root, in a stable order."""
    return sorted(p.relative_to(REPO) for p in (REPO / PROTO_PKG).glob("*.proto"))


def well_known_include() -> Path:
    """grpcio-tools' copy of google/protobuf/*.proto (Timestamp, Duration, Empty, Struct, wrappers)."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def generate(out_dir: Path) -> list[Path]:
    """Compile every source into out_dir (flat: out_dir/agent_pb2.py ...); return the files written."""
    sources = proto_sources()
    if not sources:
        raise SystemExit(f"no .proto sources under {REPO / PROTO_PKG}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agentd-proto-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "-I",
            str(well_known_include()),
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            *(str(s) for s in sources),
        ]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"protoc failed ({result.returncode}):\n{result.stderr}")
        written: list[Path] = []
        for src in sources:
            for suffix in ("_pb2.py", "_pb2.pyi"):
                name = src.stem + suffix
                generated = Path(tmp) / PROTO_PKG / name
                target = out_dir / name
                if suffix == "_pb2.pyi":
                    target.write_text(PYI_HEADER + generated.read_text())
                else:
                    shutil.copyfile(generated, target)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / PROTO_PKG,
        help="directory for the generated files (default: agentd/proto)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
