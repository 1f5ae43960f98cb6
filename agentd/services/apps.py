"""BatchUpdateAppHealths (spec §7.7) and UpdateAppStatus (§7.18): what the agent says about its apps.

BatchUpdateAppHealths validates the whole batch before writing anything (fail-fast), writes only the
apps whose health changed and then publishes one ``app_health`` event. UpdateAppStatus stores an
AI-agent status row for one app (message sanitised for the UI, at most 160 bytes), publishes
``agt_app_status_update``, enqueues the task notification of §7.18 step 9 when the app is the
workspace task's app, and bumps the workspace deadline while work is going on (§9.3). Its errors read
like Coder's codersdk HTTP errors (``unexpected status code <n>: <message>``, then detail and
validations), as the agent SDK prints them.

The activity bump is the shared query of ``agentd.store.activity`` (built on branch svc-stats, merged
here), called with no autostart information as Coder does for app activity; the service takes it as
the narrow ``ActivityBump`` callable so tests can observe when it fires. Task notifications are rows
in ``notification_messages`` through ``agentd.store.notifications`` (spec §9.6).
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import trio

from agentd.clock import Now
from agentd.drpc.errors import RpcError
from agentd.drpc.registry import Handler
from agentd.model import AgentIdentity, WorkspaceIdentity
from agentd.proto import agent_pb2
from agentd.services.base import AGENT, ConnectionScope, WorkspaceCache
from agentd.services.events import AGT_APP_STATUS_UPDATE, APP_HEALTH, Events
from agentd.store import Database
from agentd.store.activity import activity_bump_workspace
from agentd.store.agents import get_agent_by_id
from agentd.store.apps import (
    AppHealth,
    AppStatus,
    WorkspaceApp,
    app_by_slug,
    apps_by_agent,
    insert_app_status,
    latest_app_status,
    task_of_workspace,
    update_app_healths,
)
from agentd.store.errors import StoreError
from agentd.store.notifications import Notification, enqueue_notification

__all__ = [
    "HEALTHS",
    "MAX_STATUS_MESSAGE_BYTES",
    "STATES",
    "TASK_TEMPLATES",
    "ActivityBump",
    "AppsService",
    "build",
    "go_quote_bytes",
    "go_unquote",
    "sdk_error",
    "ui_sanitize",
]

log = logging.getLogger("agentd.services.apps")

HEALTHS = {
    agent_pb2.AppHealth.DISABLED: "disabled",
    agent_pb2.AppHealth.INITIALIZING: "initializing",
    agent_pb2.AppHealth.HEALTHY: "healthy",
    agent_pb2.AppHealth.UNHEALTHY: "unhealthy",
}

State = agent_pb2.UpdateAppStatusRequest.AppStatusState
STATES = {State.WORKING: "working", State.IDLE: "idle", State.COMPLETE: "complete", State.FAILURE: "failure"}

MAX_STATUS_MESSAGE_BYTES = 160

#: AI-task notification templates by new app state (spec §7.18 step 9).
TASK_TEMPLATES = {
    "working": uuid.UUID("bd4b7168-d05e-4e19-ad0f-3593b77aa90f"),
    "idle": uuid.UUID("d4a6271c-cced-4ed0-84ad-afd02a9c7799"),
    "complete": uuid.UUID("8c5a4d12-9f7e-4b3a-a1c8-6e4f2d9b5a7c"),
    "failure": uuid.UUID("3b7e8f1a-4c2d-49a6-b5e9-7f3a1c8d6b4e"),
}
TASK_NOTIFICATION_CREATED_BY = "api-workspace-agent-app-status"

ACTIVITY_BUMP_TIMEOUT_S = 15.0

#: ``bump(workspace_id, now)``: the activity bump of §9.3 without autostart information (the
#: template's plain activity_bump). Injected so tests can observe it; build() wires the real query.
ActivityBump = Callable[[uuid.UUID, dt.datetime], Awaitable[object]]


# ---------------------------------------------------------------------------------------------
# Error texts


def sdk_error(
    status: int, message: str, detail: str = "", validations: Sequence[tuple[str, str]] = ()
) -> RpcError:
    """An error worded like codersdk.Error: status and message, then detail and field validations."""
    text = f"unexpected status code {status}: {message}"
    if detail:
        text += f"\n\tError: {detail}"
    for field, why in validations:
        text += f"\n\t{field}: {why}"
    return RpcError(text)


def go_quote_bytes(raw: bytes) -> str:
    """Go's ``%q`` of a byte slice (printable ASCII kept, the rest escaped)."""
    out = []
    for b in raw:
        ch = chr(b)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= b < 0x7F:
            out.append(ch)
        else:
            out.append(
                {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}.get(
                    b, f"\\x{b:02x}"
                )
            )
    return '"' + "".join(out) + '"'


def _enum_name(enum: object, value: int) -> str:
    """Go's String() of a proto enum value: its name, or the number when it has none."""
    try:
        return str(enum.Name(value))  # type: ignore[attr-defined]
    except ValueError:
        return str(value)


