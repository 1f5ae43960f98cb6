"""Test harness for agent authors: one agent connection served in-process, no sockets.

``serve_agent`` stands up the server side of one agent connection over
``trio.testing.memory_stream_pair``: the real HTTP upgrade with the token (so a bad token fails
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
from collections.abc import Iterable, Mapping

import attrs
import trio
import trio.testing

from agentd.client import RpcClient
from agentd.components import Components
from agentd.connection import AgentConnection, ServiceBuilder, load_service_builders
from agentd.handshake import HttpError, Rejected, Upgraded, accept_agent, upgrade_client
from agentd.monitor import DEFAULT_PING_PERIOD, ConnectionMonitor
from agentd.mux import MuxSession
from agentd.services import SERVICE_MODULES
from agentd.services.base import AgentIdentity, Settings
from agentd.services.events import Events
from agentd.services.workspace_cache import REFRESH_INTERVAL, WorkspaceCacheRefresher
from agentd.store import Database
from agentd.store.connection import Authenticated, authenticate_connection, workspace_identities
from agentd.store.db import set_busy_watcher
from agentd.store.pubsub import PubSub
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
    server_outcome: list[Upgraded[Authenticated] | Rejected | object] = []
    client_outcome: list[trio.abc.Stream | UpgradeError] = []

    async def lookup(raw: uuid.UUID) -> Authenticated | None:
        return await authenticate_connection(db, raw)

    async def server_handshake() -> None:
        server_outcome.append(await accept_agent(server_stream, lookup=lookup, timeout=math.inf))

    async def client_handshake() -> None:
        try:
            client_outcome.append(
                await upgrade_client(
                    client_stream,
                    token=token,
                    version=version,
                    role=role,
                    websocket=websocket,
                    timeout=math.inf,
                )
            )
        except UpgradeError as exc:
            client_outcome.append(exc)

    # Both halves of the handshake at once; their outcomes come back as values, not as an ExceptionGroup.
    async with trio.open_nursery() as handshake:
        handshake.start_soon(server_handshake)
        handshake.start_soon(client_handshake)
    (upgraded,) = server_outcome
    (transport,) = client_outcome
    if isinstance(transport, UpgradeError):
        raise transport
    if not isinstance(upgraded, Upgraded):
        error = upgraded.error if isinstance(upgraded, Rejected) else None
        await trio.aclose_forcefully(transport)
        if isinstance(error, HttpError):
            raise UpgradeError(error.status, error.message, detail=error.detail)
        raise UpgradeError(0, f"the server closed the connection: {upgraded!r}")

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

    connection = AgentConnection.from_upgraded(
        upgraded,
        db=db,
        events=events,
        settings=settings,
        components=components,
        builders=builders if builders is not None else load_service_builders(services),
    )
    session = MuxSession(transport, is_client=True)
    async with trio.open_nursery() as components_nursery:
        # The default components live exactly as long as this one connection.
        if own_coordinator is not None:
            await components_nursery.start(own_coordinator.run)
        for component in own_periodic:
            await components_nursery.start(component.run)
        async with trio.open_nursery() as nursery:
            await nursery.start(connection.run)
            await nursery.start(session.run)
            task_status.started(TestAgent(RpcClient(session), connection, session, transport))
            # The session ends when either side closes; the connection's end closes the transport.
        components_nursery.cancel_scope.cancel()
