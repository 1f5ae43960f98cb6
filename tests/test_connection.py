"""The per-agent connection: composition, the per-API tasks, failure containment, teardown."""

from __future__ import annotations

import functools
import logging
import re
import types
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from agentd.admin import CreatedWorkspace, WorkspaceSpec, create_workspace, validate_workspace_spec
from agentd.client import UNIMPLEMENTED, RpcClient, RpcError
from agentd.components import Components
from agentd.connection import (
    AgentConnection,
    ApiTask,
    CompositionError,
    ServiceBuilder,
    ServiceTemplate,
    build_registry,
    run_apis,
)
from agentd.drpc.registry import CallShape, method_table
from agentd.monitor import ConnectionMonitor
from agentd.proto import agent_pb2, tailnet_pb2
from agentd.services import SERVICE_MODULES, banners
from agentd.services.base import AGENT, ConnectionScope, Settings
from agentd.services.events import Events
from agentd.services.workspace_cache import WorkspaceCacheRefresher
from agentd.store import Database
from agentd.store.sessions import workspace_identities
from agentd.testing import TestAgent, serve_agent

MANIFEST = AGENT + "GetManifest"
BANNERS = AGENT + "GetAnnouncementBanners"
APP_HEALTHS = AGENT + "BatchUpdateAppHealths"


def workspace_spec(
    name: str = "dev", *, username: str = "alice", agents: tuple[str, ...] = ("main",)
) -> WorkspaceSpec:
    return validate_workspace_spec(
        {
            "name": name,
            "owner": {"username": username, "email": f"{username}@example.com"},
            "organization": {"name": "acme"},
            "template": {"name": "docker", "version": "v1"},
            "resource": {"name": "dev", "type": "docker_container"},
            "agents": [{"name": a, "operating_system": "linux", "architecture": "amd64"} for a in agents],
        }
    )


async def seed(db: Database, name: str = "dev", **kwargs: Any) -> CreatedWorkspace:
    """A workspace with a succeeded start build and its agents (agentd.admin, as the CLI does)."""
    return await create_workspace(db, workspace_spec(name, **kwargs))


