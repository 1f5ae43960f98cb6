"""Queries of the scripts API (spec §7.10 ScriptCompleted): one timing row per script run.

Coder's name, for grepping: InsertWorkspaceAgentScriptTimings. Coder relies on the foreign key to
``workspace_agent_scripts`` alone; here the insert also requires the script to belong to the reporting
agent, so one agent cannot write timings for another agent's scripts.
"""

from __future__ import annotations

import datetime as dt
import uuid

import attrs

from agentd.store.db import Database, Transaction

__all__ = ["ScriptTiming", "insert_script_timing"]

Queryable = Database | Transaction


@attrs.frozen
class ScriptTiming:
    """A ``workspace_agent_script_timings`` row (stage and status are their enum labels)."""

    script_id: uuid.UUID
    started_at: dt.datetime
    ended_at: dt.datetime
    exit_code: int
    stage: str
    status: str


async def insert_script_timing(db: Queryable, agent_id: uuid.UUID, timing: ScriptTiming) -> bool:
    """Insert the timing if the script is one of ``agent_id``'s; False (nothing written) otherwise.

    A second report of the same (script, start) raises `agentd.store.errors.UniqueViolation`.
    """
    inserted = await db.execute(
        "INSERT INTO workspace_agent_script_timings"
        " (script_id, started_at, ended_at, exit_code, stage, status)"
        " SELECT s.id, %(started_at)s, %(ended_at)s, %(exit_code)s,"
        " %(stage)s::workspace_agent_script_timing_stage, %(status)s::workspace_agent_script_timing_status"
        " FROM workspace_agent_scripts s WHERE s.id = %(script_id)s AND s.workspace_agent_id = %(agent_id)s",
        {**attrs.asdict(timing), "agent_id": agent_id},
    )
    return inserted > 0
