"""ScriptCompleted (spec §7.10): the agent reports how a start/stop/cron script run went.

Validated here (each error names its field), written as one ``workspace_agent_script_timings`` row. An
unknown script, a script of another agent, or a second report of the same (script, start) is an error;
the agent only logs it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping

import attrs
from google.protobuf import timestamp_pb2

from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.model import ZERO_TIME
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope
from agentd.store import Database
from agentd.store.errors import UniqueViolation
from agentd.store.scripts import ScriptTiming, insert_script_timing

__all__ = ["STAGES", "STATUSES", "ScriptsService", "build", "validate_timing"]

Timing = agent_pb2.Timing

STAGES = {Timing.START: "start", Timing.STOP: "stop", Timing.CRON: "cron"}
STATUSES = {
    Timing.OK: "ok",
    Timing.EXIT_FAILURE: "exit_failure",
    Timing.TIMED_OUT: "timed_out",
    Timing.PIPES_LEFT_OPEN: "pipes_left_open",
}

# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799


def _time(ts: timestamp_pb2.Timestamp, present: bool, field: str, what: str) -> dt.datetime:
    if not present:
        raise RpcError(f"script {what} time is required ({field})")
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999):
        raise RpcError(f"script {what} time is invalid: seconds={ts.seconds} nanos={ts.nanos} ({field})")
    when = ts.ToDatetime(tzinfo=dt.UTC)
    if (ts.seconds == 0 and ts.nanos == 0) or when == ZERO_TIME:
        raise RpcError(f"script {what} time must not be zero ({field})")
    return when


def validate_timing(request: agent_pb2.WorkspaceAgentScriptCompletedRequest) -> ScriptTiming:
    """Spec §7.10 validation: timing present, 16-byte script id, non-zero start ≤ end, known enums."""
    if not request.HasField("timing"):
        raise RpcError("script timing is required (timing)")
    timing = request.timing
    raw = bytes(timing.script_id)
    if len(raw) != 16:
        raise RpcError(f"script id from bytes: invalid UUID (got {len(raw)} bytes) (timing.script_id)")
    start = _time(timing.start, timing.HasField("start"), "timing.start", "start")
    end = _time(timing.end, timing.HasField("end"), "timing.end", "end")
    if start > end:
        raise RpcError(
            f"script start time {start.isoformat()} is after end time {end.isoformat()} (timing.start)"
        )
    stage = STAGES.get(timing.stage)
    if stage is None:
        raise RpcError(f"unknown script timing stage {timing.stage} (timing.stage)")
    status = STATUSES.get(timing.status)
    if status is None:
        raise RpcError(f"unknown script timing status {timing.status} (timing.status)")
    return ScriptTiming(
        script_id=uuid.UUID(bytes=raw),
        started_at=start,
        ended_at=end,
        exit_code=timing.exit_code,
        stage=stage,
        status=status,
    )


@attrs.frozen
class ScriptsService:
    """ScriptCompleted for one agent: only that agent's scripts can be reported."""

    db: Database
    agent_id: uuid.UUID

    def handlers(self) -> Mapping[str, Handler]:
        return {f"{AGENT}ScriptCompleted": self.script_completed}

    async def script_completed(
        self, request: agent_pb2.WorkspaceAgentScriptCompletedRequest
    ) -> agent_pb2.WorkspaceAgentScriptCompletedResponse:
        timing = validate_timing(request)
        try:
            inserted = await insert_script_timing(self.db, self.agent_id, timing)
        except UniqueViolation as exc:
            raise RpcError(
                "insert workspace agent script timings into database: a timing for script"
                f" {timing.script_id} started at {timing.started_at.isoformat()} was already reported"
                f" (timing.start): {exc}"
            ) from exc
        if not inserted:
            raise RpcError(
                f"insert workspace agent script timings into database: script {timing.script_id}"
                " not found for this agent (timing.script_id)"
            )
        return agent_pb2.WorkspaceAgentScriptCompletedResponse()


def build(scope: ConnectionScope) -> ScriptsService:
    return ScriptsService(db=scope.db, agent_id=scope.ident.agent_id)
