"""Test harness for agent authors: one agent connection served in-process, no sockets.

``serve_agent`` stands up the server side of one agent connection over
``trio.testing.memory_stream_pair``: the real HTTP upgrade with the token (so a bad token fails
like it would against ``agentd serve``), the real yamux session and DRPC server, every composed
service, the connection monitor and the workspace cache refresher — against your database. It
gives back an :class:`agentd.client.RpcClient` for that agent. Run it in your nursery; cancel the
nursery (or call ``agent.disconnect()``) to end the session. No real time is involved: it works
under pytest-trio's ``autojump_clock``.

Example (pytest-trio; ``db`` is an open ``agentd.store.Database`` with a workspace in it)::

    from agentd.proto import agent_pb2
    from agentd.testing import serve_agent

    async def test_my_agent_reaches_ready(db, nursery, autojump_clock):
        agent = await nursery.start(serve_agent, db, AGENT_TOKEN)
        manifest = await agent.client.agent.GetManifest(agent_pb2.GetManifestRequest())
        lifecycle = agent_pb2.Lifecycle(state=agent_pb2.Lifecycle.READY)
        await agent.client.agent.UpdateLifecycle(agent_pb2.UpdateLifecycleRequest(lifecycle=lifecycle))
        row = await db.fetchone("SELECT lifecycle_state FROM workspace_agents WHERE auth_token = %s",
                                (AGENT_TOKEN,))
        assert row["lifecycle_state"] == "ready"

Keyword options: ``version`` / ``role`` as the agent sends them (``role="agent"`` turns the
connection monitor on), ``websocket=True`` to carry yamux over WebSocket like Coder's agent,
``settings`` / ``components`` / ``events`` for the daemon-wide parts (defaults: ``Settings()``, no
components, events published with ``pg_notify`` on ``db``), ``services`` to serve a subset of
``agentd.services`` modules by name.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable

import attrs
import trio
import trio.testing

from agentd.client import RpcClient
from agentd.components import Components
from agentd.connection import AgentConnection, load_service_builders
from agentd.handshake import HttpError, Rejected, Upgraded, accept_agent, upgrade_client
from agentd.mux import MuxSession
from agentd.services import SERVICE_MODULES
from agentd.services.base import AgentIdentity, Settings
from agentd.services.events import Events
from agentd.store.connection import NotifyPublisher, authenticate_agent
from agentd.websocket import UpgradeError

__all__ = ["TestAgent", "UpgradeError", "serve_agent"]


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
    _client_transport: trio.abc.Stream

    @property
    def ident(self) -> AgentIdentity:
        return self.connection.ident

    async def disconnect(self) -> None:
        """Drop the agent's transport, as a network failure would; ``serve_agent`` then returns."""
        await self.session.aclose()


async def serve_agent(
    db: object,
    token: uuid.UUID | str,
    *,
    version: str | None = "2.10",
    role: str | None = "agent",
    websocket: bool = False,
    settings: Settings | None = None,
    components: Components | None = None,
    events: Events | None = None,
    services: Iterable[str] = SERVICE_MODULES,
    task_status: trio.TaskStatus[TestAgent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one agent connection in-process until it ends; ``nursery.start`` returns a TestAgent.

    Raises :class:`agentd.websocket.UpgradeError` (``.status``, ``.message``) if the server refuses
    the upgrade — e.g. 401 for a token that authenticates no agent.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server_outcome: list[Upgraded[AgentIdentity] | Rejected | object] = []
    client_outcome: list[trio.abc.Stream | UpgradeError] = []

    async def lookup(raw: uuid.UUID) -> AgentIdentity | None:
        return await authenticate_agent(db, raw)  # type: ignore[arg-type]

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

    connection = AgentConnection.from_upgraded(
        upgraded,
        db=db,
        events=events if events is not None else Events(NotifyPublisher(db)),  # type: ignore[arg-type]
        settings=settings if settings is not None else Settings(),
        components=components if components is not None else Components(),
        builders=load_service_builders(services),
    )
    session = MuxSession(transport, is_client=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        await nursery.start(session.run)
        task_status.started(TestAgent(RpcClient(session), connection, session, transport))
        # The session ends when either side closes; the connection's end closes the transport.
