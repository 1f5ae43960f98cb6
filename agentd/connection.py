"""The per-agent composition root: one authenticated agent session and everything it runs.

Given an upgraded transport and the authenticated agent, :class:`AgentConnection` builds the
connection scope and every service (each module of ``agentd.services.SERVICE_MODULES`` that exists),
binds their handlers into one DRPC registry (RPCs nobody handles answer code 12), and runs one
nursery whose cancel scope is the session (DESIGN's task tree)::

    agent nursery
    ├─ mux session (reader, writer, timers; a keepalive task only for roles the monitor does not
    │  ping: for role "" / "agent" the process-wide monitor's tick sends the pings)
    ├─ the APIs' task (run_apis): loads each API's state (ApiTask) in turn, then holds the one
    │  nursery where every API's calls (and any service's own ``run``) run as children
    └─ RPC accept loop → one task per mux stream → DRPC → the call is handed to the APIs' nursery

The periodic work of a session is process-wide (daemon components, one statement per tick for every
session): the connection monitor (agentd.monitor: timestamps, ping silence, authorisation re-check;
it may end the session) and the workspace cache refresher (agentd.services.workspace_cache). A
session registers with both when it starts and leaves them when it ends: transport closed first,
then the disconnect written, bounded.

What a connect costs is kept small: the token lookup returns the identity, the workspace identity
for the cache and the services' per-connection state in one query (``Authenticated``); the start
write is one statement; services are composed from a :class:`ServiceTemplate` resolved once per
process.

An exception in one call becomes that call's DRPC error (the DRPC server's rule); it never reaches
the API task, the agent nursery or the daemon. Anything else that fails inside an agent's nursery
(a monitor write that raises, a service ``load``) ends that agent's session only: ``serve`` logs it
and returns. When the transport dies the mux session ends, the nursery is cancelled and everything
of that agent is awaited before ``run`` returns.

Why calls hop into the APIs' nursery: each API's per-connection state then has one owner whose
lifetime brackets every call touching it (a service's ``run`` task and its calls share a nursery),
and a service can hold per-connection resources without leaking them past the session. The cost is
one task spawn and one Event per call, small next to the rest of an RPC (``bench/rpc_db.py``
measures the server's CPU per RPC), so the hot path keeps the faithful structure.
"""

from __future__ import annotations

import functools
import importlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import outcome
import trio

from agentd.clock import Now, utcnow
from agentd.components import Components
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import CallShape, Handler, Registry, RpcMethod, method_table
from agentd.drpc.server import RequestBudget, ServerLimits, serve_session
from agentd.handshake import Upgraded
from agentd.logfmt import quote
from agentd.model import AgentIdentity, WorkspaceIdentity
from agentd.monitor import DISCONNECT, ConnectionMonitor, Watch
from agentd.mux import GoAwayCode, MuxConfig, MuxError, MuxSession
from agentd.server_metrics import ServerMetrics
from agentd.services import SERVICE_MODULES
from agentd.services.base import ConnectionScope, Service, Settings, WorkspaceCache
from agentd.services.events import Events
from agentd.services.workspace_cache import CacheEntry, WorkspaceCacheRefresher
from agentd.store import Database
from agentd.store import sessions as queries
from agentd.store.errors import DataError
from agentd.store.sessions import Preload
from agentd.websocket import WebSocketByteStream

__all__ = [
    "AgentConnection",
    "AgentSessions",
    "ApiTask",
    "CompositionError",
    "ServiceBuilder",
    "ServiceTemplate",
    "build_registry",
    "compose_services",
    "load_service_builders",
    "run_apis",
    "serve",
    "start_components",
]

log = logging.getLogger("agentd.connection")

