"""The reference agent: dial agentd, upgrade, and run the API routines the way Coder's agent does.

Process-wide state (lifecycle states, queued script output, whether the startup scripts ran) lives on
:class:`Agent` and survives reconnects. Each connection runs every routine of spec §11 in one
nursery: the first routine that fails tears the connection down and the agent redials with
jittered exponential backoff (100 ms → 10 s). Routines whose failures Coder's agent only logs
(ScriptCompleted, ReportBoundaryLogs, PushResourcesMonitoringUsage) catch and print theirs.

Task tree::

    Agent.run
    └─ process nursery
       ├─ startup (first manifest only): scripts → lifecycle starting → ready/start_error/start_timeout
       ├─ stop-after-ready watcher (--exit-after-ready)
       └─ redial loop ─ per connection:
            mux session, banners, manifest+startup info, lifecycle reporter, log sender,
            metadata, resources monitor, stats, DERP map subscriber, coordinator, boundary logs
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping

import attrs
import trio
from google.protobuf.duration_pb2 import Duration

from agentd import __version__
from agentd.agent.backoff import Backoff
from agentd.agent.dial import connect
from agentd.agent.lifecycle import TERMINAL_STARTUP, Lifecycle, LifecycleState, state_name
from agentd.agent.logs import FLUSH_INTERVAL, MAX_BATCH_BYTES, LogQueue
from agentd.agent.metadata import REPORT_INTERVAL, MetadataCollector
from agentd.agent.scripts import ScriptResult, ScriptRunner, run_all
from agentd.client import RpcClient, RpcError
from agentd.handshake import HANDSHAKE_TIMEOUT
from agentd.mux import MuxSession
from agentd.proto import agent_pb2, tailnet_pb2

__all__ = ["AGENT_VERSION", "Agent", "ConnectionLost", "CountingStream", "describe_error", "fake_node"]

#: What UpdateStartup reports: a v-prefixed semver (spec §7.6).
AGENT_VERSION = f"v{__version__}-agentd"
BANNER_INTERVAL = 120.0
SCRIPT_COMPLETED_TIMEOUT = 30.0
BOUNDARY_INTERVAL = 10.0
#: How long a graceful stop waits for the server to hear the final lifecycle state and logs.
STOP_REPORT_TIMEOUT = 10.0

S = agent_pb2.Lifecycle
Timing = agent_pb2.Timing
TAILSCALE_PREFIX = bytes.fromhex("fd7a115ca1e0")
CODER_PREFIX = bytes.fromhex("fd60627aa42b")


class ConnectionLost(Exception):
    """A routine saw the connection become unusable (a stream the agent keeps open ended)."""


def describe_error(exc: BaseException) -> str:
    """One line for the first real error inside ``exc`` (nurseries wrap errors in groups)."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (inner or exc.exceptions)[0]
    if isinstance(exc, RpcError):
        return f"RPC error: {exc}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_seconds(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def duration_seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def service_address(prefix: bytes, agent_id: uuid.UUID) -> str:
    """The agent's /128 WireGuard address: its UUID with the first 6 bytes replaced by ``prefix``."""
    raw = prefix + agent_id.bytes[6:]
    groups = [raw[i : i + 2].hex() for i in range(0, 16, 2)]
    return ":".join(g.lstrip("0") or "0" for g in groups) + "/128"


def fake_node(agent_id: uuid.UUID, derp_map: tailnet_pb2.DERPMap, rng: random.Random) -> tailnet_pb2.Node:
    """A plausible tailnet node for this agent: fresh keys, its two service addresses, a home DERP."""
    regions = sorted(derp_map.regions)
    addresses = [service_address(TAILSCALE_PREFIX, agent_id), service_address(CODER_PREFIX, agent_id)]
    node = tailnet_pb2.Node(
        id=rng.getrandbits(63),
        key=b"np" + secrets.token_bytes(32),
        disco="discokey:" + secrets.token_hex(32),
        preferred_derp=regions[0] if regions else 0,
        derp_latency={f"{r}-v4": round(rng.uniform(0.002, 0.05), 4) for r in regions},
        addresses=addresses,
        allowed_ips=addresses,
        endpoints=["127.0.0.1:41641"],
    )
    node.as_of.FromDatetime(dt.datetime.now(dt.UTC))
    return node