@attrs.define
class RecordingPublisher:
    """Collects published events (channel, payload) in order."""

    sent: list[tuple[str, str]] = attrs.field(factory=list)

    async def publish(self, channel: str, payload: str | bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append((channel, payload if isinstance(payload, str) else payload.decode()))


@attrs.define(eq=False)
class ProbeService:
    """A service built per connection whose handlers misbehave on request.

    GetManifest: raises ValueError (a bug in a handler). BatchUpdateAppHealths: parks until cancelled,
    recording it. Both record the task and nursery they ran in.
    """

    scope: ConnectionScope
    loaded: bool = False
    ran: bool = False
    entered: trio.Event = attrs.field(factory=trio.Event)
    cancelled: trio.Event = attrs.field(factory=trio.Event)
    parent_nurseries: list[Any] = attrs.field(factory=list)
    run_nursery: Any = None

    async def load(self) -> None:
        await trio.lowlevel.checkpoint()
        self.loaded = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.ran = True
        task_status.started()
        self.run_nursery = trio.lowlevel.current_task().parent_nursery  # the API task's, once started
        await trio.sleep_forever()

    def handlers(self) -> Mapping[str, Any]:
        return {MANIFEST: self.get_manifest, APP_HEALTHS: self.park}

    async def get_manifest(self, request: agent_pb2.GetManifestRequest) -> agent_pb2.Manifest:
        self.parent_nurseries.append(trio.lowlevel.current_task().parent_nursery)
        await trio.lowlevel.checkpoint()
        if not self.loaded:
            return agent_pb2.Manifest(agent_name="not loaded")
        raise ValueError(f"manifest of {self.scope.ident.agent_name} exploded")

    async def park(
        self, request: agent_pb2.BatchUpdateAppHealthRequest
    ) -> agent_pb2.BatchUpdateAppHealthResponse:
        self.entered.set()
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.set()
        raise AssertionError("unreachable")


class ProbeBuilder:
    """``build(scope)`` for ProbeService that remembers every instance it built."""

    def __init__(self) -> None:
        self.built: list[ProbeService] = []

    def __call__(self, scope: ConnectionScope) -> ProbeService:
        service = ProbeService(scope)
        self.built.append(service)
        return service


async def start_agent(
    nursery: trio.Nursery, db: Database, token: uuid.UUID, probe: ProbeBuilder | None = None, **kwargs: Any
) -> TestAgent:
    """serve_agent in ``nursery``; with ``probe``, the probe service and banners are what is composed."""
    if probe is not None:
        kwargs["builders"] = {"probe": probe, "banners": banners.build}
    agent: TestAgent = await nursery.start(functools.partial(serve_agent, db, token, **kwargs))
    return agent


def session_components(db: Database, events: Events | None = None, **monitor: Any) -> Components:
    """The process-wide parts a session registers with (not started: no ticks unless a test runs them)."""
    return Components(
        connection_monitor=ConnectionMonitor(
            db=db, events=events or Events(RecordingPublisher()), replica_id=uuid.UUID(int=7), **monitor
        ),
        workspace_cache=WorkspaceCacheRefresher(functools.partial(workspace_identities, db)),
    )


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


# ---- composition ------------------------------------------------------------------------------------


async def test_unhandled_rpcs_answer_unimplemented(db: Database, nursery: trio.Nursery) -> None:
    ws = await seed(db)
    agent = await start_agent(nursery, db, ws.agents[0].token, services=("banners",))
    handled = {path for api in agent.connection.apis for path in api.service.handlers()}
    assert handled == {BANNERS, AGENT + "GetServiceBanner"}
    unary = [m for p, m in method_table().items() if m.shape is CallShape.UNARY and p not in handled]
    assert len(unary) > 15
    for method in unary:
        with pytest.raises(RpcError) as info:
            await agent.client.unary(method.path, method.request_type())
        assert info.value.code == UNIMPLEMENTED, method.path
    # Streaming tailnet RPCs without a service: code 12 as well (WorkspaceUpdates is always 12 here).
    async with agent.client.tailnet.WorkspaceUpdates(tailnet_pb2.WorkspaceUpdatesRequest()) as updates:
        with pytest.raises(RpcError) as info:
            await updates.receive()
    assert info.value.code == UNIMPLEMENTED
    # The connection is fine afterwards.
    assert (await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())) == (
        agent_pb2.GetAnnouncementBannersResponse()
    )


async def test_idle_agent_tasks_do_not_grow_with_its_apis(db: Database) -> None:
    # Every API of a connection has its own nursery, but they share one task: a connected idle
    # agent costs the same number of tasks (each a few KiB) with 14 APIs as with one.
    ws = await seed(db, agents=("one", "two"))
    components = session_components(db)
    added = []
    async with trio.open_nursery() as outer:
        for token, services in ((ws.agents[0].token, ("banners",)), (ws.agents[1].token, SERVICE_MODULES)):
            await trio.testing.wait_all_tasks_blocked()
            before = count_tasks()
            agent = await start_agent(outer, db, token, services=services, components=components)
            await trio.testing.wait_all_tasks_blocked()
            added.append(count_tasks() - before)
            assert len(agent.connection.apis) == len(services)
        outer.cancel_scope.cancel()
    assert added[0] == added[1], added


