"""Scale benchmark: how many workspace agents one `agentd serve` process holds, and at what cost.

For each ``--agents`` count and each of ``--runs`` runs: a fresh database (``agentd_scale_<pid>_…``
on ``--postgres-url`` / $AGENTD_TEST_POSTGRES_URL, dropped afterwards; else an embedded pgserver in
a temp dir), migrated and seeded with N workspaces of examples/workspace.toml's shape (its first
agent; one agent per workspace). `python -m agentd serve` runs as a separate process; the load
generator is interop/goload (Go, hashicorp/yamux, DRPC framed by hand, request bodies encoded here),
so the generator is not what limits the numbers — its own CPU is reported.

Phases, each sampled from /proc (server utime+stime, VmRSS/VmHWM) and pg_stat_database
(xact_commit+xact_rollback of the bench database, read from another database so the sampling does
not count):

* connect: N agents dial (``--dials`` in flight), upgrade (raw yamux on the Unix socket, or a
  WebSocket over TCP with ``--websocket``) and call GetManifest;
* idle: ``--idle-seconds`` with every agent connected and no RPCs (≥ 2 monitor ticks of 15 s);
* load: ``--duration`` s of UpdateStats / BatchUpdateMetadata / BatchCreateLogs in turn at
  ``--rate`` RPC/s per agent (random phase), or back to back (``--saturate``), or Coder's cadence
  (``--coder-cadence``: stats 30 s, metadata 10 s, logs 60 s, banners 2 min, plus a Coordinate and a
  StreamDERPMaps stream held open per agent from the connect phase on).

"CPU ms per RPC" is load-phase server CPU minus the idle phase's rate over the same time, divided by
the RPCs completed. PostgreSQL flushes backend statistics about once a second (10 s after a
backend goes idle), so with an idle phase of ≥ 22 s the transaction counts are read 11 s late: the
idle window for transactions starts 11 s after the connect phase, the load phase's count is read
11 s after it ends (less the idle rate over those 11 s). ``--profile`` records the server with
py-spy over the load phase and prints the functions with the most own samples.

``--workers N`` runs `agentd serve --workers N` (CPU and RSS are summed over the parent and its
workers; ``--tcp`` dials raw yamux over TCP, where SO_REUSEPORT spreads agents evenly over the
workers). ``--kill-worker-at S`` SIGKILLs one worker S seconds into the load phase; the generator
redials every agent whose session ended (as Coder's agent does) and the run reports how many agents
lost their session, their reconnect times, their failed calls meanwhile ("failover errors"), and
the errors everyone else saw.

    python bench/scale.py --agents 500,1000,2000 [--websocket] [--runs 3] [--json]
    python bench/scale.py --agents 5000 --workers 2 --tcp [--kill-worker-at 10]
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import msgspec
import psycopg
import trio
from psycopg import sql as pgsql

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentd.admin import WorkspaceSpec, create_workspace, load_workspace_spec  # noqa: E402
from agentd.proto import agent_pb2, tailnet_pb2  # noqa: E402
from agentd.store import open_database  # noqa: E402
from agentd.store.migrate import migrate  # noqa: E402
from agentd.store.testing import TestServer, embedded_test_server  # noqa: E402
from tests.gopeer import build_go_program  # noqa: E402

EXAMPLE = REPO / "examples" / "workspace.toml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: PostgreSQL 15 backends flush their statistics at most once a second while busy and 10 s after
#: going idle, so pg_stat_database lags the truth by up to this much.
PG_STATS_LAG = 11.0


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE → hard, for this process and (inherited) the server and generator."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ------------------------------------------------------------------------------- database


@contextlib.contextmanager
def postgres_server(url: str | None) -> Iterator[TestServer]:
    """The server to create bench databases on: ``url``, else an embedded one in a temp dir."""
    if url:
        yield TestServer(url)
        return
    with (
        tempfile.TemporaryDirectory(prefix="agentd-scale-pg-") as tmp,
        embedded_test_server(Path(tmp)) as server,
    ):
        yield server


@contextlib.contextmanager
def fresh_database(server: TestServer) -> Iterator[str]:
    """CREATE DATABASE agentd_scale_<pid>_<hex>; yield its name; DROP it (FORCE) afterwards."""
    name = server.create_empty("agentd_scale")  # + _<pid>_<hex>
    try:
        yield name
    finally:
        server.drop(name)


@attrs.frozen
class SeededAgent:
    token: str
    log_source_id: uuid.UUID


def bench_spec(index: int) -> WorkspaceSpec:
    """examples/workspace.toml with only its first agent, under a unique workspace name."""
    spec = load_workspace_spec(EXAMPLE)
    return msgspec.structs.replace(spec, name=f"scale-{index}", agents=spec.agents[:1])


def metadata_keys() -> list[str]:
    return [m.key for m in bench_spec(0).agents[0].metadata]


async def _migrate_and_create_first(url: str) -> tuple[str, str, str]:
    """Migrate, then create workspace 0 with agentd.admin.create_workspace: (its ids and the agent's
    token, as text)."""
    async with open_database(url, min_size=1, max_size=1) as db:
        await migrate(db)
        created = await create_workspace(db, bench_spec(0))
    agent = created.agents[0]
    return str(created.workspace_id), str(agent.id), str(agent.token)


def _clone_token(i: int) -> uuid.UUID:
    """Copy i's agent token (tokens are stored as SHA-256 digests, so the bench derives them)."""
    return uuid.UUID(hashlib.md5(f"scale-token:{i}".encode()).hexdigest())


