"""Multiplexer benchmark: agentd.mux against hashicorp/yamux, raw sockets as the ceiling.

    python bench/mux.py                 # full run: median of 3 runs per figure (several minutes)
    python bench/mux.py --quick         # smoke run: small sizes, 1 run (< 60 s)
    python bench/mux.py --only unix,b,c,sink,rt --runs 5

Pairs (client → server, each its own process, the driver a third one):
  a   raw trio socket → raw trio socket (no mux; one connection per stream: the ceiling)
  b   Go yamux → Go yamux (the baseline every ratio is taken against, measured in this run)
  c   agentd.mux → agentd.mux
  d1  Go yamux client → agentd.mux server (the production shape: agent dials agentd)
  d2  agentd.mux client → Go yamux server
Workloads: 1-stream sink, 1-stream echo, 16-stream echo (MB/s of payload sent), 64-byte round trips
on one stream, 64-byte round trips with a new stream each, and stream open+close per second
(opener never waits; an echo round trip at the end makes sure the server kept up).
`--only` takes pair names, transports (unix, tcp) and workload names; each dimension you name is
filtered, the others run in full; (b) always runs, as every ratio is taken against it.
The machine is shared and noisy: read ratios and CPU per op, not absolute rates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.gopeer import build_go_peer  # noqa: E402

PEER = str(REPO / "bench" / "muxpeer.py")
PAIRS = {  # name: (client impl, server impl)
    "a": ("raw", "raw"),
    "b": ("go", "go"),
    "c": ("mux", "mux"),
    "d1": ("go", "mux"),
    "d2": ("mux", "go"),
}
TRANSPORTS = ("unix", "tcp")
WORKLOADS = ("sink", "echo", "echo16", "rt", "newstream", "openclose")
LABELS = {
    "sink": "1-stream sink",
    "echo": "1-stream echo",
    "echo16": "16-stream echo",
    "rt": "64 B round trip",
    "newstream": "64 B rt, new stream",
    "openclose": "open+close",
}
# Issue 3's targets over Unix sockets, as ratios to (b); other cells are informative only.
TARGETS = {"sink": 1.0, "echo": 1.0, "rt": 0.8, "newstream": 0.8}
MUX_PAIRS = ("c", "d1", "d2")


def workload_args(workload: str, quick: bool, duration: float) -> dict[str, str]:
    mib = 1 << 20
    sizes = {"sink": 256 * mib, "echo": 64 * mib, "echo16": 128 * mib}
    if quick:
        sizes = {"sink": 32 * mib, "echo": 8 * mib, "echo16": 16 * mib}
    if workload in sizes:
        return {
            "bench": "echo" if workload == "echo16" else workload,
            "size": str(sizes[workload]),
            "streams": "16" if workload == "echo16" else "1",
        }
    return {"bench": workload, "duration": str(duration)}


def client_command(impl: str, go: Path, address: str, args: dict[str, str]) -> list[str]:
    if impl == "go":
        argv = [str(go), "-role", "client", "-dial", address, "-keepalive", "0"]
        for key, value in args.items():
            argv += [f"-{key}", value + ("s" if key == "duration" else "")]
        return argv
    argv = [sys.executable, PEER, "--impl", impl, "--dial", address]
    for key, value in args.items():
        argv += [f"--{key}", value]
    return argv


def server_command(impl: str, go: Path, listen: str) -> list[str]:
    if impl == "go":
        return [str(go), "-role", "server", "-listen", listen, "-keepalive", "0"]
    return [sys.executable, PEER, "--impl", impl, "--listen", listen]


@contextmanager
def server(impl: str, go: Path, listen: str) -> Iterator[tuple[str, int]]:
    """Start a server process, yield (the address it printed, its pid), kill it afterwards."""
    proc = subprocess.Popen(server_command(impl, go, listen), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"{impl} server did not start: {line!r}")
        yield line.split(" ", 1)[1].strip(), proc.pid
    finally:
        proc.kill()
        proc.wait()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class Figure:
    """One client run: the workload's figure, and CPU microseconds per op (per MiB for byte
    workloads) spent by the server (from /proc, 10 ms ticks: coarse for short runs) and by the
    client (measured around the workload only). CPU per op is far less sensitive than throughput
    to the other load on a shared machine."""

    value: float
    server_us: float
    client_us: float


def run_client(argv: list[str], timeout: float, server_pid: int) -> Figure | str:
    server_before = process_cpu(server_pid)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    server_cpu = process_cpu(server_pid) - server_before
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"exit {done.returncode}: {last[:60]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["error"]:
        return str(result["error"])[:60]
    units = result["n"] / (1 << 20) if result["unit"] == "MB/s" else result["n"]
    client_cpu = float(result["cpu"])  # measured by the client around the workload only
    return Figure(float(result["value"]), server_cpu / units * 1e6, client_cpu / units * 1e6)


def fmt(value: float | None, workload: str) -> str:
    if value is None:
        return "-"
    if workload in ("sink", "echo", "echo16"):
        return f"{value:,.0f} MB/s"
    return f"{value:,.0f}/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, short durations, 1 run")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, --quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per rate workload (default 2, quick 0.3)")
    parser.add_argument("--only", default="", help="comma list of pairs, transports, workloads")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    duration = args.duration or (0.3 if args.quick else 2.0)
    only = {token for token in args.only.split(",") if token}
    unknown = only - set(PAIRS) - set(TRANSPORTS) - set(WORKLOADS)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}")

    def pick(options: tuple[str, ...] | list[str]) -> list[str]:
        chosen = [o for o in options if o in only]
        return chosen or list(options)

    pairs, transports, workloads = pick(list(PAIRS)), pick(TRANSPORTS), pick(WORKLOADS)
    if "b" not in pairs:
        pairs.insert(0, "b")  # every ratio is against (b), so it always runs
    go = build_go_peer()
    raw: dict[tuple[str, str, str], list[Figure | str]] = {}
    started = time.perf_counter()
    timeout = 10.0 if args.quick else 60.0  # a hung client is a FAIL cell, not a hung run
    # All servers of a transport stay up together, and every workload runs pair after pair, so each
    # ratio compares figures taken seconds apart (this machine's load changes by the minute).
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
        for transport in transports:
            with contextlib.ExitStack() as stack:
                addresses: dict[str, tuple[str, int]] = {}
                for pair in pairs:
                    listen = f"unix:{tmp}/{pair}.sock" if transport == "unix" else "tcp:127.0.0.1:0"
                    addresses[pair] = stack.enter_context(server(PAIRS[pair][1], go, listen))
                for _ in range(runs):
                    for workload in workloads:
                        for pair in pairs:
                            if pair == "a" and workload in ("newstream", "openclose"):
                                continue  # one connection per stream: not a stream figure
                            taken = raw.setdefault((transport, pair, workload), [])
                            if "timeout" in taken:
                                continue  # it hung once: do not burn another timeout on it
                            wargs = workload_args(workload, args.quick, duration)
                            address, server_pid = addresses[pair]
                            argv = client_command(PAIRS[pair][0], go, address, wargs)
                            figure = run_client(argv, timeout, server_pid)
                            taken.append(figure)
                            line = f"  {transport:4} {pair:2} {workload:9} {figure}"
                            print(line, file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    def figures(transport: str, pair: str, workload: str) -> list[Figure]:
        return [f for f in raw.get((transport, pair, workload), []) if isinstance(f, Figure)]

    def median(transport: str, pair: str, workload: str) -> float | None:
        found = figures(transport, pair, workload)
        return statistics.median(f.value for f in found) if found else None

    def median_cpu(transport: str, pair: str, workload: str) -> tuple[float, float] | None:
        found = figures(transport, pair, workload)
        if not found:
            return None
        return statistics.median(f.server_us for f in found), statistics.median(f.client_us for f in found)

    def failed(transport: str, pair: str, workload: str) -> bool:
        return any(isinstance(f, str) for f in raw.get((transport, pair, workload), []))

    width = 24
    print(f"\nagentd.mux benchmark - median of {runs} run(s), {elapsed:.0f} s, ratios against (b) Go<->Go")
    print("(a) raw trio sockets  (b) Go<->Go  (c) agentd<->agentd")
    print("(d1) Go client -> agentd server  (d2) agentd client -> Go server")
    for transport in transports:
        header = f"{'workload':20}" + "".join(f"{'(' + p + ')':>{width}}" for p in pairs)
        print(f"\n{transport.upper()}: throughput / rate\n{header}\n{'-' * len(header)}")
        for workload in workloads:
            base = median(transport, "b", workload)
            cells = []
            for pair in pairs:
                value = median(transport, pair, workload)
                if value is None:
                    cells.append(f"{'FAIL' if failed(transport, pair, workload) else '-':>{width}}")
                    continue
                text = fmt(value, workload)
                if base and pair != "b":
                    ratio = value / base
                    text += f" {ratio:4.2f}x"
                    target = TARGETS.get(workload)
                    if transport == "unix" and pair in MUX_PAIRS and target is not None:
                        text += " PASS" if ratio >= target else " MISS"
                cells.append(f"{text:>{width}}")
            print(f"{LABELS[workload]:20}" + "".join(cells))
        print(
            f"\n{transport.upper()}: CPU microseconds per op (per MiB for byte workloads), server+client,"
            f" and the total's ratio to (b) (lower is better)\n{header}\n{'-' * len(header)}"
        )
        for workload in workloads:
            base_cpu = median_cpu(transport, "b", workload)
            cells = []
            for pair in pairs:
                cpu = median_cpu(transport, pair, workload)
                if cpu is None:
                    cells.append(f"{'FAIL' if failed(transport, pair, workload) else '-':>{width}}")
                    continue
                text = f"{cpu[0]:,.0f}+{cpu[1]:,.0f}"
                if base_cpu and pair != "b" and sum(base_cpu) > 0:
                    text += f" {sum(cpu) / sum(base_cpu):4.2f}x"
                cells.append(f"{text:>{width}}")
            print(f"{LABELS[workload]:20}" + "".join(cells))
    print("\nTargets (Unix, agentd.mux vs (b)): sink & echo >= 1.0x, 64 B rt >= 0.8x, new-stream rt >= 0.8x")
    for (transport, pair, workload), found in sorted(raw.items()):
        errors = [f for f in found if isinstance(f, str)]
        if errors:
            print(f"FAILED {transport} ({pair}) {workload}: {errors[0]}")
    if args.json:
        dump = {
            "|".join(key): [attrs.asdict(f) if isinstance(f, Figure) else f for f in found]
            for key, found in raw.items()
        }
        args.json.write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
