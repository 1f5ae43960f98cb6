"""`agentd serve`: the daemon's composition root and shutdown sequence.

Start-up order is chosen so that the cheap checks fail first: listeners are bound (a port in use is
reported before an embedded PostgreSQL is started for nothing), then the database is opened and
migrated, then connections are accepted and systemd hears READY=1. Shutdown on SIGTERM/SIGINT is
hypercorn's shape, with a bound (agentd.shutdown has the stages and their deadlines): STOPPING=1 and
``/healthz`` 503 "draining", stop accepting and close the agent listeners (unix socket files
removed), GoAway to every agent, let the calls in flight finish within `shutdown_timeout`, close the
transports, write the disconnects and what the batchers hold, close the pool — all within
`shutdown_timeout` + agentd.shutdown.MARGIN — then stop the embedded server. A second signal ends it
at once.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import math
import resource
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from agentd import __version__, systemd
from agentd.components import Components
from agentd.config import Config, reread_config
from agentd.connection import DRAIN_POLL_S, AgentSessions, start_components
from agentd.drpc.server import ServerLimits
from agentd.handshake import HANDSHAKE_TIMEOUT, RPC_PATH, Closed, Rejected, Upgraded, handle_rpc_request
from agentd.http import HttpApp, Request, Router
from agentd.listeners import BoundListener, Server, bind_all, describe_peer
from agentd.logfmt import logfmt
from agentd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agentd.metrics import Families, private_registry
from agentd.mux import MuxConfig
from agentd.services.base import Settings
from agentd.services.events import Events
from agentd.shutdown import FORCE_GRACE, Backstop, CleanupDeadline, ShutdownPlan
from agentd.store import Database, open_database
from agentd.store.embedded import embedded_postgres
from agentd.store.errors import StoreError
from agentd.store.migrate import migrate as migrate_schema
from agentd.store.pubsub import PubSub
from agentd.store.sessions import Authenticated
from agentd.tailnet.api import TailnetCoordinator, build_coordinator

log = logging.getLogger("agentd")
#: every line about one agent's connection (upgrade, connect, disconnect) comes from this logger
session_log = logging.getLogger("agentd.connection")


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it: every agent holds a connection
    (one descriptor), and the usual soft default of 1024 would refuse agents long before the CPU
    runs out. Daemons that hold thousands of connections are expected to do this themselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. a hard limit of RLIM_INFINITY on some systems
            log.debug("could not raise the open files limit from %d to %d: %s", soft, hard, exc)
            return soft
        log.debug("raised the open files limit (RLIMIT_NOFILE) from %d to %d", soft, hard)
        return hard
    log.debug("open files limit (RLIMIT_NOFILE) is %d", soft)
    return soft


#: /healthz gives PostgreSQL this long to answer `SELECT 1` before saying 503: below the 5 s a
#: health probe (systemd, a load balancer) waits, so a black-holed database is reported in time. The
#: interrupted query's connection is closed at once (agentd.store.trio_pg), adding no wait.
HEALTH_CHECK_TIMEOUT = 3.0

#: Cyclic-GC thresholds for a serving process (CPython's default is 700, 10, 10). Each agent session
#: keeps thousands of long-lived objects (tasks, cancel scopes, services); with the defaults the
#: collections scanning them dominated the server CPU of mass connects and of idle agents
#: (bench/idle_connect.py). Young garbage is mostly freed by reference counting; cycles are still
#: collected, only less often.
SERVING_GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc_for_serving() -> None:
    """Raise the GC thresholds (SERVING_GC_THRESHOLDS); called once for an ``agentd serve`` process."""
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


@asynccontextmanager
async def open_store(config: Config, *, migrate: bool = True) -> AsyncIterator[Database]:
    """The database `config` names (embedded in the data dir unless postgres_url), migrated, as a pool.

    Exiting closes the pool and releases the embedded server (it stops when no other agentd process
    of the same data directory still uses it).
    """
    async with (
        database_url(config) as url,
        open_database(url, query_timeout_s=config.database_timeout) as db,
    ):
        if migrate:
            await migrate_schema(db)
        yield db


@asynccontextmanager
async def database_url(config: Config) -> AsyncIterator[str]:
    """`postgres_url` as given, or the URL of the data directory's embedded server while it runs."""
    if config.postgres_url is not None:
        yield config.postgres_url
        return
    async with embedded_postgres(config.data_dir, allow_chmod=config.allow_chmod) as url:
        yield url


