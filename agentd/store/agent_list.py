"""The operator's list of agents (``agentd agents``): every live agent with its workspace, owner,
versions, lifecycle and connection, in one query.

"Live" is what may connect: the agent and its workspace are not deleted and its build is the one
agent tokens are accepted for (`AUTHORIZED_AGENT`). The connection status follows Coder's rule
(``connecting`` before the first connection, ``disconnected`` once the disconnect is newer than the
last connection or the last connection is older than the inactivity timeout, else ``connected``),
judged against the database's clock so that the operator's own clock does not matter.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import attrs
from psycopg import sql as pgsql

from agentd.store.agents import AUTHORIZED_AGENT
from agentd.store.db import Database, Transaction

__all__ = ["DEFAULT_INACTIVITY_TIMEOUT", "AgentListing", "AgentSummary", "connection_status", "list_agents"]

#: Without a monitor write for this long an agent counts as disconnected (the monitor writes every
#: 15 s and drops a session silent for 30 s).
DEFAULT_INACTIVITY_TIMEOUT = timedelta(seconds=30)


@attrs.frozen
class AgentSummary:
    """One row of ``agentd agents``."""

    id: uuid.UUID
    name: str
    workspace_id: uuid.UUID
    workspace_name: str
    owner_id: uuid.UUID
    owner: str
    version: str
    api_version: str
    lifecycle: str
    status: str
    #: the replica that holds (or last held) the agent's session
    replica_id: uuid.UUID | None
    #: the tailnet coordinator the agent's Coordinate stream is on (None: no live coordinate stream)
    coordinator_id: uuid.UUID | None
    first_connected_at: datetime | None
    last_connected_at: datetime | None
    disconnected_at: datetime | None

    def to_json(self) -> dict[str, object]:
        def iso(t: datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "id": str(self.id),
            "name": self.name,
            "workspace_id": str(self.workspace_id),
            "workspace": self.workspace_name,
            "owner_id": str(self.owner_id),
            "owner": self.owner,
            "version": self.version,
            "api_version": self.api_version,
            "lifecycle": self.lifecycle,
            "status": self.status,
            "replica_id": None if self.replica_id is None else str(self.replica_id),
            "coordinator_id": None if self.coordinator_id is None else str(self.coordinator_id),
            "first_connected_at": iso(self.first_connected_at),
            "last_seen_at": iso(self.last_connected_at),
            "disconnected_at": iso(self.disconnected_at),
        }


@attrs.frozen
class AgentListing:
    """The agents and the database time they were read at."""

    now: datetime
    agents: tuple[AgentSummary, ...]


def connection_status(
    *,
    now: datetime,
    first_connected_at: datetime | None,
    last_connected_at: datetime | None,
    disconnected_at: datetime | None,
    inactivity_timeout: timedelta = DEFAULT_INACTIVITY_TIMEOUT,
) -> str:
    """``connecting`` | ``connected`` | ``disconnected`` (Coder's rule, see the module docstring)."""
    if first_connected_at is None or last_connected_at is None:
        return "connecting"
    if disconnected_at is not None and disconnected_at >= last_connected_at:
        return "disconnected"
    if now - last_connected_at > inactivity_timeout:
        return "disconnected"
    return "connected"


_LIST_AGENTS = pgsql.SQL(
    """
SELECT a.id, a.name, w.id AS workspace_id, w.name AS workspace_name, w.owner_id, owner.username AS owner,
       a.version, a.api_version, a.lifecycle_state::text AS lifecycle,
       a.last_connected_replica_id AS replica_id, a.first_connected_at, a.last_connected_at,
       a.disconnected_at, p.coordinator_id, now() AS now
FROM workspace_agents a
JOIN workspace_resources r ON r.id = a.resource_id
JOIN workspace_builds b ON b.job_id = r.job_id
JOIN workspaces w ON w.id = b.workspace_id
JOIN users owner ON owner.id = w.owner_id
LEFT JOIN tailnet_peers p ON p.id = a.id AND p.status = 'ok'
WHERE {authorized}
ORDER BY owner.username, w.name, a.name, a.id
"""
).format(authorized=AUTHORIZED_AGENT)


async def list_agents(
    db: Database | Transaction, *, inactivity_timeout: timedelta = DEFAULT_INACTIVITY_TIMEOUT
) -> AgentListing:
    """Every live agent, ordered by owner, workspace and agent name."""
    rows = await db.fetchall(_LIST_AGENTS)
    now = rows[0]["now"] if rows else await db.fetchval("SELECT now()")
    agents = tuple(
        AgentSummary(
            id=r["id"],
            name=r["name"],
            workspace_id=r["workspace_id"],
            workspace_name=r["workspace_name"],
            owner_id=r["owner_id"],
            owner=r["owner"],
            version=r["version"],
            api_version=r["api_version"],
            lifecycle=r["lifecycle"],
            status=connection_status(
                now=now,
                first_connected_at=r["first_connected_at"],
                last_connected_at=r["last_connected_at"],
                disconnected_at=r["disconnected_at"],
                inactivity_timeout=inactivity_timeout,
            ),
            replica_id=r["replica_id"],
            coordinator_id=r["coordinator_id"],
            first_connected_at=r["first_connected_at"],
            last_connected_at=r["last_connected_at"],
            disconnected_at=r["disconnected_at"],
        )
        for r in rows
    )
    return AgentListing(now=now, agents=agents)