#: Rows of workspace 0 that `_clone` copies, by table: the column that selects them.
_CLONED_ROOTS = {
    "workspaces": "id",
    "provisioner_jobs": "id",
    "workspace_builds": "id",
    "workspace_resources": "id",
    "workspace_agents": "id",
}


def _clone(conn: psycopg.Connection[Any], workspace_id: str, agent_id: str, count: int) -> None:
    """Copy workspace 0's rows (workspace, job, build, resource, agent and every row that references
    the agent) `count - 1` times in one transaction, with INSERT … SELECT over generate_series.

    Copy i maps every uuid key k of a copied row, and every foreign key to a copied table, to
    md5(k || ':' || i)::uuid, so references stay consistent without a mapping table; the agent's
    token and the workspace's name become unique the same way. Tables and foreign keys come from
    pg_catalog, so a schema change is followed without editing this function.
    """
    ids = {
        "workspaces": workspace_id,
        "workspace_agents": agent_id,
    }
    row = conn.execute(
        "SELECT b.id AS build, b.job_id AS job, r.id AS res FROM workspace_builds b"
        " JOIN workspace_resources r ON r.job_id = b.job_id WHERE b.workspace_id = %s",
        [workspace_id],
    ).fetchone()
    assert row is not None
    ids["workspace_builds"], ids["provisioner_jobs"], ids["workspace_resources"] = map(str, row)
    fks = conn.execute(
        "SELECT c.conrelid::regclass::text AS tbl, a.attname AS col, c.confrelid::regclass::text AS ref"
        " FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)"
        " WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace"
    ).fetchall()
    children = sorted({t for t, _c, ref in fks if ref == "workspace_agents" and t != "workspace_agents"})
    # a child that references another child (scripts → log sources) is copied after it
    children.sort(key=lambda t: any(ref in children and ref != t for tt, _c, ref in fks if tt == t))
    cloned = set(_CLONED_ROOTS) | set(children)
    order = [*_CLONED_ROOTS, *children]
    agent_col: dict[str, str] = {}
    for t, c, ref in fks:  # the owning agent's column, not e.g. devcontainers.subagent_id
        if ref == "workspace_agents" and t in children and c not in ("subagent_id", "parent_id"):
            agent_col[t] = c
    fk_cols = {(t, c) for t, c, ref in fks if ref in cloned}

    def new_key(col: str) -> pgsql.Composable:
        return pgsql.SQL("md5(t.{}::text || ':' || g.i)::uuid").format(pgsql.Identifier(col))

    with conn.transaction():
        for table in order:
            columns = conn.execute(
                "SELECT column_name, data_type, is_generated, column_default FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
                [table],
            ).fetchall()
            names, values = [], []
            for name, dtype, generated, default in columns:
                if generated == "ALWAYS" or (default or "").startswith("nextval("):
                    continue
                is_key = dtype == "uuid" and (name in ("id", "log_source_id") or (table, name) in fk_cols)
                if is_key:
                    value = new_key(name)
                elif (table, name) == ("workspace_agents", "auth_token_hash"):
                    # _clone_token(i), hashed as agentd.store.agents.token_digest does
                    value = pgsql.SQL("sha256(uuid_send(md5('scale-token:' || g.i)::uuid))")
                elif table == "workspaces" and name == "name":
                    value = pgsql.SQL("'scale-' || g.i")
                elif table == "provisioner_jobs" and name == "input":
                    value = pgsql.SQL(
                        "replace(t.input::text, {}, md5({} || ':' || g.i)::uuid::text)::jsonb"
                    ).format(pgsql.Literal(workspace_id), pgsql.Literal(workspace_id))
                else:
                    value = pgsql.SQL("t.{}").format(pgsql.Identifier(name))
                names.append(pgsql.Identifier(name))
                values.append(value)
            selector = _CLONED_ROOTS.get(table) or agent_col[table]
            key = ids[table] if table in _CLONED_ROOTS else agent_id
            conn.execute(
                pgsql.SQL(
                    "INSERT INTO {} ({}) SELECT {} FROM {} t, generate_series(1, {}) AS g(i) WHERE t.{} = {}"
                ).format(
                    pgsql.Identifier(table),
                    pgsql.SQL(", ").join(names),
                    pgsql.SQL(", ").join(values),
                    pgsql.Identifier(table),
                    pgsql.Literal(count - 1),
                    pgsql.Identifier(selector),
                    pgsql.Literal(key),
                )
            )