# ---------------------------------------------------------------------------------------------
# Message sanitising (Coder's strutil.UISanitize): pure functions


_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}


def go_unquote(body: str) -> str | None:
    """Interpret ``body`` as the inside of a Go double-quoted string literal (``strconv.Unquote`` of
    ``"<body>"``); None when that is not a valid literal (then the caller keeps the text as it is)."""
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch in '"\n':
            return None
        if ch != "\\":
            out += ch.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= n:
            return None
        esc = body[i + 1]
        if esc in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[esc])
            i += 2
        elif esc in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                return None
            value = int(digits, 16)
            if esc == "x":
                out.append(value)
            else:
                if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                    return None
                out += chr(value).encode("utf-8")
            i += 2 + width
        elif esc in "01234567":
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or not all(c in "01234567" for c in digits):
                return None
            value = int(digits, 8)
            if value > 255:
                return None
            out.append(value)
            i += 4
        else:
            return None
    return out.decode("utf-8", "replace")


_HIDDEN_ELEMENTS = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENTS = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_TAGS = re.compile(r"</?[A-Za-z!?][^>]*>?")
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS / SOS / PM / APC ... ST
    r"|\x1b[@-Z\\-_]"  # two-byte escapes
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
_NOT_SPACE = frozenset("\x1c\x1d\x1e\x1f")  # Python calls these whitespace; Go does not


def strip_html(text: str) -> str:
    """Drop tags (and the content of script/style elements and comments), then unescape entities."""
    text = _HIDDEN_ELEMENTS.sub("", text)
    text = _COMMENTS.sub("", text)
    text = _TAGS.sub("", text)
    return html.unescape(text)


def strip_ansi(text: str) -> str:
    """Drop ANSI/VT escape sequences (colours, cursor movement, OSC titles and links)."""
    return _ANSI.sub("", text)


def ui_sanitize(message: str) -> str:
    """Make an untrusted status message safe and tidy for the UI (spec §7.18 step 5): unquote Go
    escapes when the text is a valid Go string body, strip HTML, strip ANSI, drop non-printable
    characters, collapse whitespace runs into one space, trim."""
    unquoted = go_unquote(message)
    text = unquoted if unquoted is not None else message
    text = strip_ansi(strip_html(text))
    out: list[str] = []
    in_space = False
    for ch in text:
        if ch.isspace() and ch not in _NOT_SPACE:
            if not in_space:
                out.append(" ")
                in_space = True
            continue
        if ch.isprintable():  # a dropped character must not split a whitespace run
            out.append(ch)
            in_space = False
    return "".join(out).strip()


# ---------------------------------------------------------------------------------------------
# The service


async def _bump_with_query(db: Database, workspace_id: uuid.UUID, now: dt.datetime) -> bool:
    """§9.3 for app activity: the template's plain activity_bump (no next-autostart adjustment)."""
    return await activity_bump_workspace(db, workspace_id, now=now, next_autostart=None)


