"""ReportConnection (spec §7.13): the audit trail of SSH / VS Code / JetBrains / reconnecting-PTY sessions.

Validated and mapped here, then handed to the process-wide connection-log batcher (§9.7), which upserts
``connection_logs`` on (connection_id, workspace_id, agent_name). Without a batcher (Coder's AGPL build)
nothing is stored. A report without a timestamp uses the server's time (Coder would store 1970-01-01).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import trio
from google.protobuf import empty_pb2

from agentd.clock import Now
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope
from agentd.store.connection_logs import ConnectionLogRow, LogWorkspace, fetch_log_workspace

Action = agent_pb2.Connection.Action
Type = agent_pb2.Connection.Type

STATUSES = {Action.CONNECT: "connected", Action.DISCONNECT: "disconnected"}
TYPES = {
    Type.SSH: "ssh",
    Type.VSCODE: "vscode",
    Type.JETBRAINS: "jetbrains",
    Type.RECONNECTING_PTY: "reconnecting_pty",
}


def parse_ip(raw: str) -> str | None:
    """``localhost`` → 127.0.0.1; anything that is not a plain IP address → NULL."""
    if raw == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(raw)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            return None  # Go's net.ParseIP rejects zones and PostgreSQL's inet cannot store them
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)  # Go prints (and so stores) ::ffff:a.b.c.d as a.b.c.d
    return str(addr)


def _name(enum: Any, value: int) -> str:
    """Go's %q of a proto enum: its name, or the number when it has none."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


@attrs.frozen
class Validated:
    connection_id: uuid.UUID
    status: str
    type: str
    time: dt.datetime
    ip: str | None
    code: int | None
    reason: str | None


def validate(conn: agent_pb2.Connection, now: dt.datetime) -> Validated:
    """Spec §7.13 validation with Coder's texts (each names the field)."""
    raw = bytes(conn.id)
    if len(raw) != 16:
        raise RpcError(f"connection id from bytes: invalid UUID (got {len(raw)} bytes) (connection.id)")
    cid = uuid.UUID(bytes=raw)
    if cid.int == 0:
        raise RpcError("connection ID cannot be nil (connection.id)")
    status = STATUSES.get(conn.action)
    if status is None:
        raise RpcError(f'unknown agent connection action "{_name(Action, conn.action)}" (connection.action)')
    ctype = TYPES.get(conn.type)
    if ctype is None:
        raise RpcError(f'unknown agent connection type "{_name(Type, conn.type)}" (connection.type)')
    when = conn.timestamp.ToDatetime(tzinfo=dt.UTC) if conn.HasField("timestamp") else now
    disconnect = status == "disconnected"
    return Validated(
        connection_id=cid,
        status=status,
        type=ctype,
        time=when,
        ip=parse_ip(conn.ip),
        code=conn.status_code if disconnect else None,
        reason=conn.reason if conn.HasField("reason") and conn.reason else None,
    )


def to_row(v: Validated, ws: LogWorkspace, agent_name: str) -> ConnectionLogRow:
    """A connect opens the row; a disconnect alone uses its time as both connect and disconnect time."""
    disconnect = v.status == "disconnected"
    return ConnectionLogRow(
        id=uuid.uuid4(),
        connect_time=v.time,
        organization_id=ws.organization_id,
        workspace_owner_id=ws.owner_id,
        workspace_id=ws.id,
        workspace_name=ws.name,
        agent_name=agent_name,
        type=v.type,
        code=v.code,
        ip=v.ip,
        user_agent=None,
        user_id=None,
        slug_or_port=None,
        connection_id=v.connection_id,
        disconnect_time=v.time if disconnect else None,
        disconnect_reason=v.reason,
    )


@attrs.define(eq=False)
class ConnectionsService:
    scope: ConnectionScope
    now: Now

    def handlers(self) -> Mapping[str, Handler]:
        return {AGENT + "ReportConnection": self.report_connection}

    async def _workspace(self) -> LogWorkspace:
        cached = self.scope.cache.get()
        if cached is not None:
            return LogWorkspace(cached.id, cached.name, cached.owner_id, cached.organization_id)
        wid = self.scope.ident.workspace_id
        ws = await fetch_log_workspace(self.scope.db, wid)
        if ws is None:
            raise RpcError(f"get workspace by agent id {self.scope.ident.agent_id}: no rows")
        return ws

    async def report_connection(self, request: agent_pb2.ReportConnectionRequest) -> empty_pb2.Empty:
        v = validate(request.connection, self.now())
        batcher = self.scope.components.connection_logs if self.scope.components is not None else None
        if batcher is None:
            return empty_pb2.Empty()  # no connection logger configured: nothing is stored (AGPL default)
        row = to_row(v, await self._workspace(), self.scope.ident.agent_name)
        try:
            await batcher.submit(row)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise RpcError(f"export connection log: connection-log batcher is not running ({exc})") from exc
        return empty_pb2.Empty()


def build(scope: ConnectionScope) -> ConnectionsService:
    return ConnectionsService(scope=scope, now=scope.now)
