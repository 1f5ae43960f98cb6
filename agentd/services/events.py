"""Change events with Coder's channel names and payloads (spec §9.4), published through the store's pubsub."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Protocol

import attrs

from agentd.channels import agent_logs_channel, workspace_channel


class Publisher(Protocol):
    async def publish(self, channel: str, payload: str | bytes) -> None: ...


#: A NOTIFY to send: (channel, payload).
Notice = tuple[str, str]


# Workspace event kinds (spec §9.4).
AGT_LIFECYCLE_UPDATE = "agt_lifecycle_update"
APP_HEALTH = "app_health"
AGT_FIRST_LOGS = "agt_first_logs"
AGT_LOGS_OVERFLOW = "agt_logs_overflow"
AGT_APP_STATUS_UPDATE = "agt_app_status_update"
STATS_UPDATE = "stats_update"
AGT_CONNECTION_UPDATE = "agt_connection_update"


def _workspace_body(kind: str, workspace_id: uuid.UUID, agent_id: uuid.UUID | None) -> str:
    body: dict[str, str] = {"kind": kind, "workspace_id": str(workspace_id)}
    if agent_id is not None:
        body["agent_id"] = str(agent_id)
    return json.dumps(body, separators=(",", ":"))


@attrs.frozen
class Events:
    """Typed publishing of the events the agent API emits."""

    pubsub: Publisher

    def in_statement(self, db: object) -> bool:
        """True when this publisher's NOTIFYs may ride inside a statement written on ``db``: the
        pubsub is PostgreSQL's (`agentd.store.pubsub.PubSub`) on that same database. Hot RPCs then
        send write and event in one statement (one round trip, and the event cannot outrun the
        write); any other publisher (tests, tools) gets `publish` calls as before."""
        return getattr(self.pubsub, "database", None) is db

    @staticmethod
    def workspace_notice(
        owner_id: uuid.UUID, kind: str, workspace_id: uuid.UUID, agent_id: uuid.UUID | None = None
    ) -> Notice:
        """The channel and payload of one workspace event (what `workspace` publishes)."""
        return workspace_channel(owner_id), _workspace_body(kind, workspace_id, agent_id)

    async def workspace(
        self, owner_id: uuid.UUID, kind: str, workspace_id: uuid.UUID, agent_id: uuid.UUID | None = None
    ) -> None:
        await self.pubsub.publish(*self.workspace_notice(owner_id, kind, workspace_id, agent_id))

    async def workspaces(self, events: Sequence[tuple[uuid.UUID, str, uuid.UUID, uuid.UUID | None]]) -> None:
        """Several workspace events ``(owner_id, kind, workspace_id, agent_id)``: one statement when the
        publisher can (``publish_many``), else one by one."""
        messages = [self.workspace_notice(owner, kind, ws, agent) for owner, kind, ws, agent in events]
        publish_many = getattr(self.pubsub, "publish_many", None)
        if publish_many is not None:
            await publish_many(messages)
            return
        for channel, payload in messages:
            await self.pubsub.publish(channel, payload)

    async def agent_logs(self, agent_id: uuid.UUID, created_after: int) -> None:
        payload = json.dumps({"created_after": created_after}, separators=(",", ":"))
        await self.pubsub.publish(agent_logs_channel(agent_id), payload)