async def test_later_compositions_route_like_the_first() -> None:
    # the first composition checks and builds the routes; later ones join the process-wide method
    # table with their own handlers at lookup: same answers, each bound to its own connection's API
    template = ServiceTemplate({"banners": banners.build})
    scope: Any = types.SimpleNamespace(settings=Settings())
    first_apis, first = template.compose(scope)
    second_apis, second = template.compose(scope)
    assert set(first.routes) == set(second.routes) == set(method_table())
    assert len(second.routes) == len(first.routes)
    for path in method_table():
        method, handler = second.routes[path]
        assert second.lookup(path) == (method, handler)
        first_method, first_handler = first.lookup(path)  # type: ignore[misc]
        assert method == first_method
        assert (handler is None) == (first_handler is None), path
        if handler is not None:
            assert getattr(handler, "api", None) is second_apis[0]
            assert getattr(first_handler, "api", None) is first_apis[0]
    assert second.lookup("/no.such.Service/Method") is None
    route = second.lookup(BANNERS)
    assert route is not None and route[1] is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(run_apis, second_apis)
        assert await route[1](agent_pb2.GetAnnouncementBannersRequest()) is not None
        assert second_apis[0].calls == 1 and first_apis[0].calls == 0
        nursery.cancel_scope.cancel()


async def test_two_services_claiming_one_rpc_is_refused() -> None:
    scope: Any = None
    a = ApiTask("a", banners.BannersService(Settings()))
    b = ApiTask("b", banners.BannersService(Settings()))
    with pytest.raises(CompositionError, match="GetServiceBanner is handled by both a and b"):
        build_registry([a, b])
    assert scope is None


# ---- per-API tasks and failure containment ----------------------------------------------------------


async def test_handler_exception_is_that_calls_error_only(db: Database, nursery: trio.Nursery) -> None:
    ws = await seed(db)
    probe = ProbeBuilder()
    agent = await start_agent(nursery, db, ws.agents[0].token, probe)
    (service,) = probe.built
    assert service.loaded and service.ran  # load() and run() before the first RPC was served

    with pytest.raises(RpcError) as info:
        await agent.client.agent.GetManifest(agent_pb2.GetManifestRequest())
    assert info.value.code == 0
    assert "ValueError: manifest of main exploded" in info.value.message

    # The same API keeps serving, other APIs too, and the session is intact.
    with pytest.raises(RpcError):
        await agent.client.agent.GetManifest(agent_pb2.GetManifestRequest())
    await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
    assert not agent.connection.session.closed  # type: ignore[union-attr]

    # Each call ran as a child of its API's task (beside the service's own run task), not of the
    # DRPC stream task.
    probe_api = next(api for api in agent.connection.apis if api.name == "probe")
    assert probe_api.calls == 2
    assert service.run_nursery is not None and len(service.parent_nurseries) == 2
    assert all(n is service.run_nursery for n in service.parent_nurseries)


async def test_cancelled_call_is_cancelled_in_its_api_task(db: Database, nursery: trio.Nursery) -> None:
    ws = await seed(db)
    probe = ProbeBuilder()
    agent = await start_agent(nursery, db, ws.agents[0].token, probe)
    (service,) = probe.built
    with trio.move_on_after(1):
        await agent.client.agent.BatchUpdateAppHealths(agent_pb2.BatchUpdateAppHealthRequest())
    with trio.fail_after(5):
        await service.cancelled.wait()
    await agent.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())


async def test_transport_dying_mid_call_ends_that_agent_only(db: Database) -> None:
    ws = await seed(db, agents=("one", "two"))
    probe = ProbeBuilder()
    async with trio.open_nursery() as outer:
        two = await start_agent(outer, db, ws.agents[1].token, probe)
        baseline = count_tasks()

        done = trio.Event()

        async def run_one(*, task_status: Any) -> None:
            builders: dict[str, ServiceBuilder] = {"probe": probe, "banners": banners.build}
            await serve_agent(db, ws.agents[0].token, builders=builders, task_status=task_status)
            done.set()

        one: TestAgent = await outer.start(run_one)
        one_service = probe.built[-1]
        assert count_tasks() > baseline

        async def call_parked() -> None:
            with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError, RpcError)):
                await one.client.agent.BatchUpdateAppHealths(agent_pb2.BatchUpdateAppHealthRequest())

        async with trio.open_nursery() as calls:
            calls.start_soon(call_parked)
            await one_service.entered.wait()
            # Kill the transport under the server, as a network failure would.
            await trio.aclose_forcefully(one.connection.transport)
            with trio.fail_after(30):
                await done.wait()
                await one_service.cancelled.wait()
        # Everything of agent one is gone (its serve task included); agent two still serves.
        assert count_tasks() == baseline
        assert one.connection.scope is not None and one.connection.scope.cache.value is None
        await two.client.agent.GetAnnouncementBanners(agent_pb2.GetAnnouncementBannersRequest())
        row = await db.fetchone(
            "SELECT disconnected_at FROM workspace_agents WHERE id = %s", (ws.agents[0].id,)
        )
        assert row is not None and row["disconnected_at"] is not None
        row = await db.fetchone(
            "SELECT disconnected_at FROM workspace_agents WHERE id = %s", (ws.agents[1].id,)
        )
        assert row is not None and row["disconnected_at"] is None
        outer.cancel_scope.cancel()


