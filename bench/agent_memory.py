"""Where the memory of one connected agent goes: tracemalloc attribution per agent.

Seeds N agents (bench/scale.py's seeding), starts ``agentd serve`` as a separate process under
tracemalloc (this script re-executed as a wrapper that calls the real CLI), takes a snapshot, lets
interop/goload connect the N agents (upgrade + GetManifest, then idle), takes a second snapshot and
prints:

* the bytes per agent of the top allocation sites (snapshot diff grouped by traceback; each row shows
  the innermost agentd frames of its traceback, and the innermost frame overall);
* the same grouped by file;
* trio tasks per agent (the task tree walked from the root task) and the coroutines they run;
* the server's RSS delta per agent (inflated by tracemalloc's own bookkeeping: use bench/scale.py
  for the RSS figure itself).

    python bench/agent_memory.py --agents 300 [--websocket] [--postgres-url URL] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import linecache
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

READER = "agentd.mux.trio_session.MuxSession._reader"
#: frames kept per traceback
FRAMES = 16


# ------------------------------------------------------------------------------- traced server


def _walk_tasks() -> list[Any]:
    import trio

    tasks = []
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        tasks.append(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


def serve_traced(out_dir: Path, cli_args: list[str]) -> int:
    """The wrapper: SIGUSR1 writes snapshot-<k>.pickle and tasks-<k>.json; the first one starts
    tracemalloc (so start-up runs at full speed, and the later snapshots hold exactly what was
    allocated since and is still alive)."""
    count = [0]

    def dump(_signum: int, _frame: object) -> None:
        gc.collect()
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)
        tasks = _walk_tasks()
        names = collections.Counter(task.name for task in tasks)
        snapshot = tracemalloc.take_snapshot()
        k = count[0]
        count[0] += 1
        with open(out_dir / f"snapshot-{k}.pickle.tmp", "wb") as f:
            pickle.dump(snapshot, f)
        (out_dir / f"tasks-{k}.json").write_text(json.dumps({"tasks": len(tasks), "names": names}))
        os.rename(out_dir / f"snapshot-{k}.pickle.tmp", out_dir / f"snapshot-{k}.pickle")

    signal.signal(signal.SIGUSR1, dump)
    from agentd.cli import main

    return main(cli_args)


# ------------------------------------------------------------------------------- driver


def wait_for(path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {path} after {timeout} s")
        time.sleep(0.1)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def snapshot_of(server_pid: int, out: Path, k: int) -> tuple[tracemalloc.Snapshot, dict[str, Any]]:
    os.kill(server_pid, signal.SIGUSR1)
    wait_for(out / f"snapshot-{k}.pickle")
    with open(out / f"snapshot-{k}.pickle", "rb") as f:
        snap: tracemalloc.Snapshot = pickle.load(f)
    tasks = json.loads((out / f"tasks-{k}.json").read_text())
    return snap, tasks


def describe(tb: tracemalloc.Traceback) -> str:
    """The innermost agentd frames (up to 3) and the innermost frame if it is not agentd's."""
    frames = list(tb)[::-1]  # a Traceback runs from the oldest frame to the most recent one
    ours = [f for f in frames if "/agentd/" in f.filename and "/bench/" not in f.filename]
    parts = []
    inner = frames[0]
    if "/agentd/" not in inner.filename:
        parts.append(f"{_short(inner.filename)}:{inner.lineno}")
    for f in ours[:3]:
        line = linecache.getline(f.filename, f.lineno).strip()
        parts.append(f"{_short(f.filename)}:{f.lineno} {line[:60]}")
    return " <- ".join(parts)


