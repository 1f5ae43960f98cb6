"""Test harness for agent authors: one agent connection served in-process, no sockets.

``serve_agent`` stands up the server side of one agent connection over
``trio.testing.memory_stream_pair``: the daemon's own HTTP front door (``agentd.http.HttpApp`` with
the agent route of ``agentd.daemon.build_router``) and upgrade with the token (so a bad token fails
like it would against ``agentd serve``), the real yamux session and DRPC server, every composed
service, the connection monitor and the workspace cache refresher — against your database. It
gives back an :class:`agentd.client.RpcClient` for that agent. Run it in your nursery; cancel the
nursery (or call ``agent.disconnect()``) to end the session. No real time is involved: it works
under pytest-trio's ``autojump_clock``.

Example (pytest-trio; ``db`` is an open ``agentd.store.Database``, e.g. this repository's fixture)::

    from pathlib import Path
    import agentd.admin, agentd.testing, pytest, trio
    from agentd.proto import agent_pb2

    clock = pytest.fixture(agentd.testing.virtual_clock)  # autojump time that lets PostgreSQL answer

    async def test_my_agent_connects(db, nursery, clock):
        spec = agentd.admin.load_workspace_spec(Path("examples/workspace.toml"))
        ws = await agentd.admin.create_workspace(db, spec)
        agent = await nursery.start(agentd.testing.serve_agent, db, ws.agents[0].token)
        banners = await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
        assert list(banners.announcement_banners) == []
        await trio.sleep(600)  # ten minutes of virtual time: yamux pings keep the session alive
        row = await db.fetchone("SELECT last_connected_at FROM workspace_agents WHERE id = %s",
                                (agent.ident.agent_id,))
        assert row["last_connected_at"] is not None and not agent.session.closed

Virtual time and a real database: pytest-trio's ``autojump_clock`` jumps as soon as every task waits
— including while PostgreSQL is answering — and the store's own deadlines (connect, each call's
``query_timeout_s``) run on that clock, so they could fire spuriously. ``serve_agent`` itself has no timers
that mind (its handshake is unbounded in-process), and short tests run fine under ``autojump_clock``;
for tests that let minutes pass, use :func:`virtual_clock`, which jumps only after a short real
idle period.

Keyword options: ``version`` / ``role`` as the agent sends them (``role="agent"`` turns the
connection monitor on), ``websocket=True`` to carry yamux over WebSocket like Coder's agent,
``settings`` / ``components`` / ``events`` for the daemon-wide parts (defaults: ``Settings()``, a
coordinator and the default DERP map of this connection's own and no batchers, events published
through ``agentd.store.pubsub.PubSub(db)``; a connection monitor and workspace cache refresher of
this connection's own unless ``components`` has them — ``ping_period`` and ``cache_refresh_interval``
configure those), ``services`` to serve a subset of
``agentd.services`` modules by name, ``builders`` (name → ``build(scope)``) to compose your own
service objects instead (e.g. a fake of a service your code depends on).
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Iterable, Mapping

import attrs
import trio
import trio.testing

from agentd.client import RpcClient
from agentd.components import Components
from agentd.connection import (
    AgentConnection,
    AgentSessions,
    ServiceBuilder,
    ServiceTemplate,
    load_service_builders,
)
from agentd.daemon import build_router
from agentd.handshake import Upgraded, upgrade_client
from agentd.http import HttpApp
from agentd.model import AgentIdentity
from agentd.monitor import DEFAULT_PING_PERIOD, ConnectionMonitor
from agentd.mux import MuxSession
from agentd.services import SERVICE_MODULES
from agentd.services.base import Settings
from agentd.services.events import Events
from agentd.services.workspace_cache import REFRESH_INTERVAL, WorkspaceCacheRefresher
from agentd.store import Database
from agentd.store.db import set_busy_watcher
from agentd.store.pubsub import PubSub
from agentd.store.sessions import Authenticated, workspace_identities
from agentd.tailnet.derpmap import DERPMapSource
from agentd.tailnet.trio_coordinator import Coordinator
from agentd.websocket import UpgradeError

__all__ = ["TestAgent", "UpgradeError", "serve_agent", "virtual_clock"]

#: Real seconds every task must have been waiting before virtual_clock jumps.
VIRTUAL_CLOCK_THRESHOLD = 0.05


def virtual_clock(threshold: float = VIRTUAL_CLOCK_THRESHOLD) -> trio.testing.MockClock:
    """An autojumping MockClock that first lets PostgreSQL answer: use it as pytest-trio's clock with
    ``clock = pytest.fixture(agentd.testing.virtual_clock)``.

    The clock never jumps while a store query is in flight (socket waits look idle to trio, so a
    plain autojump clock would fire deadlines mid-query); the small ``threshold`` covers
    the moments between queries, e.g. a NOTIFY on its way to a listener. The most recently created
    virtual clock is the one the store informs.
    """
    clock = trio.testing.MockClock(autojump_threshold=threshold)

    def hold_while_querying(busy: bool) -> None:
        clock.autojump_threshold = math.inf if busy else threshold

    set_busy_watcher(hold_while_querying)
    return clock


@attrs.define(eq=False)
class TestAgent:
    """What ``serve_agent`` starts with: the agent's client and the server's connection object."""

    __test__ = False  # not a pytest test class

    #: The agent's RPC client: ``client.agent.<Rpc>(request)``, ``client.tailnet.<Rpc>(...)``.
    client: RpcClient
    #: The server side (its ``ident``, ``scope.cache``, ``monitor``, ``apis``) for assertions.
    connection: AgentConnection
    #: The agent side's mux session (e.g. ``await agent.session.ping()``).
    session: MuxSession
    #: The agent side's upgraded transport (a WebSocketByteStream with ``websocket=True``: its
    #: ``close_code`` / ``close_reason`` say why the server dropped the agent).
    transport: trio.abc.Stream

    @property
    def ident(self) -> AgentIdentity:
        return self.connection.ident

    async def disconnect(self) -> None:
        """Drop the agent's transport, as a network failure would; ``serve_agent`` then returns."""
        await self.session.aclose()