async def test_failing_load_ends_only_that_session(
    db: Database, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    from agentd.connection import serve

    ws = await seed(db)

    class BadLoad:
        async def load(self) -> None:
            raise RuntimeError("monitors unreadable")

        def handlers(self) -> dict[str, Any]:
            return {}

    import trio.testing

    from agentd.mux import MuxSession

    client_stream, server_stream = trio.testing.memory_stream_pair()
    from agentd.store.sessions import authenticate_agent

    ident = await authenticate_agent(db, ws.agents[0].token)
    assert ident is not None
    connection = AgentConnection(
        transport=server_stream,
        ident=ident,
        db=db,
        events=Events(RecordingPublisher()),
        components=session_components(db),
        builders={"bad": lambda scope: BadLoad(), "banners": banners.build},
        monitoring=False,
    )
    client = MuxSession(client_stream, is_client=True)
    await nursery.start(client.run)
    caplog.set_level(logging.DEBUG, logger="agentd.connection")
    with trio.fail_after(10):
        await serve(connection)  # logs the failure and returns; nothing propagates
    assert connection.session is not None and connection.session.closed
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await client.accept_stream()  # the agent side sees the session end
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", f"agent session failed agent_id={ident.agent_id}"),
        (
            "DEBUG",
            f'agent disconnected agent_id={ident.agent_id} reason="session failed" connected_s=- calls=0',
        ),
    ]