@attrs.define(eq=False)
class Draining:
    """Set once a graceful stop has begun (``/healthz`` then answers 503 "draining")."""

    active: bool = False


@attrs.define
class Health:
    """Answers `GET /healthz`: 200 when a `SELECT 1` succeeds within the timeout, else 503; 503
    "draining" at once while the daemon stops (a load balancer then sends no one here)."""

    db: Database
    timeout: float = HEALTH_CHECK_TIMEOUT
    draining: Draining = attrs.field(factory=Draining)

    async def check_database(self) -> str | None:
        """None when the database answers, else a one-line reason."""
        with trio.move_on_after(self.timeout):
            try:
                value = await self.db.fetchval("SELECT 1")
            except StoreError as e:
                return str(e).splitlines()[0] if str(e) else type(e).__name__
            return None if value == 1 else f"SELECT 1 returned {value!r}"
        return f"no answer within {self.timeout:g} s"

    async def handle(self, request: Request) -> None:
        if self.draining.active:
            await request.send_json(503, {"status": "draining", "version": __version__})
            return
        error = await self.check_database()
        database: dict[str, Any] = {"ok": error is None}
        if error is not None:
            database["error"] = error
        status = "ok" if error is None else "unavailable"
        body = {"status": status, "version": __version__, "database": database}
        await request.send_json(200 if error is None else 503, body)


class AgentEndpoint(Protocol):
    """What the agent route needs from the daemon's sessions (agentd.connection.AgentSessions)."""

    async def lookup(self, token: uuid.UUID) -> Authenticated | None: ...

    async def serve(self, upgraded: Upgraded[Authenticated]) -> None: ...


@attrs.define
class AgentRpcRoute:
    """`GET /api/v2/workspaceagents/me/rpc`: token auth + upgrade (agentd.handshake), then the agent's
    session (agentd.connection) on this same stream until it ends."""

    sessions: AgentEndpoint
    #: bound on the token lookup and the upgrade (in-process harnesses under a virtual clock: inf)
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    async def handle(self, request: Request) -> None:
        outcome = await handle_rpc_request(
            request, lookup=self.sessions.lookup, timeout=self.handshake_timeout
        )
        if isinstance(outcome, Upgraded):
            request.responded = True
            if session_log.isEnabledFor(logging.DEBUG):
                fields: dict[str, object] = {"agent_id": outcome.agent.ident.agent_id}
                fields.update(describe_peer(request.stream))
                fields.update(self._forwarded(request))
                fields.update(protocol=outcome.protocol.value, api_version=outcome.version, role=outcome.role)
                session_log.debug("agent upgraded %s", logfmt(fields))
            await self.sessions.serve(outcome)
        elif session_log.isEnabledFor(logging.DEBUG):  # Rejected (answered) or Closed
            fields = describe_peer(request.stream)
            fields.update(self._forwarded(request))
            if isinstance(outcome, Rejected):
                fields.update(status=outcome.error.status, error=str(outcome.error))
            elif isinstance(outcome, Closed):
                fields.update(status="closed", error=outcome.reason)
            session_log.debug("agent upgrade refused %s", logfmt(fields))

    @staticmethod
    def _forwarded(request: Request) -> dict[str, object]:
        """A reverse proxy's account of the client (nginx: ``proxy_set_header X-Forwarded-For``)."""
        forwarded = request.header("x-forwarded-for")
        return {} if forwarded is None else {"forwarded_for": forwarded}