#: WebSocket close code coderd uses when it drops an agent (StatusGoingAway).
GOING_AWAY = 1001
#: Calls of these shapes last as long as the agent wants (tailnet Coordinate, StreamDERPMaps,
#: WorkspaceUpdates): a draining shutdown does not wait for them.
LONG_LIVED = frozenset({CallShape.SERVER_STREAM, CallShape.BIDI})
#: How often a draining shutdown looks whether the calls in flight have finished (polled: streams
#: come and go inside each mux session's sans-I/O core, which has no event to wait on).
DRAIN_POLL_S = 0.05

ServiceBuilder = Callable[[ConnectionScope], Service]


@functools.lru_cache(maxsize=8)
def _without_keepalive(config: MuxConfig) -> MuxConfig:
    """A monitored session's settings: the monitor's tick pings it, so no keepalive task of its own."""
    return attrs.evolve(config, enable_keepalive=False)


class CompositionError(Exception):
    """The composed services do not fit together (two services claim one RPC path)."""


def load_service_builders(modules: Iterable[str] = SERVICE_MODULES) -> dict[str, ServiceBuilder]:
    """``name -> build`` for each named module of ``agentd.services``.

    Every module must exist and have ``build``: a missing one is a packaging or wiring bug, and
    silently answering its RPCs with code 12 would hide it from everyone but the agent.
    """
    builders: dict[str, ServiceBuilder] = {}
    for name in modules:
        module = importlib.import_module(f"agentd.services.{name}")
        build = getattr(module, "build", None)
        if build is None:
            raise CompositionError(f"agentd.services.{name} has no build(scope)")
        builders[name] = build
    return builders


def compose_services(scope: ConnectionScope, builders: Mapping[str, ServiceBuilder]) -> list[ApiTask]:
    """One ApiTask per service, built for this connection's scope."""
    stats = _server_metrics(scope)
    return [ApiTask(name, build(scope), stats) for name, build in builders.items()]


def _server_metrics(scope: ConnectionScope) -> ServerMetrics | None:
    return getattr(getattr(scope, "components", None), "server_metrics", None)


def _handlers(apis: Sequence[ApiTask]) -> dict[str, Handler]:
    """Every handler wrapped to run in its API's nursery; two APIs claiming one path is refused."""
    handlers: dict[str, Handler] = {}
    owner: dict[str, str] = {}
    table = method_table()
    for api in apis:
        for path, handler in api.service.handlers().items():
            if path in handlers:
                raise CompositionError(f"{path} is handled by both {owner[path]} and {api.name}")
            rpc = table.get(path)
            handlers[path] = api.wrap(
                handler,
                path.rsplit("/", 1)[-1],
                timed=rpc is None or rpc.shape is CallShape.UNARY,
                long_lived=rpc is not None and rpc.shape in LONG_LIVED,
            )
            owner[path] = api.name
    return handlers


def build_registry(apis: Sequence[ApiTask]) -> Registry:
    """Every handler wrapped to run in its API's nursery; every other RPC explicitly unimplemented."""
    handlers = _handlers(apis)
    unimplemented = set(method_table()) - set(handlers)
    return Registry.build(handlers=handlers, unimplemented=unimplemented)


@attrs.define(eq=False)
class ServiceTemplate:
    """The services of every connection of the process, resolved once: the builders, and the route
    table checked on the first composition (which paths are handled, which answer Unimplemented).

    Each connection then only builds its service objects and binds their handlers; the registry's
    coverage checks (every RPC handled or explicitly unimplemented, no path claimed twice) are not
    repeated as long as a connection's services handle the same paths.
    """

    builders: Mapping[str, ServiceBuilder]
    _handled: frozenset[str] | None = attrs.field(default=None, init=False)

    @classmethod
    def load(cls, modules: Iterable[str] = SERVICE_MODULES) -> ServiceTemplate:
        return cls(load_service_builders(modules))

    def compose(self, scope: ConnectionScope) -> tuple[list[ApiTask], Registry]:
        """This connection's ApiTasks and registry."""
        stats = _server_metrics(scope)
        apis = [ApiTask(name, build(scope), stats) for name, build in self.builders.items()]
        handlers = _handlers(apis)
        if self._handled is None or self._handled != handlers.keys():
            registry = Registry.build(handlers=handlers, unimplemented=set(method_table()) - set(handlers))
            self._handled = frozenset(handlers)
            return apis, registry
        return apis, Registry(_Routes(method_table(), handlers))


