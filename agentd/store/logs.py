"""Writes behind BatchCreateLogs (spec §7.9, §10.3).

The insert is Coder's single statement: a CTE adds the batch's sanitised byte length to the agent's
``logs_length`` (so the ``max_logs_length`` CHECK of 1 MiB trips inside the same statement) and the
rows go in through ``unnest`` with the output cast to ``varchar(1024)`` (silently truncated to 1024
characters while ``logs_length`` counts the full text). It returns the lowest new id and the length
before the batch, which decide the ``agent-logs`` and first-logs events.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

import attrs

from agentd.store.db import Database, Transaction
from agentd.store.errors import CheckViolation

__all__ = [
    "EXTERNAL_LOG_SOURCE_ICON",
    "EXTERNAL_LOG_SOURCE_ID",
    "EXTERNAL_LOG_SOURCE_NAME",
    "MAX_LOGS_LENGTH_CONSTRAINT",
    "ForeignLogSource",
    "InsertedLogs",
    "LogsAgent",
    "LogsLimitExceeded",
    "LogsNotices",
    "LogsOverflowed",
    "ensure_external_log_source",
    "get_logs_agent",
    "insert_logs",
    "set_logs_overflowed",
]

#: The well-known source legacy clients (nil log_source_id) write to.
EXTERNAL_LOG_SOURCE_ID = uuid.UUID("3b579bf4-1ed8-4b99-87a8-e9a1e3410410")
EXTERNAL_LOG_SOURCE_NAME = "External"
EXTERNAL_LOG_SOURCE_ICON = "/emojis/1f310.png"

MAX_LOGS_LENGTH_CONSTRAINT = "max_logs_length"


class LogsLimitExceeded(Exception):
    """The batch would take the agent's ``logs_length`` past 1 MiB; nothing was written."""


class ForeignLogSource(Exception):
    """The log source id belongs to another agent (and not to this one); nothing was written."""


class LogsOverflowed(Exception):
    """The agent's logs were already cut off at the budget; nothing was written."""


@attrs.frozen
class LogsNotices:
    """The events of a batch, sent by the insert statement itself (``pg_notify``) so that one round
    trip writes and announces the batch: ``agent-logs`` with ``{"created_after": first_id - 1}``, and
    ``first_logs`` (channel, payload) when the batch is the agent's first output."""

    logs_channel: str
    first_logs: tuple[str, str]


@attrs.frozen
class LogsAgent:
    """The agent-row columns BatchCreateLogs reads first (AgentFn)."""

    id: uuid.UUID
    logs_length: int
    logs_overflowed: bool


@attrs.frozen
class InsertedLogs:
    #: Lowest id of the inserted rows.
    first_id: int
    count: int
    #: The agent's ``logs_length`` just before this batch.
    logs_length_before: int


async def get_logs_agent(db: Database | Transaction, agent_id: uuid.UUID) -> LogsAgent | None:
    """The agent's log counters, or None when the agent does not exist (or is deleted)."""
    row = await db.fetchone(
        "SELECT id, logs_length, logs_overflowed FROM workspace_agents WHERE id = %s AND NOT deleted",
        [agent_id],
    )
    if row is None:
        return None
    return LogsAgent(id=row["id"], logs_length=row["logs_length"], logs_overflowed=row["logs_overflowed"])


async def ensure_external_log_source(
    db: Database | Transaction, agent_id: uuid.UUID, now: dt.datetime
) -> None:
    """Create the agent's "External" log source unless it exists already."""
    await db.execute(
        "INSERT INTO workspace_agent_log_sources (workspace_agent_id, id, created_at, display_name, icon)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (workspace_agent_id, id) DO NOTHING",
        [agent_id, EXTERNAL_LOG_SOURCE_ID, now, EXTERNAL_LOG_SOURCE_NAME, EXTERNAL_LOG_SOURCE_ICON],
    )