def build_components(
    db: Database,
    pubsub: PubSub,
    settings: Settings,
    *,
    coordinator: TailnetCoordinator | None = None,
    cleanup: CleanupDeadline | None = None,
) -> Components:
    """The process-wide components of DESIGN's task tree, started before agents are accepted and
    flushed after the last agent session ended. ``coordinator``: default the in-memory one.
    ``cleanup``: the deadline that bounds their final writes when the daemon stops."""
    import functools

    from agentd.batchers.activity import ActivityBumper
    from agentd.batchers.boundary_usage import BoundaryUsageTracker
    from agentd.batchers.connection_log import ConnectionLogBatcher
    from agentd.batchers.last_used import LastUsedTracker
    from agentd.batchers.metadata import MetadataBatcher
    from agentd.batchers.stats import StatsBatcher
    from agentd.metrics import AgentMetrics
    from agentd.monitor import ConnectionMonitor
    from agentd.services.lifecycle import BuildDurationHistogram
    from agentd.services.workspace_cache import WorkspaceCacheRefresher
    from agentd.store.sessions import workspace_identities
    from agentd.tailnet import Coordinator, DERPMapSource

    cleanup = cleanup if cleanup is not None else CleanupDeadline()
    if coordinator is not None and hasattr(coordinator, "cleanup"):
        coordinator.cleanup = cleanup
    metadata_batcher = MetadataBatcher(db, pubsub, cleanup=cleanup)
    stats_batcher = StatsBatcher(db, cleanup=cleanup)
    metrics = AgentMetrics(
        extra_counters={
            "agentd_metadata_updates_dropped_total": (
                "Metadata updates dropped because the batcher's buffer was full.",
                lambda: metadata_batcher.dropped,
            ),
            "agentd_agent_stats_dropped_total": (
                "Agent stats rows refused because the stats buffer was full.",
                lambda: stats_batcher.dropped,
            ),
            "agentd_agent_stats_lost_total": (
                "Acknowledged agent stats rows never written (a failed write, or still unwritten at "
                "the shutdown deadline).",
                lambda: stats_batcher.lost,
            ),
        }
    )
    return Components(
        coordinator=Coordinator() if coordinator is None else coordinator,
        derp_map=DERPMapSource.from_config(
            disable_direct_connections=settings.disable_direct_connections,
            derp_force_websockets=settings.derp_force_websockets,
        ),
        metadata_batcher=metadata_batcher,
        stats_batcher=stats_batcher,
        last_used=LastUsedTracker(db, cleanup=cleanup),
        activity_bumper=ActivityBumper(db, cleanup=cleanup),
        connection_logs=ConnectionLogBatcher(db=db, cleanup=cleanup),
        boundary_usage=BoundaryUsageTracker(db=db, replica_id=settings.replica_id, cleanup=cleanup),
        metrics=metrics,
        build_durations=BuildDurationHistogram(),
        connection_monitor=ConnectionMonitor(
            db=db, events=Events(pubsub), replica_id=settings.replica_id, cleanup=cleanup
        ),
        workspace_cache=WorkspaceCacheRefresher(functools.partial(workspace_identities, db)),
    )


@attrs.define(eq=False)
class MetricsRoute:
    """``GET /metrics``: agent-reported series, agentd's own figures and the build-duration histogram,
    collected in a registry of this route's own and written by prometheus_client."""

    components: Components
    _registry: CollectorRegistry = attrs.field(init=False)
    #: the same with each agent-reported sample's report time (?timestamps=1: agentd.workers' parent)
    _stamped: CollectorRegistry = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._registry = self._collectors(timestamps=False)
        self._stamped = self._collectors(timestamps=True)

    def _collectors(self, *, timestamps: bool) -> CollectorRegistry:
        components = self.components
        agent_metrics = components.metrics
        collectors: list[Collector] = []
        if agent_metrics is not None:
            collectors.append(Families(lambda: agent_metrics.families(timestamps=timestamps)))
        collectors.append(Families(lambda: components.server_metrics.families(components)))
        if components.build_durations is not None:
            collectors.append(components.build_durations)
        return private_registry(*collectors)

    async def handle(self, request: Request) -> None:
        registry = self._stamped if request.query_value("timestamps") == "1" else self._registry
        await request.send_response(200, generate_latest(registry), content_type=METRICS_CONTENT_TYPE)


