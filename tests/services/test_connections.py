"""ReportConnection (spec §7.13): validation texts, mapping, and rows through the connection-log batcher."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import AsyncIterator

import pytest
import trio
from google.protobuf import empty_pb2

from agentd.batchers.connection_log import ConnectionLogBatcher
from agentd.components import Components
from agentd.drpc.errors import RpcError
from agentd.model import AgentIdentity
from agentd.proto import agent_pb2
from agentd.services import connections
from agentd.services.connections import parse_ip
from agentd.store import Database
from agentd.testing import serve_agent
from tests.services.audit_support import T0, make_scope, seed, seed_agent

Conn = agent_pb2.Connection
CID = uuid.UUID("6f1c1f3e-8a8e-4b8e-9a51-0d1c2b3a4f5e")


def report(
    *,
    cid: bytes = CID.bytes,
    action: int = Conn.CONNECT,
    type_: int = Conn.SSH,
    at: dt.datetime | None = T0,
    ip: str = "10.1.2.3",
    code: int = 0,
    reason: str | None = None,
) -> agent_pb2.ReportConnectionRequest:
    c = Conn(id=cid, action=action, type=type_, ip=ip, status_code=code)  # type: ignore[arg-type]
    if at is not None:
        c.timestamp.FromDatetime(at)
    if reason is not None:
        c.reason = reason
    return agent_pb2.ReportConnectionRequest(connection=c)


async def rows(db: Database) -> list[dict[str, object]]:
    return await db.fetchall(
        "SELECT connection_id, connect_time, disconnect_time, disconnect_reason, code, host(ip) AS ip,"
        " type::text AS type, workspace_id, workspace_name, agent_name, workspace_owner_id, organization_id,"
        " user_agent, user_id, slug_or_port FROM connection_logs ORDER BY connect_time"
    )


@pytest.fixture
async def batcher(db: Database) -> AsyncIterator[ConnectionLogBatcher]:
    """A running batcher; leaving the fixture cancels it, which flushes (the rows tests read)."""
    b = ConnectionLogBatcher(db=db, interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        yield b
        nursery.cancel_scope.cancel()


async def stop(batcher: ConnectionLogBatcher) -> None:
    """What shutdown does: stop intake and write everything held."""
    await batcher.close()


def service(
    db: Database, ident: AgentIdentity, batcher: ConnectionLogBatcher | None, *, cached: bool = True
) -> connections.ConnectionsService:
    return connections.build(
        make_scope(db, ident, components=Components(connection_logs=batcher), cached=cached)
    )


async def test_handler_path(db: Database) -> None:
    svc = service(db, await seed_agent(db), None)
    assert set(svc.handlers()) == {"/coder.agent.v2.Agent/ReportConnection"}


@pytest.mark.parametrize(
    ("req", "text"),
    [
        (report(cid=b"\x01" * 15), "connection id from bytes: invalid UUID (got 15 bytes)"),
        (report(cid=b""), "connection id from bytes: invalid UUID (got 0 bytes)"),
        (report(cid=bytes(16)), "connection ID cannot be nil"),
        (report(action=Conn.ACTION_UNSPECIFIED), 'unknown agent connection action "ACTION_UNSPECIFIED"'),
        (report(action=42), 'unknown agent connection action "42"'),
        (report(type_=Conn.TYPE_UNSPECIFIED), 'unknown agent connection type "TYPE_UNSPECIFIED"'),
        (report(type_=77), 'unknown agent connection type "77"'),
    ],
)
def test_validation_errors_name_the_field(req: agent_pb2.ReportConnectionRequest, text: str) -> None:
    with pytest.raises(RpcError) as err:
        connections.validate(req.connection, T0)
    assert text in err.value.message
    assert "connection." in err.value.message
    assert err.value.code == 0


async def test_invalid_report_stores_nothing(db: Database, batcher: ConnectionLogBatcher) -> None:
    svc = service(db, await seed_agent(db), batcher)
    with pytest.raises(RpcError):
        await svc.report_connection(report(cid=bytes(16)))
    await stop(batcher)
    assert await rows(db) == []


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("localhost", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("fe80::1", "fe80::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("", None),
        ("not an ip", None),
        ("10.0.0.1:22", None),
        ("fe80::1%eth0", None),
    ],
)
def test_parse_ip(raw: str, stored: str | None) -> None:
    assert parse_ip(raw) == stored


@pytest.mark.parametrize(
    ("type_", "name"),
    [
        (Conn.SSH, "ssh"),
        (Conn.VSCODE, "vscode"),
        (Conn.JETBRAINS, "jetbrains"),
        (Conn.RECONNECTING_PTY, "reconnecting_pty"),
    ],
)
def test_type_mapping(type_: int, name: str) -> None:
    assert connections.validate(report(type_=type_).connection, T0).type == name


@pytest.mark.parametrize(
    ("action", "status"), [(Conn.CONNECT, "connected"), (Conn.DISCONNECT, "disconnected")]
)
def test_action_mapping(action: int, status: str) -> None:
    v = connections.validate(report(action=action, code=3).connection, T0)
    assert v.status == status
    assert v.code == (3 if status == "disconnected" else None)


async def test_connect_row(db: Database, batcher: ConnectionLogBatcher) -> None:
    name = "jetbrains"
    type_ = Conn.JETBRAINS
    ident = await seed_agent(db)
    svc = service(db, ident, batcher)
    resp = await svc.report_connection(report(type_=type_, ip="localhost", code=255, reason=""))
    assert resp == empty_pb2.Empty()
    await stop(batcher)
    [row] = await rows(db)
    assert row == {
        "connection_id": CID,
        "connect_time": T0,
        "disconnect_time": None,
        "disconnect_reason": None,
        "code": None,  # only disconnects carry a code
        "ip": "127.0.0.1",
        "type": name,
        "workspace_id": ident.workspace_id,
        "workspace_name": ident.workspace_name,
        "agent_name": ident.agent_name,
        "workspace_owner_id": ident.owner_id,
        "organization_id": ident.organization_id,
        "user_agent": None,
        "user_id": None,
        "slug_or_port": None,
    }


async def test_connect_then_disconnect_is_one_row(db: Database, batcher: ConnectionLogBatcher) -> None:
    ident = await seed_agent(db)
    svc = service(db, ident, batcher)
    later = T0 + dt.timedelta(minutes=3)
    await svc.report_connection(report())
    await svc.report_connection(
        report(action=Conn.DISCONNECT, at=later, code=130, reason="signal: interrupt")
    )
    await svc.report_connection(report(action=Conn.DISCONNECT, at=later + dt.timedelta(seconds=1), code=1))
    await stop(batcher)
    [row] = await rows(db)
    assert (row["connect_time"], row["disconnect_time"], row["code"], row["disconnect_reason"]) == (
        T0,
        later,
        130,
        "signal: interrupt",
    )


async def test_standalone_disconnect_uses_its_time_twice(db: Database, batcher: ConnectionLogBatcher) -> None:
    ident = await seed_agent(db)
    svc = service(db, ident, batcher)
    await svc.report_connection(report(action=Conn.DISCONNECT, type_=Conn.VSCODE, code=2, ip="garbage"))
    await stop(batcher)
    [row] = await rows(db)
    assert (row["connect_time"], row["disconnect_time"], row["code"], row["ip"]) == (T0, T0, 2, None)


async def test_missing_timestamp_uses_server_time(db: Database, batcher: ConnectionLogBatcher) -> None:
    ident = await seed_agent(db)
    svc = service(db, ident, batcher)  # scope.now is the fixed T0 + 0
    await svc.report_connection(report(at=None))
    await stop(batcher)
    [row] = await rows(db)
    assert row["connect_time"] == T0


async def test_without_cached_workspace_reads_it_from_the_database(
    db: Database, batcher: ConnectionLogBatcher
) -> None:
    ident = await seed_agent(db)
    svc = service(db, ident, batcher, cached=False)
    await svc.report_connection(report())
    await stop(batcher)
    [row] = await rows(db)
    assert (row["workspace_name"], row["workspace_owner_id"]) == (ident.workspace_name, ident.owner_id)


async def test_without_a_connection_logger_nothing_is_stored(db: Database) -> None:
    svc = service(db, await seed_agent(db), None)
    assert await svc.report_connection(report()) == empty_pb2.Empty()
    assert await rows(db) == []


async def test_stopped_logger_is_an_export_error(db: Database, batcher: ConnectionLogBatcher) -> None:
    svc = service(db, await seed_agent(db), batcher)
    await stop(batcher)
    with pytest.raises(RpcError) as err:
        await svc.report_connection(report())
    assert err.value.message.startswith("export connection log: ")


async def test_end_to_end_through_an_agent_connection(db: Database, nursery: trio.Nursery) -> None:
    ident, token = await seed(db)
    batcher = ConnectionLogBatcher(db=db, interval=3600)
    async with trio.open_nursery() as daemon:
        await daemon.start(batcher.run)
        agent = await nursery.start(
            functools.partial(serve_agent, db, token, components=Components(connection_logs=batcher))
        )
        await agent.client.agent.ReportConnection(report(type_=Conn.VSCODE))
        await agent.client.agent.ReportConnection(
            report(action=Conn.DISCONNECT, at=T0 + dt.timedelta(seconds=5))
        )
        with pytest.raises(RpcError) as err:
            await agent.client.agent.ReportConnection(report(cid=bytes(16)))
        assert "connection ID cannot be nil" in err.value.message
        await agent.disconnect()
        daemon.cancel_scope.cancel()  # daemon shutdown: the batcher writes what it holds
    [row] = await rows(db)
    assert (row["type"], row["agent_name"], row["connect_time"], row["disconnect_time"]) == (
        "vscode",
        ident.agent_name,
        T0,
        T0 + dt.timedelta(seconds=5),
    )