async def serve_agent(
    db: Database,
    token: uuid.UUID | str,
    *,
    version: str | None = "2.10",
    role: str | None = "agent",
    websocket: bool = False,
    settings: Settings | None = None,
    components: Components | None = None,
    events: Events | None = None,
    services: Iterable[str] = SERVICE_MODULES,
    builders: Mapping[str, ServiceBuilder] | None = None,
    ping_period: float = DEFAULT_PING_PERIOD,
    cache_refresh_interval: float = REFRESH_INTERVAL,
    task_status: trio.TaskStatus[TestAgent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one agent connection in-process until it ends; ``nursery.start`` returns a TestAgent.

    Raises :class:`agentd.websocket.UpgradeError` (``.status``, ``.message``) if the server refuses
    the upgrade — e.g. 401 for a token that authenticates no agent.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    own_coordinator: Coordinator | None = None
    if components is None:
        # A working Tailnet by default: a coordinator of this connection's own and the default DERP map.
        own_coordinator = Coordinator()
        components = Components(coordinator=own_coordinator, derp_map=DERPMapSource.from_config())
    events = events if events is not None else Events(PubSub(db))
    settings = settings if settings is not None else Settings()
    # The process-wide monitor and cache refresher: the caller's, else this connection's own.
    own_periodic: list[ConnectionMonitor | WorkspaceCacheRefresher] = []
    if components.connection_monitor is None:
        monitor = ConnectionMonitor(
            db=db, events=events, replica_id=settings.replica_id, ping_period=ping_period
        )
        components = attrs.evolve(components, connection_monitor=monitor)
        own_periodic.append(monitor)
    if components.workspace_cache is None:
        refresher = WorkspaceCacheRefresher(
            functools.partial(workspace_identities, db), cache_refresh_interval
        )
        components = attrs.evolve(components, workspace_cache=refresher)
        own_periodic.append(refresher)

    # The server half is the daemon's own front door: its HTTP app and agent route, then the session.
    served: list[AgentConnection] = []
    server_ready = trio.Event()  # the session serves RPCs, or the server gave up on the connection

    def started(connection: AgentConnection) -> None:
        served.append(connection)
        server_ready.set()

    sessions = _HarnessSessions(
        db,
        events,
        settings,
        components,
        ServiceTemplate(builders if builders is not None else load_service_builders(services)),
        on_started=started,
    )
    # No deadlines in-process: the token lookup must not time out while a virtual clock jumps.
    app = HttpApp(build_router(db, sessions, handshake_timeout=math.inf), head_timeout=math.inf)

    async def server_side() -> None:
        try:
            await app.handle_connection(server_stream)
        finally:
            server_ready.set()
        if sessions.failure is not None:
            raise sessions.failure  # the HTTP app only logs a failed handler; a test wants to see it

    refused: UpgradeError | None = None
    async with trio.open_nursery() as components_nursery:
        # The default components live exactly as long as this one connection.
        if own_coordinator is not None:
            await components_nursery.start(own_coordinator.run)
        for component in own_periodic:
            await components_nursery.start(component.run)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            try:
                transport = await upgrade_client(
                    client_stream,
                    token=token,
                    version=version,
                    role=role,
                    websocket=websocket,
                    timeout=math.inf,
                )
            except UpgradeError as exc:
                refused = exc
                nursery.cancel_scope.cancel()
            else:
                await server_ready.wait()
                if not served:
                    await trio.aclose_forcefully(transport)
                    refused = UpgradeError(0, "the server closed the connection")
                    nursery.cancel_scope.cancel()
                else:
                    session = MuxSession(transport, is_client=True)
                    await nursery.start(session.run)
                    task_status.started(TestAgent(RpcClient(session), served[0], session, transport))
                    # The session ends when either side closes; the connection's end closes the transport.
        components_nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused


@attrs.define(eq=False)
class _HarnessSessions(AgentSessions):
    """The daemon's AgentSessions, telling ``serve_agent`` which connection it runs once that serves
    RPCs, and keeping the session's failure for ``serve_agent`` to raise."""

    on_started: Callable[[AgentConnection], None] = attrs.field(kw_only=True)
    failure: Exception | None = attrs.field(default=None, init=False)

    async def serve(self, upgraded: Upgraded[Authenticated]) -> None:
        connection = self.connection_for(upgraded)
        self.live.add(connection)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(connection.run)
                self.on_started(connection)
        except Exception as exc:
            self.failure = exc
            raise
        finally:
            self.live.discard(connection)
