"""BatchCreateLogs (spec §7.9): the agent's script and startup output, capped at 1 MiB per agent.

Output is sanitised the way Coder's ``agentsdk.SanitizeLogOutput`` does it — Go's
``strings.ToValidUTF8(s, "❌")`` (each *run* of invalid UTF-8 bytes becomes one ❌) and then every NUL
becomes ❌ — and stamped with server time. One statement counts the batch against the agent's
``logs_length`` and inserts the rows; when the ``max_logs_length`` check trips, the agent is marked
overflowed and told ``log_limit_exceeded`` (it then stops sending for the connection).

Over DRPC the ``output`` strings are already valid UTF-8 (protobuf rejects anything else at decode,
exactly like Go's), so for agents the sanitiser's visible work is the NUL bytes; it accepts raw bytes
too so that every other producer of log text gets the same treatment.

Ownership: rows are only ever written for the authenticated agent. A log source id that no agent has is
accepted as-is (spec: no foreign key); one that belongs to *another* agent only is refused.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

import attrs

from agentd.channels import agent_logs_channel
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.proto import agent_pb2
from agentd.services import events
from agentd.services.base import AGENT, ConnectionScope
from agentd.store import logs as store
from agentd.store.errors import StoreError

__all__ = [
    "LOG_LEVELS",
    "MAX_LOGS_LENGTH",
    "REPLACEMENT",
    "LogsService",
    "build",
    "go_quote",
    "sanitize_log_output",
    "to_valid_utf8",
]

log = logging.getLogger("agentd.services.logs")

BATCH_CREATE_LOGS = AGENT + "BatchCreateLogs"

#: What invalid UTF-8 and NUL bytes become.
REPLACEMENT = "\u274c"  # ❌

#: The ``max_logs_length`` check of ``workspace_agents`` (bytes of sanitised output per agent).
MAX_LOGS_LENGTH = 1_048_576

NIL_UUID = uuid.UUID(int=0)

LOG_LEVELS: Mapping[int, str] = {
    agent_pb2.Log.TRACE: "trace",
    agent_pb2.Log.DEBUG: "debug",
    agent_pb2.Log.INFO: "info",
    agent_pb2.Log.WARN: "warn",
    agent_pb2.Log.ERROR: "error",
}


# ---- UTF-8 exactly as Go's unicode/utf8 decodes it --------------------------------------------------

# (low, high) bounds of the second byte for each lead byte of a multi-byte sequence; the remaining
# continuation bytes are always 0x80..0xBF. Lead bytes outside this table (0x80..0xC1, 0xF5..0xFF)
# never start a valid sequence.
_SECOND: dict[int, tuple[int, int]] = {}
for _lead in range(0xC2, 0xE0):
    _SECOND[_lead] = (0x80, 0xBF)
for _lead in range(0xE0, 0xF0):
    _SECOND[_lead] = (0xA0, 0xBF) if _lead == 0xE0 else (0x80, 0x9F) if _lead == 0xED else (0x80, 0xBF)
for _lead in range(0xF0, 0xF5):
    _SECOND[_lead] = (0x90, 0xBF) if _lead == 0xF0 else (0x80, 0x8F) if _lead == 0xF4 else (0x80, 0xBF)


def _rune_width(data: bytes, i: int) -> int:
    """Width of the valid UTF-8 sequence starting at ``data[i]``, or 0 where Go would decode
    ``(RuneError, 1)`` (invalid lead, bad continuation, overlong, surrogate, > U+10FFFF, truncated)."""
    lead = data[i]
    if lead < 0x80:
        return 1
    bounds = _SECOND.get(lead)
    if bounds is None:
        return 0
    width = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    if i + width > len(data):
        return 0
    if not bounds[0] <= data[i + 1] <= bounds[1]:
        return 0
    for j in range(i + 2, i + width):
        if not 0x80 <= data[j] <= 0xBF:
            return 0
    return width


def to_valid_utf8(data: bytes, replacement: str) -> str:
    """Go's ``strings.ToValidUTF8``: each run of consecutive invalid bytes becomes one ``replacement``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    start = 0  # first byte of the pending valid stretch
    invalid = False  # the previous byte was part of an invalid run
    i = 0
    n = len(data)
    while i < n:
        width = _rune_width(data, i)
        if width:
            invalid = False
            i += width
            continue
        if i > start:
            out.append(data[start:i].decode("utf-8"))
        if not invalid:
            out.append(replacement)
            invalid = True
        i += 1
        start = i
    if start < n:
        out.append(data[start:].decode("utf-8"))
    return "".join(out)


def sanitize_log_output(output: str | bytes) -> str:
    """``agentsdk.SanitizeLogOutput``: invalid UTF-8 runs, then each NUL, become ❌."""
    data = output if isinstance(output, bytes) else output.encode("utf-8", "surrogatepass")
    return to_valid_utf8(data, REPLACEMENT).replace("\x00", REPLACEMENT)


_GO_ESCAPES = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}


def go_quote(value: str | bytes) -> str:
    """Go's ``%q`` / ``strconv.Quote`` of a string or byte slice (invalid bytes as ``\\xNN``)."""
    data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    out = ['"']
    i = 0
    while i < len(data):
        width = _rune_width(data, i)
        if width == 0:
            out.append(f"\\x{data[i]:02x}")
            i += 1
            continue
        ch = data[i : i + width].decode("utf-8")
        code = ord(ch)
        i += width
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif code in _GO_ESCAPES:
            out.append(_GO_ESCAPES[code])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