@attrs.frozen
class AppsService:
    """The apps API of one agent connection."""

    db: Database
    events: Events
    ident: AgentIdentity
    cache: WorkspaceCache
    bump: ActivityBump
    now: Now

    @property
    def agent_id(self) -> uuid.UUID:
        return self.ident.agent_id

    def handlers(self) -> Mapping[str, Handler]:
        return {
            f"{AGENT}BatchUpdateAppHealths": self.batch_update_app_healths,
            f"{AGENT}UpdateAppStatus": self.update_app_status,
        }

    # -- BatchUpdateAppHealths --------------------------------------------------------------

    async def batch_update_app_healths(
        self, request: agent_pb2.BatchUpdateAppHealthRequest
    ) -> agent_pb2.BatchUpdateAppHealthResponse:
        if not request.updates:
            return agent_pb2.BatchUpdateAppHealthResponse()
        apps = {app.id: app for app in await apps_by_agent(self.db, self.agent_id)}
        changes: dict[uuid.UUID, AppHealth] = {}
        for i, update in enumerate(request.updates):
            field = f"updates[{i}]"
            raw = bytes(update.id)
            if len(raw) != 16:
                raise RpcError(
                    f"parse workspace app ID {go_quote_bytes(raw)}: invalid UUID (got {len(raw)} bytes)"
                    f" ({field}.id)"
                )
            app_id = uuid.UUID(bytes=raw)
            app = apps.get(app_id)
            if app is None:
                raise RpcError(f'workspace app ID "{app_id}" not found ({field}.id)')
            if not app.healthcheck_url:
                raise RpcError(
                    f'workspace app "{app_id}" ("{app.slug}") does not have healthchecks enabled ({field}.id)'
                )
            health = HEALTHS.get(update.health)
            if health is None:
                name = _enum_name(agent_pb2.AppHealth, update.health)
                raise RpcError(
                    f'unknown health status "{name}" for app "{app_id}" ("{app.slug}") ({field}.health)'
                )
            current = changes[app_id].health if app_id in changes else app.health
            if health == current:
                continue
            changes[app_id] = AppHealth(app_id, health)
        if not changes:
            return agent_pb2.BatchUpdateAppHealthResponse()
        await update_app_healths(self.db, self.agent_id, list(changes.values()))
        await self.events.workspace(self.ident.owner_id, APP_HEALTH, self.ident.workspace_id, self.agent_id)
        return agent_pb2.BatchUpdateAppHealthResponse()

    # -- UpdateAppStatus --------------------------------------------------------------------

    async def update_app_status(
        self, request: agent_pb2.UpdateAppStatusRequest
    ) -> agent_pb2.UpdateAppStatusResponse:
        if len(request.message.encode("utf-8")) > MAX_STATUS_MESSAGE_BYTES:
            why = "Message must be less than 160 characters."
            raise sdk_error(400, "Message is too long.", why, [("message", why)])
        state = STATES.get(request.state)
        if state is None:
            raise sdk_error(
                400,
                "Invalid state provided.",
                f'invalid state: "{_enum_name(State, request.state)}"',
                [("state", "State must be one of: complete, failure, working, idle.")],
            )
        app = await app_by_slug(self.db, self.agent_id, request.slug)
        if app is None:
            raise sdk_error(400, "Failed to get workspace app.", f'No app found with slug "{request.slug}"')
        ws = self.cache.get()
        if ws is None:
            raise sdk_error(500, "Workspace identity not cached.")
        message = ui_sanitize(request.message)
        previous = await latest_app_status(self.db, app.id)
        now = self.now()
        try:
            await insert_app_status(
                self.db,
                AppStatus(
                    id=uuid.uuid4(),
                    created_at=now,
                    workspace_id=ws.id,
                    agent_id=self.agent_id,
                    app_id=app.id,
                    state=state,
                    message=message,
                    uri=request.uri or None,
                ),
            )
        except StoreError as exc:
            raise sdk_error(500, "Failed to insert workspace app status.", str(exc)) from exc
        try:
            await self.events.workspace(
                self.ident.owner_id, AGT_APP_STATUS_UPDATE, self.ident.workspace_id, self.agent_id
            )
        except (StoreError, ValueError) as exc:
            raise sdk_error(500, "Failed to publish workspace update.", str(exc)) from exc
        await self._notify_task(app, previous, state, ws, now)
        if state == "working" or (previous is not None and previous.state == "working"):
            await self._bump(ws.id, now)
        return agent_pb2.UpdateAppStatusResponse()

    async def _notify_task(
        self,
        app: WorkspaceApp,
        previous: AppStatus | None,
        state: str,
        ws: WorkspaceIdentity,
        now: dt.datetime,
    ) -> None:
        """The AI-task notification of §7.18 step 9; best effort (failures are logged)."""
        template = TASK_TEMPLATES.get(state)
        if template is None:
            return
        if previous is not None and previous.state == state:
            return  # no transition
        if previous is None and state == "working":
            return  # the task just started: obvious to its owner
        try:
            task = await task_of_workspace(self.db, ws.id)
            if task is None or task.app_id != app.id:
                return
            agent = await get_agent_by_id(self.db, self.agent_id)
            if agent is None or agent.lifecycle_state != "ready":
                return  # transitions while the workspace starts up are noise
            bucket = now.astimezone(dt.UTC).replace(second=0, microsecond=0)
            await enqueue_notification(
                self.db,
                Notification(
                    template_id=template,
                    user_id=ws.owner_id,
                    labels={"task": task.name, "workspace": ws.name},
                    data={"dedupe_bypass_ts": bucket.strftime("%Y-%m-%dT%H:%M:%SZ")},
                    created_by=TASK_NOTIFICATION_CREATED_BY,
                    targets=(ws.id, ws.owner_id, ws.organization_id, app.id),
                ),
                now=now,
            )
        except StoreError:
            log.warning("failed to notify of task state agent_id=%s", self.agent_id, exc_info=True)

    async def _bump(self, workspace_id: uuid.UUID, now: dt.datetime) -> None:
        """The activity bump (reason: app activity) with its own timeout; failures are logged only."""
        with trio.move_on_after(ACTIVITY_BUMP_TIMEOUT_S) as scope:
            try:
                await self.bump(workspace_id, now)
            except StoreError:
                log.error("activity bump of workspace %s failed", workspace_id, exc_info=True)
        if scope.cancelled_caught:
            log.error("activity bump of workspace %s timed out", workspace_id)


def build(scope: ConnectionScope) -> AppsService:
    db = scope.db

    async def bump(workspace_id: uuid.UUID, now: dt.datetime) -> bool:
        return await _bump_with_query(db, workspace_id, now)

    return AppsService(
        db=db,
        events=scope.events,
        ident=scope.ident,
        cache=scope.cache,
        bump=bump,
        now=scope.now,
    )