def _short(filename: str) -> str:
    for marker in ("/agentd/", "/site-packages/", "/lib/python3"):
        i = filename.rfind(marker)
        if i >= 0:
            return filename[i + 1 :]
    return filename


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_serve":
        return serve_traced(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--websocket", action="store_true")
    parser.add_argument("--dials", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--postgres-url", default=os.environ.get("AGENTD_TEST_POSTGRES_URL"))
    args = parser.parse_args(argv)

    import scale  # bench/scale.py: seeding, the plan, goload

    scale.raise_nofile_limit()
    binary = scale.build_go_program("goload")
    n = args.agents
    with (
        scale.postgres_server(args.postgres_url) as pg,
        scale.fresh_database(pg) as dbname,
        tempfile.TemporaryDirectory(prefix="agentd-mem-") as tmp,
    ):
        work = Path(tmp)
        db_url = pg.url_for(dbname)
        plan = work / "plan.json"
        scale.write_plan(plan, scale.seed(db_url, n))
        sock = work / "agentd.sock"
        log_path = work / "server.log"
        command = [sys.executable, str(Path(__file__).resolve()), "_serve", str(work)]
        command += ["serve", "--postgres-url", db_url, "--data-dir", str(work / "data")]
        command += ["--listen", f"unix:{sock}", "--listen", "tcp://127.0.0.1:0", "--metrics-listen", "none"]
        with open(log_path, "wb") as log:
            server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
        try:
            port = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                text = log_path.read_text(errors="replace")
                if port is None and "listening on tcp://" in text:
                    port = int(text.split("listening on tcp://", 1)[1].split()[0].rsplit(":", 1)[1])
                if port is not None and " ready" in text:
                    break
                if server.poll() is not None:
                    raise RuntimeError(f"server exited:\n{text[-3000:]}")
                time.sleep(0.1)
            else:
                raise RuntimeError(f"server not ready after 600 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
            snap0, tasks0 = snapshot_of(server.pid, work, 0)
            rss0 = rss_kib(server.pid)
            gen_args = [f"-plan={plan}", f"-dials={args.dials}", "-mode=rate", "-timeout=600s"]
            if args.websocket:
                gen_args += ["-websocket", f"-tcp=127.0.0.1:{port}"]
            else:
                gen_args += [f"-unix={sock}"]
            with (
                open(work / "goload.log", "wb") as goerr,
                scale.run_generator(binary, gen_args, goerr) as gen,
            ):
                connected = gen.event("connected", timeout=1200 + n)
                time.sleep(3.0)  # let the connect burst's stragglers (pings, ACKs) settle
                rss1 = rss_kib(server.pid)
                snap1, tasks1 = snapshot_of(server.pid, work, 1)
                gen.send("quit")
                gen.event("done", timeout=120)
            errors = [line for line in log_path.read_text(errors="replace").splitlines() if "failed" in line]
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()

    # per live session (agents whose session failed, e.g. under tracemalloc's slowdown, do not count)
    got = (tasks1["names"].get(READER, 0) - tasks0["names"].get(READER, 0)) or 1
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
    snap0 = snap0.filter_traces(filters)
    snap1 = snap1.filter_traces(filters)
    stats = snap1.compare_to(snap0, "traceback")
    total = sum(s.size_diff for s in stats)
    transport = "websocket/TCP" if args.websocket else "raw yamux/unix"
    print(f"agentd memory per connected agent: {got} agents ({transport}), load {os.getloadavg()}")
    print(f"{connected['connected']} connected, {got} sessions alive at the snapshot")
    for line in errors[:5]:
        print(f"  server log: {line[:200]}")
    print(f"tracemalloc: {total / got / 1024:.1f} KiB per agent (Python allocations, net)")
    print(f"RSS delta: {(rss1 - rss0) / got:.1f} KiB per agent (inflated by tracemalloc's bookkeeping)")
    per_agent = (tasks1["tasks"] - tasks0["tasks"]) / got
    print(f"trio tasks: {tasks0['tasks']} before, {tasks1['tasks']} after = {per_agent:.2f} per agent")
    names = collections.Counter(tasks1["names"])
    names.subtract(tasks0["names"])
    for name, count in names.most_common():
        if count > 0:
            print(f"  {count / got:5.2f}  {name}")
    print()
    print(f"top {args.top} allocation sites by traceback (bytes per agent, blocks per agent):")
    for s in stats[: args.top]:
        print(f"{s.size_diff / got:9.0f} B {s.count_diff / got:6.1f}  {describe(s.traceback)}")
    print()
    print(f"top {args.top} by file (bytes per agent):")
    for s in snap1.compare_to(snap0, "filename")[: args.top]:
        print(f"{s.size_diff / got:9.0f} B {s.count_diff / got:6.1f}  {_short(s.traceback[0].filename)}")
    print()
    print(f"top {args.top} by line (bytes per agent):")
    for s in snap1.compare_to(snap0, "lineno")[: args.top]:
        f = s.traceback[0]
        line = linecache.getline(f.filename, f.lineno).strip()
        where = f"{_short(f.filename)}:{f.lineno}"
        print(f"{s.size_diff / got:9.0f} B {s.count_diff / got:6.1f}  {where} {line[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