# ---- the service --------------------------------------------------------------------------------------


@attrs.define(eq=False)
class LogsService:
    """BatchCreateLogs for one agent connection."""

    scope: ConnectionScope
    _notice_texts: store.LogsNotices | None = attrs.field(default=None, init=False)

    def handlers(self) -> dict[str, Handler]:
        return {BATCH_CREATE_LOGS: self.batch_create_logs}

    def _notices(self) -> store.LogsNotices:
        """The connection's event channels and first-logs payload (composed once)."""
        if self._notice_texts is None:
            ident = self.scope.ident
            first = self.scope.events.workspace_notice(
                ident.owner_id, events.AGT_FIRST_LOGS, ident.workspace_id, ident.agent_id
            )
            self._notice_texts = store.LogsNotices(agent_logs_channel(ident.agent_id), first)
        return self._notice_texts

    def _agent_missing(self) -> RpcError:
        return RpcError(
            f'get workspace agent by id "{self.scope.ident.agent_id}": sql: no rows in result set'
        )

    async def _publish_workspace(self, kind: str) -> None:
        ident = self.scope.ident
        try:
            await self.scope.events.workspace(ident.owner_id, kind, ident.workspace_id, ident.agent_id)
        except StoreError as exc:
            raise RpcError(f"publish workspace update: {exc}") from exc

    async def batch_create_logs(
        self, request: agent_pb2.BatchCreateLogsRequest
    ) -> agent_pb2.BatchCreateLogsResponse:
        db = self.scope.db
        ident = self.scope.ident
        agent_id = ident.agent_id
        raw_source = request.log_source_id
        # The common call (lines on a real source, PostgreSQL pubsub) is one statement: agent check,
        # insert and events together. Anything else first reads the agent, as coderd does.
        notices: store.LogsNotices | None = None
        real_source = len(raw_source) == 16 and raw_source != NIL_UUID.bytes
        if request.logs and real_source and self.scope.events.in_statement(db):
            notices = self._notices()
        if notices is None:
            agent = await store.get_logs_agent(db, agent_id)
            if agent is None:
                raise self._agent_missing()
            if agent.logs_overflowed:
                return agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
            if not request.logs:
                return agent_pb2.BatchCreateLogsResponse()

        if len(raw_source) != 16:
            raise RpcError(
                f"parse log source ID {go_quote(raw_source)}: invalid UUID (got {len(raw_source)} bytes)"
            )
        source_id = uuid.UUID(bytes=bytes(raw_source))
        now = self.scope.now()
        if source_id == NIL_UUID:
            # Legacy clients: their logs go to the agent's well-known "External" source.
            try:
                await store.ensure_external_log_source(db, agent_id, now)
            except StoreError as exc:
                raise RpcError(f"insert external workspace agent log source: {exc}") from exc
            source_id = store.EXTERNAL_LOG_SOURCE_ID

        outputs: list[str] = []
        levels: list[str] = []
        output_length = 0
        for entry in request.logs:
            text = sanitize_log_output(entry.output)
            outputs.append(text)
            output_length += len(text.encode("utf-8"))
            levels.append(LOG_LEVELS.get(entry.level, "info"))

        try:
            inserted = await store.insert_logs(
                db,
                agent_id,
                created_at=now,
                log_source_id=source_id,
                output=outputs,
                level=levels,
                # Anything past the budget trips the check the same way; clamping keeps it an int32.
                output_length=min(output_length, MAX_LOGS_LENGTH + 1),
                check_source=source_id != store.EXTERNAL_LOG_SOURCE_ID,
                notices=notices,
            )
        except store.LogsOverflowed:
            return agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
        except store.LogsLimitExceeded:
            try:
                await store.set_logs_overflowed(db, agent_id)
            except StoreError:
                # Only a hint for the UI; the agent stops sending anyway once it sees the answer.
                log.warning("marking logs overflowed failed agent_id=%s", agent_id, exc_info=True)
            await self._publish_workspace(events.AGT_LOGS_OVERFLOW)
            return agent_pb2.BatchCreateLogsResponse(log_limit_exceeded=True)
        except store.ForeignLogSource as exc:
            raise RpcError(
                f'invalid log_source_id: log source "{source_id}" belongs to another agent'
            ) from exc
        except StoreError as exc:
            raise RpcError(f"insert workspace agent logs: {exc}") from exc
        if inserted is None:
            raise self._agent_missing()
        if notices is not None:
            return agent_pb2.BatchCreateLogsResponse()  # the statement sent the events

        try:
            await self.scope.events.agent_logs(agent_id, inserted.first_id - 1)
        except StoreError:
            log.warning("publishing agent-logs update failed agent_id=%s", agent_id, exc_info=True)
        if inserted.logs_length_before == 0:
            await self._publish_workspace(events.AGT_FIRST_LOGS)
        return agent_pb2.BatchCreateLogsResponse()


def build(scope: ConnectionScope) -> LogsService:
    """The connection's BatchCreateLogs service."""
    return LogsService(scope=scope)