def seed(url: str, count: int) -> list[SeededAgent]:
    """Migrate, create workspace 0 through agentd.admin, then bulk-copy it to `count` workspaces
    (one agent each); return every agent's token and the id of one of its log sources."""
    workspace_id, agent_id, token = trio.run(_migrate_and_create_first, url)
    tokens = {uuid.UUID(agent_id): uuid.UUID(token)}
    for i in range(1, count):  # copy i's agent id is md5(agent_id || ':' || i), see _clone
        tokens[uuid.UUID(hashlib.md5(f"{agent_id}:{i}".encode()).hexdigest())] = _clone_token(i)
    with psycopg.connect(url, autocommit=True) as conn:
        if count > 1:
            _clone(conn, workspace_id, agent_id, count)
        rows = conn.execute(
            "SELECT DISTINCT ON (a.id) a.id, s.id FROM workspace_agents a"
            " JOIN workspace_agent_log_sources s ON s.workspace_agent_id = a.id"
            " ORDER BY a.id, s.created_at, s.id"
        ).fetchall()
    if len(rows) != count:
        raise RuntimeError(f"seeded {len(rows)} agents with a log source, expected {count}")
    return [SeededAgent(str(tokens[agent]), uuid.UUID(str(source))) for agent, source in rows]


# ------------------------------------------------------------------------------- the plan


def _b64(message: Any) -> str:
    return base64.b64encode(message.SerializeToString()).decode()


def write_plan(path: Path, agents: list[SeededAgent]) -> None:
    """Tokens and pre-encoded request bodies for goload (so Go needs no protobuf library)."""
    now = int(time.time())
    stats = agent_pb2.UpdateStatsRequest(
        stats=agent_pb2.Stats(
            connections_by_proto={"ssh": 1},
            connection_count=1,
            connection_median_latency_ms=12.5,
            rx_packets=10,
            rx_bytes=1000,
            tx_packets=12,
            tx_bytes=1500,
            session_count_ssh=1,
        )
    )
    metadata = agent_pb2.BatchUpdateMetadataRequest(
        metadata=[
            agent_pb2.Metadata(
                key=key,
                result=agent_pb2.WorkspaceAgentMetadata.Result(
                    collected_at={"seconds": now}, age=1, value="42", error=""
                ),
            )
            for key in metadata_keys()
        ]
    )
    common = {
        "GetManifest": _b64(agent_pb2.GetManifestRequest()),
        "UpdateStats": _b64(stats),
        "BatchUpdateMetadata": _b64(metadata),
        "GetAnnouncementBanners": _b64(agent_pb2.GetAnnouncementBannersRequest()),
        "StreamDERPMaps": _b64(tailnet_pb2.StreamDERPMapsRequest()),
        "Coordinate": _b64(tailnet_pb2.CoordinateRequest()),
    }
    plan_agents = []
    for agent in agents:
        logs = agent_pb2.BatchCreateLogsRequest(
            log_source_id=agent.log_source_id.bytes,
            logs=[
                agent_pb2.Log(
                    created_at={"seconds": now}, output="scale bench line", level=agent_pb2.Log.INFO
                )
            ],
        )
        plan_agents.append({"token": agent.token, "bodies": {"BatchCreateLogs": _b64(logs)}})
    path.write_text(json.dumps({"common": common, "agents": plan_agents}))


