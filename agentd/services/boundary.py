"""ReportBoundaryLogs (spec §7.17): the audit trail of the network requests boundary allowed or denied.

Every log becomes one structured ``boundary_request`` log line and counts toward the process-wide usage
tracker (§9.5). With a valid ``session_id`` the batch is also persisted: the session row is created lazily
(once per session per connection, owner = the workspace owner, never the request's) and the logs go in as
one multi-row INSERT. Without one (old boundary, or an invalid id) only the log lines and usage remain.

Deliberate choices where the spec leaves room:
* A log with a negative ``sequence_number`` is rejected alone (error logged, no row) instead of making the
  whole multi-row insert fail on the CHECK constraint and losing the batch's valid logs; it still gets its
  ``boundary_request`` line and counts toward usage, because the request did happen.
* Logs without a known resource are skipped with one warning per batch carrying their count; they are not
  counted as allowed or denied.
* The owner is the cached workspace owner when the connection has one (a claimed prebuild changes owner),
  else the owner fixed at authentication.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Mapping

import attrs

from agentd.clock import Now
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.logfmt import logfmt
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope
from agentd.store import boundary as store

log = logging.getLogger("agentd.boundary")


MAX_BATCH = 1000


def rfc3339_nano(t: dt.datetime, nanos: int | None = None) -> str:
    """Go's time.RFC3339Nano in UTC: fraction with trailing zeros removed, none at all when zero.

    ``nanos`` (0..999999999) overrides the datetime's microseconds when the source has nanoseconds.
    """
    t = t.astimezone(dt.UTC)
    frac = t.microsecond * 1000 if nanos is None else nanos
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def parse_session_id(raw: str) -> uuid.UUID | None:
    """A usable session id, or None (empty = old boundary; anything unparsable is logged)."""
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        log.warning("invalid boundary session id, persistence disabled for this batch: %r", raw)
        return None


@attrs.frozen
class Mapped:
    """What one batch turns into: rows to insert (if persisting), usage counts and the skips."""

    rows: list[store.BoundaryLogRow]
    allowed: int
    denied: int
    unknown_resources: int
    negative_sequences: int


@attrs.define(eq=False)
class BoundaryLogsService:
    scope: ConnectionScope
    now: Now
    #: Sessions whose row this connection has created or found existing; never shrinks (spec §7.17 step 5).
    ensured: set[uuid.UUID] = attrs.field(factory=set)

    def handlers(self) -> Mapping[str, Handler]:
        return {AGENT + "ReportBoundaryLogs": self.report_boundary_logs}

    def _owner_id(self) -> uuid.UUID:
        cached = self.scope.cache.get()
        return cached.owner_id if cached is not None else self.scope.ident.owner_id

    async def report_boundary_logs(
        self, request: agent_pb2.ReportBoundaryLogsRequest
    ) -> agent_pb2.ReportBoundaryLogsResponse:
        n = len(request.logs)
        if n == 0:
            log.debug("empty boundary log batch")
            return agent_pb2.ReportBoundaryLogsResponse()
        if n > MAX_BATCH:
            raise RpcError(f"invalid logs: batch size {n} exceeds maximum of {MAX_BATCH}")
        now = self.now()
        session_id = parse_session_id(request.session_id)
        owner_id = self._owner_id()

        if session_id is not None and session_id not in self.ensured:
            await self._ensure_session(session_id, owner_id, request.confined_process_name, now)

        mapped = self.map_logs(request, session_id, now)
        if mapped.unknown_resources:
            log.warning("skipped %d boundary logs with an unknown resource", mapped.unknown_resources)

        if session_id is not None and mapped.rows:
            try:
                await store.insert_boundary_logs(self.scope.db, session_id, owner_id, mapped.rows)
            except Exception:
                log.exception("insert %d boundary logs of session %s failed", len(mapped.rows), session_id)

        tracker = self.scope.components.boundary_usage if self.scope.components is not None else None
        if tracker is not None and mapped.allowed + mapped.denied > 0:
            tracker.track(self.scope.ident.workspace_id, owner_id, mapped.allowed, mapped.denied)
        return agent_pb2.ReportBoundaryLogsResponse()

    async def _ensure_session(
        self, session_id: uuid.UUID, owner_id: uuid.UUID, process: str, now: dt.datetime
    ) -> None:
        session = store.BoundarySession(
            id=session_id,
            workspace_agent_id=self.scope.ident.agent_id,
            owner_id=owner_id,
            confined_process_name=process,
            started_at=now,
        )
        try:
            created = await store.insert_boundary_session(self.scope.db, session)
        except Exception:
            # Logs are still inserted (boundary_logs has no FK); the next batch retries the session.
            log.exception("create boundary session %s failed; retrying on the next batch", session_id)
            return
        if not created:
            log.debug("boundary session %s already existed; keeping its first creator", session_id)
        self.ensured.add(session_id)

    def map_logs(
        self, request: agent_pb2.ReportBoundaryLogsRequest, session_id: uuid.UUID | None, now: dt.datetime
    ) -> Mapped:
        """Per log: one ``boundary_request`` line, the usage count and (if valid) a row."""
        ident = self.scope.ident
        rows: list[store.BoundaryLogRow] = []
        allowed = denied = unknown = negative = 0
        for entry in request.logs:
            if entry.WhichOneof("resource") != "http_request":
                unknown += 1
                continue
            http = entry.http_request
            has_time = entry.HasField("time")
            event_time = entry.time.ToDatetime(tzinfo=dt.UTC) if has_time else now
            if entry.allowed:
                allowed += 1
            else:
                denied += 1
            rule = http.matched_rule if entry.allowed and http.matched_rule else None
            fields: dict[str, object] = {
                "decision": "allow" if entry.allowed else "deny",
                "session_id": request.session_id,
                "sequence_number": entry.sequence_number,
                "workspace_id": str(ident.workspace_id),
                "agent_id": str(ident.agent_id),
                "template_id": str(ident.template_id),
                "template_version_id": str(ident.template_version_id),
                "http_method": http.method,
                "http_url": http.url,
                "event_time": rfc3339_nano(event_time, entry.time.nanos if has_time else None),
            }
            if entry.allowed:
                fields["matched_rule"] = http.matched_rule
            # The fields ride on the record for structured handlers and in the text for plain ones.
            log.info("boundary_request %s", logfmt(fields), extra=fields)
            if session_id is None:
                continue
            if entry.sequence_number < 0:
                negative += 1
                log.error(
                    "boundary log of session %s has negative sequence_number %d; not stored",
                    session_id,
                    entry.sequence_number,
                )
                continue
            rows.append(
                store.BoundaryLogRow(
                    id=uuid.uuid4(),
                    sequence_number=entry.sequence_number,
                    captured_at=now,
                    created_at=event_time,
                    proto="http",
                    method=http.method,
                    detail=http.url,
                    matched_rule=rule,
                )
            )
        return Mapped(rows, allowed, denied, unknown, negative)


def build(scope: ConnectionScope) -> BoundaryLogsService:
    return BoundaryLogsService(scope=scope, now=scope.now)