def build_router(
    db: Database,
    sessions: AgentEndpoint | None = None,
    draining: Draining | None = None,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Router:
    """The agent listeners' routes: /healthz and the agent endpoint. /metrics is not here: it shows
    owner, workspace and agent names and agent-chosen labels (see `build_operator_router`)."""
    router = Router()
    router.add("/healthz", Health(db, draining=draining or Draining()).handle)
    if sessions is not None:
        router.add(RPC_PATH, AgentRpcRoute(sessions, handshake_timeout).handle, methods=("GET",))
    return router


def build_operator_router(db: Database, components: Components, draining: Draining | None = None) -> Router:
    """The `metrics_listen` listener's routes (operators only): /metrics and /healthz. It stays open
    while the daemon drains, so /healthz can say so."""
    router = Router()
    router.add("/healthz", Health(db, draining=draining or Draining()).handle)
    if components.metrics is not None:
        router.add("/metrics", MetricsRoute(components).handle)
    return router


@attrs.define(eq=False)
class Daemon:
    """Owns everything `agentd serve` runs; `run` returns after a clean shutdown."""

    config: Config
    notifier: systemd.Notifier = attrs.field(factory=systemd.Notifier.from_environ)
    # Re-reads the configuration (file + the same flags) on SIGHUP; None: reload is not possible.
    reload_config: Callable[[], Config] | None = None
    # A process of its own (agentd serve): move everything alive at READY out of the GC's reach.
    freeze_gc_when_ready: bool = False
    # A process of its own (agentd serve): past the shutdown bound, exit without waiting (Backstop).
    exit_on_overrun: bool = False
    #: Supplies the agent listeners instead of binding `config.listen`/systemd's (agentd.workers).
    bind_listeners: Callable[[], Awaitable[list[BoundListener]]] | None = None
    listener_names: list[str] = attrs.field(factory=list, init=False)
    #: where /metrics is served (metrics_listen)
    operator_listener_names: list[str] = attrs.field(factory=list, init=False)
    #: the final writes' deadline, shared with every component (agentd.shutdown)
    cleanup: CleanupDeadline = attrs.field(factory=CleanupDeadline, init=False)
    draining: Draining = attrs.field(factory=Draining, init=False)
    _stop: trio.Event = attrs.field(factory=trio.Event, init=False)
    _startup: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _force: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _ready: bool = attrs.field(default=False, init=False)
    _plan: ShutdownPlan | None = attrs.field(default=None, init=False)
    _backstop: Backstop = attrs.field(init=False)
    #: the pool's close is bounded by this scope's deadline (set when the stop reaches it)
    _pool_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)

    @_backstop.default
    def _make_backstop(self) -> Backstop:
        return Backstop(exit=self.exit_on_overrun)

    def request_stop(self) -> None:
        """First call: graceful stop (or abandon start-up). Second call: cancel whatever still runs."""
        if self._stop.is_set():
            log.warning("second stop request: cancelling open calls and final writes now")
            self._force.cancel()
            self.cleanup.expire()
            if self._plan is not None:
                self._backstop.arm(trio.current_time() + FORCE_GRACE)
            return
        self._stop.set()
        self._plan = ShutdownPlan(trio.current_time(), self.config.shutdown_timeout)
        self._backstop.arm(self._plan.hard_deadline)
        if not self._ready:
            self._startup.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT (or `request_stop`); `task_status.started()` once READY."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                nursery.start_soon(self._backstop.run)
                try:
                    with self._force:
                        await self._run(task_status)
                finally:
                    self._backstop.disarm()
                    nursery.cancel_scope.cancel()
                    self.notifier.close()
        if self._plan is not None:
            log.info("stopped after %.1f s", trio.current_time() - self._plan.start)
        else:
            log.info("stopped")

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
                continue
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.request_stop()

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply what can change live (log_level), report the rest.

        A broken file is reported and the running configuration kept, so a typo never stops a daemon.
        """
        if self.reload_config is None:
            log.warning("received SIGHUP, but there is no configuration to reload")
            return
        if self._ready:
            await self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = reread_config(self.reload_config, self.config, log)
            if new is None:
                return
            live = ("log_level",)
            pending = [
                f.name
                for f in attrs.fields(Config)
                if f.name not in live and getattr(new, f.name) != getattr(self.config, f.name)
            ]
            if pending:
                log.warning("reloaded; changes to %s take effect after a restart", ", ".join(pending))
            else:
                log.info("reloaded configuration")
            self.config = attrs.evolve(self.config, log_level=new.log_level)
        finally:
            if self._ready:
                await self.notifier.notify("READY=1")

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        if self.bind_listeners is not None:
            listeners = await self.bind_listeners()
        else:
            inherited = systemd.listen_fds()
            addresses = self.config.listen_addresses(socket_activated=bool(inherited))
            listeners = await bind_all(addresses, inherited)
        operator_listeners: list[BoundListener] = []
        try:
            if self.config.metrics_listen is not None:
                operator_listeners = await bind_all([self.config.metrics_listen])
            with self._startup:
                if self.config.postgres_url is None:
                    log.info("starting embedded PostgreSQL in %s", self.config.data_dir)
                async with database_url(self.config) as url:
                    try:
                        # The pool's close counts toward the stop's bound; stopping an embedded
                        # server afterwards does not (it is not cut short).
                        with self._pool_scope:
                            async with open_database(url) as db:
                                await migrate_schema(db)
                                await self._serve_database(db, listeners, operator_listeners, task_status)
                    finally:
                        self._backstop.disarm()
        finally:
            with trio.CancelScope(shield=True):
                for bound in [*listeners, *operator_listeners]:
                    await bound.aclose()

    async def _serve_database(
        self,
        db: Database,
        listeners: list[BoundListener],
        operator_listeners: list[BoundListener],
        task_status: trio.TaskStatus[None],
    ) -> None:
        settings = Settings(
            stats_report_interval=dt.timedelta(seconds=self.config.agent_stats_refresh_interval),
            **dict(self.config.banners),
        )
        pubsub = PubSub(db)
        sessions = AgentSessions(
            db,
            Events(pubsub),
            settings=settings,
            mux_config=MuxConfig(max_inbound_streams=self.config.max_streams_per_agent),
            rpc_limits=ServerLimits(
                request_buffer_budget=self.config.request_buffer_bytes,
                first_packet_timeout=self.config.first_packet_timeout,
            ),
            components=build_components(
                db,
                pubsub,
                settings,
                coordinator=build_coordinator(
                    self.config.coordinator,
                    db,
                    heartbeat_interval=self.config.coordinator_heartbeat,
                ),
                cleanup=self.cleanup,
            ),
        )
        stats = sessions.components.stats_batcher
        if stats is not None:
            self._backstop.reports.append(stats.give_up)
        server = Server(listeners, HttpApp(build_router(db, sessions, self.draining)).handle_connection)
        operator = Server(
            operator_listeners,
            HttpApp(build_operator_router(db, sessions.components, self.draining)).handle_connection,
        )
        await self._serve(server, sessions, task_status, operator)
        if self._plan is not None:
            # What is left of the bound is the pool's (it closes when this returns).
            self._pool_scope.deadline = self._plan.pool_deadline(trio.current_time())

    async def _serve(
        self,
        server: Server,
        sessions: AgentSessions,
        task_status: trio.TaskStatus[None],
        operator: Server | None = None,
    ) -> None:
        async with trio.open_nursery() as nursery:
            # The operator listener outlives agent serving and the final writes: /healthz says
            # "draining" throughout.
            async with trio.open_nursery() as operating:
                if operator is not None:
                    await operating.start(operator.run)
                    for bound in operator.listeners:
                        log.info("serving /metrics on %s", bound.name)
                        self.operator_listener_names.append(bound.name)
                # Process-wide components outlive every agent session: cancelled (and flushed) last.
                async with trio.open_nursery() as components:
                    await start_components(sessions.components, components)
                    async with trio.open_nursery() as serving:
                        await serving.start(server.run)
                        self._ready = True
                        for bound in server.listeners:
                            log.info("listening on %s", bound.name)
                            self.listener_names.append(bound.name)
                        await self.notifier.notify(
                            "READY=1", f"STATUS=serving on {', '.join(self.listener_names)}"
                        )
                        log.info("agentd %s ready", __version__)
                        # Watchdog pings start after READY=1 (systemd expects that order) and run
                        # through the drain, in the outer nursery.
                        nursery.start_soon(systemd.run_watchdog, self.notifier, systemd.watchdog_interval())
                        if self.freeze_gc_when_ready:
                            gc.freeze()  # modules, descriptors, the pool: never garbage, never scanned again
                        task_status.started()
                        await self._stop.wait()
                        await self._drain(server, sessions, components.cancel_scope)
                if operator is not None:
                    operator.stop(0)
            nursery.cancel_scope.cancel()

    @staticmethod
    def _in_flight(server: Server, sessions: AgentSessions) -> int:
        """What a draining stop waits for: the agents' calls in flight (agentd.connection), and the
        HTTP requests being read or answered (every connection that is not an agent session; there
        is one request per connection, its head bounded by agentd.http.HEAD_TIMEOUT)."""
        return sessions.calls_in_flight + max(0, server.active_connections - len(sessions.live))

    async def _drain(self, server: Server, sessions: AgentSessions, components: trio.CancelScope) -> None:
        """Stages 1-4 of agentd.shutdown: stop accepting, GoAway, wait for the calls in flight, close."""
        plan = self._plan
        assert plan is not None
        await self.notifier.notify("STOPPING=1", "STATUS=shutting down")
        self.draining.active = True
        # Stop accepting now (open connections are ended below, after the drain).
        server.stop(math.inf)
        told = await sessions.go_away_all()
        in_flight = self._in_flight(server, sessions)
        log.info(
            "draining: listeners closed, GoAway sent to %d agent sessions; waiting up to %g s for %d calls "
            "in flight",
            told,
            max(0.0, plan.drain_deadline - trio.current_time()),
            in_flight,
        )
        with trio.move_on_at(plan.drain_deadline):
            # Polled: streams come and go inside each mux session's sans-I/O core, which has no event
            # to wait on; a poll costs one sum over the live sessions, and only while stopping.
            while self._in_flight(server, sessions):  # noqa: ASYNC110
                await trio.sleep(DRAIN_POLL_S)
        now = trio.current_time()
        left = self._in_flight(server, sessions)
        if left:
            log.warning("shutdown_timeout reached with %d calls in flight: cancelling them", left)
        elif in_flight:
            log.info("drained: every call finished (%.1f s)", now - plan.start)
        self.cleanup.move_to(plan.cleanup_deadline(now))
        sessions.close_all()
        server.stop(0)
        # Once the sessions have ended (normally at once; each writes its disconnect, bounded), the
        # batchers write what they hold. A session whose teardown is stuck (in a database driver
        # that cannot cancel) does not hold them back beyond the cleanup deadline.
        with trio.move_on_at(self.cleanup.at):
            await sessions.ended()
        components.cancel()