@pytest.mark.parametrize("ending", ["agent", "agentd", "monitor"])
async def test_disconnect_line_says_why(db: Database, caplog: pytest.LogCaptureFixture, ending: str) -> None:
    """`agent disconnected` (debug) names who ended the session; at info a session logs nothing."""
    from agentd.connection import serve
    from agentd.mux import MuxSession
    from agentd.store.sessions import authenticate_agent

    ws = await seed(db)
    ident = await authenticate_agent(db, ws.agents[0].token)
    assert ident is not None
    for level in (logging.INFO, logging.DEBUG):
        caplog.clear()
        caplog.set_level(level, logger="agentd")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        connection = AgentConnection(
            transport=server_stream,
            ident=ident,
            db=db,
            events=Events(RecordingPublisher()),
            components=session_components(db),
            builders={"banners": banners.build},
        )
        client = MuxSession(client_stream, is_client=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            nursery.start_soon(serve, connection)
            with trio.fail_after(10):
                while connection.connected_at is None:  # noqa: ASYNC110 - serve() has no started
                    await trio.sleep(0.01)
                await RpcClient(client).agent.GetAnnouncementBanners(
                    agent_pb2.GetAnnouncementBannersRequest()
                )
                if ending == "agent":
                    await client.aclose()
                elif ending == "agentd":
                    connection.close()
                else:
                    assert connection.watch is not None
                    connection.watch.stop("build is outdated")
        if level == logging.INFO:
            assert caplog.records == []
            continue
        reason = {"agent": "disconnect", "agentd": '"closed by agentd"', "monitor": '"build is outdated"'}
        messages = [r.getMessage() for r in caplog.records if r.name == "agentd.connection"]
        agent_id = f"agent_id={ident.agent_id}"
        assert (
            messages[0] == f"agent connected {agent_id} name=alice-dev-main api_version=2.10 monitored=true"
        )
        ended = rf"agent disconnected {agent_id} reason={reason[ending]} connected_s=\d+\.\d{{3}} calls=1"
        assert re.fullmatch(ended, messages[-1])


# ---- identity, version, role ------------------------------------------------------------------------


async def test_version_and_role_propagate(db: Database, nursery: trio.Nursery) -> None:
    ws = await seed(db)
    agent = await start_agent(nursery, db, ws.agents[0].token, version="2.3", role="agent")
    assert agent.ident.api_version == (2, 3)
    assert agent.ident.agent_id == ws.agents[0].id
    assert agent.ident.peer_name == "alice-dev-main"
    assert agent.connection.monitor is not None

    legacy = await start_agent(nursery, db, ws.agents[0].token, version=None, role="log-sidecar")
    assert legacy.ident.api_version == (2, 0)
    assert legacy.connection.monitor is None
    await legacy.client.agent.GetServiceBanner(agent_pb2.GetServiceBannerRequest())


async def test_each_connection_gets_its_own_identity_and_services(
    db: Database, nursery: trio.Nursery
) -> None:
    """Two agents of two owners: every service instance is bound to its own agent, nothing is shared."""
    first = await seed(db, "one", username="alice")
    second = await seed(db, "two", username="bob")
    probe = ProbeBuilder()
    a = await start_agent(nursery, db, first.agents[0].token, probe)
    b = await start_agent(nursery, db, second.agents[0].token, probe)
    sa, sb = probe.built
    assert sa is not sb
    assert sa.scope.ident.agent_id == first.agents[0].id and sa.scope.ident.owner_id == first.owner_id
    assert sb.scope.ident.agent_id == second.agents[0].id and sb.scope.ident.owner_id == second.owner_id
    assert sa.scope.cache is not sb.scope.cache
    for agent, who in ((a, "main"), (b, "main")):
        with pytest.raises(RpcError, match=f"manifest of {who} exploded"):
            await agent.client.agent.GetManifest(agent_pb2.GetManifestRequest())
    # A token authenticates exactly its own agent: the other agent's id never appears on this connection.
    assert a.ident.workspace_id == first.workspace_id != b.ident.workspace_id


async def test_unknown_token_is_refused(db: Database) -> None:
    from agentd.websocket import UpgradeError

    await seed(db)
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpgradeError) as info:
            await start_agent(nursery, db, uuid.uuid4())
    assert info.value.status == 401


async def test_outdated_build_token_is_refused(db: Database) -> None:
    """Spec §2.2: only the latest build's agents authenticate (a newer start build supersedes)."""
    from agentd.websocket import UpgradeError

    ws = await seed(db)
    await add_build(db, ws, transition="start", job_done=True)
    async with trio.open_nursery() as nursery:
        with pytest.raises(UpgradeError) as info:
            await start_agent(nursery, db, ws.agents[0].token)
    assert info.value.status == 401


async def test_stop_build_in_progress_still_authenticates(db: Database, nursery: trio.Nursery) -> None:
    """Spec §2.2's shutdown exception: the stop build right after ours is still running."""
    ws = await seed(db)
    await add_build(db, ws, transition="stop", job_done=False)
    agent = await start_agent(nursery, db, ws.agents[0].token, role="")
    assert agent.ident.build_id == ws.build_id