# ------------------------------------------------------------------------------- sampling


@attrs.frozen
class Sample:
    at: float
    cpu_s: float
    rss_kib: int
    hwm_kib: int
    xacts: int


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` from /proc/PID/stat (fields 14 and 15, after the `(comm)` field)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def server_pids(pid: int) -> list[int]:
    """`pid` and its children (the workers of `agentd serve --workers N`), from /proc."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


@attrs.define
class Sampler:
    """Samples the server processes (the parent and its workers: CPU and RSS summed; the CPU of a
    worker that died is lost from the sum) and the bench database's transaction counter."""

    pid: int
    admin: psycopg.Connection[Any]
    dbname: str

    def xacts(self) -> int:
        self.admin.execute("SELECT pg_stat_clear_snapshot()")
        row = self.admin.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [self.dbname]
        ).fetchone()
        return int(row[0]) if row else 0

    def sample(self) -> Sample:
        cpu, rss, hwm = 0.0, 0, 0
        for pid in server_pids(self.pid):
            try:
                p_rss, p_hwm = proc_memory_kib(pid)
                cpu += proc_cpu_seconds(pid)
            except (OSError, KeyError):
                continue  # a worker that just died
            rss, hwm = rss + p_rss, hwm + p_hwm
        return Sample(time.monotonic(), cpu, rss, hwm, self.xacts())


# ------------------------------------------------------------------------------- processes


@attrs.define
class Server:
    process: subprocess.Popen[bytes]
    log_path: Path
    socket: Path
    tcp_port: int


@contextlib.contextmanager
def run_server(db_url: str, workdir: Path, extra_env: dict[str, str], workers: int = 1) -> Iterator[Server]:
    """`python -m agentd serve [--workers N]` on a Unix socket and an ephemeral TCP port; SIGTERM on exit."""
    sock = workdir / "agentd.sock"
    log_path = workdir / "server.log"
    command = [
        sys.executable,
        "-m",
        "agentd",
        "serve",
        "--postgres-url",
        db_url,
        "--data-dir",
        str(workdir / "data"),
        "--listen",
        f"unix:{sock}",
        "--listen",
        "tcp://127.0.0.1:0",
        "--metrics-listen",
        "none",
        "--workers",
        str(workers),
    ]
    ready = " ready" if workers == 1 else f"ready: {workers} workers"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, env={**os.environ, **extra_env})
    try:
        deadline = time.monotonic() + 60
        port = None
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            if port is None and (m := re.search(r"listening on tcp://[\d.]+:(\d+)", text)):
                port = int(m.group(1))
            if port is not None and ready in text:
                break
            if process.poll() is not None:
                raise RuntimeError(f"agentd serve exited with {process.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"agentd serve not ready after 60 s:\n{log_path.read_text()[-3000:]}")
        yield Server(process, log_path, sock, port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@attrs.define
class Generator:
    """The running goload process, spoken to over its stdin/stdout lines."""

    process: subprocess.Popen[str]

    def event(self, name: str, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"goload exited ({self.process.wait()}) before {name!r}")
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == name:
                return event
        raise RuntimeError(f"goload: no {name!r} within {timeout:.0f} s")

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()


@contextlib.contextmanager
def run_generator(binary: Path, args: list[str], stderr: IO[bytes]) -> Iterator[Generator]:
    process = subprocess.Popen(
        [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    try:
        yield Generator(process)
    finally:
        if process.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                Generator(process).send("quit")
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def profiling(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy record over the block (raw collapsed stacks in `out`); no-op without `out`."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--nonblocking",
            "--format",
            "raw",
            "--rate",
            "100",
            "-p",
            str(pid),
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)  # let it attach
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def top_functions(raw: Path, n: int = 25) -> dict[str, list[tuple[str, int, float]]]:
    """From py-spy's raw output (one `frame;frame;... count` line per stack): the functions with the
    most own samples (leaf frame, line numbers merged) and the share of samples per package."""
    own: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        match = _FRAME.match(leaf)
        func, file = (match["func"], match["file"]) if match else (leaf, "?")
        own[f"{func} ({file})"] += int(count)
        parts = file.split("/")
        packages["/".join(parts[:2]) if parts[0] == "agentd" and len(parts) > 2 else parts[0]] += int(count)
        total += int(count)
    if not total:
        return {"functions": [], "packages": []}
    return {
        "functions": [(name, c, c / total) for name, c in own.most_common(n)],
        "packages": [(name, c, c / total) for name, c in packages.most_common(12)],
    }


# ------------------------------------------------------------------------------- one run


@attrs.frozen
class Options:
    rate: float
    duration: float
    idle_seconds: float
    dials: int
    websocket: bool
    mode: str
    profile_dir: Path | None
    timeout: float
    profile_phase: str = "load"
    tcp: bool = False
    workers: int = 1
    kill_worker_at: float | None = None


def kill_worker_later(parent: int, delay: float, record: dict[str, Any]) -> threading.Timer:
    """SIGKILL one worker of `parent` after `delay` s (worker 0's slot: the lowest pid)."""

    def kill() -> None:
        workers = sorted(server_pids(parent)[1:])
        if not workers:
            record["error"] = "no worker to kill"
            return
        os.kill(workers[0], signal.SIGKILL)
        record.update(pid=workers[0], at=time.monotonic())

    timer = threading.Timer(delay, kill)
    timer.start()
    return timer


def run_once(binary: Path, pg: TestServer, agents: int, opts: Options, run_label: str) -> dict[str, Any]:
    """Seed, serve, connect, idle, load; return every measured number of this run."""
    with (
        fresh_database(pg) as dbname,
        tempfile.TemporaryDirectory(prefix="agentd-scale-") as tmp,
        psycopg.connect(pg.admin_url, autocommit=True) as admin,
    ):
        workdir = Path(tmp)
        db_url = pg.url_for(dbname)
        t0 = time.monotonic()
        seeded = seed(db_url, agents)
        seed_s = time.monotonic() - t0
        plan = workdir / "plan.json"
        write_plan(plan, seeded)
        with run_server(db_url, workdir, {}, opts.workers) as server:
            sampler = Sampler(server.process.pid, admin, dbname)
            args = [
                f"-plan={plan}",
                f"-dials={opts.dials}",
                f"-rate={opts.rate}",
                f"-duration={opts.duration}s",
                f"-mode={opts.mode}",
                f"-timeout={opts.timeout}s",
            ]
            if opts.kill_worker_at is not None:
                args += ["-redial"]
            if opts.websocket:
                args += ["-websocket", f"-tcp=127.0.0.1:{server.tcp_port}"]
            elif opts.tcp:
                args += [f"-tcp=127.0.0.1:{server.tcp_port}"]
            else:
                args += [f"-unix={server.socket}"]
            with open(workdir / "goload.log", "wb") as goerr, run_generator(binary, args, goerr) as gen:
                profile = opts.profile_dir / f"scale-{run_label}.txt" if opts.profile_dir else None
                s0 = sampler.sample()
                with profiling(server.process.pid, profile if opts.profile_phase == "connect" else None):
                    connected = gen.event("connected", timeout=600 + agents)
                s1 = sampler.sample()
                # PostgreSQL's counters trail by up to PG_STATS_LAG: start the idle window for
                # transactions that much later, so the connect burst does not leak into it
                settle = PG_STATS_LAG if opts.idle_seconds >= 2 * PG_STATS_LAG else 0.0
                time.sleep(settle)
                x1, x1_at = sampler.xacts(), time.monotonic()
                with profiling(server.process.pid, profile if opts.profile_phase == "idle" else None):
                    time.sleep(max(0.0, opts.idle_seconds - (time.monotonic() - s1.at)))
                s2 = sampler.sample()
                killed: dict[str, Any] = {}
                with profiling(server.process.pid, profile if opts.profile_phase == "load" else None):
                    gen.send("load")
                    load_started = time.monotonic()
                    timer = None
                    if opts.kill_worker_at is not None:
                        timer = kill_worker_later(server.process.pid, opts.kill_worker_at, killed)
                    loaded = gen.event("loaded", timeout=opts.duration + 2 * opts.timeout + 60)
                    s3 = sampler.sample()
                    if timer is not None:
                        timer.cancel()
                time.sleep(settle)  # the load phase's last transactions reach pg_stat_database
                x3, x3_at = sampler.xacts(), time.monotonic()
                gen.send("quit")
                done = gen.event("done", timeout=60)
            server_alive = server.process.poll() is None
            load_avg = os.getloadavg()
        go_log = (workdir / "goload.log").read_text(errors="replace")[-2000:]
        server_log = server.log_path.read_text(errors="replace")
        server_log_tail = server_log[-2000:]
        # the parent's own lines: worker deaths, restarts, hung workers killed
        supervisor_log = [line for line in server_log.splitlines() if " agentd.workers: " in line][-50:]
    n = connected["connected"] or 1
    idle_s = s2.at - s1.at
    load_s = s3.at - s2.at
    idle_cpu_rate = (s2.cpu_s - s1.cpu_s) / idle_s
    load_cpu = (s3.cpu_s - s2.cpu_s) - idle_cpu_rate * load_s
    rpcs = loaded["rpcs"] or 1
    idle_xact_rate = (s2.xacts - x1) / (s2.at - x1_at)
    result: dict[str, Any] = {
        "agents": agents,
        "label": run_label,
        "mode": opts.mode,
        "transport": "websocket" if opts.websocket else "unix",
        "seed_seconds": seed_s,
        "connected": connected["connected"],
        "connect_seconds": connected["seconds"],
        "connect_rate": connected["connected"] / connected["seconds"],
        "connect_latency": connected["connect_latency"],
        "connect_errors": connected["errors"],
        "streams_open": connected.get("streams_open"),
        "rpc_per_second": loaded["rpc_per_second"],
        "rpcs": loaded["rpcs"],
        "overall": loaded["overall"],
        "per_method": loaded["per_method"],
        "load_errors": loaded["errors"],
        "error_count": loaded["error_count"] + sum(connected["errors"].values()),
        "dead_sessions": loaded["dead_sessions"],
        "server_cpu_ms_per_rpc": 1000 * load_cpu / rpcs,
        "server_cpu_ms_per_rpc_gross": 1000 * (s3.cpu_s - s2.cpu_s) / rpcs,
        "server_cpu_pct_load": 100 * (s3.cpu_s - s2.cpu_s) / load_s,
        "server_idle_pct_per_1000": 100 * idle_cpu_rate / n * 1000,
        "server_cpu_ms_per_connect": 1000 * (s1.cpu_s - s0.cpu_s) / n,
        "server_rss_kib_per_agent": (s1.rss_kib - s0.rss_kib) / n,
        "server_rss_before_mib": s0.rss_kib / 1024,
        "server_peak_rss_mib": s3.hwm_kib / 1024,
        "pg_xact_per_s_idle_per_1000": idle_xact_rate / n * 1000,
        "pg_xact_per_s_load": ((x3 - s2.xacts) - idle_xact_rate * (x3_at - s3.at)) / load_s,
        "pg_xact_per_connect": ((x1 - s0.xacts) - idle_xact_rate * (x1_at - s1.at)) / n,
        "generator_cpu_pct_load": 100 * loaded["cpu_seconds"] / loaded["seconds"],
        "generator_cpu_pct_connect": 100 * connected["cpu_seconds"] / connected["seconds"],
        "generator_cpu_seconds": done["cpu_seconds"],
        "idle_seconds": idle_s,
        "load_seconds": load_s,
        "server_alive": server_alive,
        "load_average": load_avg,
        "workers": opts.workers,
        "supervisor_log": supervisor_log,
        "transport_detail": "websocket/tcp" if opts.websocket else "yamux/tcp" if opts.tcp else "yamux/unix",
    }
    if opts.kill_worker_at is not None:
        result["failover"] = {
            "killed_pid": killed.get("pid"),
            "killed_at_s": killed["at"] - load_started if "at" in killed else None,
            "lost_agents": loaded.get("lost_agents"),
            "reconnect": loaded.get("reconnect"),
            "failover_errors": loaded.get("failover_errors"),
            "errors_elsewhere": loaded["error_count"],
        }
    if profile is not None and profile.exists():
        result["profile"] = str(profile)
        result["profile_top"] = top_functions(profile)
    if result["error_count"] or not server_alive:
        result["goload_log_tail"] = go_log
        result["server_log_tail"] = server_log_tail
    return result


# ------------------------------------------------------------------------------- reporting

SCALARS = [
    ("connected", "agents connected", "{:.0f}"),
    ("connect_rate", "connect rate (agents/s)", "{:.0f}"),
    ("rpc_per_second", "RPC/s", "{:.0f}"),
    ("error_count", "errors (connect + load)", "{:.0f}"),
    ("server_cpu_ms_per_rpc", "server CPU ms/RPC (load minus idle rate)", "{:.2f}"),
    ("server_cpu_pct_load", "server CPU % of a core under load", "{:.0f}"),
    ("server_idle_pct_per_1000", "server CPU % of a core per 1,000 idle", "{:.1f}"),
    ("server_cpu_ms_per_connect", "server CPU ms per connect", "{:.2f}"),
    ("server_rss_kib_per_agent", "server RSS KiB per agent", "{:.0f}"),
    ("server_peak_rss_mib", "server peak RSS MiB", "{:.0f}"),
    ("pg_xact_per_s_idle_per_1000", "PG xact/s idle per 1,000 agents", "{:.1f}"),
    ("pg_xact_per_s_load", "PG xact/s under load", "{:.0f}"),
    ("pg_xact_per_connect", "PG xact per connect", "{:.1f}"),
    ("generator_cpu_pct_load", "generator CPU % (load)", "{:.1f}"),
    ("generator_cpu_pct_connect", "generator CPU % (connect)", "{:.1f}"),
]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of every scalar and of each latency percentile."""
    out: dict[str, Any] = {"agents": runs[0]["agents"], "runs": len(runs)}
    for key, _label, _fmt in SCALARS:
        out[key] = _median([r[key] for r in runs])
    latencies: dict[str, dict[str, float]] = {}
    kinds = ["overall", *sorted({k for r in runs for k in r["per_method"]})]
    for kind in kinds:
        picked = [r["overall"] if kind == "overall" else r["per_method"].get(kind) for r in runs]
        picked = [p for p in picked if p]
        latencies[kind] = {
            q: _median([p[q] for p in picked]) for q in ("p50_ms", "p90_ms", "p99_ms", "max_ms")
        }
    out["latency"] = latencies
    out["connect_latency"] = {
        q: _median([r["connect_latency"][q] for r in runs]) for q in ("p50_ms", "p99_ms", "max_ms")
    }
    out["load_average"] = runs[-1]["load_average"]
    return out


def render(summaries: list[dict[str, Any]], title: str) -> str:
    header = ["", *[f"{s['agents']} agents" for s in summaries]]
    rows: list[list[str]] = []
    for key, label, fmt in SCALARS:
        rows.append([label, *[fmt.format(s[key]) for s in summaries]])
    kinds: list[str] = []
    for s in summaries:
        kinds += [k for k in s["latency"] if k not in kinds]
    for kind in kinds:
        cells = []
        for s in summaries:
            lat = s["latency"].get(kind)
            cells.append(
                "/".join(f"{lat[q]:.1f}" for q in ("p50_ms", "p90_ms", "p99_ms", "max_ms")) if lat else "-"
            )
        rows.append([f"{kind} p50/p90/p99/max ms", *cells])
    rows.append(
        [
            "connect p50/p99/max ms",
            *[
                "/".join(f"{s['connect_latency'][q]:.0f}" for q in ("p50_ms", "p99_ms", "max_ms"))
                for s in summaries
            ],
        ]
    )
    rows.append(
        ["load average at end", *[" ".join(f"{x:.1f}" for x in s["load_average"]) for s in summaries]]
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        title,
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        ),
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--agents: expected numbers separated by commas, got {text!r}"
        ) from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError("--agents: every count must be ≥ 1")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=_counts, action="append", help="agent counts, e.g. 500,1000 (repeatable)")
    p.add_argument(
        "--rate", type=float, default=0.25, help="RPC/s per agent in the load phase (default 0.25)"
    )
    p.add_argument("--duration", type=float, default=30.0, help="load phase seconds (default 30)")
    p.add_argument("--idle-seconds", type=float, default=45.0, help="idle phase seconds (default 45)")
    p.add_argument("--dials", type=int, default=32, help="connects in flight (default 32)")
    p.add_argument(
        "--websocket", action="store_true", help="WebSocket over TCP instead of raw yamux over Unix"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--coder-cadence", action="store_true", help="Coder agent's RPC cadence and streams")
    mode.add_argument("--saturate", action="store_true", help="every agent calls back to back")
    p.add_argument("--runs", type=int, default=1, help="runs per agent count; the table shows medians")
    p.add_argument("--json", action="store_true", help="print every run and the medians as JSON")
    p.add_argument("--save", type=Path, metavar="FILE", help="also write that JSON to FILE")
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the server over the load phase into DIR"
    )
    p.add_argument(
        "--profile-phase",
        choices=("connect", "idle", "load"),
        default="load",
        help="the phase --profile records (default load)",
    )
    p.add_argument("--tcp", action="store_true", help="raw yamux over TCP instead of the Unix socket")
    p.add_argument(
        "--workers", type=int, default=1, help="agentd serve --workers N (CPU and RSS summed over all)"
    )
    p.add_argument(
        "--kill-worker-at",
        type=float,
        metavar="SECONDS",
        help="SIGKILL one worker this far into the load phase; agents redial (needs --workers > 1)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="per-RPC and per-connect deadline (s)")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("AGENTD_TEST_POSTGRES_URL"),
        help="server to create the bench database on (default $AGENTD_TEST_POSTGRES_URL, else embedded)",
    )
    return p


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    # Stop cleanly (server stopped, database dropped) on SIGTERM, and on SIGINT even when started
    # in the background, where the shell has set SIGINT to be ignored.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    args = build_parser().parse_args(argv)
    counts = [c for group in (args.agents or [[100]]) for c in group]
    for name in ("rate", "duration", "idle_seconds", "timeout"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"scale.py: --{name.replace('_', '-')} must be positive")
    if args.kill_worker_at is not None and args.workers < 2:
        raise SystemExit("scale.py: --kill-worker-at needs --workers 2 or more")
    if args.dials < 1 or args.runs < 1:
        raise SystemExit("scale.py: --dials and --runs must be ≥ 1")
    soft, _hard = raise_nofile_limit()
    need = max(counts) + 256
    if soft < need:
        raise SystemExit(
            f"scale.py: RLIMIT_NOFILE hard limit {soft} is below {need} for {max(counts)} agents"
        )
    mode = "saturate" if args.saturate else "cadence" if args.coder_cadence else "rate"
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    opts = Options(
        rate=args.rate,
        duration=args.duration,
        idle_seconds=args.idle_seconds,
        dials=args.dials,
        websocket=args.websocket,
        mode=mode,
        profile_dir=args.profile,
        profile_phase=args.profile_phase,
        timeout=args.timeout,
        tcp=args.tcp,
        workers=args.workers,
        kill_worker_at=args.kill_worker_at,
    )
    binary = build_go_program("goload")
    all_runs: list[dict[str, Any]] = []
    summaries = []
    with postgres_server(args.postgres_url) as pg:
        for count in counts:
            runs = []
            for i in range(args.runs):
                run = run_once(binary, pg, count, opts, f"{count}-{mode}-{i + 1}")
                runs.append(run)
                if not args.json:
                    print(
                        f"# {count} agents run {i + 1}/{args.runs}: seeded in {run['seed_seconds']:.1f} s,"
                        f" {run['connected']} connected, {run['rpcs']} RPCs, {run['error_count']} errors",
                        file=sys.stderr,
                        flush=True,
                    )
                    for cause, n in {**run["connect_errors"], **run["load_errors"]}.items():
                        print(f"#   {n} x {cause}", file=sys.stderr)
                    if "failover" in run:
                        print(f"# failover: {json.dumps(run['failover'])}", file=sys.stderr)
                    for section, rows in run.get("profile_top", {}).items():
                        print(f"# profile ({run['profile']}), own samples by {section}:", file=sys.stderr)
                        for name, own, share in rows:
                            print(f"#   {100 * share:5.1f}% {own:6d}  {name}", file=sys.stderr)
            all_runs += runs
            summaries.append(summarize(runs))
    transport = "websocket/TCP" if args.websocket else "raw yamux/TCP" if args.tcp else "raw yamux/unix"
    if args.workers > 1:
        transport += f", {args.workers} workers"
    load = f"{args.rate} RPC/s per agent" if mode == "rate" else mode
    title = (
        f"agentd scale: {transport}, {load}, load {args.duration:g} s, idle {args.idle_seconds:g} s,"
        f" {args.dials} dials, median of {args.runs} run(s)"
    )
    document = json.dumps({"title": title, "summaries": summaries, "runs": all_runs}, indent=2)
    if args.save:
        args.save.write_text(document + "\n")
    if args.json:
        print(document)
    else:
        print(render(summaries, title))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"scale.py: interrupted ({exc}); server stopped, database dropped", file=sys.stderr)
        sys.exit(130)