_INSERT_SQL = """
WITH agent AS (
    SELECT logs_overflowed FROM workspace_agents WHERE id = %(agent_id)s AND NOT deleted
), source AS (
    -- A source id this agent does not have but another agent does is foreign (CASE keeps the
    -- common case, the agent's own source, to one primary-key probe).
    SELECT CASE
        WHEN NOT %(check_source)s::boolean THEN false
        WHEN EXISTS (
            SELECT 1 FROM workspace_agent_log_sources
            WHERE workspace_agent_id = %(agent_id)s AND id = %(log_source_id)s
        ) THEN false
        ELSE EXISTS (SELECT 1 FROM workspace_agent_log_sources WHERE id = %(log_source_id)s)
    END AS foreign_source
), new_length AS (
    UPDATE workspace_agents SET logs_length = logs_length + %(output_length)s::integer
    WHERE id = %(agent_id)s AND NOT deleted AND NOT logs_overflowed
        AND NOT (SELECT foreign_source FROM source)
    RETURNING logs_length
), inserted AS (
    INSERT INTO workspace_agent_logs (agent_id, created_at, output, level, log_source_id)
    SELECT %(agent_id)s::uuid, %(created_at)s::timestamptz, t.output, t.level, %(log_source_id)s::uuid
    FROM unnest(%(output)s::varchar(1024)[], %(level)s::log_level[]) AS t(output, level)
    WHERE EXISTS (SELECT 1 FROM new_length)
    RETURNING id
), summary AS (
    SELECT
        (SELECT logs_length FROM new_length) - %(output_length)s::integer AS logs_length_before,
        min(id) AS first_id,
        count(*) AS count
    FROM inserted
)
SELECT
    (SELECT logs_overflowed FROM agent) AS overflowed,
    (SELECT foreign_source FROM source) AS foreign_source,
    s.logs_length_before,
    s.first_id,
    s.count,
    -- The events, in the order the service used to publish them (NULL channel: not here).
    CASE WHEN s.count > 0 AND %(logs_channel)s::text IS NOT NULL
        THEN pg_notify(%(logs_channel)s, '{"created_after":' || (s.first_id - 1) || '}') END AS logs_notice,
    CASE WHEN s.count > 0 AND s.logs_length_before = 0 AND %(first_channel)s::text IS NOT NULL
        THEN pg_notify(%(first_channel)s, %(first_payload)s) END AS first_logs_notice
FROM summary AS s
"""


async def insert_logs(
    db: Database | Transaction,
    agent_id: uuid.UUID,
    *,
    created_at: dt.datetime,
    log_source_id: uuid.UUID,
    output: Sequence[str],
    level: Sequence[str],
    output_length: int,
    check_source: bool = True,
    notices: LogsNotices | None = None,
) -> InsertedLogs | None:
    """Insert one batch for ``agent_id`` and count it against the agent's budget, in one statement.

    Returns None when the agent does not exist (nothing written). Raises `LogsOverflowed` when the
    agent's logs are already cut off, `LogsLimitExceeded` when the ``max_logs_length`` check rejects
    the batch and, with ``check_source``, `ForeignLogSource` when ``log_source_id`` is another agent's
    source; nothing is written (or announced) in any of these cases. Source ids no agent has are
    accepted (there is no foreign key, spec §7.9). With ``notices`` the statement also sends the
    batch's events, committed with the rows.
    """
    if len(output) != len(level) or not output:
        raise ValueError("insert_logs needs one level per output and at least one row")
    try:
        row = await db.fetchone(
            _INSERT_SQL,
            {
                "agent_id": agent_id,
                "created_at": created_at,
                "log_source_id": log_source_id,
                "output": list(output),
                "level": list(level),
                "output_length": output_length,
                "check_source": check_source,
                "logs_channel": None if notices is None else notices.logs_channel,
                "first_channel": None if notices is None else notices.first_logs[0],
                "first_payload": None if notices is None else notices.first_logs[1],
            },
        )
    except CheckViolation as exc:
        if exc.constraint == MAX_LOGS_LENGTH_CONSTRAINT:
            raise LogsLimitExceeded(str(exc)) from exc
        raise
    if row is None or row["overflowed"] is None:
        return None
    if row["overflowed"]:
        raise LogsOverflowed(f"logs of agent {agent_id} are already cut off")
    if row["foreign_source"]:
        raise ForeignLogSource(f"log source {log_source_id} belongs to another agent")
    if row["logs_length_before"] is None:
        return None
    return InsertedLogs(
        first_id=int(row["first_id"]),
        count=int(row["count"]),
        logs_length_before=int(row["logs_length_before"]),
    )


async def set_logs_overflowed(db: Database | Transaction, agent_id: uuid.UUID) -> None:
    """Mark the agent's logs as cut off at the 1 MiB budget."""
    await db.execute(
        "UPDATE workspace_agents SET logs_overflowed = true WHERE id = %s AND NOT deleted", [agent_id]
    )
