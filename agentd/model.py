"""Records shared by the layers: who an agent connection is, and the workspace it belongs to.

The store builds them (agentd.store.sessions), the services and the daemon-wide components read
them; this module imports nothing of agentd, so every layer may import it.
"""

from __future__ import annotations

import datetime as dt
import uuid

import attrs

__all__ = ["PREBUILDS_USER_ID", "ZERO_TIME", "AgentIdentity", "WorkspaceIdentity"]

#: Prebuilt workspaces are owned by this system user (spec §4.4).
PREBUILDS_USER_ID = uuid.UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")

#: Go's zero time, which Coder stores for "never" in NOT NULL timestamp columns.
ZERO_TIME = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


@attrs.frozen
class AgentIdentity:
    """Who is on this connection, fixed at authentication (spec §4.2 Options, §2.7)."""

    agent_id: uuid.UUID
    agent_name: str
    parent_id: uuid.UUID | None
    resource_id: uuid.UUID
    build_id: uuid.UUID
    workspace_id: uuid.UUID
    workspace_name: str
    owner_id: uuid.UUID
    owner_username: str
    organization_id: uuid.UUID
    template_id: uuid.UUID
    template_version_id: uuid.UUID
    api_version: tuple[int, int] = (2, 10)

    @property
    def peer_name(self) -> str:
        """Tailnet peer name: ``<owner>-<workspace>-<agent>`` (spec §2.7)."""
        return f"{self.owner_username}-{self.workspace_name}-{self.agent_name}"

    @property
    def is_prebuild(self) -> bool:
        return self.owner_id == PREBUILDS_USER_ID


@attrs.frozen
class WorkspaceIdentity:
    """The cached workspace fields of spec §4.3 (ACLs deliberately not cached)."""

    id: uuid.UUID
    owner_id: uuid.UUID
    organization_id: uuid.UUID
    template_id: uuid.UUID
    name: str
    owner_username: str
    template_name: str
    autostart_schedule: str | None = None
    task_id: uuid.UUID | None = None

    @property
    def is_prebuild(self) -> bool:
        return self.owner_id == PREBUILDS_USER_ID