async def add_build(db: Database, ws: CreatedWorkspace, *, transition: str, job_done: bool) -> uuid.UUID:
    """A newer build of ``ws`` (build_number + 1) with its provisioner job."""
    row = await db.fetchone(
        "SELECT b.template_version_id, b.initiator_id, b.build_number, j.organization_id "
        "FROM workspace_builds b JOIN provisioner_jobs j ON j.id = b.job_id "
        "WHERE b.workspace_id = %s ORDER BY b.build_number DESC LIMIT 1",
        (ws.workspace_id,),
    )
    assert row is not None
    job_id, build_id = uuid.uuid4(), uuid.uuid4()
    completed = "now()" if job_done else "NULL"
    await db.execute(
        "INSERT INTO provisioner_jobs (id, created_at, updated_at, started_at, completed_at, organization_id,"
        f" initiator_id, type) VALUES (%s, now(), now(), now(), {completed}, %s, %s, 'workspace_build')",
        (job_id, row["organization_id"], row["initiator_id"]),
    )
    await db.execute(
        "INSERT INTO workspace_builds (id, created_at, updated_at, workspace_id, template_version_id,"
        " build_number, transition, initiator_id, job_id) VALUES (%s, now(), now(), %s, %s, %s, %s, %s, %s)",
        (
            build_id,
            ws.workspace_id,
            row["template_version_id"],
            row["build_number"] + 1,
            transition,
            row["initiator_id"],
            job_id,
        ),
    )
    return build_id


async def test_tailnet_paths_are_all_covered() -> None:
    registry = build_registry([ApiTask("banners", banners.BannersService(Settings()))])
    for path in method_table():
        assert registry.lookup(path) is not None
    assert registry.lookup("/coder.tailnet.v2.Tailnet/RefreshResumeToken") is not None


def test_every_agent_rpc_is_served_and_only_client_tailnet_rpcs_are_unimplemented() -> None:
    """With every service module composed, no Agent RPC answers code 12 (issue 6 'done when')."""
    import uuid

    from agentd.components import Components
    from agentd.connection import load_service_builders
    from agentd.drpc.registry import method_table
    from agentd.model import AgentIdentity
    from agentd.services import SERVICE_MODULES
    from agentd.services.base import ConnectionScope, Settings, WorkspaceCache

    ident = AgentIdentity(
        agent_id=uuid.uuid4(),
        agent_name="main",
        parent_id=None,
        resource_id=uuid.uuid4(),
        build_id=uuid.uuid4(),
        workspace_id=uuid.uuid4(),
        workspace_name="dev",
        owner_id=uuid.uuid4(),
        owner_username="alice",
        organization_id=uuid.uuid4(),
        template_id=uuid.uuid4(),
        template_version_id=uuid.uuid4(),
    )
    # build(scope) does no I/O, so a scope without a database is enough to collect the handlers.
    scope = ConnectionScope(
        ident=ident,
        db=None,
        events=None,
        cache=WorkspaceCache(),
        settings=Settings(),
        components=Components(),
    )
    handled: set[str] = set()
    for build in load_service_builders(SERVICE_MODULES).values():
        paths = set(build(scope).handlers())
        assert not paths & handled, "two services claim one RPC"
        handled |= paths
    unserved = set(method_table()) - handled
    assert not {path for path in unserved if path.startswith("/coder.agent.v2.Agent/")}
    assert len([p for p in handled if p.startswith("/coder.agent.v2.Agent/")]) == 19


async def test_cancelled_call_whose_nursery_also_fails_ends_that_call_only(nursery: trio.Nursery) -> None:
    """A call cancelled while a child of its own nursery raises (the scope strips the Cancelled and
    leaves an ExceptionGroup): the API's nursery, shared by every call of the agent, keeps running."""

    class Service:
        def handlers(self) -> dict[str, Any]:
            return {}

    api = ApiTask("probe", Service())
    await nursery.start(api.run)
    entered = trio.Event()

    async def fails_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("undecodable message seen while being cancelled")

    async def handler() -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(fails_when_cancelled)
            entered.set()
            await trio.sleep_forever()

    async def ok() -> str:
        return "still serving"

    async def cancel_once_entered(caller: trio.CancelScope) -> None:
        await entered.wait()
        caller.cancel()

    with trio.CancelScope() as caller:
        nursery.start_soon(cancel_once_entered, caller)
        await api.call(handler)  # cancelled: the caller sees Cancelled, absorbed by its scope
    assert caller.cancelled_caught
    assert await api.call(ok) == "still serving"