class _Routes(Mapping[str, tuple[RpcMethod, Handler | None]]):
    """A registry's routes as the process-wide method table joined with one connection's handlers
    at lookup, instead of a dict of (method, handler) pairs built per connection (~5 KiB)."""

    __slots__ = ("_handlers", "_table")

    def __init__(self, table: Mapping[str, RpcMethod], handlers: Mapping[str, Handler]) -> None:
        self._table = table
        self._handlers = handlers

    def __getitem__(self, path: str) -> tuple[RpcMethod, Handler | None]:
        return self._table[path], self._handlers.get(path)

    def get(self, path: str, default: Any = None) -> Any:  # Registry.lookup's path, once per RPC
        method = self._table.get(path)
        if method is None:
            return default
        return method, self._handlers.get(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


class _Call:
    """One call handed to an API task: its cancel scope, completion and outcome (None: it neither
    returned nor raised an Exception, i.e. it was cancelled)."""

    __slots__ = ("done", "outcome", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.outcome: outcome.Outcome[Any] | None = None


class _InApi:
    """A handler bound to run in its API's nursery (``ApiTask.wrap``); a slotted object rather than
    a closure per handler and connection (~50 bytes instead of ~260)."""

    __slots__ = ("api", "handler", "method", "timed")

    def __init__(self, api: ApiTask, handler: Handler, method: str, timed: bool) -> None:
        self.api = api
        self.handler = handler
        self.method = method
        self.timed = timed

    def __call__(self, *args: Any) -> Awaitable[Any]:
        return self.api.call(self.handler, *args, method=self.method, timed=self.timed)

    def __repr__(self) -> str:
        return f"<{self.api.name}.{getattr(self.handler, '__name__', 'handler')} in its API's nursery>"


class _InApiLongLived(_InApi):
    """A long-lived (streaming) call in its API's nursery, counted in ``ApiTask.streaming`` while it
    runs so a draining shutdown does not wait for it."""

    __slots__ = ()

    async def __call__(self, *args: Any) -> Any:
        self.api.streaming += 1
        try:
            return await self.api.call(self.handler, *args, method=self.method, timed=self.timed)
        finally:
            self.api.streaming -= 1


@attrs.define(eq=False)
class ApiTask:
    """One API on one connection: owns the service object and runs its calls.

    ``open`` loads the service (``load()``) and starts its long-lived task (``run``) if it has one in
    the nursery of the connection's APIs (:func:`run_apis`: one task and one nursery for all of a
    connection's APIs), where every call of this API then runs. ``wrap(handler)`` gives a handler for
    the DRPC registry that hands the call to that nursery and awaits its outcome; a call's exception
    travels back to the DRPC stream task (→ that call's Error packet) and never into the nursery.
    Cancelling the caller (the agent cancelled the RPC) cancels the call.
    """

    name: str
    service: Service
    #: the process's RPC counters and latencies (None: not counted)
    stats: ServerMetrics | None = None
    calls: int = attrs.field(default=0, init=False)
    #: long-lived (server-streaming, bidi) calls running now
    streaming: int = attrs.field(default=0, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """This API alone in a task of its own (a connection runs all of its APIs in one task:
        :func:`run_apis`)."""
        await run_apis([self], task_status=task_status)

    async def open(self, nursery: trio.Nursery) -> None:
        """Load the service and start its ``run`` in ``nursery``; from then on this API's calls run
        in ``nursery`` (until :func:`run_apis` winds it down)."""
        # the optional parts of the Service protocol (Loads, Runs); getattr: once per API and connect
        load: Callable[[], Awaitable[None]] | None = getattr(self.service, "load", None)
        if load is not None:
            await load()
        service_run: Callable[..., Awaitable[None]] | None = getattr(self.service, "run", None)
        if service_run is not None:
            await nursery.start(service_run)
        self._nursery = nursery

    def wrap(
        self, handler: Handler, method: str = "", *, timed: bool = True, long_lived: bool = False
    ) -> Handler:
        """``method`` and ``timed`` (unary: its latency is recorded) label the call in ``stats``;
        ``long_lived``: a streaming call a draining shutdown does not wait for (counted in
        ``streaming`` while it runs)."""
        return (_InApiLongLived if long_lived else _InApi)(self, handler, method, timed)

    async def call(self, handler: Handler, *args: Any, method: str = "", timed: bool = True) -> Any:
        nursery = self._nursery
        if nursery is None:
            await trio.lowlevel.checkpoint()
            raise RpcError(f"the {self.name} API of this connection is not running")
        call = _Call()
        self.calls += 1
        start = trio.current_time()
        nursery.start_soon(self._run_call, call, handler, args)
        stats = self.stats if timed else None
        if stats is not None:
            stats.in_flight += 1
        try:
            await call.done.wait()
        except BaseException:
            # The caller was cancelled (RPC cancelled or session over): stop the call and wait for it.
            call.scope.cancel()
            with trio.CancelScope(shield=True):
                await call.done.wait()
            raise
        finally:
            if stats is not None:
                stats.in_flight -= 1
        if self.stats is not None:
            seconds = trio.current_time() - start if timed else None
            self.stats.record_call(self.name, method, seconds, call.outcome)
        if call.outcome is None:
            raise RpcError(f"the {self.name} API of this connection stopped")
        return call.outcome.unwrap()

    @staticmethod
    async def _run_call(call: _Call, handler: Handler, args: tuple[Any, ...]) -> None:
        try:
            with call.scope:
                try:
                    call.outcome = outcome.Value(await handler(*args))
                except DataError as exc:
                    # a value the database cannot take (e.g. a NUL in a string): the caller's input
                    call.outcome = outcome.Error(RpcError(f"invalid input: {exc}"))
                except Exception as exc:
                    call.outcome = outcome.Error(exc)
        except Exception as exc:
            # A cancelled call whose own nursery also failed: the scope strips the Cancelled and the
            # rest (e.g. an ExceptionGroup of a decode error) surfaces here. It is that call's
            # failure, never the API nursery's (which would end the agent's whole session).
            call.outcome = outcome.Error(exc)
        finally:
            call.done.set()


async def run_apis(
    apis: Sequence[ApiTask], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run every API of a connection in one task and one nursery: each API is opened in turn (its
    ``load``, then its service's ``run`` started in the nursery); started once all of them accept
    calls. Every call of every API runs as a child of this nursery, so the APIs' state outlives
    each of their calls; cancelled, it waits for them all.

    One task and one nursery for all APIs instead of a task (and a nursery) each: a sleeping task,
    its nursery and the temporary nursery its ``nursery.start`` leaves referenced cost ~4 KiB, i.e.
    ~55 KiB per connected agent for 14 APIs.
    """
    async with trio.open_nursery() as nursery:
        try:
            for api in apis:
                await api.open(nursery)
            task_status.started()
            # the status keeps nursery.start's temporary nursery alive for as long as this task runs
            del task_status
            await trio.sleep_forever()
        finally:
            # no new call enters while the nursery winds down
            for api in apis:
                api._nursery = None


@attrs.define(eq=False)
class AgentConnection:
    """One authenticated agent session over an upgraded transport; ``await connection.run()``.

    ``components`` must hold the process-wide ``connection_monitor`` and ``workspace_cache``
    (the daemon's, or a test's own, running).
    """

    transport: trio.abc.Stream
    ident: AgentIdentity
    db: Database
    events: Events
    settings: Settings = attrs.field(factory=Settings)
    components: Components = attrs.field(factory=Components)
    monitoring: bool = True
    builders: Mapping[str, ServiceBuilder] | None = None
    template: ServiceTemplate = attrs.field()
    mux_config: MuxConfig = attrs.field(factory=MuxConfig)
    rpc_limits: ServerLimits = attrs.field(factory=ServerLimits)
    now: Now = utcnow
    #: What the connect query read (None: the cache and the services read their own).
    workspace: WorkspaceIdentity | None = None
    preload: Preload | None = None
    # Set while running; tests and the daemon's metrics look at them.
    session: MuxSession | None = attrs.field(default=None, init=False)
    request_budget: RequestBudget | None = attrs.field(default=None, init=False)
    scope: ConnectionScope | None = attrs.field(default=None, init=False)
    apis: list[ApiTask] = attrs.field(factory=list, init=False)
    watch: Watch | None = attrs.field(default=None, init=False)
    cache_entry: CacheEntry | None = attrs.field(default=None, init=False)
    #: trio time the session began serving RPCs (None until then)
    connected_at: float | None = attrs.field(default=None, init=False)
    _cancel: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _ended: str | None = attrs.field(default=None, init=False)

    @template.default
    def _template(self) -> ServiceTemplate:
        return ServiceTemplate(self.builders) if self.builders is not None else ServiceTemplate.load()

    @classmethod
    def from_upgraded(
        cls, upgraded: Upgraded[queries.Authenticated] | Upgraded[AgentIdentity], **kwargs: Any
    ) -> AgentConnection:
        """From the handshake's outcome: the version the agent asked for and its role's monitoring."""
        agent = upgraded.agent
        if isinstance(agent, queries.Authenticated):
            kwargs.setdefault("workspace", agent.workspace)
            kwargs.setdefault("preload", agent.preload)
            ident = agent.ident
        else:
            ident = agent
        ident = attrs.evolve(ident, api_version=(upgraded.version.major, upgraded.version.minor))
        return cls(transport=upgraded.transport, ident=ident, monitoring=upgraded.monitoring, **kwargs)

    @property
    def monitor(self) -> Watch | None:
        """The session's watch when the connection monitor records it (role "" or "agent")."""
        return self.watch if self.watch is not None and self.watch.monitored else None

    def close(self) -> None:
        """End the session now (daemon shutdown, tests)."""
        self._cancel.cancel()

    async def go_away(self) -> None:
        """Shutdown's first step: a yamux GoAway (normal) tells the agent to open no new stream, so no
        new RPC starts, while the calls in flight go on (later SYNs are answered with RST)."""
        session = self.session
        if session is None or session.closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            await session.go_away(GoAwayCode.NORMAL)
        except (trio.BrokenResourceError, trio.ClosedResourceError, MuxError):
            pass

    @property
    def calls_in_flight(self) -> int:
        """Mux streams carrying a call that ends by itself, or about to carry one (accepted, Invoke
        not read yet), or whose answer is still on its way (the agent closes the stream once it has
        read it): every live stream but those of long-lived streaming calls."""
        session = self.session
        if session is None or session.closed:
            return 0
        return max(0, session.num_streams - sum(api.streaming for api in self.apis))

    def _end(self, reason: str) -> None:
        """The monitor's way to end this session: cancel it; the teardown closes with the reason."""
        self._cancel.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the agent until its transport or session ends; started = first RPC may be served."""
        monitor = self.components.connection_monitor
        refresher = self.components.workspace_cache
        if monitor is None or refresher is None:
            raise CompositionError(
                "an agent session needs the connection_monitor and workspace_cache components"
            )
        config = _without_keepalive(self.mux_config) if self.monitoring else self.mux_config
        session = self.session = MuxSession(self.transport, is_client=False, config=config)
        cache = WorkspaceCache()
        scope = self.scope = ConnectionScope(
            ident=self.ident,
            db=self.db,
            events=self.events,
            cache=cache,
            settings=self.settings,
            components=self.components,
            now=self.now,
            preload=self.preload,
        )
        self.apis, registry = self.template.compose(scope)
        try:
            async with trio.open_nursery() as nursery:
                # The mux session's end (transport gone) cancels everything of this agent.
                await nursery.start(self._run_session, session, nursery.cancel_scope)
                try:
                    with self._cancel:
                        self.watch = await monitor.open(
                            self.ident,
                            end=self._end,
                            monitored=self.monitoring,
                            pinger=session if self.monitoring else None,
                        )
                        if self.workspace is not None:
                            self.cache_entry = await refresher.add(
                                cache, self.ident.workspace_id, self.workspace
                            )
                        else:
                            self.cache_entry = await refresher.add(cache, self.ident.workspace_id)
                        async with trio.open_nursery() as apis:
                            await apis.start(run_apis, self.apis)
                            self.request_budget = RequestBudget(self.rpc_limits.request_buffer_budget)
                            await apis.start(
                                functools.partial(
                                    serve_session,
                                    limits=self.rpc_limits,
                                    budget=self.request_budget,
                                    log_context=f"agent_id={self.ident.agent_id}",
                                ),
                                session,
                                registry,
                            )
                            self.connected_at = trio.current_time()
                            if log.isEnabledFor(logging.DEBUG):
                                log.debug(
                                    "agent connected agent_id=%s name=%s api_version=%d.%d monitored=%s",
                                    self.ident.agent_id,
                                    quote(self.ident.peer_name),
                                    *self.ident.api_version,
                                    str(self.monitoring).lower(),
                                )
                            task_status.started()
                finally:
                    self._ended = self.end_reason  # as it is now, not after the (slower) teardown
                    # Before the session's own cancellation can close the transport without a reason.
                    with trio.CancelScope(shield=True):
                        await self._teardown(monitor, refresher, session)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()

    async def _teardown(
        self, monitor: ConnectionMonitor, refresher: WorkspaceCacheRefresher, session: MuxSession
    ) -> None:
        """Shielded by the caller: clear the cache, close the transport (WebSocket: 1001 + reason),
        then record the disconnect — in that order, each bounded."""
        if self.cache_entry is not None:
            refresher.discard(self.cache_entry)
        watch = self.watch
        with monitor.cleanup.shield(monitor.close_timeout):
            tell = watch is not None and (watch.monitored or watch.ended)
            await self._close_with_reason(watch.reason if watch is not None else "disconnect", tell=tell)
        if watch is not None:
            await monitor.close(watch)

    async def _run_session(
        self, session: MuxSession, agent_scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        # handed on without keeping a reference here: held, the status would keep nursery.start's
        # temporary nursery alive as long as the session runs (~1 KiB per agent)
        status = [task_status]
        del task_status
        try:
            await session.run(task_status=status.pop())
        finally:
            agent_scope.cancel()

    async def _close_with_reason(self, reason: str, *, tell: bool) -> None:
        """coderd closes the WebSocket with 1001 + reason; a raw yamux transport just closes."""
        try:
            if tell and isinstance(self.transport, WebSocketByteStream):
                await self.transport.close(GOING_AWAY, reason)
            if self.session is not None:
                await self.session.aclose()
        except Exception as exc:
            log.debug("agent close failed agent_id=%s: %s", self.ident.agent_id, exc)

    @property
    def end_reason(self) -> str:
        """Why the session ended (or is ending): the monitor's reason (ping timeout, build outdated
        ...), "closed by agentd" (``close()``: shutdown), else "disconnect" (the agent or its
        transport went away)."""
        if self._ended is not None:
            return self._ended
        watch = self.watch
        if watch is not None and watch.reason != DISCONNECT:
            return watch.reason
        if self._cancel.cancel_called:
            return "closed by agentd"
        return DISCONNECT

    @property
    def calls(self) -> int:
        """RPCs handed to this session's services so far."""
        return sum(api.calls for api in self.apis)


async def serve(connection: AgentConnection) -> None:
    """Run one agent's session, containing its failure: whatever goes wrong ends this agent only.

    Logs at debug only (a session is routine; see agentd.logfmt): ``agent connected`` once RPCs are
    served (from AgentConnection.run) and ``agent disconnected`` with the reason, how long it was
    connected and how many RPCs its services ran; a failure is an error with its traceback."""
    ident = connection.ident
    failed = False
    try:
        await connection.run()
    except Exception:
        failed = True
        log.exception("agent session failed agent_id=%s", ident.agent_id)
    finally:
        if log.isEnabledFor(logging.DEBUG):
            connected_at = connection.connected_at
            log.debug(
                "agent disconnected agent_id=%s reason=%s connected_s=%s calls=%d",
                ident.agent_id,
                quote("session failed" if failed else connection.end_reason),
                "-" if connected_at is None else f"{trio.current_time() - connected_at:.3f}",
                connection.calls,
            )


@attrs.define(eq=False)
class AgentSessions:
    """The daemon's side of every agent session: what a connection needs from the process, and the
    set of live connections so a shutdown can end them at once (agents redial another replica)."""

    db: Database
    events: Events
    settings: Settings = attrs.field(factory=Settings)
    components: Components = attrs.field(factory=Components)
    template: ServiceTemplate = attrs.field(factory=ServiceTemplate.load)
    #: per-session limits (config: max_streams_per_agent, request_buffer_bytes, first_packet_timeout)
    mux_config: MuxConfig = attrs.field(factory=MuxConfig)
    rpc_limits: ServerLimits = attrs.field(factory=ServerLimits)
    live: set[AgentConnection] = attrs.field(factory=set, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    async def lookup(self, token: uuid.UUID) -> queries.Authenticated | None:
        """The handshake's token lookup (spec §2.2), with what the connection reads at start."""
        return await queries.authenticate_connection(self.db, token)

    def connection_for(self, upgraded: Upgraded[queries.Authenticated]) -> AgentConnection:
        """The connection of one upgraded agent, with this process's parts and limits."""
        return AgentConnection.from_upgraded(
            upgraded,
            db=self.db,
            events=self.events,
            settings=self.settings,
            components=self.components,
            template=self.template,
            mux_config=self.mux_config,
            rpc_limits=self.rpc_limits,
        )

    async def serve(self, upgraded: Upgraded[queries.Authenticated]) -> None:
        """Run one upgraded agent connection to its end; never raises for that agent's failures."""
        connection = self.connection_for(upgraded)
        if self._closing:
            connection.close()
        self.live.add(connection)
        metrics = self.components.server_metrics
        metrics.session_started()
        try:
            await serve(connection)
        finally:
            metrics.session_ended()
            self.live.discard(connection)

    async def go_away_all(self) -> int:
        """Shutdown: GoAway to every live session (no new RPC starts; calls in flight go on); a
        session that starts from now on is ended at once. Returns the number of sessions told."""
        self._closing = True
        live = list(self.live)
        for connection in live:
            await connection.go_away()
        return len(live)

    @property
    def calls_in_flight(self) -> int:
        """Calls of every live session that a draining shutdown waits for."""
        return sum(connection.calls_in_flight for connection in self.live)

    async def ended(self) -> None:
        """Return once every live session has ended (the caller bounds the wait)."""
        while self.live:  # noqa: ASYNC110 - polled, and only while stopping (see DRAIN_POLL_S)
            await trio.sleep(DRAIN_POLL_S)
        await trio.lowlevel.checkpoint()

    def close_all(self) -> None:
        """Shutdown: end every live session (each monitor still records its disconnect)."""
        self._closing = True
        for connection in list(self.live):
            connection.close()


async def start_components(components: Components, nursery: trio.Nursery) -> None:
    """Start every configured component that has a ``run`` (coordinator, batchers ...) in ``nursery``.

    Cancelling that nursery is their shutdown: each flushes what it holds (their contract).
    """
    for field in attrs.fields(Components):
        component = getattr(components, field.name)
        run = getattr(component, "run", None)
        if run is not None:
            await nursery.start(run)
