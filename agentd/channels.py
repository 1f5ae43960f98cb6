"""PostgreSQL NOTIFY channel names (Coder's, spec §9.4), for the publishers (agentd.services.events,
the batchers) and the listeners (agentd.agents_cmd) alike."""

from __future__ import annotations

import uuid

__all__ = ["METADATA_BATCH_CHANNEL", "agent_logs_channel", "workspace_channel"]

METADATA_BATCH_CHANNEL = "workspace_agent_metadata_batch"


def workspace_channel(owner_id: uuid.UUID) -> str:
    return f"workspace_owner:{owner_id}"


def agent_logs_channel(agent_id: uuid.UUID) -> str:
    return f"agent-logs:{agent_id}"