class CountingStream(trio.abc.Stream):
    """The upgraded transport, counting bytes both ways for the stats routine."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if data:
            self.rx_bytes += len(data)
            self.rx_packets += 1
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.tx_bytes += len(data)
        self.tx_packets += 1

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


_ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_directory(directory: str, env: Mapping[str, str]) -> str:
    """Like Coder's agent: ``~`` and ``$VAR`` / ``${VAR}`` expanded (unset → empty, as Go's
    os.ExpandEnv); an empty directory means the home directory."""
    home = env.get("HOME") or os.path.expanduser("~")
    if not directory:
        return home
    if directory == "~" or directory.startswith("~/"):
        directory = home + directory[1:]
    return _ENV_REF.sub(lambda m: env.get(m.group(1) or m.group(2), ""), directory)


@attrs.define(eq=False)
class _Connection:
    """Per-connection state the routines share."""

    client: RpcClient
    session: MuxSession
    counters: CountingStream
    manifest: agent_pb2.Manifest | None = None
    has_manifest: trio.Event = attrs.field(factory=trio.Event)

    async def wait_manifest(self) -> agent_pb2.Manifest:
        await self.has_manifest.wait()
        assert self.manifest is not None
        return self.manifest


Dialer = Callable[[], Awaitable[trio.abc.Stream]]


@attrs.define(eq=False)
class Agent:
    """``await agent.run()`` runs until :meth:`stop` finished, ``exit_after_ready`` fired or it is
    cancelled. ``say`` receives one human-readable line per step."""

    token: str
    dial: Dialer
    where: str = "agentd"
    websocket: bool = False
    host: str = "agentd"
    say: Callable[[str], None] = print
    boundary_logs: int = 0
    boundary_interval: float = BOUNDARY_INTERVAL
    exit_after_ready: bool = False
    banner_interval: float = BANNER_INTERVAL
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    version: str = AGENT_VERSION
    base_env: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ))
    shell: str = "/bin/sh"
    backoff: Backoff = attrs.field(factory=Backoff)
    #: A connection that lasted this long resets the backoff.
    stable_after: float = 30.0
    rng: random.Random = attrs.field(factory=random.Random)
    # Process-wide state (survives reconnects).
    lifecycle: Lifecycle = attrs.field(factory=Lifecycle)
    logs: LogQueue = attrs.field(factory=LogQueue)
    connections: int = attrs.field(default=0, init=False)
    manifest: agent_pb2.Manifest | None = attrs.field(default=None, init=False)
    script_results: list[ScriptResult] = attrs.field(factory=list, init=False)
    boundary_session: uuid.UUID = attrs.field(factory=uuid.uuid4, init=False)
    boundary_sequence: int = attrs.field(default=0, init=False)
    exit_status: int = attrs.field(default=0, init=False)
    _timings: list[agent_pb2.WorkspaceAgentScriptCompletedRequest] = attrs.field(factory=list, init=False)
    _timing_added: trio.Event = attrs.field(factory=trio.Event, init=False)
    _timings_sent: trio.Event = attrs.field(factory=trio.Event, init=False)
    _process: trio.Nursery | None = attrs.field(default=None, init=False)
    _startup_scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)

    # ------------------------------------------------------------------------------------ process

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.lifecycle.enter(S.CREATED)
        async with trio.open_nursery() as process:
            self._process = process
            if self.exit_after_ready:
                process.start_soon(self._exit_when_started)
            task_status.started()
            await self._redial_loop()

    def stop(self) -> None:
        """Graceful stop (first Ctrl-C): report shutting_down, run the stop scripts, report off."""
        if self._process is None:
            return
        if self._stopping:
            self.kill()
            return
        self._stopping = True
        self._process.start_soon(self._graceful_stop)

    def kill(self) -> None:
        """Stop now (second Ctrl-C)."""
        if self._process is not None:
            self._process.cancel_scope.cancel()

    async def _redial_loop(self) -> None:
        while True:
            started = trio.current_time()
            before = self.connections
            try:
                await self._serve_connection()
            except* Exception as group:  # a Cancelled (Ctrl-C) beside the error still propagates
                what = "connection lost" if self.connections > before else "could not connect"
                self.say(f"{what}: {describe_error(group)}")
            if trio.current_time() - started >= self.stable_after:
                self.backoff.reset()  # it worked for a while: start again at the floor
            delay = self.backoff.next()
            self.say(f"reconnecting in {delay:.1f}s")
            await trio.sleep(delay)

    async def _exit_when_started(self) -> None:
        state = await self.lifecycle.wait_reported(TERMINAL_STARTUP)
        with trio.move_on_after(STOP_REPORT_TIMEOUT):
            await self.logs.wait_drained()
            await self.wait_timings_sent()
        self.exit_status = 0 if state == S.READY else 1
        self.say(f"exiting after startup ({state_name(state)})")
        self.kill()

    async def _graceful_stop(self) -> None:
        self.say("stopping (Ctrl-C again to exit now)")
        if self.manifest is None:  # never got a manifest: nothing started, nothing to report
            self.kill()
            return
        if self._startup_scope is not None:
            self._startup_scope.cancel()
        if self.lifecycle.enter(S.SHUTTING_DOWN):
            scripts = [s for s in (self.manifest.scripts if self.manifest else ()) if s.run_on_stop]
            results = (
                await run_all(self._runner(self.manifest), scripts, self._stop_result) if scripts else []
            )
            final: LifecycleState = S.OFF
            if any(r.status == Timing.TIMED_OUT for r in results):
                final = S.SHUTDOWN_TIMEOUT
            elif any(r.status == Timing.EXIT_FAILURE for r in results):
                final = S.SHUTDOWN_ERROR
            self.lifecycle.enter(final)
            with trio.move_on_after(STOP_REPORT_TIMEOUT):
                await self.lifecycle.wait_reported(frozenset({final}))
                await self.logs.wait_drained()
                await self.wait_timings_sent()
        self.kill()

    async def wait_timings_sent(self) -> None:
        """Until every script completion has been reported (or refused by the server)."""
        while self._timings:
            await self._timings_sent.wait()

    async def _stop_result(self, result: ScriptResult) -> None:
        await self._script_done(result, Timing.STOP)

    # ------------------------------------------------------------------------------- connection

    async def _serve_connection(self) -> None:
        stream = await self.dial()
        transport = await connect(
            stream, token=self.token, websocket=self.websocket, host=self.host, timeout=self.handshake_timeout
        )
        counters = CountingStream(transport)
        session = MuxSession(counters, is_client=True)
        conn = _Connection(RpcClient(session), session, counters)
        self.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_session, session)
                how = "websocket" if self.websocket else "yamux"
                self.say(f"connected ({how} over {self.where})")
                for routine in (
                    self._banners,
                    self._handle_manifest,
                    self._report_lifecycle,
                    self._send_logs,
                    self._report_timings,
                    self._report_metadata,
                    self._monitor_resources,
                    self._report_stats,
                    self._subscribe_derp_maps,
                    self._coordinate,
                    self._report_boundary_logs,
                ):
                    nursery.start_soon(routine, conn, name=routine.__name__)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await session.aclose()

    async def _run_session(self, session: MuxSession, *, task_status: trio.TaskStatus[None]) -> None:
        await session.run(task_status=task_status)
        raise ConnectionLost(f"the session ended ({session.close_reason or 'closed by the server'})")

    async def _banners(self, conn: _Connection) -> None:
        request = agent_pb2.GetAnnouncementBannersRequest()
        while True:
            response = await conn.client.agent.GetAnnouncementBanners(request)
            enabled = [b for b in response.announcement_banners if b.enabled]
            if enabled:
                self.say(f"announcement banners: {' | '.join(b.message for b in enabled)}")
            await trio.sleep(self.banner_interval)

    async def _handle_manifest(self, conn: _Connection) -> None:
        manifest = await conn.client.agent.GetManifest(agent_pb2.GetManifestRequest())
        if len(manifest.agent_id) != 16 or manifest.agent_id == bytes(16):
            raise RpcError("the manifest has no agent_id")
        env = self._env(manifest)
        directory = expand_directory(manifest.directory, env)
        await conn.client.agent.UpdateStartup(
            agent_pb2.UpdateStartupRequest(
                startup=agent_pb2.Startup(version=self.version, expanded_directory=directory)
            )
        )
        self.say(
            f"manifest: agent {manifest.agent_name} in workspace {manifest.workspace_name}, "
            f"{plural(len(manifest.scripts), 'script')}, {plural(len(manifest.apps), 'app')}, "
            f"{len(manifest.metadata)} metadata"
        )
        conn.manifest = manifest
        conn.has_manifest.set()
        if self.manifest is None:  # the first manifest of this process: run the startup scripts
            self.manifest = manifest
            assert self._process is not None
            self._process.start_soon(self._startup, manifest)

    async def _report_lifecycle(self, conn: _Connection) -> None:
        while True:
            while pending := self.lifecycle.pending():  # re-read: states may be entered meanwhile
                state, changed_at = pending[0]
                await conn.client.agent.UpdateLifecycle(Lifecycle.request(state, changed_at))
                self.lifecycle.acknowledge()
                self.say(f"lifecycle {state_name(state)}")
            await self.lifecycle.wait_changed()

    async def _send_logs(self, conn: _Connection) -> None:
        logs = self.logs
        while not logs.limit_exceeded:
            await logs.wait_arrived()
            if logs.queued_bytes < MAX_BATCH_BYTES:
                await trio.sleep(FLUSH_INTERVAL)  # let lines gather into one batch
            while (batch := logs.take_batch()) is not None:
                source, lines = batch
                response = await conn.client.agent.BatchCreateLogs(LogQueue.request(source, lines))
                if response.log_limit_exceeded:
                    logs.exceed_limit()
                    self.say("log limit exceeded: no more script output is sent")
                    return
                logs.commit(source, len(lines))

    async def _report_metadata(self, conn: _Connection) -> None:
        manifest = await conn.wait_manifest()
        if not manifest.metadata:
            return
        collector = MetadataCollector(
            list(manifest.metadata), env=self._env(manifest), cwd=self._cwd(manifest), shell=self.shell
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run)
            while True:
                await collector.wait_changed()
                changed = collector.changed()
                await conn.client.agent.BatchUpdateMetadata(collector.request(changed))
                collector.mark_reported(changed)
                self.say(f"metadata {plural(len(changed), 'value')} ({', '.join(sorted(changed))})")
                await trio.sleep(REPORT_INTERVAL)

    async def _monitor_resources(self, conn: _Connection) -> None:
        response = await conn.client.agent.GetResourcesMonitoringConfiguration(
            agent_pb2.GetResourcesMonitoringConfigurationRequest()
        )
        config = response.config
        if not response.HasField("config") or config.collection_interval_seconds <= 0:
            raise RpcError("resources monitoring configuration without a positive collection interval")
        memory = response.HasField("memory") and response.memory.enabled
        volumes = [v.path for v in response.volumes if v.enabled]
        self.say(
            f"resources monitor: memory {'on' if memory else 'off'}, {plural(len(volumes), 'volume')}, "
            f"every {config.collection_interval_seconds}s"
        )
        if not memory and not volumes:
            return
        window: list[agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint] = []
        while True:
            await trio.sleep(config.collection_interval_seconds)
            window.append(_datapoint(memory, volumes))
            del window[: -max(1, config.num_datapoints)]
            if len(window) < config.num_datapoints:
                continue
            try:
                await conn.client.agent.PushResourcesMonitoringUsage(
                    agent_pb2.PushResourcesMonitoringUsageRequest(datapoints=window)
                )
            except RpcError as exc:
                self.say(f"resources usage push failed: {exc}")

    async def _report_stats(self, conn: _Connection) -> None:
        await conn.wait_manifest()  # Coder's stats loop starts once the network is up
        response = await conn.client.agent.UpdateStats(agent_pb2.UpdateStatsRequest())
        interval = duration_seconds(response.report_interval)
        if interval <= 0:
            raise RpcError("UpdateStats returned a non-positive report_interval")
        self.say(f"stats interval {format_seconds(interval)}")
        c = conn.counters
        last = (0, 0, 0, 0)
        while True:
            await trio.sleep(interval)
            now = (c.rx_bytes, c.tx_bytes, c.rx_packets, c.tx_packets)
            rx, tx, rx_packets, tx_packets = (a - b for a, b in zip(now, last, strict=True))
            # Like Coder's agent: traffic of this period, not totals.
            stats = agent_pb2.Stats(rx_bytes=rx, tx_bytes=tx, rx_packets=rx_packets, tx_packets=tx_packets)
            await conn.client.agent.UpdateStats(agent_pb2.UpdateStatsRequest(stats=stats))
            last = now
            self.say(f"stats sent (rx {rx} B, tx {tx} B in {format_seconds(interval)})")

    async def _subscribe_derp_maps(self, conn: _Connection) -> None:
        await conn.wait_manifest()
        async with conn.client.tailnet.StreamDERPMaps(tailnet_pb2.StreamDERPMapsRequest()) as call:
            async for derp_map in call:
                names = ", ".join(r.region_code or str(i) for i, r in sorted(derp_map.regions.items()))
                self.say(f"DERP map: {plural(len(derp_map.regions), 'region')} ({names})")
        raise ConnectionLost("the DERP map stream ended")

    async def _coordinate(self, conn: _Connection) -> None:
        manifest = await conn.wait_manifest()
        node = fake_node(uuid.UUID(bytes=manifest.agent_id), manifest.derp_map, self.rng)
        async with conn.client.tailnet.Coordinate() as call:
            await call.send(tailnet_pb2.CoordinateRequest(update_self={"node": node}))
            self.say(f"coordinator: sent node {node.id} ({node.addresses[0]}, DERP {node.preferred_derp})")
            async for response in call:
                if response.error:
                    self.say(f"coordinator error: {response.error}")
                for update in response.peer_updates:
                    kind = tailnet_pb2.CoordinateResponse.PeerUpdate.Kind.Name(update.kind).lower()
                    self.say(f"coordinator: peer {uuid.UUID(bytes=update.id)} {kind} {update.reason}")
        raise ConnectionLost("the coordinate stream ended")

    async def _report_boundary_logs(self, conn: _Connection) -> None:
        if self.boundary_logs <= 0:
            return
        await conn.wait_manifest()
        while True:
            request = self._boundary_batch()
            try:
                await conn.client.agent.ReportBoundaryLogs(request)
            except RpcError as exc:
                self.say(f"boundary logs dropped: {exc}")  # Coder drops the batch and logs it
            else:
                self.say(f"boundary: {len(request.logs)} logs reported (session {self.boundary_session})")
            await trio.sleep(self.boundary_interval)

    # ------------------------------------------------------------------------------- startup

    def _env(self, manifest: agent_pb2.Manifest) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(manifest.environment_variables)
        env.update(
            CODER="true",
            CODER_AGENT_NAME=manifest.agent_name,
            CODER_WORKSPACE_NAME=manifest.workspace_name,
            CODER_WORKSPACE_AGENT_NAME=manifest.agent_name,
            CODER_WORKSPACE_OWNER_NAME=manifest.owner_username,
        )
        return env

    def _cwd(self, manifest: agent_pb2.Manifest) -> str:
        env = self._env(manifest)
        directory = expand_directory(manifest.directory, env)
        if os.path.isdir(directory):
            return directory
        home = expand_directory("", env)
        return home if os.path.isdir(home) else "/"

    def _runner(self, manifest: agent_pb2.Manifest | None) -> ScriptRunner:
        assert manifest is not None
        return ScriptRunner(self.logs, env=self._env(manifest), cwd=self._cwd(manifest), shell=self.shell)

    async def _startup(self, manifest: agent_pb2.Manifest) -> None:
        with trio.CancelScope() as scope:
            self._startup_scope = scope
            self.lifecycle.enter(S.STARTING)
            scripts = [s for s in manifest.scripts if s.run_on_start]
            results = await run_all(self._runner(manifest), scripts, self._start_result)
            if any(r.status == Timing.TIMED_OUT for r in results):
                state: LifecycleState = S.START_TIMEOUT
            elif any(r.status == Timing.EXIT_FAILURE for r in results):
                state = S.START_ERROR
            else:
                state = S.READY
            self.lifecycle.enter(state)
        self._startup_scope = None

    async def _start_result(self, result: ScriptResult) -> None:
        await self._script_done(result, Timing.START)

    async def _script_done(self, result: ScriptResult, stage: agent_pb2.Timing.Stage) -> None:
        self.script_results.append(result)
        self.say(result.describe())
        self._timings.append(result.timing(stage))
        self._timing_added.set()
        await trio.lowlevel.checkpoint()

    async def _report_timings(self, conn: _Connection) -> None:
        """ScriptCompleted for each finished script. A timing the server refuses is only logged
        (Coder's runner does the same); one whose connection broke is sent on the next one."""
        while True:
            while self._timings:
                request = self._timings[0]
                try:
                    with trio.fail_after(SCRIPT_COMPLETED_TIMEOUT):
                        await conn.client.agent.ScriptCompleted(request)
                except (RpcError, trio.TooSlowError) as exc:
                    self.say(f"script completion report failed: {describe_error(exc)}")
                self._timings.pop(0)
            self._timings_sent.set()
            self._timings_sent = trio.Event()
            self._timing_added = trio.Event()
            await self._timing_added.wait()

    def _boundary_batch(self) -> agent_pb2.ReportBoundaryLogsRequest:
        request = agent_pb2.ReportBoundaryLogsRequest(
            session_id=str(self.boundary_session), confined_process_name="claude"
        )
        now = dt.datetime.now(dt.UTC)
        hosts = ("api.anthropic.com", "github.com", "pypi.org", "evil.example.net")
        for _ in range(self.boundary_logs):
            seq = self.boundary_sequence
            self.boundary_sequence += 1
            host = hosts[seq % len(hosts)]
            allowed = host != "evil.example.net"
            log = request.logs.add(allowed=allowed, sequence_number=seq)
            log.time.FromDatetime(now)
            log.http_request.method = "GET" if seq % 3 else "POST"
            log.http_request.url = f"https://{host}/v1/item/{seq}"
            if allowed:
                log.http_request.matched_rule = f"domain={host}"
        return request


def _datapoint(memory: bool, volumes: list[str]) -> agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint:
    """This machine's memory (from /proc/meminfo) and volume usage now."""
    point = agent_pb2.PushResourcesMonitoringUsageRequest.Datapoint()
    point.collected_at.FromDatetime(dt.datetime.now(dt.UTC))
    if memory:
        info = _meminfo()
        if info is not None:
            total, available = info
            point.memory.total = total
            point.memory.used = total - available
    for path in volumes:
        try:
            st = os.statvfs(path)
        except OSError:
            continue  # a volume that does not exist here is reported as unknown
        total, free = st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize
        point.volumes.add(volume=path, total=total, used=total - free)
    return point


def _meminfo() -> tuple[int, int] | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f) if v}
    except (OSError, ValueError):
        return None
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return fields["MemTotal"], fields["MemAvailable"]
